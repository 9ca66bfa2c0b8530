//! The fan-out scenario: one room, N subscriber WebSocket connections and one publisher that
//! sends at R messages a second, run against Unhidra and, with the very same load generator,
//! against nats-server and a Socket.IO server (`fanout_target.rs` holds what differs between
//! them). Every message body carries its send time in microseconds since an `Instant` the
//! whole process shares, so each subscriber measures the latency from the publisher's write to
//! its own read. Also the server's resident memory with the N connections idle, and the CPU
//! the server and this program use in each window.
//!
//! Everything is bounded: connection setup, every publishing window, every drain and the final
//! stop have a deadline, and the scenario only ever talks to 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use crate::BoxError;
use crate::fanout_target::{self, Access, Conn, Decoder, Event, Target, Ws};
use crate::peer::Peer;
use crate::server::{self, Memory, Server};

/// Deliveries per second the issue asks for.
pub const DELIVERIES_TARGET: f64 = 500_000.0;
/// p99 latency at the lowest rate the issue asks for, at 100 messages a second.
pub const P99_TARGET: Duration = Duration::from_millis(20);
/// The rate the p99 target is judged at.
pub const P99_TARGET_RATE: u32 = 100;
/// Resident memory per idle connection the issue asks for, in KiB.
pub const RSS_PER_CONNECTION_TARGET_KIB: f64 = 10.0;
/// Unhidra's best deliveries per second should be at least this share of nats-server's.
pub const NATS_RATIO_TARGET: f64 = 0.8;
/// Unhidra's best deliveries per second should be at least this many times Socket.IO's.
pub const SOCKETIO_RATIO_TARGET: f64 = 5.0;

/// Connections being set up at once.
const SETUP_CONCURRENCY: usize = 32;
/// How long one connection may take to connect, be greeted and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long all subscriber connections together may take to be set up.
const SETUP_BUDGET: Duration = Duration::from_secs(120);
/// Pause before memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// A drain ends when no delivery arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// The longest drain after a publishing window; a window not drained by then stops the
/// scenario (higher rates would only measure its backlog).
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// How often the publisher looks at the clock.
const PACE: Duration = Duration::from_millis(1);
/// At most this many rates.
pub const MAX_RATES: usize = 8;
/// File descriptors kept aside for the runtime, the HTTP client and the publisher.
const SPARE_FDS: u64 = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Subscriber connections.
    pub subscribers: u32,
    /// Publishing rates, messages per second, one window each.
    pub rates: Vec<u32>,
    /// Length of each publishing window.
    pub window: Duration,
    /// Unhidra's `sqlite_synchronous`: what an acknowledgement promises (`normal`: survives a
    /// crash of the process; `full`: a power loss too).
    pub synchronous: Synchronous,
}

/// SQLite's `synchronous` setting for the Unhidra server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    /// The default: acknowledged messages survive a crash of the process.
    Normal,
    /// Every commit waits for the disk: acknowledged messages survive a power loss.
    Full,
}

impl Synchronous {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Full => "full",
        }
    }
}

/// One publishing window.
#[derive(Debug, Clone)]
pub struct Phase {
    /// The asked rate, messages per second.
    pub rate: u32,
    /// Messages written by the publisher.
    pub sent: u64,
    /// Acknowledgements the publisher got back (`None`: the protocol has none).
    pub acked: Option<u64>,
    /// From the first write to the last.
    pub send_window: Duration,
    /// Subscribers connected when the window started.
    pub listeners: u64,
    /// Messages received by all subscribers.
    pub delivered: u64,
    /// WebSocket frames that carried them (nats-server packs several messages into one).
    pub frames: u64,
    /// From the first write to the last delivery.
    pub delivery_window: Duration,
    /// Latency percentiles of the deliveries, in microseconds (`None` without deliveries).
    pub p50_us: Option<u64>,
    /// 99th percentile.
    pub p99_us: Option<u64>,
    /// The largest.
    pub max_us: Option<u64>,
    /// Subscribers that lost their connection during this window or its drain.
    pub lost: u64,
    /// CPU used by the server from the first write to the end of the drain, in cores.
    pub server_cores: Option<f64>,
    /// CPU used by this program (publisher and subscribers) over the same time, in cores.
    pub client_cores: Option<f64>,
    /// CPU used by the whole machine over the same time, in cores: more than the server and
    /// this program together means something else ran too.
    pub machine_cores: Option<f64>,
    /// CPU time the hypervisor gave to others over the same time, in cores.
    pub steal_cores: Option<f64>,
}

impl Phase {
    /// `sent × listeners`.
    pub fn expected(&self) -> u64 {
        self.sent.saturating_mul(self.listeners)
    }

    /// Whether every expected delivery arrived.
    pub fn complete(&self) -> bool {
        self.sent > 0 && self.delivered >= self.expected()
    }

    /// Whether the server kept up with the publisher: everything arrived, at no less than 90%
    /// of `rate × listeners` a second. A window that kept pace measures the publisher, not the
    /// server's capacity.
    pub fn kept_pace(&self) -> bool {
        self.complete()
            && self.deliveries_per_sec() >= 0.9 * f64::from(self.rate) * self.listeners as f64
    }

    /// Deliveries per WebSocket frame.
    pub fn per_frame(&self) -> Option<f64> {
        (self.frames > 0).then(|| self.delivered as f64 / self.frames as f64)
    }

    /// Deliveries per second from the first write to the last delivery.
    pub fn deliveries_per_sec(&self) -> f64 {
        self.delivered as f64 / self.delivery_window.as_secs_f64().max(1e-9)
    }
}

/// Everything the scenario measured against one server.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The server.
    pub target: Target,
    /// What ran, with its version.
    pub program: String,
    /// Subscribers asked for.
    pub asked: u32,
    /// Subscribers connected and subscribed.
    pub connected: u64,
    /// The first setup errors (at most a few).
    pub setup_errors: Vec<String>,
    /// How long the subscribers took to connect and subscribe.
    pub setup_time: Duration,
    /// Server memory with the publisher connected, before any subscriber.
    pub before: Memory,
    /// Server memory with every subscriber connected, subscribed and idle.
    pub connected_memory: Memory,
    /// Server memory after the last window.
    pub after: Memory,
    /// One per rate that ran.
    pub phases: Vec<Phase>,
    /// Rates not run because an earlier window was not drained within the drain limit.
    pub skipped: Vec<u32>,
    /// Close codes seen by subscribers (and how often); 0 for a connection that ended
    /// without a close frame.
    pub close_codes: BTreeMap<u16, u64>,
    /// The first error the publisher got, if any.
    pub publisher_error: Option<String>,
}

impl Outcome {
    /// `(RSS with the subscribers − RSS before) ÷ subscribers`, in KiB.
    pub fn rss_per_connection_kib(&self) -> Option<f64> {
        (self.connected > 0).then(|| {
            (self.connected_memory.rss_kib as f64 - self.before.rss_kib as f64)
                / self.connected as f64
        })
    }

    /// The window with the most deliveries per second.
    pub fn best_phase(&self) -> Option<&Phase> {
        self.phases
            .iter()
            .max_by(|a, b| a.deliveries_per_sec().total_cmp(&b.deliveries_per_sec()))
    }

    /// The most deliveries per second of any window.
    pub fn best_deliveries_per_sec(&self) -> Option<f64> {
        self.best_phase().map(Phase::deliveries_per_sec)
    }

    /// Deliveries per second of the server's CPU time in its best window: a measure of the
    /// cost per delivery that does not depend on how the machine's cores were shared.
    pub fn best_per_server_core(&self) -> Option<f64> {
        let best = self.best_phase()?;
        Some(best.deliveries_per_sec() / best.server_cores.filter(|c| *c > 0.0)?)
    }

    /// Whether some window found the server's limit (it fell behind the publisher), so that
    /// the best window measures its capacity rather than the publisher's pace.
    pub fn saturated(&self) -> bool {
        self.phases.iter().any(|p| !p.kept_pace())
    }

    /// The window at `rate`, if it ran.
    pub fn phase(&self, rate: u32) -> Option<&Phase> {
        self.phases.iter().find(|p| p.rate == rate)
    }
}

/// The environment Unhidra is started with: no limit gets in the way of the scenario.
pub fn server_env(synchronous: Synchronous) -> Vec<(&'static str, String)> {
    [
        ("UNHIDRA_SQLITE_SYNCHRONOUS", synchronous.name()),
        ("UNHIDRA_RATE_LIMIT_IP_PER_MINUTE", "0"),
        ("UNHIDRA_RATE_LIMIT_USER_PER_MINUTE", "0"),
        ("UNHIDRA_WS_MAX_CONNECTIONS_PER_IP", "100000"),
        ("UNHIDRA_RATE_LIMIT_MESSAGES_PER_SEC", "0"),
        ("UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE", "0"),
        ("UNHIDRA_RATE_LIMIT_REGISTER_PER_HOUR", "0"),
        ("UNHIDRA_WS_QUEUE_FRAMES", "4096"),
    ]
    .into_iter()
    .map(|(key, value)| (key, value.to_owned()))
    .collect()
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Fails early, with the `ulimit -n` to use, if `subscribers` connections cannot be opened.
pub fn check_open_files(subscribers: u32) -> Result<Option<u64>, BoxError> {
    check_open_files_for(subscribers, "subscribers", "--subscribers")
}

/// Fails early, with the `ulimit -n` to use, if `count` connections (of `what`, asked for
/// with `flag`) cannot be opened.
pub fn check_open_files_for(count: u32, what: &str, flag: &str) -> Result<Option<u64>, BoxError> {
    let limit = open_files_limit();
    let needed = u64::from(count) + SPARE_FDS;
    match limit {
        Some(limit) if limit < needed => Err(format!(
            "{count} {what} need about {needed} open files, but this process may \
             open {limit}; run `ulimit -n {}` in the shell first (the servers inherit it too), \
             or ask for fewer with {flag}",
            needed.next_power_of_two().max(1024)
        )
        .into()),
        _ => Ok(limit),
    }
}

/// A running server of any target, killed if dropped.
#[derive(Debug)]
enum Process {
    Unhidra(Server),
    Peer(Peer),
}

impl Process {
    async fn start(
        target: Target,
        unhidra: Option<&Path>,
        synchronous: Synchronous,
    ) -> Result<(Self, String), BoxError> {
        Ok(match target {
            Target::Unhidra => {
                let binary = unhidra.ok_or("no unhidra binary to measure")?;
                let server = Server::start_with_env(binary, &server_env(synchronous)).await?;
                (Self::Unhidra(server), format!("`{}`", binary.display()))
            }
            Target::Nats => {
                let peer = Peer::nats().await?;
                let program = peer.program().to_owned();
                (Self::Peer(peer), program)
            }
            Target::SocketIo => {
                let peer = Peer::socketio().await?;
                let program = peer.program().to_owned();
                (Self::Peer(peer), program)
            }
        })
    }

    fn pid(&self) -> u32 {
        match self {
            Self::Unhidra(server) => server.pid(),
            Self::Peer(peer) => peer.pid(),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Self::Unhidra(server) => server.addr(),
            Self::Peer(peer) => peer.addr(),
        }
    }

    fn memory(&self) -> Result<Memory, BoxError> {
        match self {
            Self::Unhidra(server) => server.memory(),
            Self::Peer(peer) => peer.memory(),
        }
    }

    async fn stop(self) {
        match self {
            Self::Unhidra(server) => {
                server.stop().await;
            }
            Self::Peer(peer) => peer.stop().await,
        }
    }
}

/// Runs the scenario against a fresh server of `target` (`unhidra` is the binary to start for
/// [`Target::Unhidra`]).
pub async fn run(
    target: Target,
    unhidra: Option<&Path>,
    settings: &Settings,
) -> Result<Outcome, BoxError> {
    check_open_files(settings.subscribers)?;
    let (process, program) = Process::start(target, unhidra, settings.synchronous).await?;
    crate::note(&format!(
        "fanout: {} ({program}) pid {} on {}",
        target.name(),
        process.pid(),
        process.addr()
    ));
    let result = async {
        let access = Access::prepare(target, process.addr()).await?;
        exercise(&process, &access, settings, program).await
    }
    .await;
    process.stop().await;
    result
}

/// What every subscriber shares.
#[derive(Debug)]
struct Shared {
    /// Deliveries per phase.
    delivered: Vec<AtomicU64>,
    /// Subscribers whose connection ended before they were told to stop.
    lost: AtomicU64,
    /// Close codes of the lost ones.
    close_codes: Mutex<BTreeMap<u16, u64>>,
}

/// What one subscriber saw, per phase.
#[derive(Debug, Default)]
struct Seen {
    /// Latency histogram per phase (allocated on the first delivery).
    histograms: Vec<Option<Histogram>>,
    /// Time of the last delivery per phase, microseconds since the epoch.
    last_us: Vec<u64>,
    /// WebSocket frames that carried deliveries, per phase (of the frame's first delivery).
    frames: Vec<u64>,
}

type WsSink = futures_util::stream::SplitSink<Ws, Message>;
/// The publisher's sending half, shared with its reader, which answers the server's pings.
type SharedSink = Arc<tokio::sync::Mutex<WsSink>>;

/// One window as measured before the subscribers' histograms are gathered.
#[derive(Debug)]
struct Window {
    rate: u32,
    sent: u64,
    send_window: Duration,
    listeners: u64,
    started: Instant,
    lost: u64,
    server_cores: Option<f64>,
    client_cores: Option<f64>,
    machine_cores: Option<f64>,
    steal_cores: Option<f64>,
}

async fn exercise(
    process: &Process,
    access: &Access,
    settings: &Settings,
    program: String,
) -> Result<Outcome, BoxError> {
    let target = access.target;
    let phases = settings.rates.len();
    let epoch = Instant::now();

    // The publisher: connected before the memory baseline so that it does not count.
    let publisher = tokio::time::timeout(SETUP_TIMEOUT, fanout_target::publisher(access))
        .await
        .map_err(|_| "the publisher was not set up in time")??;
    let Conn { ws, mut decoder } = publisher;
    let (sink, mut stream) = ws.split();
    let sink: SharedSink = Arc::new(tokio::sync::Mutex::new(sink));
    let acks: Arc<Vec<AtomicU64>> = Arc::new((0..phases).map(|_| AtomicU64::new(0)).collect());
    let publisher_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let reader = {
        let acks = Arc::clone(&acks);
        let publisher_error = Arc::clone(&publisher_error);
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            let first_error = |text: String| {
                if let Ok(mut first) = publisher_error.lock() {
                    first.get_or_insert(text);
                }
            };
            while let Some(Ok(frame)) = stream.next().await {
                let mut pings = 0;
                let fed = decoder.feed(&frame, &mut |event| match event {
                    Event::Acked { phase } => {
                        if let Some(counter) = acks.get(phase) {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Event::Refused(text) => first_error(text),
                    Event::Ping => pings += 1,
                    _ => {}
                });
                if let Err(err) = fed {
                    first_error(err);
                    break;
                }
                if pings > 0 {
                    let mut sink = sink.lock().await;
                    if fanout_target::answer_pings(&mut *sink, target, pings)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        })
    };

    tokio::time::sleep(SETTLE).await;
    let before = process.memory()?;

    // The subscribers, set up a few at a time.
    crate::note(&format!(
        "fanout: opening {} subscriber connections ({SETUP_CONCURRENCY} at a time)",
        settings.subscribers
    ));
    let shared = Arc::new(Shared {
        delivered: (0..phases).map(|_| AtomicU64::new(0)).collect(),
        lost: AtomicU64::new(0),
        close_codes: Mutex::new(BTreeMap::new()),
    });
    let access = Arc::new(access.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let setup_started = Instant::now();
    let mut tasks: Vec<JoinHandle<Seen>> = Vec::new();
    for _ in 0..settings.subscribers {
        let gate = Arc::clone(&gate);
        let access = Arc::clone(&access);
        let shared = Arc::clone(&shared);
        let ready = ready_tx.clone();
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let subscribed = {
                let Ok(_permit) = gate.acquire().await else {
                    return Seen::default();
                };
                tokio::time::timeout(SETUP_TIMEOUT, fanout_target::subscriber(&access))
                    .await
                    .unwrap_or_else(|_| Err("not subscribed within 10 s".into()))
            };
            match subscribed {
                Ok(conn) => {
                    let _ = ready.send(Ok(()));
                    listen(conn, epoch, phases, &shared, stop).await
                }
                Err(err) => {
                    let _ = ready.send(Err(err.to_string()));
                    Seen::default()
                }
            }
        }));
    }
    drop(ready_tx);
    let mut connected: u64 = 0;
    let mut failed: u64 = 0;
    let mut setup_errors = Vec::new();
    let deadline = tokio::time::Instant::now() + SETUP_BUDGET;
    while connected + failed < u64::from(settings.subscribers) {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => connected += 1,
            Ok(Some(Err(err))) => {
                failed += 1;
                if setup_errors.len() < 5 {
                    setup_errors.push(err);
                }
            }
            Ok(None) => break,
            Err(_) => {
                setup_errors.push(format!(
                    "only {connected} of {} subscribers were set up within {SETUP_BUDGET:?}",
                    settings.subscribers
                ));
                break;
            }
        }
    }
    let setup_time = setup_started.elapsed();
    crate::note(&format!(
        "fanout: {connected} subscribers ready in {:.1} s, {failed} failed",
        setup_time.as_secs_f64()
    ));
    tokio::time::sleep(SETTLE).await;
    let connected_memory = process.memory()?;
    if connected == 0 {
        let _ = stop_tx.send(true);
        reader.abort();
        return Err(format!(
            "no subscriber could subscribe: {}",
            setup_errors.first().map_or("?", String::as_str)
        )
        .into());
    }

    // One publishing window per rate.
    let mut windows = Vec::new();
    let mut skipped = Vec::new();
    let mut stopped = false;
    let server_pid = process.pid();
    let me = std::process::id();
    for (phase, &rate) in settings.rates.iter().enumerate() {
        if stopped {
            skipped.push(rate);
            continue;
        }
        let lost_before = shared.lost.load(Ordering::Relaxed);
        let listeners = connected.saturating_sub(lost_before);
        crate::note(&format!(
            "fanout: {rate} messages/s for {} s to {listeners} subscribers",
            settings.window.as_secs()
        ));
        let cpu_before = (
            server::cpu_time(server_pid),
            server::cpu_time(me),
            server::machine_ticks(),
        );
        let started = Instant::now();
        let pace = Pace {
            phase,
            rate,
            window: settings.window,
            epoch,
        };
        let sent = publish(&sink, target, &access.room, pace).await;
        let send_window = started.elapsed();
        let (sent, send_error) = match sent {
            Ok(sent) => (sent, None),
            Err((sent, err)) => (sent, Some(err)),
        };
        let expected = sent.saturating_mul(listeners);
        let delivered = drain(&shared.delivered[phase], expected).await;
        let cpu_wall = started.elapsed().as_secs_f64().max(1e-9);
        let cores = |before: Option<Duration>, after: Option<Duration>| {
            Some(after?.saturating_sub(before?).as_secs_f64() / cpu_wall)
        };
        let server_cores = cores(cpu_before.0, server::cpu_time(server_pid));
        let client_cores = cores(cpu_before.1, server::cpu_time(me));
        let (machine_cores, steal_cores) = match (cpu_before.2, server::machine_ticks()) {
            (Some(t0), Some(t1)) => t0.cores_until(t1).unzip(),
            _ => (None, None),
        };
        crate::note(&format!(
            "fanout: {rate}/s: sent {sent} in {:.2} s, delivered {delivered} of {expected}{}",
            send_window.as_secs_f64(),
            send_error.map_or_else(String::new, |e| format!(" (publisher: {e})"))
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        windows.push(Window {
            rate,
            sent,
            send_window,
            listeners,
            started,
            lost: shared
                .lost
                .load(Ordering::Relaxed)
                .saturating_sub(lost_before),
            server_cores,
            client_cores,
            machine_cores,
            steal_cores,
        });
        if delivered < expected {
            crate::note(&format!(
                "fanout: {rate}/s was not delivered in full (the drain stopped after a quiet \
                 second or {DRAIN_MAX:?}); skipping the rates after it"
            ));
            stopped = true;
        }
    }

    // Stop everyone and gather what they saw.
    let _ = stop_tx.send(true);
    let mut seen = Vec::with_capacity(tasks.len());
    let gather_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for task in tasks {
        if let Ok(Ok(s)) = tokio::time::timeout_at(gather_deadline, task).await {
            seen.push(s);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        sink.lock().await.close().await
    })
    .await;
    reader.abort();
    let after = process.memory()?;

    let phases_out = windows
        .into_iter()
        .enumerate()
        .map(|(phase, w)| {
            let mut merged = Histogram::new();
            let mut last_us = 0_u64;
            let mut frames = 0_u64;
            for s in &seen {
                if let Some(Some(h)) = s.histograms.get(phase) {
                    merged.merge(h);
                }
                last_us = last_us.max(s.last_us.get(phase).copied().unwrap_or(0));
                frames += s.frames.get(phase).copied().unwrap_or(0);
            }
            let started_us = micros(w.started.duration_since(epoch));
            let delivery_window = Duration::from_micros(last_us.saturating_sub(started_us));
            Phase {
                rate: w.rate,
                sent: w.sent,
                acked: target
                    .has_acks()
                    .then(|| acks[phase].load(Ordering::Relaxed)),
                send_window: w.send_window,
                listeners: w.listeners,
                delivered: shared.delivered[phase].load(Ordering::Relaxed),
                frames,
                delivery_window: delivery_window.max(w.send_window),
                p50_us: merged.quantile(0.50),
                p99_us: merged.quantile(0.99),
                max_us: merged.quantile(1.0),
                lost: w.lost,
                server_cores: w.server_cores,
                client_cores: w.client_cores,
                machine_cores: w.machine_cores,
                steal_cores: w.steal_cores,
            }
        })
        .collect();

    let close_codes = shared
        .close_codes
        .lock()
        .map(|codes| codes.clone())
        .unwrap_or_default();
    let publisher_error = publisher_error.lock().ok().and_then(|e| e.clone());
    Ok(Outcome {
        target,
        program,
        asked: settings.subscribers,
        connected,
        setup_errors,
        setup_time,
        before,
        connected_memory,
        after,
        phases: phases_out,
        skipped,
        close_codes,
        publisher_error,
    })
}

/// Waits until `counter` reaches `expected`, a second passes without any delivery, or the
/// drain limit; returns the count then.
async fn drain(counter: &AtomicU64, expected: u64) -> u64 {
    let drain_started = Instant::now();
    let mut last = counter.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while last < expected && drain_started.elapsed() < DRAIN_MAX {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= DRAIN_QUIET {
            break;
        }
    }
    counter.load(Ordering::Relaxed)
}

/// One publishing window's pace.
#[derive(Debug, Clone, Copy)]
struct Pace {
    phase: usize,
    rate: u32,
    window: Duration,
    epoch: Instant,
}

/// Writes `rate × window` messages at `rate` a second (or as fast as the socket takes them,
/// for at most twice the window). Returns how many were written, and the error that stopped
/// the publisher early, if any.
async fn publish(
    sink: &tokio::sync::Mutex<WsSink>,
    target: Target,
    room: &str,
    pace: Pace,
) -> Result<u64, (u64, String)> {
    let Pace {
        phase,
        rate,
        window,
        epoch,
    } = pace;
    let total = (f64::from(rate) * window.as_secs_f64()).round() as u64;
    let hard_stop = window * 2 + Duration::from_secs(1);
    let started = Instant::now();
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent: u64 = 0;
    while sent < total {
        tick.tick().await;
        let elapsed = started.elapsed();
        if elapsed >= hard_stop {
            return Err((sent, format!("stopped after {hard_stop:?}")));
        }
        let due = ((elapsed.as_secs_f64() * f64::from(rate)).ceil() as u64).min(total);
        // Held for one tick's frames only, so that the reader can answer a ping in between.
        let mut sink = sink.lock().await;
        while sent < due {
            let frame = target.publish_frame(room, phase, sent, micros(epoch.elapsed()));
            match tokio::time::timeout(hard_stop, sink.feed(frame)).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(err)) => return Err((sent, err.to_string())),
                Err(_) => return Err((sent, "the socket took no more".to_owned())),
            }
        }
        match tokio::time::timeout(hard_stop, sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err((sent, err.to_string())),
            Err(_) => return Err((sent, "the socket took no more".to_owned())),
        }
    }
    Ok(sent)
}

/// Reads deliveries until told to stop (or the connection ends), recording latencies and
/// answering the server's pings.
async fn listen(
    conn: Conn,
    epoch: Instant,
    phases: usize,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let Conn {
        mut ws,
        mut decoder,
    } = conn;
    let mut seen = Seen {
        histograms: (0..phases).map(|_| None).collect(),
        last_us: vec![0; phases],
        frames: vec![0; phases],
    };
    let mut close_code = None;
    let ended = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break false,
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(frame))) => {
                    close_code = Some(frame.map_or(0, |f| u16::from(f.code)));
                    break true;
                }
                Some(Ok(frame)) => {
                    if !take(&mut decoder, &frame, epoch, &mut seen, shared, &mut ws).await {
                        break true;
                    }
                }
                Some(Err(_)) | None => break true,
            },
        }
    };
    if ended {
        shared.lost.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut codes) = shared.close_codes.lock() {
            *codes.entry(close_code.unwrap_or(0)).or_insert(0) += 1;
        }
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    seen
}

/// Records the deliveries of one frame and answers its pings; false if the connection cannot
/// go on.
async fn take(
    decoder: &mut Decoder,
    frame: &Message,
    epoch: Instant,
    seen: &mut Seen,
    shared: &Shared,
    ws: &mut Ws,
) -> bool {
    let now = micros(epoch.elapsed());
    let mut pings = 0;
    let mut first_phase = None;
    let fed = decoder.feed(frame, &mut |event| match event {
        Event::Delivery { phase, sent_us } => {
            if let Some(histogram) = seen.histograms.get_mut(phase) {
                first_phase.get_or_insert(phase);
                histogram
                    .get_or_insert_with(Histogram::new)
                    .record(now.saturating_sub(sent_us));
                seen.last_us[phase] = now;
                shared.delivered[phase].fetch_add(1, Ordering::Relaxed);
            }
        }
        Event::Ping => pings += 1,
        _ => {}
    });
    if let Some(phase) = first_phase {
        seen.frames[phase] += 1;
    }
    fed.is_ok()
        && (pings == 0
            || fanout_target::answer_pings(ws, decoder.target(), pings)
                .await
                .is_ok())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A log-linear latency histogram in microseconds: exact below 128 µs, then 64 buckets per
/// power of two (within 1.6%).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u32>,
    total: u64,
}

/// Sub-buckets per power of two, as bits.
const SUB_BITS: u32 = 6;
/// Values are clamped to `u32::MAX` µs (71 minutes), so the top bucket is that of 2³¹–2³².
const BUCKETS: usize = ((32 - SUB_BITS as usize) << SUB_BITS) + (1 << SUB_BITS);

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }

    fn index(value: u64) -> usize {
        let top = 63 - value.max(1).leading_zeros();
        if top <= SUB_BITS {
            return usize::try_from(value).unwrap_or(0);
        }
        let shift = top - SUB_BITS;
        ((shift as usize) << SUB_BITS) + usize::try_from(value >> shift).unwrap_or(0)
    }

    /// The smallest value of bucket `index`, and its width.
    fn bounds(index: usize) -> (u64, u64) {
        let sub = 1_usize << SUB_BITS;
        if index < 2 * sub {
            return (index as u64, 1);
        }
        let shift = (index >> SUB_BITS) - 1;
        let mantissa = (index & (sub - 1)) + sub;
        ((mantissa as u64) << shift, 1_u64 << shift)
    }

    /// Counts one value.
    pub fn record(&mut self, value: u64) {
        let index = Self::index(value.min(u64::from(u32::MAX))).min(BUCKETS - 1);
        self.counts[index] = self.counts[index].saturating_add(1);
        self.total += 1;
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.total += other.total;
    }

    /// The value below which a share `q` of the values lie (a bucket's midpoint); `None` if
    /// empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0_u64;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                let (low, width) = Self::bounds(index);
                return Some(low + width / 2);
            }
        }
        None
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_close() {
        for value in [
            0_u64,
            1,
            63,
            127,
            128,
            129,
            1000,
            12_345,
            999_999,
            1 << 31,
            u64::from(u32::MAX),
        ] {
            let index = Histogram::index(value);
            let (low, width) = Histogram::bounds(index);
            assert!(
                low <= value && value < low + width,
                "{value}: {low}+{width}"
            );
            assert!(width as f64 <= (value as f64 / 64.0).max(1.0), "{value}");
        }
        for index in 1..BUCKETS {
            let (low, width) = Histogram::bounds(index - 1);
            assert_eq!(Histogram::bounds(index).0, low + width, "{index}");
        }
        let mut h = Histogram::new();
        for v in 1..=1000 {
            h.record(v);
        }
        assert_eq!(Histogram::index(u64::from(u32::MAX)), BUCKETS - 1);
        let p50 = h.quantile(0.5).unwrap();
        assert!((490..=510).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((975..=1005).contains(&p99), "{p99}");
        assert_eq!(Histogram::new().quantile(0.5), None);
    }

    #[test]
    fn the_open_files_limit_is_read() {
        assert!(open_files_limit().is_some());
        assert!(check_open_files(u32::MAX).is_err());
    }
}
