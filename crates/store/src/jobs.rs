//! Storage of background jobs: the durable queue, its attempts and their outcomes.
//!
//! A job moves through the states River names: `scheduled` (its `run_at` is later) or
//! `available` → `running` (claimed, with a lease its worker renews) → `completed`, or
//! `retryable` (waits for its next `run_at`) and again `running`, or `discarded` (attempts used
//! up, or a permanent error: the dead-letter state), or `cancelled`. Claiming is one statement
//! that moves a batch to `running` (`FOR UPDATE SKIP LOCKED` on PostgreSQL, in a `BEGIN
//! IMMEDIATE` transaction on SQLite), so no job is ever claimed twice at once.
//!
//! On PostgreSQL an enqueue of a job due now also sends `NOTIFY unhidra_jobs, '<queue>'` after
//! it commits, and [`JobStore::job_wakeups`] listens for them, so that every node's worker of
//! that queue looks at once rather than at its next poll. A notification is a hint only: one
//! lost (a listener reconnecting) delays the job until a worker polls.
//!
//! The store knows no JSON: a payload is the text the jobs service wrote.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::StoreError;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for its `run_at`, which is in the future.
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Claimed by a worker, under a lease.
    Running,
    /// Failed an attempt; waits for its next `run_at`.
    Retryable,
    /// Done.
    Completed,
    /// Given up: attempts used up, or a permanent error (the dead-letter state).
    Discarded,
    /// Cancelled before it completed.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [Self; 7] = [
        Self::Scheduled,
        Self::Available,
        Self::Running,
        Self::Retryable,
        Self::Completed,
        Self::Discarded,
        Self::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Available => "available",
            Self::Running => "running",
            Self::Retryable => "retryable",
            Self::Completed => "completed",
            Self::Discarded => "discarded",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a stored or requested name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether a job in this state is finished for good (it is only ever pruned, or
    /// requeued by an operator).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Discarded | Self::Cancelled)
    }

    /// This state's bit in a [`UniqueStates`] mask.
    pub fn bit(self) -> i64 {
        1 << (self as u8)
    }
}

/// The states in which a job's `unique_key` counts: while a job with the key is in one of them,
/// enqueueing another job with the same key returns the existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqueStates(pub i64);

impl UniqueStates {
    /// River's default: every state but `discarded` and `cancelled` (a completed job keeps its
    /// key until it is pruned).
    pub const DEFAULT: Self = Self::of(&[
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
    ]);

    /// Until the job finishes: a second job with the key may be enqueued once the first one
    /// completed, was discarded or cancelled.
    pub const UNFINISHED: Self = Self::of(&[
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
    ]);

    /// The mask of `states`.
    pub const fn of(states: &[JobState]) -> Self {
        let mut mask = 0;
        let mut i = 0;
        while i < states.len() {
            mask |= 1 << (states[i] as u8);
            i += 1;
        }
        Self(mask)
    }

    /// Whether the key counts in `state`.
    pub fn contains(self, state: JobState) -> bool {
        self.0 & state.bit() != 0
    }

    /// Whether a job with a unique key may have this mask: it holds every state before the job
    /// finishes ([`Self::UNFINISHED`]), so a key stops counting only when its job finishes, and
    /// no move between waiting and running can find the key taken.
    pub fn is_storable(self) -> bool {
        self.0 & Self::UNFINISHED.0 == Self::UNFINISHED.0
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// Its id, chosen by the caller (a UUID v7 sorts by creation).
    pub id: Uuid,
    /// The handler that runs it.
    pub kind: String,
    /// The queue whose workers run it.
    pub queue: String,
    /// The handler's input, as the jobs service encoded it.
    pub payload: String,
    /// Smaller runs first among the jobs due.
    pub priority: i16,
    /// When it may run first; in the future, the job starts `scheduled`.
    pub run_at: DateTime<Utc>,
    /// Attempts before it is discarded (at least 1).
    pub max_attempts: i32,
    /// How long one attempt may run, in milliseconds.
    pub timeout_ms: i64,
    /// At most one job with this key in the states of `unique_states`.
    pub unique_key: Option<String>,
    /// Where `unique_key` counts.
    pub unique_states: UniqueStates,
    /// Jobs sharing this key run at most `concurrency_limit` at once, across every node.
    pub concurrency_key: Option<String>,
    /// How many jobs of `concurrency_key` may run at once (ignored without a key).
    pub concurrency_limit: i32,
    /// The trace id of the request that enqueued it, for its logs.
    pub trace_id: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Its id.
    pub id: Uuid,
    /// The handler that runs it.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// The handler's input.
    pub payload: String,
    /// Smaller runs first.
    pub priority: i16,
    /// Where it is in its life.
    pub state: JobState,
    /// When it may run (next).
    pub run_at: DateTime<Utc>,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts before it is discarded.
    pub max_attempts: i32,
    /// How long one attempt may run, in milliseconds.
    pub timeout_ms: i64,
    /// Its unique key, if any.
    pub unique_key: Option<String>,
    /// Where its unique key counts.
    pub unique_states: UniqueStates,
    /// Its concurrency key, if any.
    pub concurrency_key: Option<String>,
    /// How many jobs of its concurrency key may run at once.
    pub concurrency_limit: i32,
    /// The worker holding it while `running`.
    pub leased_by: Option<String>,
    /// Until when that worker's lease lasts.
    pub lease_until: Option<DateTime<Utc>>,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
    /// A cancellation was asked for while it ran: the handler should stop.
    pub cancel_requested: bool,
    /// The trace id of the request that enqueued it.
    pub trace_id: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The handler succeeded.
    Completed,
    /// The handler failed; the job will be retried.
    Retried,
    /// The handler failed for good, or the last attempt failed: the job is discarded.
    Discarded,
    /// The attempt ran past its timeout.
    TimedOut,
    /// The worker's lease ran out (its node died or stalled); the attempt counts.
    LeaseLost,
    /// The job was cancelled while it ran.
    Cancelled,
}

impl AttemptOutcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Retried => "retried",
            Self::Discarded => "discarded",
            Self::TimedOut => "timed_out",
            Self::LeaseLost => "lease_lost",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Completed,
            Self::Retried,
            Self::Discarded,
            Self::TimedOut,
            Self::LeaseLost,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// One attempt of a job, as kept in its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Which attempt (1 for the first).
    pub attempt: i32,
    /// The worker that ran it.
    pub worker: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// Its error, if it failed.
    pub error: Option<String>,
}

/// What a worker reports when an attempt ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Succeeded: the job is `completed`.
    Completed,
    /// Failed: the job is `retryable` again at `retry_at` (the service decided it has attempts
    /// left).
    Retry {
        /// The error, as the log shows it.
        error: String,
        /// When to try again.
        retry_at: DateTime<Utc>,
        /// How the attempt ended (`Retried` or `TimedOut`).
        outcome: AttemptOutcome,
    },
    /// Failed for good: the job is `discarded`.
    Discard {
        /// The error.
        error: String,
        /// How the attempt ended (`Discarded` or `TimedOut`).
        outcome: AttemptOutcome,
    },
    /// The handler stopped after a cancellation: the job is `cancelled`.
    Cancelled,
    /// Never started (a dependency it needs is down, or the worker claimed it ahead and is
    /// stopping): the job waits again until `run_at`, as if it had not been claimed — its
    /// attempt is not counted and leaves no history — `available` if that has come and it has
    /// had no attempt, else `scheduled` (first attempt) or `retryable`. Its last error stays
    /// that of its last real attempt; `reason`, if any, becomes the last error of a job that
    /// has none, for operators. `cancelled` instead if that was asked for.
    Release {
        /// Why it waits, if operators should see it.
        reason: Option<String>,
        /// When it is due again.
        run_at: DateTime<Utc>,
    },
}

/// An attempt's end, for [`JobStore::finish_jobs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The job.
    pub id: Uuid,
    /// The attempt that ended (a report for an older attempt, or from a worker that lost the
    /// lease, changes nothing).
    pub attempt: i32,
    /// The worker that ran it.
    pub worker: String,
    /// When the attempt started.
    pub started_at: DateTime<Utc>,
    /// How it ended.
    pub finish: Finish,
}

/// The claim that [`JobStore::finish_and_claim`] makes after recording ends: what
/// [`JobStore::claim_jobs`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim<'a> {
    /// The queue.
    pub queue: &'a str,
    /// At most this many jobs (0: none).
    pub limit: u32,
    /// The worker whose lease they are under.
    pub worker: &'a str,
    /// Until when.
    pub lease_until: DateTime<Utc>,
}

/// Which jobs an admin listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only jobs whose kind, unique key or last error contains this text (case-insensitive).
    pub text: Option<String>,
}

/// How many jobs there are in a state of a kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCount {
    /// The kind.
    pub kind: String,
    /// The state.
    pub state: JobState,
    /// How many.
    pub count: i64,
}

/// What [`JobStore::enqueue_job`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// The job was stored.
    New(JobRecord),
    /// A job with the same unique key exists in a state where the key counts: this one.
    Existing(JobRecord),
}

/// A hint from the store that work is due, enqueued on any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobWakeup {
    /// A job due now was enqueued in this queue.
    Queue(String),
    /// Hints may have been missed (the listener just connected or reconnected, or more queues
    /// waited than it keeps apart): every queue should look.
    All,
}

/// The PostgreSQL channel of [`JobWakeup`]s; a notification's payload is the queue.
pub(crate) const WAKEUP_CHANNEL: &str = "unhidra_jobs";

/// Wake-ups a listener holds while its receiver is busy, before it sends [`JobWakeup::All`]
/// instead of each queue.
pub(crate) const MAX_PENDING_QUEUES: usize = 64;

/// The wake-ups heard but not yet handed on, coalesced: a queue at most once, however many
/// notifications name it, and everything at once past [`MAX_PENDING_QUEUES`]. So a flood of
/// notifications costs at most that much memory.
#[derive(Debug, Default)]
pub(crate) struct PendingWakeups {
    queues: BTreeSet<String>,
    all: bool,
}

impl PendingWakeups {
    /// Remembers a wake-up.
    pub(crate) fn add(&mut self, wakeup: JobWakeup) {
        match wakeup {
            JobWakeup::Queue(_) if self.all => {}
            JobWakeup::Queue(queue) if self.queues.len() < MAX_PENDING_QUEUES => {
                self.queues.insert(queue);
            }
            JobWakeup::Queue(_) | JobWakeup::All => {
                self.queues.clear();
                self.all = true;
            }
        }
    }

    /// Whether a wake-up waits.
    pub(crate) fn is_empty(&self) -> bool {
        !self.all && self.queues.is_empty()
    }

    /// The next wake-up to hand on.
    pub(crate) fn take(&mut self) -> Option<JobWakeup> {
        if std::mem::take(&mut self.all) {
            return Some(JobWakeup::All);
        }
        self.queues.pop_first().map(JobWakeup::Queue)
    }
}

/// The durable job queue.
#[async_trait]
pub trait JobStore {
    /// Where this node hears of jobs enqueued on any node, if the engine can tell: on
    /// PostgreSQL, a task listening for the enqueues' notifications (reconnecting with backoff
    /// when the connection drops, and holding one connection of the pool meanwhile), which
    /// stops once the receiver is dropped or the store closed. `None` on SQLite, where every
    /// enqueue happens on this node. Must be called within a Tokio runtime.
    fn job_wakeups(&self) -> Option<mpsc::Receiver<JobWakeup>>;

    /// Whether transactions that claim jobs (and record ends) run at once without waiting for
    /// each other: on PostgreSQL, which locks the rows they take one by one; not on SQLite, where
    /// one writer has the database at a time.
    fn concurrent_claims(&self) -> bool;

    /// Stores `job`, unless a job with its unique key exists in a state where the key counts.
    /// `Invalid` for a unique key whose states are not [`UniqueStates::is_storable`].
    async fn enqueue_job(&self, job: &NewJob) -> Result<Enqueued, StoreError>;

    /// Stores `jobs` as [`Self::enqueue_job`] does each, in one transaction (a multi-row INSERT
    /// per few hundred jobs, and one notification per queue): answers what it did with each,
    /// in the order given. Nothing is stored if one is refused.
    async fn enqueue_jobs(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>, StoreError>;

    /// Moves up to `limit` jobs of `queue` that are due at `now` (`available`, or `scheduled`
    /// and `retryable` ones whose `run_at` has come), best priority first, then oldest `run_at`,
    /// to `running` under `worker`'s lease until `lease_until`, counting the attempt. A job
    /// with a concurrency key is claimed only while fewer than its limit run, across every
    /// node. No job is claimed by two workers at once.
    async fn claim_jobs(
        &self,
        queue: &str,
        limit: u32,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<JobRecord>, StoreError>;

    /// Extends `worker`'s leases on the jobs `ids` it still runs to `lease_until`; answers the
    /// ids whose lease it still holds, and whether each has a cancellation asked for.
    async fn renew_leases(
        &self,
        worker: &str,
        ids: &[Uuid],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, bool)>, StoreError>;

    /// Records the end of attempts, each with its history entry, in one transaction. An end
    /// reported for a job that is no longer `running` under that worker and attempt (its lease
    /// ran out and another worker took it) is ignored. Answers the jobs whose end was recorded,
    /// as stored after it (a `Retry` of a job whose cancellation was asked for makes it
    /// `cancelled`), in the order given.
    async fn finish_jobs(
        &self,
        finished: &[Finished],
        now: DateTime<Utc>,
    ) -> Result<Vec<JobRecord>, StoreError>;

    /// [`Self::finish_jobs`] then, if `claim` asks for jobs, [`Self::claim_jobs`] at `now`, in
    /// one transaction where the engine allows (one commit for both; a claim that frees no
    /// slot of a concurrency key sees the slots the ends freed): answers the jobs whose end was
    /// recorded and the jobs claimed.
    async fn finish_and_claim(
        &self,
        finished: &[Finished],
        claim: Option<Claim<'_>>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<JobRecord>, Vec<JobRecord>), StoreError>;

    /// Jobs `running` whose lease ended before `now` (their worker died or stalled): each
    /// attempt is recorded as `lease_lost` and the job is `retryable` at `now` if it has
    /// attempts left, else `discarded` (`cancelled` if that was asked for). Answers how many
    /// were rescued, per kind (none: empty).
    async fn rescue_expired_leases(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, u64)>, StoreError>;

    /// Cancels a job: one not yet running becomes `cancelled`; a running one is marked, and
    /// its worker stops it at its next lease renewal. `NotFound` for no such job; a finished
    /// job is answered unchanged.
    async fn cancel_job(&self, id: Uuid, now: DateTime<Utc>) -> Result<JobRecord, StoreError>;

    /// Puts a `discarded` or `cancelled` job back to `available` at `now` with its attempts
    /// reset. `NotFound` for no such job; a job in another state is answered unchanged;
    /// `Conflict` if another job holds its unique key now.
    async fn retry_job(&self, id: Uuid, now: DateTime<Utc>) -> Result<JobRecord, StoreError>;

    /// Puts every `discarded` job matching `kind` (all kinds if `None`) back to `available`,
    /// but for one whose unique key another job holds now; answers how many.
    async fn requeue_discarded(
        &self,
        kind: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Deletes every `discarded` job matching `kind` (all kinds if `None`); answers how many.
    async fn purge_discarded(&self, kind: Option<&str>) -> Result<u64, StoreError>;

    /// A job with its attempts, oldest first (after a retry its attempts count from 1 again).
    /// `NotFound` for no such job.
    async fn job(&self, id: Uuid) -> Result<(JobRecord, Vec<AttemptRecord>), StoreError>;

    /// Jobs matching `filter`, newest first, `limit` from `offset`.
    async fn list_jobs(
        &self,
        filter: &JobFilter,
        limit: u32,
        offset: u64,
    ) -> Result<Vec<JobRecord>, StoreError>;

    /// How many jobs match `filter`: the total of [`Self::list_jobs`]' pages.
    async fn count_jobs(&self, filter: &JobFilter) -> Result<u64, StoreError>;

    /// Counts per kind and state, and when the oldest `available` job (or due `scheduled` or
    /// `retryable` one) became due, if any.
    async fn job_stats(
        &self,
        now: DateTime<Utc>,
    ) -> Result<(Vec<JobCount>, Option<DateTime<Utc>>), StoreError>;

    /// Deletes jobs that reached a final state before `before`, with their attempts, at most
    /// `limit` at a time; answers how many.
    async fn prune_jobs(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;
}

/// The state a new job starts in.
pub(crate) fn initial_state(job: &NewJob) -> JobState {
    if job.run_at > job.created_at {
        JobState::Scheduled
    } else {
        JobState::Available
    }
}

/// Reads a stored state back.
pub(crate) fn stored_state(text: &str) -> Result<JobState, StoreError> {
    JobState::parse(text)
        .ok_or_else(|| StoreError::Other(format!("stored job state {text:?}").into()))
}

/// Reads a stored attempt outcome back.
pub(crate) fn stored_outcome(text: &str) -> Result<AttemptOutcome, StoreError> {
    AttemptOutcome::parse(text)
        .ok_or_else(|| StoreError::Other(format!("stored attempt outcome {text:?}").into()))
}

/// What a reported end stores: the state (before a cancellation overrides a retry), the
/// attempt's outcome and error, and the next `run_at`.
pub(crate) fn finish_parts(
    finish: &Finish,
) -> (
    JobState,
    AttemptOutcome,
    Option<&str>,
    Option<DateTime<Utc>>,
) {
    match finish {
        Finish::Completed => (JobState::Completed, AttemptOutcome::Completed, None, None),
        Finish::Retry {
            error,
            retry_at,
            outcome,
        } => (JobState::Retryable, *outcome, Some(error), Some(*retry_at)),
        Finish::Discard { error, outcome } => (JobState::Discarded, *outcome, Some(error), None),
        Finish::Cancelled => (JobState::Cancelled, AttemptOutcome::Cancelled, None, None),
        // Stored by its own statement (see `finish_jobs`); the state is the one before a claim.
        Finish::Release { reason, run_at } => (
            JobState::Scheduled,
            AttemptOutcome::Retried,
            reason.as_deref(),
            Some(*run_at),
        ),
    }
}

/// The advisory lock that serialises claims of one concurrency key on PostgreSQL: FNV-1a of
/// the key, computed here rather than by the server so that every node sorts the locks of a
/// batch the same way (taken in that order, they cannot deadlock), and stable across builds
/// (std's hasher is not) so that nodes of two versions agree during a rolling upgrade.
pub(crate) fn concurrency_lock_id(key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"unhidra.jobs.concurrency:".iter().chain(key.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_be_bytes(hash.to_be_bytes())
}

/// Whether a claimed batch keeps every concurrency limit, given how many jobs of each of its
/// keys run now (the batch's own included): the claim's rule again, with a fresh count. The
/// jobs of a key in the batch are ranked as the claim ranks them; the n-th may run only while
/// fewer than its limit run besides it and the n − 1 before it.
pub(crate) fn within_limits(batch: &[JobRecord], running: &[(String, i64)]) -> bool {
    let mut keyed: Vec<&JobRecord> = batch
        .iter()
        .filter(|j| j.concurrency_key.is_some())
        .collect();
    keyed.sort_by(|a, b| {
        (&a.concurrency_key, a.priority, a.run_at, a.id).cmp(&(
            &b.concurrency_key,
            b.priority,
            b.run_at,
            b.id,
        ))
    });
    let mut rank = 0_i64;
    let mut previous: Option<&str> = None;
    keyed.iter().all(|job| {
        let key = job.concurrency_key.as_deref().unwrap_or_default();
        rank = if previous == Some(key) { rank + 1 } else { 1 };
        previous = Some(key);
        let ours = batch
            .iter()
            .filter(|j| j.concurrency_key.as_deref() == Some(key))
            .count();
        let all = running
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0, |(_, n)| *n);
        let others = all - i64::try_from(ours).unwrap_or(i64::MAX);
        others + rank <= i64::from(job.concurrency_limit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str, priority: i16, limit: i32) -> JobRecord {
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        JobRecord {
            id: Uuid::new_v4(),
            kind: "k".into(),
            queue: "q".into(),
            payload: String::new(),
            priority,
            state: JobState::Running,
            run_at: t,
            attempt: 1,
            max_attempts: 3,
            timeout_ms: 1000,
            unique_key: None,
            unique_states: UniqueStates::DEFAULT,
            concurrency_key: Some(key.into()),
            concurrency_limit: limit,
            leased_by: Some("w".into()),
            lease_until: Some(t),
            last_error: None,
            cancel_requested: false,
            trace_id: None,
            created_at: t,
            finished_at: None,
        }
    }

    #[test]
    fn a_batch_keeps_its_limits_only_with_the_others_running() {
        let batch = [keyed("a", 0, 2), keyed("a", 1, 2), keyed("b", 0, 1)];
        let counts = |a: i64, b: i64| vec![("a".to_owned(), a), ("b".to_owned(), b)];
        assert!(within_limits(&batch, &counts(2, 1)));
        // Another node's job of `a` runs as well: three of a limit of two.
        assert!(!within_limits(&batch, &counts(3, 1)));
        assert!(!within_limits(&batch, &counts(2, 2)));
        // A job's own limit counts: the second of `a` may not run beside one other.
        let mixed = [keyed("a", 0, 5), keyed("a", 1, 1)];
        assert!(!within_limits(&mixed, &[("a".to_owned(), 2)]));
        let mixed = [keyed("a", 0, 1), keyed("a", 1, 5)];
        assert!(within_limits(&mixed, &[("a".to_owned(), 2)]));
    }

    #[test]
    fn lock_ids_are_stable() {
        assert_eq!(concurrency_lock_id("a"), concurrency_lock_id("a"));
        assert_ne!(concurrency_lock_id("a"), concurrency_lock_id("b"));
    }

    #[test]
    fn pending_wakeups_coalesce_per_queue_and_stay_bounded() {
        let mut pending = PendingWakeups::default();
        assert!(pending.is_empty());
        for _ in 0..1000 {
            pending.add(JobWakeup::Queue("a".into()));
            pending.add(JobWakeup::Queue("b".into()));
        }
        assert_eq!(pending.take(), Some(JobWakeup::Queue("a".into())));
        assert_eq!(pending.take(), Some(JobWakeup::Queue("b".into())));
        assert_eq!(pending.take(), None);
        // Past the bound, one wake-up of everything replaces the queues.
        for n in 0..=MAX_PENDING_QUEUES {
            pending.add(JobWakeup::Queue(format!("q{n}")));
        }
        pending.add(JobWakeup::Queue("late".into()));
        assert_eq!(pending.take(), Some(JobWakeup::All));
        assert!(pending.is_empty());
    }

    #[test]
    fn masks_without_a_waiting_state_are_refused() {
        assert!(UniqueStates::DEFAULT.is_storable());
        assert!(UniqueStates::UNFINISHED.is_storable());
        assert!(!UniqueStates::of(&[JobState::Running]).is_storable());
        assert!(!UniqueStates(0).is_storable());
    }
}
