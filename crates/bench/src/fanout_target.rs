//! What differs between the servers the fan-out scenario measures: how a client connects and
//! subscribes, how one publish is written, and how deliveries, acks and the server's own pings
//! are read out of the frames it receives. Unhidra speaks `unhidra.v1.jsonl`; nats-server speaks
//! its text protocol in binary WebSocket frames (one frame may hold several operations, and
//! one operation may span frames); Socket.IO 4 speaks Engine.IO v4 packets, one per frame.
//! Everything else (pacing, latency, drains, CPU, memory) is the same code for all of them, in
//! `fanout.rs`.

use std::net::SocketAddr;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::BoxError;
use crate::http::{Connection, post_json_request};

/// The read buffer of each client connection. tungstenite's default, 128 KiB, is zero-filled
/// up to its capacity before every `read`, which made the subscribers cost more CPU than the
/// server; 8 KiB holds dozens of these frames.
const CLIENT_READ_BUFFER: usize = 8 * 1024;
/// A password long and uncommon enough for Unhidra's policy.
const PASSWORD: &str = "maple orbit candle frost 42";
/// How long one HTTP request may take.
const HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The room (Unhidra: its name; NATS: the subject; Socket.IO: the room).
const ROOM: &str = "fanout";
/// The NATS subscription id of every subscriber.
const NATS_SID: &str = "1";
/// The Socket.IO ack id of a subscriber's join.
const JOIN_ACK_ID: u64 = 1;
/// Socket.IO ack ids of publishes are `(phase + 1) × ACK_PHASE + seq`, so the phase can be
/// read back from the ack and no publish id meets the join's. A window sends at most
/// 100,000/s × 60 s = 6,000,000 messages, fewer than this.
const ACK_PHASE: u64 = 10_000_000;
/// The most bytes a NATS connection may hold that do not yet make a whole operation.
const NATS_MAX_PENDING: usize = 1 << 20;

/// A server the scenario can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// This product, over `unhidra.v1.jsonl` (a batch of frames per WebSocket message, one per
    /// line): every message is stored before it is broadcast.
    Unhidra,
    /// nats-server core publish/subscribe over its WebSocket listener (nothing stored).
    Nats,
    /// A Socket.IO 4 server under node, WebSocket transport only (nothing stored).
    #[value(name = "socketio")]
    SocketIo,
}

impl Target {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unhidra => "Unhidra",
            Self::Nats => "nats-server",
            Self::SocketIo => "Socket.IO",
        }
    }

    /// Whether the publisher gets one acknowledgement per message.
    pub fn has_acks(self) -> bool {
        !matches!(self, Self::Nats)
    }

    fn path(self) -> &'static str {
        match self {
            Self::Unhidra => "/ws",
            Self::Nats => "/",
            Self::SocketIo => "/socket.io/?EIO=4&transport=websocket",
        }
    }

    /// The frame that publishes the body `phase:seq:sent_us` to `room`.
    pub fn publish_frame(self, room: &str, phase: usize, seq: u64, sent_us: u64) -> Message {
        match self {
            Self::Unhidra => Message::text(format!(
                r#"{{"type":"send","room":"{room}","body":"{phase}:{seq}:{sent_us}","client_msg_id":"{phase}-{seq}"}}"#
            )),
            Self::Nats => {
                let body = format!("{phase}:{seq}:{sent_us}");
                Message::binary(format!("PUB {room} {}\r\n{body}\r\n", body.len()))
            }
            Self::SocketIo => Message::text(format!(
                r#"42{}["send","{room}","{phase}:{seq}:{sent_us}"]"#,
                publish_ack_id(phase, seq)
            )),
        }
    }

    /// The answer to the server's application-level ping (Unhidra pings at the WebSocket
    /// level, which tungstenite answers by itself).
    fn pong(self) -> Option<Message> {
        match self {
            Self::Unhidra => None,
            Self::Nats => Some(Message::binary(&b"PONG\r\n"[..])),
            Self::SocketIo => Some(Message::text("3")),
        }
    }
}

/// Something a server said, read out of its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A published message reached this connection.
    Delivery {
        /// The publishing window it belongs to.
        phase: usize,
        /// When it was written, in microseconds since the bench's epoch.
        sent_us: u64,
    },
    /// The server confirmed one publish of this window.
    Acked {
        /// The publishing window.
        phase: usize,
    },
    /// The server's first frame: Unhidra `welcome`, NATS `INFO`, the Engine.IO open packet.
    Greeting,
    /// Socket.IO: the connection joined the default namespace (`40{…}`).
    Connected,
    /// Socket.IO: the join was acknowledged.
    Joined,
    /// The answer to our own ping: Unhidra `pong`, NATS `PONG`.
    Pong,
    /// The server's ping, to be answered at once.
    Ping,
    /// An error frame, `-ERR`, or a Socket.IO connect error.
    Refused(String),
}

/// Reads one connection's frames into [`Event`]s; keeps the bytes of a NATS operation that
/// has not fully arrived yet.
#[derive(Debug)]
pub struct Decoder {
    target: Target,
    nats: NatsStream,
}

impl Decoder {
    /// A decoder for a new connection to `target`.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            nats: NatsStream::default(),
        }
    }

    /// The server it reads.
    pub fn target(&self) -> Target {
        self.target
    }

    /// Reports every event in `frame` to `on`; an error means the stream cannot be read on.
    pub fn feed(&mut self, frame: &Message, on: &mut impl FnMut(Event)) -> Result<(), String> {
        match (self.target, frame) {
            (Target::Nats, Message::Binary(bytes)) => self.nats.feed(bytes, on),
            (Target::Nats, Message::Text(text)) => self.nats.feed(text.as_bytes(), on),
            (Target::Unhidra, Message::Text(text)) => {
                // `unhidra.v1.jsonl`: one frame per line.
                for line in text.as_str().split('\n') {
                    unhidra_frame(line, on);
                }
                Ok(())
            }
            (Target::SocketIo, Message::Text(text)) => {
                socketio_packet(text.as_str(), on);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The body `phase:seq:sent_us` read back: the phase and the send time.
fn stamp(body: &[u8]) -> Option<(usize, u64)> {
    let mut parts = body.split(|&b| b == b':');
    let phase = digits(parts.next()?)?;
    let _seq = digits(parts.next()?)?;
    let sent_us = digits(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((usize::try_from(phase).ok()?, sent_us))
}

/// A non-empty run of ASCII digits as a number.
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0_u64, |n, &b| {
        let digit = u64::from(b.checked_sub(b'0').filter(|d| *d < 10)?);
        n.checked_mul(10)?.checked_add(digit)
    })
}

/// An Unhidra frame, read with a plain text search (cheaper than parsing the JSON, which
/// matters at 10⁵–10⁶ frames a second).
fn unhidra_frame(text: &str, on: &mut impl FnMut(Event)) {
    if text.starts_with(r#"{"type":"message""#) {
        if let Some((phase, sent_us)) = quoted_after(text, r#""body":""#).and_then(stamp) {
            on(Event::Delivery { phase, sent_us });
        }
    } else if text.starts_with(r#"{"type":"ack""#) {
        let phase = quoted_after(text, r#""client_msg_id":""#)
            .and_then(|id| digits(id.split(|&b| b == b'-').next()?))
            .and_then(|phase| usize::try_from(phase).ok());
        if let Some(phase) = phase {
            on(Event::Acked { phase });
        }
    } else if text.starts_with(r#"{"type":"welcome""#) {
        on(Event::Greeting);
    } else if text.starts_with(r#"{"type":"pong""#) {
        on(Event::Pong);
    } else if text.starts_with(r#"{"type":"error""#) {
        on(Event::Refused(text.to_owned()));
    }
}

/// The text between `key` and the next `"`.
fn quoted_after<'a>(text: &'a str, key: &str) -> Option<&'a [u8]> {
    let rest = &text[text.find(key)? + key.len()..];
    Some(&rest.as_bytes()[..rest.find('"')?])
}

/// The Socket.IO ack id of publish `seq` of window `phase`.
fn publish_ack_id(phase: usize, seq: u64) -> u64 {
    (phase as u64 + 1) * ACK_PHASE + seq
}

/// An Engine.IO v4 packet (one per WebSocket frame), and the Socket.IO packet inside a
/// `4` (message) packet.
fn socketio_packet(text: &str, on: &mut impl FnMut(Event)) {
    if let Some(body) = text.strip_prefix(r#"42["message",""#) {
        if let Some((phase, sent_us)) = body
            .find('"')
            .and_then(|end| stamp(&body.as_bytes()[..end]))
        {
            on(Event::Delivery { phase, sent_us });
        }
    } else if let Some(ack) = text.strip_prefix("43") {
        let id = digits(ack.split('[').next().unwrap_or_default().as_bytes());
        match id {
            Some(JOIN_ACK_ID) => on(Event::Joined),
            Some(id) if id >= ACK_PHASE => {
                if let Ok(phase) = usize::try_from(id / ACK_PHASE - 1) {
                    on(Event::Acked { phase });
                }
            }
            _ => {}
        }
    } else if text == "2" {
        on(Event::Ping);
    } else if text.starts_with("40") {
        on(Event::Connected);
    } else if text.starts_with("44") {
        on(Event::Refused(text.to_owned()));
    } else if text.starts_with('0') {
        on(Event::Greeting);
    }
}

/// The bytes of a NATS connection that do not yet make a whole operation.
#[derive(Debug, Default)]
pub struct NatsStream {
    pending: Vec<u8>,
}

impl NatsStream {
    /// Reads the whole operations of `bytes` (after what is pending) and keeps the rest.
    pub fn feed(&mut self, bytes: &[u8], on: &mut impl FnMut(Event)) -> Result<(), String> {
        if self.pending.is_empty() {
            // The common case: no copy unless the frame ends inside an operation.
            let used = nats_ops(bytes, on)?;
            self.pending.extend_from_slice(&bytes[used..]);
        } else {
            self.pending.extend_from_slice(bytes);
            let used = nats_ops(&self.pending, on)?;
            self.pending.drain(..used);
        }
        if self.pending.len() > NATS_MAX_PENDING {
            return Err(format!(
                "{} bytes without a whole NATS operation",
                self.pending.len()
            ));
        }
        Ok(())
    }
}

/// Reports the whole operations at the start of `bytes`; returns how many bytes they took.
fn nats_ops(bytes: &[u8], on: &mut impl FnMut(Event)) -> Result<usize, String> {
    let mut used = 0;
    loop {
        let rest = &bytes[used..];
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(used);
        };
        let line = &rest[..eol];
        let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
            Some(space) => (&line[..space], &line[space + 1..]),
            None => (line, &[][..]),
        };
        if verb.eq_ignore_ascii_case(b"MSG") {
            // MSG <subject> <sid> [reply-to] <#bytes>, then the payload and CRLF.
            let len = args
                .split(|&b| b == b' ' || b == b'\t')
                .rfind(|arg| !arg.is_empty())
                .and_then(digits)
                .and_then(|len| usize::try_from(len).ok())
                .filter(|&len| len <= NATS_MAX_PENDING)
                .ok_or_else(|| format!("bad MSG line: {}", String::from_utf8_lossy(line)))?;
            let start = eol + 2;
            let Some(after) = rest.get(start + len..start + len + 2) else {
                return Ok(used);
            };
            if after != b"\r\n" {
                return Err("a MSG payload not followed by CRLF".to_owned());
            }
            if let Some((phase, sent_us)) = stamp(&rest[start..start + len]) {
                on(Event::Delivery { phase, sent_us });
            }
            used += start + len + 2;
            continue;
        }
        if verb.eq_ignore_ascii_case(b"PING") {
            on(Event::Ping);
        } else if verb.eq_ignore_ascii_case(b"PONG") {
            on(Event::Pong);
        } else if verb.eq_ignore_ascii_case(b"INFO") {
            on(Event::Greeting);
        } else if verb.eq_ignore_ascii_case(b"-ERR") {
            on(Event::Refused(String::from_utf8_lossy(line).into_owned()));
        } else if !verb.eq_ignore_ascii_case(b"+OK") {
            return Err(format!(
                "unexpected NATS operation: {}",
                String::from_utf8_lossy(line)
            ));
        }
        used += eol + 2;
    }
}

/// Where a target listens, the room, and Unhidra's access tokens.
#[derive(Debug, Clone)]
pub struct Access {
    /// The server.
    pub target: Target,
    /// Its WebSocket listener.
    pub addr: SocketAddr,
    /// The room (or subject) everyone uses.
    pub room: String,
    /// Unhidra: the subscribers' access token.
    subscriber_token: Option<String>,
    /// Unhidra: the publisher's access token.
    publisher_token: Option<String>,
}

impl Access {
    /// Everything a client of `target` at `addr` needs; for Unhidra, registers a subscriber
    /// and a publisher user and creates a public room.
    pub async fn prepare(target: Target, addr: SocketAddr) -> Result<Self, BoxError> {
        let mut access = Self {
            target,
            addr,
            room: ROOM.to_owned(),
            subscriber_token: None,
            publisher_token: None,
        };
        if target == Target::Unhidra {
            let subscriber = account(addr, "fanout-sub@example.com").await?;
            let publisher = account(addr, "fanout-pub@example.com").await?;
            access.room = create_room(addr, &publisher).await?;
            access.subscriber_token = Some(subscriber);
            access.publisher_token = Some(publisher);
        }
        Ok(access)
    }
}

/// A WebSocket client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// A connection that has been greeted, with the decoder that has read it so far.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub ws: Ws,
    /// What reads its frames (it may hold part of an operation).
    pub decoder: Decoder,
}

/// A publisher connection, ready to publish.
pub async fn publisher(access: &Access) -> Result<Conn, BoxError> {
    let mut conn = open(access, access.publisher_token.as_deref()).await?;
    match access.target {
        Target::Unhidra => {}
        Target::Nats => {
            conn.exchange(
                vec![Message::binary(format!("{}PING\r\n", nats_connect()))],
                &Event::Pong,
            )
            .await?;
        }
        Target::SocketIo => {
            conn.exchange(vec![Message::text("40")], &Event::Connected)
                .await?;
        }
    }
    Ok(conn)
}

/// A subscriber connection of the room, once the server has confirmed the subscription: the
/// `pong` after a join (Unhidra handles one connection's frames in order), the `PONG` after
/// `SUB` (likewise for NATS), or the join's ack (Socket.IO).
pub async fn subscriber(access: &Access) -> Result<Conn, BoxError> {
    let mut conn = open(access, access.subscriber_token.as_deref()).await?;
    let room = &access.room;
    match access.target {
        Target::Unhidra => {
            conn.exchange(
                vec![
                    Message::text(format!(r#"{{"type":"join","room":"{room}"}}"#)),
                    Message::text(r#"{"type":"ping"}"#),
                ],
                &Event::Pong,
            )
            .await?;
        }
        Target::Nats => {
            conn.exchange(
                vec![Message::binary(format!(
                    "{}SUB {room} {NATS_SID}\r\nPING\r\n",
                    nats_connect()
                ))],
                &Event::Pong,
            )
            .await?;
        }
        Target::SocketIo => {
            conn.exchange(vec![Message::text("40")], &Event::Connected)
                .await?;
            conn.exchange(
                vec![Message::text(format!(
                    r#"42{JOIN_ACK_ID}["join","{room}"]"#
                ))],
                &Event::Joined,
            )
            .await?;
        }
    }
    Ok(conn)
}

fn nats_connect() -> &'static str {
    "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"protocol\":1}\r\n"
}

/// Connects (with `token` as Unhidra's browser-style subprotocol) and waits for the greeting.
async fn open(access: &Access, token: Option<&str>) -> Result<Conn, BoxError> {
    let addr = access.addr;
    if !addr.ip().is_loopback() {
        return Err(format!("refusing to connect to {addr}: only 127.0.0.1").into());
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{addr}{}", access.target.path()).into_client_request()?;
    if let Some(token) = token {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&format!("unhidra.v1.jsonl, bearer.{token}"))?,
        );
    }
    let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    let mut conn = Conn {
        ws,
        decoder: Decoder::new(access.target),
    };
    conn.until(&Event::Greeting).await?;
    Ok(conn)
}

impl Conn {
    /// Sends `frames` and waits for `expected`.
    async fn exchange(&mut self, frames: Vec<Message>, expected: &Event) -> Result<(), BoxError> {
        for frame in frames {
            self.ws.feed(frame).await?;
        }
        self.ws.flush().await?;
        self.until(expected).await
    }

    /// Reads frames, answering the server's pings, until `expected` arrives.
    async fn until(&mut self, expected: &Event) -> Result<(), BoxError> {
        loop {
            let frame = match self.ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("closed by the server: {frame:?}").into());
                }
                Some(Ok(frame)) => frame,
                Some(Err(err)) => return Err(err.into()),
                None => return Err("the connection ended".into()),
            };
            let mut found = false;
            let mut pings = 0;
            let mut refused = None;
            self.decoder.feed(&frame, &mut |event| match event {
                Event::Ping => pings += 1,
                Event::Refused(text) => refused = Some(text),
                event => found |= event == *expected,
            })?;
            if let Some(text) = refused {
                return Err(format!("refused: {text}").into());
            }
            answer_pings(&mut self.ws, self.decoder.target, pings).await?;
            if found {
                return Ok(());
            }
        }
    }
}

/// Answers `pings` pings of `target` on `sink`.
pub async fn answer_pings<S>(sink: &mut S, target: Target, pings: u32) -> Result<(), BoxError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    if let Some(pong) = target.pong() {
        for _ in 0..pings {
            sink.send(pong.clone()).await?;
        }
    }
    Ok(())
}

/// Registers `email` on Unhidra and logs in; returns the access token.
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

/// Creates a public Unhidra room as the owner of `token`; returns its id.
async fn create_room(addr: SocketAddr, token: &str) -> Result<String, BoxError> {
    let json = format!(r#"{{"name":"{ROOM}","visibility":"public"}}"#);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn events(decoder: &mut Decoder, frames: &[Message]) -> Vec<Event> {
        let mut seen = Vec::new();
        for frame in frames {
            decoder
                .feed(frame, &mut |event| seen.push(event))
                .expect("readable");
        }
        seen
    }

    fn delivery(phase: usize, sent_us: u64) -> Event {
        Event::Delivery { phase, sent_us }
    }

    #[test]
    fn bodies_carry_phase_and_send_time() {
        assert_eq!(stamp(b"2:41:123456"), Some((2, 123_456)));
        for bad in [&b""[..], b"2:41", b"2::5", b"x:1:2", b"1:2:3:4", b"1:2:3 "] {
            assert_eq!(stamp(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(digits(b"18446744073709551616"), None);
    }

    #[test]
    fn unhidra_frames_are_read_without_json() {
        let mut decoder = Decoder::new(Target::Unhidra);
        let seen = events(
            &mut decoder,
            &[
                Message::text(r#"{"type":"welcome","user":"u"}"#),
                Message::text(
                    "{\"type\":\"message\",\"body\":\"1:1:5\"}\n{\"type\":\"message\",\"body\":\"1:2:6\"}",
                ),
                Message::text(
                    r#"{"type":"message","room":"r1","id":7,"sender":"u","body":"2:41:123456","ts":1}"#,
                ),
                Message::text(r#"{"type":"ack","client_msg_id":"3-17","id":1,"ts":2}"#),
                Message::text(r#"{"type":"presence","room":"r"}"#),
                Message::text(r#"{"type":"pong"}"#),
            ],
        );
        assert_eq!(
            seen,
            [
                Event::Greeting,
                delivery(1, 5),
                delivery(1, 6),
                delivery(2, 123_456),
                Event::Acked { phase: 3 },
                Event::Pong
            ]
        );
        let Message::Text(publish) = Target::Unhidra.publish_frame("r1", 3, 17, 99) else {
            panic!("text");
        };
        assert_eq!(
            publish.as_str(),
            r#"{"type":"send","room":"r1","body":"3:17:99","client_msg_id":"3-17"}"#
        );
    }

    #[test]
    fn nats_operations_are_read_across_and_within_frames() {
        let mut decoder = Decoder::new(Target::Nats);
        // The second MSG's payload holds a CRLF of its own: its length, not the CRLF, says
        // where it ends (and it is no stamp, so no delivery).
        let stream = "INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n\
                      PONG\r\n\
                      MSG fanout 1 8\r\n0:1:1000\r\n\
                      MSG fanout 1 4\r\na\r\nb\r\n\
                      MSG fanout 1 10\r\n1:2:200000\r\n\
                      PING\r\n\
                      msg fanout 1 reply.to 7\r\n2:3:300\r\n\
                      +OK\r\n";
        let expected = vec![
            Event::Greeting,
            Event::Pong,
            delivery(0, 1000),
            delivery(1, 200_000),
            Event::Ping,
            delivery(2, 300),
        ];

        // All in one frame, then split at every byte, then one byte per frame.
        let whole = events(&mut decoder, &[Message::binary(stream.as_bytes().to_vec())]);
        assert_eq!(whole, expected);
        for split in 1..stream.len() {
            let mut decoder = Decoder::new(Target::Nats);
            let (a, b) = stream.as_bytes().split_at(split);
            let seen = events(
                &mut decoder,
                &[Message::binary(a.to_vec()), Message::binary(b.to_vec())],
            );
            assert_eq!(seen, expected, "split at {split}");
            assert!(decoder.nats.pending.is_empty());
        }
        let mut decoder = Decoder::new(Target::Nats);
        let bytes: Vec<Message> = stream.bytes().map(|b| Message::binary(vec![b])).collect();
        assert_eq!(events(&mut decoder, &bytes), expected);
    }

    #[test]
    fn nats_errors_and_garbage_are_reported() {
        let mut decoder = Decoder::new(Target::Nats);
        let seen = events(
            &mut decoder,
            &[Message::binary(&b"-ERR 'Authorization Violation'\r\n"[..])],
        );
        assert_eq!(
            seen,
            [Event::Refused("-ERR 'Authorization Violation'".to_owned())]
        );
        let mut ignore = |_| {};
        assert!(
            decoder
                .feed(&Message::binary(&b"HELLO\r\n"[..]), &mut ignore)
                .is_err()
        );
        let mut decoder = Decoder::new(Target::Nats);
        let bad_len = Message::binary(&b"MSG fanout 1 x\r\n"[..]);
        assert!(decoder.feed(&bad_len, &mut ignore).is_err());
        let mut decoder = Decoder::new(Target::Nats);
        let no_crlf = Message::binary(&b"MSG fanout 1 3\r\nabcXY"[..]);
        assert!(decoder.feed(&no_crlf, &mut ignore).is_err());
        let mut decoder = Decoder::new(Target::Nats);
        let endless = Message::binary(vec![b'x'; NATS_MAX_PENDING + 1]);
        assert!(decoder.feed(&endless, &mut ignore).is_err());
    }

    #[test]
    fn nats_publish_frames_carry_the_length() {
        let Message::Binary(publish) = Target::Nats.publish_frame("fanout", 1, 2, 345) else {
            panic!("binary");
        };
        assert_eq!(&publish[..], b"PUB fanout 7\r\n1:2:345\r\n");
    }

    #[test]
    fn socketio_packets_and_ack_ids() {
        let mut decoder = Decoder::new(Target::SocketIo);
        let ack = publish_ack_id(2, 123);
        assert_eq!(ack, 30_000_123);
        let seen = events(
            &mut decoder,
            &[
                Message::text(
                    r#"0{"sid":"a","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#,
                ),
                Message::text(r#"40{"sid":"b"}"#),
                Message::text("431[]"),
                Message::text(r#"42["message","0:5:777"]"#),
                Message::text("2"),
                Message::text(format!("43{ack}[]")),
                Message::text(format!("43{}[]", publish_ack_id(0, 0))),
                Message::text(r#"42["other","0:5:777"]"#),
                Message::text(r#"44{"message":"nope"}"#),
                Message::text("6"),
            ],
        );
        assert_eq!(
            seen,
            [
                Event::Greeting,
                Event::Connected,
                Event::Joined,
                delivery(0, 777),
                Event::Ping,
                Event::Acked { phase: 2 },
                Event::Acked { phase: 0 },
                Event::Refused(r#"44{"message":"nope"}"#.to_owned()),
            ]
        );
        let Message::Text(publish) = Target::SocketIo.publish_frame("fanout", 2, 123, 9) else {
            panic!("text");
        };
        assert_eq!(publish.as_str(), r#"4230000123["send","fanout","2:123:9"]"#);
        assert_eq!(Target::SocketIo.pong(), Some(Message::text("3")));
    }
}
