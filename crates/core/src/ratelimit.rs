//! Sliding-window limits: at most `limit` attempts per key within `window`.
//!
//! An attempt reserves its slot *before* the work it guards (a password check), so that twenty
//! attempts sent at once are judged exactly like twenty in a row: the first `limit` proceed and
//! the rest are refused. A caller may release a reservation afterwards — a successful login
//! does not count as a failed one.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// Keys held before a sweep drops those with no attempt left in the window.
const SWEEP_AT: usize = 10_000;

/// A reserved attempt, to release if it turns out not to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    key: String,
    at: DateTime<Utc>,
}

/// Attempts per key within a sliding window.
#[derive(Debug)]
pub struct SlidingWindow {
    limit: u32,
    window: Duration,
    attempts: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
}

impl SlidingWindow {
    /// At most `limit` attempts in any `window`; a `limit` of 0 allows everything.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Reserves an attempt for `key` at `now`, or says after how many whole seconds the next
    /// one will be allowed.
    pub fn try_acquire(&self, key: &str, now: DateTime<Utc>) -> Result<Reservation, i64> {
        if self.limit == 0 {
            return Ok(Reservation {
                key: String::new(),
                at: now,
            });
        }
        let mut map = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= SWEEP_AT {
            let horizon = now - self.window;
            map.retain(|_, times| times.back().is_some_and(|t| *t > horizon));
        }
        let times = map.entry(key.to_owned()).or_default();
        let horizon = now - self.window;
        while times.front().is_some_and(|t| *t <= horizon) {
            times.pop_front();
        }
        if times.len() >= usize::try_from(self.limit).unwrap_or(usize::MAX) {
            let oldest = times.front().copied().unwrap_or(now);
            let wait = oldest + self.window - now;
            // Round up: a client that waits `retry_after` seconds must then be allowed.
            let secs = (wait.num_milliseconds() + 999) / 1000;
            return Err(secs.max(1));
        }
        times.push_back(now);
        Ok(Reservation {
            key: key.to_owned(),
            at: now,
        })
    }

    /// Gives a reserved attempt back: it does not count.
    pub fn release(&self, reservation: &Reservation) {
        if self.limit == 0 {
            return;
        }
        let mut map = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(times) = map.get_mut(&reservation.key) {
            if let Some(i) = times.iter().rposition(|t| *t == reservation.at) {
                times.remove(i);
            }
            if times.is_empty() {
                map.remove(&reservation.key);
            }
        }
    }

    /// Forgets every attempt of `key` (after an admin unlocks an account, say).
    pub fn reset(&self, key: &str) {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
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
}
