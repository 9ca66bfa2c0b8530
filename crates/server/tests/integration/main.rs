//! End-to-end tests of the HTTP layer: a real server on port 0, driven over a real socket.

mod errors;
mod helpers;
mod middleware;
mod ops;
mod shutdown;
