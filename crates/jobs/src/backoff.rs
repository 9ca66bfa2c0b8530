//! How long a failed job waits before its next attempt: exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter (the AWS architecture blog's "full jitter"): the wait
/// after attempt `n` is uniform in `[0, min(cap, base × 2^(n-1))]`, so that jobs failing together
/// against one dependency spread out instead of retrying in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first wait.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Default for Backoff {
    /// 1 s doubling up to an hour.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(3600),
        }
    }
}

impl Backoff {
    /// The ceiling of the wait after attempt `attempt` (1 for the first).
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let doublings = u32::try_from(attempt.max(1) - 1).unwrap_or(0).min(63);
        self.base
            .checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The wait after attempt `attempt`, drawn from `rng`.
    pub fn delay(&self, attempt: i32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let backoff = Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(60),
        };
        let ceilings: Vec<u64> = (1..=7).map(|n| backoff.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            backoff.ceiling(0),
            Duration::from_secs(2),
            "0 counts as the first"
        );
        assert_eq!(
            backoff.ceiling(i32::MAX),
            Duration::from_secs(60),
            "no overflow"
        );
    }

    #[test]
    fn waits_are_spread_over_the_whole_range() {
        let backoff = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(10),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let waits: Vec<Duration> = (0..2000).map(|_| backoff.delay(4, &mut rng)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(8)));
        let low = waits
            .iter()
            .filter(|w| **w < Duration::from_secs(2))
            .count();
        let high = waits
            .iter()
            .filter(|w| **w > Duration::from_secs(6))
            .count();
        // Uniform over [0, 8 s]: about a quarter in each of these ends.
        assert!((350..650).contains(&low), "{low} waits under 2 s");
        assert!((350..650).contains(&high), "{high} waits over 6 s");
    }
}
