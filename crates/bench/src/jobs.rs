//! `unhidra-bench jobs`: the durable job queue's throughput and latency, on SQLite embedded and
//! on PostgreSQL with one and two nodes, side by side with graphile-worker on the same
//! PostgreSQL server.
//!
//! Every measurement gets a database of its own ([`TempDb`]) and nodes of its own, each a child
//! process ([`Nodes`]): Unhidra's is this program's hidden `jobs-node` subcommand
//! ([`crate::jobs_node`]), graphile-worker's is `node.js` in `bench/peers/graphile-worker`.
//!
//! - **Throughput.** The queue is filled first with `jobs` no-op jobs, while no worker runs, in
//!   batches of 1000 (Unhidra: `Jobs::enqueue_many` from the bench; graphile-worker: `addJobs`,
//!   as its perfTest). Then the nodes are
//!   told `go` at once and drain it. The time runs from `go` until every job's completion is in
//!   the database: for Unhidra, until the nodes' counts of completions they recorded add up to
//!   `jobs`; for graphile-worker (which reports a task before its completion is written), until
//!   its tasks have all run and then its jobs table is seen empty.
//! - **Latency.** With the queue empty, one latency job at a time: the time from just before
//!   the enqueue call to the start of its handler, the next one `gap` after the previous one
//!   started. With one node, the node enqueues them itself, as graphile-worker's
//!   perfTest/latencyTest.js does; with two or more, the bench enqueues them (Unhidra: from a
//!   node of its own that runs no workers; graphile-worker: `add_job` on a connection of its
//!   own), so that any node may start each, woken by PostgreSQL's NOTIFY.
//! - **Batches.** After an Unhidra drain, the jobs' claim and end times tell how
//!   many jobs each claim and each transaction that recorded ends carried ([`Batches`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use unhidra_jobs::{EnqueueOptions, Jobs};
use unhidra_store::jobs::{JobFilter, JobState};

use crate::jobs_child::{Event, Nodes};
use crate::jobs_db::TempDb;
use crate::jobs_node::{self, NOOP, wall_micros};
use crate::{BoxError, peer, server};

/// Drain jobs/s ÷ graphile-worker's must be at least this (PostgreSQL).
pub const THROUGHPUT_RATIO_TARGET: f64 = 1.0;
/// SQLite embedded must drain at least this many jobs a second.
pub const SQLITE_TARGET: f64 = 10_000.0;
/// graphile-worker's published average latency from `add_job` to the start of the job.
pub const GRAPHILE_WORKER_PUBLISHED_MS: f64 = 4.16;
/// The batch of one enqueue while the queue is filled: Unhidra's `Jobs::enqueue_many`,
/// graphile-worker's `addJobs`.
pub const PREFILL_BATCH: u64 = 1000;
/// How long a node gets to connect (and graphile-worker to install its schema).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a latency sample enqueued by the bench may take to start.
const START_WITHIN: Duration = Duration::from_secs(10);
/// How often graphile-worker's jobs table is looked at once its tasks have all run.
const EMPTY_POLL: Duration = Duration::from_millis(1);

/// The systems the scenario can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Unhidra's job queue on SQLite, one node.
    Sqlite,
    /// Unhidra's job queue on PostgreSQL, with each `--nodes` count.
    Postgres,
    /// graphile-worker on the same PostgreSQL, with each `--nodes` count of processes.
    GraphileWorker,
}

/// How graphile-worker's runners are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerConfig {
    /// Its perfTest's: a local queue of 500 jobs (10 ms refetch delay), completions batched.
    Perftest,
    /// Its defaults: each worker fetches one job at a time and completes it alone.
    Defaults,
}

impl PeerConfig {
    /// The argument of `node.js`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Perftest => "perftest",
            Self::Defaults => "defaults",
        }
    }

    /// What it sets, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Perftest => {
                "its perfTest configuration: localQueue size 500 with a 10 ms refetch delay, \
                 completeJobBatchDelay 0 and failJobBatchDelay 0"
            }
            Self::Defaults => {
                "its defaults: no local queue (each worker fetches one job at a time) and no \
                 batching of completions"
            }
        }
    }
}

/// What one run of the scenario is asked to do.
#[derive(Debug, Clone)]
pub struct Settings {
    /// No-op jobs in the pre-filled queue.
    pub jobs: u64,
    /// Jobs each node runs at once.
    pub concurrency: u32,
    /// Latency samples per measurement.
    pub samples: u64,
    /// The pause after a latency sample started, before the next is enqueued.
    pub gap: Duration,
    /// The longest a drain may take.
    pub drain_within: Duration,
    /// What to measure.
    pub targets: Vec<Target>,
    /// Node counts on PostgreSQL.
    pub nodes: Vec<u32>,
    /// The PostgreSQL server (its database is only used to create and drop others).
    pub postgres: String,
    /// graphile-worker's configuration.
    pub peer_config: PeerConfig,
}

/// Which system a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Unhidra on SQLite.
    UnhidraSqlite,
    /// Unhidra on PostgreSQL.
    UnhidraPostgres,
    /// graphile-worker.
    GraphileWorker,
}

impl System {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnhidraSqlite => "Unhidra, SQLite",
            Self::UnhidraPostgres => "Unhidra, PostgreSQL",
            Self::GraphileWorker => "graphile-worker",
        }
    }
}

/// One measurement: a system with a number of nodes.
#[derive(Debug, Clone)]
pub struct Run {
    /// The system.
    pub system: System,
    /// Its nodes (processes).
    pub nodes: u32,
    /// What it measured, or why it could not.
    pub result: Result<Measured, String>,
}

/// CPU used over a drain, in cores (1.0 = one CPU all along).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// By the nodes' processes.
    pub nodes: f64,
    /// By every PostgreSQL process of the machine.
    pub postgres: f64,
    /// By the bench itself.
    pub bench: f64,
    /// By the whole machine (steal excluded).
    pub machine: Option<f64>,
    /// Taken by the hypervisor.
    pub steal: Option<f64>,
}

impl CpuUse {
    /// The machine's CPU that none of the measured processes used.
    pub fn others(&self) -> Option<f64> {
        self.machine
            .map(|m| (m - self.nodes - self.postgres - self.bench).max(0.0))
    }
}

/// What one measurement found.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Jobs pre-filled, and how long that took.
    pub prefill_seconds: f64,
    /// From `go` to the last completion in the database.
    pub drain_seconds: f64,
    /// Jobs drained.
    pub jobs: u64,
    /// From `go` to the first node saying its workers run.
    pub startup_ms: Option<f64>,
    /// CPU during the drain.
    pub cpu: CpuUse,
    /// What the database held after the drain: completed jobs (Unhidra), or jobs left
    /// (graphile-worker, which deletes a completed job).
    pub after: String,
    /// Enqueue to start, in microseconds, sorted.
    pub latency_us: Vec<u64>,
    /// How the latency jobs were enqueued and woken.
    pub latency_path: &'static str,
    /// How many latency jobs each node started.
    pub started_by: Vec<u64>,
    /// What ran, with versions.
    pub program: String,
    /// How Unhidra's workers batched the drain, if the store could tell.
    pub batches: Option<Batches>,
}

/// How many claims and transactions Unhidra's workers needed for the drain, read back from
/// the store: every job claimed by one claim keeps the claim's time (`jobs.attempted_at`), and
/// every end recorded by one transaction has that transaction's time (`jobs.finished_at`).
#[derive(Debug, Clone, Copy)]
pub struct Batches {
    /// Claims that took at least one job.
    pub claims: u64,
    /// Transactions that recorded ends (each with the claim after them).
    pub finishes: u64,
    /// No-op jobs completed.
    pub attempts: u64,
}

impl Batches {
    /// Jobs per claim.
    pub fn per_claim(&self) -> f64 {
        self.attempts as f64 / self.claims.max(1) as f64
    }

    /// Jobs per transaction that recorded ends.
    pub fn per_finish(&self) -> f64 {
        self.attempts as f64 / self.finishes.max(1) as f64
    }
}

/// The SQL of [`Batches`]: a diagnostic that reads the store's table directly (it knows the
/// schema of `jobs`), so a failure only leaves the figures out.
const BATCHES_SQL: &str = "SELECT COUNT(DISTINCT attempted_at), COUNT(DISTINCT finished_at), \
    COUNT(*) FROM jobs WHERE kind = 'bench.noop' AND state = 'completed'";

async fn batches(url: &str) -> Option<Batches> {
    let row: (i64, i64, i64) = if url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(url).await.ok()?;
        let row = sqlx::query_as(BATCHES_SQL)
            .fetch_one(&mut connection)
            .await
            .ok();
        let _ = connection.close().await;
        row?
    } else {
        let mut connection = PgConnection::connect(url).await.ok()?;
        let row = sqlx::query_as(BATCHES_SQL)
            .fetch_one(&mut connection)
            .await
            .ok();
        let _ = connection.close().await;
        row?
    };
    let count = |n: i64| u64::try_from(n).ok();
    Some(Batches {
        claims: count(row.0)?,
        finishes: count(row.1)?,
        attempts: count(row.2)?,
    })
}

impl Measured {
    /// Jobs drained per second.
    pub fn jobs_per_sec(&self) -> f64 {
        if self.drain_seconds > 0.0 {
            self.jobs as f64 / self.drain_seconds
        } else {
            0.0
        }
    }

    /// Jobs pre-filled per second.
    pub fn prefill_per_sec(&self) -> f64 {
        if self.prefill_seconds > 0.0 {
            self.jobs as f64 / self.prefill_seconds
        } else {
            0.0
        }
    }

    /// The latency at quantile `q` (nearest rank), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        let n = self.latency_us.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latency_us.get(rank - 1).map(|us| *us as f64 / 1000.0)
    }
}

/// Runs every measurement the settings ask for, one after the other: SQLite, then for each
/// node count Unhidra on PostgreSQL and graphile-worker, next to each other in time. Unhidra
/// failing fails the command; graphile-worker failing (or missing) is reported.
pub async fn run(settings: &Settings) -> Result<Vec<Run>, BoxError> {
    let mut runs = Vec::new();
    if settings.targets.contains(&Target::Sqlite) {
        let measured = unhidra(settings, System::UnhidraSqlite, 1).await?;
        runs.push(Run {
            system: System::UnhidraSqlite,
            nodes: 1,
            result: Ok(measured),
        });
    }
    let peer = if settings.targets.contains(&Target::GraphileWorker) {
        Some(peer::graphile_worker().await.map_err(|e| e.to_string()))
    } else {
        None
    };
    for &nodes in &settings.nodes {
        if settings.targets.contains(&Target::Postgres) {
            let measured = unhidra(settings, System::UnhidraPostgres, nodes).await?;
            runs.push(Run {
                system: System::UnhidraPostgres,
                nodes,
                result: Ok(measured),
            });
        }
        if let Some(peer) = &peer {
            let result = match peer {
                Ok((node, folder, program)) => {
                    graphile_worker(settings, node, folder, program, nodes)
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = &result {
                crate::note(&format!(
                    "jobs: graphile-worker with {nodes} node(s) skipped: {e}"
                ));
            }
            runs.push(Run {
                system: System::GraphileWorker,
                nodes,
                result,
            });
        }
    }
    Ok(runs)
}

/// One measurement of Unhidra's queue, in a database of its own.
async fn unhidra(settings: &Settings, system: System, nodes: u32) -> Result<Measured, BoxError> {
    let db = match system {
        System::UnhidraSqlite => TempDb::sqlite()?,
        _ => TempDb::postgres(&settings.postgres, "unhidra_bench_jobs").await?,
    };
    crate::note(&format!(
        "jobs: {} with {nodes} node(s), {} jobs, concurrency {} per node",
        system.name(),
        settings.jobs,
        settings.concurrency
    ));
    let result = unhidra_in(settings, nodes, db.url()).await;
    db.remove().await;
    result
}

async fn unhidra_in(settings: &Settings, count: u32, url: &str) -> Result<Measured, BoxError> {
    // The bench's own pool: the pre-fill and the latency samples use a connection at a time.
    let store = unhidra_store::connect(url, &jobs_node::store_options(4)).await?;
    let result = async {
        store.migrate().await?;
        // The bench's own node runs no workers: it fills the queue, and enqueues the latency
        // jobs of the two-node case.
        let (out, _) = mpsc::unbounded_channel();
        let (started, _) = mpsc::unbounded_channel();
        let enqueuer = jobs_node::node(Arc::clone(&store), 0, "bench", out, started);
        let prefill_seconds =
            tokio::time::timeout(settings.drain_within, prefill(&enqueuer, settings.jobs))
                .await
                .map_err(|_| {
                    format!(
                        "the pre-fill did not finish within {:?}",
                        settings.drain_within
                    )
                })??;
        crate::note(&format!(
            "jobs: pre-filled {} jobs in {prefill_seconds:.2} s",
            settings.jobs
        ));
        let exe = std::env::current_exe()?;
        let mut nodes = Nodes::new();
        for i in 0..count {
            let mut command = Command::new(&exe);
            command
                .arg("jobs-node")
                .arg("--url")
                .arg(url)
                .arg("--concurrency")
                .arg(settings.concurrency.to_string())
                .arg("--name")
                .arg(format!("bench-node-{i}"));
            nodes
                .start(command, format!("Unhidra node {i}"), READY_WITHIN)
                .await?;
        }
        let (drain_seconds, startup_ms, cpu) = drain(&mut nodes, settings, None).await?;
        let completed = store
            .count_jobs(&JobFilter {
                state: Some(JobState::Completed),
                kind: Some(NOOP.to_owned()),
                ..JobFilter::default()
            })
            .await?;
        let batches = batches(url).await;
        let (latency_us, started_by, latency_path) = if count == 1 {
            let (latency, by) = latency_by_node(&mut nodes, settings).await?;
            (
                latency,
                by,
                "enqueued on the node that runs it (as graphile-worker's latencyTest)",
            )
        } else {
            let (latency, by) =
                latency_from_bench(&mut nodes, Enqueuer::Unhidra(&enqueuer), settings).await?;
            (
                latency,
                by,
                "enqueued by the bench's own node (no workers), every node woken by NOTIFY",
            )
        };
        nodes.stop().await;
        Ok(Measured {
            prefill_seconds,
            drain_seconds,
            jobs: settings.jobs,
            startup_ms,
            cpu,
            after: format!("{} completed", crate::report::thousands(completed as f64)),
            latency_us,
            latency_path,
            started_by,
            program: format!(
                "unhidra-bench jobs-node {} (unhidra-jobs over unhidra-store)",
                env!("CARGO_PKG_VERSION")
            ),
            batches,
        })
    }
    .await;
    store.close().await;
    result
}

/// Fills the queue with `count` no-op jobs, [`PREFILL_BATCH`] per `Jobs::enqueue_many` call (one
/// transaction each), as graphile-worker's perfTest calls `addJobs`; answers the seconds it
/// took.
async fn prefill(jobs: &Arc<Jobs>, count: u64) -> Result<f64, BoxError> {
    let began = Instant::now();
    let mut next = 0;
    while next < count {
        let end = (next + PREFILL_BATCH).min(count);
        let payloads: Vec<serde_json::Value> = (next..end)
            .map(|i| serde_json::json!({ "id": i }))
            .collect();
        jobs.enqueue_many(
            payloads
                .iter()
                .map(|payload| (NOOP, payload, EnqueueOptions::default())),
        )
        .await?;
        next = end;
    }
    Ok(began.elapsed().as_secs_f64())
}

/// Tells every node `go` and waits until the queue is drained: the nodes' progress adds up to
/// `settings.jobs`, and then, for graphile-worker (given a connection to its database), its
/// jobs table is empty. Answers the drain's
/// seconds, the time until the first node said its workers run, and the CPU used meanwhile.
async fn drain(
    nodes: &mut Nodes,
    settings: &Settings,
    peer_table: Option<&mut PgConnection>,
) -> Result<(f64, Option<f64>, CpuUse), BoxError> {
    let pids = nodes.pids();
    let before = CpuSample::take(&pids);
    let go_at = wall_micros();
    nodes.send_all("go").await?;
    let deadline = Instant::now() + settings.drain_within;
    let mut progress: HashMap<usize, u64> = HashMap::new();
    let mut first_running = None;
    let done_at = loop {
        let (i, event) = nodes.next(deadline).await.map_err(|e| {
            format!(
                "the drain did not finish within {:?} ({e})",
                settings.drain_within
            )
        })?;
        match event {
            Event::Running { at_us } => {
                first_running = Some(first_running.map_or(at_us, |t: u64| t.min(at_us)));
            }
            Event::Progress { count, at_us } => {
                progress.insert(i, count);
                if progress.values().sum::<u64>() >= settings.jobs {
                    break at_us;
                }
            }
            _ => {}
        }
    };
    let done_at = match peer_table {
        None => done_at,
        Some(connection) => {
            loop {
                let left: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM graphile_worker._private_jobs")
                        .fetch_one(&mut *connection)
                        .await?;
                if left == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("{left} jobs still in graphile-worker's table").into());
                }
                tokio::time::sleep(EMPTY_POLL).await;
            }
            wall_micros()
        }
    };
    let after = CpuSample::take(&pids);
    nodes.send_all("quiet").await?;
    let seconds = done_at.saturating_sub(go_at) as f64 / 1e6;
    let startup_ms = first_running.map(|t| t.saturating_sub(go_at) as f64 / 1000.0);
    crate::note(&format!(
        "jobs: drained {} jobs in {seconds:.3} s ({:.0} jobs/s)",
        settings.jobs,
        settings.jobs as f64 / seconds.max(1e-9)
    ));
    Ok((seconds, startup_ms, before.until(&after)))
}

/// Node 0 enqueues the latency jobs itself; answers the sorted latencies and how many each
/// node started.
async fn latency_by_node(
    nodes: &mut Nodes,
    settings: &Settings,
) -> Result<(Vec<u64>, Vec<u64>), BoxError> {
    nodes
        .send(
            0,
            &format!("latency {} {}", settings.samples, settings.gap.as_millis()),
        )
        .await?;
    let samples = u32::try_from(settings.samples).unwrap_or(u32::MAX);
    let deadline = Instant::now() + (START_WITHIN + settings.gap) * samples;
    let mut latencies = Vec::new();
    let mut by = vec![0; nodes.len()];
    loop {
        match nodes.next(deadline).await? {
            (i, Event::Started { latency_us, .. }) => {
                latencies.push(latency_us);
                if let Some(n) = by.get_mut(i) {
                    *n += 1;
                }
            }
            (0, Event::LatencyDone) => break,
            _ => {}
        }
    }
    latencies.sort_unstable();
    Ok((latencies, by))
}

/// How the bench enqueues a latency job itself, stamped with the wall clock before the call.
#[derive(Debug)]
enum Enqueuer<'a> {
    /// Through its own Unhidra node, which runs no workers.
    Unhidra(&'a Jobs),
    /// With graphile-worker's `add_job` on a connection of its own.
    GraphileWorker(&'a mut PgConnection),
}

impl Enqueuer<'_> {
    async fn enqueue(&mut self, seq: u64) -> Result<(), BoxError> {
        match self {
            Self::Unhidra(jobs) => jobs_node::enqueue_latency(jobs, seq).await,
            Self::GraphileWorker(connection) => {
                sqlx::query(
                    "SELECT graphile_worker.add_job('latency', \
                     json_build_object('seq', $1::bigint, 't', $2::bigint))",
                )
                .bind(i64::try_from(seq)?)
                .bind(i64::try_from(wall_micros())?)
                .execute(&mut **connection)
                .await?;
                Ok(())
            }
        }
    }
}

/// The bench enqueues the latency jobs itself, so that any node may start each; answers the
/// sorted latencies and how many each node started.
async fn latency_from_bench(
    nodes: &mut Nodes,
    mut enqueuer: Enqueuer<'_>,
    settings: &Settings,
) -> Result<(Vec<u64>, Vec<u64>), BoxError> {
    let mut latencies = Vec::new();
    let mut by = vec![0; nodes.len()];
    for seq in 0..settings.samples {
        enqueuer.enqueue(seq).await?;
        let deadline = Instant::now() + START_WITHIN;
        loop {
            match nodes.next(deadline).await? {
                (
                    i,
                    Event::Started {
                        seq: got,
                        latency_us,
                    },
                ) if got == seq => {
                    latencies.push(latency_us);
                    if let Some(n) = by.get_mut(i) {
                        *n += 1;
                    }
                    break;
                }
                _ => {}
            }
        }
        tokio::time::sleep(settings.gap).await;
    }
    latencies.sort_unstable();
    Ok((latencies, by))
}

/// One measurement of graphile-worker with `count` processes, in a database of its own.
async fn graphile_worker(
    settings: &Settings,
    node: &Path,
    folder: &Path,
    program: &str,
    count: u32,
) -> Result<Measured, BoxError> {
    let db = TempDb::postgres(&settings.postgres, "unhidra_bench_gw").await?;
    crate::note(&format!(
        "jobs: graphile-worker with {count} process(es), {} jobs, concurrency {} per process",
        settings.jobs, settings.concurrency
    ));
    let result = graphile_worker_in(settings, node, folder, program, count, db.url()).await;
    db.remove().await;
    result
}

async fn graphile_worker_in(
    settings: &Settings,
    node: &Path,
    folder: &Path,
    program: &str,
    count: u32,
    url: &str,
) -> Result<Measured, BoxError> {
    let mut nodes = Nodes::new();
    let command = |_: u32| {
        let mut command = Command::new(node);
        command
            .arg(folder.join("node.js"))
            .arg(url)
            .arg(settings.concurrency.to_string())
            .arg(settings.peer_config.name())
            .current_dir(folder);
        command
    };
    // The first process installs the schema and fills the queue before the others start.
    nodes
        .start(
            command(0),
            "graphile-worker node 0".to_owned(),
            READY_WITHIN,
        )
        .await?;
    nodes
        .send(0, &format!("prefill {} {PREFILL_BATCH}", settings.jobs))
        .await?;
    let deadline = Instant::now() + settings.drain_within;
    let prefill_seconds = loop {
        if let (0, Event::Prefilled { seconds, .. }) = nodes.next(deadline).await? {
            break seconds;
        }
    };
    crate::note(&format!(
        "jobs: pre-filled {} jobs in {prefill_seconds:.2} s",
        settings.jobs
    ));
    for i in 1..count {
        nodes
            .start(
                command(i),
                format!("graphile-worker node {i}"),
                READY_WITHIN,
            )
            .await?;
    }
    let mut connection = PgConnection::connect(url).await?;
    let (drain_seconds, startup_ms, cpu) =
        drain(&mut nodes, settings, Some(&mut connection)).await?;
    let ((latency_us, started_by), latency_path) = if count == 1 {
        (
            latency_by_node(&mut nodes, settings).await?,
            "add_job on the runner's pool in the node process, woken by NOTIFY (its latencyTest)",
        )
    } else {
        (
            latency_from_bench(
                &mut nodes,
                Enqueuer::GraphileWorker(&mut connection),
                settings,
            )
            .await?,
            "add_job from the bench's own connection, every node woken by NOTIFY",
        )
    };
    let _ = connection.close().await;
    nodes.stop().await;
    Ok(Measured {
        prefill_seconds,
        drain_seconds,
        jobs: settings.jobs,
        startup_ms,
        cpu,
        after: "0 left (completed jobs are deleted)".to_owned(),
        latency_us,
        latency_path,
        started_by,
        program: format!(
            "{program}, its {} configuration",
            settings.peer_config.name()
        ),
        batches: None,
    })
}

/// CPU counters at one moment: the nodes', every PostgreSQL process's (by pid, since
/// backends come and go), the bench's and the machine's.
#[derive(Debug)]
struct CpuSample {
    at: Instant,
    nodes: Duration,
    postgres: HashMap<u32, Duration>,
    bench: Duration,
    machine: Option<server::MachineTicks>,
}

impl CpuSample {
    fn take(node_pids: &[u32]) -> Self {
        Self {
            at: Instant::now(),
            nodes: node_pids.iter().filter_map(|p| server::cpu_time(*p)).sum(),
            postgres: postgres_processes()
                .into_iter()
                .filter_map(|p| Some((p, server::cpu_time(p)?)))
                .collect(),
            bench: server::cpu_time(std::process::id()).unwrap_or_default(),
            machine: server::machine_ticks(),
        }
    }

    fn until(&self, later: &Self) -> CpuUse {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let cores = |d: Duration| d.as_secs_f64() / wall;
        let postgres: Duration = later
            .postgres
            .iter()
            .map(|(pid, t)| t.saturating_sub(self.postgres.get(pid).copied().unwrap_or_default()))
            .sum();
        let (machine, steal) = match (self.machine, later.machine) {
            (Some(a), Some(b)) => a.cores_until(b).unzip(),
            _ => (None, None),
        };
        CpuUse {
            nodes: cores(later.nodes.saturating_sub(self.nodes)),
            postgres: cores(postgres),
            bench: cores(later.bench.saturating_sub(self.bench)),
            machine,
            steal,
        }
    }
}

/// The processes of the machine named `postgres` (the server and its backends).
fn postgres_processes() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .collect()
}

/// The ratio `a ÷ b`, if both are known and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(latency_us: Vec<u64>) -> Measured {
        Measured {
            prefill_seconds: 2.0,
            drain_seconds: 0.5,
            jobs: 1000,
            startup_ms: None,
            cpu: CpuUse::default(),
            after: String::new(),
            latency_us,
            latency_path: "",
            started_by: Vec::new(),
            program: String::new(),
            batches: None,
        }
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let m = measured((1..=200).map(|i| i * 1000).collect());
        assert_eq!(m.latency_ms(0.5), Some(100.0));
        assert_eq!(m.latency_ms(0.9), Some(180.0));
        assert_eq!(m.latency_ms(0.99), Some(198.0));
        assert_eq!(m.latency_ms(1.0), Some(200.0));
        assert_eq!(measured(Vec::new()).latency_ms(0.5), None);
        assert!((m.jobs_per_sec() - 2000.0).abs() < 1e-9);
        assert!((m.prefill_per_sec() - 500.0).abs() < 1e-9);
    }

    #[test]
    fn postgres_processes_are_found_or_none() {
        // Whatever the machine runs, the scan itself must not fail or find this process.
        assert!(!postgres_processes().contains(&std::process::id()));
    }
}
