//! Unhidra's device SDK: the device protocol (`docs/protocol.md`, "Devices") as a state
//! machine without I/O ([`machine`]), an offline buffer in a crash-safe file ([`file`]), a
//! tokio WebSocket adapter that drives the machine over a real socket ([`ws`]) and a fleet
//! simulator built on it ([`simulate`]); [`ota`] checks firmware offers and images,
//! [`slots`] keeps ESP-IDF's A/B app slots with their rollback rules on a host, and
//! [`update`] takes a deployment's offer: download with resumption, verification, install.
//! `docs/device-sdk.md` explains how to use it and how to port it to firmware.

pub mod file;
pub mod machine;
pub mod ota;
#[cfg(feature = "tokio")]
pub mod simulate;
pub mod slots;
#[cfg(feature = "tokio")]
pub mod update;
#[cfg(feature = "tokio")]
pub mod ws;

pub use unhidra_protocol::device::{ArrayValue, CommandStatus, Dtype, Point, Value};
