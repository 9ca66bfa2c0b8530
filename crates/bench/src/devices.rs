//! `unhidra-bench devices`: the device fleet under load, on the release server.
//!
//! - **Ingest.** For each backend (SQLite, PostgreSQL) a fresh server and database. N devices
//!   are registered through the API and connect to `/ws` with their keys
//!   (`unhidra.device.v1`); after `hello` each sends `telemetry` batches of P numeric points
//!   one after the other, the next as soon as the last one's `ack` came (an `ack` means the
//!   batch is durable). Points count when their batch was sent and acknowledged inside the
//!   measured window (after a warm-up). Then the server is stopped, and the same number of
//!   rows of the same shape (the same devices, keys and values, other times) is written into
//!   the same `telemetry` table by one connection of the bench itself, with multi-row
//!   `INSERT`s of 1,000 rows in transactions of 50,000 (what the server's writer gathers at
//!   most): the database's own rate for these rows, to which the server's is a ratio.
//! - **Idle devices.** A fresh server on SQLite; M devices registered, then connected, each
//!   saying `hello` and then nothing (not even answering pings): the connect rate, the server's
//!   RSS per connected device (after − before, over M), and, with the inactivity timeout set
//!   to T seconds, how late each device's `silent` status reaches an admin who watches the
//!   `fleet` topic, counted from the moment the device's `hello` was sent plus T (the server
//!   counts from when it read the `hello`, a little later, so the figure errs on the high side).
//!
//! Every wait is bounded; the bench only talks to 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use futures_util::{SinkExt as _, StreamExt as _};
use sqlx::{Connection as _, QueryBuilder};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use uuid::Uuid;

use crate::BoxError;
use crate::http::{Connection, call, post_json_request, post_request};
use crate::jobs_db::TempDb;
use crate::ota::{Cpu, CpuSample};
use crate::server::Server;

/// Acknowledged points per second on SQLite must be at least this.
pub const SQLITE_POINTS_TARGET: f64 = 100_000.0;
/// …and on PostgreSQL.
pub const POSTGRES_POINTS_TARGET: f64 = 50_000.0;
/// The server's points per second ÷ the raw insert's must be at least this.
pub const RAW_RATIO_TARGET: f64 = 0.7;
/// Server RSS per connected idle device, at most, in KiB.
pub const KIB_PER_DEVICE_TARGET: f64 = 10.0;
/// The p99 of the delay from a device's timeout to its silent status, at most, in ms.
pub const SILENCE_P99_TARGET_MS: f64 = 1000.0;

const ADMIN_EMAIL: &str = "devices-bench@example.com";
const ADMIN_PASSWORD: &str = "quartz-lantern-otter-1957-bench";
/// Distinct keys each device's batches use.
const KEYS: u32 = 10;
/// Requests sent before this are not counted.
const WARMUP: Duration = Duration::from_secs(2);
/// How long a connect, an `ack` or a registration may take.
const WITHIN: Duration = Duration::from_secs(10);
/// Rows of one raw `INSERT`, and of one raw transaction.
const RAW_STATEMENT_ROWS: usize = 1000;
const RAW_TRANSACTION_ROWS: usize = 50_000;
/// Registrations and connects in flight at once.
const SETUP_PARALLEL: usize = 32;
/// The read buffer of each simulated device's socket (tungstenite's default is 128 KiB).
const CLIENT_READ_BUFFER: usize = 4096;

/// Where the server keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A SQLite file of its own.
    Sqlite,
    /// A database of its own on the PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }

    /// The acknowledged points per second it must reach.
    pub fn points_target(self) -> f64 {
        match self {
            Self::Sqlite => SQLITE_POINTS_TARGET,
            Self::Postgres => POSTGRES_POINTS_TARGET,
        }
    }
}

/// What the scenario is asked to do.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Devices sending telemetry at once.
    pub devices: u32,
    /// Points per batch.
    pub points: u32,
    /// Measured seconds of ingest, after the warm-up.
    pub window: Duration,
    /// Backends of the ingest measurement.
    pub backends: Vec<Backend>,
    /// The PostgreSQL server's admin URL.
    pub postgres: String,
    /// Idle devices connected at once (0: not measured).
    pub idle: u32,
    /// The inactivity timeout of the idle devices, in seconds.
    pub silence_after: u64,
}

/// One backend's ingest.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// Which.
    pub backend: Backend,
    /// Points in acknowledged batches sent and answered inside the window.
    pub points: u64,
    /// Those batches.
    pub batches: u64,
    /// Each batch's time from send to `ack`, in microseconds, sorted.
    pub ack_us: Vec<u32>,
    /// Devices that failed, and the first failure.
    pub failed: u32,
    /// The first failure.
    pub first_error: Option<String>,
    /// CPU during the window.
    pub cpu: Cpu,
    /// Rows the raw insert wrote, and how long it took.
    pub raw_rows: u64,
    /// Its seconds.
    pub raw_seconds: f64,
    /// The measured window, in seconds.
    pub seconds: f64,
}

impl Ingest {
    /// Acknowledged points per second.
    pub fn points_per_sec(&self) -> f64 {
        self.points as f64 / self.seconds.max(1e-9)
    }

    /// The raw insert's rows per second.
    pub fn raw_per_sec(&self) -> f64 {
        self.raw_rows as f64 / self.raw_seconds.max(1e-9)
    }
}

/// The idle-devices measurement.
#[derive(Debug, Clone)]
pub struct Idle {
    /// Devices asked for.
    pub devices: u32,
    /// Devices that connected and said `hello`.
    pub connected: u32,
    /// From the first connect to the last `hello`.
    pub connect_seconds: f64,
    /// The server's RSS before the connects and after them, in KiB.
    pub rss_before_kib: u64,
    /// …after.
    pub rss_after_kib: u64,
    /// Each connected device's delay from its timeout to its silent status reaching the
    /// watcher, in microseconds, sorted.
    pub delays_us: Vec<u32>,
    /// Devices whose silent status did not arrive in time.
    pub missed: u32,
    /// Whether the watcher was told it lagged (updates it missed).
    pub lagged: bool,
    /// The first failure.
    pub first_error: Option<String>,
}

impl Idle {
    /// RSS per connected device, in KiB.
    pub fn kib_per_device(&self) -> Option<f64> {
        (self.connected > 0).then(|| {
            self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64
                / f64::from(self.connected)
        })
    }

    /// Connects (with `hello`) per second.
    pub fn connects_per_sec(&self) -> f64 {
        f64::from(self.connected) / self.connect_seconds.max(1e-9)
    }
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Each backend's ingest.
    pub ingest: Vec<Result<Ingest, String>>,
    /// The idle devices, if asked for.
    pub idle: Option<Result<Idle, String>>,
}

/// Runs the scenario.
pub async fn run(binary: &std::path::Path, settings: &Settings) -> Result<Outcome, BoxError> {
    let mut ingest = Vec::new();
    for &backend in &settings.backends {
        crate::note(&format!(
            "devices: ingest on {}: {} devices, {} points a batch",
            backend.name(),
            settings.devices,
            settings.points
        ));
        let result = measure_ingest(binary, backend, settings).await;
        if let Err(err) = &result {
            crate::note(&format!(
                "devices: ingest on {} failed: {err}",
                backend.name()
            ));
        }
        ingest.push(result.map_err(|e| e.to_string()));
        tokio::time::sleep(crate::SETTLE).await;
    }
    let idle = if settings.idle > 0 {
        crate::note(&format!(
            "devices: {} idle devices, silent after {} s",
            settings.idle, settings.silence_after
        ));
        let result = measure_idle(binary, settings).await;
        if let Err(err) = &result {
            crate::note(&format!("devices: idle devices failed: {err}"));
        }
        Some(result.map_err(|e| e.to_string()))
    } else {
        None
    };
    Ok(Outcome { ingest, idle })
}

/// The server's settings for the bench: an admin, and the per-user and per-address limits
/// that a fleet behind one address (the bench) would otherwise meet, lifted.
fn server_env(
    database: Option<&str>,
    extra: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("UNHIDRA_ADMIN_EMAIL", ADMIN_EMAIL.to_owned()),
        ("UNHIDRA_ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ("UNHIDRA_DEVICE_REGISTRATIONS_PER_HOUR", "0".to_owned()),
        ("UNHIDRA_RATE_LIMIT_IP_PER_MINUTE", "0".to_owned()),
        ("UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE", "0".to_owned()),
        ("UNHIDRA_RATE_LIMIT_DEVICE_IP_PER_MINUTE", "0".to_owned()),
        // Every simulated device connects from 127.0.0.1.
        (
            "UNHIDRA_WS_MAX_DEVICE_CONNECTIONS_PER_IP",
            "20000".to_owned(),
        ),
    ];
    if let Some(url) = database {
        env.push(("UNHIDRA_DATABASE_URL", url.to_owned()));
    }
    env.extend(extra);
    env
}

async fn measure_ingest(
    binary: &std::path::Path,
    backend: Backend,
    settings: &Settings,
) -> Result<Ingest, BoxError> {
    let db = match backend {
        Backend::Sqlite => TempDb::sqlite()?,
        Backend::Postgres => TempDb::postgres(&settings.postgres, "unhidra_bench_devices").await?,
    };
    let result = async {
        // A device's batches follow each other as fast as their acks come back: the
        // per-device batch rate limit (600 a minute by default) would be the figure otherwise.
        let env = server_env(
            Some(db.url()),
            vec![("UNHIDRA_TELEMETRY_BATCHES_PER_MINUTE", "0".to_owned())],
        );
        let server = Server::start_with_env(binary, &env).await?;
        let measured = async {
            let token = login(server.addr()).await?;
            let devices = register(server.addr(), &token, settings.devices, "ingest").await?;
            let measured = ingest(&server, &devices, settings).await?;
            Ok::<_, BoxError>((devices, measured))
        }
        .await;
        server.stop().await;
        let (devices, mut measured) = measured?;
        measured.backend = backend;
        let ids: Vec<Uuid> = devices.iter().map(|d| d.id).collect();
        let rows = measured.points.max(u64::from(settings.points));
        let began = Instant::now();
        raw_insert(backend, db.url(), &ids, rows, settings.points).await?;
        measured.raw_seconds = began.elapsed().as_secs_f64();
        measured.raw_rows = rows;
        crate::note(&format!(
            "devices: {}: {:.0} points/s acknowledged; raw insert {:.0} rows/s",
            backend.name(),
            measured.points_per_sec(),
            measured.raw_per_sec()
        ));
        Ok(measured)
    }
    .await;
    db.remove().await;
    result
}

/// A registered device.
#[derive(Debug, Clone)]
struct Registered {
    id: Uuid,
    key: String,
}

async fn login(addr: SocketAddr) -> Result<String, BoxError> {
    let mut connection = Connection::open(addr).await?;
    let body = serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).to_string();
    let answer = call(
        &mut connection,
        "POST /api/v1/auth/login",
        &post_json_request(addr, "/api/v1/auth/login", &body),
        200,
    )
    .await?;
    Ok(answer["access_token"]
        .as_str()
        .ok_or("no access_token in the login answer")?
        .to_owned())
}

/// Registers `count` devices through the API, a few connections at once.
async fn register(
    addr: SocketAddr,
    token: &str,
    count: u32,
    prefix: &str,
) -> Result<Vec<Registered>, BoxError> {
    let lanes = SETUP_PARALLEL.min(count as usize).max(1);
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let token = token.to_owned();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(addr).await?;
            let mut made = Vec::new();
            for i in (lane..count as usize).step_by(lanes) {
                let body =
                    serde_json::json!({"name": format!("{prefix}-{i:05}"), "model": "bench"})
                        .to_string();
                let answer = call(
                    &mut connection,
                    "POST /api/v1/devices",
                    &post_request(
                        addr,
                        "/api/v1/devices",
                        Some(&token),
                        "application/json",
                        &[],
                        body.as_bytes(),
                    ),
                    201,
                )
                .await?;
                let id = answer["device"]["id"]
                    .as_str()
                    .ok_or("no device id in the registration")?;
                made.push((
                    i,
                    Registered {
                        id: Uuid::parse_str(id)?,
                        key: answer["key"]
                            .as_str()
                            .ok_or("no key in the registration")?
                            .to_owned(),
                    },
                ));
            }
            Ok::<_, BoxError>(made)
        }));
    }
    let mut all = Vec::with_capacity(count as usize);
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, d)| d).collect())
}

type Ws = WebSocketStream<TcpStream>;

/// Connects as a device, reads the `welcome` and says `hello`.
async fn connect(addr: SocketAddr, key: &str) -> Result<Ws, BoxError> {
    if !addr.ip().is_loopback() {
        return Err(format!("refusing to connect to {addr}: only 127.0.0.1").into());
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("unhidra.device.v1, key.{key}"))?,
    );
    let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    until(&mut ws, |frame| frame["type"] == "welcome").await?;
    ws.send(Message::text(r#"{"type":"hello","firmware":"1.0.0"}"#))
        .await?;
    Ok(ws)
}

/// Reads JSON frames until one that `wanted` accepts; an `error` frame is a failure.
async fn until(
    ws: &mut Ws,
    mut wanted: impl FnMut(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, BoxError> {
    loop {
        let frame = match ws.next().await {
            Some(Ok(Message::Text(text))) => serde_json::from_str::<serde_json::Value>(&text)?,
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed by the server: {frame:?}").into());
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => return Err("the connection ended".into()),
        };
        if frame["type"] == "error" {
            return Err(format!("refused: {frame}").into());
        }
        if wanted(&frame) {
            return Ok(frame);
        }
    }
}

/// The JSON of batch `seq` of `points` points: `KEYS` keys, each at `points / KEYS` times a
/// millisecond apart, an hour before `base_ms`, so that no two batches share a (key, time).
fn batch(seq: u64, points: u32, base_ms: i64) -> String {
    let per_key = u64::from(points.div_ceil(KEYS));
    let mut text = format!(r#"{{"type":"telemetry","seq":{seq},"points":["#);
    for j in 0..points {
        if j > 0 {
            text.push(',');
        }
        let ts = base_ms + i64::try_from(seq * per_key + u64::from(j / KEYS)).unwrap_or(0);
        let value = 20.0 + f64::from(j % 97) * 0.125;
        text.push_str(&format!(
            r#"{{"ts":{ts},"key":"sensor.{}","value":{value}}}"#,
            j % KEYS
        ));
    }
    text.push_str("]}");
    text
}

/// What one device did in the ingest.
#[derive(Debug, Default)]
struct DeviceIngest {
    batches: u64,
    ack_us: Vec<u32>,
    error: Option<String>,
}

async fn ingest(
    server: &Server,
    devices: &[Registered],
    settings: &Settings,
) -> Result<Ingest, BoxError> {
    let addr = server.addr();
    let barrier = Arc::new(Barrier::new(devices.len() + 1));
    let gate = Arc::new(Semaphore::new(SETUP_PARALLEL));
    let base_ms = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let total = WARMUP + settings.window;
    let points = settings.points;
    let tasks: Vec<_> = devices
        .iter()
        .map(|device| {
            let key = device.key.clone();
            let barrier = Arc::clone(&barrier);
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let mut run = DeviceIngest::default();
                let connected = {
                    let _slot = gate.acquire().await;
                    tokio::time::timeout(WITHIN, connect(addr, &key)).await
                };
                barrier.wait().await;
                let mut ws = match connected {
                    Ok(Ok(ws)) => ws,
                    Ok(Err(err)) => {
                        run.error = Some(format!("connect: {err}"));
                        return run;
                    }
                    Err(_) => {
                        run.error = Some(format!("connect: no answer within {WITHIN:?}"));
                        return run;
                    }
                };
                // The barrier opens for every device at once: the clock starts now.
                let start = Instant::now();
                let (measure_from, end) = (start + WARMUP, start + total);
                let mut seq = 0_u64;
                while Instant::now() < end {
                    seq += 1;
                    let frame = batch(seq, points, base_ms);
                    let sent = Instant::now();
                    let acked = async {
                        ws.send(Message::text(frame)).await?;
                        until(&mut ws, |f| f["type"] == "ack" && f["seq"] == seq).await
                    };
                    match tokio::time::timeout(WITHIN, acked).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => {
                            run.error = Some(format!("batch {seq}: {err}"));
                            return run;
                        }
                        Err(_) => {
                            run.error = Some(format!("batch {seq}: no ack within {WITHIN:?}"));
                            return run;
                        }
                    }
                    let done = Instant::now();
                    if sent >= measure_from && done <= end {
                        run.batches += 1;
                        run.ack_us.push(
                            u32::try_from(done.duration_since(sent).as_micros())
                                .unwrap_or(u32::MAX),
                        );
                    }
                }
                let _ = ws.close(None).await;
                run
            })
        })
        .collect();
    // Every device connects first; then the clock starts for all of them at once.
    let wait_connects = Duration::from_secs(60);
    if tokio::time::timeout(wait_connects, barrier.wait())
        .await
        .is_err()
    {
        for task in &tasks {
            task.abort();
        }
        return Err(format!("the devices did not connect within {wait_connects:?}").into());
    }
    let started = Instant::now();
    let pids = [server.pid()];
    tokio::time::sleep(WARMUP.saturating_sub(started.elapsed())).await;
    let before = CpuSample::take(&pids);
    let joined = tokio::time::timeout(total + WITHIN, futures_util::future::join_all(tasks))
        .await
        .map_err(|_| "the devices did not finish in time")?;
    let after = CpuSample::take(&pids);
    let mut measured = Ingest {
        backend: Backend::Sqlite,
        points: 0,
        batches: 0,
        ack_us: Vec::new(),
        failed: 0,
        first_error: None,
        cpu: before.until(&after),
        raw_rows: 0,
        raw_seconds: 0.0,
        seconds: settings.window.as_secs_f64(),
    };
    for run in joined {
        let run = run.map_err(|e| format!("a device task failed: {e}"))?;
        measured.batches += run.batches;
        measured.ack_us.extend(run.ack_us);
        if let Some(err) = run.error {
            measured.failed += 1;
            measured.first_error.get_or_insert(err);
        }
    }
    measured.points = measured.batches * u64::from(points);
    measured.ack_us.sort_unstable();
    Ok(measured)
}

/// Writes `rows` telemetry rows for `devices` (round robin, `KEYS` keys, times a day after
/// the server's) into the stopped server's `telemetry` table, as the store does: multi-row
/// `INSERT … ON CONFLICT DO NOTHING`, `RAW_STATEMENT_ROWS` a statement,
/// `RAW_TRANSACTION_ROWS` a transaction, one connection.
async fn raw_insert(
    backend: Backend,
    url: &str,
    devices: &[Uuid],
    rows: u64,
    points: u32,
) -> Result<(), BoxError> {
    let base = chrono::Utc::now() + chrono::Duration::days(1);
    let row = |n: u64| {
        let batch = n / u64::from(points);
        let j = u32::try_from(n % u64::from(points)).unwrap_or(0);
        let device = devices[usize::try_from(batch % devices.len() as u64).unwrap_or(0)];
        let per_key = u64::from(points.div_ceil(KEYS));
        let ms = (batch / devices.len() as u64) * per_key + u64::from(j / KEYS);
        let ts = base + chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(0));
        (
            device,
            format!("sensor.{}", j % KEYS),
            ts,
            20.0 + f64::from(j % 97) * 0.125,
        )
    };
    let all: Vec<_> = (0..rows).map(row).collect();
    match backend {
        Backend::Sqlite => {
            let path = url.strip_prefix("sqlite:").unwrap_or(url);
            let options =
                sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                    .foreign_keys(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
            for transaction in all.chunks(RAW_TRANSACTION_ROWS) {
                let mut tx = conn.begin().await?;
                for chunk in transaction.chunks(RAW_STATEMENT_ROWS) {
                    let mut insert = QueryBuilder::<sqlx::Sqlite>::new(
                        "INSERT INTO telemetry (device_id, key, ts, kind, num, text, shape, blob) ",
                    );
                    insert.push_values(chunk, |mut b, (device, key, ts, value)| {
                        b.push_bind(device.to_string())
                            .push_bind(key.as_str())
                            .push_bind(ts.timestamp_micros())
                            .push_bind("n")
                            .push_bind(*value)
                            .push_bind(None::<&str>)
                            .push_bind(None::<&str>)
                            .push_bind(None::<&[u8]>);
                    });
                    insert.push(" ON CONFLICT DO NOTHING");
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            conn.close().await?;
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            for transaction in all.chunks(RAW_TRANSACTION_ROWS) {
                let mut tx = conn.begin().await?;
                for chunk in transaction.chunks(RAW_STATEMENT_ROWS) {
                    let mut insert = QueryBuilder::<sqlx::Postgres>::new(
                        "INSERT INTO telemetry (device_id, key, ts, kind, num, text, shape, blob) ",
                    );
                    insert.push_values(chunk, |mut b, (device, key, ts, value)| {
                        b.push_bind(*device)
                            .push_bind(key.as_str())
                            .push_bind(*ts)
                            .push_bind("n")
                            .push_bind(*value)
                            .push_bind(None::<&str>)
                            .push_bind(None::<&str>)
                            .push_bind(None::<&[u8]>);
                    });
                    insert.push(" ON CONFLICT DO NOTHING");
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            conn.close().await?;
        }
    }
    Ok(())
}

async fn measure_idle(binary: &std::path::Path, settings: &Settings) -> Result<Idle, BoxError> {
    let env = server_env(
        None,
        vec![(
            "UNHIDRA_DEVICE_INACTIVITY_TIMEOUT",
            format!("{}s", settings.silence_after),
        )],
    );
    let server = Server::start_with_env(binary, &env).await?;
    let result = idle(&server, settings).await;
    server.stop().await;
    result
}

async fn idle(server: &Server, settings: &Settings) -> Result<Idle, BoxError> {
    let addr = server.addr();
    let token = login(addr).await?;
    let began = Instant::now();
    let devices = register(addr, &token, settings.idle, "idle").await?;
    crate::note(&format!(
        "devices: {} registered in {:.1} s",
        devices.len(),
        began.elapsed().as_secs_f64()
    ));
    let index: HashMap<Uuid, usize> = devices.iter().enumerate().map(|(i, d)| (d.id, i)).collect();
    // The admin's watcher, connected before any device.
    let mut watcher = watch_fleet(addr, &token).await?;
    tokio::time::sleep(crate::SETTLE).await;
    let rss_before_kib = server.memory()?.rss_kib;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(Uuid, Instant)>();
    let watch = tokio::spawn(async move {
        let mut lagged = false;
        loop {
            match watcher.next().await {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                        continue;
                    };
                    let data = &frame["data"];
                    if data["event"] == "lagged" {
                        lagged = true;
                    }
                    if data["event"] == "status" && data["status"] == "silent" {
                        let at = Instant::now();
                        if let Some(id) = data["device"]
                            .as_str()
                            .and_then(|d| Uuid::parse_str(d).ok())
                            && seen_tx.send((id, at)).is_err()
                        {
                            break;
                        }
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        lagged
    });
    // Connect every device; each says hello and then nothing at all.
    let gate = Arc::new(Semaphore::new(SETUP_PARALLEL));
    let connect_began = Instant::now();
    let tasks: Vec<_> = devices
        .iter()
        .map(|device| {
            let key = device.key.clone();
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _slot = gate.acquire().await;
                let ws = tokio::time::timeout(WITHIN, connect(addr, &key))
                    .await
                    .map_err(|_| format!("connect: no answer within {WITHIN:?}"))?
                    .map_err(|e| format!("connect: {e}"))?;
                Ok::<_, String>((ws, Instant::now()))
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(tasks.len());
    let mut hello_at = vec![None; devices.len()];
    let mut first_error = None;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok((ws, at))) => {
                sockets.push(ws);
                hello_at[i] = Some(at);
            }
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(err) => {
                first_error.get_or_insert(err.to_string());
            }
        }
    }
    let connect_seconds = connect_began.elapsed().as_secs_f64();
    let connected = u32::try_from(sockets.len()).unwrap_or(u32::MAX);
    crate::note(&format!(
        "devices: {connected} connected in {connect_seconds:.1} s"
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_kib = server.memory()?.rss_kib;
    // Wait for every silent status: the last hello's timeout, and some more.
    let timeout = Duration::from_secs(settings.silence_after);
    let last = hello_at
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or_else(Instant::now);
    let deadline = last + timeout + Duration::from_secs(10);
    let mut arrived: Vec<Option<Instant>> = vec![None; devices.len()];
    let mut waiting = connected;
    while waiting > 0 {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Ok(Some((id, at))) => {
                if let Some(&i) = index.get(&id)
                    && arrived[i].is_none()
                    && hello_at[i].is_some()
                {
                    arrived[i] = Some(at);
                    waiting -= 1;
                }
            }
            _ => break,
        }
    }
    watch.abort();
    let lagged = watch.await.unwrap_or(false);
    drop(sockets);
    let mut delays_us: Vec<u32> = hello_at
        .iter()
        .zip(&arrived)
        .filter_map(|(hello, seen)| {
            let due = (*hello)? + timeout;
            let late = seen.as_ref()?.saturating_duration_since(due);
            Some(u32::try_from(late.as_micros()).unwrap_or(u32::MAX))
        })
        .collect();
    delays_us.sort_unstable();
    Ok(Idle {
        devices: settings.idle,
        connected,
        connect_seconds,
        rss_before_kib,
        rss_after_kib,
        missed: connected - u32::try_from(delays_us.len()).unwrap_or(0),
        delays_us,
        lagged,
        first_error,
    })
}

/// An admin's WebSocket that watches the `fleet` topic.
async fn watch_fleet(addr: SocketAddr, token: &str) -> Result<Ws, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("unhidra.v1.json, bearer.{token}"))?,
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    ws.send(Message::text(r#"{"type":"watch","topic":"fleet"}"#))
        .await?;
    tokio::time::timeout(
        WITHIN,
        until(&mut ws, |f| f["type"] == "watching" && f["active"] == true),
    )
    .await
    .map_err(|_| "no answer to watch")??;
    Ok(ws)
}

/// The open files `idle` devices take in the bench (and in the server).
pub fn check_open_files(idle: u32) -> Result<(), BoxError> {
    crate::fanout::check_open_files_for(idle, "idle devices", "--idle").map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_valid_json_with_distinct_times_per_key() {
        let one: serde_json::Value = serde_json::from_str(&batch(1, 100, 1_000)).unwrap();
        let two: serde_json::Value = serde_json::from_str(&batch(2, 100, 1_000)).unwrap();
        assert_eq!(one["points"].as_array().unwrap().len(), 100);
        let mut seen = std::collections::HashSet::new();
        for frame in [&one, &two] {
            for p in frame["points"].as_array().unwrap() {
                let key = (
                    p["key"].as_str().unwrap().to_owned(),
                    p["ts"].as_i64().unwrap(),
                );
                assert!(seen.insert(key), "a (key, ts) repeats");
            }
        }
        assert_eq!(seen.len(), 200);
    }
}
