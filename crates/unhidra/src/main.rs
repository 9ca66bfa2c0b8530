//! The `unhidra` binary: parses the command line, loads the configuration and hands over to
//! the library crates. Exit codes: 0 success, 1 failure at run time, 2 bad usage or config.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the binary prints documents to stdout and, before logging exists, errors to stderr"
)]

mod firmware;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use unhidra_config::{Config, KEYS, Layer, Sources};
use unhidra_core::{Clock, SystemClock};
use unhidra_server::identity::hasher::HashParams;
use unhidra_server::identity::import::ImportError;
use unhidra_server::identity::keys::{self, KeyError};
use unhidra_server::identity::{Identity, IdentityError, RequestContext};
use unhidra_server::jobs::{Jobs, JobsConfig, JobsError, ListQuery};
use unhidra_server::{Application, BUILD, BuildInfo};
use unhidra_store::{Backend, Store, StoreError};

#[derive(Debug, Parser)]
#[command(
    name = "unhidra",
    version,
    about = "A secure, self-hosted real-time backend for people and their devices."
)]
struct Cli {
    /// Config file (default: ./unhidra.toml if it exists, or $UNHIDRA_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: HTTP API, docs and metrics on one port.
    Serve(ServeArgs),
    /// Apply the embedded database migrations, then exit.
    Migrate(DataArgs),
    /// Print the effective configuration (secrets redacted), features and build as JSON.
    Spec(DataArgs),
    /// Print the OpenAPI document as JSON.
    Openapi,
    /// Write a consistent copy of the live SQLite database to PATH.
    Backup(BackupArgs),
    /// Manage accounts.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Manage the keys that sign access tokens.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Look at background jobs, retry or cancel them.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Simulated devices, for tests and benchmarks.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Firmware signing keys and signed manifests, made off the server.
    #[command(subcommand)]
    Firmware(firmware::FirmwareCommand),
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Run simulated devices against a server: realistic telemetry (temperature, humidity,
    /// battery, a 32×24 thermal frame), heartbeats, random dropped connections and restarts,
    /// each device with its own buffer file; prints what was sent and acknowledged.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// How many devices (at most one per key; default: one per key).
    #[arg(long)]
    count: Option<usize>,
    /// The server: `http://host:port` or `ws://host:port/ws`.
    #[arg(long)]
    server: String,
    /// The device keys: one per line, or a JSON list of strings.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// Where the devices keep their buffer files.
    #[arg(long, value_name = "DIR", default_value = "simulated-devices")]
    folder: PathBuf,
    /// How long the devices run, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between readings of a device's sensors (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    reading_interval: f64,
    /// Dropped connections per device at most.
    #[arg(long, default_value_t = 3)]
    disconnects: u32,
    /// Restarts per device at most.
    #[arg(long, default_value_t = 1)]
    restarts: u32,
    /// The seed of the readings and schedules.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Send JSON frames instead of MessagePack.
    #[arg(long)]
    json: bool,
    /// Print the report as JSON.
    #[arg(long)]
    report_json: bool,
    #[command(flatten)]
    ota: SimulateOtaArgs,
}

/// Firmware updates in `unhidra device simulate`: with `--ota-trust`, each device keeps A/B
/// slots beside its buffer file and takes deployments' offers.
#[derive(Debug, Args)]
struct SimulateOtaArgs {
    /// The PEM file of the public keys the simulated firmware trusts (what the server's
    /// `ota_trusted_keys` holds); without it the devices take no updates.
    #[arg(long, value_name = "FILE")]
    ota_trust: Option<PathBuf>,
    /// The firmware's project, as images name it.
    #[arg(long, default_value = "sim", requires = "ota_trust")]
    project: String,
    /// The chip.
    #[arg(long, default_value = "esp32s3", requires = "ota_trust")]
    target: String,
    /// The version flashed at the factory.
    #[arg(long, default_value = "sim-1.0.0", requires = "ota_trust")]
    firmware: String,
    /// The factory image's anti-rollback version.
    #[arg(long, default_value_t = 0, requires = "ota_trust")]
    secure_version: u32,
    /// Download images whole (resumed after a cut) rather than in 4 KiB ranges.
    #[arg(long, requires = "ota_trust")]
    whole_downloads: bool,
    /// The share (0 to 1) of installs whose self-test fails.
    #[arg(long, default_value_t = 0.0, value_parser = share, requires = "ota_trust")]
    fail_self_test: f64,
    /// The share of installs whose new image resets before its self-test ends.
    #[arg(long, default_value_t = 0.0, value_parser = share, requires = "ota_trust")]
    boot_loop: f64,
    /// The share of devices that lose power once in the middle of a download.
    #[arg(long, default_value_t = 0.0, value_parser = share, requires = "ota_trust")]
    power_loss: f64,
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("a share is a number from 0 to 1".into()),
    }
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// List jobs, newest first, as JSON lines (at most 200; without payloads).
    List {
        /// Only this state: scheduled, available, running, retryable, completed, discarded or
        /// cancelled.
        #[arg(long)]
        state: Option<String>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Put a discarded or cancelled job back in its queue with fresh attempts.
    Retry {
        /// The job id, as `jobs list` shows it.
        id: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Cancel a job; a running one stops at its worker's next lease renewal.
    Cancel {
        /// The job id, as `jobs list` shows it.
        id: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an admin; the password is read from the first line of standard input. An
    /// existing account is left unchanged.
    Create {
        /// The admin's email.
        #[arg(long)]
        email: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Import users from a JSON-lines file; SHA-256 hashes are upgraded to Argon2id at each
    /// user's next login. Nothing is imported if any line is wrong.
    ImportUsers {
        /// The file: one JSON object per line (see the README).
        file: PathBuf,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a new signing key; older keys keep verifying until retired.
    Rotate(DataArgs),
    /// List the keys, newest last, as JSON lines.
    List(DataArgs),
    /// Stop trusting a key: tokens it signed are refused from then on.
    Retire {
        /// The key id, as `keys list` shows it (base64url: it may start with `-`).
        #[arg(allow_hyphen_values = true)]
        kid: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on [env: UNHIDRA_BIND; default 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    bind: Option<std::net::SocketAddr>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, Args)]
struct DataArgs {
    /// Folder for the embedded database and files [env: UNHIDRA_DATA_DIR; default ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// Where to write the copy; must not exist yet.
    path: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

/// How many tasks a runtime worker polls from its own queue between looks at the global one.
const GLOBAL_QUEUE_INTERVAL: u32 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = match &cli.command {
        Command::Serve(args) => Layer {
            bind: args.bind,
            data_dir: args.data.data_dir.clone(),
            ..Layer::default()
        },
        Command::Migrate(data)
        | Command::Spec(data)
        | Command::Backup(BackupArgs { data, .. })
        | Command::Admin(AdminCommand::Create { data, .. })
        | Command::Admin(AdminCommand::ImportUsers { data, .. })
        | Command::Keys(KeysCommand::Rotate(data) | KeysCommand::List(data))
        | Command::Keys(KeysCommand::Retire { data, .. })
        | Command::Jobs(
            JobsCommand::List { data, .. }
            | JobsCommand::Retry { data, .. }
            | JobsCommand::Cancel { data, .. },
        ) => Layer {
            data_dir: data.data_dir.clone(),
            ..Layer::default()
        },
        Command::Openapi | Command::Device(_) | Command::Firmware(_) => Layer::default(),
    };
    if let Command::Openapi = cli.command {
        return print_json(&unhidra_server::openapi());
    }
    if let Command::Device(DeviceCommand::Simulate(args)) = cli.command {
        return simulate(&args);
    }
    if let Command::Firmware(command) = &cli.command {
        return firmware::run(command);
    }
    let config = match unhidra_config::load(&Sources::from_process(cli.config, flags)) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("unhidra: the configuration cannot be used:");
            for line in err.to_string().lines() {
                eprintln!("  {line}");
            }
            return ExitCode::from(2);
        }
    };
    if let Command::Spec(_) = cli.command {
        return print_json(&Spec::of(&config));
    }
    if let Err(err) = unhidra_server::telemetry::init(&log_filter(&config), config.log_format) {
        eprintln!("unhidra: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // A broadcast wakes one writer task per subscriber onto the broadcasting worker's local
        // queue. The task that stores the room's next message is woken from the database's own
        // thread, onto the global queue, which a worker looks at only every so many polls: it
        // would wait behind a whole room's writes at each store call. Looking at the global
        // queue every other poll keeps a busy room's publishing path moving (about +10%
        // deliveries/s in the fan-out benchmark, docs/benchmarks.md).
        .global_queue_interval(GLOBAL_QUEUE_INTERVAL)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("unhidra: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(_) => serve(config).await,
            Command::Migrate(_) => migrate(&config).await,
            Command::Backup(args) => backup(&config, args.path).await,
            Command::Admin(AdminCommand::Create { email, .. }) => {
                admin_create(&config, &email).await
            }
            Command::Admin(AdminCommand::ImportUsers { file, .. }) => {
                import_users(&config, &file).await
            }
            Command::Keys(command) => keys(&config, command).await,
            Command::Jobs(command) => jobs(&config, command).await,
            Command::Spec(_) | Command::Openapi | Command::Device(_) | Command::Firmware(_) => {
                ExitCode::SUCCESS
            }
        }
    })
}

/// `unhidra device simulate`: needs no configuration or database, only a server to talk to.
fn simulate(args: &SimulateArgs) -> ExitCode {
    use unhidra_device::simulate::{self, SimulateOptions};
    let url = if let Some(rest) = args.server.strip_prefix("http://") {
        format!("ws://{}/ws", rest.trim_end_matches('/'))
    } else {
        args.server.clone()
    };
    if !url.starts_with("ws://") {
        eprintln!("unhidra: --server is http://host:port or ws://host:port/ws");
        return ExitCode::from(2);
    }
    let Ok(reading) = std::time::Duration::try_from_secs_f64(args.reading_interval) else {
        eprintln!("unhidra: --reading-interval is a number of seconds above 0");
        return ExitCode::from(2);
    };
    let mut options = SimulateOptions::new(url, &args.key_file, &args.folder);
    options.devices = args.count;
    options.duration = std::time::Duration::from_secs(args.seconds);
    options.reading_interval = reading;
    options.disconnects = args.disconnects;
    options.restarts = args.restarts;
    options.seed = args.seed;
    if args.json {
        options.encoding = unhidra_device::machine::Encoding::Json;
    }
    if let Some(path) = &args.ota.ota_trust {
        let trusted = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                unhidra_ota::manifest::TrustedKeys::from_pem(&text).map_err(|e| e.to_string())
            });
        let trusted = match trusted {
            Ok(keys) if !keys.is_empty() => keys.raw().to_vec(),
            Ok(_) => {
                eprintln!("unhidra: {}: no PUBLIC KEY block", path.display());
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("unhidra: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        let a = &args.ota;
        let mut ota = simulate::SimulateOta::new(trusted, &a.project, &a.target);
        ota.factory_version = a.firmware.clone();
        ota.factory_secure_version = a.secure_version;
        ota.range_size = (!a.whole_downloads).then_some(4096);
        ota.fail_self_test = a.fail_self_test;
        ota.boot_loop = a.boot_loop;
        ota.power_loss = a.power_loss;
        options.ota = Some(ota);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("unhidra: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(simulate::run(options)) {
        Ok(report) => {
            if args.report_json {
                print_json(&report)
            } else {
                print!("{report}");
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("unhidra: {err}");
            ExitCode::from(2)
        }
    }
}

/// `UNHIDRA_LOG` (or the file's `log`) wins; `RUST_LOG` is honoured when neither was given.
fn log_filter(config: &Config) -> String {
    let explicit = std::env::var_os("UNHIDRA_LOG").is_some() || config.log != "info";
    match std::env::var("RUST_LOG") {
        Ok(rust_log) if !explicit && !rust_log.is_empty() => rust_log,
        _ => config.log.clone(),
    }
}

async fn serve(config: Config) -> ExitCode {
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = %err, "unhidra cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app
        .run_until_stopped(unhidra_server::shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(config: &Config) -> ExitCode {
    let result = async {
        let store = unhidra_server::open_store(config).await?;
        store.migrate().await?;
        let health = store.health().await?;
        store.close().await;
        Ok::<_, unhidra_server::StartError>(health)
    }
    .await;
    match result {
        Ok(health) => {
            tracing::info!(
                applied = health.applied_migrations,
                store = %unhidra_server::store_url_redacted(config),
                "database migrated"
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "migration failed");
            ExitCode::FAILURE
        }
    }
}

async fn backup(config: &Config, path: PathBuf) -> ExitCode {
    if config
        .database_url
        .as_ref()
        .is_some_and(|u| u.is_postgres())
    {
        tracing::error!(
            "unhidra backup copies SQLite only; back up PostgreSQL with pg_dump or pg_basebackup"
        );
        return ExitCode::from(2);
    }
    let db = config.data_dir.join(unhidra_server::SQLITE_FILE);
    if !db.is_file() {
        tracing::error!(database = %db.display(), "no database to back up");
        return ExitCode::from(2);
    }
    if path.exists() {
        tracing::error!(target = %path.display(), "the backup target exists already; nothing was written");
        return ExitCode::from(2);
    }
    let result = async {
        let store = unhidra_server::open_store(config).await?;
        let done = store.backup(&path).await;
        store.close().await;
        done.map_err(unhidra_server::StartError::from)
    }
    .await;
    match result {
        Ok(()) => {
            tracing::info!(target = %path.display(), "backup written");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "backup failed");
            ExitCode::FAILURE
        }
    }
}

/// The store and the identity service over it, for commands that manage accounts.
async fn open_identity(config: &Config) -> Result<(Arc<dyn Store>, Identity), ExitCode> {
    let store = migrated_store(config).await.map_err(|err| {
        tracing::error!(error = %err, "cannot open the store");
        ExitCode::FAILURE
    })?;
    let mailer = unhidra_server::mail::Mailer::from_config(config).map_err(|err| {
        eprintln!("unhidra: {err}");
        ExitCode::from(2)
    })?;
    let metrics = unhidra_server::identity::metrics::AuthMetrics::default();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mailer = Arc::new(mailer);
    // Mail is enqueued here and sent by a running server's workers.
    let jobs = unhidra_server::identity::mail_jobs::register(
        Jobs::builder(
            Arc::clone(&store),
            Arc::clone(&clock),
            JobsConfig {
                queues: Vec::new(),
                ..JobsConfig::default()
            },
        ),
        config,
        Arc::clone(&store),
        Arc::clone(&clock),
        Arc::clone(&mailer),
    )
    .build();
    let identity = Identity::new(config, Arc::clone(&store), clock, metrics, mailer, jobs)
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "cannot load the signing keys");
            ExitCode::FAILURE
        })?;
    Ok((store, identity))
}

async fn import_users(config: &Config, file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("unhidra: {}: {err}", file.display());
            return ExitCode::from(2);
        }
    };
    let (store, identity) = match open_identity(config).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let result = identity
        .import_users(&text, &RequestContext::default())
        .await;
    store.close().await;
    match result {
        Ok(summary) => {
            tracing::info!(
                imported = summary.imported,
                skipped = summary.skipped.len(),
                "users imported"
            );
            for email in &summary.skipped {
                tracing::info!(email, "skipped: the account exists");
            }
            if !summary.costlier.is_empty() {
                tracing::warn!(
                    count = summary.costlier.len(),
                    "imported Argon2 hashes cost more than new hashes (argon2_*): until each \
                     user's next login upgrades the hash, a wrong password for these accounts \
                     is answered measurably later than for an unknown email, which tells that \
                     they exist even with hide_existing_accounts"
                );
                for email in &summary.costlier {
                    tracing::warn!(email, "costlier than new hashes until the next login");
                }
            }
            ExitCode::SUCCESS
        }
        Err(ImportError::Invalid(problems)) => {
            eprintln!("unhidra: {}: nothing was imported:", file.display());
            for problem in problems {
                eprintln!("  {problem}");
            }
            ExitCode::from(2)
        }
        Err(err) => {
            tracing::error!(error = %err, "import failed");
            ExitCode::FAILURE
        }
    }
}

/// Opens the store the config selects and applies pending migrations.
async fn migrated_store(config: &Config) -> Result<Arc<dyn Store>, unhidra_server::StartError> {
    let store = unhidra_server::open_store(config).await?;
    store.migrate().await?;
    Ok(store)
}

async fn admin_create(config: &Config, email: &str) -> ExitCode {
    let mut password = String::new();
    if std::io::stdin().read_line(&mut password).is_err()
        || password.trim_end_matches(['\r', '\n']).is_empty()
    {
        eprintln!("unhidra: write the admin's password on standard input");
        return ExitCode::from(2);
    }
    let password = password.trim_end_matches(['\r', '\n']);
    let (store, identity) = match open_identity(config).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let result = identity
        .ensure_admin(email, password, &RequestContext::default())
        .await;
    store.close().await;
    match result {
        Ok(true) => {
            tracing::info!(email, "admin created");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            tracing::info!(email, "an account with this email exists; left unchanged");
            ExitCode::SUCCESS
        }
        Err(IdentityError::WeakPassword(broken)) => {
            eprintln!("unhidra: the password is refused:");
            for rule in broken {
                eprintln!("  {}: {}", rule.code, rule.message);
            }
            ExitCode::from(2)
        }
        Err(IdentityError::InvalidEmail(e)) => {
            eprintln!("unhidra: --email: {e}");
            ExitCode::from(2)
        }
        Err(err) => {
            tracing::error!(error = %err, "admin not created");
            ExitCode::FAILURE
        }
    }
}

async fn keys(config: &Config, command: KeysCommand) -> ExitCode {
    let store = match migrated_store(config).await {
        Ok(store) => store,
        Err(err) => {
            tracing::error!(error = %err, "cannot open the store");
            return ExitCode::FAILURE;
        }
    };
    let now = chrono::Utc::now();
    let code = match command {
        KeysCommand::Rotate(_) if config.signing_key.is_some() => {
            eprintln!(
                "unhidra: signing_key is set in the configuration, so that key signs. To rotate, \
                 make a new one (openssl genpkey -algorithm ed25519 -out new.pem), point \
                 UNHIDRA_SIGNING_KEY_FILE at it and restart each server; the old key keeps \
                 verifying until `unhidra keys retire KID`."
            );
            ExitCode::from(2)
        }
        KeysCommand::Rotate(_) => match keys::rotate(&*store, now).await {
            Ok(kid) => {
                println!("{kid}");
                tracing::info!(kid, "new signing key; servers switch to it within a minute");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(error = %err, "rotation failed");
                ExitCode::FAILURE
            }
        },
        KeysCommand::List(_) => match store.signing_keys().await {
            Ok(list) => {
                for key in list {
                    let line = serde_json::json!({
                        "kid": key.kid,
                        "algorithm": key.algorithm,
                        "created_at": key.created_at,
                        "retired_at": key.retired_at,
                        "generated": key.private_key.is_some(),
                    });
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot list keys");
                ExitCode::FAILURE
            }
        },
        KeysCommand::Retire { kid, .. } => match keys::retire(&*store, &kid, now).await {
            Ok(()) => {
                tracing::info!(kid, "key retired; tokens it signed are refused");
                ExitCode::SUCCESS
            }
            Err(KeyError::Store(StoreError::NotFound { .. })) => {
                eprintln!("unhidra: no key {kid}");
                ExitCode::from(2)
            }
            Err(err) => {
                eprintln!("unhidra: {err}");
                ExitCode::from(2)
            }
        },
    };
    store.close().await;
    code
}

async fn jobs(config: &Config, command: JobsCommand) -> ExitCode {
    let store = match migrated_store(config).await {
        Ok(store) => store,
        Err(err) => {
            tracing::error!(error = %err, "cannot open the store");
            return ExitCode::FAILURE;
        }
    };
    // This process runs no queue: it only reads and changes jobs, and the servers' workers
    // pick up what it puts back.
    let service = Jobs::builder(
        Arc::clone(&store),
        Arc::new(SystemClock),
        JobsConfig {
            queues: Vec::new(),
            ..JobsConfig::default()
        },
    )
    .build();
    let result = match command {
        JobsCommand::List { state, kind, .. } => {
            let query = ListQuery {
                state,
                kind,
                page_size: Some(unhidra_server::jobs::MAX_PAGE_SIZE),
                ..ListQuery::default()
            };
            service.list(&query).await.map(|page| {
                for job in &page.items {
                    println!("{}", job_line(job));
                }
                if page.total > u64::try_from(page.items.len()).unwrap_or(u64::MAX) {
                    tracing::info!(
                        shown = page.items.len(),
                        total = page.total,
                        "more jobs match; narrow with --state or --kind"
                    );
                }
            })
        }
        JobsCommand::Retry { id, .. } => match unhidra_server::jobs::parse_id(&id) {
            Ok(id) => service
                .retry(id)
                .await
                .map(|job| println!("{}", job_line(&job))),
            Err(err) => Err(err),
        },
        JobsCommand::Cancel { id, .. } => match unhidra_server::jobs::parse_id(&id) {
            Ok(id) => service
                .cancel(id)
                .await
                .map(|job| println!("{}", job_line(&job))),
            Err(err) => Err(err),
        },
    };
    store.close().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(JobsError::Store(StoreError::Conflict { .. })) => {
            eprintln!("unhidra: another job holds this job's unique key now; it stays as it is");
            ExitCode::from(2)
        }
        Err(JobsError::Store(err)) => {
            tracing::error!(error = %err, "jobs command failed");
            ExitCode::FAILURE
        }
        Err(JobsError::Invalid(field, _, message)) => {
            eprintln!("unhidra: {field}: {message}");
            ExitCode::from(2)
        }
        Err(err) => {
            // No such job, or a state that does not allow it.
            eprintln!("unhidra: {err}");
            ExitCode::from(2)
        }
    }
}

/// A job as one JSON line, without its payload (it may hold personal data).
fn job_line(job: &unhidra_store::jobs::JobRecord) -> serde_json::Value {
    serde_json::json!({
        "id": job.id.to_string(),
        "kind": job.kind,
        "queue": job.queue,
        "state": job.state.as_str(),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "run_at": job.run_at,
        "last_error": job.last_error,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    })
}

fn print_json(value: &impl Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            #[allow(
                clippy::print_stdout,
                reason = "printing the document is the command's job"
            )]
            {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("unhidra: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What `unhidra spec` prints.
#[derive(Debug, Serialize)]
struct Spec<'a> {
    /// The effective configuration; secrets show as `[redacted]`.
    config: &'a Config,
    /// Every key, with the environment variable that sets it.
    keys: Vec<KeySpec>,
    /// The store this configuration selects.
    store: StoreSpec,
    /// What this build and configuration turn on.
    features: Vec<&'static str>,
    /// Argon2id parameters of new password hashes.
    password_hashing: PasswordHashing,
    build: BuildInfo,
}

#[derive(Debug, Serialize)]
struct PasswordHashing {
    algorithm: &'static str,
    #[serde(flatten)]
    params: HashParams,
    workers: u32,
    min_length: u32,
    min_strength: u32,
}

#[derive(Debug, Serialize)]
struct KeySpec {
    name: &'static str,
    env: String,
    secret: bool,
    doc: &'static str,
}

#[derive(Debug, Serialize)]
struct StoreSpec {
    backend: &'static str,
    url: String,
}

impl<'a> Spec<'a> {
    fn of(config: &'a Config) -> Self {
        let backend = if config
            .database_url
            .as_ref()
            .is_some_and(|u| u.is_postgres())
        {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let mut features = vec!["http-api", "openapi", "docs-ui", "metrics", "identity"];
        if config.hide_existing_accounts {
            features.push("hide-existing-accounts");
        }
        if config.metrics_token.is_some() {
            features.push("metrics-token");
        }
        if config
            .public_url
            .as_ref()
            .is_some_and(|u| u.scheme() == "https")
        {
            features.push("hsts");
        }
        Self {
            config,
            keys: KEYS
                .iter()
                .map(|k| KeySpec {
                    name: k.name,
                    env: k.env_var(),
                    secret: k.secret,
                    doc: k.doc.trim(),
                })
                .collect(),
            store: StoreSpec {
                backend: backend.name(),
                url: unhidra_server::store_url_redacted(config),
            },
            features,
            password_hashing: PasswordHashing {
                algorithm: "argon2id",
                params: HashParams::from_config(config),
                workers: config.hash_workers,
                min_length: config.password_min_length,
                min_strength: config.password_min_strength,
            },
            build: BUILD,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command, KeysCommand};

    #[test]
    fn a_key_id_that_starts_with_a_hyphen_is_a_key_id() {
        let cli = Cli::try_parse_from(["unhidra", "keys", "retire", "-D5x_abc"]).unwrap();
        let Command::Keys(KeysCommand::Retire { kid, .. }) = cli.command else {
            panic!("keys retire");
        };
        assert_eq!(kid, "-D5x_abc");
        let cli = Cli::try_parse_from(["unhidra", "keys", "retire", "-k", "--data-dir", "/tmp/x"])
            .unwrap();
        let Command::Keys(KeysCommand::Retire { kid, data }) = cli.command else {
            panic!("keys retire");
        };
        assert_eq!(kid, "-k");
        assert_eq!(
            data.data_dir.as_deref(),
            Some(std::path::Path::new("/tmp/x"))
        );
    }
}
