//! The tokio adapter: drives a [`Session`] over a real WebSocket (tokio-tungstenite), with
//! tokio's timers as its clock, and hands the application a [`DeviceHandle`] to record
//! readings from any task.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use rand_core::RngCore;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use unhidra_protocol::device::{OtaState, Point, Value, valid_telemetry_key};

use crate::machine::{
    Action, Clock, Command, CommandReply, ConnectFailure, Encoding, Handlers, Message, Session,
    StopReason, Storage, Vitals,
};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where and how to connect.
#[derive(Clone)]
pub struct WsOptions {
    /// The server's WebSocket URL, `ws://host:port/ws` (this adapter has no TLS: put a
    /// TLS-terminating proxy in front, or see `docs/device-sdk.md`).
    pub url: String,
    /// The device key, `unh_dk_…`.
    pub key: String,
    /// JSON or MessagePack.
    pub encoding: Encoding,
    /// How long an upgrade may take.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for WsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsOptions")
            .field("url", &self.url)
            .field("key", &"<redacted>")
            .field("encoding", &self.encoding)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl WsOptions {
    /// JSON frames, a 10 s upgrade timeout.
    pub fn new(url: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key: key.into(),
            encoding: Encoding::Json,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The clock of the tokio adapter: monotonic from tokio's `Instant` (so a test can pause
/// it), wall time from the system.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    boot: Instant,
}

impl TokioClock {
    /// A clock whose zero (the device's boot) is now.
    pub fn new() -> Self {
        Self {
            boot: Instant::now(),
        }
    }

    /// The instant of monotonic `ms`.
    pub fn instant(&self, ms: u64) -> Instant {
        self.boot + Duration::from_millis(ms)
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.boot.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn wall_ms(&self) -> Option<i64> {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        i64::try_from(since.as_millis()).ok()
    }
}

/// Opens a connection: the upgrade offers the encoding's subprotocol and `key.<key>`.
pub async fn connect(options: &WsOptions) -> Result<Socket, ConnectFailure> {
    let mut request = options.url.as_str().into_client_request().map_err(|e| {
        tracing::warn!(url = %options.url, error = %e, "device: not a WebSocket URL");
        ConnectFailure::Unreachable
    })?;
    let protocols = HeaderValue::from_str(&options.encoding.protocol_header(&options.key))
        .map_err(|_| {
            tracing::warn!("device: the key cannot be a subprotocol entry");
            ConnectFailure::Unauthorized
        })?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols);
    let upgrade = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(options.connect_timeout, upgrade).await {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status();
            tracing::info!(%status, "device: the upgrade was refused");
            Err(match status {
                StatusCode::UNAUTHORIZED => ConnectFailure::Unauthorized,
                StatusCode::TOO_MANY_REQUESTS => ConnectFailure::RateLimited {
                    retry_after_ms: response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|secs| secs.saturating_mul(1000)),
                },
                _ => ConnectFailure::Unreachable,
            })
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "device: cannot connect");
            Err(ConnectFailure::Unreachable)
        }
        Err(_) => {
            tracing::debug!("device: the upgrade timed out");
            Err(ConnectFailure::Unreachable)
        }
    }
}

/// What the application asks of a running [`Device`].
#[derive(Debug)]
enum Input {
    Record(Point, bool),
    Event(String, serde_json::Value),
    Vitals(Vitals),
    Flush,
    Finish,
    Disconnect,
    CommandDone(String, CommandReply),
    Shutdown,
    OtaStatus {
        deployment: String,
        state: OtaState,
        progress: Option<u8>,
        reason: Option<String>,
    },
}

/// A reading the handle refuses before it reaches the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The key is not one the server takes.
    #[error("invalid telemetry key {0:?}")]
    InvalidKey(String),
    /// The number is NaN or infinite.
    #[error("the value of {0:?} is not a finite number")]
    NotFinite(String),
    /// The device is not running any more.
    #[error("the device stopped")]
    Stopped,
}

/// The application's side of a running [`Device`]: cheap to clone, usable from any task.
/// Calls wait while the device's queue (1024 inputs) is full.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    tx: mpsc::Sender<Input>,
}

impl DeviceHandle {
    /// Records a reading now, stamped with the wall clock.
    pub async fn record(&self, key: &str, value: Value) -> Result<(), HandleError> {
        let point = Point {
            ts: None,
            key: key.to_owned(),
            value,
        };
        self.send_point(point, true).await
    }

    /// Records a reading with its own `ts`.
    pub async fn record_point(&self, point: Point) -> Result<(), HandleError> {
        self.send_point(point, false).await
    }

    async fn send_point(&self, point: Point, stamp: bool) -> Result<(), HandleError> {
        if !valid_telemetry_key(&point.key) {
            return Err(HandleError::InvalidKey(point.key));
        }
        if matches!(point.value, Value::Number(n) if !n.is_finite()) {
            return Err(HandleError::NotFinite(point.key));
        }
        self.send(Input::Record(point, stamp)).await
    }

    /// Sends an event (best-effort: dropped while offline).
    pub async fn event(&self, kind: &str, data: serde_json::Value) -> Result<(), HandleError> {
        self.send(Input::Event(kind.to_owned(), data)).await
    }

    /// Sets the heartbeat's figures.
    pub async fn set_vitals(&self, vitals: Vitals) -> Result<(), HandleError> {
        self.send(Input::Vitals(vitals)).await
    }

    /// Seals the open batch now.
    pub async fn flush(&self) -> Result<(), HandleError> {
        self.send(Input::Flush).await
    }

    /// Seals the open batch and stops the device once its buffer is empty (everything
    /// acknowledged): [`Device::run`] then answers [`StopReason::Shutdown`]. Readings recorded
    /// after this still count.
    pub async fn finish(&self) -> Result<(), HandleError> {
        self.send(Input::Finish).await
    }

    /// Drops the connection without a close frame, as a network failure would (the
    /// simulator's random disconnects).
    pub async fn disconnect(&self) -> Result<(), HandleError> {
        self.send(Input::Disconnect).await
    }

    /// Sends what the device has queued (its last `ota_status`, say), seals the open batch and
    /// stops: [`Device::run`] answers [`StopReason::Shutdown`]. For a restart, where
    /// [`DeviceHandle::finish`] would wait for every batch to be acknowledged.
    pub async fn shutdown(&self) -> Result<(), HandleError> {
        self.send(Input::Shutdown).await
    }

    /// Answers a command that [`Device::defer`] handed to the application.
    pub async fn command_done(&self, id: &str, reply: CommandReply) -> Result<(), HandleError> {
        self.send(Input::CommandDone(id.to_owned(), reply)).await
    }

    /// Sends an `ota_status` (best-effort: dropped while offline).
    pub async fn ota_status(
        &self,
        deployment: &str,
        state: OtaState,
        progress: Option<u8>,
        reason: Option<&str>,
    ) -> Result<(), HandleError> {
        self.send(Input::OtaStatus {
            deployment: deployment.to_owned(),
            state,
            progress,
            reason: reason.map(str::to_owned),
        })
        .await
    }

    async fn send(&self, input: Input) -> Result<(), HandleError> {
        self.tx.send(input).await.map_err(|_| HandleError::Stopped)
    }
}

/// A device: a session, its handlers and a connection, driven by [`Device::run`].
pub struct Device<S, R> {
    session: Session<S, R>,
    handlers: Handlers,
    options: WsOptions,
    clock: TokioClock,
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    deferred: std::collections::BTreeMap<String, mpsc::UnboundedSender<Command>>,
    finishing: bool,
    stopping: bool,
}

impl<S: std::fmt::Debug, R> std::fmt::Debug for Device<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("session", &self.session)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What woke the loop.
enum Woke {
    Stop,
    Socket(Option<Result<WsMessage, tungstenite::Error>>),
    Input(Option<Input>),
    Timer,
}

impl<S: Storage, R: RngCore> Device<S, R> {
    /// A device over `session`, answering commands and configurations with `handlers`.
    pub fn new(mut session: Session<S, R>, handlers: Handlers, options: WsOptions) -> Self {
        let (version, state) = handlers.reported();
        if version.is_some() || !state.is_empty() {
            session.set_reported(version, state);
        }
        let (tx, rx) = mpsc::channel(1024);
        Self {
            session,
            handlers,
            options,
            clock: TokioClock::new(),
            rx,
            tx,
            deferred: std::collections::BTreeMap::new(),
            finishing: false,
            stopping: false,
        }
    }

    /// Hands the commands named `name` to the application instead of a handler: for work that
    /// takes long or waits (a firmware download), which answers with
    /// [`DeviceHandle::command_done`] when it is done. A command delivered again while it runs
    /// is not handed out twice. Commands that arrive after the receiver is dropped are answered
    /// `failed {"error": "unavailable"}`.
    pub fn defer(&mut self, name: &str) -> mpsc::UnboundedReceiver<Command> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.deferred.insert(name.to_owned(), tx);
        rx
    }

    /// The application's handle.
    pub fn handle(&self) -> DeviceHandle {
        DeviceHandle {
            tx: self.tx.clone(),
        }
    }

    /// The session, to read its stats and buffer.
    pub fn session(&self) -> &Session<S, R> {
        &self.session
    }

    /// Takes the session back (to restart a device from its storage, say).
    pub fn into_session(self) -> Session<S, R> {
        self.session
    }

    /// Runs until `stop` completes (then seals the open batch, closes with 1000 and answers
    /// [`StopReason::Shutdown`]) or the device is revoked. Only the storage's errors end it
    /// otherwise; the connection's failures are reconnects.
    pub async fn run(&mut self, stop: impl Future<Output = ()>) -> Result<StopReason, S::Error> {
        let mut stop = std::pin::pin!(stop);
        let mut socket: Option<Socket> = None;
        let mut inputs_open = true;
        self.finishing = false;
        self.stopping = false;
        loop {
            let now = self.now();
            self.session.handle_timeout(now)?;
            while let Some(action) = self.session.poll_action() {
                match action {
                    Action::Connect => {
                        let attempt = connect(&self.options);
                        let result = tokio::select! {
                            result = attempt => result,
                            () = &mut stop => return self.shut_down(socket).await,
                        };
                        let now = self.now();
                        match result {
                            Ok(ws) => {
                                tracing::debug!(url = %self.options.url, "device: connected");
                                socket = Some(ws);
                                self.session.handle_connected(now);
                            }
                            Err(failure) => self.session.handle_connect_failed(now, failure),
                        }
                    }
                    Action::Close { code } => close(socket.take(), code).await,
                    Action::Command(command) => match self.deferred.get(&command.name) {
                        Some(to_app) => {
                            let id = command.id.clone();
                            if to_app.send(command).is_err() {
                                self.session
                                    .command_done(&id, CommandReply::failed("unavailable"));
                            }
                        }
                        None => {
                            let reply = self.handlers.run(&command);
                            self.session.command_done(&command.id, reply);
                        }
                    },
                    Action::Config(update) => {
                        let (version, state) = self.handlers.apply(&update);
                        self.session.config_applied(version, state);
                    }
                    Action::Stopped(reason) => {
                        tracing::warn!(?reason, "device: stopped");
                        close(socket.take(), unhidra_protocol::close::NORMAL).await;
                        return Ok(reason);
                    }
                }
            }
            if self.finishing
                && self.session.buffered().is_empty()
                && self.session.open_points() == 0
            {
                return self.shut_down(socket).await;
            }
            if let Some(ws) = socket.as_mut()
                && let Err(e) = self.transmit(ws).await
            {
                tracing::debug!(error = %e, "device: send failed");
                socket = None;
                let now = self.now();
                self.session.handle_closed(now, None);
                continue;
            }
            if self.stopping {
                return self.shut_down(socket).await;
            }
            let wake = self.session.poll_timeout().map(|ms| self.clock.instant(ms));
            let woke = tokio::select! {
                () = &mut stop => Woke::Stop,
                message = next(&mut socket) => Woke::Socket(message),
                input = self.rx.recv(), if inputs_open => Woke::Input(input),
                () = sleep(wake) => Woke::Timer,
            };
            let now = self.now();
            match woke {
                Woke::Stop => return self.shut_down(socket).await,
                Woke::Socket(message) => match message {
                    Some(Ok(WsMessage::Text(text))) => {
                        let message = Message::Text(text.as_str().to_owned());
                        self.session.handle_message(now, &message)?;
                    }
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        self.session
                            .handle_message(now, &Message::Binary(bytes.to_vec()))?;
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        tracing::debug!(?code, "device: closed by the server");
                        socket = None;
                        self.session.handle_closed(now, code);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        socket = None;
                        self.session.handle_closed(now, None);
                    }
                },
                Woke::Input(None) => inputs_open = false,
                Woke::Input(Some(input)) => self.apply(now, input, &mut socket)?,
                Woke::Timer => {}
            }
        }
    }

    fn now(&mut self) -> u64 {
        let now = self.clock.now_ms();
        if let Some(wall) = self.clock.wall_ms() {
            self.session.set_wall_clock(now, wall);
        }
        now
    }

    fn apply(
        &mut self,
        now: u64,
        input: Input,
        socket: &mut Option<Socket>,
    ) -> Result<(), S::Error> {
        match input {
            Input::Record(point, stamp) => {
                let result = if stamp {
                    self.session.record(now, point.key, point.value)
                } else {
                    self.session.record_point(now, point)
                };
                match result {
                    Ok(()) => {}
                    Err(crate::machine::RecordError::Storage(e)) => return Err(e),
                    // The handle checked both before sending.
                    Err(e) => tracing::warn!(error = %e, "device: reading refused"),
                }
            }
            Input::Event(kind, data) => {
                self.session.send_event(&kind, data);
            }
            Input::Vitals(vitals) => self.session.set_vitals(vitals),
            Input::Flush => self.session.flush(now)?,
            Input::Finish => {
                self.finishing = true;
                self.session.flush(now)?;
            }
            Input::Disconnect => {
                if socket.take().is_some() {
                    self.session.handle_closed(now, None);
                }
            }
            Input::CommandDone(id, reply) => self.session.command_done(&id, reply),
            Input::Shutdown => self.stopping = true,
            Input::OtaStatus {
                deployment,
                state,
                progress,
                reason,
            } => {
                self.session
                    .send_ota_status(&deployment, state, progress, reason.as_deref());
            }
        }
        Ok(())
    }

    /// Sends everything the session has, with one flush.
    async fn transmit(&mut self, ws: &mut Socket) -> Result<(), tungstenite::Error> {
        let now = self.clock.now_ms();
        let mut fed = false;
        loop {
            let frame = match self.session.poll_transmit(now) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    // Not a connection problem: the batch stays queued for the next round.
                    tracing::warn!(error = %e, "device: the buffer cannot be read");
                    break;
                }
            };
            let message = match self.options.encoding.encode(&frame) {
                Message::Text(text) => WsMessage::Text(text.into()),
                Message::Binary(bytes) => WsMessage::Binary(bytes.into()),
            };
            ws.feed(message).await?;
            fed = true;
        }
        if fed {
            ws.flush().await?;
        }
        Ok(())
    }

    async fn shut_down(&mut self, socket: Option<Socket>) -> Result<StopReason, S::Error> {
        let now = self.now();
        let flushed = self.session.shutdown(now);
        close(socket, unhidra_protocol::close::NORMAL).await;
        flushed.map(|()| StopReason::Shutdown)
    }
}

async fn next(socket: &mut Option<Socket>) -> Option<Result<WsMessage, tungstenite::Error>> {
    match socket.as_mut() {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep(until: Option<Instant>) {
    match until {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Closes with `code`, waiting at most a second for the close handshake.
async fn close(socket: Option<Socket>, code: u16) {
    let Some(mut ws) = socket else { return };
    let frame = CloseFrame {
        code: code.into(),
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}
