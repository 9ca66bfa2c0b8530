//! The job system over a real store, on SQLite and PostgreSQL: retries with backoff, discards
//! and requeues, timeouts, unique keys, cancellation, lost leases, wake-ups (across nodes on
//! PostgreSQL), metrics and bad input; cron schedules in `jobs/cron.rs`.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use serde_json::json;
use tokio::sync::watch;
use unhidra_core::{Clock, ManualClock};
use unhidra_jobs::{
    Backoff, Breaker, BreakerConfig, BreakerState, EnqueueOptions, Handler, JobContext, JobError,
    Jobs, JobsConfig, JobsError, KindOptions, Workers,
};
use unhidra_store::Backend;
use unhidra_store::jobs::{AttemptOutcome, Enqueued, JobRecord, JobState};
use unhidra_store::testing::TestDb;
use uuid::Uuid;

/// Runs a scenario on each backend.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(unhidra_store::Backend::Sqlite).await;
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(unhidra_store::Backend::Postgres).await;
            }
        }
    };
}

// Cron schedules, beside the jobs they enqueue (one test binary per crate).
#[path = "jobs/cron.rs"]
mod cron;

/// Fails its first `failures` attempts (retryable, or for good), then succeeds; counts calls.
#[derive(Debug, Default)]
struct Flaky {
    failures: u32,
    permanent: bool,
    calls: AtomicU32,
}

#[async_trait]
impl Handler for Flaky {
    async fn run(&self, _: &JobContext) -> Result<(), JobError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.failures {
            return Err(if self.permanent {
                JobError::permanent("bad input")
            } else {
                JobError::retry(format!("failure {}", call + 1))
            });
        }
        Ok(())
    }
}

/// Sleeps until cancelled, or for `for_`.
#[derive(Debug)]
struct Slow {
    for_: Duration,
    started: AtomicU32,
}

#[async_trait]
impl Handler for Slow {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            () = tokio::time::sleep(self.for_) => Ok(()),
            () = job.cancelled() => Err(JobError::permanent("cancelled")),
        }
    }
}

struct Harness {
    db: TestDb,
    clock: Arc<ManualClock>,
    jobs: Arc<Jobs>,
    stop: watch::Sender<bool>,
    workers: Option<Workers>,
}

impl Harness {
    /// A job system with `register` applied, its workers polling every 10 ms.
    async fn start(
        backend: Backend,
        lease: Duration,
        register: impl FnOnce(unhidra_jobs::JobsBuilder) -> unhidra_jobs::JobsBuilder,
    ) -> Self {
        let db = TestDb::new(backend).await;
        db.store.migrate().await.expect("migrate");
        let clock = Arc::new(ManualClock::new(
            Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap(),
        ));
        let config = JobsConfig {
            queues: vec![("default".to_owned(), 4)],
            lease,
            poll_interval: Duration::from_millis(10),
            ..JobsConfig::default()
        };
        let jobs = register(Jobs::builder(
            db.store.clone(),
            clock.clone() as Arc<dyn Clock>,
            config,
        ))
        .build();
        let (stop, shutdown) = watch::channel(false);
        let workers = Some(jobs.start(shutdown));
        Self {
            db,
            clock,
            jobs,
            stop,
            workers,
        }
    }

    async fn enqueue(&self, kind: &str) -> JobRecord {
        match self
            .jobs
            .enqueue(kind, &json!({ "n": 1 }), EnqueueOptions::default())
            .await
            .expect("enqueued")
        {
            Enqueued::New(job) => job,
            Enqueued::Existing(job) => panic!("a new job was expected, got {job:?}"),
        }
    }

    /// Waits (at most 10 s) until the job is in `state`.
    async fn until(&self, id: Uuid, state: JobState) -> JobRecord {
        self.until_attempt(id, state, None).await
    }

    /// Waits (at most 10 s) until the job is in `state` (after attempt `attempt`, if given).
    async fn until_attempt(&self, id: Uuid, state: JobState, attempt: Option<i32>) -> JobRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (job, _) = self.jobs.job(id).await.expect("job");
            if job.state == state && attempt.is_none_or(|a| a == job.attempt) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job still {:?} after attempt {}, not {state:?} after {attempt:?}: {job:?}",
                job.state,
                job.attempt
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (at most 10 s) until the job is due no sooner than `after` from now.
    async fn until_due_after(&self, id: Uuid, after: chrono::Duration) -> JobRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (job, _) = self.jobs.job(id).await.expect("job");
            if job.run_at >= self.clock.now() + after {
                return job;
            }
            assert!(tokio::time::Instant::now() < deadline, "still due: {job:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers without waiting for handlers that never end.
    async fn stop_now(mut self) {
        self.stop.send_replace(true);
        self.workers.take();
    }

    async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(workers) = self.workers.take() {
            tokio::time::timeout(Duration::from_secs(10), workers.stopped())
                .await
                .expect("workers stop");
        }
    }
}

fn options(max_attempts: i32) -> KindOptions {
    KindOptions {
        max_attempts,
        backoff: Backoff {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(60),
        },
        ..KindOptions::default()
    }
}

async fn a_job_that_fails_twice_is_retried_with_backoff_and_completes(backend: Backend) {
    let flaky = Arc::new(Flaky {
        failures: 2,
        ..Flaky::default()
    });
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("flaky", Shared(Arc::clone(&flaky)), options(5))
    })
    .await;
    let job = h.enqueue("flaky").await;
    for failure in 1..=2 {
        let retryable = h
            .until_attempt(job.id, JobState::Retryable, Some(failure))
            .await;
        assert_eq!(
            retryable.last_error.as_deref(),
            Some(&*format!("failure {failure}"))
        );
        // Full jitter: somewhere in [now, now + 10 s × 2^(n-1)].
        let wait = retryable.run_at - h.clock.now();
        assert!(wait >= chrono::Duration::zero());
        assert!(
            wait <= chrono::Duration::seconds(10 << (failure - 1)),
            "{wait}"
        );
        // Not claimed before its time has come.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(flaky.calls.load(Ordering::SeqCst), failure as u32);
        h.clock.advance(chrono::Duration::seconds(61));
    }
    let done = h.until(job.id, JobState::Completed).await;
    assert_eq!(done.attempt, 3);
    let (_, attempts) = h.jobs.job(job.id).await.unwrap();
    let outcomes: Vec<AttemptOutcome> = attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [
            AttemptOutcome::Retried,
            AttemptOutcome::Retried,
            AttemptOutcome::Completed
        ]
    );
    assert_eq!(attempts[0].error.as_deref(), Some("failure 1"));
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        3,
        "exactly once per attempt"
    );
    h.stop().await;
}
on_both!(a_job_that_fails_twice_is_retried_with_backoff_and_completes);

async fn attempts_used_up_discard_the_job_and_a_retry_requeues_it(backend: Backend) {
    let flaky = Arc::new(Flaky {
        failures: 2,
        ..Flaky::default()
    });
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("flaky", Shared(Arc::clone(&flaky)), options(2))
    })
    .await;
    let job = h.enqueue("flaky").await;
    h.until(job.id, JobState::Retryable).await;
    h.clock.advance(chrono::Duration::seconds(61));
    let discarded = h.until(job.id, JobState::Discarded).await;
    assert_eq!(discarded.attempt, 2);
    assert!(discarded.finished_at.is_some());
    let (_, attempts) = h.jobs.job(job.id).await.unwrap();
    assert_eq!(attempts.last().unwrap().outcome, AttemptOutcome::Discarded);
    // An operator sends it back: fresh attempts, and this time it succeeds.
    let requeued = h.jobs.retry(job.id).await.unwrap();
    assert!(matches!(
        requeued.state,
        JobState::Available | JobState::Running | JobState::Completed
    ));
    h.until(job.id, JobState::Completed).await;
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    h.stop().await;
}
on_both!(attempts_used_up_discard_the_job_and_a_retry_requeues_it);

async fn a_permanent_error_discards_at_once(backend: Backend) {
    let flaky = Arc::new(Flaky {
        failures: 1,
        permanent: true,
        ..Flaky::default()
    });
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("flaky", Shared(Arc::clone(&flaky)), options(10))
    })
    .await;
    let job = h.enqueue("flaky").await;
    let discarded = h.until(job.id, JobState::Discarded).await;
    assert_eq!(discarded.attempt, 1);
    assert_eq!(discarded.last_error.as_deref(), Some("bad input"));
    h.stop().await;
}
on_both!(a_permanent_error_discards_at_once);

async fn a_timeout_ends_the_attempt_and_counts_it(backend: Backend) {
    let slow = Arc::new(Slow {
        for_: Duration::from_secs(3600),
        started: AtomicU32::new(0),
    });
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register(
            "slow",
            Shared(Arc::clone(&slow)),
            KindOptions {
                max_attempts: 1,
                timeout: Duration::from_millis(100),
                ..KindOptions::default()
            },
        )
    })
    .await;
    let job = h.enqueue("slow").await;
    let discarded = h.until(job.id, JobState::Discarded).await;
    assert_eq!(discarded.attempt, 1);
    let (_, attempts) = h.jobs.job(job.id).await.unwrap();
    assert_eq!(attempts[0].outcome, AttemptOutcome::TimedOut);
    assert!(attempts[0].error.as_deref().unwrap().contains("timed out"));
    h.stop().await;
}
on_both!(a_timeout_ends_the_attempt_and_counts_it);

async fn cancelling_a_running_job_reaches_its_handler(backend: Backend) {
    let slow = Arc::new(Slow {
        for_: Duration::from_secs(3600),
        started: AtomicU32::new(0),
    });
    // A short lease: renewals (every third of it) carry the cancellation.
    let h = Harness::start(backend, Duration::from_millis(300), |b| {
        b.register("slow", Shared(Arc::clone(&slow)), options(5))
    })
    .await;
    let job = h.enqueue("slow").await;
    h.until(job.id, JobState::Running).await;
    let marked = h.jobs.cancel(job.id).await.unwrap();
    assert!(marked.cancel_requested || marked.state == JobState::Cancelled);
    h.until(job.id, JobState::Cancelled).await;
    assert_eq!(slow.started.load(Ordering::SeqCst), 1);
    // A job not yet running is cancelled at once and never runs.
    let later = h
        .jobs
        .enqueue(
            "slow",
            &json!({}),
            EnqueueOptions {
                run_at: Some(h.clock.now() + chrono::Duration::hours(1)),
                ..EnqueueOptions::default()
            },
        )
        .await
        .unwrap();
    let Enqueued::New(later) = later else {
        panic!("new")
    };
    assert_eq!(later.state, JobState::Scheduled);
    assert_eq!(
        h.jobs.cancel(later.id).await.unwrap().state,
        JobState::Cancelled
    );
    h.clock.advance(chrono::Duration::hours(2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slow.started.load(Ordering::SeqCst), 1);
    h.stop().await;
}
on_both!(cancelling_a_running_job_reaches_its_handler);

async fn a_lost_lease_is_rescued_counting_the_attempt_and_a_late_report_changes_nothing(
    backend: Backend,
) {
    let flaky = Arc::new(Flaky::default());
    let h = Harness::start(backend, Duration::from_millis(300), |b| {
        b.register("flaky", Shared(Arc::clone(&flaky)), options(5))
    })
    .await;
    // A job a node claimed and then died with, in a queue this harness's worker does not work
    // (so that only the rescue can move it).
    let job = h
        .jobs
        .new_job("flaky", &json!({}), EnqueueOptions::default())
        .unwrap();
    let mut dead = job.clone();
    dead.queue = "elsewhere".to_owned();
    let Enqueued::New(stored) = h.db.store.enqueue_job(&dead).await.unwrap() else {
        panic!("new")
    };
    let now = h.clock.now();
    let claimed =
        h.db.store
            .claim_jobs(
                "elsewhere",
                1,
                "dead-node/elsewhere",
                now,
                now + chrono::Duration::seconds(5),
            )
            .await
            .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, stored.id);
    // The dead node's lease ends; the rescue makes the job due again (in its own queue).
    h.clock.advance(chrono::Duration::seconds(6));
    let rescued = h.until(stored.id, JobState::Retryable).await;
    assert_eq!(rescued.attempt, 1, "the lost attempt counts");
    let (_, attempts) = h.jobs.job(stored.id).await.unwrap();
    assert_eq!(attempts[0].outcome, AttemptOutcome::LeaseLost);
    assert_eq!(attempts[0].worker, "dead-node/elsewhere");
    // A report from the dead node arriving late changes nothing.
    let late = unhidra_store::jobs::Finished {
        id: stored.id,
        attempt: 1,
        worker: "dead-node/elsewhere".to_owned(),
        started_at: now,
        finish: unhidra_store::jobs::Finish::Completed,
    };
    h.db.store
        .finish_jobs(&[late], h.clock.now())
        .await
        .unwrap();
    assert_eq!(
        h.jobs.job(stored.id).await.unwrap().0.state,
        JobState::Retryable
    );
    h.stop().await;
}
on_both!(a_lost_lease_is_rescued_counting_the_attempt_and_a_late_report_changes_nothing);

async fn an_enqueue_wakes_an_idle_worker_at_once(backend: Backend) {
    let flaky = Arc::new(Flaky::default());
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let clock: Arc<dyn Clock> = Arc::new(unhidra_core::SystemClock);
    let jobs = Jobs::builder(
        db.store.clone(),
        clock,
        JobsConfig {
            queues: vec![("default".to_owned(), 1)],
            // Polling alone would take an hour.
            poll_interval: Duration::from_secs(3600),
            ..JobsConfig::default()
        },
    )
    .register("flaky", Shared(Arc::clone(&flaky)), options(1))
    .build();
    let (stop, shutdown) = watch::channel(false);
    let workers = jobs.start(shutdown);
    // Let the worker find the queue empty and go idle.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for round in 1..=3 {
        jobs.enqueue("flaky", &json!({}), EnqueueOptions::default())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while flaky.calls.load(Ordering::SeqCst) < round {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the enqueue woke the worker");
    }
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), workers.stopped())
        .await
        .unwrap();
}
on_both!(an_enqueue_wakes_an_idle_worker_at_once);

async fn unique_keys_return_the_existing_job(backend: Backend) {
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("flaky", Flaky::default(), options(1))
    })
    .await;
    let later = h.clock.now() + chrono::Duration::hours(1);
    let unique = || EnqueueOptions {
        run_at: Some(later),
        unique_key: Some("sync:device-1".to_owned()),
        ..EnqueueOptions::default()
    };
    let Enqueued::New(first) = h.jobs.enqueue("flaky", &json!({}), unique()).await.unwrap() else {
        panic!("new")
    };
    let Enqueued::Existing(again) = h.jobs.enqueue("flaky", &json!({}), unique()).await.unwrap()
    else {
        panic!("the second enqueue returns the first job")
    };
    assert_eq!(again.id, first.id);
    h.stop().await;
}
on_both!(unique_keys_return_the_existing_job);

/// A batch enqueue checks every job first, stores them together, and the worker runs them.
async fn a_batch_enqueue_stores_and_runs_every_job(backend: Backend) {
    let counter = Arc::new(Flaky::default());
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("counted", Shared(Arc::clone(&counter)), options(1))
    })
    .await;
    let payloads: Vec<serde_json::Value> = (0..50).map(|n| json!({ "n": n })).collect();
    let unknown = json!({});
    // One refused: nothing is stored.
    let refused = h
        .jobs
        .enqueue_many(
            payloads
                .iter()
                .map(|p| ("counted", p, EnqueueOptions::default()))
                .chain([("no-such-kind", &unknown, EnqueueOptions::default())]),
        )
        .await;
    assert!(matches!(refused, Err(JobsError::UnknownKind(_))));
    assert_eq!(
        h.jobs
            .list(&unhidra_jobs::ListQuery::default())
            .await
            .unwrap()
            .total,
        0
    );
    let enqueued = h
        .jobs
        .enqueue_many(
            payloads
                .iter()
                .map(|p| ("counted", p, EnqueueOptions::default())),
        )
        .await
        .unwrap();
    assert_eq!(enqueued.len(), 50);
    for (stored, payload) in enqueued.iter().zip(&payloads) {
        let Enqueued::New(job) = stored else {
            panic!("{stored:?}");
        };
        assert_eq!(job.payload, payload.to_string());
    }
    for stored in &enqueued {
        let Enqueued::New(job) = stored else {
            unreachable!()
        };
        h.until(job.id, JobState::Completed).await;
    }
    assert_eq!(counter.calls.load(Ordering::SeqCst), 50, "each ran once");
    assert_eq!(counted(&h.jobs.metrics().enqueued, "counted"), 50);
    h.stop().await;
}
on_both!(a_batch_enqueue_stores_and_runs_every_job);

async fn bad_jobs_are_refused_and_store_nothing(backend: Backend) {
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("flaky", Flaky::default(), options(1))
    })
    .await;
    let refused = h
        .jobs
        .enqueue("no-such-kind", &json!({}), EnqueueOptions::default())
        .await;
    assert!(matches!(refused, Err(JobsError::UnknownKind(k)) if k == "no-such-kind"));
    let big = json!({ "blob": "x".repeat(70 * 1024) });
    let refused = h
        .jobs
        .enqueue("flaky", &big, EnqueueOptions::default())
        .await;
    assert!(matches!(
        refused,
        Err(JobsError::Invalid("payload", "too_large", _))
    ));
    for options in [
        EnqueueOptions {
            max_attempts: Some(0),
            ..EnqueueOptions::default()
        },
        EnqueueOptions {
            timeout: Some(Duration::ZERO),
            ..EnqueueOptions::default()
        },
        EnqueueOptions {
            unique_key: Some("a\u{0}b".to_owned()),
            ..EnqueueOptions::default()
        },
        EnqueueOptions {
            concurrency: Some(("k".to_owned(), 0)),
            ..EnqueueOptions::default()
        },
    ] {
        let refused = h.jobs.enqueue("flaky", &json!({}), options).await;
        assert!(
            matches!(refused, Err(JobsError::Invalid(..))),
            "{refused:?}"
        );
    }
    let listed =
        h.db.store
            .list_jobs(&unhidra_store::jobs::JobFilter::default(), 100, 0)
            .await
            .unwrap();
    assert!(listed.is_empty(), "nothing stored: {listed:?}");
    h.stop().await;
}
on_both!(bad_jobs_are_refused_and_store_nothing);

/// A handler shared with the test, which reads its counters.
#[derive(Debug)]
struct Shared<H>(Arc<H>);

#[async_trait]
impl<H: Handler> Handler for Shared<H> {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        self.0.run(job).await
    }
}

/// A periodic kind runs once per interval however many nodes run it: the first run when the
/// nodes start, then one each time the interval passed.
async fn a_periodic_kind_runs_once_per_interval_across_two_nodes(backend: Backend) {
    let ticks = Arc::new(Flaky::default());
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let other = db.another_handle().await;
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap(),
    ));
    let node = |store: Arc<dyn unhidra_store::Store>| {
        Jobs::builder(
            store,
            clock.clone() as Arc<dyn Clock>,
            JobsConfig {
                queues: vec![("default".to_owned(), 2)],
                lease: Duration::from_millis(300),
                poll_interval: Duration::from_millis(10),
                ..JobsConfig::default()
            },
        )
        .register("tick", Shared(Arc::clone(&ticks)), options(1))
        .every("tick", Duration::from_secs(60))
        .build()
    };
    let (stop, shutdown) = watch::channel(false);
    let nodes = [node(db.store.clone()), node(other.store.clone())];
    let workers: Vec<Workers> = nodes.iter().map(|n| n.start(shutdown.clone())).collect();
    let calls = || ticks.calls.load(Ordering::SeqCst);
    for round in 1..=3 {
        tokio::time::timeout(Duration::from_secs(10), async {
            while calls() < round {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("run {round} did not come"));
        // Both nodes poll often and make sure of the next run: still one run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(calls(), round, "one run per interval");
        clock.advance(chrono::Duration::seconds(61));
    }
    stop.send_replace(true);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(10), w.stopped())
            .await
            .unwrap();
    }
}
on_both!(a_periodic_kind_runs_once_per_interval_across_two_nodes);

/// A node that starts just after a periodic run — before the next run was enqueued, as when
/// the node that ran it died in between — does not run it again within the same interval.
async fn a_node_starting_just_after_a_periodic_run_does_not_repeat_it(backend: Backend) {
    let ticks = Arc::new(Flaky::default());
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap(),
    ));
    let node = || {
        Jobs::builder(
            db.store.clone(),
            clock.clone() as Arc<dyn Clock>,
            JobsConfig {
                queues: vec![("default".to_owned(), 2)],
                lease: Duration::from_millis(300),
                poll_interval: Duration::from_millis(10),
                ..JobsConfig::default()
            },
        )
        .register("tick", Shared(Arc::clone(&ticks)), options(1))
        .every("tick", Duration::from_secs(60))
        .build()
    };
    let calls = || ticks.calls.load(Ordering::SeqCst);
    let until_calls = |n: u32| async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            while calls() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("run {n} did not come"));
    };
    let first = node();
    let (stop, shutdown) = watch::channel(false);
    let workers = first.start(shutdown);
    until_calls(1).await;
    // The next run waits; take it away, as if the node had died before enqueueing it.
    let next = loop {
        let page = first
            .list(&unhidra_jobs::ListQuery {
                state: Some("scheduled".to_owned()),
                ..unhidra_jobs::ListQuery::default()
            })
            .await
            .unwrap();
        if let Some(job) = page.items.into_iter().next() {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), workers.stopped())
        .await
        .unwrap();
    first.cancel(next.id).await.unwrap();

    let second = node();
    let (stop, shutdown) = watch::channel(false);
    let workers = second.start(shutdown);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls(), 1, "the interval's run happened already");
    // The cancelled run of the next slot is skipped (cancelling a slot's run skips it); the
    // slot after it runs.
    clock.advance(chrono::Duration::seconds(121));
    until_calls(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls(), 2);
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), workers.stopped())
        .await
        .unwrap();
}
on_both!(a_node_starting_just_after_a_periodic_run_does_not_repeat_it);

/// Runs until stopped; counts how many of its runs are alive at once, and the most ever.
#[derive(Debug, Default)]
struct Watched {
    started: AtomicU32,
    alive: Arc<AtomicU32>,
    most: Arc<AtomicU32>,
}

/// Counts a run as alive until dropped (a stopped task drops its future).
struct Alive(Arc<AtomicU32>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Handler for Watched {
    async fn run(&self, _: &JobContext) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let _alive = Alive(Arc::clone(&self.alive));
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Waits (at most 10 s) until `done` holds of the job.
async fn until_seen(
    h: &Harness,
    id: Uuid,
    what: &str,
    done: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (job, _) = h.jobs.job(id).await.expect("job");
        if done(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A worker claims jobs ahead of its free slots; behind attempts that run long, those it holds
/// are handed back unstarted (their leases renewed meanwhile, shorter than the wait), their
/// attempt not counted, and run once slots free.
async fn jobs_claimed_ahead_behind_long_attempts_are_handed_back(backend: Backend) {
    let slow = Arc::new(Slow {
        for_: Duration::from_millis(1500),
        started: AtomicU32::new(0),
    });
    let quick = Arc::new(Flaky::default());
    let h = Harness::start(backend, Duration::from_millis(200), |b| {
        b.register("slow", Shared(Arc::clone(&slow)), options(1))
            .register("quick", Shared(Arc::clone(&quick)), options(1))
    })
    .await;
    // Four slow jobs fill the four slots; the quick ones are claimed ahead of them.
    let batch: Vec<(&str, serde_json::Value, EnqueueOptions)> = (0..7)
        .map(|n| {
            let kind = if n < 4 { "slow" } else { "quick" };
            (kind, json!({}), EnqueueOptions::default())
        })
        .collect();
    let enqueued = h
        .jobs
        .enqueue_many(batch.iter().map(|(k, p, o)| (*k, p, o.clone())))
        .await
        .unwrap();
    let ids: Vec<Uuid> = enqueued
        .iter()
        .map(|e| match e {
            Enqueued::New(job) => job.id,
            Enqueued::Existing(job) => panic!("{job:?}"),
        })
        .collect();
    let quick_ids = &ids[4..];
    until_seen(&h, quick_ids[0], "claimed ahead", |j| {
        j.state == JobState::Running
    })
    .await;
    let back = until_seen(&h, quick_ids[0], "handed back", |j| {
        j.state == JobState::Available
    })
    .await;
    assert_eq!(
        (back.attempt, back.leased_by.as_deref()),
        (0, None),
        "{back:?}"
    );
    assert_eq!(quick.calls.load(Ordering::SeqCst), 0, "not started");
    assert!(
        h.jobs.job(quick_ids[0]).await.unwrap().1.is_empty(),
        "no attempt kept"
    );
    // Once the long attempts end, each quick job runs once, as its first attempt.
    for id in quick_ids {
        let done = h.until(*id, JobState::Completed).await;
        let (_, attempts) = h.jobs.job(*id).await.unwrap();
        assert_eq!((done.attempt, attempts.len()), (1, 1), "{attempts:?}");
        assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    }
    assert_eq!(quick.calls.load(Ordering::SeqCst), 3);
    assert_eq!(counted(&h.jobs.metrics().lease_lost, "quick"), 0);
    h.stop().await;
}
on_both!(jobs_claimed_ahead_behind_long_attempts_are_handed_back);

/// A worker that stops hands back what it claimed ahead: not started, attempt not counted,
/// available to the next node at once.
async fn jobs_claimed_ahead_are_handed_back_at_shutdown(backend: Backend) {
    let slow = Arc::new(Slow {
        for_: Duration::from_millis(500),
        started: AtomicU32::new(0),
    });
    let quick = Arc::new(Flaky::default());
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("slow", Shared(Arc::clone(&slow)), options(1))
            .register("quick", Shared(Arc::clone(&quick)), options(1))
    })
    .await;
    let payload = json!({});
    let kinds = ["slow", "slow", "slow", "slow", "quick", "quick"];
    let enqueued = h
        .jobs
        .enqueue_many(
            kinds
                .iter()
                .map(|k| (*k, &payload, EnqueueOptions::default())),
        )
        .await
        .unwrap();
    let Enqueued::New(ahead) = &enqueued[4] else {
        panic!("{:?}", enqueued[4]);
    };
    until_seen(&h, ahead.id, "claimed ahead", |j| {
        j.state == JobState::Running
    })
    .await;
    let (clock, jobs) = (h.clock.clone(), h.jobs.clone());
    let mut h = h;
    h.stop.send_replace(true);
    let workers = h.workers.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), workers.stopped())
        .await
        .expect("workers stop");
    assert_eq!(quick.calls.load(Ordering::SeqCst), 0);
    for stored in &enqueued[4..] {
        let Enqueued::New(job) = stored else {
            unreachable!()
        };
        let (back, attempts) = jobs.job(job.id).await.unwrap();
        assert_eq!(
            (back.state, back.attempt, back.leased_by.as_deref()),
            (JobState::Available, 0, None),
            "{back:?}"
        );
        assert!(back.run_at <= clock.now(), "due at once: {back:?}");
        assert!(attempts.is_empty());
    }
    // The long attempts that started ran to their end; one that was never claimed before the
    // stop (jobs enqueued in the same instant are claimed in no set order) waits, untouched.
    let mut completed = 0;
    for stored in &enqueued[..4] {
        let Enqueued::New(job) = stored else {
            unreachable!()
        };
        let (back, _) = jobs.job(job.id).await.unwrap();
        match back.state {
            JobState::Completed => completed += 1,
            JobState::Available => assert_eq!(back.attempt, 0, "{back:?}"),
            other => panic!("{other:?}: {back:?}"),
        }
    }
    assert!(completed >= 1);
    assert_eq!(completed, slow.started.load(Ordering::SeqCst));
}
on_both!(jobs_claimed_ahead_are_handed_back_at_shutdown);

/// A lease that runs out under a running handler (the node stalled) stops that handler: the
/// job then runs again, but never two runs at once, on this node or any.
async fn a_lost_lease_stops_its_handler_so_a_job_never_runs_twice_at_once(backend: Backend) {
    let watched = Arc::new(Watched::default());
    let h = Harness::start(backend, Duration::from_millis(300), |b| {
        b.register("watched", Shared(Arc::clone(&watched)), options(5))
    })
    .await;
    let job = h.enqueue("watched").await;
    h.until(job.id, JobState::Running).await;
    for round in 1..=2u32 {
        // The node stalled past its lease: another node's rescue took the job back (due an
        // hour from now, so that the stopped run can be seen before the next one starts).
        // A rescue skips a row that a renewal holds locked at that moment: ask until it is
        // free.
        let later = h.clock.now() + chrono::Duration::hours(1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let rescued = loop {
            let rescued = h.db.store.rescue_expired_leases(later).await.unwrap();
            if !rescued.is_empty() || tokio::time::Instant::now() > deadline {
                break rescued;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(rescued, [("watched".to_owned(), 1)]);
        let wait = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while !done() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{what}"));
        };
        let alive = Arc::clone(&watched.alive);
        wait(
            "the run whose lease was lost is stopped",
            Box::new(move || alive.load(Ordering::SeqCst) == 0),
        )
        .await;
        h.clock.advance(chrono::Duration::hours(2));
        let w = Arc::clone(&watched);
        wait(
            "the job runs again",
            Box::new(move || w.started.load(Ordering::SeqCst) == round + 1),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        watched.most.load(Ordering::SeqCst),
        1,
        "never two runs at once"
    );
    assert_eq!(watched.alive.load(Ordering::SeqCst), 1);
    let (_, attempts) = h.jobs.job(job.id).await.unwrap();
    let lost = attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::LeaseLost)
        .count();
    assert_eq!(lost, 2);
    h.stop_now().await;
}
on_both!(a_lost_lease_stops_its_handler_so_a_job_never_runs_twice_at_once);

/// A handler's error is kept without NUL (which PostgreSQL text refuses) and bounded in
/// length, and the queue goes on.
async fn an_error_with_nul_and_many_bytes_is_kept_bounded(backend: Backend) {
    #[derive(Debug)]
    struct Nasty;
    #[async_trait]
    impl Handler for Nasty {
        async fn run(&self, _: &JobContext) -> Result<(), JobError> {
            Err(JobError::retry(format!("bad\0{}", "x".repeat(10_000))))
        }
    }
    let flaky = Arc::new(Flaky::default());
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register("nasty", Nasty, options(5)).register(
            "fine",
            Shared(Arc::clone(&flaky)),
            options(1),
        )
    })
    .await;
    let nasty = h.enqueue("nasty").await;
    let retryable = h.until(nasty.id, JobState::Retryable).await;
    let error = retryable.last_error.unwrap();
    assert!(error.starts_with("bad\u{fffd}xxx"), "{}", &error[..20]);
    assert!(error.len() <= 4100, "{}", error.len());
    let fine = h.enqueue("fine").await;
    h.until(fine.id, JobState::Completed).await;
    h.stop().await;
}
on_both!(an_error_with_nul_and_many_bytes_is_kept_bounded);

/// The counter of `kind` in `family`.
fn counted(
    family: &prometheus_client::metrics::family::Family<
        unhidra_jobs::metrics::KindLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    kind: &str,
) -> u64 {
    family
        .get_or_create(&unhidra_jobs::metrics::KindLabel {
            kind: kind.to_owned(),
        })
        .get()
}

/// The metrics count what the workers did, by kind; the `jobs` gauge counts the store's jobs.
async fn metrics_count_attempts_by_how_they_ended(backend: Backend) {
    let flaky = Arc::new(Flaky {
        failures: 1,
        ..Flaky::default()
    });
    let h = Harness::start(backend, Duration::from_millis(300), |b| {
        b.register("flaky", Shared(Arc::clone(&flaky)), options(5))
            .register(
                "bad",
                Flaky {
                    failures: 1,
                    permanent: true,
                    ..Flaky::default()
                },
                options(5),
            )
    })
    .await;
    let job = h.enqueue("flaky").await;
    let bad = h.enqueue("bad").await;
    h.until_attempt(job.id, JobState::Retryable, Some(1)).await;
    // Before the clock jumps past every lease (the claim of `bad` may commit with the retry).
    h.until(bad.id, JobState::Discarded).await;
    h.clock.advance(chrono::Duration::seconds(61));
    h.until(job.id, JobState::Completed).await;
    let m = h.jobs.metrics();
    // Counted when the end is recorded, which follows the state the test waited for closely.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counted(&m.completed, "flaky") + counted(&m.discarded, "bad") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "ends not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counted(&m.enqueued, "flaky"), 1);
    assert_eq!(counted(&m.started, "flaky"), 2);
    assert_eq!(counted(&m.failed, "flaky"), 1);
    assert_eq!(counted(&m.completed, "flaky"), 1);
    assert_eq!(counted(&m.discarded, "flaky"), 0);
    assert_eq!(counted(&m.discarded, "bad"), 1);
    assert_eq!(counted(&m.cancelled, "flaky"), 0);

    // The maintenance loop reads the store's counts every half lease.
    // (A guard of the family is held only for the read: the loop sets it meanwhile.)
    let completed = || {
        m.jobs
            .get_or_create(&unhidra_jobs::metrics::StateLabel { state: "completed" })
            .get()
    };
    while completed() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauge not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    m.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"jobs_completed_total{kind="flaky"} 1"#,
        r#"jobs_failed_total{kind="flaky"} 1"#,
        r#"jobs_run_duration_seconds_count{kind="flaky"} 2"#,
        r#"jobs_run_duration_seconds_count{kind="bad"} 1"#,
        // The retry waited on the manual clock: 61 s after its run_at at most.
        r#"jobs_queue_latency_seconds_count{queue="default"} 3"#,
        r#"jobs{state="completed"} 1"#,
        r#"jobs{state="discarded"} 1"#,
        r#"jobs{state="running"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in {text}");
    }
    h.stop().await;
}
on_both!(metrics_count_attempts_by_how_they_ended);

/// A lease rescued by this node counts as lost for its kind.
async fn a_rescued_lease_counts_as_lost(backend: Backend) {
    let h = Harness::start(backend, Duration::from_millis(300), |b| {
        b.register("flaky", Flaky::default(), options(5))
    })
    .await;
    let mut dead = h
        .jobs
        .new_job("flaky", &json!({}), EnqueueOptions::default())
        .unwrap();
    dead.queue = "elsewhere".to_owned();
    h.db.store.enqueue_job(&dead).await.unwrap();
    let now = h.clock.now();
    h.db.store
        .claim_jobs(
            "elsewhere",
            1,
            "dead-node/elsewhere",
            now,
            now + chrono::Duration::seconds(5),
        )
        .await
        .unwrap();
    h.clock.advance(chrono::Duration::seconds(6));
    h.until(dead.id, JobState::Retryable).await;
    // The rescue commits before the maintainer counts it: wait for the count, not the state.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counted(&h.jobs.metrics().lease_lost, "flaky") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease loss not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counted(&h.jobs.metrics().lease_lost, "flaky"), 1);
    h.stop().await;
}
on_both!(a_rescued_lease_counts_as_lost);

/// On PostgreSQL an enqueue on one node wakes the workers of another at once: node A works no
/// queue, node B polls once an hour.
#[tokio::test]
async fn an_enqueue_on_one_node_wakes_the_workers_of_another_on_postgres() {
    let flaky = Arc::new(Flaky::default());
    let db = TestDb::new(Backend::Postgres).await;
    db.store.migrate().await.unwrap();
    let other = db.another_handle().await;
    let clock: Arc<dyn Clock> = Arc::new(unhidra_core::SystemClock);
    let node = |store: Arc<dyn unhidra_store::Store>, queues: Vec<(String, u32)>| {
        Jobs::builder(
            store,
            Arc::clone(&clock),
            JobsConfig {
                queues,
                // Neither polling nor the lease's renewals wake a worker within the test.
                poll_interval: Duration::from_secs(3600),
                lease: Duration::from_secs(3600),
                ..JobsConfig::default()
            },
        )
        .register("flaky", Shared(Arc::clone(&flaky)), options(1))
        .build()
    };
    let a = node(db.store.clone(), vec![]);
    let b = node(other.store.clone(), vec![("default".to_owned(), 2)]);
    let (stop, shutdown) = watch::channel(false);
    let workers = [a.start(shutdown.clone()), b.start(shutdown)];
    // B's listener announces itself with a wake-up of every queue once its LISTEN holds.
    tokio::time::timeout(Duration::from_secs(10), async {
        while b.metrics().wakeups.get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("node B listens");
    for round in 1..=3 {
        // Let B's worker end what woke it last (the listener's first wake-up, or the previous
        // job's end) and go idle, so that only the enqueue's notification can wake it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.enqueue("flaky", &json!({}), EnqueueOptions::default())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while flaky.calls.load(Ordering::SeqCst) < round {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("node B did not hear of enqueue {round}"));
    }
    assert_eq!(counted(&a.metrics().enqueued, "flaky"), 3);
    stop.send_replace(true);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(10), w.stopped())
            .await
            .unwrap();
    }
}

/// Fails (worth a retry) while `down`; counts calls.
#[derive(Debug, Default)]
struct Dependency {
    down: std::sync::atomic::AtomicBool,
    calls: AtomicU32,
}

#[async_trait]
impl Handler for Dependency {
    async fn run(&self, _: &JobContext) -> Result<(), JobError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(JobError::retry("connection refused"));
        }
        Ok(())
    }
}

async fn an_open_circuit_holds_jobs_back_without_using_their_attempts(backend: Backend) {
    let dependency = Arc::new(Dependency::default());
    dependency.down.store(true, Ordering::SeqCst);
    let breaker = Breaker::new(
        "smtp",
        BreakerConfig {
            failures: 2,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
        },
    );
    let h = Harness::start(backend, Duration::from_secs(30), |b| {
        b.register(
            "needs_smtp",
            Shared(Arc::clone(&dependency)),
            KindOptions {
                breaker: Some(Arc::clone(&breaker)),
                ..options(2)
            },
        )
    })
    .await;
    assert_eq!(h.jobs.breakers().len(), 1);
    let first = h.enqueue("needs_smtp").await;
    let second = h.enqueue("needs_smtp").await;
    h.until_attempt(first.id, JobState::Retryable, Some(1))
        .await;
    h.until_attempt(second.id, JobState::Retryable, Some(1))
        .await;
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(dependency.calls.load(Ordering::SeqCst), 2);

    // While it is open, due jobs are handed back unstarted: no call, no attempt used.
    let waiting: Vec<JobRecord> = [h.enqueue("needs_smtp").await, h.enqueue("needs_smtp").await]
        .into_iter()
        .collect();
    for job in &waiting {
        let back = h.until_attempt(job.id, JobState::Scheduled, Some(0)).await;
        assert!(
            back.last_error
                .as_deref()
                .unwrap()
                .contains("circuit of smtp is open")
        );
        assert!(back.run_at >= h.clock.now() + chrono::Duration::seconds(30));
        let (_, attempts) = h.jobs.job(job.id).await.unwrap();
        assert!(attempts.is_empty(), "no attempt is recorded");
    }
    // The first two come due again before the circuit's time is up: they wait too, keeping
    // the one attempt they have left.
    h.clock.advance(chrono::Duration::seconds(20));
    for job in [&first, &second] {
        let back = h
            .until_due_after(job.id, chrono::Duration::seconds(10))
            .await;
        assert_eq!(
            (back.state, back.attempt),
            (JobState::Retryable, 1),
            "{back:?}"
        );
        // The hand-back leaves the error of the attempt that really ran.
        assert_eq!(
            back.last_error.as_deref(),
            Some("connection refused"),
            "{back:?}"
        );
    }
    assert_eq!(dependency.calls.load(Ordering::SeqCst), 2);

    // Back up: once the circuit's time is up, one probe runs and closes it (the others due at
    // once wait another `open_for`), and the rest follow.
    dependency.down.store(false, Ordering::SeqCst);
    h.clock.advance(chrono::Duration::seconds(12));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while breaker.state() != BreakerState::Closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            breaker.state()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        dependency.calls.load(Ordering::SeqCst),
        3,
        "the probe alone"
    );
    h.clock.advance(chrono::Duration::seconds(32));
    for job in [&first, &second] {
        let done = h.until(job.id, JobState::Completed).await;
        assert_eq!(done.attempt, 2);
    }
    for job in &waiting {
        let done = h.until(job.id, JobState::Completed).await;
        assert_eq!(done.attempt, 1, "the attempts handed back were not counted");
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(
        dependency.calls.load(Ordering::SeqCst),
        6,
        "one call per job that ran"
    );
    let deferred = h
        .jobs
        .metrics()
        .deferred
        .get_or_create(&unhidra_jobs::metrics::KindLabel {
            kind: "needs_smtp".to_owned(),
        })
        .get();
    assert!(deferred >= 4, "{deferred}");
    h.stop().await;
}
on_both!(an_open_circuit_holds_jobs_back_without_using_their_attempts);
