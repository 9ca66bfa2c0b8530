//! The device protocol without I/O (in the manner of quinn-proto and rustls): a [`Session`]
//! that is fed events and asked what to do, the [`Storage`], [`Transport`] and [`Clock`]
//! traits a platform implements, and a [`Blocking`] driver over them.
//!
//! Nothing here knows a runtime, a socket or the system clock: time is `u64` milliseconds the
//! caller passes in, randomness (the reconnect jitter) an `RngCore` it hands over. Besides
//! `unhidra-protocol` it needs serde, `rand_core` and `thiserror` only, so the same code runs
//! in the simulator, in tests with a manual clock, and on an ESP32 behind a thin adapter.

mod backoff;
mod commands;
mod driver;
mod session;
mod storage;
mod wire;

pub use backoff::Backoff;
pub use commands::{Command, CommandReply, ConfigUpdate, Handlers};
pub use driver::{Blocking, Clock, Received, Transport};
pub use session::{
    Action, BatchLimits, BufferLimits, ConnectFailure, Hello, LinkState, RecordError, Session,
    SessionConfig, Stats, StopReason, Vitals,
};
pub use storage::{Loaded, MemoryStorage, Storage, batch_bytes};
pub use wire::{DecodeError, Encoding, Message, decode};
