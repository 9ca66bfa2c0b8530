//! Firmware updates over the air. So far: an ESP32 app image is checked from its own bytes as
//! it streams in ([`image`]), every image goes with a manifest signed with Ed25519 off the
//! server ([`manifest`]), and [`firmware`] keeps the images an admin uploads, each checked and
//! compared with its manifest before it is stored; [`download`] serves them to devices, with
//! their key or a signed link. It knows no HTTP and no SQL.

pub mod deploy;
pub mod download;
pub mod firmware;
pub mod image;
pub mod manifest;
pub mod metrics;
pub mod window;

pub use deploy::{DeployError, DeploymentEvent, DeploymentView, Deployments, NewDeployment};
pub use download::{DownloadLink, PresentedLink, StoredImage};
pub use firmware::{Firmware, FirmwareConfig, FirmwareError, FirmwareView, Upload};
pub use image::{EspImage, ImageChecker, ImageError};
pub use manifest::{Manifest, SignatureError, SignedManifest, TrustedKeys};
pub use metrics::OtaMetrics;
