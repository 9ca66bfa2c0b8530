//! The raw Argon2id rate of this machine: how many password checks per second the `argon2`
//! crate (the same one the server uses) manages in this process with one thread per CPU, the
//! ceiling for the server's logins per second.

use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::BoxError;

/// Argon2id parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

/// The production parameters (OWASP's minimum, the server's `prod` defaults).
pub const PROD: HashParams = HashParams {
    memory_kib: 19_456,
    iterations: 2,
    parallelism: 1,
};

/// What the measurement found.
#[derive(Debug, Clone, Copy)]
pub struct RawRate {
    /// Threads that hashed at once.
    pub threads: usize,
    /// Password checks completed while timed, over all threads.
    pub hashes: u64,
    /// The time each thread was given.
    pub budget: Duration,
    /// Checks per second: the sum of each thread's own rate.
    pub per_sec: f64,
    /// Minor page faults per check while timed, over all threads (`None` if `/proc` could not
    /// be read): near 0 when the allocator hands the same memory back hash after hash.
    pub faults_per_hash: Option<f64>,
}

impl RawRate {
    /// The time one check takes on one thread, in milliseconds.
    pub fn ms_per_hash(&self) -> f64 {
        if self.per_sec > 0.0 {
            self.threads as f64 / self.per_sec * 1000.0
        } else {
            f64::INFINITY
        }
    }
}

/// The password the benchmark uses everywhere; it passes the server's policy.
pub const PASSWORD: &str = "maple orbit candle frost 42";

/// The PHC string of [`PASSWORD`] hashed with Argon2id at `params` (a fixed salt: the
/// benchmark needs a hash, not a secret).
pub fn phc(params: HashParams) -> Result<String, BoxError> {
    let argon = Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| format!("argon2 parameters: {e}"))?,
    );
    let salt = SaltString::encode_b64(b"unhidra-bench-16").map_err(|e| format!("salt: {e}"))?;
    Ok(argon
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map_err(|e| format!("argon2: {e}"))?
        .to_string())
}

/// Verifies a password against its Argon2id hash with `params` on `threads` threads at once,
/// each for `budget` after one untimed check, the way the server checks a login
/// (`Argon2::default().verify_password` of a parsed PHC string). Blocks for about `budget`.
pub fn measure(params: HashParams, threads: usize, budget: Duration) -> Result<RawRate, BoxError> {
    let stored = phc(params)?;
    let threads = threads.max(1);
    let results: Vec<Result<Checked, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| check_until(&stored, budget)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("a hashing thread panicked".to_owned()))
            })
            .collect()
    });
    let mut hashes = 0;
    let mut per_sec = 0.0;
    let mut faults = Some(0);
    for result in results {
        let checked = result?;
        hashes += checked.count;
        per_sec += checked.count as f64 / checked.took.as_secs_f64().max(1e-9);
        faults = faults.zip(checked.faults).map(|(a, b)| a + b);
    }
    Ok(RawRate {
        threads,
        hashes,
        budget,
        per_sec,
        faults_per_hash: faults.map(|f| f as f64 / hashes.max(1) as f64),
    })
}

/// What one hashing thread did.
#[derive(Debug, Clone, Copy)]
struct Checked {
    count: u64,
    took: Duration,
    faults: Option<u64>,
}

/// Checks the password against `stored` in a loop until `budget` has passed (a hash that is
/// under way then finishes and counts). No sleeping: the loop itself is the work.
fn check_until(stored: &str, budget: Duration) -> Result<Checked, String> {
    let parsed = PasswordHash::new(stored).map_err(|e| format!("hash: {e}"))?;
    let check = || {
        Argon2::default()
            .verify_password(PASSWORD.as_bytes(), &parsed)
            .map_err(|e| format!("the password did not verify: {e}"))
    };
    // A warm-up check, not counted (first page faults of the allocator's arena).
    check()?;
    let faults_before = crate::server::thread_minor_faults();
    let started = Instant::now();
    let deadline = started + budget;
    let mut count = 0_u64;
    loop {
        check()?;
        count += 1;
        if Instant::now() >= deadline {
            let took = started.elapsed();
            let faults = faults_before
                .zip(crate::server::thread_minor_faults())
                .map(|(before, after)| after.saturating_sub(before));
            return Ok(Checked {
                count,
                took,
                faults,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheap_parameters_hash_and_count() {
        let cheap = HashParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        let rate = measure(cheap, 2, Duration::from_millis(50)).unwrap();
        assert_eq!(rate.threads, 2);
        assert!(rate.hashes >= 2, "{rate:?}");
        assert!(
            rate.per_sec > 0.0 && rate.ms_per_hash().is_finite(),
            "{rate:?}"
        );
    }

    #[test]
    fn broken_parameters_are_an_error() {
        let broken = HashParams {
            memory_kib: 1,
            iterations: 0,
            parallelism: 1,
        };
        assert!(measure(broken, 1, Duration::from_millis(1)).is_err());
    }
}
