//! The device SDK's tests, one binary: the state machine on a manual clock (`machine`), the
//! buffer file (`file`), and the tokio adapter and simulator against an in-test WebSocket
//! server (`ws`), the checks of a firmware offer and image (`ota`), and the A/B slots with
//! their rollback rules (`slots`).
#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

mod common;
mod file;
mod machine;
mod ota;
mod slots;
mod ws;
