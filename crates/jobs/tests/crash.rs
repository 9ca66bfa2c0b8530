//! A node killed with `kill -9` in the middle of a job loses nothing: once its lease ends,
//! another node runs the job, counting the lost attempt, and the job completes once.
//!
//! The killed node is this test binary run again as a child process: with
//! `UNHIDRA_JOBS_CRASH_CHILD` set, the test works the queue with a handler that never ends.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::watch;
use unhidra_core::{Clock, SystemClock};
use unhidra_jobs::{EnqueueOptions, Handler, JobContext, JobError, Jobs, JobsConfig, KindOptions};
use unhidra_store::jobs::{AttemptOutcome, Enqueued, JobState};
use unhidra_store::testing::TestDb;
use unhidra_store::{Backend, StoreOptions};

const CHILD: &str = "UNHIDRA_JOBS_CRASH_CHILD";
const MARKER: &str = "UNHIDRA_JOBS_CRASH_MARKER";

/// Says it started (in a file the parent watches), then never ends.
#[derive(Debug)]
struct Hang(PathBuf);

#[async_trait]
impl Handler for Hang {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        std::fs::write(&self.0, job.id.to_string()).unwrap();
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Completes, counting its runs.
#[derive(Debug, Default)]
struct Count(Arc<AtomicU32>);

#[async_trait]
impl Handler for Count {
    async fn run(&self, _: &JobContext) -> Result<(), JobError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn config(queues: &[&str]) -> JobsConfig {
    JobsConfig {
        queues: queues.iter().map(|q| ((*q).to_owned(), 1)).collect(),
        lease: Duration::from_secs(1),
        poll_interval: Duration::from_millis(20),
        ..JobsConfig::default()
    }
}

fn kind() -> KindOptions {
    KindOptions {
        max_attempts: 3,
        timeout: Duration::from_secs(3600),
        ..KindOptions::default()
    }
}

/// The child: works the default queue until it is killed.
async fn child(url: &str, marker: PathBuf) {
    let store = unhidra_store::connect(url, &StoreOptions::default())
        .await
        .unwrap();
    let jobs = Jobs::builder(store, Arc::new(SystemClock), config(&["default"]))
        .register("work", Hang(marker), kind())
        .build();
    let (_stop, shutdown) = watch::channel(false);
    let _workers = jobs.start(shutdown);
    std::future::pending::<()>().await;
}

async fn a_node_killed_mid_job_loses_nothing(backend: Backend, test_name: &str) {
    if let Ok(url) = std::env::var(CHILD) {
        child(&url, std::env::var(MARKER).unwrap().into()).await;
        return;
    }
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // This node only enqueues, until the child is dead.
    let survivor = Jobs::builder(db.store.clone(), clock, config(&["default"]))
        .register("work", Count(Arc::clone(&runs)), kind())
        .build();
    let Enqueued::New(job) = survivor
        .enqueue("work", &json!({}), EnqueueOptions::default())
        .await
        .unwrap()
    else {
        panic!("a new job")
    };

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, &db.url)
        .env(MARKER, &marker)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        while !marker.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if started.is_err() {
        let _ = child.kill();
        panic!("the child node never started the job");
    }
    let (running, _) = survivor.job(job.id).await.unwrap();
    assert_eq!(running.state, JobState::Running);
    let dead_worker = running.leased_by.clone().unwrap();
    // SIGKILL: no shutdown, no report, the lease simply stops being renewed.
    child.kill().unwrap();
    child.wait().unwrap();

    let (stop, shutdown) = watch::channel(false);
    let workers = survivor.start(shutdown);
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (job, attempts) = survivor.job(job.id).await.unwrap();
            if job.state == JobState::Completed {
                return (job, attempts);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job completes on the surviving node");
    let (job, attempts) = done;
    assert_eq!(job.attempt, 2, "the lost attempt counts");
    let outcomes: Vec<(AttemptOutcome, &str)> = attempts
        .iter()
        .map(|a| (a.outcome, a.worker.as_str()))
        .collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(
        outcomes[0],
        (AttemptOutcome::LeaseLost, dead_worker.as_str())
    );
    assert_eq!(outcomes[1].0, AttemptOutcome::Completed);
    assert_ne!(outcomes[1].1, dead_worker);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "completed once");
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), workers.stopped())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_node_killed_mid_job_loses_nothing_sqlite() {
    a_node_killed_mid_job_loses_nothing(
        Backend::Sqlite,
        "a_node_killed_mid_job_loses_nothing_sqlite",
    )
    .await;
}

#[tokio::test]
async fn a_node_killed_mid_job_loses_nothing_postgres() {
    a_node_killed_mid_job_loses_nothing(
        Backend::Postgres,
        "a_node_killed_mid_job_loses_nothing_postgres",
    )
    .await;
}
