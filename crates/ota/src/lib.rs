//! Firmware updates over the air. This first part knows images and their signatures: an ESP32
//! app image is checked from its own bytes as it streams in ([`image`]), and every image goes
//! with a manifest signed with Ed25519 off the server ([`manifest`]). It knows no HTTP and no
//! SQL.

pub mod image;
pub mod manifest;

pub use image::{EspImage, ImageChecker, ImageError};
pub use manifest::{Manifest, SignatureError, SignedManifest, TrustedKeys};
