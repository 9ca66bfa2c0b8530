//! The device's side of a firmware update, without I/O: before a download the offer's
//! manifest is checked against the keys the firmware ships with, its target and its
//! anti-rollback version; during the download every chunk goes through [`ImageVerifier`]; and
//! only an image whose size and SHA-256 are the manifest's may be switched to.

use sha2::{Digest, Sha256};
use unhidra_protocol::firmware::{self, Manifest, ManifestError, SignedManifest};

/// Why an update was refused on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtaError {
    /// The manifest is not signed by a key this firmware trusts.
    #[error("{0}")]
    Manifest(ManifestError),
    /// The image is for another chip or board.
    #[error("the image is for {image}, this device is {device}")]
    WrongTarget {
        /// The manifest's.
        image: String,
        /// This device's.
        device: String,
    },
    /// The image is another product's.
    #[error("the image is of project {image}, this device runs {device}")]
    WrongProject {
        /// The manifest's.
        image: String,
        /// This device's.
        device: String,
    },
    /// Installing it would go below the device's anti-rollback version.
    #[error("secure version {image} is below this device's {device}")]
    Downgrade {
        /// The manifest's.
        image: u32,
        /// This device's (from its eFuses, on an ESP32).
        device: u32,
    },
    /// More bytes arrived than the manifest says.
    #[error("the image is longer than the manifest's {0} bytes")]
    TooLong(u64),
    /// The downloaded bytes are not the image the manifest describes.
    #[error("the image's size or SHA-256 is not the manifest's")]
    Mismatch,
}

/// What the device is, for the checks of an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceImage {
    /// The project its firmware is (`esp_app_desc_t.project_name`).
    pub project: String,
    /// Its chip or board (`esp32s3`, …).
    pub target: String,
    /// Its anti-rollback version.
    pub secure_version: u32,
}

/// Checks an offer's manifest, then the image as it downloads.
#[derive(Debug)]
pub struct ImageVerifier {
    manifest: Manifest,
    hasher: Sha256,
    received: u64,
}

impl ImageVerifier {
    /// Accepts an offer if a trusted key signed its manifest, for this device's project and
    /// target, at or above its secure version.
    pub fn new(
        signed: &SignedManifest,
        trusted: &[[u8; 32]],
        device: &DeviceImage,
    ) -> Result<Self, OtaError> {
        let manifest = firmware::verify(signed, trusted).map_err(OtaError::Manifest)?;
        if manifest.target != device.target {
            return Err(OtaError::WrongTarget {
                image: manifest.target.clone(),
                device: device.target.clone(),
            });
        }
        if manifest.project != device.project {
            return Err(OtaError::WrongProject {
                image: manifest.project.clone(),
                device: device.project.clone(),
            });
        }
        if manifest.secure_version < device.secure_version {
            return Err(OtaError::Downgrade {
                image: manifest.secure_version,
                device: device.secure_version,
            });
        }
        Ok(Self {
            manifest: manifest.clone(),
            hasher: Sha256::new(),
            received: 0,
        })
    }

    /// The manifest accepted.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes received so far: where a resumed download (`Range: bytes=N-`) starts.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Takes the next chunk of the image, in order.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), OtaError> {
        self.received += chunk.len() as u64;
        if self.received > self.manifest.size {
            return Err(OtaError::TooLong(self.manifest.size));
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Whether the image is whole and is the manifest's: only then may the device switch to
    /// it.
    pub fn finish(self) -> Result<Manifest, OtaError> {
        let digest: [u8; 32] = self.hasher.finalize().into();
        if self.manifest.matches(&digest, self.received) {
            Ok(self.manifest)
        } else {
            Err(OtaError::Mismatch)
        }
    }
}
