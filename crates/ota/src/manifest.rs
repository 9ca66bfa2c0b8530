//! Firmware manifests: `{sha256, size, version, project, target, secure_version}` signed with
//! Ed25519 off the server (`unhidra firmware sign`), verified by the server at upload against
//! its trusted keys and by the device before it switches its boot partition. The manifest and
//! its verification are the protocol crate's (`unhidra_protocol::firmware`), which devices
//! share; keys in PEM, their generation and signing are here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use unhidra_protocol::firmware::ManifestError;

pub use unhidra_protocol::firmware::{Manifest, SIGNING_DOMAIN, SignedManifest};

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
    unhidra_protocol::firmware::key_id(key.as_bytes())
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

/// The public keys a server trusts; several, so that keys can be rotated.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<[u8; 32]>);

impl TrustedKeys {
    /// Trusts these keys.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self(keys.into_iter().map(|k| k.to_bytes()).collect())
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
    pub fn ids(&self) -> Vec<String> {
        self.0
            .iter()
            .map(unhidra_protocol::firmware::key_id)
            .collect()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw keys, as a device ships them.
    pub fn raw(&self) -> &[[u8; 32]] {
        &self.0
    }

    /// The manifest, if a trusted key signed it.
    pub fn verify<'m>(&self, signed: &'m SignedManifest) -> Result<&'m Manifest, SignatureError> {
        unhidra_protocol::firmware::verify(signed, &self.0).map_err(|e| match e {
            ManifestError::UnknownKey(id) => SignatureError::UnknownKey(id),
            ManifestError::BadSignature => SignatureError::BadSignature,
        })
    }
}
