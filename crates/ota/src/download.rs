//! Downloads of stored images. A device fetches an image with its key, or with a short-lived
//! signed link (ESP-IDF's `esp_https_ota` cannot easily add a header): the link names the
//! image, the device and its expiry, and carries an HMAC-SHA256 of the three under a key the
//! server keeps in its store, so that every node checks a link without a lookup and a link
//! cannot be stretched to another image, another device or a later time.
//!
//! Images are immutable and named by their SHA-256, so what a download needs of the record
//! (the image exists, and its size) is cached once read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use unhidra_core::LinkError;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::firmware::{Firmware, FirmwareError};

/// The store's meta key under which the link key is kept (one for every node).
pub(crate) const LINK_KEY_META: &str = "ota_download_link_key";

/// Images whose facts are cached at most; past it the cache starts again.
const CACHE_ENTRIES: usize = 1024;

/// What the link's signature covers comes after this, so that a signature made for something
/// else under the same key never passes as a link.
const LINK_DOMAIN: &str = "unhidra-firmware-link-v1";

/// A signed download link.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DownloadLink {
    /// The path and query to fetch, relative to the server's address.
    pub url: String,
    /// Until when the link works.
    pub expires_at: DateTime<Utc>,
}

/// A link as presented: the query parameters of the download.
#[derive(Debug, Clone)]
pub struct PresentedLink<'a> {
    /// The device the link is for.
    pub device: Uuid,
    /// Its expiry, in Unix seconds.
    pub expires: i64,
    /// Its signature, base64url.
    pub sig: &'a str,
}

/// An image ready to be served: its facts and its open file.
#[derive(Debug)]
pub struct StoredImage {
    /// Its SHA-256, hex: its strong validator.
    pub sha256: String,
    /// Its length in bytes.
    pub size: u64,
    /// A name for the downloaded file.
    pub file_name: String,
    /// The file, at its start.
    pub file: tokio::fs::File,
}

/// What is kept of an image once read: its length, its download name, and its file, open (an
/// image never changes), once a range was read from it.
#[derive(Debug, Clone)]
struct Cached {
    size: u64,
    file_name: String,
    file: Option<Arc<std::fs::File>>,
}

/// The facts of images already read, by SHA-256.
#[derive(Debug, Default)]
pub(crate) struct ImageCache(Mutex<HashMap<String, Cached>>);

impl ImageCache {
    fn get(&self, sha256: &str) -> Option<Cached> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sha256)
            .cloned()
    }

    fn put(&self, sha256: String, cached: Cached) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(sha256, cached);
    }
}

/// The largest range read whole into memory and answered in one write (`Firmware::read_range`);
/// longer ones stream.
pub const WHOLE_RANGE_BYTES: u64 = 64 * 1024;

impl Firmware {
    /// A signed link to an image for a device, valid for `ota_link_ttl` from now. The caller
    /// has decided that the device may have the image.
    pub fn sign_link(&self, sha256: &str, device: Uuid) -> DownloadLink {
        self.sign_link_until(sha256, device, self.clock().now())
    }

    /// A signed link valid for `ota_link_ttl` from now, and at least until `until` (an offer's
    /// deadline: the link must work as long as the offer does).
    pub fn sign_link_until(
        &self,
        sha256: &str,
        device: Uuid,
        until: DateTime<Utc>,
    ) -> DownloadLink {
        let now = self.clock().now();
        let ttl = chrono::Duration::from_std(self.config().link_ttl)
            .unwrap_or_else(|_| chrono::Duration::hours(1));
        let end = (now + ttl).max(until);
        let expires_at = DateTime::from_timestamp(end.timestamp(), 0).unwrap_or(end);
        let expires = expires_at.timestamp();
        let device = device.to_string();
        let sig = self
            .link_signer()
            .sign(LINK_DOMAIN, &[sha256, &device], expires);
        DownloadLink {
            url: format!(
                "/api/v1/firmware/{sha256}/image?device={device}&expires={expires}&sig={sig}"
            ),
            expires_at,
        }
    }

    /// Checks a presented link to an image: its signature (in constant time), then its expiry.
    pub fn check_link(&self, sha256: &str, link: &PresentedLink<'_>) -> Result<(), FirmwareError> {
        let sha256 = crate::firmware::sha_of(sha256)?;
        let device = link.device.to_string();
        self.link_signer()
            .verify(
                LINK_DOMAIN,
                &[&sha256, &device],
                link.expires,
                link.sig,
                self.clock().now().timestamp(),
            )
            .map_err(|e| match e {
                LinkError::Invalid => FirmwareError::LinkInvalid,
                LinkError::Expired => FirmwareError::LinkExpired,
            })
    }

    /// An image to serve, by its SHA-256: its facts (cached once read) and its file opened.
    pub async fn open(&self, sha256: &str) -> Result<StoredImage, FirmwareError> {
        let sha256 = crate::firmware::sha_of(sha256)?;
        let Cached {
            size, file_name, ..
        } = self.facts(&sha256).await?;
        let file = tokio::fs::File::open(self.path_of(&sha256))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => FirmwareError::NotFound,
                _ => FirmwareError::Io(e),
            })?;
        Ok(StoredImage {
            sha256,
            size,
            file_name,
            file,
        })
    }
}

impl Firmware {
    /// An image's cached facts, read from its record the first time.
    async fn facts(&self, sha256: &str) -> Result<Cached, FirmwareError> {
        if let Some(cached) = self.cache().get(sha256) {
            return Ok(cached);
        }
        let record = self.record(sha256).await?;
        let cached = Cached {
            size: u64::try_from(record.size).unwrap_or_default(),
            file_name: download_name(&record.project, &record.version),
            file: None,
        };
        self.cache().put(sha256.to_owned(), cached.clone());
        Ok(cached)
    }

    /// Its length and download name, for an answer to start with.
    pub async fn describe(&self, sha256: &str) -> Result<(String, u64, String), FirmwareError> {
        let sha256 = crate::firmware::sha_of(sha256)?;
        let cached = self.facts(&sha256).await?;
        Ok((sha256, cached.size, cached.file_name))
    }

    /// `len` bytes of an image from `start` (at most [`WHOLE_RANGE_BYTES`]), with one
    /// positioned read in one trip to the blocking pool: the file stays open in the cache, so
    /// that a device fetching 4 KiB ranges costs no open, no seek and no streamed body.
    pub async fn read_range(
        &self,
        sha256: &str,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, FirmwareError> {
        use std::os::unix::fs::FileExt as _;
        let mut cached = self.facts(sha256).await?;
        let len = usize::try_from(len.min(WHOLE_RANGE_BYTES)).unwrap_or_default();
        let open = cached.file.clone();
        let path = self.path_of(sha256);
        let (file, bytes) = tokio::task::spawn_blocking(move || {
            let file = match open {
                Some(file) => file,
                None => Arc::new(std::fs::File::open(&path)?),
            };
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, start)?;
            Ok::<_, std::io::Error>((file, buf))
        })
        .await
        .map_err(|e| FirmwareError::Io(std::io::Error::other(e)))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FirmwareError::NotFound,
            _ => FirmwareError::Io(e),
        })?;
        if cached.file.is_none() {
            cached.file = Some(file);
            self.cache().put(sha256.to_owned(), cached);
        }
        Ok(bytes)
    }
}

/// `project-version.bin`, with anything but letters, digits, `.`, `-` and `_` made `_`.
fn download_name(project: &str, version: &str) -> String {
    format!("{project}-{version}.bin")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_are_plain() {
        assert_eq!(
            download_name("green house", "1.0/../x"),
            "green_house-1.0_.._x.bin"
        );
    }
}
