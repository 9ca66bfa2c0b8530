//! How long a device waits before it connects again: exponential backoff with full jitter.

use rand_core::RngCore;

/// Exponential backoff with full jitter: after the `n`th failure in a row (0 for the first)
/// the wait is uniform in `[0, min(cap, base × 2^n)]`, so that a fleet that lost the server
/// together comes back spread out rather than in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first wait, ms.
    pub base_ms: u64,
    /// The longest wait, ms.
    pub cap_ms: u64,
}

impl Default for Backoff {
    /// 500 ms doubling up to 60 s.
    fn default() -> Self {
        Self {
            base_ms: 500,
            cap_ms: 60_000,
        }
    }
}

impl Backoff {
    /// The ceiling of the wait after `failures` failures in a row before this one.
    pub fn ceiling_ms(&self, failures: u32) -> u64 {
        let factor = 1u64.checked_shl(failures.min(63)).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.cap_ms)
    }

    /// The wait after `failures` failures in a row before this one, drawn from `rng`.
    pub fn delay_ms(&self, failures: u32, rng: &mut impl RngCore) -> u64 {
        uniform(rng, self.ceiling_ms(failures))
    }
}

/// A uniform draw from `[0, max]`, by multiplying rather than `%`, so without modulo bias
/// worth the name and without a loop.
pub(crate) fn uniform(rng: &mut impl RngCore, max: u64) -> u64 {
    let span = u128::from(max) + 1;
    ((u128::from(rng.next_u64()) * span) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator for the bounds (splitmix64).
    struct Split(u64);

    impl RngCore for Split {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            for chunk in dst.chunks_mut(8) {
                let bytes = self.next_u64().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let backoff = Backoff::default();
        let ceilings: Vec<u64> = (0..9).map(|n| backoff.ceiling_ms(n)).collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(backoff.ceiling_ms(u32::MAX), 60_000, "no overflow");
    }

    #[test]
    fn uniform_stays_in_range_and_reaches_both_ends() {
        let mut rng = Split(1);
        let draws: Vec<u64> = (0..10_000).map(|_| uniform(&mut rng, 9)).collect();
        assert!(draws.iter().all(|&d| d <= 9));
        for v in 0..=9 {
            assert!(draws.contains(&v), "{v} never drawn");
        }
        assert_eq!(uniform(&mut rng, 0), 0);
        // The widest range does not overflow.
        let _ = uniform(&mut rng, u64::MAX);
    }
}
