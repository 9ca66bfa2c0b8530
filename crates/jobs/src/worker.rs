//! The workers of one node: per queue, a loop that claims due jobs in batches — ahead of its
//! free slots while attempts are short, so that a slot that frees starts the next job at once —
//! runs each attempt in a task of its own under the job's timeout, renews the leases of what
//! runs and waits, and records the attempts that ended in batches, in the same store call and
//! transaction as its next claim; and one maintenance loop that rescues jobs whose lease ran
//! out and prunes finished ones.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;
use unhidra_store::StoreError;
use unhidra_store::jobs::{AttemptOutcome, Claim, Finish, Finished, JobRecord, JobWakeup};
use uuid::Uuid;

use crate::breaker::{Admission, Breaker, Pass};
use crate::{JobContext, JobError, Jobs, JobsMetrics};

/// How long a worker waits before it tries again to record ended attempts the store refused.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Finished jobs deleted per statement when pruning.
const PRUNE_BATCH: u32 = 1000;
/// How often finished jobs past the retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// This node's running workers.
#[derive(Debug)]
pub struct Workers {
    pub(crate) tasks: Vec<JoinHandle<()>>,
}

impl Workers {
    pub(crate) fn start(jobs: &Arc<Jobs>, shutdown: watch::Receiver<bool>) -> Self {
        let mut tasks = Vec::new();
        for (queue, concurrency) in jobs.config.queues.clone() {
            let worker = QueueWorker::new(Arc::clone(jobs), queue, concurrency.max(1));
            tasks.push(tokio::spawn(worker.run(shutdown.clone())));
        }
        if !jobs.config.queues.is_empty() {
            if let Some(wakeups) = jobs.store.job_wakeups() {
                tasks.push(tokio::spawn(relay_wakeups(
                    Arc::clone(jobs),
                    wakeups,
                    shutdown.clone(),
                )));
            }
            tasks.push(tokio::spawn(maintain(Arc::clone(jobs), shutdown)));
        }
        Self { tasks }
    }

    /// Waits until every worker has stopped (after the shutdown signal, once the attempts in
    /// flight ended).
    pub async fn stopped(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a job worker ended abnormally");
            }
        }
    }
}

/// An attempt in flight.
#[derive(Debug)]
struct Running {
    /// Which attempt of its job.
    attempt: i32,
    /// Until when this worker's lease is known to last (the last claim or renewal).
    lease_until: DateTime<Utc>,
    cancel: watch::Sender<bool>,
    task: AbortHandle,
}

/// A job claimed ahead of a free slot: it waits here, under this worker's lease (renewed with
/// the others), until a slot frees.
#[derive(Debug)]
struct Ready {
    job: JobRecord,
    /// Until when this worker's lease is known to last.
    lease_until: DateTime<Utc>,
    /// When it was claimed.
    since: Instant,
}

/// What an attempt's task reports when it ends.
#[derive(Debug)]
struct Done {
    finished: Finished,
    /// How long it ran.
    ran: Duration,
}

/// What a [`Cycle`] answers: the jobs whose end was recorded, and those claimed.
type Landed = Result<(Vec<JobRecord>, Vec<JobRecord>), StoreError>;

/// A store call of a worker in flight: it records `ends` and claims up to `limit`, in one
/// transaction, while the worker starts jobs claimed before.
#[derive(Debug)]
struct Cycle {
    ends: Vec<Finished>,
    limit: u32,
}

/// The longest error text kept for an attempt, in bytes.
const MAX_ERROR: usize = 4096;

/// How soon a failed lease renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// The longest a job claimed ahead waits for a slot before it is handed back to the queue
/// (where another node may take it), unstarted and its attempt not counted. A worker claims
/// ahead only as many jobs as its slots should start within half of it, judging by how long
/// attempts took lately: many while they are short (then a claim's round trip is a large share
/// of an attempt, and a slot that frees starts the next job without waiting for it), none once
/// they take a good part of it.
const HOLD_AHEAD: Duration = Duration::from_millis(250);

/// The most jobs a worker claims ahead of its free slots, as a multiple of its concurrency, and
/// in all.
const MAX_AHEAD: u32 = 16;
const MAX_AHEAD_JOBS: u32 = 1000;

/// The weight of the last attempt in the moving average of attempts' run time.
const RUN_WEIGHT: f64 = 0.2;

/// The worker of one queue on this node.
#[derive(Debug)]
struct QueueWorker {
    jobs: Arc<Jobs>,
    queue: String,
    concurrency: u32,
    /// The name in leases and attempts: this node and the queue.
    name: String,
    running: HashMap<Uuid, Running>,
    /// Claimed ahead, best last (the next to start is popped).
    ready: Vec<Ready>,
    /// Ended attempts (and jobs handed back) not yet recorded.
    ended: Vec<Finished>,
    /// The store calls in flight, by task.
    in_flight: HashMap<tokio::task::Id, Cycle>,
    cycles: JoinSet<Landed>,
    /// How many store calls may be in flight: two where the store's claims do not wait for
    /// each other (one runs while the worker starts what the other claimed), else one.
    max_cycles: usize,
    /// More jobs may be due: the last claim was full, or a wake-up or the poll came since.
    more_due: bool,
    /// The store was unavailable: no call before this.
    retry_at: Option<Instant>,
    /// When the store was last asked for jobs: the poll comes `poll_interval` after it, however
    /// often other events (renewals, ends) wake the loop meanwhile.
    claimed_at: Instant,
    /// The moving average of attempts' run time, in seconds.
    typical_run: f64,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl QueueWorker {
    fn new(jobs: Arc<Jobs>, queue: String, concurrency: u32) -> Self {
        let name = format!("{}/{queue}", jobs.config.node);
        let max_cycles = if jobs.store.concurrent_claims() { 2 } else { 1 };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            jobs,
            queue,
            concurrency,
            name,
            running: HashMap::new(),
            ready: Vec::new(),
            ended: Vec::new(),
            in_flight: HashMap::new(),
            cycles: JoinSet::new(),
            max_cycles,
            more_due: true,
            retry_at: None,
            claimed_at: Instant::now(),
            typical_run: 0.0,
            done_tx,
            done_rx,
        }
    }

    /// The loop: each turn starts what waits for a free slot, sends the ends and a claim to the
    /// store when no call is in flight, and waits for an attempt to end, the call to land, a
    /// wake-up, the renewal of leases, the poll or the shutdown. On shutdown it claims no more,
    /// hands back what it claimed ahead, and stops once the attempts in flight ended and every
    /// end is recorded.
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let config = self.jobs.config.clone();
        let wake = self.jobs.wake.get(&self.queue).cloned().unwrap_or_default();
        let mut renew = tokio::time::interval((config.lease / 3).max(Duration::from_millis(10)));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = *shutdown.borrow();
        tracing::debug!(queue = %self.queue, worker = %self.name, "job worker started");
        loop {
            while let Ok(done) = self.done_rx.try_recv() {
                self.ended(done);
            }
            let now = Instant::now();
            if stopping {
                self.hand_back(|_| true);
            } else {
                self.hand_back_stale(now);
                self.start_ready();
            }
            if self.in_flight.len() < self.max_cycles && self.retry_at.is_none_or(|at| at <= now) {
                self.retry_at = None;
                self.launch(stopping);
            }
            if stopping
                && self.running.is_empty()
                && self.ended.is_empty()
                && self.ready.is_empty()
                && self.in_flight.is_empty()
            {
                break;
            }
            let pause = self.pause(config.poll_interval, now);
            tokio::select! {
                Some(landed) = self.cycles.join_next_with_id(), if !self.in_flight.is_empty() => {
                    self.landed(landed).await;
                }
                Some(done) = self.done_rx.recv() => self.ended(done),
                () = wake.notified(), if !stopping => self.more_due = true,
                _ = renew.tick() => {
                    if !self.renew().await {
                        renew.reset_after(RENEW_RETRY.min(config.lease / 3));
                    }
                }
                () = tokio::time::sleep_until(pause) => self.more_due = true,
                _ = shutdown.changed(), if !stopping => stopping = true,
            }
        }
        tracing::debug!(queue = %self.queue, worker = %self.name, "job worker stopped");
    }

    /// When the loop looks again without an event: at the poll, when the store may be asked
    /// again, or when the job claimed ahead longest ago has waited [`HOLD_AHEAD`].
    fn pause(&self, poll: Duration, now: Instant) -> Instant {
        let mut at = self.retry_at.unwrap_or(self.claimed_at + poll).max(now);
        if let Some(oldest) = self.ready.iter().map(|r| r.since).min() {
            at = at.min(oldest + HOLD_AHEAD);
        }
        at
    }

    fn ended(&mut self, done: Done) {
        let ended = done.finished;
        // Only the attempt that ended: the store may have given this worker the job again
        // (a lost lease), and the newer attempt keeps its place.
        if self
            .running
            .get(&ended.id)
            .is_some_and(|r| r.attempt == ended.attempt)
        {
            self.running.remove(&ended.id);
        }
        self.typical_run += RUN_WEIGHT * (done.ran.as_secs_f64() - self.typical_run);
        self.ended.push(ended);
    }

    /// How many jobs to hold claimed ahead of the free slots: as many as the slots should start
    /// within half of [`HOLD_AHEAD`] at the recent attempts' pace, at most [`MAX_AHEAD`] times
    /// the concurrency and [`MAX_AHEAD_JOBS`].
    fn ahead(&self) -> u32 {
        let most = self
            .concurrency
            .saturating_mul(MAX_AHEAD)
            .min(MAX_AHEAD_JOBS);
        let pace = HOLD_AHEAD.as_secs_f64() / 2.0 / self.typical_run.max(1e-9);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a non-negative count clamped to a u32 first"
        )]
        let ahead = (f64::from(self.concurrency) * pace).min(f64::from(most)) as u32;
        ahead
    }

    /// Sends the ends not yet recorded and, unless stopping, a claim for the free slots and
    /// those ahead of them to the store, in a task of its own, if there is anything to ask.
    /// While more than a quarter of what it holds ahead still waits, it waits too, so that each
    /// call records and claims many jobs at once (the ends wait a fraction of [`HOLD_AHEAD`] at
    /// most, under their leases).
    fn launch(&mut self, stopping: bool) {
        let ahead = if stopping { 0 } else { self.ahead() };
        let pending: u32 = self.in_flight.values().map(|c| c.limit).sum();
        if !stopping {
            let low = usize::try_from(ahead / 4).unwrap_or(usize::MAX);
            if self.in_flight.is_empty() {
                // Not while plenty waits here: each call then carries many jobs.
                if self.ready.len() > low {
                    return;
                }
            } else {
                // A second call for enough ends to be worth a transaction, or to refill.
                let enough = usize::try_from(self.concurrency)
                    .unwrap_or(usize::MAX)
                    .max(low);
                let refill =
                    self.ready.len() + usize::try_from(pending).unwrap_or(usize::MAX) <= low;
                if self.ended.len() < enough && !refill {
                    return;
                }
            }
        }
        let held = u32::try_from(self.running.len() + self.ready.len())
            .unwrap_or(u32::MAX)
            .saturating_add(pending);
        let limit = if stopping || (!self.more_due && self.ended.is_empty()) {
            0
        } else {
            self.concurrency.saturating_add(ahead).saturating_sub(held)
        };
        if self.ended.is_empty() && limit == 0 {
            return;
        }
        if limit > 0 {
            self.claimed_at = Instant::now();
        }
        let ends = std::mem::take(&mut self.ended);
        let jobs = Arc::clone(&self.jobs);
        let queue = self.queue.clone();
        let worker = self.name.clone();
        let sent = ends.clone();
        let task = self.cycles.spawn(async move {
            let now = jobs.clock.now();
            let claim = Claim {
                queue: &queue,
                limit,
                worker: &worker,
                lease_until: now + lease(&jobs),
            };
            jobs.store
                .finish_and_claim(&sent, (limit > 0).then_some(claim), now)
                .await
        });
        self.more_due = false;
        self.in_flight.insert(task.id(), Cycle { ends, limit });
    }

    /// Takes in what the store call answered: counts the ends recorded and queues the jobs
    /// claimed. When the store refused, the ends are kept to be recorded again (the leases keep
    /// their jobs from running elsewhere meanwhile).
    async fn landed(&mut self, landed: Result<(tokio::task::Id, Landed), tokio::task::JoinError>) {
        let (id, landed) = match landed {
            Ok((id, landed)) => (id, landed),
            Err(e) => (e.id(), Err(StoreError::Other(Box::new(e)))),
        };
        let Some(cycle) = self.in_flight.remove(&id) else {
            return;
        };
        let now = self.jobs.clock.now();
        match landed {
            Ok((recorded, claimed)) => {
                self.recorded(&cycle.ends, &recorded, now).await;
                if cycle.limit > 0 {
                    self.more_due = claimed.len() >= usize::try_from(cycle.limit).unwrap_or(0);
                }
                self.queue_claimed(claimed);
            }
            Err(StoreError::Unavailable(e)) => {
                if cycle.ends.is_empty() {
                    tracing::warn!(queue = %self.queue, error = %e, "cannot claim jobs");
                } else {
                    tracing::warn!(queue = %self.queue, error = %e, "cannot record ended job attempts; retrying");
                }
                self.more_due = self.more_due || cycle.limit > 0;
                self.ended.splice(0..0, cycle.ends);
                self.retry_at = Some(Instant::now() + STORE_RETRY);
            }
            Err(e) if cycle.ends.is_empty() => {
                tracing::warn!(queue = %self.queue, error = %e, "cannot claim jobs");
            }
            Err(e) => {
                // Something in the batch is refused: each is recorded alone, so that one bad
                // entry cannot hold the others (and the queue) back; one refused alone is
                // dropped (its lease ends and the job runs again).
                tracing::warn!(queue = %self.queue, error = %e, "a batch of ended attempts was refused; recording them one by one");
                let mut recorded = Vec::new();
                let mut kept = Vec::new();
                for ended in &cycle.ends {
                    match self
                        .jobs
                        .store
                        .finish_jobs(std::slice::from_ref(ended), now)
                        .await
                    {
                        Ok(jobs) => recorded.extend(jobs),
                        Err(StoreError::Unavailable(_)) => kept.push(ended.clone()),
                        Err(e) => {
                            tracing::error!(job = %ended.id, error = %e, "an ended attempt cannot be recorded; its lease will end and it runs again");
                        }
                    }
                }
                self.recorded(&cycle.ends, &recorded, now).await;
                if !kept.is_empty() {
                    self.ended.splice(0..0, kept);
                    self.retry_at = Some(Instant::now() + STORE_RETRY);
                }
                self.more_due = self.more_due || cycle.limit > 0;
            }
        }
    }

    /// Counts the ends the store recorded (not the jobs handed back unstarted), and enqueues
    /// the next run of the periodic kinds that finished.
    async fn recorded(&self, sent: &[Finished], recorded: &[JobRecord], now: DateTime<Utc>) {
        let released = |id: Uuid| {
            sent.iter()
                .any(|e| e.id == id && matches!(e.finish, Finish::Release { .. }))
        };
        for job in recorded.iter().filter(|j| !released(j.id)) {
            self.jobs.metrics.ended(&job.kind, job.state);
        }
        for job in recorded.iter().filter(|j| j.state.is_final()) {
            if self.jobs.periodic.contains_key(&job.kind) {
                let next = self.jobs.next_periodic_slot(job, now);
                self.jobs.ensure_periodic(&job.kind, next).await;
            }
        }
    }

    /// Queues jobs just claimed (in the claim's order, best first) for the free slots, which
    /// the loop's next turn fills (unless it is stopping: then it hands them back).
    fn queue_claimed(&mut self, claimed: Vec<JobRecord>) {
        if claimed.is_empty() {
            return;
        }
        let since = Instant::now();
        let now = self.jobs.clock.now();
        self.ready.extend(claimed.into_iter().map(|job| Ready {
            lease_until: job.lease_until.unwrap_or(now),
            job,
            since,
        }));
        // Best last: smaller priority, then older `run_at`, then id, as the claim orders.
        self.ready.sort_by(|a, b| {
            let key = |r: &Ready| (r.job.priority, r.job.run_at, r.job.id);
            key(b).cmp(&key(a))
        });
    }

    /// Starts jobs claimed ahead while slots are free; one whose lease has passed meanwhile
    /// (unrenewed, or the clock jumped) is not started, as it may run elsewhere, but handed
    /// back, which the store ignores if the job is no longer this worker's.
    fn start_ready(&mut self) {
        let now = self.jobs.clock.now();
        if self.ready.iter().any(|r| r.lease_until <= now) {
            tracing::warn!(queue = %self.queue, "job leases ran out while their jobs waited for a slot; handed back");
            self.hand_back(|r| r.lease_until <= now);
        }
        while self.running.len() < usize::try_from(self.concurrency).unwrap_or(usize::MAX) {
            let Some(next) = self.ready.pop() else {
                break;
            };
            self.start(next.job, now);
        }
    }

    /// Hands back the jobs claimed ahead that `which` picks, unstarted: the store undoes their
    /// claim, so that another node (or this one later) takes them.
    fn hand_back(&mut self, which: impl Fn(&Ready) -> bool) {
        if !self.ready.iter().any(&which) {
            return;
        }
        let now = self.jobs.clock.now();
        let (back, keep): (Vec<Ready>, Vec<Ready>) = std::mem::take(&mut self.ready)
            .into_iter()
            .partition(|r| which(r));
        self.ready = keep;
        for ready in back {
            self.ended.push(Finished {
                id: ready.job.id,
                attempt: ready.job.attempt,
                worker: self.name.clone(),
                started_at: now,
                finish: Finish::Release {
                    reason: None,
                    run_at: ready.job.run_at,
                },
            });
        }
    }

    /// Hands back the jobs claimed ahead that waited [`HOLD_AHEAD`] for a slot (the attempts
    /// before them run long), and claims none ahead until a run of short attempts.
    fn hand_back_stale(&mut self, now: Instant) {
        if self.ready.iter().any(|r| r.since + HOLD_AHEAD <= now) {
            self.hand_back(|r| r.since + HOLD_AHEAD <= now);
            let none_ahead = HOLD_AHEAD.as_secs_f64() * f64::from(self.concurrency);
            self.typical_run = self.typical_run.max(none_ahead);
        }
    }

    /// Starts one attempt of `job` at `now`.
    fn start(&mut self, job: JobRecord, now: DateTime<Utc>) {
        if let Some(old) = self.running.remove(&job.id) {
            // The store gave this worker the job again: the older attempt's lease was lost.
            tracing::warn!(job = %job.id, "job lease lost; the older attempt is stopped");
            old.task.abort();
        }
        let breaker = self
            .jobs
            .kinds
            .get(&job.kind)
            .and_then(|k| k.options.breaker.clone());
        let pass = match breaker.map(|b| (b.admit(), b)) {
            Some((Admission::Wait(until), b)) => return self.defer(&job, now, &b, until),
            Some((Admission::Run { probe }, b)) => Some(Pass::new(b, probe)),
            None => None,
        };
        let waited = (now - job.run_at).num_microseconds().unwrap_or(i64::MAX);
        #[allow(
            clippy::cast_precision_loss,
            reason = "a latency in seconds needs no more than f64's 52 bits"
        )]
        let waited = waited as f64 / 1e6;
        self.jobs.metrics.started(&job.kind, &self.queue, waited);
        let (cancel, cancelled) = watch::channel(job.cancel_requested);
        let jobs = Arc::clone(&self.jobs);
        let done = self.done_tx.clone();
        let worker = self.name.clone();
        let id = job.id;
        let attempt_no = job.attempt;
        let job_lease = job.lease_until.unwrap_or(now);
        let job = Arc::new(job);
        let task = tokio::spawn(async move {
            let began = Instant::now();
            // Whatever panics in the attempt — its handler, or the code around it — the end
            // is reported, so that the job does not stay `running` until its lease ends.
            let guarded = CatchUnwind(Box::pin({
                let jobs = Arc::clone(&jobs);
                let job = Arc::clone(&job);
                async move {
                    let (finish, healthy) = attempt(&jobs, &job, cancelled).await;
                    #[cfg(test)]
                    tests::fail_point(&job.kind);
                    jobs.metrics.ran(&job.kind, began.elapsed().as_secs_f64());
                    // An attempt that says nothing of the dependency drops its pass unfinished.
                    if let (Some(pass), Some(healthy)) = (pass, healthy) {
                        pass.finish(healthy);
                    }
                    finish
                }
            }))
            .await;
            let finish = guarded.unwrap_or_else(|panic| {
                tracing::error!(job = %job.id, kind = %job.kind, %panic, "a job attempt panicked outside its handler");
                failed_at(
                    &jobs,
                    &job,
                    now,
                    JobError::retry(format!("the attempt panicked: {panic}")),
                    AttemptOutcome::Retried,
                )
            });
            let _ = done.send(Done {
                finished: Finished {
                    id: job.id,
                    attempt: job.attempt,
                    worker,
                    started_at: now,
                    finish,
                },
                ran: began.elapsed(),
            });
        });
        self.running.insert(
            id,
            Running {
                attempt: attempt_no,
                lease_until: job_lease,
                cancel,
                task: task.abort_handle(),
            },
        );
    }

    /// Hands `job` back unstarted because the circuit of the dependency it needs is open: it
    /// is due again when a probe may run (spread over a second, so that the waiting jobs do
    /// not all come back at once), and the attempt its claim took is not counted.
    fn defer(
        &mut self,
        job: &JobRecord,
        now: DateTime<Utc>,
        breaker: &Breaker,
        until: DateTime<Utc>,
    ) {
        let spread = chrono::Duration::milliseconds(rand::rng().random_range(0..=1000));
        JobsMetrics::count(&self.jobs.metrics.deferred, &job.kind, 1);
        self.ended.push(Finished {
            id: job.id,
            attempt: job.attempt,
            worker: self.name.clone(),
            started_at: now,
            finish: Finish::Release {
                reason: Some(format!(
                    "waiting: the circuit of {} is {}",
                    breaker.name(),
                    breaker.state().as_str()
                )),
                run_at: until.max(now) + spread,
            },
        });
    }

    /// Renews the leases of the attempts in flight, of the jobs claimed ahead, and of those
    /// ended but not yet recorded; passes on cancellations (a job claimed ahead whose
    /// cancellation was asked for is handed back, which cancels it), and stops the attempts
    /// whose lease was lost (their job may already run elsewhere). False if the store could not
    /// be asked: then the attempts whose lease has surely passed are stopped, and the renewal
    /// is tried again soon.
    async fn renew(&mut self) -> bool {
        if self.running.is_empty()
            && self.ended.is_empty()
            && self.ready.is_empty()
            && self.in_flight.is_empty()
        {
            return true;
        }
        let ids: Vec<Uuid> = self
            .running
            .keys()
            .copied()
            .chain(self.ready.iter().map(|r| r.job.id))
            .chain(self.ended.iter().map(|e| e.id))
            .chain(
                self.in_flight
                    .values()
                    .flat_map(|c| c.ends.iter().map(|e| e.id)),
            )
            .collect();
        if ids.is_empty() {
            return true;
        }
        let now = self.jobs.clock.now();
        let lease_until = now + lease(&self.jobs);
        let held = match self
            .jobs
            .store
            .renew_leases(&self.name, &ids, lease_until)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(queue = %self.queue, error = %e, "cannot renew job leases");
                let lapsed: Vec<Uuid> = self
                    .running
                    .iter()
                    .filter(|(_, r)| r.lease_until <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in lapsed {
                    if let Some(running) = self.running.remove(&id) {
                        tracing::warn!(job = %id, queue = %self.queue, "job lease ran out unrenewed; attempt stopped");
                        running.task.abort();
                    }
                }
                self.hand_back(|r| r.lease_until <= now);
                return false;
            }
        };
        let held: HashMap<Uuid, bool> = held.into_iter().collect();
        let running: Vec<Uuid> = self.running.keys().copied().collect();
        for id in running {
            match held.get(&id) {
                Some(cancel) => {
                    if let Some(running) = self.running.get_mut(&id) {
                        running.lease_until = lease_until;
                        if *cancel {
                            running.cancel.send_replace(true);
                        }
                    }
                }
                None => {
                    if let Some(running) = self.running.remove(&id) {
                        tracing::warn!(job = %id, queue = %self.queue, "job lease lost; attempt stopped");
                        running.task.abort();
                    }
                }
            }
        }
        let queue = &self.queue;
        self.ready.retain_mut(|r| match held.get(&r.job.id) {
            Some(cancel) => {
                r.lease_until = lease_until;
                r.job.cancel_requested |= *cancel;
                true
            }
            None => {
                tracing::warn!(job = %r.job.id, %queue, "job lease lost while it waited for a slot");
                false
            }
        });
        self.hand_back(|r| r.job.cancel_requested);
        true
    }
}

/// A lease as a chrono duration.
fn lease(jobs: &Jobs) -> chrono::Duration {
    chrono_duration(jobs.config.lease)
}

/// A duration as chrono's (a year at most).
fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d.min(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(chrono::Duration::days(365))
}

/// Runs one attempt of `job` under its timeout and says how it ended, and whether the
/// dependency its kind needs answered (see [`breaker`](crate::breaker)); `None` if the attempt
/// says nothing of it (it did not use it, or was cancelled).
async fn attempt(
    jobs: &Jobs,
    job: &JobRecord,
    cancel: watch::Receiver<bool>,
) -> (Finish, Option<bool>) {
    let Some(kind) = jobs.kinds.get(&job.kind).cloned() else {
        // Enqueued by a node that knows the kind (a newer version during a rolling upgrade).
        let finish = failed(
            jobs,
            job,
            JobError::retry_after(
                format!("no handler for job kind {:?} on this node", job.kind),
                Duration::from_secs(60),
            ),
            AttemptOutcome::Retried,
        );
        return (finish, None);
    };
    let payload = match serde_json::from_str(&job.payload) {
        Ok(payload) => payload,
        Err(e) => {
            let finish = failed(
                jobs,
                job,
                JobError::permanent(format!("the payload is not JSON: {e}")),
                AttemptOutcome::Discarded,
            );
            return (finish, None);
        }
    };
    let context = JobContext {
        id: job.id,
        kind: job.kind.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        payload,
        trace_id: job.trace_id.clone(),
        cancel,
        unused: std::sync::atomic::AtomicBool::new(false),
    };
    let timeout = Duration::from_millis(u64::try_from(job.timeout_ms).unwrap_or(0));
    let span = tracing::info_span!(
        "job",
        job = %job.id,
        kind = %job.kind,
        attempt = job.attempt,
        trace_id = job.trace_id.as_deref().unwrap_or("")
    );
    // A panic in the handler is an attempt that failed rather than a worker that stops; the
    // timeout, or the attempt's task stopped (a lost lease), drops the handler's future.
    let run = CatchUnwind(tracing::Instrument::instrument(
        kind.handler.run(&context),
        span,
    ));
    let result = tokio::time::timeout(timeout, run).await;
    let (finish, healthy) = match result {
        Ok(Ok(Ok(()))) => (Finish::Completed, Some(true)),
        Ok(Ok(Err(_))) if context.is_cancelled() => (Finish::Cancelled, None),
        Ok(Ok(Err(error))) => {
            let (outcome, healthy) = match error {
                JobError::Permanent(_) => (AttemptOutcome::Discarded, true),
                JobError::Retry { .. } => (AttemptOutcome::Retried, false),
            };
            (failed(jobs, job, error, outcome), Some(healthy))
        }
        Ok(Err(panic)) => (
            failed(
                jobs,
                job,
                JobError::retry(format!("the handler panicked: {panic}")),
                AttemptOutcome::Retried,
            ),
            Some(false),
        ),
        Err(_) => {
            let finish = failed(
                jobs,
                job,
                JobError::retry(format!("timed out after {} ms", job.timeout_ms)),
                AttemptOutcome::TimedOut,
            );
            (finish, Some(false))
        }
    };
    let unused = context.unused.load(std::sync::atomic::Ordering::Relaxed);
    (finish, healthy.filter(|_| !unused))
}

/// A future that answers a panic while it is polled as an error with the panic's message,
/// as `std::panic::catch_unwind` does for a closure. It is not polled again after that.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        }
    }
}

/// What a panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// An attempt's error as kept: no NUL (which PostgreSQL text refuses), at most [`MAX_ERROR`]
/// bytes.
fn kept_error(error: String) -> String {
    let mut error = if error.contains('\0') {
        error.replace('\0', "\u{fffd}")
    } else {
        error
    };
    if error.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
        error.push('…');
    }
    error
}

/// How a failed attempt ends: retried after its backoff while attempts are left, else
/// discarded.
fn failed(jobs: &Jobs, job: &JobRecord, error: JobError, outcome: AttemptOutcome) -> Finish {
    failed_at(jobs, job, jobs.clock.now(), error, outcome)
}

/// [`failed`] at `now`, which it does not ask the clock for.
fn failed_at(
    jobs: &Jobs,
    job: &JobRecord,
    now: DateTime<Utc>,
    error: JobError,
    outcome: AttemptOutcome,
) -> Finish {
    let error = match error {
        JobError::Retry { error, after } => JobError::Retry {
            error: kept_error(error),
            after,
        },
        JobError::Permanent(error) => JobError::Permanent(kept_error(error)),
    };
    match error {
        JobError::Retry { error, after } if job.attempt < job.max_attempts => {
            let backoff = jobs
                .kinds
                .get(&job.kind)
                .map(|k| k.options.backoff)
                .unwrap_or_default();
            let wait = after.unwrap_or_else(|| backoff.delay(job.attempt, &mut rand::rng()));
            let retry_at = now
                .checked_add_signed(chrono_duration(wait))
                .unwrap_or(now + chrono::Duration::days(365));
            tracing::info!(job = %job.id, kind = %job.kind, attempt = job.attempt, error = %error, "job attempt failed; retrying");
            Finish::Retry {
                error,
                retry_at,
                outcome,
            }
        }
        JobError::Retry { error, .. } | JobError::Permanent(error) => {
            tracing::warn!(job = %job.id, kind = %job.kind, attempt = job.attempt, error = %error, "job discarded");
            let outcome = match outcome {
                AttemptOutcome::TimedOut => AttemptOutcome::TimedOut,
                _ => AttemptOutcome::Discarded,
            };
            Finish::Discard { error, outcome }
        }
    }
}

/// Wakes this node's worker of each queue the store says has new work (enqueued on any node),
/// until shutdown; dropping the receiver stops the store's listener.
async fn relay_wakeups(
    jobs: Arc<Jobs>,
    mut wakeups: mpsc::Receiver<JobWakeup>,
    mut shutdown: watch::Receiver<bool>,
) {
    if *shutdown.borrow() {
        return;
    }
    loop {
        tokio::select! {
            wakeup = wakeups.recv() => {
                match wakeup {
                    Some(JobWakeup::Queue(queue)) => jobs.wake(&queue),
                    Some(JobWakeup::All) => {
                        for (queue, _) in &jobs.config.queues {
                            jobs.wake(queue);
                        }
                    }
                    None => return,
                }
                jobs.metrics.wakeups.inc();
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Rescues the jobs of dead workers, refreshes the gauges read from the store, and prunes
/// finished jobs, until shutdown.
async fn maintain(jobs: Arc<Jobs>, mut shutdown: watch::Receiver<bool>) {
    let mut rescue = tokio::time::interval((jobs.config.lease / 2).max(Duration::from_millis(10)));
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if *shutdown.borrow() {
        return;
    }
    // Periodic kinds: the current slot's job is due now unless it exists (waiting, or done);
    // afterwards each end enqueues the next slot's, and every tick makes sure of the current
    // slot's (a node that died between the two).
    let ensure_current = || async {
        let now = jobs.clock.now();
        for kind in jobs.periodic.keys() {
            jobs.ensure_periodic(kind, jobs.periodic_slot(kind, now))
                .await;
        }
    };
    ensure_current().await;
    loop {
        tokio::select! {
            _ = rescue.tick() => {
                ensure_current().await;
                match jobs.store.rescue_expired_leases(jobs.clock.now()).await {
                    Ok(rescued) if rescued.is_empty() => {}
                    Ok(rescued) => {
                        for (kind, n) in &rescued {
                            JobsMetrics::count(&jobs.metrics.lease_lost, kind, *n);
                        }
                        let rescued: u64 = rescued.iter().map(|(_, n)| n).sum();
                        tracing::warn!(rescued, "jobs whose worker lost its lease are due again");
                        for (queue, _) in &jobs.config.queues {
                            jobs.wake(queue);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot rescue expired job leases"),
                }
                refresh_stats(&jobs).await;
            }
            _ = prune.tick() => prune_finished(&jobs).await,
            _ = shutdown.changed() => return,
        }
    }
}

/// Sets the gauges that count every node's jobs from the store.
async fn refresh_stats(jobs: &Jobs) {
    let now = jobs.clock.now();
    match jobs.store.job_stats(now).await {
        Ok((counts, oldest)) => {
            let waited = oldest.map_or(0, |t| (now - t).num_milliseconds());
            #[allow(
                clippy::cast_precision_loss,
                reason = "an age in seconds needs no more than f64's 52 bits"
            )]
            let waited = waited as f64 / 1e3;
            jobs.metrics.stats(&counts, waited);
        }
        // Stale gauges until the next tick; the store's own failures show elsewhere.
        Err(e) => tracing::debug!(error = %e, "cannot read job counts for the metrics"),
    }
}

/// Deletes the jobs that finished before the retention period, a batch at a time.
async fn prune_finished(jobs: &Jobs) {
    let retention =
        chrono::Duration::from_std(jobs.config.retention).unwrap_or(chrono::Duration::days(7));
    let before = jobs.clock.now() - retention;
    loop {
        match jobs.store.prune_jobs(before, PRUNE_BATCH).await {
            Ok(n) if n < u64::from(PRUNE_BATCH) => break,
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune finished jobs");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is how a test reports failure"
    )]

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::TimeZone;
    use tokio::sync::watch;
    use unhidra_core::{Clock, ManualClock};
    use unhidra_store::Backend;
    use unhidra_store::jobs::{AttemptOutcome, Enqueued, JobState};
    use unhidra_store::testing::TestDb;

    use crate::{EnqueueOptions, Handler, JobContext, JobError, Jobs, JobsConfig, KindOptions};

    /// Kinds whose attempts panic after their handler returned, in the code around it.
    static PANIC_AFTER_HANDLER: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Panics if `kind`'s attempts are to (a fault injected by a test).
    pub(super) fn fail_point(kind: &str) {
        let armed = PANIC_AFTER_HANDLER
            .lock()
            .map(|kinds| kinds.iter().any(|k| k == kind))
            .unwrap_or(false);
        assert!(!armed, "a fault injected after the handler of {kind}");
    }

    #[derive(Debug)]
    struct Succeeds;

    #[async_trait]
    impl Handler for Succeeds {
        async fn run(&self, _: &JobContext) -> Result<(), JobError> {
            Ok(())
        }
    }

    /// A panic in the attempt's code around the handler still reports the end: the job is
    /// retried at once rather than left `running` until its lease (an hour here) ends.
    async fn a_panic_around_the_handler_still_reports_the_end(backend: Backend) {
        const KIND: &str = "test.panics_after_handler";
        PANIC_AFTER_HANDLER.lock().unwrap().push(KIND.to_owned());
        let db = TestDb::new(backend).await;
        db.store.migrate().await.unwrap();
        let clock = Arc::new(ManualClock::new(
            chrono::Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap(),
        ));
        let config = JobsConfig {
            queues: vec![("default".to_owned(), 2)],
            lease: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(10),
            ..JobsConfig::default()
        };
        let jobs = Jobs::builder(db.store.clone(), clock.clone() as Arc<dyn Clock>, config)
            .register(
                KIND,
                Succeeds,
                KindOptions {
                    max_attempts: 2,
                    ..KindOptions::default()
                },
            )
            .build();
        let (stop, shutdown) = watch::channel(false);
        let workers = jobs.start(shutdown);
        let Enqueued::New(job) = jobs
            .enqueue(KIND, &serde_json::json!({}), EnqueueOptions::default())
            .await
            .unwrap()
        else {
            panic!("a new job");
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (stored, attempts) = loop {
            let (stored, attempts) = jobs.job(job.id).await.unwrap();
            if stored.state != JobState::Available && stored.state != JobState::Running {
                break (stored, attempts);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the job is still {:?}: its end was never reported",
                stored.state
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            stored
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("panicked") && e.contains("a fault injected")),
            "{stored:?}"
        );
        // Retried at once: seen either waiting for its retry, or (when the jittered backoff
        // was nil and the second attempt ran before this looked) after its last attempt.
        match stored.state {
            JobState::Retryable => assert_eq!(attempts.len(), 1),
            JobState::Discarded => assert_eq!(attempts.len(), 2),
            other => panic!("{other:?}: {stored:?}"),
        }
        assert!(
            attempts
                .iter()
                .any(|a| a.outcome == AttemptOutcome::Retried),
            "{attempts:?}"
        );
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), workers.stopped())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_panic_around_the_handler_still_reports_the_end_sqlite() {
        a_panic_around_the_handler_still_reports_the_end(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn a_panic_around_the_handler_still_reports_the_end_postgres() {
        a_panic_around_the_handler_still_reports_the_end(Backend::Postgres).await;
    }
}
