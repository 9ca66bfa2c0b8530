//! Storage of firmware images' records: content-addressed by SHA-256, immutable but for their
//! retirement. The bytes are files (the OTA capability's firmware folder), not rows.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use unhidra_core::UserId;

use crate::StoreError;

/// A stored firmware image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareRecord {
    /// Its SHA-256, lower-case hex: its id.
    pub sha256: String,
    /// Its length in bytes.
    pub size: i64,
    /// `esp32` (facts read from the image) or `generic` (facts from the manifest).
    pub kind: String,
    /// Its project.
    pub project: String,
    /// The chip or board it is for.
    pub target: String,
    /// Its version.
    pub version: String,
    /// Its anti-rollback version.
    pub secure_version: i64,
    /// The ESP-IDF version it was built with (ESP32 images).
    pub idf_version: Option<String>,
    /// The SHA-256 of its ELF file (ESP32 images).
    pub elf_sha256: Option<String>,
    /// The signed manifest, JSON text, as uploaded.
    pub manifest: String,
    /// The id of the key that signed it.
    pub key_id: String,
    /// Who uploaded it.
    pub uploaded_by: Option<UserId>,
    /// When.
    pub uploaded_at: DateTime<Utc>,
    /// When it was retired (no new deployments).
    pub retired_at: Option<DateTime<Utc>>,
}

/// Firmware images' records.
#[async_trait]
pub trait FirmwareStore: Send + Sync {
    /// Stores a new image's record. The same SHA-256, or the same project, target and version
    /// as another image, is a `Conflict`.
    async fn create_firmware(&self, record: &FirmwareRecord) -> Result<(), StoreError>;

    /// One image by its SHA-256.
    async fn firmware(&self, sha256: &str) -> Result<FirmwareRecord, StoreError>;

    /// Images, newest first, of a project and target when given, at most `limit`.
    async fn list_firmware(
        &self,
        project: Option<&str>,
        target: Option<&str>,
        limit: u32,
    ) -> Result<Vec<FirmwareRecord>, StoreError>;

    /// Retires an image; false if it was retired already.
    async fn retire_firmware(&self, sha256: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
}
