//! The job system's Prometheus metrics, registered by the server in its registry.
//!
//! Counters and histograms count what this node did; the `jobs` gauge is read from the store
//! by the maintenance loop, so it shows every node's jobs.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use unhidra_store::jobs::{JobCount, JobState};

/// The label of the counters and of `jobs_run_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The job kind (registered kinds only, so cardinality stays bounded).
    pub kind: String,
}

/// The label of `jobs_queue_latency_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// The queue.
    pub queue: String,
}

/// The label of the `jobs_breaker_*` metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabel {
    /// The dependency a circuit breaker guards.
    pub dependency: String,
}

/// The label of the `jobs` gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The job state.
    pub state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The job system's metrics; cloning shares them.
#[derive(Debug, Clone)]
pub struct JobsMetrics {
    /// Jobs stored by an enqueue on this node, by kind.
    pub enqueued: Family<KindLabel, Counter>,
    /// Attempts this node started, by kind.
    pub started: Family<KindLabel, Counter>,
    /// Attempts that completed their job, by kind.
    pub completed: Family<KindLabel, Counter>,
    /// Attempts that failed and left their job to be retried, by kind.
    pub failed: Family<KindLabel, Counter>,
    /// Attempts that ended with their job discarded, by kind.
    pub discarded: Family<KindLabel, Counter>,
    /// Attempts that ended with their job cancelled, by kind.
    pub cancelled: Family<KindLabel, Counter>,
    /// Jobs whose worker's lease ran out and that this node rescued, by kind.
    pub lease_lost: Family<KindLabel, Counter>,
    /// Jobs this node did not start because a dependency's circuit was open, by kind.
    pub deferred: Family<KindLabel, Counter>,
    /// Each circuit breaker's state: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<DependencyLabel, Gauge>,
    /// How often each circuit breaker opened.
    pub breaker_opened: Family<DependencyLabel, Counter>,
    /// Seconds an attempt ran, by kind.
    pub run_duration: Histograms<KindLabel>,
    /// Seconds from a job's `run_at` to the start of its attempt, by queue.
    pub queue_latency: Histograms<QueueLabel>,
    /// Jobs in the store per state, across every node (refreshed by the maintenance loop).
    pub jobs: Family<StateLabel, Gauge<i64, AtomicI64>>,
    /// Seconds the oldest due job has waited to start, across every node.
    pub oldest_due: Gauge<f64, AtomicU64>,
    /// Wake-ups heard from the store (PostgreSQL's notifications of enqueues on any node, and
    /// one each time its listener connects).
    pub wakeups: Counter,
}

impl Default for JobsMetrics {
    fn default() -> Self {
        Self {
            enqueued: Family::default(),
            started: Family::default(),
            completed: Family::default(),
            failed: Family::default(),
            discarded: Family::default(),
            cancelled: Family::default(),
            lease_lost: Family::default(),
            deferred: Family::default(),
            breaker_state: Family::default(),
            breaker_opened: Family::default(),
            run_duration: Family::new_with_constructor(run_histogram),
            queue_latency: Family::new_with_constructor(latency_histogram),
            jobs: Family::default(),
            oldest_due: Gauge::default(),
            wakeups: Counter::default(),
        }
    }
}

impl JobsMetrics {
    /// Adds `n` to the counter `family` of `kind`.
    pub(crate) fn count(family: &Family<KindLabel, Counter>, kind: &str, n: u64) {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc_by(n);
    }

    /// Records the start of an attempt of `kind` in `queue`, `waited` seconds after its
    /// `run_at`.
    pub(crate) fn started(&self, kind: &str, queue: &str, waited: f64) {
        Self::count(&self.started, kind, 1);
        self.queue_latency
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .observe(waited.max(0.0));
    }

    /// Records that an attempt of `kind` ran `seconds`.
    pub(crate) fn ran(&self, kind: &str, seconds: f64) {
        self.run_duration
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts a recorded end by the state its job is in after it.
    pub(crate) fn ended(&self, kind: &str, state: JobState) {
        let family = match state {
            JobState::Completed => &self.completed,
            JobState::Retryable => &self.failed,
            JobState::Discarded => &self.discarded,
            JobState::Cancelled => &self.cancelled,
            // An end never leaves a job waiting for its first run or running.
            JobState::Scheduled | JobState::Available | JobState::Running => return,
        };
        Self::count(family, kind, 1);
    }

    /// Sets the `jobs` gauge from the store's counts (every state, those without jobs at 0),
    /// and the age of the oldest due job.
    pub(crate) fn stats(&self, counts: &[JobCount], oldest_due_seconds: f64) {
        for state in JobState::ALL {
            let n = counts
                .iter()
                .filter(|c| c.state == state)
                .map(|c| c.count)
                .sum();
            self.jobs
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n);
        }
        self.oldest_due.set(oldest_due_seconds.max(0.0));
    }

    /// Adds these metrics to a registry.
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "jobs_enqueued",
                "Jobs stored by an enqueue on this node, by kind",
                &self.enqueued,
            ),
            (
                "jobs_started",
                "Job attempts this node started, by kind",
                &self.started,
            ),
            (
                "jobs_completed",
                "Job attempts that completed their job, by kind",
                &self.completed,
            ),
            (
                "jobs_failed",
                "Job attempts that failed and left their job to be retried, by kind",
                &self.failed,
            ),
            (
                "jobs_discarded",
                "Job attempts that ended with their job discarded, by kind",
                &self.discarded,
            ),
            (
                "jobs_cancelled",
                "Job attempts that ended with their job cancelled, by kind",
                &self.cancelled,
            ),
            (
                "jobs_lease_lost",
                "Jobs whose worker's lease ran out, rescued by this node, by kind",
                &self.lease_lost,
            ),
            (
                "jobs_deferred",
                "Jobs not started because a dependency's circuit was open, by kind",
                &self.deferred,
            ),
        ];
        for (name, help, family) in counters {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "jobs_breaker_state",
            "Each dependency's circuit breaker: 0 closed, 1 half-open, 2 open",
            self.breaker_state.clone(),
        );
        registry.register(
            "jobs_breaker_opened",
            "How often each dependency's circuit breaker opened",
            self.breaker_opened.clone(),
        );
        registry.register_with_unit(
            "jobs_run_duration",
            "Time a job attempt ran, by kind",
            Unit::Seconds,
            self.run_duration.clone(),
        );
        registry.register_with_unit(
            "jobs_queue_latency",
            "Time from a job's run_at to the start of its attempt, by queue",
            Unit::Seconds,
            self.queue_latency.clone(),
        );
        registry.register(
            "jobs",
            "Jobs in the store per state, across every node",
            self.jobs.clone(),
        );
        registry.register_with_unit(
            "jobs_oldest_due",
            "How long the oldest due job has waited to start, across every node",
            Unit::Seconds,
            self.oldest_due.clone(),
        );
        registry.register(
            "jobs_store_wakeups",
            "Wake-ups heard from the store for jobs enqueued on any node",
            self.wakeups.clone(),
        );
    }
}

fn run_histogram() -> Histogram {
    // 1 ms … ~4.4 min, quadrupling.
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~70 min, quadrupling: a job scheduled for later waits from its run_at only.
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}
