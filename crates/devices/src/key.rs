//! Device API keys: `unh_dk_` and 256 random bits, shown once and stored as a SHA-256 hash.
//! A key is found by its hash through the store's index: what timing could reveal is a few bits
//! of a hash of a 256-bit secret, which helps no one guess a key.

use unhidra_core::OpaqueToken;
use unhidra_protocol::device::DEVICE_KEY_PREFIX_TEXT;

/// How many characters of a key the listings show, prefix included.
const SHOWN: usize = 12;

/// A device key as the device holds it.
#[derive(Clone)]
pub struct DeviceKey(String);

impl DeviceKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(format!(
            "{DEVICE_KEY_PREFIX_TEXT}{}",
            OpaqueToken::generate().expose()
        ))
    }

    /// A key a device presented, if it looks like one (the prefix and 43 base64url
    /// characters): anything else is refused before the store is asked.
    pub fn from_client(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(DEVICE_KEY_PREFIX_TEXT)?;
        let shaped = rest.len() == 43
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        shaped.then(|| Self(text.to_owned()))
    }

    /// The key, to hand to its device once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What is stored: its SHA-256, hex.
    pub fn hash(&self) -> String {
        unhidra_core::secret::hash_hex(self.0.as_bytes())
    }

    /// The first characters, to tell keys apart in listings; no use to an attacker.
    pub fn shown(&self) -> String {
        self.0.chars().take(SHOWN).collect()
    }
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_random_and_hashed() {
        let a = DeviceKey::generate();
        let b = DeviceKey::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("unh_dk_"));
        assert_eq!(a.expose().len(), 7 + 43);
        let again = DeviceKey::from_client(a.expose()).expect("well formed");
        assert_eq!(again.hash(), a.hash());
        assert_ne!(again.hash(), b.hash());
        assert!(!format!("{a:?}").contains(a.expose()));
        assert_eq!(a.shown().len(), 12);
        for bad in ["", "unh_dk_", "unh_dk_short", "Bearer x", &a.expose()[1..]] {
            assert!(DeviceKey::from_client(bad).is_none(), "{bad}");
        }
        let spaced = format!("{} ", a.expose());
        assert!(DeviceKey::from_client(&spaced).is_none());
    }
}
