//! Signed links: an HMAC-SHA256, under a key the server keeps, over a domain (what kind of link
//! it is), the fields it is for (a path, a device, a principal) and its expiry. Every node
//! checks one without a lookup, a signature is compared in constant time, and a link cannot be
//! stretched to other fields, another kind of link or a later time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a presented link is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Its signature is not this server's over these fields and this expiry.
    #[error("the link's signature does not match")]
    Invalid,
    /// It is genuine, and has expired.
    #[error("the link has expired")]
    Expired,
}

/// Signs and checks links under one key.
#[derive(Clone)]
pub struct LinkSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner").finish_non_exhaustive()
    }
}

impl LinkSigner {
    /// A signer with `key` (any length; the server's is 32 random bytes, hex).
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    fn mac(&self, domain: &str, fields: &[&str], expires: i64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        // Each part on its own line: fields never run into each other (none has a newline:
        // paths, ids and numbers).
        mac.update(domain.as_bytes());
        for field in fields {
            mac.update(b"\n");
            mac.update(field.as_bytes());
        }
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signature (base64url, no padding) of a link of `domain` for `fields`, valid until
    /// `expires` (Unix seconds).
    pub fn sign(&self, domain: &str, fields: &[&str], expires: i64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(domain, fields, expires).finalize().into_bytes())
    }

    /// Checks a presented signature: first that it is this server's over these fields and
    /// this expiry (in constant time), then that `now` (Unix seconds) is before the expiry.
    pub fn verify(
        &self,
        domain: &str,
        fields: &[&str],
        expires: i64,
        sig: &str,
        now: i64,
    ) -> Result<(), LinkError> {
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| LinkError::Invalid)?;
        self.mac(domain, fields, expires)
            .verify_slice(&sig)
            .map_err(|_| LinkError::Invalid)?;
        if expires <= now {
            return Err(LinkError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_covers_its_domain_fields_and_expiry() {
        let signer = LinkSigner::new(b"key".to_vec());
        let sig = signer.sign("d", &["a", "b"], 100);
        assert_eq!(signer.verify("d", &["a", "b"], 100, &sig, 99), Ok(()));
        assert_eq!(
            signer.verify("d", &["a", "b"], 100, &sig, 100),
            Err(LinkError::Expired)
        );
        for (domain, fields, expires) in [
            ("e", &["a", "b"][..], 100),
            ("d", &["a", "c"][..], 100),
            ("d", &["ab"][..], 100),
            ("d", &["a", "b"][..], 101),
        ] {
            assert_eq!(
                signer.verify(domain, fields, expires, &sig, 0),
                Err(LinkError::Invalid),
                "{domain} {fields:?} {expires}"
            );
        }
        assert_eq!(
            LinkSigner::new(b"other".to_vec()).verify("d", &["a", "b"], 100, &sig, 0),
            Err(LinkError::Invalid)
        );
        // An expired link with a wrong signature is invalid, not expired: nothing is told
        // about links the server did not make.
        assert_eq!(
            signer.verify("d", &["a", "b"], 1, "AAAA", 50),
            Err(LinkError::Invalid)
        );
        assert_eq!(
            signer.verify("d", &["a", "b"], 100, "not base64!", 0),
            Err(LinkError::Invalid)
        );
    }
}
