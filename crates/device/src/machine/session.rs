//! The device session as a state machine: the caller feeds it events (connected, a frame, a
//! close, a timer, a reading) and asks what to do next (frames to send, when to wake up,
//! when to connect, commands to run). It owns no socket, no timer and no thread.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use rand_core::RngCore;
use serde_json::Value as Json;
use unhidra_protocol::close;
use unhidra_protocol::device::{
    DeviceFrame, DeviceServerFrame, OtaState, Point, Value, valid_telemetry_key,
};

use super::backoff::{Backoff, uniform};
use super::commands::{Command, CommandMemory, CommandReply, ConfigUpdate, Seen};
use super::storage::{Storage, point_bytes};
use super::wire::{Message, decode};

/// What the device says it is in its `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// The firmware version.
    pub firmware: String,
    /// The partition or slot it booted from.
    pub partition: Option<String>,
    /// Why it last reset.
    pub reset_reason: Option<String>,
    /// What the firmware can do.
    pub capabilities: Vec<String>,
    /// Its anti-rollback version (an ESP32's eFuse `secure_version`).
    pub secure_version: Option<u32>,
}

/// When an open batch is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// At most this many points.
    pub max_points: usize,
    /// At most this many bytes (as [`super::batch_bytes`] counts); a single larger point
    /// makes a batch of its own.
    pub max_bytes: usize,
    /// At most this long after its first point, ms.
    pub linger_ms: u64,
}

impl Default for BatchLimits {
    /// 64 points, 16 KiB (a MessagePack frame stays well under the server's 64 KiB, and a JSON
    /// frame of four 32×24 thermal frames too), 1 s.
    fn default() -> Self {
        Self {
            max_points: 64,
            max_bytes: 16 * 1024,
            linger_ms: 1_000,
        }
    }
}

/// How much the offline buffer holds before it drops its oldest batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Bytes of sealed, unacknowledged batches.
    pub max_bytes: usize,
    /// Sealed, unacknowledged batches.
    pub max_batches: usize,
}

impl Default for BufferLimits {
    /// 1 MiB or 1024 batches.
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_batches: 1024,
        }
    }
}

/// Everything a session is told once. Times are milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// The `hello` of every connection.
    pub hello: Hello,
    /// Between heartbeats (the first goes right after `hello`).
    pub heartbeat_interval_ms: u64,
    /// Reconnect waits.
    pub backoff: Backoff,
    /// The least wait after a close with 4009 (replaced); the wait is this plus a jitter of
    /// up to as much again.
    pub replaced_wait_ms: u64,
    /// A connection that stayed up this long resets the backoff.
    pub stable_after_ms: u64,
    /// When a batch is sealed.
    pub batch: BatchLimits,
    /// How much the offline buffer holds.
    pub buffer: BufferLimits,
    /// At most this many batches sent and not yet acknowledged.
    pub window: usize,
    /// A batch unacknowledged this long after it was sent means the connection is dead (a
    /// half-open socket): close it and connect again.
    pub ack_timeout_ms: u64,
    /// The wait before a batch refused with `internal` (or `rate_limited` without
    /// `retry_after`) is sent again.
    pub retry_ms: u64,
    /// How many command ids are remembered for deduplication.
    pub remembered_commands: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hello: Hello::default(),
            heartbeat_interval_ms: 30_000,
            backoff: Backoff::default(),
            replaced_wait_ms: 30_000,
            stable_after_ms: 60_000,
            batch: BatchLimits::default(),
            buffer: BufferLimits::default(),
            window: 8,
            ack_timeout_ms: 60_000,
            retry_ms: 5_000,
            remembered_commands: 64,
        }
    }
}

/// Optional figures of the heartbeat, as the application last measured them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Vitals {
    /// Radio signal strength, dBm.
    pub rssi: Option<i32>,
    /// Free heap, bytes.
    pub free_heap: Option<u64>,
    /// Battery charge, percent.
    pub battery: Option<f64>,
    /// Temperature, °C.
    pub temperature: Option<f64>,
}

/// Why a connection attempt failed, as far as the session cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// `401` at the upgrade: the key is unknown or revoked, or the device disabled. Final.
    Unauthorized,
    /// `429`: too many connections; `Retry-After` in ms, when the server said.
    RateLimited {
        /// The server's `Retry-After`, ms.
        retry_after_ms: Option<u64>,
    },
    /// Anything else: no route, refused, a timeout, another status.
    Unreachable,
}

/// Why a session stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The key was revoked or the device disabled (close 4003, or 401 at the upgrade):
    /// connecting again would be refused forever.
    Revoked,
    /// The application shut the session down.
    Shutdown,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open the connection, then call [`Session::handle_connected`] or
    /// [`Session::handle_connect_failed`].
    Connect,
    /// Close the connection with this code. The session already counts it as closed.
    Close {
        /// The close code.
        code: u16,
    },
    /// Run a command (a handler of [`super::Handlers`]), then call [`Session::command_done`].
    Command(Command),
    /// Apply a configuration, then call [`Session::config_applied`].
    Config(ConfigUpdate),
    /// The session stopped: do nothing more with it.
    Stopped(StopReason),
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected: connecting again at this instant.
    Waiting {
        /// When, ms.
        until: u64,
    },
    /// Told the driver to connect.
    Connecting,
    /// Connected (and `hello` queued first).
    Connected {
        /// Since when, ms.
        since: u64,
    },
    /// Stopped for good.
    Stopped(StopReason),
}

/// A reading the session will not take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError<E> {
    /// A key the server would refuse (and with it the whole batch).
    #[error("invalid telemetry key {0:?}")]
    InvalidKey(String),
    /// A number that is NaN or infinite.
    #[error("the value of {0:?} is not a finite number")]
    NotFinite(String),
    /// The storage could not keep the sealed batch; its points stay open for the next try.
    #[error("the offline buffer failed: {0}")]
    Storage(E),
}

/// What happened so far, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Points recorded.
    pub points: u64,
    /// Batches sealed into the buffer.
    pub batches_sealed: u64,
    /// Telemetry frames sent, retransmissions included.
    pub batches_sent: u64,
    /// Of those, batches that may have been sent before: again after a reconnect or a
    /// retry, or loaded from the storage at start (whether or not the last boot sent them).
    pub retransmits: u64,
    /// Batches acknowledged.
    pub acked: u64,
    /// Of those, acknowledged as duplicates (stored before).
    pub duplicates: u64,
    /// Batches dropped unsent or unacknowledged because the buffer was full.
    pub dropped: u64,
    /// Batches the server refused for good (an `error` with their seq as `ref`).
    pub refused: u64,
    /// Connections established.
    pub connects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Connections that ended (by either side).
    pub disconnects: u64,
    /// Commands handed to the application.
    pub commands_run: u64,
    /// Commands delivered again and answered from memory (or while still running).
    pub commands_repeated: u64,
    /// Commands answered `expired` without running.
    pub commands_expired: u64,
    /// Server messages that could not be read.
    pub malformed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Queued,
    InFlight { sent_at: u64 },
    RetryAt(u64),
}

#[derive(Debug, Clone)]
struct Slot {
    seq: u64,
    bytes: usize,
    state: SlotState,
    sent_before: bool,
}

/// One device's protocol state: connection, hello, heartbeats, the offline buffer and its
/// batches, commands and configuration. Time is the caller's monotonic clock in ms since
/// boot (heartbeats report it as uptime); wall time, if the device knows it, is set with
/// [`Session::set_wall_clock`].
///
/// The first batch of a storage that never held one gets the Unix time in ms as its seq when
/// the wall clock is set (so a wiped buffer does not reuse the seqs of the past), else 1.
pub struct Session<S, R> {
    config: SessionConfig,
    storage: S,
    rng: R,
    link: LinkState,
    next_heartbeat: u64,
    failures: u32,
    actions: VecDeque<Action>,
    out: VecDeque<DeviceFrame>,
    queue: VecDeque<Slot>,
    buffered_bytes: usize,
    next_seq: u64,
    open: Vec<Point>,
    open_bytes: usize,
    open_since: Option<u64>,
    paused_until: Option<u64>,
    commands: CommandMemory,
    reported: Option<(Option<u64>, BTreeMap<String, Json>)>,
    vitals: Vitals,
    wall_offset: Option<i64>,
    device_id: Option<String>,
    stats: Stats,
}

impl<S: fmt::Debug, R> fmt::Debug for Session<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("link", &self.link)
            .field("next_seq", &self.next_seq)
            .field("buffered", &self.queue.len())
            .field("stats", &self.stats)
            .field("storage", &self.storage)
            .finish_non_exhaustive()
    }
}

impl<S: Storage, R: RngCore> Session<S, R> {
    /// A session over what `storage` holds; its first action is [`Action::Connect`].
    pub fn new(config: SessionConfig, mut storage: S, rng: R) -> Result<Self, S::Error> {
        let loaded = storage.load()?;
        let queue: VecDeque<Slot> = loaded
            .batches
            .iter()
            .map(|&(seq, bytes)| Slot {
                seq,
                bytes,
                state: SlotState::Queued,
                // Sent before the restart, perhaps: count its next send as a retransmit.
                sent_before: true,
            })
            .collect();
        let next_seq = loaded
            .batches
            .iter()
            .map(|&(seq, _)| seq + 1)
            .fold(loaded.next_seq, u64::max);
        let commands = CommandMemory::new(config.remembered_commands);
        Ok(Self {
            buffered_bytes: queue.iter().map(|s| s.bytes).sum(),
            queue,
            next_seq,
            config,
            storage,
            rng,
            link: LinkState::Connecting,
            next_heartbeat: 0,
            failures: 0,
            actions: VecDeque::from([Action::Connect]),
            out: VecDeque::new(),
            open: Vec::new(),
            open_bytes: 0,
            open_since: None,
            paused_until: None,
            commands,
            reported: None,
            vitals: Vitals::default(),
            wall_offset: None,
            device_id: None,
            stats: Stats::default(),
        })
    }

    // ---- what the application tells it ----

    /// Sets the wall clock: at monotonic `now` it is `wall_ms` (Unix ms). Points get `ts`
    /// and commands are checked for expiry only once this is known.
    pub fn set_wall_clock(&mut self, now: u64, wall_ms: i64) {
        self.wall_offset = Some(wall_ms.saturating_sub(now as i64));
    }

    /// The Unix time in ms at monotonic `now`, if the wall clock is set.
    pub fn wall_ms(&self, now: u64) -> Option<i64> {
        self.wall_offset
            .map(|offset| offset.saturating_add(now as i64))
    }

    /// The figures of the next heartbeats.
    pub fn set_vitals(&mut self, vitals: Vitals) {
        self.vitals = vitals;
    }

    /// The configuration the device has (at boot, from its own storage): reported after
    /// every `hello`. Without it the device reports nothing until its first `config`.
    pub fn set_reported(&mut self, version: Option<u64>, state: BTreeMap<String, Json>) {
        self.reported = Some((version, state));
    }

    /// Records a reading now (stamped with the wall clock when it is set).
    pub fn record(
        &mut self,
        now: u64,
        key: impl Into<String>,
        value: Value,
    ) -> Result<(), RecordError<S::Error>> {
        let point = Point {
            ts: self.wall_ms(now),
            key: key.into(),
            value,
        };
        self.record_point(now, point)
    }

    /// Records a reading with its own `ts`. It joins the open batch, which is sealed into
    /// the buffer when full or [`BatchLimits::linger_ms`] after its first point.
    pub fn record_point(&mut self, now: u64, point: Point) -> Result<(), RecordError<S::Error>> {
        if !valid_telemetry_key(&point.key) {
            return Err(RecordError::InvalidKey(point.key));
        }
        if matches!(point.value, Value::Number(n) if !n.is_finite()) {
            return Err(RecordError::NotFinite(point.key));
        }
        let bytes = point_bytes(&point);
        if !self.open.is_empty() && self.open_bytes + bytes > self.config.batch.max_bytes {
            self.seal(now).map_err(RecordError::Storage)?;
        }
        self.open.push(point);
        self.open_bytes += bytes;
        self.open_since.get_or_insert(now);
        self.stats.points += 1;
        if self.open.len() >= self.config.batch.max_points
            || self.open_bytes >= self.config.batch.max_bytes
        {
            self.seal(now).map_err(RecordError::Storage)?;
        }
        Ok(())
    }

    /// Seals the open batch now, if it has points.
    pub fn flush(&mut self, now: u64) -> Result<(), S::Error> {
        if self.open.is_empty() {
            return Ok(());
        }
        self.seal(now)
    }

    /// Sends an `event` (best-effort: not acknowledged, not buffered). `false` when not
    /// connected, or when `kind` is not a valid key.
    pub fn send_event(&mut self, kind: &str, data: Json) -> bool {
        if !self.is_connected() || !valid_telemetry_key(kind) {
            return false;
        }
        self.out.push_back(DeviceFrame::Event {
            kind: kind.to_owned(),
            data,
        });
        true
    }

    /// Sends an `ota_status` for the update offered by `deployment` (best-effort, like an
    /// event: a state may repeat and the server takes the latest; the `hello` after the reboot
    /// is what confirms an update). `false` when not connected.
    pub fn send_ota_status(
        &mut self,
        deployment: &str,
        state: OtaState,
        progress: Option<u8>,
        reason: Option<&str>,
    ) -> bool {
        if !self.is_connected() {
            return false;
        }
        self.out.push_back(DeviceFrame::OtaStatus {
            deployment: deployment.to_owned(),
            state,
            progress,
            reason: reason.map(str::to_owned),
        });
        true
    }

    /// A command handed out by [`Action::Command`] is done: answer it (now, if connected;
    /// else when it is delivered again after the reconnect).
    pub fn command_done(&mut self, id: &str, reply: CommandReply) {
        self.commands.done(id, reply.clone());
        self.answer(id, reply);
    }

    /// A configuration handed out by [`Action::Config`] is applied: report the whole state.
    pub fn config_applied(&mut self, version: Option<u64>, state: BTreeMap<String, Json>) {
        self.reported = Some((version, state.clone()));
        if self.is_connected() {
            self.out.push_back(DeviceFrame::Reported { version, state });
        }
    }

    /// Stops for good: seals the open batch (so it waits in the buffer for the next boot)
    /// and closes the connection.
    pub fn shutdown(&mut self, now: u64) -> Result<(), S::Error> {
        let flushed = self.flush(now);
        if self.is_connected() {
            self.actions.push_back(Action::Close {
                code: close::NORMAL,
            });
            self.stats.disconnects += 1;
        }
        self.stop(StopReason::Shutdown);
        flushed
    }

    // ---- what the driver tells it ----

    /// The connection is open (the upgrade succeeded).
    pub fn handle_connected(&mut self, now: u64) {
        if self.link != LinkState::Connecting {
            return;
        }
        self.link = LinkState::Connected { since: now };
        self.stats.connects += 1;
        self.out.clear();
        self.out.push_back(self.hello());
        self.out.push_back(self.heartbeat(now));
        if let Some((version, state)) = &self.reported {
            self.out.push_back(DeviceFrame::Reported {
                version: *version,
                state: state.clone(),
            });
        }
        self.next_heartbeat = now + self.config.heartbeat_interval_ms;
    }

    /// The connection attempt failed.
    pub fn handle_connect_failed(&mut self, now: u64, failure: ConnectFailure) {
        if self.link != LinkState::Connecting {
            return;
        }
        self.stats.connect_failures += 1;
        match failure {
            ConnectFailure::Unauthorized => self.stop(StopReason::Revoked),
            ConnectFailure::RateLimited { retry_after_ms } => {
                let delay = self.backoff_delay().max(retry_after_ms.unwrap_or(0));
                self.wait(now, delay);
            }
            ConnectFailure::Unreachable => {
                let delay = self.backoff_delay();
                self.wait(now, delay);
            }
        }
    }

    /// The connection closed, with the peer's close code if there was one (`None`: the
    /// socket failed or ended without a close frame).
    pub fn handle_closed(&mut self, now: u64, code: Option<u16>) {
        let LinkState::Connected { since } = self.link else {
            if self.link == LinkState::Connecting {
                // Closed before the driver reported the upgrade: a failed attempt.
                self.handle_connect_failed(now, ConnectFailure::Unreachable);
            }
            return;
        };
        self.stats.disconnects += 1;
        self.drop_connection();
        if now.saturating_sub(since) >= self.config.stable_after_ms {
            self.failures = 0;
        }
        match code {
            Some(close::REVOKED) => self.stop(StopReason::Revoked),
            Some(close::REPLACED) => {
                let least = self.config.replaced_wait_ms;
                let delay = self
                    .backoff_delay()
                    .max(least + uniform(&mut self.rng, least));
                self.wait(now, delay);
            }
            _ => {
                let delay = self.backoff_delay();
                self.wait(now, delay);
            }
        }
    }

    /// A message arrived.
    pub fn handle_message(&mut self, now: u64, message: &Message) -> Result<(), S::Error> {
        match decode(message) {
            Ok(Some(frame)) => self.handle_frame(now, frame),
            Ok(None) => Ok(()),
            Err(_) => {
                self.stats.malformed += 1;
                Ok(())
            }
        }
    }

    /// A frame arrived.
    pub fn handle_frame(&mut self, now: u64, frame: DeviceServerFrame) -> Result<(), S::Error> {
        if !self.is_connected() {
            return Ok(());
        }
        match frame {
            DeviceServerFrame::Welcome { device, .. } => self.device_id = Some(device),
            DeviceServerFrame::Ack { seq, duplicate } => {
                if self.forget(seq)? {
                    self.stats.acked += 1;
                    self.stats.duplicates += u64::from(duplicate);
                }
            }
            DeviceServerFrame::Command {
                id,
                name,
                params,
                expires_at,
            } => self.on_command(
                now,
                Command {
                    id,
                    name,
                    params,
                    expires_at,
                },
            ),
            DeviceServerFrame::Config {
                version,
                desired,
                full,
            } => self.actions.push_back(Action::Config(ConfigUpdate {
                version,
                desired,
                full,
            })),
            DeviceServerFrame::Error {
                code,
                retry_after,
                reference,
                ..
            } => self.on_error(now, &code, retry_after, reference.as_deref())?,
            DeviceServerFrame::Pong => {}
        }
        Ok(())
    }

    /// Time passed: call at (or after) [`Session::poll_timeout`].
    pub fn handle_timeout(&mut self, now: u64) -> Result<(), S::Error> {
        match self.link {
            LinkState::Waiting { until } if now >= until => {
                self.link = LinkState::Connecting;
                self.actions.push_back(Action::Connect);
            }
            LinkState::Connected { .. } => {
                if now >= self.next_heartbeat {
                    self.out.push_back(self.heartbeat(now));
                    self.next_heartbeat = now + self.config.heartbeat_interval_ms;
                }
                if self
                    .oldest_in_flight()
                    .is_some_and(|sent| now >= sent + self.config.ack_timeout_ms)
                {
                    // A half-open socket: the server is gone but writes still succeed.
                    self.actions.push_back(Action::Close {
                        code: close::GOING_AWAY,
                    });
                    self.handle_closed(now, None);
                }
            }
            _ => {}
        }
        if self.paused_until.is_some_and(|t| now >= t) {
            self.paused_until = None;
        }
        for slot in &mut self.queue {
            if matches!(slot.state, SlotState::RetryAt(t) if now >= t) {
                slot.state = SlotState::Queued;
            }
        }
        if self
            .open_since
            .is_some_and(|t| now >= t + self.config.batch.linger_ms)
        {
            self.seal(now)?;
        }
        Ok(())
    }

    // ---- what the driver asks ----

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next frame to send, if any: `hello` first on every connection, then the rest in
    /// order, then telemetry batches oldest first while fewer than the window are in flight.
    pub fn poll_transmit(&mut self, now: u64) -> Result<Option<DeviceFrame>, S::Error> {
        if !self.is_connected() {
            return Ok(None);
        }
        if let Some(frame) = self.out.pop_front() {
            return Ok(Some(frame));
        }
        if self.paused_until.is_some() {
            return Ok(None);
        }
        let in_flight = self
            .queue
            .iter()
            .filter(|s| matches!(s.state, SlotState::InFlight { .. }))
            .count();
        if in_flight >= self.config.window {
            return Ok(None);
        }
        while let Some(at) = self.queue.iter().position(|s| s.state == SlotState::Queued) {
            let seq = self.queue[at].seq;
            let Some(points) = self.storage.read(seq)? else {
                // The storage lost it (a flash page gone bad): nothing left to send.
                self.buffered_bytes -= self.queue[at].bytes;
                self.queue.remove(at);
                self.stats.dropped += 1;
                continue;
            };
            let slot = &mut self.queue[at];
            slot.state = SlotState::InFlight { sent_at: now };
            self.stats.batches_sent += 1;
            self.stats.retransmits += u64::from(slot.sent_before);
            slot.sent_before = true;
            return Ok(Some(DeviceFrame::Telemetry { seq, points }));
        }
        Ok(None)
    }

    /// When to call [`Session::handle_timeout`] next (monotonic ms), if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        match self.link {
            LinkState::Waiting { until } => at(until),
            LinkState::Connected { .. } => {
                at(self.next_heartbeat);
                if let Some(sent) = self.oldest_in_flight() {
                    at(sent + self.config.ack_timeout_ms);
                }
            }
            LinkState::Connecting | LinkState::Stopped(_) => {}
        }
        if matches!(self.link, LinkState::Stopped(_)) {
            return None;
        }
        if let Some(t) = self.paused_until {
            at(t);
        }
        for slot in &self.queue {
            if let SlotState::RetryAt(t) = slot.state {
                at(t);
            }
        }
        if let Some(t) = self.open_since {
            at(t + self.config.batch.linger_ms);
        }
        next
    }

    /// Where the connection stands.
    pub fn state(&self) -> LinkState {
        self.link
    }

    /// What was counted.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The seqs in the buffer (sealed, not acknowledged), oldest first.
    pub fn buffered(&self) -> Vec<u64> {
        self.queue.iter().map(|s| s.seq).collect()
    }

    /// Bytes in the buffer, as its bound counts them.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Points recorded and not sealed yet.
    pub fn open_points(&self) -> usize {
        self.open.len()
    }

    /// The seq the next batch gets (0: not chosen yet).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The device id of the last `welcome`.
    pub fn device_id(&self) -> Option<&str> {
        self.device_id.as_deref()
    }

    /// The storage, to inspect it.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Whether the session is connected.
    pub fn is_connected(&self) -> bool {
        matches!(self.link, LinkState::Connected { .. })
    }

    // ---- inside ----

    fn hello(&self) -> DeviceFrame {
        let hello = &self.config.hello;
        DeviceFrame::Hello {
            firmware: hello.firmware.clone(),
            partition: hello.partition.clone(),
            reset_reason: hello.reset_reason.clone(),
            capabilities: hello.capabilities.clone(),
            secure_version: hello.secure_version,
        }
    }

    fn heartbeat(&self, now: u64) -> DeviceFrame {
        let v = self.vitals;
        DeviceFrame::Heartbeat {
            uptime: now / 1000,
            rssi: v.rssi,
            free_heap: v.free_heap,
            battery: v.battery.filter(|b| b.is_finite()),
            temperature: v.temperature.filter(|t| t.is_finite()),
        }
    }

    fn backoff_delay(&mut self) -> u64 {
        let delay = self.config.backoff.delay_ms(self.failures, &mut self.rng);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    fn wait(&mut self, now: u64, delay: u64) {
        self.link = LinkState::Waiting {
            until: now.saturating_add(delay),
        };
    }

    fn stop(&mut self, reason: StopReason) {
        self.drop_connection();
        self.link = LinkState::Stopped(reason);
        if reason == StopReason::Revoked {
            self.actions.push_back(Action::Stopped(reason));
        }
    }

    /// What a connection held that the next one must not inherit.
    fn drop_connection(&mut self) {
        self.out.clear();
        self.paused_until = None;
        for slot in &mut self.queue {
            if matches!(slot.state, SlotState::InFlight { .. }) {
                slot.state = SlotState::Queued;
            }
        }
    }

    fn oldest_in_flight(&self) -> Option<u64> {
        self.queue
            .iter()
            .filter_map(|s| match s.state {
                SlotState::InFlight { sent_at } => Some(sent_at),
                _ => None,
            })
            .min()
    }

    fn seal(&mut self, now: u64) -> Result<(), S::Error> {
        if self.next_seq == 0 {
            self.next_seq = self
                .wall_ms(now)
                .and_then(|ms| u64::try_from(ms).ok())
                .unwrap_or(0)
                .max(1);
        }
        // The seq is used up even if the storage fails: it may have written part of it.
        let seq = self.next_seq;
        self.next_seq += 1;
        self.storage.push(seq, &self.open)?;
        self.queue.push_back(Slot {
            seq,
            bytes: self.open_bytes,
            state: SlotState::Queued,
            sent_before: false,
        });
        self.buffered_bytes += self.open_bytes;
        self.stats.batches_sealed += 1;
        self.open.clear();
        self.open_bytes = 0;
        self.open_since = None;
        let limits = self.config.buffer;
        while self.queue.len() > 1
            && (self.buffered_bytes > limits.max_bytes || self.queue.len() > limits.max_batches)
        {
            if let Some(oldest) = self.queue.pop_front() {
                self.buffered_bytes -= oldest.bytes;
                self.stats.dropped += 1;
                self.storage.remove(oldest.seq)?;
            }
        }
        Ok(())
    }

    /// Removes a batch from the buffer; `false` if it was not there.
    fn forget(&mut self, seq: u64) -> Result<bool, S::Error> {
        let Some(at) = self.queue.iter().position(|s| s.seq == seq) else {
            return Ok(false);
        };
        if let Some(slot) = self.queue.remove(at) {
            self.buffered_bytes -= slot.bytes;
        }
        self.storage.remove(seq)?;
        Ok(true)
    }

    fn on_command(&mut self, now: u64, command: Command) {
        let expired = self
            .wall_ms(now)
            .is_some_and(|wall| wall > command.expires_at);
        let reply = expired.then(|| CommandReply::failed("expired"));
        match self.commands.admit(&command.id, reply.clone()) {
            Seen::New => match reply {
                Some(reply) => {
                    self.stats.commands_expired += 1;
                    self.answer(&command.id, reply);
                }
                None => {
                    self.stats.commands_run += 1;
                    self.actions.push_back(Action::Command(command));
                }
            },
            Seen::Running => self.stats.commands_repeated += 1,
            Seen::Done(reply) => {
                self.stats.commands_repeated += 1;
                self.answer(&command.id, reply);
            }
        }
    }

    fn answer(&mut self, id: &str, reply: CommandReply) {
        if self.is_connected() {
            self.out.push_back(DeviceFrame::CommandResult {
                id: id.to_owned(),
                status: reply.status,
                output: reply.output,
            });
        }
    }

    fn on_error(
        &mut self,
        now: u64,
        code: &str,
        retry_after: Option<u64>,
        reference: Option<&str>,
    ) -> Result<(), S::Error> {
        let wait = match (code, retry_after) {
            ("rate_limited", Some(secs)) => secs.saturating_mul(1000),
            _ => self.config.retry_ms,
        };
        let batch = reference
            .and_then(|r| r.parse::<u64>().ok())
            .and_then(|seq| self.queue.iter().position(|s| s.seq == seq));
        match (code, batch) {
            ("rate_limited" | "internal", Some(at)) => {
                self.queue[at].state = SlotState::RetryAt(now.saturating_add(wait));
            }
            (_, Some(at)) => {
                // The server will never take this batch: keeping it would block nothing but
                // would be sent again after every reconnect, forever.
                let seq = self.queue[at].seq;
                self.forget(seq)?;
                self.stats.refused += 1;
            }
            ("rate_limited", None) => self.paused_until = Some(now.saturating_add(wait)),
            ("hello_required", None) => {
                // The server lost this connection's hello (it should not): say it again.
                self.out.push_front(self.hello());
            }
            _ => {}
        }
        Ok(())
    }
}
