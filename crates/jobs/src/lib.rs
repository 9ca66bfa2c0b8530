//! Unhidra's background jobs: a durable queue in the database Unhidra already has.
//!
//! A capability registers a [`Handler`] per job *kind* with its [`KindOptions`] (queue,
//! attempts, timeout, backoff); [`Jobs::enqueue`] checks a job against them and stores it;
//! [`Jobs::start`] runs a [`worker`] per configured queue on this node, which claims due jobs
//! in batches under a lease it renews, runs their handlers with a timeout, and records each
//! attempt's end. A node killed mid-job loses its leases, and another node (or this one after a
//! restart) retries those jobs once the leases end. Where the store hears of other nodes'
//! enqueues ([`JobStore::job_wakeups`](unhidra_store::JobStore::job_wakeups), PostgreSQL), the
//! queue's worker here wakes at once too; polling covers the rest. [`metrics`] counts what
//! this node's workers do. The rules of the states live in
//! `unhidra-store`'s [`jobs`](unhidra_store::jobs) module, which holds them on both engines.
//!
//! The operator's side — listing with filters, counts, retrying, cancelling, and the dead
//! letters in bulk — is in `admin.rs`, which checks every input an operator types. [`cron`]
//! enqueues jobs at the ticks of cron schedules, once across every node.
//!
//! Knows no HTTP and no SQL.

mod admin;
pub mod backoff;
pub mod breaker;
pub mod cron;
pub mod metrics;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use unhidra_core::Clock;
use unhidra_store::jobs::{Enqueued, JobRecord, JobState, NewJob, UniqueStates};
use unhidra_store::{Store, StoreError};
use uuid::Uuid;

pub use admin::{
    DEFAULT_PAGE_SIZE, JobPage, JobStats, ListQuery, MAX_PAGE, MAX_PAGE_SIZE, MAX_QUERY, parse_id,
    parse_state,
};
pub use backoff::Backoff;
pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use cron::{CatchUp, CronExpr, CronSpec};
pub use metrics::JobsMetrics;
pub use worker::Workers;

/// The longest job kind, queue name, unique or concurrency key, in bytes.
pub const MAX_NAME: usize = 200;

/// How the job system runs on this node.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// The queues this node works, each with how many jobs it runs at once; empty: this node
    /// runs no jobs (it still enqueues them).
    pub queues: Vec<(String, u32)>,
    /// How long a claimed job stays this node's without a renewal; renewed every third of it.
    pub lease: Duration,
    /// How often an idle queue looks for due jobs when nothing woke it (jobs scheduled for
    /// later, or enqueued by another node while the store's wake-up of it was missed).
    pub poll_interval: Duration,
    /// The largest payload, in encoded bytes.
    pub max_payload_bytes: usize,
    /// How long finished jobs are kept before they are pruned.
    pub retention: Duration,
    /// This node's name in leases and attempts.
    pub node: String,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            queues: vec![("default".to_owned(), 10)],
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            max_payload_bytes: 64 * 1024,
            retention: Duration::from_secs(7 * 24 * 3600),
            node: format!("node-{}", Uuid::new_v4().simple()),
        }
    }
}

/// How jobs of one kind run unless their enqueue says otherwise.
#[derive(Debug, Clone)]
pub struct KindOptions {
    /// The queue whose workers run them.
    pub queue: String,
    /// Attempts before a job is discarded.
    pub max_attempts: i32,
    /// How long one attempt may run.
    pub timeout: Duration,
    /// Smaller runs first.
    pub priority: i16,
    /// The wait between attempts.
    pub backoff: Backoff,
    /// The circuit breaker of the dependency these jobs need, if any: while it is open they
    /// are not started but wait, their attempts not counted (see [`breaker`]).
    pub breaker: Option<Arc<Breaker>>,
}

impl Default for KindOptions {
    /// The `default` queue, 25 attempts (about a day and a half of backoff), 60 s per attempt.
    fn default() -> Self {
        Self {
            queue: "default".to_owned(),
            max_attempts: 25,
            timeout: Duration::from_secs(60),
            priority: 0,
            backoff: Backoff::default(),
            breaker: None,
        }
    }
}

/// What an enqueue may change from its kind's options.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Run no earlier than this (default: now).
    pub run_at: Option<DateTime<Utc>>,
    /// Instead of the kind's priority.
    pub priority: Option<i16>,
    /// Instead of the kind's attempts.
    pub max_attempts: Option<i32>,
    /// Instead of the kind's timeout.
    pub timeout: Option<Duration>,
    /// At most one job with this key in the states `unique_states` names: a second enqueue
    /// returns the first job.
    pub unique_key: Option<String>,
    /// Where `unique_key` counts (default: [`UniqueStates::DEFAULT`]).
    pub unique_states: Option<UniqueStates>,
    /// At most `.1` jobs with key `.0` run at once, across every node.
    pub concurrency: Option<(String, i32)>,
    /// The trace id of the request that enqueued it.
    pub trace_id: Option<String>,
}

/// Why a job was refused, or the queue could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// No handler is registered for this kind.
    #[error("unknown job kind {0:?}")]
    UnknownKind(String),
    /// A field is out of its bounds: the field, a stable code, and what is allowed.
    #[error("{0}: {2}")]
    Invalid(&'static str, &'static str, String),
    /// No such job.
    #[error("no such job")]
    NotFound,
    /// The job's state does not allow this: a retry of a job that is neither discarded nor
    /// cancelled, or a cancellation of a job that completed or was discarded. Its state now.
    #[error("the job is {}", .0.as_str())]
    State(JobState),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// The cron schedule of this name is defined by this node's configuration, which wins.
    #[error("the cron schedule {0:?} is defined by the configuration (jobs_cron)")]
    Configured(String),
}

impl From<StoreError> for JobsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => Self::NotFound,
            other => Self::Store(other),
        }
    }
}

/// How an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Try again: after `after` if given, else after the kind's backoff. Discarded once the
    /// attempts are used up.
    #[error("{error}")]
    Retry {
        /// What went wrong, for the job's history.
        error: String,
        /// When to try again, if the handler knows (a `Retry-After`).
        after: Option<Duration>,
    },
    /// Do not try again: the job is discarded at once.
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    /// A failure worth retrying after the kind's backoff.
    pub fn retry(error: impl std::fmt::Display) -> Self {
        Self::Retry {
            error: error.to_string(),
            after: None,
        }
    }

    /// A failure worth retrying after `after`.
    pub fn retry_after(error: impl std::fmt::Display, after: Duration) -> Self {
        Self::Retry {
            error: error.to_string(),
            after: Some(after),
        }
    }

    /// A failure that another attempt would not fix.
    pub fn permanent(error: impl std::fmt::Display) -> Self {
        Self::Permanent(error.to_string())
    }
}

/// One attempt of a job, as its handler sees it.
#[derive(Debug)]
pub struct JobContext {
    /// The job.
    pub id: Uuid,
    /// Its kind.
    pub kind: String,
    /// Which attempt this is (1 for the first).
    pub attempt: i32,
    /// Its attempts before it is discarded.
    pub max_attempts: i32,
    /// Its payload.
    pub payload: serde_json::Value,
    /// The trace id of the request that enqueued it.
    pub trace_id: Option<String>,
    cancel: watch::Receiver<bool>,
    /// Set by [`Self::dependency_used`].
    unused: std::sync::atomic::AtomicBool,
}

impl JobContext {
    /// Says whether this attempt has called (so far) the dependency its kind's circuit
    /// breaker guards; an attempt is taken to have called it unless it says otherwise. An
    /// attempt that did not (there was nothing to send, or an earlier step failed) says
    /// nothing of the dependency by its outcome, and the breaker does not count it.
    pub fn dependency_used(&self, used: bool) {
        self.unused
            .store(!used, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a cancellation was asked for: a long handler checks between steps and returns.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Completes once a cancellation is asked for (never, if none is).
    pub async fn cancelled(&self) {
        let mut cancel = self.cancel.clone();
        if cancel.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the jobs of one kind.
#[async_trait]
pub trait Handler: Send + Sync + std::fmt::Debug + 'static {
    /// Runs one attempt. An attempt that outlives its timeout is stopped and counts as failed.
    async fn run(&self, job: &JobContext) -> Result<(), JobError>;
}

#[derive(Debug, Clone)]
struct Kind {
    handler: Arc<dyn Handler>,
    options: KindOptions,
}

/// The job system: which kinds exist, and the queue.
#[derive(Debug)]
pub struct Jobs {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: JobsConfig,
    kinds: HashMap<String, Kind>,
    /// Kinds that run every so often, one job at a time across every node.
    periodic: HashMap<String, Duration>,
    /// The circuit breakers of the kinds' dependencies, by name.
    breakers: Vec<Arc<Breaker>>,
    /// One per queue this node works: an enqueue here, or a wake-up from the store for
    /// another node's enqueue, wakes its worker at once.
    wake: HashMap<String, Arc<Notify>>,
    metrics: JobsMetrics,
    /// This node's side of the cron schedules.
    cron: cron::CronState,
}

/// Gathers the kinds before the job system starts.
#[derive(Debug)]
pub struct JobsBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: JobsConfig,
    kinds: HashMap<String, Kind>,
    periodic: HashMap<String, Duration>,
    metrics: JobsMetrics,
}

impl JobsBuilder {
    /// Records into `metrics` (which the server registers) rather than metrics of its own.
    #[must_use]
    pub fn metrics(mut self, metrics: JobsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Registers the handler of `kind`.
    ///
    /// # Panics
    /// If `kind` is registered twice or is not a valid name: a programming error.
    #[must_use]
    pub fn register(mut self, kind: &str, handler: impl Handler, options: KindOptions) -> Self {
        assert!(valid_name(kind), "job kind {kind:?} is not a valid name");
        assert!(valid_name(&options.queue), "queue {:?}", options.queue);
        let previous = self.kinds.insert(
            kind.to_owned(),
            Kind {
                handler: Arc::new(handler),
                options,
            },
        );
        assert!(previous.is_none(), "job kind {kind:?} registered twice");
        self
    }

    /// Runs `kind` (registered before) once per `interval` across every node: intervals are
    /// slots counted from the Unix epoch, each with at most one job (its unique key is
    /// `every:<kind>:<slot>`). The first run is due when a node starts, unless the current
    /// slot's job exists already; when a job ends, the next slot's is due when that slot
    /// begins. Its payload is `{}`.
    ///
    /// # Panics
    /// If `kind` is not registered yet, or `interval` is zero: a programming error.
    #[must_use]
    pub fn every(mut self, kind: &str, interval: Duration) -> Self {
        assert!(self.kinds.contains_key(kind), "register {kind:?} first");
        assert!(!interval.is_zero(), "{kind:?} every 0 s");
        self.periodic.insert(kind.to_owned(), interval);
        self
    }

    /// The job system, ready to enqueue; [`Jobs::start`] runs its workers.
    pub fn build(self) -> Arc<Jobs> {
        let wake = self
            .config
            .queues
            .iter()
            .map(|(queue, _)| (queue.clone(), Arc::new(Notify::new())))
            .collect();
        let mut breakers: Vec<Arc<Breaker>> = Vec::new();
        for breaker in self
            .kinds
            .values()
            .filter_map(|k| k.options.breaker.as_ref())
        {
            if !breakers.iter().any(|b| Arc::ptr_eq(b, breaker)) {
                let label = metrics::DependencyLabel {
                    dependency: breaker.name().to_owned(),
                };
                breaker.attach(
                    Arc::clone(&self.clock),
                    self.metrics.breaker_state.get_or_create(&label).clone(),
                    self.metrics.breaker_opened.get_or_create(&label).clone(),
                );
                breakers.push(Arc::clone(breaker));
            }
        }
        breakers.sort_by(|a, b| a.name().cmp(b.name()));
        Arc::new(Jobs {
            store: self.store,
            clock: self.clock,
            config: self.config,
            breakers,
            kinds: self.kinds,
            periodic: self.periodic,
            wake,
            metrics: self.metrics,
            cron: cron::CronState::default(),
        })
    }
}

impl Jobs {
    /// Starts gathering kinds.
    pub fn builder(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: JobsConfig,
    ) -> JobsBuilder {
        JobsBuilder {
            store,
            clock,
            config,
            kinds: HashMap::new(),
            periodic: HashMap::new(),
            metrics: JobsMetrics::default(),
        }
    }

    /// What this node's job system counts.
    pub fn metrics(&self) -> &JobsMetrics {
        &self.metrics
    }

    /// How the job system runs on this node.
    pub fn config(&self) -> &JobsConfig {
        &self.config
    }

    /// The circuit breakers of the dependencies that jobs need, by name.
    pub fn breakers(&self) -> &[Arc<Breaker>] {
        &self.breakers
    }

    /// Checks a job against its kind and stores it (or answers the job that holds its unique
    /// key). Nothing is stored when it is refused.
    pub async fn enqueue(
        &self,
        kind: &str,
        payload: &serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<Enqueued, JobsError> {
        let job = self.new_job(kind, payload, options)?;
        let enqueued = self.store.enqueue_job(&job).await?;
        self.enqueued(&enqueued);
        Ok(enqueued)
    }

    /// Checks each job as [`Self::enqueue`] does, then stores them all in one transaction (a
    /// multi-row INSERT per few hundred jobs, one notification and one wake-up per queue):
    /// answers what was done with each, in the order given. Nothing is stored if one is
    /// refused.
    pub async fn enqueue_many<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a str, &'a serde_json::Value, EnqueueOptions)>,
    ) -> Result<Vec<Enqueued>, JobsError> {
        let new = jobs
            .into_iter()
            .map(|(kind, payload, options)| self.new_job(kind, payload, options))
            .collect::<Result<Vec<_>, _>>()?;
        let enqueued = self.store.enqueue_jobs(&new).await?;
        let mut queues: Vec<&str> = Vec::new();
        for stored in &enqueued {
            if let Enqueued::New(job) = stored {
                JobsMetrics::count(&self.metrics.enqueued, &job.kind, 1);
                if !queues.contains(&job.queue.as_str()) {
                    queues.push(&job.queue);
                }
            }
        }
        for queue in queues {
            self.wake(queue);
        }
        Ok(enqueued)
    }

    /// Counts a job this node stored and wakes its queue's worker here.
    fn enqueued(&self, enqueued: &Enqueued) {
        if let Enqueued::New(stored) = enqueued {
            JobsMetrics::count(&self.metrics.enqueued, &stored.kind, 1);
            self.wake(&stored.queue);
        }
    }

    /// After the caller's transaction that stored `job` (from [`Self::new_job`]) committed:
    /// counts it and wakes its queue's worker here (the store tells other nodes).
    pub fn committed(&self, job: &NewJob) {
        JobsMetrics::count(&self.metrics.enqueued, &job.kind, 1);
        self.wake(&job.queue);
    }

    /// The job `kind` with `payload` would be stored as, checked: what [`Self::enqueue`] stores,
    /// and what a capability hands its store to enqueue in the same transaction as its own
    /// write (then call [`Self::committed`] after the commit).
    pub fn new_job(
        &self,
        kind: &str,
        payload: &serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<NewJob, JobsError> {
        let registered = self
            .kinds
            .get(kind)
            .ok_or_else(|| JobsError::UnknownKind(kind.to_owned()))?;
        let payload = payload.to_string();
        if payload.len() > self.config.max_payload_bytes {
            return Err(JobsError::Invalid(
                "payload",
                "too_large",
                format!(
                    "a payload has at most {} bytes encoded",
                    self.config.max_payload_bytes
                ),
            ));
        }
        let defaults = &registered.options;
        let max_attempts = options.max_attempts.unwrap_or(defaults.max_attempts);
        if !(1..=1000).contains(&max_attempts) {
            return Err(JobsError::Invalid(
                "max_attempts",
                "out_of_range",
                "attempts are between 1 and 1000".to_owned(),
            ));
        }
        let timeout = options.timeout.unwrap_or(defaults.timeout);
        if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(24 * 3600) {
            return Err(JobsError::Invalid(
                "timeout",
                "out_of_range",
                "a timeout is at least 1 ms and at most a day".to_owned(),
            ));
        }
        for (field, key) in [
            ("trace_id", options.trace_id.as_deref()),
            ("unique_key", options.unique_key.as_deref()),
            (
                "concurrency_key",
                options.concurrency.as_ref().map(|(k, _)| k.as_str()),
            ),
        ] {
            if key.is_some_and(|k| !valid_key(k)) {
                return Err(JobsError::Invalid(
                    field,
                    "invalid",
                    format!("a key has 1 to {MAX_NAME} bytes and no control characters"),
                ));
            }
        }
        let (concurrency_key, concurrency_limit) = match options.concurrency {
            Some((_, limit)) if !(1..=10_000).contains(&limit) => {
                return Err(JobsError::Invalid(
                    "concurrency_limit",
                    "out_of_range",
                    "a concurrency limit is between 1 and 10000".to_owned(),
                ));
            }
            Some((key, limit)) => (Some(key), limit),
            None => (None, 0),
        };
        let now = self.clock.now();
        Ok(NewJob {
            id: Uuid::now_v7(),
            kind: kind.to_owned(),
            queue: defaults.queue.clone(),
            payload,
            priority: options.priority.unwrap_or(defaults.priority),
            run_at: options.run_at.unwrap_or(now).max(now),
            max_attempts,
            timeout_ms: i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
            unique_key: options.unique_key,
            unique_states: options.unique_states.unwrap_or(UniqueStates::DEFAULT),
            concurrency_key,
            concurrency_limit,
            trace_id: options.trace_id,
            created_at: now,
        })
    }

    /// Wakes this node's worker of `queue`, if it has one: new work is due.
    pub fn wake(&self, queue: &str) {
        if let Some(notify) = self.wake.get(queue) {
            notify.notify_one();
        }
    }

    /// A job with its attempts.
    pub async fn job(
        &self,
        id: Uuid,
    ) -> Result<(JobRecord, Vec<unhidra_store::jobs::AttemptRecord>), JobsError> {
        Ok(self.store.job(id).await?)
    }

    /// Cancels a job: one that waits is `cancelled` at once; a running one is marked, and its
    /// worker stops it at its next lease renewal. A cancelled job is answered as it is;
    /// [`JobsError::State`] for one that completed or was discarded.
    pub async fn cancel(&self, id: Uuid) -> Result<JobRecord, JobsError> {
        let job = self.store.cancel_job(id, self.clock.now()).await?;
        match job.state {
            JobState::Completed | JobState::Discarded => Err(JobsError::State(job.state)),
            _ => Ok(job),
        }
    }

    /// Puts a discarded or cancelled job back in its queue with fresh attempts.
    /// [`JobsError::State`] for a job in another state (it is left as it is); a store
    /// `Conflict` if another job holds its unique key now.
    pub async fn retry(&self, id: Uuid) -> Result<JobRecord, JobsError> {
        let (before, _) = self.store.job(id).await?;
        if !matches!(before.state, JobState::Discarded | JobState::Cancelled) {
            return Err(JobsError::State(before.state));
        }
        let job = self.store.retry_job(id, self.clock.now()).await?;
        // The job may have moved since it was read: another operator's retry leaves it
        // available too, anything else is its state now.
        if job.state != JobState::Available {
            return Err(JobsError::State(job.state));
        }
        self.wake(&job.queue);
        Ok(job)
    }

    /// Makes sure the periodic `kind` has its job for interval slot `slot` (slot `n` begins
    /// `n` intervals after the Unix epoch), due when the slot begins or now if that has
    /// passed. Its unique key `every:<kind>:<slot>` counts in every state (a cancelled slot is
    /// not brought back), so a slot runs at most once, whichever nodes ask and whenever they
    /// start, until its job is pruned; its concurrency key `every:<kind>` (limit 1) keeps a
    /// run that outlasts its slot from being joined by the next. A failure is
    /// logged: the maintenance loop makes sure of it again at its next tick.
    pub(crate) async fn ensure_periodic(&self, kind: &str, slot: i64) {
        let Some(interval) = self.periodic.get(kind) else {
            return;
        };
        let begins = slot
            .checked_mul(i64::try_from(interval.as_millis()).unwrap_or(i64::MAX))
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let options = EnqueueOptions {
            run_at: Some(begins),
            unique_key: Some(format!("{}{slot}", periodic_prefix(kind))),
            unique_states: Some(UniqueStates::of(&JobState::ALL)),
            // A run that outlasts its slot is not joined by the next slot's.
            concurrency: Some((format!("every:{kind}"), 1)),
            ..EnqueueOptions::default()
        };
        if let Err(e) = self.enqueue(kind, &serde_json::json!({}), options).await {
            tracing::warn!(%kind, error = %e, "periodic job not enqueued");
        }
    }

    /// The interval slot of the periodic `kind` that `at` falls in.
    pub(crate) fn periodic_slot(&self, kind: &str, at: DateTime<Utc>) -> i64 {
        let interval = self.periodic.get(kind).map_or(1, |i| {
            i64::try_from(i.as_millis()).unwrap_or(i64::MAX).max(1)
        });
        at.timestamp_millis().div_euclid(interval)
    }

    /// The slot after the one a periodic job ran for (from its unique key), or the slot `now`
    /// falls in if that is later (the job ran late, or waited for a node).
    pub(crate) fn next_periodic_slot(&self, job: &JobRecord, now: DateTime<Utc>) -> i64 {
        let current = self.periodic_slot(&job.kind, now);
        job.unique_key
            .as_deref()
            .and_then(|key| key.strip_prefix(&periodic_prefix(&job.kind)))
            .and_then(|slot| slot.parse::<i64>().ok())
            .map_or(current + 1, |ran| (ran + 1).max(current))
    }

    /// Starts this node's workers, one per configured queue, and (if it has any) the
    /// scheduler of the cron schedules; they stop when `shutdown` turns true, after the
    /// attempts in flight end (or are stopped at their timeout).
    pub fn start(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Workers {
        let worked: Vec<&str> = self.config.queues.iter().map(|(q, _)| q.as_str()).collect();
        for (kind, registered) in &self.kinds {
            if !worked.contains(&registered.options.queue.as_str()) {
                tracing::warn!(
                    %kind,
                    queue = %registered.options.queue,
                    "this node does not work the queue of this job kind: its jobs run only where `jobs_queues` names the queue"
                );
            }
        }
        let mut workers = Workers::start(self, shutdown.clone());
        if !self.config.queues.is_empty() {
            let scheduler = cron::schedule(Arc::clone(self), shutdown);
            workers.tasks.push(tokio::spawn(scheduler));
        }
        workers
    }
}

/// The start of a periodic kind's unique keys.
fn periodic_prefix(kind: &str) -> String {
    format!("every:{kind}:")
}

/// A kind or queue name: 1 to [`MAX_NAME`] bytes of ASCII letters, digits, `.`, `_` and `-`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A unique or concurrency key: 1 to [`MAX_NAME`] bytes without control characters.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_NAME && !key.chars().any(char::is_control)
}
