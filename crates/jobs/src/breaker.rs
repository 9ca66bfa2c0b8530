//! A circuit breaker for a dependency that jobs call (SMTP now; S3, ClamAV and the ML workers
//! later). After `failures` failed attempts within `window` it opens: jobs that need the
//! dependency are not started but wait (their attempts are not counted) until `open_for` has
//! passed. Then it is half-open: one job runs as a probe while the others keep waiting; the
//! probe's success closes it, its failure opens it again.
//!
//! An attempt counts as a failure of the dependency when it is to be retried (an error worth
//! another attempt, a timeout, a panic); a success, a failure for good (the dependency
//! answered, the input was wrong) or a cancellation counts as the dependency answering. The
//! state is per node: each node learns of an outage from its own attempts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use unhidra_core::{Clock, SystemClock};

/// When a breaker opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failed attempts within `window` that open it.
    pub failures: u32,
    /// How far back failures count.
    pub window: Duration,
    /// How long it stays open before a probe may run.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    /// 5 failures within a minute open it for 30 s.
    fn default() -> Self {
        Self {
            failures: 5,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Jobs run.
    Closed,
    /// One job runs as a probe; the others wait.
    HalfOpen,
    /// Jobs wait.
    Open,
}

impl BreakerState {
    /// Its name in health and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    /// Its value in the `jobs_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// Whether a job that needs the dependency may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Run it; `probe` if its outcome decides whether the breaker closes.
    Run {
        /// This attempt is the half-open probe.
        probe: bool,
    },
    /// Do not start it; it may try again at this time.
    Wait(DateTime<Utc>),
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// Failures within the window, oldest first (while closed).
    failures: VecDeque<DateTime<Utc>>,
    /// While open: when a probe may run.
    until: DateTime<Utc>,
    /// While half-open: a probe runs.
    probing: bool,
}

/// The breaker of one dependency, shared by the kinds that need it. The job system it is
/// built into gives it its clock and metrics.
#[derive(Debug)]
pub struct Breaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// What the job system attaches at build: its clock, and the breaker's gauge and counter
    /// of the `jobs_breaker_*` families.
    attached: OnceLock<Attached>,
}

#[derive(Debug)]
struct Attached {
    clock: Arc<dyn Clock>,
    state: Gauge,
    opened: Counter,
}

impl Breaker {
    /// A closed breaker for the dependency `name` (as metrics and health name it); give it to
    /// the [`KindOptions`](crate::KindOptions) of each kind that needs the dependency.
    pub fn new(name: &str, config: BreakerConfig) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: VecDeque::new(),
                until: DateTime::<Utc>::MIN_UTC,
                probing: false,
            }),
            attached: OnceLock::new(),
        })
    }

    fn now(&self) -> DateTime<Utc> {
        match self.attached.get() {
            Some(attached) => attached.clock.now(),
            None => SystemClock.now(),
        }
    }

    /// The dependency's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it stands now (an open breaker whose time is up reads as half-open).
    pub fn state(&self) -> BreakerState {
        let now = self.now();
        let inner = self.lock();
        match inner.state {
            BreakerState::Open if now >= inner.until => BreakerState::HalfOpen,
            state => state,
        }
    }

    /// Whether a job that needs the dependency may start now.
    pub fn admit(&self) -> Admission {
        let now = self.now();
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Admission::Run { probe: false },
            BreakerState::Open if now < inner.until => Admission::Wait(inner.until),
            BreakerState::Open | BreakerState::HalfOpen if !inner.probing => {
                self.set(&mut inner, BreakerState::HalfOpen);
                inner.probing = true;
                tracing::info!(dependency = %self.name, "circuit half-open: one job probes");
                Admission::Run { probe: true }
            }
            BreakerState::Open | BreakerState::HalfOpen => {
                Admission::Wait(now + chrono_span(self.config.open_for))
            }
        }
    }

    /// Records how an attempt that [`Self::admit`] let run ended: `healthy` if the dependency
    /// answered (see the module's rules).
    pub fn record(&self, probe: bool, healthy: bool) {
        let now = self.now();
        let mut inner = self.lock();
        match (inner.state, probe, healthy) {
            (BreakerState::HalfOpen, true, true) => {
                inner.probing = false;
                inner.failures.clear();
                self.set(&mut inner, BreakerState::Closed);
                tracing::info!(dependency = %self.name, "circuit closed: the probe succeeded");
            }
            (BreakerState::HalfOpen, true, false) => {
                inner.probing = false;
                self.open(&mut inner, now);
            }
            (BreakerState::Closed, _, false) => {
                let since = now - chrono_span(self.config.window);
                while inner.failures.front().is_some_and(|t| *t <= since) {
                    inner.failures.pop_front();
                }
                inner.failures.push_back(now);
                let threshold = usize::try_from(self.config.failures.max(1)).unwrap_or(1);
                if inner.failures.len() >= threshold {
                    inner.failures.clear();
                    self.open(&mut inner, now);
                }
            }
            // Attempts that started before the breaker opened, and successes while closed,
            // change nothing.
            _ => {}
        }
    }

    /// Lets another probe run when the one admitted ended without an outcome (its attempt
    /// was stopped: a lost lease, a shutdown); nothing else changes.
    fn abandon(&self, probe: bool) {
        let mut inner = self.lock();
        if probe && inner.state == BreakerState::HalfOpen {
            inner.probing = false;
        }
    }

    /// Gives the breaker the job system's clock, and the gauge and counter it keeps up to
    /// date; the first job system a breaker is built into keeps it.
    pub(crate) fn attach(&self, clock: Arc<dyn Clock>, state: Gauge, opened: Counter) {
        state.set(self.lock().state.gauge());
        let _ = self.attached.set(Attached {
            clock,
            state,
            opened,
        });
    }

    fn open(&self, inner: &mut Inner, now: DateTime<Utc>) {
        inner.until = now + chrono_span(self.config.open_for);
        self.set(inner, BreakerState::Open);
        if let Some(attached) = self.attached.get() {
            attached.opened.inc();
        }
        tracing::warn!(
            dependency = %self.name,
            open_for_secs = self.config.open_for.as_secs_f64(),
            "circuit open: jobs that need it wait"
        );
    }

    fn set(&self, inner: &mut Inner, state: BreakerState) {
        inner.state = state;
        if let Some(attached) = self.attached.get() {
            attached.state.set(state.gauge());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent between statements: a panic elsewhere cannot break it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An attempt that [`Breaker::admit`] let run, recorded on the breaker when it ends: by
/// [`Pass::finish`], or, dropped unfinished (its task was stopped), as having no outcome, so
/// that a stopped probe never leaves the breaker waiting for it.
#[derive(Debug)]
pub(crate) struct Pass {
    breaker: Arc<Breaker>,
    probe: bool,
    finished: bool,
}

impl Pass {
    pub(crate) fn new(breaker: Arc<Breaker>, probe: bool) -> Self {
        Self {
            breaker,
            probe,
            finished: false,
        }
    }

    /// Records the attempt's end: `healthy` if the dependency answered.
    pub(crate) fn finish(mut self, healthy: bool) {
        self.finished = true;
        self.breaker.record(self.probe, healthy);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker.abandon(self.probe);
        }
    }
}

/// `d` as a span no longer than a year, so that adding it to a time cannot overflow.
fn chrono_span(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d.min(Duration::from_secs(366 * 24 * 3600)))
        .unwrap_or(chrono::Duration::days(366))
}

#[cfg(test)]
mod tests {
    use unhidra_core::ManualClock;

    use super::*;

    fn breaker() -> (Arc<Breaker>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(
            DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
                .unwrap()
                .to_utc(),
        ));
        let config = BreakerConfig {
            failures: 3,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(30),
        };
        let breaker = Breaker::new("smtp", config);
        breaker.attach(clock.clone(), Gauge::default(), Counter::default());
        (breaker, clock)
    }

    #[test]
    fn failures_within_the_window_open_it_and_a_probe_closes_it() {
        let (b, clock) = breaker();
        for _ in 0..2 {
            assert_eq!(b.admit(), Admission::Run { probe: false });
            b.record(false, false);
        }
        assert_eq!(b.state(), BreakerState::Closed, "two of three");
        b.record(false, false);
        assert_eq!(b.state(), BreakerState::Open);
        let reopens = clock.now() + chrono::Duration::seconds(30);
        assert_eq!(b.admit(), Admission::Wait(reopens), "jobs wait");
        clock.advance(chrono::Duration::seconds(30));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(), Admission::Run { probe: true });
        assert!(
            matches!(b.admit(), Admission::Wait(_)),
            "one probe at a time"
        );
        // A late failure of an attempt from before the opening is not the probe's.
        b.record(false, false);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(true, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admission::Run { probe: false });
    }

    #[test]
    fn a_probe_stopped_without_an_outcome_lets_another_run() {
        let (b, clock) = breaker();
        for _ in 0..3 {
            b.record(false, false);
        }
        clock.advance(chrono::Duration::seconds(30));
        let Admission::Run { probe: true } = b.admit() else {
            panic!("a probe")
        };
        drop(Pass::new(Arc::clone(&b), true));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(), Admission::Run { probe: true }, "the next probe");
        Pass::new(Arc::clone(&b), true).finish(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let (b, clock) = breaker();
        for _ in 0..3 {
            b.record(false, false);
        }
        clock.advance(chrono::Duration::seconds(31));
        assert_eq!(b.admit(), Admission::Run { probe: true });
        b.record(true, false);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(),
            Admission::Wait(clock.now() + chrono::Duration::seconds(30))
        );
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let (b, clock) = breaker();
        b.record(false, false);
        b.record(false, false);
        clock.advance(chrono::Duration::seconds(11));
        b.record(false, false);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false, false);
        assert_eq!(b.state(), BreakerState::Closed, "two within the window");
        b.record(false, false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn the_metrics_follow_the_state() {
        let (b, clock) = breaker();
        let (gauge, opened) = match b.attached.get() {
            Some(a) => (a.state.clone(), a.opened.clone()),
            None => unreachable!("attached"),
        };
        for _ in 0..3 {
            b.record(false, false);
        }
        assert_eq!((gauge.get(), opened.get()), (2, 1));
        clock.advance(chrono::Duration::seconds(30));
        let _ = b.admit();
        assert_eq!(gauge.get(), 1);
        b.record(true, true);
        assert_eq!((gauge.get(), opened.get()), (0, 1));
    }
}
