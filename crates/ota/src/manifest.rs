//! Firmware manifests: `{sha256, size, version, project, target, secure_version}` signed with
//! Ed25519 off the server (`unhidra firmware sign`), verified by the server at upload against
//! its trusted keys and by the device before it switches its boot partition.
//!
//! What is signed is the domain string `unhidra-firmware-manifest-v1\n` followed by the
//! manifest as compact JSON with its keys in the order above — the bytes
//! [`Manifest::signed_bytes`] gives, which a device can rebuild from the fields.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
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

impl Manifest {
    /// The bytes a signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_DOMAIN.to_vec();
        // A struct serialises its fields in declaration order, and these are strings and
        // numbers only: the text is the same on every machine.
        bytes.extend(serde_json::to_vec(self).unwrap_or_default());
        bytes
    }
}

/// A manifest with its signature, as `unhidra firmware sign` writes it next to the image.
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

/// Why a key or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The key file is not an Ed25519 key in PEM (PKCS#8 or SPKI).
    #[error("not an Ed25519 key in PEM: {0}")]
    BadKey(String),
    /// The manifest names a key that is not trusted.
    #[error("the manifest is signed by key {0}, which this server does not trust")]
    UnknownKey(String),
    /// The signature is not one of the key over the manifest.
    #[error("the signature does not match the manifest")]
    BadSignature,
}

impl SignatureError {
    /// The stable code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadKey(_) => "invalid_key",
            Self::UnknownKey(_) => "unknown_signing_key",
            Self::BadSignature => "bad_signature",
        }
    }
}

/// A public key's id: the first 16 hex digits of the SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new signing key from the operating system's generator.
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
    SigningKey::from_bytes(&seed)
}

/// A signing key as PKCS#8 PEM (what `openssl genpkey -algorithm ed25519` writes).
pub fn private_pem(key: &SigningKey) -> Result<String, SignatureError> {
    key.to_pkcs8_pem(Default::default())
        .map(|pem| pem.to_string())
        .map_err(|e| SignatureError::BadKey(e.to_string()))
}

/// A public key as SPKI PEM (what `openssl pkey -pubout` writes), for the server's trust list.
pub fn public_pem(key: &VerifyingKey) -> Result<String, SignatureError> {
    key.to_public_key_pem(Default::default())
        .map_err(|e| SignatureError::BadKey(e.to_string()))
}

/// A signing key from PKCS#8 PEM.
pub fn read_private_pem(pem: &str) -> Result<SigningKey, SignatureError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| SignatureError::BadKey(e.to_string()))
}

/// A public key from SPKI PEM.
pub fn read_public_pem(pem: &str) -> Result<VerifyingKey, SignatureError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| SignatureError::BadKey(e.to_string()))
}

/// Signs a manifest.
pub fn sign(manifest: Manifest, key: &SigningKey) -> SignedManifest {
    let signature = key.sign(&manifest.signed_bytes());
    SignedManifest {
        key_id: key_id(&key.verifying_key()),
        signature: STANDARD.encode(signature.to_bytes()),
        manifest,
    }
}

/// The public keys a server (or device) trusts; several, so that keys can be rotated.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<(String, VerifyingKey)>);

impl TrustedKeys {
    /// Trusts these keys.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self(keys.into_iter().map(|k| (key_id(&k), k)).collect())
    }

    /// Trusts the keys of PEM texts (each one or more `PUBLIC KEY` blocks).
    pub fn from_pem(text: &str) -> Result<Self, SignatureError> {
        let mut keys = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("-----BEGIN PUBLIC KEY-----") {
            let end_marker = "-----END PUBLIC KEY-----";
            let end = rest[start..]
                .find(end_marker)
                .ok_or_else(|| SignatureError::BadKey("a PEM block is not closed".into()))?
                + start
                + end_marker.len();
            keys.push(read_public_pem(&rest[start..end])?);
            rest = &rest[end..];
        }
        Ok(Self::new(keys))
    }

    /// The ids of the keys trusted.
    pub fn ids(&self) -> Vec<&str> {
        self.0.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The manifest, if a trusted key signed it.
    pub fn verify<'m>(&self, signed: &'m SignedManifest) -> Result<&'m Manifest, SignatureError> {
        let key = self
            .0
            .iter()
            .find(|(id, _)| *id == signed.key_id)
            .map(|(_, key)| key)
            .ok_or_else(|| SignatureError::UnknownKey(signed.key_id.clone()))?;
        let bytes: [u8; 64] = STANDARD
            .decode(&signed.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SignatureError::BadSignature)?;
        // Strict: no small-order keys, no malleable signatures.
        key.verify_strict(
            &signed.manifest.signed_bytes(),
            &Signature::from_bytes(&bytes),
        )
        .map_err(|_| SignatureError::BadSignature)?;
        Ok(&signed.manifest)
    }
}
