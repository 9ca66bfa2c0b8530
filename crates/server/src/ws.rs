//! `GET /ws`: authentication before the upgrade, then one task reading frames and one writing
//! them. The token travels in `Sec-WebSocket-Protocol` (`unhidra.v1.json, bearer.<token>`, or a
//! lone token as ESP32 firmware sends it), or in `Authorization` for non-browser clients.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures_util::{SinkExt, StreamExt};
use unhidra_protocol::{
    BEARER_PREFIX, ClientFrame, FrameError, SUBPROTOCOL_JSON, SUBPROTOCOL_JSON_LINES,
    SUBPROTOCOL_MSGPACK, ServerFrame, close, parse_client_frame, parse_client_frame_msgpack,
};

use unhidra_chat::hub::{AuthStyle, Reservation};
use unhidra_chat::outbox::{Message as Queued, Next};
use unhidra_chat::session::{Admit, Burst, Handled, Session};
use unhidra_chat::writer::{Pace, join_lines};

use crate::error::{ApiError, Problem, rate_limited};
use crate::http::auth::client_ip;
use crate::identity::{IdentityError, Principal};
use crate::state::AppState;

/// How much one read from the socket asks for.
pub(crate) const READ_CHUNK_BYTES: usize = 4 * 1024;
/// How long a closing connection's writer gets to send what is queued and the close frame.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a connection the server closes keeps reading, and discarding, what the peer still
/// sends while it waits for the peer's close frame. Dropping a socket with unread bytes makes
/// the kernel answer with a reset, which destroys the close frame on its way: the client would
/// see 1006 instead of the code it was sent.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How the client authenticated and which subprotocol to echo.
struct Offer {
    token: String,
    /// The exact value to echo in `Sec-WebSocket-Protocol`, if any.
    echo: Option<String>,
    /// The wire format the connection speaks.
    protocol: &'static str,
    /// How the token came; what the hub keeps and lists instead of it.
    style: AuthStyle,
}

/// Reads the token and the subprotocol to echo from the upgrade request.
fn offer(headers: &HeaderMap) -> Option<Offer> {
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let bearer = crate::http::auth::bearer(headers).map(str::to_owned);
    // The first protocol name the client offers wins.
    let named = offered.iter().find_map(|p| {
        [
            SUBPROTOCOL_JSON,
            SUBPROTOCOL_JSON_LINES,
            SUBPROTOCOL_MSGPACK,
        ]
        .into_iter()
        .find(|name| name == p)
    });
    if let Some(name) = named {
        let in_protocols = offered
            .iter()
            .find_map(|p| p.strip_prefix(BEARER_PREFIX).map(str::to_owned));
        let (token, style) = match in_protocols {
            Some(token) => (token, AuthStyle::Bearer),
            None => (bearer?, AuthStyle::AuthorizationHeader),
        };
        return Some(Offer {
            token,
            echo: Some(name.to_owned()),
            protocol: name,
            style,
        });
    }
    // The firmware style: the token is the only subprotocol, and must be echoed back.
    if let [lone] = offered.as_slice() {
        return Some(Offer {
            token: lone.clone(),
            echo: Some(lone.clone()),
            protocol: SUBPROTOCOL_JSON,
            style: AuthStyle::TokenOnly,
        });
    }
    bearer.map(|token| Offer {
        token,
        echo: None,
        protocol: SUBPROTOCOL_JSON,
        style: AuthStyle::AuthorizationHeader,
    })
}

fn origin_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Devices and servers send no Origin.
        return true;
    };
    let allowed = &state.config().allowed_origins;
    allowed
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Upgrades to a WebSocket after checking origin and token.
pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&state, &headers) {
        return ApiError::new(Problem::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "This origin may not open a WebSocket here.",
        ))
        .into_response();
    }
    match crate::ws_device::offer(&headers) {
        Ok(Some(device)) => {
            return crate::ws_device::upgrade(state, peer, &headers, ws, device).await;
        }
        Ok(None) => {}
        Err(refused) => return refused.into_response(),
    }
    let Some(offer) = offer(&headers) else {
        return ApiError::from(IdentityError::Unauthenticated("missing")).into_response();
    };
    let (who, expires) = match state.identity().authenticate_until(&offer.token).await {
        Ok(found) => found,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let ip = client_ip(Some(peer.ip()), &headers, state.trusted_proxies());
    let admitted = match state.chat().admit(ip, who.user_id) {
        Ok(admitted) => admitted,
        Err(refused) => return rate_limited(refused, "new connections").into_response(),
    };
    let limit = usize::try_from(state.config().ws_max_frame_bytes).unwrap_or(usize::MAX);
    let wire = (offer.protocol, offer.style);
    // Frames past `limit` are refused with 1009 by the reader below. The library's own cap sits
    // well above it, as a memory guard: a frame past that one ends the connection without a
    // close frame, because the library cannot read past it.
    let hard_cap = limit.saturating_mul(4).max(1024 * 1024);
    // tungstenite's default 128 KiB read chunk is zero-filled on the first read, which would
    // make every idle connection cost that much; larger frames still grow the buffer as needed.
    let ws = ws
        .read_buffer_size(READ_CHUNK_BYTES)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap);
    let ws = match offer.echo {
        Some(echo) => ws.protocols([echo]),
        None => ws,
    };
    // A failed upgrade drops the closure, and the place it held.
    ws.on_upgrade(move |socket| run(state, socket, who, expires, admitted, wire, limit))
}

/// One connection, from upgrade to close.
async fn run(
    state: AppState,
    socket: WebSocket,
    who: Principal,
    mut expires: DateTime<Utc>,
    admitted: Reservation,
    wire: (&'static str, AuthStyle),
    limit: usize,
) {
    let protocol = wire.0;
    let chat = state.chat();
    let hub = chat.hub();
    let metrics = chat.metrics().clone();
    let kind = unhidra_chat::metrics::KindLabel { kind: "user" };
    metrics.connections.get_or_create(&kind).inc();
    let msgpack = protocol == SUBPROTOCOL_MSGPACK;
    let registration =
        hub.register_reserved(admitted, who.user_id, who.session_id, wire, Utc::now());
    let id = registration.id;
    let outbox = registration.outbox;
    let activity = registration.activity;
    let (sink, mut stream) = socket.split();
    let coalesce = chat.write_coalesce;
    // On `unhidra.v1.jsonl` a batch's text frames share WebSocket messages, up to the largest
    // message the server itself accepts.
    let lines = (protocol == SUBPROTOCOL_JSON_LINES).then_some(limit);
    let mut writer = spawn_writer(Arc::clone(&outbox), sink, coalesce, lines);
    hub.send_to(
        id,
        &ServerFrame::Welcome {
            connection: id.to_string(),
            user: who.user_id.to_string(),
        },
    );
    tracing::debug!(connection = id, user = %who.user_id, "websocket open");

    let mut watches = crate::watch::Watches::new(id, who.clone());
    let mut conn = Session::new(chat, id, who, expires);
    let mut ping = tokio::time::interval(chat.ping_interval.max(std::time::Duration::from_secs(1)));
    ping.tick().await;
    // Created once and reused: an idle connection's loop allocates nothing per frame.
    let close_requested = outbox.close_requested();
    tokio::pin!(close_requested);
    let expiry = tokio::time::sleep(until(conn.expires()));
    tokio::pin!(expiry);
    // Whether anything arrived since the last ping tick.
    let mut heard = true;
    let mut closed_by_peer = false;
    // What the socket gave while a burst of `send`s was gathered that does not belong to it (a
    // frame, an error or the end): handled next.
    let mut pending: Option<Option<Result<Message, axum::Error>>> = None;
    loop {
        let next = match pending.take() {
            Some(read) => read,
            None => tokio::select! {
                () = &mut expiry => {
                    outbox.close(close::TOKEN_EXPIRED, "token expired");
                    break;
                }
                _ = &mut close_requested => break,
                _ = ping.tick() => {
                    if !heard {
                        // Silent for a whole interval after a ping: the peer is gone.
                        outbox.close(close::POLICY, "no answer to ping");
                        break;
                    }
                    heard = false;
                    hub.ping(id);
                    continue;
                }
                next = stream.next() => next,
            },
        };
        if matches!(next, Some(Ok(_))) {
            activity.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        }
        // A frame of the protocol (JSON text, or MessagePack on `unhidra.v1.msgpack`).
        if let Some(parsed) = next
            .as_ref()
            .and_then(|read| read.as_ref().ok())
            .and_then(|message| client_frame(message, msgpack, limit))
        {
            heard = true;
            match conn.admit_frame() {
                Admit::Handle => match parsed {
                    Ok(ClientFrame::Send {
                        room,
                        body,
                        client_msg_id,
                    }) => {
                        // A burst already read from the socket is stored as one group.
                        let mut burst = Burst {
                            room,
                            items: vec![(client_msg_id, body)],
                        };
                        gather(
                            &mut burst,
                            &mut conn,
                            &mut stream,
                            msgpack,
                            limit,
                            &mut pending,
                        );
                        for _ in &burst.items {
                            metrics.frame("in", "send");
                        }
                        conn.send_boxed(burst).await;
                    }
                    parsed => match conn.handle_boxed(parsed).await {
                        Handled::Authenticate(token) => {
                            let verified = state.identity().authenticate_until(&token).await.ok();
                            conn.reauthenticated(verified);
                            watches.reauthenticated(&state, conn.who());
                        }
                        Handled::Watch(topic) => watches.watch(&state, conn.who(), topic).await,
                        Handled::Unwatch(topic) => watches.unwatch(hub, &topic),
                        Handled::Done => {}
                    },
                },
                Admit::Drop => {}
                Admit::Close => break,
            }
        } else {
            match next {
                Some(Ok(Message::Close(_))) => {
                    // The library answers a close with a close on its next read: one more read
                    // completes the handshake.
                    closed_by_peer = true;
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.next())
                        .await;
                    break;
                }
                None => {
                    closed_by_peer = true;
                    break;
                }
                Some(Ok(Message::Text(_))) => {
                    outbox.close(close::TOO_BIG, "frame too large");
                    break;
                }
                Some(Ok(Message::Binary(_))) if msgpack => {
                    outbox.close(close::TOO_BIG, "frame too large");
                    break;
                }
                Some(Ok(Message::Binary(_))) => {
                    outbox.close(
                        close::UNSUPPORTED,
                        "binary frames are not part of unhidra.v1.json",
                    );
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => heard = true,
                Some(Err(e)) => {
                    let (code, reason) = read_error(&e);
                    outbox.close(code, reason);
                    break;
                }
            }
        }
        if conn.expires() != expires {
            // An `auth` frame brought a fresh token.
            expires = conn.expires();
            expiry
                .as_mut()
                .reset(tokio::time::Instant::now() + until(expires));
        }
    }
    metrics.connections.get_or_create(&kind).dec();
    let code = if closed_by_peer {
        close::NORMAL
    } else {
        outbox.close_code().unwrap_or(close::GOING_AWAY)
    };
    metrics
        .disconnects
        .get_or_create(&unhidra_chat::metrics::CodeLabel { code })
        .inc();
    // No update is made for a connection that is closing.
    drop(watches);
    linger(&mut writer, &mut stream, closed_by_peer).await;
    writer.abort();
    // Only now: a socket still lingering counts towards its address's connection limit, and
    // the hub encodes nothing for it meanwhile, since its outbox is closing.
    hub.unregister(id);
    tracing::debug!(connection = id, "websocket closed");
}

/// The writer task of a connection: it takes everything queued at once and writes it with one
/// flush, paced by `unhidra_chat::writer::Pace`, until the outbox asks to close.
pub(crate) fn spawn_writer(
    outbox: Arc<unhidra_chat::outbox::Outbox>,
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    coalesce: std::time::Duration,
    lines: Option<usize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut pace = Pace::new(coalesce);
        loop {
            match outbox.next().await {
                // Everything queued goes out with one flush, so a busy room costs one write
                // per batch rather than one per frame; what queues during a write is the
                // next batch.
                Next::Frames(mut frames) => {
                    if let Some(due) = pace.due(tokio::time::Instant::now()) {
                        // A burst that fills half the queue ends the wait early.
                        tokio::select! {
                            () = tokio::time::sleep_until(due) => {}
                            () = outbox.half_full() => {}
                        }
                        outbox.take_more(&mut frames);
                    }
                    let count = frames.len();
                    let frames = match lines {
                        Some(cap) => join_lines(frames, cap),
                        None => frames,
                    };
                    let Ok(pushed_back) = write_all(&mut sink, frames).await else {
                        break;
                    };
                    pace.wrote(count, pushed_back, tokio::time::Instant::now());
                }
                Next::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: reason.into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
            }
        }
    })
}

/// The end of a connection: the writer sends what is queued and the close frame; a peer that
/// stopped reading is not waited for longer than [`WRITER_GRACE`], and dropping the writer
/// closes the socket. When the server closed, the peer's frames are read and dropped meanwhile
/// until its close frame answers ours.
pub(crate) async fn linger(
    writer: &mut tokio::task::JoinHandle<()>,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    closed_by_peer: bool,
) {
    let written = async {
        let _ = tokio::time::timeout(WRITER_GRACE, &mut *writer).await;
    };
    if closed_by_peer {
        written.await;
    } else {
        let drained = async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        let linger = WRITER_GRACE.max(CLOSE_LINGER);
        let _ = tokio::time::timeout(linger, futures_util::future::join(written, drained)).await;
    }
}

/// The client frame a socket message carries: JSON text (on every subprotocol), or MessagePack
/// binary on `unhidra.v1.msgpack`; `None` for anything else, or past the size limit.
fn client_frame(
    message: &Message,
    msgpack: bool,
    limit: usize,
) -> Option<Result<ClientFrame, FrameError>> {
    match message {
        Message::Text(text) if text.len() <= limit => Some(parse_client_frame(text.as_str())),
        Message::Binary(bytes) if msgpack && bytes.len() <= limit => {
            Some(parse_client_frame_msgpack(bytes))
        }
        _ => None,
    }
}

/// Adds to a burst the `send` frames to the same room that are already read from the socket (nothing
/// is waited for). The first other frame is left in `pending`, to be handled next, so
/// frames are still handled in the order they came.
fn gather<S>(
    burst: &mut Burst,
    conn: &mut Session<'_>,
    stream: &mut S,
    msgpack: bool,
    limit: usize,
    pending: &mut Option<Option<Result<Message, axum::Error>>>,
) where
    S: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    use futures_util::FutureExt as _;
    let most = conn.burst_limit();
    while burst.items.len() < most {
        // Only what is ready: nothing is waited for.
        let Some(read) = stream.next().now_or_never() else {
            return;
        };
        let same_room_send = match read
            .as_ref()
            .and_then(|read| read.as_ref().ok())
            .and_then(|message| client_frame(message, msgpack, limit))
        {
            Some(Ok(ClientFrame::Send {
                room,
                body,
                client_msg_id,
            })) if room == burst.room => Some((client_msg_id, body)),
            _ => None,
        };
        let Some(item) = same_room_send else {
            *pending = Some(read);
            return;
        };
        // A frame the rate limit would refuse is left for the reader, which refuses it after
        // the burst's acks: every frame is answered in the order it came.
        if !conn.ready() {
            *pending = Some(read);
            return;
        }
        let admitted = conn.admit_frame();
        debug_assert!(matches!(admitted, Admit::Handle));
        burst.items.push(item);
    }
}

/// The close code for a failed read: too large, invalid UTF-8, or a protocol error.
pub(crate) fn read_error(err: &axum::Error) -> (u16, &'static str) {
    let text = err.to_string();
    if text.contains("Space limit exceeded")
        || text.contains("too long")
        || text.contains("Capacity")
    {
        (close::TOO_BIG, "frame too large")
    } else if text.contains("UTF-8") || text.contains("utf-8") || text.contains("Utf8") {
        (close::INVALID_PAYLOAD, "invalid UTF-8")
    } else {
        (close::PROTOCOL_ERROR, "protocol error")
    }
}

/// Writes frames in order with one flush at the end; answers whether the socket pushed back
/// (made the write wait) on the way.
async fn write_all<S>(sink: &mut S, frames: VecDeque<Queued>) -> Result<bool, S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut sink = Watched {
        inner: sink,
        pushed_back: false,
    };
    for frame in frames {
        let message = match frame {
            // UTF-8 by construction; the check is the price of a hub that knows no WebSocket
            // library (it is a fast scan next to the write itself).
            Queued::Text(text) => match Utf8Bytes::try_from(text) {
                Ok(text) => Message::Text(text),
                Err(e) => {
                    tracing::error!(error = %e, "a queued text frame is not UTF-8; dropped");
                    continue;
                }
            },
            Queued::Binary(bytes) => Message::Binary(bytes),
            Queued::Ping => Message::Ping(axum::body::Bytes::new()),
        };
        sink.feed(message).await?;
    }
    sink.flush().await?;
    Ok(sink.pushed_back)
}

/// A sink that notes whether it ever made its caller wait: a socket whose send buffer is full.
struct Watched<'a, S> {
    inner: &'a mut S,
    pushed_back: bool,
}

impl<S> Watched<'_, S> {
    fn watch<T, E>(&mut self, poll: Poll<Result<T, E>>) -> Poll<Result<T, E>> {
        self.pushed_back |= poll.is_pending();
        poll
    }
}

impl<S> futures_util::Sink<Message> for Watched<'_, S>
where
    S: futures_util::Sink<Message> + Unpin,
{
    type Error = S::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let poll = Pin::new(&mut *self.inner).poll_ready(cx);
        self.watch(poll)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), S::Error> {
        Pin::new(&mut *self.get_mut().inner).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let poll = Pin::new(&mut *self.inner).poll_flush(cx);
        self.watch(poll)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut *self.get_mut().inner).poll_close(cx)
    }
}

/// How long from now until `expires` (zero when it is past).
pub(crate) fn until(expires: DateTime<Utc>) -> std::time::Duration {
    (expires - Utc::now())
        .to_std()
        .unwrap_or(std::time::Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes every frame, and makes its first `flushes_pending` flushes wait.
    struct Socket {
        flushes_pending: usize,
        sent: Vec<Message>,
    }

    impl futures_util::Sink<Message> for Socket {
        type Error = ();

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), ()> {
            self.get_mut().sent.push(item);
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            let socket = self.get_mut();
            if socket.flushes_pending == 0 {
                return Poll::Ready(Ok(()));
            }
            socket.flushes_pending -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_write_reports_whether_the_socket_made_it_wait() {
        let frames = || VecDeque::from([Queued::text("{}"), Queued::Ping, Queued::text("[]")]);
        let mut quick = Socket {
            flushes_pending: 0,
            sent: Vec::new(),
        };
        assert_eq!(write_all(&mut quick, frames()).await, Ok(false));
        assert_eq!(quick.sent.len(), 3, "every frame, in order");
        assert!(matches!(quick.sent[1], Message::Ping(_)));
        let mut full = Socket {
            flushes_pending: 2,
            sent: Vec::new(),
        };
        assert_eq!(write_all(&mut full, frames()).await, Ok(true));
        assert_eq!(full.sent.len(), 3);
    }
}
