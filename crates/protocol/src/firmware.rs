//! Firmware manifests as the server and devices exchange them: the facts of an image and an
//! Ed25519 signature over them. A device checks a manifest with [`verify`] against the public
//! keys it ships with before it downloads, and the image against the manifest
//! ([`Manifest::matches`]) before it switches its boot partition.
//!
//! What is signed is [`SIGNING_DOMAIN`] followed by the manifest as compact JSON with its keys
//! in declaration order ([`Manifest::signed_bytes`]).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What precedes the manifest's JSON in the signed bytes.
pub const SIGNING_DOMAIN: &[u8] = b"unhidra-firmware-manifest-v1\n";

/// The facts of an image that its signer vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The image's SHA-256, lower-case hex.
    pub sha256: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its version (`esp_app_desc_t.version` for ESP32 images).
    pub version: String,
    /// Its project (`esp_app_desc_t.project_name`).
    pub project: String,
    /// The chip or board it is for (`esp32s3`, …).
    pub target: String,
    /// Its anti-rollback version.
    pub secure_version: u32,
}

/// The longest version, project or target: `esp_app_desc_t` holds 31 characters of each.
pub const MAX_FACT: usize = 31;

/// Whether `text` is a firmware version a device can report in its `hello`: 1 to
/// [`MAX_FACT`] printable ASCII characters, no spaces (`2.1.0`, `1.2.0+build.7`,
/// `v5.3-14-g1a2b3c`).
pub fn is_version(text: &str) -> bool {
    (1..=MAX_FACT).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `text` is a project or target name: 1 to [`MAX_FACT`] ASCII letters, digits and
/// `._-`, starting with a letter or digit.
pub fn is_name(text: &str) -> bool {
    (1..=MAX_FACT).contains(&text.len())
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Manifest {
    /// The first fact that breaks its rule ([`is_version`], [`is_name`]), with the rule.
    pub fn invalid_fact(&self) -> Option<(&'static str, &'static str)> {
        if !is_version(&self.version) {
            return Some((
                "version",
                "1 to 31 printable ASCII characters without spaces",
            ));
        }
        for (field, value) in [("project", &self.project), ("target", &self.target)] {
            if !is_name(value) {
                return Some((
                    field,
                    "1 to 31 ASCII letters, digits and `._-`, starting with a letter or digit",
                ));
            }
        }
        None
    }

    /// The bytes a signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_DOMAIN.to_vec();
        // A struct serialises its fields in declaration order, and these are strings and
        // numbers only: the text is the same on every machine.
        bytes.extend(serde_json::to_vec(self).unwrap_or_default());
        bytes
    }

    /// Whether an image of `size` bytes with this SHA-256 is the one described.
    pub fn matches(&self, sha256: &[u8; 32], size: u64) -> bool {
        size == self.size && hex(sha256) == self.sha256
    }
}

/// A manifest with its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// The id of the key that signed it ([`key_id`]).
    pub key_id: String,
    /// The Ed25519 signature of [`Manifest::signed_bytes`], base64.
    pub signature: String,
}

/// The name of the command that offers a device an update.
pub const OFFER_COMMAND: &str = "ota.update";

/// The params of an [`OFFER_COMMAND`] (docs/protocol.md, "OTA updates"). A device ignores
/// fields it does not know, so that offers can grow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The deployment that offers it: what the device's `ota_status` frames name.
    pub deployment: String,
    /// The signed manifest, to check before the download.
    pub manifest: SignedManifest,
    /// The download link: a path on the server (resolved against the server's origin) or an
    /// absolute URL; it needs no header and answers `HEAD` and `Range`.
    pub url: String,
    /// The image's length in bytes (the manifest's).
    pub size: u64,
    /// When the device may install it, if the deployment has a maintenance window: download
    /// at once, install from `start` until `end`; a device ready only after `end` fails with
    /// `window_missed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_window: Option<InstallWindow>,
}

/// An opening of a maintenance window, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallWindow {
    /// When installing may begin.
    pub start: i64,
    /// When it must have begun.
    pub end: i64,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// It names a key that is not trusted.
    UnknownKey(String),
    /// The signature is not one of the key over the manifest.
    BadSignature,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownKey(id) => write!(f, "the manifest is signed by untrusted key {id}"),
            Self::BadSignature => f.write_str("the signature does not match the manifest"),
        }
    }
}

impl std::error::Error for ManifestError {}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A public key's id: the first 16 hex digits of the SHA-256 of its 32 bytes.
pub fn key_id(public_key: &[u8; 32]) -> String {
    hex(&Sha256::digest(public_key)[..8])
}

/// The manifest, if one of `trusted` (raw 32-byte Ed25519 public keys) signed it. Strict:
/// no malleable signatures, no small-order keys.
pub fn verify<'m>(
    signed: &'m SignedManifest,
    trusted: &[[u8; 32]],
) -> Result<&'m Manifest, ManifestError> {
    let key = trusted
        .iter()
        .find(|k| key_id(k) == signed.key_id)
        .and_then(|k| VerifyingKey::from_bytes(k).ok())
        .ok_or_else(|| ManifestError::UnknownKey(signed.key_id.clone()))?;
    let bytes: [u8; 64] = STANDARD
        .decode(&signed.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(ManifestError::BadSignature)?;
    key.verify_strict(
        &signed.manifest.signed_bytes(),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| ManifestError::BadSignature)?;
    Ok(&signed.manifest)
}
