//! The fan-out scenario: one room, N subscriber WebSocket connections (all of one user) and one
//! publisher (another user) that sends at R messages a second. Every message body carries its
//! send time in microseconds since an `Instant` the whole process shares, so each subscriber
//! measures the latency from the publisher's write to its own read. Also the server's resident
//! memory with the N connections idle.
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
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::BoxError;
use crate::http::{Connection, post_json_request};
use crate::server::{self, Memory, Server};

/// Deliveries per second the issue asks for.
pub const DELIVERIES_TARGET: f64 = 500_000.0;
/// p99 latency at the lowest rate the issue asks for, at 100 messages a second.
pub const P99_TARGET: Duration = Duration::from_millis(20);
/// The rate the p99 target is judged at.
pub const P99_TARGET_RATE: u32 = 100;
/// Resident memory per idle connection the issue asks for, in KiB.
pub const RSS_PER_CONNECTION_TARGET_KIB: f64 = 10.0;

/// A password long and uncommon enough for the server's policy.
const PASSWORD: &str = "maple orbit candle frost 42";
/// Connections being set up at once.
const SETUP_CONCURRENCY: usize = 32;
/// How long one connection may take to connect, be welcomed, join and answer a ping.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long all subscriber connections together may take to be set up.
const SETUP_BUDGET: Duration = Duration::from_secs(120);
/// How long one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// A drain ends when no delivery arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// The longest drain after a publishing window; a window not drained by then stops the
/// scenario (higher rates would only measure its backlog).
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// How often the publisher looks at the clock.
const PACE: Duration = Duration::from_millis(1);
/// The read buffer of each client connection. tungstenite's default, 128 KiB, is zero-filled
/// up to its capacity before every `read`, which made the subscribers cost more CPU than the
/// server; 8 KiB holds dozens of these frames.
const CLIENT_READ_BUFFER: usize = 8 * 1024;
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
}

/// One publishing window.
#[derive(Debug, Clone)]
pub struct Phase {
    /// The asked rate, messages per second.
    pub rate: u32,
    /// Messages written by the publisher.
    pub sent: u64,
    /// `ack` frames the publisher got back.
    pub acked: u64,
    /// From the first write to the last.
    pub send_window: Duration,
    /// Subscribers connected when the window started.
    pub listeners: u64,
    /// `message` frames received by all subscribers.
    pub delivered: u64,
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
}

impl Phase {
    /// `sent × listeners`.
    pub fn expected(&self) -> u64 {
        self.sent.saturating_mul(self.listeners)
    }

    /// Deliveries per second from the first write to the last delivery.
    pub fn deliveries_per_sec(&self) -> f64 {
        self.delivered as f64 / self.delivery_window.as_secs_f64().max(1e-9)
    }
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Subscribers asked for.
    pub asked: u32,
    /// Subscribers connected and joined.
    pub connected: u64,
    /// The first setup errors (at most a few).
    pub setup_errors: Vec<String>,
    /// How long the subscribers took to connect and join.
    pub setup_time: Duration,
    /// Server memory after the users, the room and the publisher, before any subscriber.
    pub before: Memory,
    /// Server memory with every subscriber connected, joined and idle.
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
    /// The first error frame the publisher got, if any.
    pub publisher_error: Option<String>,
    /// The soft limit on open files of this process.
    pub open_files: Option<u64>,
}

impl Outcome {
    /// `(RSS with the subscribers − RSS before) ÷ subscribers`, in KiB.
    pub fn rss_per_connection_kib(&self) -> Option<f64> {
        (self.connected > 0).then(|| {
            (self.connected_memory.rss_kib as f64 - self.before.rss_kib as f64)
                / self.connected as f64
        })
    }
}

/// The environment the server is started with: no limit gets in the way of the scenario.
pub fn server_env() -> Vec<(&'static str, String)> {
    [
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
    let limit = open_files_limit();
    let needed = u64::from(subscribers) + SPARE_FDS;
    match limit {
        Some(limit) if limit < needed => Err(format!(
            "{subscribers} subscribers need about {needed} open files, but this process may \
             open {limit}; run `ulimit -n {}` in the shell first (the server inherits it too), \
             or ask for fewer with --subscribers",
            needed.next_power_of_two().max(1024)
        )
        .into()),
        _ => Ok(limit),
    }
}

/// Runs the scenario against a fresh server.
pub async fn run(binary: &Path, settings: &Settings) -> Result<Outcome, BoxError> {
    let open_files = check_open_files(settings.subscribers)?;
    let server = Server::start_with_env(binary, &server_env()).await?;
    crate::note(&format!(
        "fanout: server pid {} on {}",
        server.pid(),
        server.addr()
    ));
    let result = exercise(&server, settings, open_files).await;
    server.stop().await;
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
}

async fn exercise(
    server: &Server,
    settings: &Settings,
    open_files: Option<u64>,
) -> Result<Outcome, BoxError> {
    let addr = server.addr();
    let phases = settings.rates.len();
    let epoch = Instant::now();

    let subscriber_token = account(addr, "fanout-sub@example.com").await?;
    let publisher_token = account(addr, "fanout-pub@example.com").await?;
    let room = create_room(addr, &publisher_token).await?;
    crate::note(&format!("fanout: room {room}"));

    // The publisher: connected before the memory baseline so that it does not count.
    let publisher = tokio::time::timeout(SETUP_TIMEOUT, open(addr, &publisher_token))
        .await
        .map_err(|_| "the publisher was not welcomed in time")??;
    let (mut sink, mut stream) = publisher.split();
    let acks: Arc<Vec<AtomicU64>> = Arc::new((0..phases).map(|_| AtomicU64::new(0)).collect());
    let publisher_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let reader = {
        let acks = Arc::clone(&acks);
        let publisher_error = Arc::clone(&publisher_error);
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                let text = text.as_str();
                if text.starts_with(r#"{"type":"ack""#) {
                    if let Some(counter) = ack_phase(text).and_then(|phase| acks.get(phase)) {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                } else if text.starts_with(r#"{"type":"error""#)
                    && let Ok(mut first) = publisher_error.lock()
                {
                    first.get_or_insert_with(|| text.to_owned());
                }
            }
        })
    };

    tokio::time::sleep(SETTLE).await;
    let before = server.memory()?;

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
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let setup_started = Instant::now();
    let mut tasks: Vec<JoinHandle<Seen>> = Vec::new();
    for _ in 0..settings.subscribers {
        let gate = Arc::clone(&gate);
        let token = subscriber_token.clone();
        let room = room.clone();
        let shared = Arc::clone(&shared);
        let ready = ready_tx.clone();
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let joined = {
                let Ok(_permit) = gate.acquire().await else {
                    return Seen::default();
                };
                tokio::time::timeout(SETUP_TIMEOUT, subscribe(addr, &token, &room))
                    .await
                    .unwrap_or_else(|_| Err("no welcome, join or pong within 10 s".into()))
            };
            match joined {
                Ok(ws) => {
                    let _ = ready.send(Ok(()));
                    listen(ws, epoch, phases, &shared, stop).await
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
        "fanout: {connected} subscribers joined in {:.1} s, {failed} failed",
        setup_time.as_secs_f64()
    ));
    tokio::time::sleep(SETTLE).await;
    let connected_memory = server.memory()?;
    if connected == 0 {
        let _ = stop_tx.send(true);
        reader.abort();
        return Err(format!(
            "no subscriber could join: {}",
            setup_errors.first().map_or("?", String::as_str)
        )
        .into());
    }

    // One publishing window per rate.
    let mut windows = Vec::new();
    let mut skipped = Vec::new();
    let mut stopped = false;
    let server_pid = server.pid();
    let me = std::process::id();
    for (phase, &rate) in settings.rates.iter().enumerate() {
        if stopped {
            skipped.push(rate);
            continue;
        }
        let listeners = connected.saturating_sub(shared.lost.load(Ordering::Relaxed));
        let lost_before = shared.lost.load(Ordering::Relaxed);
        crate::note(&format!(
            "fanout: {rate} messages/s for {} s to {listeners} subscribers",
            settings.window.as_secs()
        ));
        let cpu_before = (server::cpu_time(server_pid), server::cpu_time(me));
        let started = Instant::now();
        let sent = publish(&mut sink, &room, phase, rate, settings.window, epoch).await;
        let send_window = started.elapsed();
        let (sent, send_error) = match sent {
            Ok(sent) => (sent, None),
            Err((sent, err)) => (sent, Some(err)),
        };
        let expected = sent.saturating_mul(listeners);
        let counter = &shared.delivered[phase];
        let drain_started = Instant::now();
        let mut last = counter.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while counter.load(Ordering::Relaxed) < expected && drain_started.elapsed() < DRAIN_MAX {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = counter.load(Ordering::Relaxed);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= DRAIN_QUIET {
                break;
            }
        }
        let delivered = counter.load(Ordering::Relaxed);
        let cpu_wall = started.elapsed().as_secs_f64().max(1e-9);
        let cores = |before: Option<Duration>, after: Option<Duration>| {
            Some(after?.saturating_sub(before?).as_secs_f64() / cpu_wall)
        };
        let server_cores = cores(cpu_before.0, server::cpu_time(server_pid));
        let client_cores = cores(cpu_before.1, server::cpu_time(me));
        crate::note(&format!(
            "fanout: {rate}/s: sent {sent} in {:.2} s, delivered {delivered} of {expected}{}",
            send_window.as_secs_f64(),
            send_error.map_or_else(String::new, |e| format!(" (publisher: {e})"))
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lost = shared
            .lost
            .load(Ordering::Relaxed)
            .saturating_sub(lost_before);
        let drained = delivered >= expected;
        windows.push((
            rate,
            sent,
            send_window,
            listeners,
            started,
            lost,
            (server_cores, client_cores),
        ));
        if !drained {
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
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    reader.abort();
    let after = server.memory()?;

    let mut phases_out = Vec::new();
    for (
        phase,
        (rate, sent, send_window, listeners, started, lost, (server_cores, client_cores)),
    ) in windows.into_iter().enumerate()
    {
        let mut merged = Histogram::new();
        let mut last_us = 0_u64;
        for s in &seen {
            if let Some(Some(h)) = s.histograms.get(phase) {
                merged.merge(h);
            }
            last_us = last_us.max(s.last_us.get(phase).copied().unwrap_or(0));
        }
        let started_us = micros(started.duration_since(epoch));
        let delivery_window = Duration::from_micros(last_us.saturating_sub(started_us));
        phases_out.push(Phase {
            rate,
            sent,
            acked: acks[phase].load(Ordering::Relaxed),
            send_window,
            listeners,
            delivered: shared.delivered[phase].load(Ordering::Relaxed),
            delivery_window: delivery_window.max(send_window),
            p50_us: merged.quantile(0.50),
            p99_us: merged.quantile(0.99),
            max_us: merged.quantile(1.0),
            lost,
            server_cores,
            client_cores,
        });
    }

    let close_codes = shared
        .close_codes
        .lock()
        .map(|codes| codes.clone())
        .unwrap_or_default();
    let publisher_error = publisher_error.lock().ok().and_then(|e| e.clone());
    Ok(Outcome {
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
        open_files,
    })
}

type Ws = WebSocketStream<TcpStream>;
type WsSink = futures_util::stream::SplitSink<Ws, Message>;

/// Writes `rate × window` messages at `rate` a second (or as fast as the socket takes them,
/// for at most twice the window). Returns how many were written, and the error that stopped
/// the publisher early, if any.
async fn publish(
    sink: &mut WsSink,
    room: &str,
    phase: usize,
    rate: u32,
    window: Duration,
    epoch: Instant,
) -> Result<u64, (u64, String)> {
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
        while sent < due {
            let ts = micros(epoch.elapsed());
            let text = format!(
                r#"{{"type":"send","room":"{room}","body":"{phase}:{sent}:{ts}","client_msg_id":"{phase}-{sent}"}}"#
            );
            let fed = tokio::time::timeout(hard_stop, sink.feed(Message::text(text))).await;
            match fed {
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

/// Reads `message` frames until told to stop (or the connection ends), recording latencies.
async fn listen(
    mut ws: Ws,
    epoch: Instant,
    phases: usize,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen {
        histograms: (0..phases).map(|_| None).collect(),
        last_us: vec![0; phases],
    };
    let mut close_code = None;
    let ended = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break false,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let now = micros(epoch.elapsed());
                    if let Some((phase, sent_us)) = delivery(text.as_str())
                        && phase < phases
                    {
                        let latency = now.saturating_sub(sent_us);
                        seen.histograms[phase]
                            .get_or_insert_with(Histogram::new)
                            .record(latency);
                        seen.last_us[phase] = now;
                        shared.delivered[phase].fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    close_code = Some(frame.map_or(0, |f| u16::from(f.code)));
                    break true;
                }
                Some(Ok(_)) => {}
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

/// The phase and send time of a `message` frame, read from its body `phase:seq:micros` with a
/// plain text search (cheaper than parsing the JSON, which matters at 10⁵–10⁶ frames a second).
fn delivery(text: &str) -> Option<(usize, u64)> {
    if !text.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let at = text.find(r#""body":""#)? + r#""body":""#.len();
    let body = &text[at..];
    let body = &body[..body.find('"')?];
    let mut parts = body.split(':');
    let phase = parts.next()?.parse().ok()?;
    let _seq = parts.next()?;
    let sent_us = parts.next()?.parse().ok()?;
    Some((phase, sent_us))
}

/// The phase of an `ack` frame, from its `client_msg_id` `phase-seq`.
fn ack_phase(text: &str) -> Option<usize> {
    let at = text.find(r#""client_msg_id":""#)? + r#""client_msg_id":""#.len();
    let id = &text[at..];
    id[..id.find('-')?].parse().ok()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Connects to `/ws` with the browser-style subprotocol token and waits for `welcome`.
async fn open(addr: SocketAddr, token: &str) -> Result<Ws, BoxError> {
    if !addr.ip().is_loopback() {
        return Err(format!("refusing to connect to {addr}: only 127.0.0.1").into());
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("unhidra.v1.json, bearer.{token}"))?,
    );
    let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    let text = next_text(&mut ws).await?;
    if !text.starts_with(r#"{"type":"welcome""#) {
        return Err(format!("expected welcome, got {text}").into());
    }
    Ok(ws)
}

/// Opens a subscriber connection, joins `room`, and waits for the `pong` that follows the
/// join (frames of one connection are handled in order, so the join is then done).
async fn subscribe(addr: SocketAddr, token: &str, room: &str) -> Result<Ws, BoxError> {
    let mut ws = open(addr, token).await?;
    ws.send(Message::text(format!(
        r#"{{"type":"join","room":"{room}"}}"#
    )))
    .await?;
    ws.send(Message::text(r#"{"type":"ping"}"#)).await?;
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with(r#"{"type":"pong""#) {
            return Ok(ws);
        }
        if text.starts_with(r#"{"type":"error""#) {
            return Err(format!("join refused: {text}").into());
        }
    }
}

/// The next text frame.
async fn next_text(ws: &mut Ws) -> Result<String, BoxError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed by the server: {frame:?}").into());
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => return Err("the connection ended".into()),
        }
    }
}

/// Registers `email` and logs in; returns the access token.
async fn account(addr: SocketAddr, email: &str) -> Result<String, BoxError> {
    let credentials = serde_json::json!({ "email": email, "password": PASSWORD }).to_string();
    let (status, body) = request(
        addr,
        &post_json_request(addr, "/api/v1/auth/register", &credentials),
    )
    .await?;
    if status != 201 {
        return Err(format!(
            "register {email}: {status} {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let (status, body) = request(
        addr,
        &post_json_request(addr, "/api/v1/auth/login", &credentials),
    )
    .await?;
    if status != 200 {
        return Err(format!("login {email}: {status} {}", String::from_utf8_lossy(&body)).into());
    }
    let answer: serde_json::Value = serde_json::from_slice(&body)?;
    answer
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "no access_token in the login answer".into())
}

/// Creates a public room as the owner of `token`; returns its id.
async fn create_room(addr: SocketAddr, token: &str) -> Result<String, BoxError> {
    let json = r#"{"name":"fanout","visibility":"public"}"#;
    let request_bytes = format!(
        "POST /api/v1/rooms HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: unhidra-bench\r\n\
         Accept: */*\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{json}",
        json.len()
    )
    .into_bytes();
    let (status, body) = request(addr, &request_bytes).await?;
    if status != 201 {
        return Err(format!("create room: {status} {}", String::from_utf8_lossy(&body)).into());
    }
    let room: serde_json::Value = serde_json::from_slice(&body)?;
    match room.get("id") {
        Some(serde_json::Value::String(id)) => Ok(id.clone()),
        Some(serde_json::Value::Number(id)) => Ok(id.to_string()),
        _ => Err(format!("no id in {}", String::from_utf8_lossy(&body)).into()),
    }
}

/// One request on a new connection, with a timeout; returns the status and the body.
async fn request(addr: SocketAddr, bytes: &[u8]) -> Result<(u16, Vec<u8>), BoxError> {
    let exchange = async {
        let mut connection = Connection::open(addr).await?;
        connection.send_for_body(bytes).await
    };
    let (answer, body) = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {HTTP_TIMEOUT:?}"))??;
    Ok((answer.status, body))
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
    fn frames_are_read_without_json() {
        let text =
            r#"{"type":"message","room":"r1","id":7,"sender":"u","body":"2:41:123456","ts":1}"#;
        assert_eq!(delivery(text), Some((2, 123_456)));
        assert_eq!(delivery(r#"{"type":"presence","room":"r"}"#), None);
        assert_eq!(
            ack_phase(r#"{"type":"ack","client_msg_id":"3-17","id":1,"ts":2}"#),
            Some(3)
        );
    }

    #[test]
    fn the_open_files_limit_is_read() {
        assert!(open_files_limit().is_some());
        assert!(check_open_files(u32::MAX).is_err());
    }
}
