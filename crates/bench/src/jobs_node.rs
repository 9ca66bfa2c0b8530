//! One Unhidra job node for `unhidra-bench jobs`, run as a child process of the bench
//! (`unhidra-bench jobs-node`): a [`Jobs`] over the store a URL names, with the workers of one
//! queue, a no-op kind and a kind that reports when it starts. The bench drives it with lines
//! on stdin and reads its answers on stdout, in the protocol that
//! `bench/peers/graphile-worker/node.js` speaks too (see [`crate::jobs_child`]).
//!
//! The kinds are registered by [`kinds`], which the bench's own enqueuing node (one that runs
//! no workers) uses as well.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use unhidra_core::SystemClock;
use unhidra_jobs::metrics::KindLabel;
use unhidra_jobs::{
    EnqueueOptions, Handler, JobContext, JobError, Jobs, JobsBuilder, JobsConfig, KindOptions,
};
use unhidra_store::{Store, StoreOptions};

use crate::BoxError;

/// The queue the bench's jobs go to.
pub const QUEUE: &str = "bench";
/// The no-op kind of the throughput test.
pub const NOOP: &str = "bench.noop";
/// The kind of the latency test: its payload carries `seq` and `t`, the wall clock in
/// microseconds just before its enqueue.
pub const LATENCY: &str = "bench.latency";
/// How often a node tells the bench how many jobs it has completed.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(2);
/// How long an in-process latency sample may take to start.
const START_WITHIN: Duration = Duration::from_secs(10);

/// The hidden `jobs-node` subcommand.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The store: `postgres://…` or `sqlite:PATH`, already migrated.
    #[arg(long)]
    pub url: String,
    /// Jobs this node runs at once (its one queue's concurrency).
    #[arg(long)]
    pub concurrency: u32,
    /// This node's name in leases and attempts.
    #[arg(long)]
    pub name: String,
}

/// Microseconds since the Unix epoch: the clock every process of the bench reads, so that an
/// enqueue in one process and a start in another can be compared.
pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The store options of every connection pool of the bench: `concurrency + 1` connections,
/// as graphile-worker's perfTest sizes its pool.
pub fn store_options(concurrency: u32) -> StoreOptions {
    StoreOptions {
        max_connections: concurrency.saturating_add(1),
        ..StoreOptions::default()
    }
}

#[derive(Debug)]
struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn run(&self, _job: &JobContext) -> Result<(), JobError> {
        Ok(())
    }
}

/// Reports the start of a latency job: `started SEQ LATENCY_US` on stdout, and its `seq` to an
/// enqueuer in this process that waits for it.
#[derive(Debug)]
struct Latency {
    out: mpsc::UnboundedSender<String>,
    started: mpsc::UnboundedSender<u64>,
}

#[async_trait]
impl Handler for Latency {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        let now = wall_micros();
        let field = |name: &str| job.payload.get(name).and_then(serde_json::Value::as_u64);
        let (Some(seq), Some(at)) = (field("seq"), field("t")) else {
            return Err(JobError::permanent("a latency job carries seq and t"));
        };
        let _ = self
            .out
            .send(format!("started {seq} {}", now.saturating_sub(at)));
        let _ = self.started.send(seq);
        Ok(())
    }
}

/// The bench's two kinds, registered on `builder`: the no-op and the latency kind, both in
/// [`QUEUE`], one attempt each. A latency job's start goes to `out` and `started`.
pub fn kinds(
    builder: JobsBuilder,
    out: mpsc::UnboundedSender<String>,
    started: mpsc::UnboundedSender<u64>,
) -> JobsBuilder {
    let options = KindOptions {
        queue: QUEUE.to_owned(),
        max_attempts: 1,
        ..KindOptions::default()
    };
    builder.register(NOOP, Noop, options.clone()).register(
        LATENCY,
        Latency { out, started },
        options,
    )
}

/// A job node over `store`: `concurrency` workers of [`QUEUE`] (none: a node that only
/// enqueues), the product's defaults otherwise (a 30 s lease, a 1 s poll).
pub fn node(
    store: Arc<dyn Store>,
    concurrency: u32,
    name: &str,
    out: mpsc::UnboundedSender<String>,
    started: mpsc::UnboundedSender<u64>,
) -> Arc<Jobs> {
    let queues = if concurrency == 0 {
        Vec::new()
    } else {
        vec![(QUEUE.to_owned(), concurrency)]
    };
    let config = JobsConfig {
        queues,
        node: name.to_owned(),
        ..JobsConfig::default()
    };
    kinds(
        Jobs::builder(store, Arc::new(SystemClock), config),
        out,
        started,
    )
    .build()
}

/// Enqueues a latency job stamped with the wall clock just before the call.
pub async fn enqueue_latency(jobs: &Jobs, seq: u64) -> Result<(), BoxError> {
    let payload = serde_json::json!({ "seq": seq, "t": wall_micros() });
    jobs.enqueue(LATENCY, &payload, EnqueueOptions::default())
        .await?;
    Ok(())
}

/// Completions of no-op jobs this node has recorded in the store.
fn completed(jobs: &Jobs) -> u64 {
    jobs.metrics()
        .completed
        .get_or_create(&KindLabel {
            kind: NOOP.to_owned(),
        })
        .get()
}

/// The `jobs-node` process: connects, says `ready`, then follows the bench's commands until
/// `stop` or the end of stdin, and says `stopped` once its workers have stopped.
pub async fn run(args: &NodeArgs) -> Result<(), BoxError> {
    let (out, lines) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(write_lines(lines));
    let result = serve(args, &out).await;
    if let Err(e) = &result {
        let _ = out.send(format!("error {}", e.to_string().replace('\n', " | ")));
    }
    drop(out);
    let _ = writer.await;
    result
}

async fn serve(args: &NodeArgs, out: &mpsc::UnboundedSender<String>) -> Result<(), BoxError> {
    let store = unhidra_store::connect(&args.url, &store_options(args.concurrency)).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let jobs = node(
        Arc::clone(&store),
        args.concurrency.max(1),
        &args.name,
        out.clone(),
        started_tx,
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (quiet, quiet_rx) = watch::channel(false);
    let mut workers = None;
    let _ = out.send("ready".to_owned());
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["go"] if workers.is_none() => {
                workers = Some(jobs.start(shutdown_rx.clone()));
                let _ = out.send(format!("running {}", wall_micros()));
                tokio::spawn(report_progress(
                    Arc::clone(&jobs),
                    out.clone(),
                    quiet_rx.clone(),
                ));
            }
            ["quiet"] => {
                quiet.send_replace(true);
            }
            ["latency", samples, gap_ms] => {
                let samples: u64 = samples.parse()?;
                let gap = Duration::from_millis(gap_ms.parse()?);
                // Starts of jobs that the bench enqueued earlier are not this run's.
                while started.try_recv().is_ok() {}
                for seq in 0..samples {
                    enqueue_latency(&jobs, seq).await?;
                    tokio::time::timeout(START_WITHIN, async {
                        while let Some(got) = started.recv().await {
                            if got == seq {
                                return;
                            }
                        }
                    })
                    .await
                    .map_err(|_| {
                        format!("latency job {seq} did not start within {START_WITHIN:?}")
                    })?;
                    tokio::time::sleep(gap).await;
                }
                let _ = out.send("latency-done".to_owned());
            }
            ["stop"] => break,
            _ => return Err(format!("unknown command {line:?}").into()),
        }
    }
    shutdown.send_replace(true);
    quiet.send_replace(true);
    if let Some(workers) = workers {
        workers.stopped().await;
    }
    store.close().await;
    let _ = out.send("stopped".to_owned());
    Ok(())
}

/// Says `progress N T_US` whenever the count of completed no-op jobs changed, every
/// [`PROGRESS_EVERY`], until `quiet`.
async fn report_progress(
    jobs: Arc<Jobs>,
    out: mpsc::UnboundedSender<String>,
    mut quiet: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = completed(&jobs);
                if reported != Some(now) {
                    reported = Some(now);
                    let _ = out.send(format!("progress {now} {}", wall_micros()));
                }
            }
            _ = quiet.wait_for(|q| *q) => return,
        }
    }
}

/// Writes each line to stdout as it comes, so that lines of several tasks never mix.
async fn write_lines(mut lines: mpsc::UnboundedReceiver<String>) {
    let mut stdout = tokio::io::stdout();
    while let Some(mut line) = lines.recv().await {
        line.push('\n');
        if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
            return;
        }
    }
}
