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

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
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

/// The bytes a link's signature covers.
fn signed_text(sha256: &str, device: Uuid, expires: i64) -> String {
    format!("{LINK_DOMAIN}\n{sha256}\n{device}\n{expires}")
}

fn mac(key: &[u8], sha256: &str, device: Uuid, expires: i64) -> Hmac<Sha256> {
    // HMAC takes a key of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(signed_text(sha256, device, expires).as_bytes());
    mac
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
        let sig = mac(self.link_key(), sha256, device, expires)
            .finalize()
            .into_bytes();
        DownloadLink {
            url: format!(
                "/api/v1/firmware/{sha256}/image?device={device}&expires={expires}&sig={}",
                URL_SAFE_NO_PAD.encode(sig)
            ),
            expires_at,
        }
    }

    /// Checks a presented link to an image: its signature (in constant time), then its expiry.
    pub fn check_link(&self, sha256: &str, link: &PresentedLink<'_>) -> Result<(), FirmwareError> {
        let sha256 = crate::firmware::sha_of(sha256)?;
        let sig = URL_SAFE_NO_PAD
            .decode(link.sig)
            .map_err(|_| FirmwareError::LinkInvalid)?;
        mac(self.link_key(), &sha256, link.device, link.expires)
            .verify_slice(&sig)
            .map_err(|_| FirmwareError::LinkInvalid)?;
        if link.expires <= self.clock().now().timestamp() {
            return Err(FirmwareError::LinkExpired);
        }
        Ok(())
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
    fn a_link_covers_the_image_the_device_and_the_expiry() {
        let key = b"key";
        let sha = "a".repeat(64);
        let device = Uuid::new_v4();
        let sig = mac(key, &sha, device, 100).finalize().into_bytes();
        assert!(mac(key, &sha, device, 100).verify_slice(&sig).is_ok());
        assert!(
            mac(key, &"b".repeat(64), device, 100)
                .verify_slice(&sig)
                .is_err()
        );
        assert!(
            mac(key, &sha, Uuid::new_v4(), 100)
                .verify_slice(&sig)
                .is_err()
        );
        assert!(mac(key, &sha, device, 101).verify_slice(&sig).is_err());
        assert!(mac(b"other", &sha, device, 100).verify_slice(&sig).is_err());
    }

    #[test]
    fn download_names_are_plain() {
        assert_eq!(
            download_name("green house", "1.0/../x"),
            "green_house-1.0_.._x.bin"
        );
    }
}
