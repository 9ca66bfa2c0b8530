//! The device SDK's tests, one binary: the state machine on a manual clock (`machine`), the
//! buffer file (`file`), and the tokio adapter and simulator against an in-test WebSocket
//! server (`ws`), and the checks of a firmware offer and image (`ota`).
#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

mod common;
mod file;
mod machine;
mod ota;
mod ws;
