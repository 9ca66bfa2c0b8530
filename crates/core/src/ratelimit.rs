//! Sliding-window limits: at most `limit` attempts per key within `window`, in bounded memory.
//!
//! An attempt reserves its slot *before* the work it guards (a password check), so that twenty
//! attempts sent at once are judged exactly like twenty in a row: the first `limit` proceed and
//! the rest are refused. A caller may release a reservation afterwards — a successful login
//! does not count as a failed one.
//!
//! Keys are chosen by clients (addresses, emails), so the map never holds them as given: each
//! key is kept as a 64-bit keyed hash (SipHash with a random key per limit, so collisions cannot
//! be aimed at; a collision would only make two keys share one bucket, which is stricter, never
//! looser). At most `max_keys` keys are tracked. Expiry is incremental: keys live in two
//! generations, and once per window the older generation, whose every attempt has left the
//! window, is dropped whole; a key looked up again moves to the newer one. So every lookup is
//! O(1) amortised, and no lookup scans the map.
//!
//! **When the map is full**, a key that is not tracked yet shares one *overflow* bucket, with
//! the same limit, with every other such key until the next generation frees room. This is the
//! fail-safe choice: a flood of new keys makes limits stricter for newcomers (who may be refused
//! while it lasts), never looser for anyone, and a key already under attack keeps its own count.
//! Evicting the oldest key instead would let a flood reset the count of the key under attack.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// Keys a limit tracks at once unless told otherwise (see [`SlidingWindow::with_max_keys`]).
pub const DEFAULT_MAX_KEYS: usize = 50_000;

/// Attempt times preallocated per key; a larger limit grows the buffer as attempts come.
const PREALLOCATED: usize = 64;

/// Where an attempt was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The key's own bucket, by its hash.
    Key(u64),
    /// The bucket shared by keys that found the map full.
    Overflow,
    /// Nothing was counted (a limit of 0).
    Unlimited,
}

/// A reserved attempt, to release if it turns out not to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    slot: Slot,
    /// Unix microseconds.
    at: i64,
}

/// The attempt times (Unix microseconds, oldest first) of each tracked key hash.
type Generation = HashMap<u64, VecDeque<i64>>;

#[derive(Debug, Default)]
struct Buckets {
    /// Keys looked up since `rotated_at`.
    current: Generation,
    /// Keys last looked up in the generation before; all their attempts are older than
    /// `rotated_at`.
    previous: Generation,
    overflow: VecDeque<i64>,
    /// When `current` began, Unix microseconds.
    rotated_at: i64,
}

impl Buckets {
    /// Starts a new generation if the current one is a window old, and hands back what is
    /// dropped, so that the caller frees it after unlocking.
    fn rotate(&mut self, now: i64, window: i64) -> Vec<Generation> {
        let age = now.saturating_sub(self.rotated_at);
        // A clock that went back leaves the generations as they are.
        if age < window {
            return Vec::new();
        }
        self.rotated_at = now;
        if age >= window.saturating_mul(2) {
            // Even the current generation's attempts have all left the window.
            return vec![
                std::mem::take(&mut self.current),
                std::mem::take(&mut self.previous),
            ];
        }
        let current = std::mem::take(&mut self.current);
        vec![std::mem::replace(&mut self.previous, current)]
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// The bucket of `hash`, moved into the current generation; the overflow bucket when the
    /// key is new and `max_keys` are tracked already.
    fn bucket(&mut self, hash: u64, max_keys: usize, limit: u32) -> (Slot, &mut VecDeque<i64>) {
        if !self.current.contains_key(&hash) {
            let times = match self.previous.remove(&hash) {
                Some(times) => times,
                None if self.len() >= max_keys => return (Slot::Overflow, &mut self.overflow),
                None => VecDeque::with_capacity(
                    usize::try_from(limit).map_or(PREALLOCATED, |l| l.min(PREALLOCATED)),
                ),
            };
            self.current.insert(hash, times);
        }
        let times = self.current.entry(hash).or_default();
        (Slot::Key(hash), times)
    }
}

/// Attempts per key within a sliding window.
#[derive(Debug)]
pub struct SlidingWindow {
    limit: u32,
    window: Duration,
    max_keys: usize,
    hasher: RandomState,
    buckets: Mutex<Buckets>,
}

impl SlidingWindow {
    /// At most `limit` attempts in any `window`; a `limit` of 0 allows everything. Tracks at
    /// most [`DEFAULT_MAX_KEYS`] keys.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            max_keys: DEFAULT_MAX_KEYS,
            hasher: RandomState::new(),
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// The same limit tracking at most `max_keys` keys (at least 1) at once.
    #[must_use]
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How many keys have their own bucket now (at most the `max_keys` bound).
    pub fn tracked_keys(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn window_micros(&self) -> i64 {
        self.window.num_microseconds().unwrap_or(i64::MAX).max(1)
    }

    /// Reserves an attempt for `key` at `now`, or says after how many whole seconds the next
    /// one will be allowed.
    pub fn try_acquire(&self, key: &str, now: DateTime<Utc>) -> Result<Reservation, i64> {
        let now = now.timestamp_micros();
        if self.limit == 0 {
            return Ok(Reservation {
                slot: Slot::Unlimited,
                at: now,
            });
        }
        let hash = self.hasher.hash_one(key);
        let window = self.window_micros();
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let mut buckets = self.lock();
        let dropped = buckets.rotate(now, window);
        let (slot, times) = buckets.bucket(hash, self.max_keys, self.limit);
        let horizon = now.saturating_sub(window);
        while times.front().is_some_and(|t| *t <= horizon) {
            times.pop_front();
        }
        let result = if times.len() >= limit {
            let oldest = times.front().copied().unwrap_or(now);
            let wait = oldest.saturating_add(window).saturating_sub(now);
            // Round up: a client that waits `retry_after` seconds must then be allowed.
            Err(wait.saturating_add(999_999).div_euclid(1_000_000).max(1))
        } else {
            times.push_back(now);
            Ok(Reservation { slot, at: now })
        };
        drop(buckets);
        // Freed outside the lock: a dropped generation may hold many keys.
        drop(dropped);
        result
    }

    /// Gives a reserved attempt back: it does not count.
    pub fn release(&self, reservation: &Reservation) {
        let mut buckets = self.lock();
        let hash = match reservation.slot {
            Slot::Unlimited => return,
            Slot::Overflow => {
                remove_at(&mut buckets.overflow, reservation.at);
                return;
            }
            Slot::Key(hash) => hash,
        };
        let Buckets {
            current, previous, ..
        } = &mut *buckets;
        for generation in [current, previous] {
            if let Some(times) = generation.get_mut(&hash) {
                remove_at(times, reservation.at);
                if times.is_empty() {
                    generation.remove(&hash);
                }
                return;
            }
        }
    }

    /// Forgets every attempt of `key` (after an admin unlocks an account, say).
    pub fn reset(&self, key: &str) {
        let hash = self.hasher.hash_one(key);
        let mut buckets = self.lock();
        buckets.current.remove(&hash);
        buckets.previous.remove(&hash);
    }
}

/// Removes the latest attempt made at `at`.
fn remove_at(times: &mut VecDeque<i64>, at: i64) {
    if let Some(i) = times.iter().rposition(|t| *t == at) {
        times.remove(i);
    }
}

/// The network a client address counts as in a limit: an IPv4 address as it is; an IPv6
/// address cut to its network of `ipv6_prefix` bits (one /64 is one subscriber, who holds 2^64
/// addresses). An IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn address_network(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = ipv6_prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// The key of a client address in a limit: its [`address_network`], an IPv6 network written
/// as `network/prefix`.
pub fn address_key(ip: IpAddr, ipv6_prefix: u8) -> String {
    match address_network(ip, ipv6_prefix) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("{v6}/{}", ipv6_prefix.min(128)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn limit_then_refuse_until_the_oldest_leaves_the_window() {
        let w = SlidingWindow::new(5, Duration::seconds(60));
        for i in 0..5 {
            assert!(w.try_acquire("k", t0() + Duration::seconds(i)).is_ok());
        }
        assert_eq!(w.try_acquire("k", t0() + Duration::seconds(10)), Err(50));
        // Other keys are independent.
        assert!(w.try_acquire("other", t0()).is_ok());
        // The first attempt leaves the window at 60 s.
        assert_eq!(
            w.try_acquire("k", t0() + Duration::milliseconds(59_500)),
            Err(1)
        );
        assert!(w.try_acquire("k", t0() + Duration::seconds(60)).is_ok());
        assert!(w.try_acquire("k", t0() + Duration::seconds(60)).is_err());
    }

    #[test]
    fn released_attempts_do_not_count() {
        let w = SlidingWindow::new(2, Duration::seconds(60));
        let a = w.try_acquire("k", t0()).unwrap();
        let b = w.try_acquire("k", t0()).unwrap();
        assert!(w.try_acquire("k", t0()).is_err());
        w.release(&a);
        assert!(w.try_acquire("k", t0()).is_ok());
        w.release(&b);
        w.reset("k");
        assert!(w.try_acquire("k", t0()).is_ok());
    }

    #[test]
    fn zero_means_unlimited() {
        let w = SlidingWindow::new(0, Duration::seconds(1));
        for _ in 0..1000 {
            assert!(w.try_acquire("k", t0()).is_ok());
        }
        assert_eq!(w.tracked_keys(), 0);
    }

    #[test]
    fn concurrent_attempts_get_exactly_the_limit() {
        let w = std::sync::Arc::new(SlidingWindow::new(5, Duration::seconds(60)));
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let w = std::sync::Arc::clone(&w);
                std::thread::spawn(move || w.try_acquire("k", t0()).is_ok())
            })
            .collect();
        let allowed = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn a_flood_of_keys_stays_within_the_bound_and_the_attacked_key_stays_limited() {
        let w = SlidingWindow::new(5, Duration::seconds(60)).with_max_keys(1_000);
        for i in 0..5 {
            assert!(w.try_acquire("victim", t0() + Duration::seconds(i)).is_ok());
        }
        for i in 0..100_000 {
            let _ = w.try_acquire(&format!("flood-{i}"), t0() + Duration::seconds(5));
            assert!(w.tracked_keys() <= 1_000);
        }
        assert_eq!(w.tracked_keys(), 1_000);
        // The attacked key kept its own count through the flood.
        assert_eq!(
            w.try_acquire("victim", t0() + Duration::seconds(10)),
            Err(50)
        );
        // Keys that found the map full share one bucket with the same limit: stricter, never
        // looser.
        assert!(
            w.try_acquire("newcomer", t0() + Duration::seconds(10))
                .is_err()
        );
        // Two windows later every generation has turned over: room again, and the victim's
        // attempts have left the window.
        let later = t0() + Duration::seconds(125);
        assert!(w.try_acquire("newcomer", later).is_ok());
        assert!(w.try_acquire("victim", later).is_ok());
        assert_eq!(w.tracked_keys(), 2);
    }

    #[test]
    fn keys_expire_a_generation_at_a_time_without_losing_live_attempts() {
        let w = SlidingWindow::new(2, Duration::seconds(60)).with_max_keys(10);
        assert!(w.try_acquire("a", t0()).is_ok());
        assert!(w.try_acquire("a", t0() + Duration::seconds(50)).is_ok());
        // A rotation at 61 s moves "a" to the older generation; its attempt at 50 s still
        // counts until 110 s.
        assert!(w.try_acquire("b", t0() + Duration::seconds(61)).is_ok());
        assert!(w.try_acquire("a", t0() + Duration::seconds(62)).is_ok());
        assert_eq!(w.try_acquire("a", t0() + Duration::seconds(63)), Err(47));
        // "b" was not looked up for a window after the next rotation: it is dropped.
        assert!(w.try_acquire("c", t0() + Duration::seconds(122)).is_ok());
        assert!(w.try_acquire("c", t0() + Duration::seconds(183)).is_ok());
        assert_eq!(w.tracked_keys(), 1, "only c is left");
    }

    #[test]
    fn releasing_an_overflowed_attempt_gives_it_back() {
        let w = SlidingWindow::new(1, Duration::seconds(60)).with_max_keys(1);
        assert!(w.try_acquire("a", t0()).is_ok());
        let overflowed = w.try_acquire("b", t0()).unwrap();
        assert!(w.try_acquire("c", t0()).is_err(), "b and c share a bucket");
        w.release(&overflowed);
        assert!(w.try_acquire("c", t0()).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_per_network() {
        let key = |ip: &str, prefix| address_key(ip.parse().unwrap(), prefix);
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 64), "2001:db8:1:2::/64");
        assert_eq!(
            key("2001:db8:1:2:aaaa::1", 64),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64)
        );
        assert_ne!(key("2001:db8:1:2::1", 64), key("2001:db8:1:3::1", 64));
        assert_eq!(key("2001:db8:1:2::1", 48), "2001:db8:1::/48");
        assert_eq!(key("2001:db8::1", 128), "2001:db8::1/128");
        assert_eq!(key("2001:db8::1", 0), "::/0");
    }
}
