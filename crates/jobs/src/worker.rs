//! The workers of one node: per queue, a loop that claims due jobs in batches, runs each
//! attempt in a task of its own under the job's timeout, renews the leases of what runs, and
//! records the attempts that ended in batches; and one maintenance loop that rescues jobs whose
//! lease ran out and prunes finished ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use unhidra_store::StoreError;
use unhidra_store::jobs::{AttemptOutcome, Finish, Finished, JobRecord, JobWakeup};
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

/// The longest error text kept for an attempt, in bytes.
const MAX_ERROR: usize = 4096;

/// How soon a failed lease renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// The worker of one queue on this node.
#[derive(Debug)]
struct QueueWorker {
    jobs: Arc<Jobs>,
    queue: String,
    concurrency: u32,
    /// The name in leases and attempts: this node and the queue.
    name: String,
    running: HashMap<Uuid, Running>,
    /// Ended attempts not yet recorded.
    ended: Vec<Finished>,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
}

impl QueueWorker {
    fn new(jobs: Arc<Jobs>, queue: String, concurrency: u32) -> Self {
        let name = format!("{}/{queue}", jobs.config.node);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            jobs,
            queue,
            concurrency,
            name,
            running: HashMap::new(),
            ended: Vec::new(),
            done_tx,
            done_rx,
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let config = self.jobs.config.clone();
        let wake = self.jobs.wake.get(&self.queue).cloned().unwrap_or_default();
        let mut renew = tokio::time::interval((config.lease / 3).max(Duration::from_millis(10)));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = *shutdown.borrow();
        tracing::debug!(queue = %self.queue, worker = %self.name, "job worker started");
        loop {
            while let Ok(ended) = self.done_rx.try_recv() {
                self.ended(ended);
            }
            let recorded = self.record_ended().await;
            if stopping && self.running.is_empty() && self.ended.is_empty() {
                break;
            }
            if !stopping && recorded {
                self.claim().await;
            }
            let pause = if recorded {
                config.poll_interval
            } else {
                STORE_RETRY
            };
            tokio::select! {
                () = wake.notified(), if !stopping => {}
                Some(ended) = self.done_rx.recv() => self.ended(ended),
                _ = renew.tick() => {
                    if !self.renew().await {
                        renew.reset_after(RENEW_RETRY.min(config.lease / 3));
                    }
                }
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed(), if !stopping => stopping = true,
            }
        }
        tracing::debug!(queue = %self.queue, worker = %self.name, "job worker stopped");
    }

    fn ended(&mut self, ended: Finished) {
        // Only the attempt that ended: the store may have given this worker the job again
        // (a lost lease), and the newer attempt keeps its place.
        if self
            .running
            .get(&ended.id)
            .is_some_and(|r| r.attempt == ended.attempt)
        {
            self.running.remove(&ended.id);
        }
        self.ended.push(ended);
    }

    /// Records the attempts that ended, in one batch; false if the store refused (they are
    /// kept and recorded later: the leases keep their jobs from running elsewhere meanwhile).
    async fn record_ended(&mut self) -> bool {
        if self.ended.is_empty() {
            return true;
        }
        let now = self.jobs.clock.now();
        // Jobs handed back unstarted are no attempt's end.
        let released: Vec<Uuid> = self
            .ended
            .iter()
            .filter(|e| matches!(e.finish, Finish::Release { .. }))
            .map(|e| e.id)
            .collect();
        let recorded = match self.jobs.store.finish_jobs(&self.ended, now).await {
            Ok(recorded) => {
                self.ended.clear();
                recorded
            }
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(queue = %self.queue, error = %e, "cannot record ended job attempts; retrying");
                return false;
            }
            Err(e) => {
                // Something in the batch is refused: each is recorded alone, so that one bad
                // entry cannot hold the others (and the queue) back; one refused alone is
                // dropped (its lease ends and the job runs again).
                tracing::warn!(queue = %self.queue, error = %e, "a batch of ended attempts was refused; recording them one by one");
                let mut recorded = Vec::new();
                for ended in std::mem::take(&mut self.ended) {
                    match self
                        .jobs
                        .store
                        .finish_jobs(std::slice::from_ref(&ended), now)
                        .await
                    {
                        Ok(jobs) => recorded.extend(jobs),
                        Err(StoreError::Unavailable(_)) => self.ended.push(ended),
                        Err(e) => {
                            tracing::error!(job = %ended.id, error = %e, "an ended attempt cannot be recorded; its lease will end and it runs again");
                        }
                    }
                }
                recorded
            }
        };
        for job in recorded.iter().filter(|j| !released.contains(&j.id)) {
            self.jobs.metrics.ended(&job.kind, job.state);
        }
        for job in recorded.iter().filter(|j| j.state.is_final()) {
            if self.jobs.periodic.contains_key(&job.kind) {
                let next = self.jobs.next_periodic_slot(job, now);
                self.jobs.ensure_periodic(&job.kind, next).await;
            }
        }
        self.ended.is_empty()
    }

    /// Claims as many due jobs as there are free places, and starts them.
    async fn claim(&mut self) {
        let free = self
            .concurrency
            .saturating_sub(u32::try_from(self.running.len()).unwrap_or(u32::MAX));
        if free == 0 {
            return;
        }
        let now = self.jobs.clock.now();
        let lease_until = now + lease(&self.jobs);
        match self
            .jobs
            .store
            .claim_jobs(&self.queue, free, &self.name, now, lease_until)
            .await
        {
            Ok(claimed) => {
                for job in claimed {
                    self.start(job, now);
                }
            }
            Err(e) => tracing::warn!(queue = %self.queue, error = %e, "cannot claim jobs"),
        }
    }

    /// Starts one attempt of `job`, claimed at `now`.
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
        let task = tokio::spawn(async move {
            let began = tokio::time::Instant::now();
            let (finish, healthy) = attempt(&jobs, &job, cancelled).await;
            jobs.metrics.ran(&job.kind, began.elapsed().as_secs_f64());
            // An attempt that says nothing of the dependency drops its pass unfinished.
            if let (Some(pass), Some(healthy)) = (pass, healthy) {
                pass.finish(healthy);
            }
            let _ = done.send(Finished {
                id: job.id,
                attempt: job.attempt,
                worker,
                started_at: now,
                finish,
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
                reason: format!(
                    "waiting: the circuit of {} is {}",
                    breaker.name(),
                    breaker.state().as_str()
                ),
                run_at: until.max(now) + spread,
            },
        });
    }

    /// Renews the leases of the attempts in flight and of those ended but not yet recorded;
    /// passes on cancellations, and stops the attempts whose lease was lost (their job may
    /// already run elsewhere). False if the store could not be asked: then the attempts whose
    /// lease has surely passed are stopped, and the renewal is tried again soon.
    async fn renew(&mut self) -> bool {
        if self.running.is_empty() && self.ended.is_empty() {
            return true;
        }
        let ids: Vec<Uuid> = self
            .running
            .keys()
            .copied()
            .chain(self.ended.iter().map(|e| e.id))
            .collect();
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
    // The handler runs in a task of its own, so that a panic is an attempt that failed rather
    // than a worker that stops, and a timeout can stop it.
    let handler = Arc::clone(&kind.handler);
    let context = Arc::new(context);
    let mut run = tokio::spawn({
        let context = Arc::clone(&context);
        tracing::Instrument::instrument(async move { handler.run(&context).await }, span)
    });
    // Stopping the attempt (a lost lease, a timeout) stops the handler too.
    let _stop_handler = AbortOnDrop(run.abort_handle());
    let result = tokio::time::timeout(timeout, &mut run).await;
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
        Ok(Err(join)) => (
            failed(
                jobs,
                job,
                JobError::retry(format!("the handler panicked: {join}")),
                AttemptOutcome::Retried,
            ),
            Some(false),
        ),
        Err(_) => {
            run.abort();
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

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    let now = jobs.clock.now();
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
