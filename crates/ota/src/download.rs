//! Downloads of stored images. A device fetches an image with its key, or with a short-lived
//! signed link (ESP-IDF's `esp_https_ota` cannot easily add a header): the link names the
//! image, the device and its expiry, and carries an HMAC-SHA256 of the three under a key the
//! server keeps in its store, so that every node checks a link without a lookup and a link
//! cannot be stretched to another image, another device or a later time.
//!
//! Images are immutable and named by their SHA-256, so what a download needs of the record
//! (the image exists, and its size) is cached once read.

use std::collections::HashMap;
use std::sync::Mutex;

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

/// The facts of images already read, by SHA-256.
#[derive(Debug, Default)]
pub(crate) struct ImageCache(Mutex<HashMap<String, (u64, String)>>);

impl ImageCache {
    fn get(&self, sha256: &str) -> Option<(u64, String)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sha256)
            .cloned()
    }

    fn put(&self, sha256: String, facts: (u64, String)) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(sha256, facts);
    }
}

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
        let (size, file_name) = match self.cache().get(&sha256) {
            Some(facts) => facts,
            None => {
                let record = self.record(&sha256).await?;
                let facts = (
                    u64::try_from(record.size).unwrap_or_default(),
                    download_name(&record.project, &record.version),
                );
                self.cache().put(sha256.clone(), facts.clone());
                facts
            }
        };
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
