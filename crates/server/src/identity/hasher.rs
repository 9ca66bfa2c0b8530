//! Password hashing with Argon2id, off the async runtime and behind a bounded pool, so that a
//! flood of logins queues for hashing instead of starving every other request.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::Serialize;
use tokio::sync::Semaphore;

/// The Argon2id parameters new hashes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HashParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl HashParams {
    /// The parameters a config asks for.
    pub fn from_config(config: &unhidra_config::Config) -> Self {
        Self {
            memory_kib: config.argon2_memory_kib,
            iterations: config.argon2_iterations,
            parallelism: config.argon2_parallelism,
        }
    }

    fn argon2(self) -> Result<Argon2<'static>, argon2::Error> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// What checking a password found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The password matches.
    pub matches: bool,
    /// The stored hash uses other parameters or an older scheme: store a new hash.
    pub needs_rehash: bool,
}

/// Why hashing failed; only broken parameters or a stored hash that is not a hash.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The parameters or the stored hash are unusable.
    #[error("password hashing: {0}")]
    Argon(String),
    /// The pool's worker stopped.
    #[error("password hashing worker stopped")]
    Worker,
}

/// Hashes and verifies passwords on the blocking pool, at most `workers` at a time.
#[derive(Debug, Clone)]
pub struct Hasher {
    params: HashParams,
    permits: Arc<Semaphore>,
    /// A hash of a random password, verified when the user is unknown so that the answer takes
    /// as long as for a known user.
    dummy: Arc<str>,
}

impl Hasher {
    /// A hasher with `workers` concurrent hashes (0: one per CPU core).
    pub fn new(params: HashParams, workers: u32) -> Result<Self, HashError> {
        let workers = match workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => usize::try_from(n).unwrap_or(1),
        };
        let dummy = hash_now(params, &unhidra_core::OpaqueToken::generate().hash())?;
        Ok(Self {
            params,
            permits: Arc::new(Semaphore::new(workers)),
            dummy: dummy.into(),
        })
    }

    /// The parameters of new hashes.
    pub fn params(&self) -> HashParams {
        self.params
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        let params = self.params;
        let password = password.to_owned();
        self.run(move || hash_now(params, &password)).await
    }

    /// Checks `password` against `stored`; a `stored` of `None` checks against the dummy hash
    /// and never matches.
    pub async fn verify(
        &self,
        password: &str,
        stored: Option<&str>,
    ) -> Result<Verified, HashError> {
        let params = self.params;
        let password = password.to_owned();
        let (hash, real) = match stored {
            Some(h) => (h.to_owned(), true),
            None => (self.dummy.to_string(), false),
        };
        let verified = self
            .run(move || verify_now(params, &password, &hash))
            .await?;
        Ok(Verified {
            matches: verified.matches && real,
            ..verified
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HashError::Worker)?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| HashError::Worker)?
    }
}

fn hash_now(params: HashParams, password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    params
        .argon2()
        .map_err(|e| HashError::Argon(e.to_string()))?
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Argon(e.to_string()))
}

fn verify_now(params: HashParams, password: &str, stored: &str) -> Result<Verified, HashError> {
    if let Some(legacy) = LegacyHash::parse(stored) {
        let matches = legacy.verify(password);
        // A legacy hash that matches is always replaced by Argon2id.
        return Ok(Verified {
            matches,
            needs_rehash: matches,
        });
    }
    let parsed = PasswordHash::new(stored).map_err(|e| HashError::Argon(e.to_string()))?;
    let current = parsed.algorithm.as_str() == "argon2id"
        && Params::try_from(&parsed).is_ok_and(|p| {
            p.m_cost() == params.memory_kib
                && p.t_cost() == params.iterations
                && p.p_cost() == params.parallelism
        });
    // The stored hash's own parameters verify it; the new ones only decide on a rehash.
    let matches = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    Ok(Verified {
        matches,
        needs_rehash: matches && !current,
    })
}

/// SHA-256 hashes imported from older systems (`unhidra admin import-users`), kept only until
/// the user's next login replaces them with Argon2id:
/// `$sha256$<hex>` is SHA-256(password); `$sha256-prefix$<salt, base64>$<hex>` is
/// SHA-256(salt ‖ password); `$sha256-suffix$<salt, base64>$<hex>` is SHA-256(password ‖ salt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyHash {
    salt: Vec<u8>,
    salt_first: bool,
    digest: String,
}

impl LegacyHash {
    /// Reads a stored legacy hash; `None` for anything else.
    pub fn parse(stored: &str) -> Option<Self> {
        use base64::Engine;
        let mut parts = stored.strip_prefix('$')?.split('$');
        let scheme = parts.next()?;
        let (salt, salt_first) = match scheme {
            "sha256" => (Vec::new(), true),
            "sha256-prefix" | "sha256-suffix" => (
                base64::engine::general_purpose::STANDARD
                    .decode(parts.next()?)
                    .ok()?,
                scheme == "sha256-prefix",
            ),
            _ => return None,
        };
        let digest = parts.next()?.to_ascii_lowercase();
        let is_hex = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
        (is_hex && parts.next().is_none()).then_some(Self {
            salt,
            salt_first,
            digest,
        })
    }

    /// The stored form of an unsalted (empty `salt`) or salted SHA-256 digest.
    pub fn encode(digest_hex: &str, salt: &[u8], salt_first: bool) -> String {
        use base64::Engine;
        let digest = digest_hex.to_ascii_lowercase();
        if salt.is_empty() {
            return format!("$sha256${digest}");
        }
        let scheme = if salt_first {
            "sha256-prefix"
        } else {
            "sha256-suffix"
        };
        let salt = base64::engine::general_purpose::STANDARD.encode(salt);
        format!("${scheme}${salt}${digest}")
    }

    fn verify(&self, password: &str) -> bool {
        use subtle::ConstantTimeEq;
        let mut input = Vec::with_capacity(self.salt.len() + password.len());
        if self.salt_first {
            input.extend_from_slice(&self.salt);
            input.extend_from_slice(password.as_bytes());
        } else {
            input.extend_from_slice(password.as_bytes());
            input.extend_from_slice(&self.salt);
        }
        let computed = unhidra_core::secret::hash_hex(&input);
        computed.as_bytes().ct_eq(self.digest.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn legacy_sha256_hashes_verify_and_ask_for_an_upgrade() {
        let hasher = Hasher::new(CHEAP, 1).unwrap();
        let hex = |s: &str| unhidra_core::secret::hash_hex(s.as_bytes());
        let plain = LegacyHash::encode(&hex("old secret"), b"", true);
        let prefix = LegacyHash::encode(&hex("NaClold secret"), b"NaCl", true);
        let suffix = LegacyHash::encode(&hex("old secretNaCl"), b"NaCl", false);
        for stored in [&plain, &prefix, &suffix] {
            let ok = hasher.verify("old secret", Some(stored)).await.unwrap();
            assert_eq!(
                ok,
                Verified {
                    matches: true,
                    needs_rehash: true
                },
                "{stored}"
            );
            assert!(
                !hasher
                    .verify("old secreT", Some(stored))
                    .await
                    .unwrap()
                    .matches
            );
        }
        assert_eq!(LegacyHash::parse("$sha256$nothex"), None);
        assert_eq!(LegacyHash::parse("$md5$abc"), None);
    }

    const CHEAP: HashParams = HashParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[tokio::test]
    async fn hashes_verify_and_upgrade() {
        let hasher = Hasher::new(CHEAP, 2).unwrap();
        let hash = hasher.hash("correct horse").await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        let ok = hasher.verify("correct horse", Some(&hash)).await.unwrap();
        assert_eq!(
            ok,
            Verified {
                matches: true,
                needs_rehash: false
            }
        );
        let wrong = hasher.verify("Correct horse", Some(&hash)).await.unwrap();
        assert!(!wrong.matches, "no case folding");
        assert!(!hasher.verify("x", None).await.unwrap().matches);

        let stronger = Hasher::new(
            HashParams {
                memory_kib: 128,
                ..CHEAP
            },
            1,
        )
        .unwrap();
        let old = stronger.verify("correct horse", Some(&hash)).await.unwrap();
        assert_eq!(
            old,
            Verified {
                matches: true,
                needs_rehash: true
            }
        );
        // A wrong password never asks for a rehash.
        assert!(
            !stronger
                .verify("nope", Some(&hash))
                .await
                .unwrap()
                .needs_rehash
        );
    }

    #[tokio::test]
    async fn a_stored_value_that_is_not_a_hash_is_an_error() {
        let hasher = Hasher::new(CHEAP, 1).unwrap();
        assert!(hasher.verify("x", Some("plaintext")).await.is_err());
    }
}
