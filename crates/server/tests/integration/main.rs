//! End-to-end tests of the HTTP layer: a real server on port 0, driven over a real socket.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

mod account;
mod auth;
mod conformance;
mod cron;
mod deployments;
mod deployments_window;
mod devices;
mod errors;
mod files;
mod firmware;
mod helpers;
mod jobs;
mod mfa;
mod middleware;
mod ops;
mod rooms;
mod shutdown;
mod ws;
