//! Password hashing with Argon2id on dedicated threads, off the async runtime, so that a flood
//! of logins queues for hashing instead of starving every other request.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::Serialize;

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

    /// The most a stored or imported hash may cost, from the config's `argon2_max_*`.
    pub fn ceiling_from_config(config: &unhidra_config::Config) -> Self {
        Self {
            memory_kib: config.argon2_max_memory_kib,
            iterations: config.argon2_max_iterations,
            parallelism: config.argon2_max_parallelism,
        }
    }

    /// The cost a PHC string asks for.
    pub fn of_hash(hash: &PasswordHash<'_>) -> Result<Self, HashError> {
        let params = Params::try_from(hash).map_err(|e| HashError::Argon(e.to_string()))?;
        Ok(Self {
            memory_kib: params.m_cost(),
            iterations: params.t_cost(),
            parallelism: params.p_cost(),
        })
    }

    /// Says which cost is above `ceiling`, if any.
    pub fn exceeds(self, ceiling: Self) -> Option<String> {
        let over = |what: &str, value: u32, max: u32, key: &str| {
            (value > max).then(|| format!("{what} {value} is above {key} = {max}"))
        };
        over(
            "memory (KiB)",
            self.memory_kib,
            ceiling.memory_kib,
            "argon2_max_memory_kib",
        )
        .or_else(|| {
            over(
                "iterations",
                self.iterations,
                ceiling.iterations,
                "argon2_max_iterations",
            )
        })
        .or_else(|| {
            over(
                "parallelism",
                self.parallelism,
                ceiling.parallelism,
                "argon2_max_parallelism",
            )
        })
    }

    /// Whether a check at these parameters takes more Argon2 work, or more memory, than one at
    /// `other`: such a check cannot be padded to look like one at `other` (more memory than a
    /// hashing thread holds is allocated and zeroed afresh for each check).
    pub fn costs_more_than(self, other: Self) -> bool {
        match (self.argon2(), other.argon2()) {
            (Ok(this), Ok(that)) => {
                work_of(this.params()) > work_of(that.params())
                    || this.params().block_count() > that.params().block_count()
            }
            _ => false,
        }
    }

    /// Each cost the larger of the two.
    fn max(self, other: Self) -> Self {
        Self {
            memory_kib: self.memory_kib.max(other.memory_kib),
            iterations: self.iterations.max(other.iterations),
            parallelism: self.parallelism.max(other.parallelism),
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
    /// Too many hashes are waiting.
    #[error("too many password checks are waiting")]
    Busy,
    /// The stored hash asks for more work than the ceiling allows; it was not verified.
    #[error("the stored hash is not verified: its {0}")]
    OverCeiling(String),
}

/// The ceiling of a hasher built without one: the config's defaults.
pub const DEFAULT_CEILING: HashParams = HashParams {
    memory_kib: 262_144,
    iterations: 10,
    parallelism: 8,
};

/// Hashes that may wait per hashing thread.
const QUEUE_PER_WORKER: usize = 256;

/// A job for a hashing thread: it gets the thread's own Argon2 memory.
type Job = Box<dyn FnOnce(&mut [Block]) + Send>;

/// Hashes and verifies passwords on `workers` dedicated threads. Each thread keeps its Argon2
/// memory (19 MiB at the production cost) for its whole life, so a login allocates and zeroes
/// nothing; jobs wait in a queue, so a flood of logins never takes the async runtime's threads.
#[derive(Debug, Clone)]
pub struct Hasher {
    params: HashParams,
    /// Stored hashes costing more than this are refused unverified: a hash imported with
    /// `m=4194304` must not make each login allocate 4 GiB.
    ceiling: HashParams,
    jobs: std::sync::mpsc::SyncSender<Job>,
    /// A hash of a random password, verified when the user is unknown so that the answer takes
    /// as long as for a known user.
    dummy: Arc<str>,
}

impl Hasher {
    /// A hasher with `workers` threads (0: one per CPU core).
    pub fn new(params: HashParams, workers: u32) -> Result<Self, HashError> {
        let workers = match workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => usize::try_from(n).unwrap_or(1),
        };
        let argon = params
            .argon2()
            .map_err(|e| HashError::Argon(e.to_string()))?;
        let blocks = argon.params().block_count();
        // Bounded: past this many waiting hashes, logins are refused (503) rather than queued
        // until long after their requests timed out.
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(workers * QUEUE_PER_WORKER);
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for index in 0..workers {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("argon2-{index}"))
                .spawn(move || {
                    // Allocated at the first job, so an idle server does not hold it.
                    let mut memory: Vec<Block> = Vec::new();
                    loop {
                        let job = {
                            let receiver = queue
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            receiver.recv()
                        };
                        match job {
                            Ok(job) => {
                                if memory.is_empty() {
                                    memory = vec![Block::default(); blocks];
                                }
                                job(&mut memory);
                            }
                            // Every sender is gone: the server is shutting down.
                            Err(_) => break,
                        }
                    }
                })
                .map_err(|e| HashError::Argon(format!("hashing thread: {e}")))?;
        }
        let mut memory = vec![Block::default(); blocks];
        let dummy = hash_now(
            params,
            &unhidra_core::OpaqueToken::generate().hash(),
            &mut memory,
        )?;
        Ok(Self {
            params,
            ceiling: DEFAULT_CEILING.max(params),
            jobs,
            dummy: dummy.into(),
        })
    }

    /// The same hasher refusing stored hashes that cost more than `ceiling` (never less than
    /// its own hashes cost).
    #[must_use]
    pub fn with_ceiling(mut self, ceiling: HashParams) -> Self {
        self.ceiling = ceiling.max(self.params);
        self
    }

    /// The parameters of new hashes.
    pub fn params(&self) -> HashParams {
        self.params
    }

    /// The most a stored hash may cost.
    pub fn ceiling(&self) -> HashParams {
        self.ceiling
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        let params = self.params;
        let password = password.to_owned();
        self.run(move |memory| hash_now(params, &password, memory))
            .await
    }

    /// Checks `password` against `stored`; a `stored` of `None` checks against the dummy hash
    /// and never matches. A stored hash that costs less than a new one (legacy SHA-256, another
    /// scheme, cheaper Argon2) is followed by padding work on the same thread, so that no check
    /// answers sooner than the dummy's. A stored hash above the ceiling is refused with
    /// [`HashError::OverCeiling`] before any work.
    pub async fn verify(
        &self,
        password: &str,
        stored: Option<&str>,
    ) -> Result<Verified, HashError> {
        let params = self.params;
        let ceiling = self.ceiling;
        let password = password.to_owned();
        let (hash, real) = match stored {
            Some(h) => (h.to_owned(), true),
            None => (self.dummy.to_string(), false),
        };
        let verified = self
            .run(move |memory| verify_now(params, ceiling, &password, &hash, memory))
            .await?;
        Ok(Verified {
            matches: verified.matches && real,
            ..verified
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut [Block]) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move |memory| {
                // The request gave up (timed out or disconnected): skip the work.
                if !reply.is_closed() {
                    let _ = reply.send(work(memory));
                }
            }))
            .map_err(|e| match e {
                std::sync::mpsc::TrySendError::Full(_) => HashError::Busy,
                std::sync::mpsc::TrySendError::Disconnected(_) => HashError::Worker,
            })?;
        answer.await.map_err(|_| HashError::Worker)?
    }
}

/// PHC strings use base64 without padding.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn hash_now(params: HashParams, password: &str, memory: &mut [Block]) -> Result<String, HashError> {
    let argon = |e: argon2::Error| HashError::Argon(e.to_string());
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt
        .decode_b64(&mut salt_buf)
        .map_err(|e| HashError::Argon(e.to_string()))?;
    let mut out = [0u8; 32];
    params
        .argon2()
        .map_err(argon)?
        .hash_password_into_with_memory(password.as_bytes(), salt_bytes, &mut out, memory)
        .map_err(argon)?;
    Ok(format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.memory_kib,
        params.iterations,
        params.parallelism,
        salt.as_str(),
        b64(&out)
    ))
}

/// Checks `password` against `stored`, then pads the work up to one verification at `params`
/// (see [`pad_to`]): a cheaper stored hash (a legacy SHA-256 digest, Argon2 with lower costs,
/// another scheme's string) must not answer sooner than the dummy hash of an unknown email.
fn verify_now(
    params: HashParams,
    ceiling: HashParams,
    password: &str,
    stored: &str,
    memory: &mut [Block],
) -> Result<Verified, HashError> {
    let (verified, spent) = verify_stored(params, ceiling, password, stored, memory)?;
    pad_to(params, spent, password, memory)?;
    Ok(verified)
}

/// The work of an Argon2 run, in block operations: every pass fills every block once (lanes
/// are filled one after another, so parallelism does not change it).
fn work_of(params: &Params) -> u64 {
    let blocks = u64::try_from(params.block_count()).unwrap_or(u64::MAX);
    blocks.saturating_mul(u64::from(params.t_cost()))
}

/// Checks `password` against `stored`; also says how much Argon2 work that took.
fn verify_stored(
    params: HashParams,
    ceiling: HashParams,
    password: &str,
    stored: &str,
    memory: &mut [Block],
) -> Result<(Verified, u64), HashError> {
    let argon = |e: argon2::Error| HashError::Argon(e.to_string());
    if let Some(legacy) = LegacyHash::parse(stored) {
        let matches = legacy.verify(password);
        // A legacy hash that matches is always replaced by Argon2id.
        let verified = Verified {
            matches,
            needs_rehash: matches,
        };
        return Ok((verified, 0));
    }
    let parsed = PasswordHash::new(stored).map_err(|e| HashError::Argon(e.to_string()))?;
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        // Another scheme's PHC string: no password matches it.
        let verified = Verified {
            matches: false,
            needs_rehash: false,
        };
        return Ok((verified, 0));
    };
    let cost = HashParams::of_hash(&parsed)?;
    if let Some(why) = cost.exceeds(ceiling) {
        return Err(HashError::OverCeiling(why));
    }
    let version = match parsed.version {
        None => Version::V0x13,
        Some(v) => Version::try_from(v).map_err(argon)?,
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(HashError::Argon(
            "the stored hash has no salt or no output".into(),
        ));
    };
    let stored_params = Params::try_from(&parsed).map_err(|e| HashError::Argon(e.to_string()))?;
    let mut salt_buf = [0u8; 64];
    let salt = salt
        .decode_b64(&mut salt_buf)
        .map_err(|e| HashError::Argon(e.to_string()))?;
    let mut out = vec![0u8; expected.len()];
    let work = work_of(&stored_params);
    let hasher = Argon2::new(algorithm, version, stored_params);
    if hasher.params().block_count() <= memory.len() {
        // The usual case: the thread's own memory, nothing allocated.
        hasher
            .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut *memory)
            .map_err(argon)?;
    } else {
        // Costlier than new hashes, at most the ceiling: it allocates up to
        // `argon2_max_memory_kib`, once, until the next login upgrades it.
        let mut more = vec![Block::default(); hasher.params().block_count()];
        hasher
            .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut more)
            .map_err(argon)?;
    }
    use subtle::ConstantTimeEq;
    let matches = bool::from(out.as_slice().ct_eq(expected.as_bytes()));
    let current = algorithm == Algorithm::Argon2id && version == Version::V0x13 && cost == params;
    let verified = Verified {
        matches,
        needs_rehash: matches && !current,
    };
    Ok((verified, work))
}

/// Runs Argon2id over the thread's memory until `spent` block operations reach those of one
/// verification at `params`, so that every check costs at least that much.
fn pad_to(
    params: HashParams,
    spent: u64,
    password: &str,
    memory: &mut [Block],
) -> Result<(), HashError> {
    let argon = |e: argon2::Error| HashError::Argon(e.to_string());
    let Some(padding) = padding(params, spent)? else {
        return Ok(());
    };
    let padding = padding.argon2().map_err(argon)?;
    let memory = memory
        .get_mut(..padding.params().block_count())
        .ok_or_else(|| HashError::Argon("padding needs more memory than a hash".into()))?;
    let mut out = [0u8; 32];
    padding
        .hash_password_into_with_memory(password.as_bytes(), &[0u8; 16], &mut out, memory)
        .map_err(argon)?;
    std::hint::black_box(out);
    Ok(())
}

/// The Argon2id run that brings `spent` block operations up to one verification at `params`:
/// one lane, the same passes, as many blocks as the missing work needs (rounded up to what
/// Argon2 uses: four per lane segment, at least eight); `None` when nothing is missing. A hash
/// costing more than `params` is not padded and stays measurably slower until its next login
/// upgrades it.
fn padding(params: HashParams, spent: u64) -> Result<Option<HashParams>, HashError> {
    let current = params
        .argon2()
        .map_err(|e| HashError::Argon(e.to_string()))?;
    let target = work_of(current.params());
    if spent >= target {
        return Ok(None);
    }
    let passes = current.params().t_cost();
    let blocks = (target - spent)
        .div_ceil(u64::from(passes))
        .next_multiple_of(4);
    Ok(Some(HashParams {
        memory_kib: u32::try_from(blocks)
            .unwrap_or(u32::MAX)
            .max(Params::MIN_M_COST),
        iterations: passes,
        parallelism: 1,
    }))
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
    async fn a_stored_hash_above_the_ceiling_is_refused_unverified() {
        let hasher = Hasher::new(CHEAP, 1).unwrap().with_ceiling(HashParams {
            memory_kib: 96,
            iterations: 2,
            parallelism: 2,
        });
        for params in [
            HashParams {
                memory_kib: 128,
                ..CHEAP
            },
            HashParams {
                iterations: 3,
                ..CHEAP
            },
            HashParams {
                memory_kib: 64 * 3,
                parallelism: 3,
                ..CHEAP
            },
        ] {
            let costly = Hasher::new(params, 1).unwrap();
            let hash = costly.hash("correct horse").await.unwrap();
            let refused = hasher.verify("correct horse", Some(&hash)).await;
            assert!(
                matches!(refused, Err(HashError::OverCeiling(_))),
                "{hash}: {refused:?}"
            );
        }
        // At the ceiling is fine, and is upgraded to the current parameters.
        let at = Hasher::new(
            HashParams {
                memory_kib: 96,
                iterations: 2,
                parallelism: 1,
            },
            1,
        )
        .unwrap();
        let hash = at.hash("correct horse").await.unwrap();
        let verified = hasher.verify("correct horse", Some(&hash)).await.unwrap();
        assert!(verified.matches && verified.needs_rehash);
        // The message names the setting, never the hash.
        let why = HashParams {
            memory_kib: 4_194_304,
            ..CHEAP
        }
        .exceeds(DEFAULT_CEILING)
        .unwrap();
        assert_eq!(
            why,
            "memory (KiB) 4194304 is above argon2_max_memory_kib = 262144"
        );
    }

    /// The work of a check at `params`, in block operations.
    fn work(params: HashParams) -> u64 {
        work_of(params.argon2().unwrap().params())
    }

    #[test]
    fn cheaper_checks_are_padded_to_one_check_at_the_current_cost() {
        let current = HashParams {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        };
        let target = work(current);
        let cheaper = [
            // A legacy SHA-256 digest, or another scheme's string: no Argon2 work at all.
            0,
            // OWASP's lighter Argon2id choices, and the crate's old default.
            work(HashParams {
                memory_kib: 7_168,
                iterations: 5,
                parallelism: 1,
            }),
            work(HashParams {
                memory_kib: 4_096,
                iterations: 3,
                parallelism: 1,
            }),
            work(HashParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 4,
            }),
        ];
        for spent in cheaper {
            let pad = padding(current, spent).unwrap().expect("padded");
            assert!(
                pad.memory_kib <= current.memory_kib,
                "{pad:?} fits the memory"
            );
            let total = spent + work(pad);
            assert!(total >= target, "{spent}: {total} < {target}");
            // Over by at most one rounding step of four blocks per pass.
            assert!(total - target < 4 * 2 + 8, "{spent}: {total} vs {target}");
        }
        // The same cost, or a costlier one, is not padded.
        assert_eq!(padding(current, target).unwrap(), None);
        let costlier = HashParams {
            memory_kib: 65_536,
            ..current
        };
        assert_eq!(padding(current, work(costlier)).unwrap(), None);
    }

    #[test]
    fn a_check_reports_the_argon2_work_of_the_stored_hash() {
        let current = HashParams {
            memory_kib: 256,
            iterations: 2,
            parallelism: 1,
        };
        let mut memory = vec![Block::default(); 256];
        let check = |stored: &str, memory: &mut [Block]| {
            verify_stored(current, DEFAULT_CEILING, "pw", stored, memory)
                .unwrap()
                .1
        };
        let legacy = LegacyHash::encode(&unhidra_core::secret::hash_hex(b"pw"), b"", true);
        assert_eq!(check(&legacy, &mut memory), 0);
        let scrypt = "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E";
        assert_eq!(check(scrypt, &mut memory), 0);
        for params in [CHEAP, current] {
            let stored = hash_now(params, "pw", &mut memory).unwrap();
            assert_eq!(check(&stored, &mut memory), work(params), "{stored}");
        }
        // Costlier than the thread's memory: allocated for this check, still verified.
        let costlier = HashParams {
            memory_kib: 1024,
            ..current
        };
        let mut more = vec![Block::default(); 1024];
        let stored = hash_now(costlier, "pw", &mut more).unwrap();
        let (verified, spent) =
            verify_stored(current, DEFAULT_CEILING, "pw", &stored, &mut memory).unwrap();
        assert!(verified.matches && verified.needs_rehash);
        assert_eq!(spent, work(costlier));
    }

    #[tokio::test]
    async fn a_stored_value_that_is_not_a_hash_is_an_error() {
        let hasher = Hasher::new(CHEAP, 1).unwrap();
        assert!(hasher.verify("x", Some("plaintext")).await.is_err());
    }
}
