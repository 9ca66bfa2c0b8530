//! `unhidra-bench`: starts the release `unhidra` binary and measures its time to ready, its idle
//! memory and its `/health/live` throughput, then prints a Markdown report on stdout (progress
//! goes to stderr). The `identity` subcommand measures logins per second against the raw
//! Argon2id rate, and the latency of `GET /api/v1/auth/me` during a login flood, instead. The
//! `fanout` subcommand measures deliveries per second and delivery latency from one publisher
//! to N WebSocket subscribers of a room, and the server's memory per idle connection, for
//! Unhidra and, with the same load generator, for nats-server and a Socket.IO server. The
//! `login-timing` subcommand measures, with `hide_existing_accounts` on, the latency of wrong
//! logins and reset requests for existing, imported, locked and unknown accounts, as ratios to
//! the unknown email's. The `jobs` subcommand measures the durable job queue (no-op jobs drained
//! per second, and the latency from enqueue to start) on SQLite and on PostgreSQL with one and
//! two nodes, against graphile-worker on the same PostgreSQL. The `ota` subcommand measures
//! many devices downloading one firmware image at once, in 4 KiB ranges and whole (aggregate
//! throughput, latency, server RSS), against nginx serving the same file in the same run. The
//! `devices` subcommand measures the device fleet: telemetry points acknowledged per second on
//! SQLite and PostgreSQL against a raw insert of the same rows, and many idle devices (connect
//! rate, RSS per connection, how late silent devices are reported).
//! Everything it does is bounded in count and time, and it only ever talks to 127.0.0.1.
//!
//! ```text
//! cargo build --release -p unhidra -p unhidra-bench
//! cargo run --release -p unhidra-bench -- [--server PATH] [--connections N] [--duration SECS] [--runs K]
//! cargo run --release -p unhidra-bench -- identity [--clients N] [--duration SECS] [--hash-workers 0,1]
//! cargo run --release -p unhidra-bench -- fanout [--subscribers 1000] [--rates 100,1000,5000] [--seconds 5] [--targets unhidra,nats,socketio]
//! cargo run --release -p unhidra-bench -- login-timing [--samples 200] [--max-seconds 100]
//! cargo run --release -p unhidra-bench -- jobs [--jobs 20000] [--concurrency 24] [--nodes 1,2] [--targets sqlite,postgres,graphile-worker]
//! cargo run --release -p unhidra-bench -- devices [--devices 200] [--points 100] [--seconds 10] [--backends sqlite,postgres] [--idle 10000] [--silence-after 20]
//! cargo run --release -p unhidra-bench -- ota [--devices 200] [--image-kib 1536] [--range 4096] [--rounds 3] [--whole-passes 5] [--targets unhidra,unhidra-key,nginx]
//! ```

mod devices;
mod devices_report;
mod fanout;
mod fanout_report;
mod fanout_target;
mod hashrate;
mod http;
mod identity;
mod identity_report;
mod jobs;
mod jobs_child;
mod jobs_db;
mod jobs_node;
mod jobs_report;
mod load;
mod login_timing;
mod login_timing_report;
mod ota;
mod ota_client;
mod ota_report;
mod peer;
mod report;
mod server;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::devices_report::DevicesReport;
use crate::fanout_report::{FanoutReport, TargetRun};
use crate::fanout_target::Target;
use crate::identity_report::IdentityReport;
use crate::jobs_report::JobsReport;
use crate::load::Plan;
use crate::login_timing_report::LoginTimingReport;
use crate::ota_report::OtaReport;
use crate::report::{CpuShare, Machine, Report, WrkStatus};
use crate::server::Server;

/// The error type of the benchmark: anything, with a message for the user.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a server is left alone after it is ready before its memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// Requests sent before this are not counted.
const WARMUP: Duration = Duration::from_secs(2);

#[derive(Debug, Parser)]
#[command(
    name = "unhidra-bench",
    version,
    about = "Measures the unhidra server: start to ready, idle RSS and /health/live throughput.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Another scenario instead of the default one.
    #[command(subcommand)]
    scenario: Option<Scenario>,
    /// The unhidra binary [default: `unhidra` next to this program, i.e. target/release/unhidra].
    #[arg(long, value_name = "PATH", global = true)]
    server: Option<PathBuf>,
    /// Concurrent keep-alive connections of the load test.
    #[arg(long, value_name = "N", default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// Measured seconds of the load test (after a 2 s warm-up).
    #[arg(long, value_name = "SECS", default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: u64,
    /// Start-to-ready runs, each with a fresh server and data folder.
    #[arg(long, value_name = "K", default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Worker threads of the load generator [default: the number of CPUs].
    #[arg(long, value_name = "N", global = true,
        value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Logins per second with the production Argon2id parameters against the raw hash rate,
    /// and the latency of `GET /api/v1/auth/me` during a login flood and on an idle server.
    Identity(IdentityArgs),
    /// Deliveries per second and delivery latency from one publisher to N WebSocket
    /// subscribers of one room, at several publishing rates, and RSS per idle connection; for
    /// Unhidra, nats-server and Socket.IO, with the same load generator.
    Fanout(FanoutArgs),
    /// With `hide_existing_accounts` on, the latency of wrong logins for an unknown email, an
    /// account, imported legacy, cheaper and costlier hashes and a locked account, and of reset
    /// requests for an account and an unknown email, as ratios to the unknown email's.
    LoginTiming(LoginTimingArgs),
    /// The durable job queue: no-op jobs drained per second from a pre-filled queue, and the
    /// latency from enqueue to start, on SQLite and on PostgreSQL with one and two nodes, side
    /// by side with graphile-worker on the same PostgreSQL server.
    Jobs(JobsArgs),
    /// Firmware downloads: N devices fetching one image at once, in byte ranges (as ESP-IDF's
    /// `partial_http_download`) and whole, from Unhidra (signed links and device keys) and
    /// from nginx serving the same file, in the same run: aggregate throughput, latency and
    /// server RSS.
    Ota(OtaArgs),
    /// The device fleet: telemetry points acknowledged (durable) per second from simulated
    /// devices on SQLite and PostgreSQL, against a raw batched insert of the same rows into the
    /// same database; and many idle devices: connect rate, server RSS per connection, and the
    /// delay from a device's inactivity timeout to its silent status reaching a watcher.
    Devices(DevicesArgs),
    /// One job node of the `jobs` scenario, driven by it through stdin and stdout.
    #[command(hide = true)]
    JobsNode(jobs_node::NodeArgs),
}

#[derive(Debug, Args)]
struct OtaArgs {
    /// Simulated devices, each with one keep-alive connection, downloading at once.
    #[arg(long, value_name = "N", default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(1..=2000))]
    devices: u32,
    /// The image's size in KiB.
    #[arg(long, value_name = "K", default_value_t = 1536,
        value_parser = clap::value_parser!(u64).range(16..=16_384))]
    image_kib: u64,
    /// The bytes of one range request.
    #[arg(long, value_name = "BYTES", default_value_t = 4096,
        value_parser = clap::value_parser!(u64).range(512..=1_048_576))]
    range: u64,
    /// Rounds; each downloads from every target once in ranges, then whole.
    #[arg(long, value_name = "R", default_value_t = 3,
        value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Whole-image passes per target and round, each checked (a pass of one GET per device
    /// lasts a fraction of a second).
    #[arg(long, value_name = "N", default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=50))]
    whole_passes: u32,
    /// What to measure; nginx is installed from Debian's package when it is missing and this
    /// program runs as root, and is reported as skipped when it cannot be had.
    #[arg(
        long,
        value_name = "T[,T…]",
        value_delimiter = ',',
        default_value = "unhidra,unhidra-key,nginx"
    )]
    targets: Vec<ota::Target>,
    /// A diagnostic, not what a device does: the devices' sockets acknowledge every segment at
    /// once (TCP_QUICKACK), so that a server whose answer waits for an ACK (Nagle's algorithm
    /// against delayed ACKs) is measured without that wait.
    #[arg(long)]
    client_quickack: bool,
    /// The longest one pass (every device downloading once) may take, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(1..=600))]
    max_seconds: u64,
}

#[derive(Debug, Args)]
struct DevicesArgs {
    /// Devices sending telemetry at once.
    #[arg(long, value_name = "N", default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(1..=5000))]
    devices: u32,
    /// Points per telemetry batch (the server's `telemetry_max_points` is 1,000).
    #[arg(long, value_name = "P", default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=1000))]
    points: u32,
    /// Measured seconds of ingest per backend, after a 2 s warm-up.
    #[arg(long, value_name = "SECS", default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=120))]
    seconds: u64,
    /// Backends of the ingest measurement.
    #[arg(
        long,
        value_name = "B[,B…]",
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    backends: Vec<devices::Backend>,
    /// The PostgreSQL server (on this machine) where a database is made for the run.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres: String,
    /// Idle devices connected at once (0: not measured); needs `ulimit -n` above it.
    #[arg(long, value_name = "N", default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(0..=20_000))]
    idle: u32,
    /// The idle devices' inactivity timeout, in seconds (the server's minimum is 10); their
    /// connects must end before it.
    #[arg(long, value_name = "SECS", default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(10..=600))]
    silence_after: u64,
}

#[derive(Debug, Args)]
struct JobsArgs {
    /// No-op jobs in the pre-filled queue of each measurement.
    #[arg(long, value_name = "N", default_value_t = 20_000,
        value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    jobs: u64,
    /// Jobs each node (Unhidra's and graphile-worker's alike) runs at once.
    #[arg(long, value_name = "N", default_value_t = 24,
        value_parser = clap::value_parser!(u32).range(1..=200))]
    concurrency: u32,
    /// Latency samples of each measurement, enqueued one at a time.
    #[arg(long, value_name = "N", default_value_t = 200,
        value_parser = clap::value_parser!(u64).range(1..=10_000))]
    samples: u64,
    /// Milliseconds between a latency sample's start and the next enqueue.
    #[arg(long, value_name = "MS", default_value_t = 25,
        value_parser = clap::value_parser!(u64).range(0..=1000))]
    gap_ms: u64,
    /// Node counts on PostgreSQL (Unhidra nodes, and graphile-worker processes), at most 4.
    #[arg(long, value_name = "N[,N…]", value_delimiter = ',', default_value = "1,2",
        value_parser = clap::value_parser!(u32).range(1..=4))]
    nodes: Vec<u32>,
    /// What to measure; graphile-worker needs node and npm, and is reported as skipped
    /// without them.
    #[arg(
        long,
        value_name = "T[,T…]",
        value_delimiter = ',',
        default_value = "sqlite,postgres,graphile-worker"
    )]
    targets: Vec<jobs::Target>,
    /// The PostgreSQL server, on this machine; each measurement creates a database of its own
    /// there and drops it after.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres: String,
    /// graphile-worker's configuration: its perfTest's (a local queue of 500 jobs, batched
    /// completions), or its defaults (one job per fetch and per completion).
    #[arg(long, value_name = "CONFIG", value_enum, default_value_t = jobs::PeerConfig::Perftest)]
    graphile_worker_config: jobs::PeerConfig,
    /// The longest one drain (or pre-fill) may take, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    max_seconds: u64,
}

#[derive(Debug, Args)]
struct LoginTimingArgs {
    /// Measured rounds, each one request of every case (after 3 warm-up rounds).
    #[arg(long, value_name = "N", default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(1..=5_000))]
    samples: u32,
    /// The run stops after this many seconds even if fewer rounds were measured.
    #[arg(long, value_name = "SECS", default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(1..=600))]
    max_seconds: u64,
}

#[derive(Debug, Args)]
struct FanoutArgs {
    /// Subscriber connections (all of one user), opened 32 at a time.
    #[arg(long, value_name = "N", default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=20_000))]
    subscribers: u32,
    /// Publishing rates in messages per second, one window each (at most 8).
    #[arg(long, value_name = "R[,R…]", value_delimiter = ',', default_value = "100,1000,5000",
        value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rates: Vec<u32>,
    /// Seconds of each publishing window.
    #[arg(long, value_name = "SECS", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=60))]
    seconds: u64,
    /// The servers to measure, one after the other; a peer that is not installed (nats-server,
    /// node and npm) is reported as skipped.
    #[arg(
        long,
        value_name = "T[,T…]",
        value_delimiter = ',',
        default_value = "unhidra,nats,socketio"
    )]
    targets: Vec<Target>,
    /// Unhidra's `sqlite_synchronous`: `full` makes every acknowledged message survive a power
    /// loss, at the cost this measures.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = fanout::Synchronous::Normal)]
    sqlite_synchronous: fanout::Synchronous,
}

#[derive(Debug, Args)]
struct IdentityArgs {
    /// Concurrent login clients, each on its own keep-alive connection.
    #[arg(long, value_name = "N", default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..=256))]
    clients: u32,
    /// Measured seconds of the login flood (after a 2 s warm-up).
    #[arg(long, value_name = "SECS", default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=120))]
    duration: u64,
    /// Seconds of the raw hash-rate measurement.
    #[arg(long, value_name = "SECS", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=60))]
    hash_seconds: u64,
    /// Seconds the prober runs against the idle server.
    #[arg(long, value_name = "SECS", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=60))]
    idle_seconds: u64,
    /// Milliseconds between two probes of `GET /api/v1/auth/me`.
    #[arg(long, value_name = "MS", default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=1000))]
    probe_every: u64,
    /// `UNHIDRA_HASH_WORKERS` of the server (0: one per CPU); a list such as `0,1` runs one
    /// server after the other with each value (at most 4).
    #[arg(long, value_name = "N[,N…]", value_delimiter = ',', default_value = "0",
        value_parser = clap::value_parser!(u32).range(0..=64))]
    hash_workers: Vec<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        |n| usize::try_from(n).unwrap_or(1),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            note(&format!("cannot start the async runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let rendered = match &cli.scenario {
        None => runtime
            .block_on(measure(&cli, threads))
            .map(|report| report.render()),
        Some(Scenario::Identity(args)) => runtime
            .block_on(measure_identity(cli.server.clone(), args))
            .map(|report| report.render()),
        Some(Scenario::Fanout(args)) => runtime
            .block_on(measure_fanout(cli.server.clone(), args))
            .map(|report| report.render()),
        Some(Scenario::LoginTiming(args)) => runtime
            .block_on(measure_login_timing(cli.server.clone(), args))
            .map(|report| report.render()),
        Some(Scenario::Jobs(args)) => runtime
            .block_on(measure_jobs(args))
            .map(|report| report.render()),
        Some(Scenario::Ota(args)) => runtime
            .block_on(measure_ota(cli.server.clone(), args))
            .map(|report| report.render()),
        Some(Scenario::Devices(args)) => runtime
            .block_on(measure_devices(cli.server.clone(), args))
            .map(|report| report.render()),
        Some(Scenario::JobsNode(args)) => {
            return match runtime.block_on(jobs_node::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    note(&format!("jobs-node: {err}"));
                    ExitCode::FAILURE
                }
            };
        }
    };
    match rendered {
        Ok(rendered) => match rendered {
            Ok(text) => {
                print_report(&text);
                ExitCode::SUCCESS
            }
            Err(err) => {
                note(&format!("cannot write the report: {err}"));
                ExitCode::FAILURE
            }
        },
        Err(err) => {
            note(&format!("error: {err}"));
            ExitCode::FAILURE
        }
    }
}

async fn measure(cli: &Cli, client_threads: usize) -> Result<Report, BoxError> {
    let server_bin = server_binary(cli.server.clone())?;
    let machine = Machine::read();
    note(&format!(
        "unhidra-bench: server {}, {} CPUs",
        server_bin.display(),
        machine.cpus
    ));

    let mut ready = Vec::new();
    let mut idle = Vec::new();
    let mut stops = Vec::new();
    for run in 1..=cli.runs {
        let server = Server::start(&server_bin).await?;
        let after = server.ready_after();
        tokio::time::sleep(SETTLE).await;
        let memory = server.memory();
        stops.push(server.stop().await);
        let memory = memory?;
        note(&format!(
            "run {run}/{}: ready after {:.1} ms, idle RSS {:.1} MiB",
            cli.runs,
            after.as_secs_f64() * 1000.0,
            memory.rss_kib as f64 / 1024.0
        ));
        ready.push(after);
        idle.push(memory);
    }

    let server = Server::start(&server_bin).await?;
    let loaded = load_server(&server, cli).await;
    server.stop().await;
    let (plan, load_idle, load, cpu, load_after, wrk) = loaded?;

    Ok(Report {
        command: command_line(),
        server: server_bin,
        machine,
        ready,
        idle,
        stops,
        plan,
        client_threads,
        load_idle,
        load_after,
        load,
        cpu,
        wrk,
    })
}

type Loaded = (
    Plan,
    server::Memory,
    load::Outcome,
    Option<CpuShare>,
    server::Memory,
    WrkStatus,
);

/// The throughput part, against one running server: the in-process generator, then wrk.
async fn load_server(server: &Server, cli: &Cli) -> Result<Loaded, BoxError> {
    tokio::time::sleep(SETTLE).await;
    let idle = server.memory()?;
    let plan = Plan {
        addr: server.addr(),
        path: "/health/live",
        connections: cli.connections,
        warmup: WARMUP,
        duration: Duration::from_secs(cli.duration),
    };
    note(&format!(
        "load: {} connections, {} s warm-up + {} s on http://{}{} (server pid {})",
        plan.connections,
        plan.warmup.as_secs(),
        plan.duration.as_secs(),
        plan.addr,
        plan.path,
        server.pid()
    ));
    let (outcome, cpu) = tokio::join!(
        load::run(plan),
        cpu_share(server.pid(), plan.warmup, plan.duration)
    );
    note(&format!(
        "load: {:.0} req/s, {} errors",
        outcome.requests_per_sec(),
        outcome.errors.total()
    ));
    let wrk = match wrk::find() {
        Some(wrk_bin) => {
            note("wrk: running against the same server");
            match wrk::run(
                &wrk_bin,
                plan.addr,
                plan.path,
                plan.connections,
                plan.duration,
            )
            .await
            {
                Ok(run) => WrkStatus::Ran(run),
                Err(err) => WrkStatus::Failed(err.to_string()),
            }
        }
        None => {
            note("wrk is not installed (apt-get install wrk); skipping the comparison");
            WrkStatus::Missing
        }
    };
    let after = server.memory()?;
    Ok((plan, idle, outcome, cpu, after, wrk))
}

/// The identity scenario.
async fn measure_identity(
    server: Option<PathBuf>,
    args: &IdentityArgs,
) -> Result<IdentityReport, BoxError> {
    if args.hash_workers.len() > 4 {
        return Err("--hash-workers takes at most 4 values".into());
    }
    let server_bin = server_binary(server)?;
    let machine = Machine::read();
    note(&format!(
        "unhidra-bench identity: server {}, {} CPUs",
        server_bin.display(),
        machine.cpus
    ));
    let settings = identity::Settings {
        clients: args.clients,
        warmup: WARMUP,
        duration: Duration::from_secs(args.duration),
        idle: Duration::from_secs(args.idle_seconds),
        probe_every: Duration::from_millis(args.probe_every),
        hash_budget: Duration::from_secs(args.hash_seconds),
        hash_workers: args.hash_workers.clone(),
    };
    let outcome = identity::run(&server_bin, &settings).await?;
    Ok(IdentityReport {
        command: command_line(),
        server: server_bin,
        machine,
        settings,
        outcome,
    })
}

/// The login-timing scenario.
async fn measure_login_timing(
    server: Option<PathBuf>,
    args: &LoginTimingArgs,
) -> Result<LoginTimingReport, BoxError> {
    let server_bin = server_binary(server)?;
    let machine = Machine::read();
    note(&format!(
        "unhidra-bench login-timing: server {}, {} CPUs",
        server_bin.display(),
        machine.cpus
    ));
    let settings = login_timing::Settings {
        samples: args.samples,
        budget: Duration::from_secs(args.max_seconds),
    };
    let outcome = login_timing::run(&server_bin, settings).await?;
    Ok(LoginTimingReport {
        command: command_line(),
        server: server_bin,
        machine,
        settings,
        outcome,
    })
}

/// The firmware download scenario.
/// The devices scenario: ingest on each backend, then the idle devices.
async fn measure_devices(
    server: Option<PathBuf>,
    args: &DevicesArgs,
) -> Result<DevicesReport, BoxError> {
    let server_bin = server_binary(server)?;
    if args.backends.contains(&devices::Backend::Postgres) {
        jobs_db::check_local_postgres(&args.postgres)?;
    }
    devices::check_open_files(args.idle.max(args.devices))?;
    let machine = Machine::read();
    let mut backends = Vec::new();
    for &b in &args.backends {
        if !backends.contains(&b) {
            backends.push(b);
        }
    }
    let settings = devices::Settings {
        devices: args.devices,
        points: args.points,
        window: Duration::from_secs(args.seconds),
        backends,
        postgres: args.postgres.clone(),
        idle: args.idle,
        silence_after: args.silence_after,
    };
    let outcome = devices::run(&server_bin, &settings).await?;
    Ok(DevicesReport {
        command: command_line(),
        machine,
        settings,
        outcome,
    })
}

async fn measure_ota(server: Option<PathBuf>, args: &OtaArgs) -> Result<OtaReport, BoxError> {
    let mut targets: Vec<ota::Target> = Vec::new();
    for &target in &args.targets {
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let image_bytes = args.image_kib * 1024;
    if u64::from(args.devices) * image_bytes > ota::MAX_COPIES_BYTES {
        return Err(format!(
            "--devices × --image-kib is at most {} GiB: each device keeps its copy of the image \
             until it is checked",
            ota::MAX_COPIES_BYTES >> 30
        )
        .into());
    }
    let server_bin = if targets.iter().any(|t| *t != ota::Target::Nginx) {
        Some(server_binary(server)?)
    } else {
        None
    };
    fanout::check_open_files(args.devices)?;
    let machine = Machine::read();
    note(&format!(
        "unhidra-bench ota: {}; {} CPUs",
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        machine.cpus
    ));
    let settings = ota::Settings {
        devices: args.devices,
        image_bytes,
        range: args.range,
        rounds: args.rounds,
        whole_passes: args.whole_passes,
        client_quickack: args.client_quickack,
        pass_within: Duration::from_secs(args.max_seconds),
        targets,
    };
    let outcome = ota::run(server_bin.as_deref(), &settings).await?;
    Ok(OtaReport {
        command: command_line(),
        machine,
        settings,
        outcome,
    })
}

/// The job queue scenario.
async fn measure_jobs(args: &JobsArgs) -> Result<JobsReport, BoxError> {
    let mut targets: Vec<jobs::Target> = Vec::new();
    for &target in &args.targets {
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let mut nodes: Vec<u32> = Vec::new();
    for &n in &args.nodes {
        if !nodes.contains(&n) {
            nodes.push(n);
        }
    }
    if nodes.len() > 4 {
        return Err("--nodes takes at most 4 values".into());
    }
    if targets
        .iter()
        .any(|t| matches!(t, jobs::Target::Postgres | jobs::Target::GraphileWorker))
    {
        jobs_db::check_local_postgres(&args.postgres)?;
    }
    let machine = Machine::read();
    let load_before = jobs_report::load_average();
    note(&format!(
        "unhidra-bench jobs: {} jobs, concurrency {}, {} CPUs, load {}",
        args.jobs,
        args.concurrency,
        machine.cpus,
        load_before.as_deref().unwrap_or("?")
    ));
    let settings = jobs::Settings {
        jobs: args.jobs,
        concurrency: args.concurrency,
        samples: args.samples,
        gap: Duration::from_millis(args.gap_ms),
        drain_within: Duration::from_secs(args.max_seconds),
        targets,
        nodes,
        postgres: args.postgres.clone(),
        peer_config: args.graphile_worker_config,
    };
    let runs = jobs::run(&settings).await?;
    Ok(JobsReport {
        command: command_line(),
        machine,
        settings,
        runs,
        load: (load_before, jobs_report::load_average()),
    })
}

/// The fan-out scenario, against each target in turn. Unhidra failing fails the command; a
/// peer failing (or missing) is reported as skipped.
async fn measure_fanout(
    server: Option<PathBuf>,
    args: &FanoutArgs,
) -> Result<FanoutReport, BoxError> {
    if args.rates.len() > fanout::MAX_RATES {
        return Err(format!("--rates takes at most {} values", fanout::MAX_RATES).into());
    }
    let mut targets: Vec<Target> = Vec::new();
    for &target in &args.targets {
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let server_bin = if targets.contains(&Target::Unhidra) {
        Some(server_binary(server)?)
    } else {
        None
    };
    let open_files = fanout::check_open_files(args.subscribers)?;
    let machine = Machine::read();
    note(&format!(
        "unhidra-bench fanout: {}; {} CPUs",
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        machine.cpus
    ));
    let settings = fanout::Settings {
        subscribers: args.subscribers,
        rates: args.rates.clone(),
        window: Duration::from_secs(args.seconds),
        synchronous: args.sqlite_synchronous,
    };
    let mut runs = Vec::new();
    for (i, &target) in targets.iter().enumerate() {
        if i > 0 {
            // The previous server's sockets and CPU settle before the next one starts.
            tokio::time::sleep(SETTLE).await;
        }
        let result = match fanout::run(target, server_bin.as_deref(), &settings).await {
            Ok(outcome) => Ok(outcome),
            Err(err) if target == Target::Unhidra => return Err(err),
            Err(err) => {
                note(&format!("fanout: {} skipped: {err}", target.name()));
                Err(err.to_string())
            }
        };
        runs.push(TargetRun { target, result });
    }
    Ok(FanoutReport {
        command: command_line(),
        machine,
        settings,
        open_files,
        runs,
    })
}

/// CPU used by the server and by this program over a window that starts `warmup` from now and
/// lasts `duration`, in cores.
async fn cpu_share(server_pid: u32, warmup: Duration, duration: Duration) -> Option<CpuShare> {
    tokio::time::sleep(warmup).await;
    let me = std::process::id();
    let begin = (
        server::cpu_time(server_pid)?,
        server::cpu_time(me)?,
        Instant::now(),
        server::machine_ticks(),
    );
    tokio::time::sleep(duration).await;
    let end = (
        server::cpu_time(server_pid)?,
        server::cpu_time(me)?,
        Instant::now(),
        server::machine_ticks(),
    );
    let wall = end.2.duration_since(begin.2).as_secs_f64();
    let (machine_cores, steal_cores) = match (begin.3, end.3) {
        (Some(t0), Some(t1)) => t0.cores_until(t1).unzip(),
        _ => (None, None),
    };
    Some(CpuShare {
        server_cores: end.0.saturating_sub(begin.0).as_secs_f64() / wall,
        client_cores: end.1.saturating_sub(begin.1).as_secs_f64() / wall,
        machine_cores,
        steal_cores,
    })
}

/// `--server`, or `unhidra` next to this executable.
fn server_binary(given: Option<PathBuf>) -> Result<PathBuf, BoxError> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("--server {}: no such file", path.display()).into())
        };
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or("cannot tell which folder this program is in")?;
    let path = dir.join("unhidra");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} does not exist; build the server first with `cargo build --release -p unhidra` \
             (or name another binary with --server PATH)",
            path.display()
        )
        .into())
    }
}

/// The command that reproduces this run.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let mut line = "cargo run --release -p unhidra-bench".to_owned();
    if !args.is_empty() {
        line.push_str(" -- ");
        line.push_str(&args.join(" "));
    }
    line
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[allow(
    clippy::print_stdout,
    reason = "the report on stdout is this program's output"
)]
fn print_report(text: &str) {
    print!("{text}");
}

#[allow(
    clippy::print_stderr,
    reason = "progress and errors go to stderr, apart from the report"
)]
fn note(message: &str) {
    eprintln!("{message}");
}
