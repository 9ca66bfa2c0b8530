//! Opaque secrets handed to clients (refresh tokens, reset and verification tokens): random,
//! shown once, and stored only as a hash.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Bytes of randomness in a token: 256 bits.
const TOKEN_BYTES: usize = 32;

/// A random token, as the client sees it once.
#[derive(Clone, PartialEq, Eq)]
pub struct OpaqueToken(String);

impl OpaqueToken {
    /// 256 random bits from the operating system's generator, base64url without padding.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// A token made of the given 256 bits, such as a keyed hash of another token.
    pub fn from_bytes(bytes: &[u8; TOKEN_BYTES]) -> Self {
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Wraps a token a client presented.
    pub fn from_client(text: &str) -> Self {
        Self(text.to_owned())
    }

    /// The token's text, to hand to the client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What is stored: the SHA-256 of the token, hex. A slow hash is not needed because the
    /// token carries 256 bits of entropy; a fast one lets the database look it up by index.
    pub fn hash(&self) -> String {
        hash_hex(self.0.as_bytes())
    }
}

impl std::fmt::Debug for OpaqueToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpaqueToken([redacted])")
    }
}

/// SHA-256 of `bytes`, as lower-case hex.
pub fn hash_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = OpaqueToken::generate();
        let b = OpaqueToken::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 43, "256 bits in base64url");
        assert_eq!(a.hash().len(), 64);
        assert_eq!(a.hash(), OpaqueToken::from_client(a.expose()).hash());
        assert!(!format!("{a:?}").contains(a.expose()));
    }
}
