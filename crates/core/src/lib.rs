//! Unhidra's domain: the types and rules of identity that every layer shares.
//!
//! This crate knows nothing of HTTP, SQL, JSON wire formats or the async runtime. Inputs are
//! parsed into types here once (`Email::parse`, `PasswordPolicy::check`), and the types carry
//! the proof from then on. Time comes in through [`Clock`] so that tests can move it.

pub mod clock;
pub mod email;
pub mod link;
pub mod password;
pub mod qr;
pub mod ratelimit;
pub mod secret;
pub mod text;
pub mod user;

pub use clock::{Clock, ManualClock, SystemClock};
pub use email::{Email, EmailError};
pub use link::{LinkError, LinkSigner};
pub use password::{PasswordPolicy, Violation};
pub use ratelimit::{Reservation, SlidingWindow};
pub use secret::OpaqueToken;
pub use text::{Controls, forbidden_control, hex};
pub use user::{Principal, Role, UserId};

/// The error and its sources, one after another, for a log line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}
