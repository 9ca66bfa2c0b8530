//! The fleet's secrets: device API keys (`unh_dk_`) and provisioning tokens (`unh_pt_`), each
//! the prefix and 256 random bits, shown once and stored as a SHA-256 hash. A secret is found
//! by its hash through the store's index: what timing could reveal is a few bits of a hash of
//! a 256-bit secret, which helps no one guess one.

use unhidra_core::OpaqueToken;
use unhidra_protocol::device::{CLAIM_TOKEN_PREFIX_TEXT, DEVICE_KEY_PREFIX_TEXT};

/// How many characters of a secret the listings show, prefix included.
const SHOWN: usize = 12;

/// Defines a prefixed secret type.
macro_rules! prefixed_secret {
    ($(#[$doc:meta])* $name:ident, $prefix:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(String);

        impl $name {
            /// A new random one.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, OpaqueToken::generate().expose()))
            }

            /// One a client presented, if it looks like one (the prefix and 43 base64url
            /// characters): anything else is refused before the store is asked.
            pub fn from_client(text: &str) -> Option<Self> {
                let rest = text.strip_prefix($prefix)?;
                let shaped = rest.len() == 43
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                shaped.then(|| Self(text.to_owned()))
            }

            /// The secret, to hand out once.
            pub fn expose(&self) -> &str {
                &self.0
            }

            /// What is stored: its SHA-256, hex.
            pub fn hash(&self) -> String {
                unhidra_core::secret::hash_hex(self.0.as_bytes())
            }

            /// The first characters, to tell secrets apart in listings; no use to an attacker.
            pub fn shown(&self) -> String {
                self.0.chars().take(SHOWN).collect()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

prefixed_secret!(
    /// A device key as the device holds it.
    DeviceKey,
    DEVICE_KEY_PREFIX_TEXT
);

prefixed_secret!(
    /// A provisioning token, as its QR code carries it.
    ClaimToken,
    CLAIM_TOKEN_PREFIX_TEXT
);

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

    #[test]
    fn tokens_and_keys_are_not_each_other() {
        let token = ClaimToken::generate();
        assert!(token.expose().starts_with("unh_pt_"));
        assert!(ClaimToken::from_client(token.expose()).is_some());
        assert!(DeviceKey::from_client(token.expose()).is_none());
        assert!(ClaimToken::from_client(DeviceKey::generate().expose()).is_none());
        assert_eq!(format!("{token:?}"), "ClaimToken([redacted])");
    }
}
