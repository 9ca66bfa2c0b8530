//! Storage of cron schedules: what each enqueues, when it ticks next, and the claim of a tick.
//!
//! A schedule's `next_tick_at` is the one fact nodes share about its ticks. A node that finds
//! it due claims it with a compare-and-set that moves it on (`UPDATE … WHERE next_tick_at =
//! <the tick it read>`), and enqueues the tick's job in the same transaction: of several nodes
//! that saw the same tick, exactly one moves it and enqueues, and the others change nothing.
//! The job's unique key (`cron:<name>:<tick>`) absorbs a second enqueue of one tick even so.
//!
//! The store knows no cron syntax and no JSON: the jobs service checks expressions, time zones
//! and payloads, and computes the ticks.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::StoreError;
use crate::jobs::{Enqueued, NewJob};

/// What a node does with the ticks of a schedule that passed while no node ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CatchUp {
    /// Enqueue one job, for the latest tick missed, then go on from the next tick to come.
    Once,
    /// Enqueue nothing for the missed ticks; go on from the next tick to come.
    Skip,
}

impl CatchUp {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Once => "once",
            Self::Skip => "skip",
        }
    }

    /// Reads a stored or requested name.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Once, Self::Skip]
            .into_iter()
            .find(|c| c.as_str() == text)
    }
}

/// A schedule to store, as the jobs service checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCronSchedule {
    /// Its name, unique.
    pub name: String,
    /// The five-field cron expression.
    pub expression: String,
    /// The IANA time zone its expression is read in.
    pub time_zone: String,
    /// The job kind each tick enqueues.
    pub kind: String,
    /// The payload of each tick's job, as the jobs service encoded it.
    pub payload: String,
    /// What to do with ticks missed while no node ran it.
    pub catch_up: CatchUp,
    /// Whether it ticks at all.
    pub enabled: bool,
    /// Its first tick after now, used unless the stored schedule keeps its own (see
    /// [`CronStore::put_cron_schedule`]).
    pub next_tick_at: DateTime<Utc>,
    /// When it is written.
    pub now: DateTime<Utc>,
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    /// Its name.
    pub name: String,
    /// The five-field cron expression.
    pub expression: String,
    /// The IANA time zone its expression is read in.
    pub time_zone: String,
    /// The job kind each tick enqueues.
    pub kind: String,
    /// The payload of each tick's job.
    pub payload: String,
    /// What to do with ticks missed while no node ran it.
    pub catch_up: CatchUp,
    /// Whether it ticks at all.
    pub enabled: bool,
    /// The tick to run next.
    pub next_tick_at: DateTime<Utc>,
    /// The tick whose job was enqueued last, if any.
    pub last_tick_at: Option<DateTime<Utc>>,
    /// When it was first stored.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// What [`CronStore::claim_cron_tick`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickClaim {
    /// Another node moved the schedule on first (or it was changed, disabled or deleted):
    /// nothing changed.
    Lost,
    /// The schedule moved on, and no job was asked for (a skipped catch-up).
    Moved,
    /// The schedule moved on and the tick's job was enqueued (or, `Existing`, was there
    /// already); boxed, as a job record is large beside the other answers.
    Enqueued(Box<Enqueued>),
}

/// The cron schedules.
#[async_trait]
pub trait CronStore {
    /// Stores `schedule`, replacing the one of the same name; answers it as stored and whether
    /// it is new. A replaced schedule that was enabled and keeps its expression and time zone
    /// keeps its `next_tick_at`, so that storing the same schedule again (every start, for
    /// those from the configuration) loses no tick that is due; otherwise it starts from
    /// `schedule.next_tick_at`. `updated_at` changes only if something else does.
    async fn put_cron_schedule(
        &self,
        schedule: &NewCronSchedule,
    ) -> Result<(CronSchedule, bool), StoreError>;

    /// Every schedule, by name.
    async fn cron_schedules(&self) -> Result<Vec<CronSchedule>, StoreError>;

    /// The schedule `name`; `NotFound` if there is none.
    async fn cron_schedule(&self, name: &str) -> Result<CronSchedule, StoreError>;

    /// Deletes the schedule `name` (the jobs it enqueued stay); `NotFound` if there is none.
    async fn delete_cron_schedule(&self, name: &str) -> Result<(), StoreError>;

    /// Claims the tick `due` of the enabled schedule `name`: moves its `next_tick_at` from
    /// `due` to `next`, only if it is still `due`, and in the same transaction enqueues `job`
    /// (the job of tick `ran`, which the schedule then records as its last), if given. Of
    /// several nodes claiming one tick, one gets `Moved` or `Enqueued` and the others `Lost`.
    async fn claim_cron_tick(
        &self,
        name: &str,
        due: DateTime<Utc>,
        next: DateTime<Utc>,
        job: Option<(DateTime<Utc>, &NewJob)>,
    ) -> Result<TickClaim, StoreError>;
}

/// Reads a stored catch-up policy back.
pub(crate) fn stored_catch_up(text: &str) -> Result<CatchUp, StoreError> {
    CatchUp::parse(text)
        .ok_or_else(|| StoreError::Other(format!("stored catch-up policy {text:?}").into()))
}
