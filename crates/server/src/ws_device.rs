//! A device's connection to `/ws`: the key checked before the upgrade, then a reader loop over
//! the device frames of `unhidra-protocol` and the same writer as a user's connection.
//!
//! The key travels in `Sec-WebSocket-Protocol` (`unhidra.device.v1, key.<key>`, or a lone key as
//! ESP32 firmware sends it, echoed back), or in `Authorization: Bearer` with no subprotocol or a
//! device one. A newer connection of the same device replaces an older one (4009); a revoked or
//! deleted device's connections close with 4003.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures_util::StreamExt;
use unhidra_chat::hub::{AuthStyle, Reservation};
use unhidra_devices::{DeviceAuth, DeviceError, Disconnect};
use unhidra_protocol::device::{
    DEVICE_KEY_PREFIX, DEVICE_KEY_PREFIX_TEXT, device_frame_ref, device_frame_ref_msgpack,
};
use unhidra_protocol::{
    DeviceFrame, DeviceServerFrame, FrameError, SUBPROTOCOL_DEVICE_JSON,
    SUBPROTOCOL_DEVICE_MSGPACK, close, parse_device_frame, parse_device_frame_msgpack,
};

use crate::error::{ApiError, rate_limited};
use crate::http::auth::client_ip;
use crate::state::AppState;
use crate::ws::{READ_CHUNK_BYTES, linger, read_error, spawn_writer};

/// How a device presented its key and which subprotocol to echo.
pub(crate) struct DeviceOffer {
    key: String,
    echo: Option<String>,
    protocol: &'static str,
    style: AuthStyle,
}

/// Whether the upgrade is a device's: a device subprotocol, a lone `unh_dk_` key, or such a
/// key in `Authorization` with no subprotocol. A device subprotocol without a key is refused;
/// anything else is a user's upgrade.
pub(crate) fn offer(headers: &HeaderMap) -> Result<Option<DeviceOffer>, ApiError> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let bearer = crate::http::auth::bearer(headers);
    let named = offered.iter().find_map(|p| {
        [SUBPROTOCOL_DEVICE_JSON, SUBPROTOCOL_DEVICE_MSGPACK]
            .into_iter()
            .find(|name| name == p)
    });
    if let Some(name) = named {
        let in_protocols = offered
            .iter()
            .find_map(|p| p.strip_prefix(DEVICE_KEY_PREFIX));
        let (key, style) = match (in_protocols, bearer) {
            (Some(key), _) => (key, AuthStyle::Key),
            (None, Some(key)) => (key, AuthStyle::AuthorizationHeader),
            (None, None) => return Err(DeviceError::BadKey.into()),
        };
        return Ok(Some(DeviceOffer {
            key: key.to_owned(),
            echo: Some(name.to_owned()),
            protocol: name,
            style,
        }));
    }
    if let [lone] = offered.as_slice()
        && lone.starts_with(DEVICE_KEY_PREFIX_TEXT)
    {
        return Ok(Some(DeviceOffer {
            key: (*lone).to_owned(),
            echo: Some((*lone).to_owned()),
            protocol: SUBPROTOCOL_DEVICE_JSON,
            style: AuthStyle::TokenOnly,
        }));
    }
    if offered.is_empty()
        && let Some(key) = bearer.filter(|k| k.starts_with(DEVICE_KEY_PREFIX_TEXT))
    {
        return Ok(Some(DeviceOffer {
            key: key.to_owned(),
            echo: None,
            protocol: SUBPROTOCOL_DEVICE_JSON,
            style: AuthStyle::AuthorizationHeader,
        }));
    }
    Ok(None)
}

/// Upgrades a device's connection once its key is good and the limits allow it.
pub(crate) async fn upgrade(
    state: AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    ws: WebSocketUpgrade,
    offer: DeviceOffer,
) -> Response {
    let ip = client_ip(Some(peer.ip()), headers, state.trusted_proxies());
    let auth = match state.devices().authenticate_from(&offer.key, ip).await {
        Ok(auth) => auth,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let admitted = match state.chat().admit_device(ip, auth.device) {
        Ok(admitted) => admitted,
        Err(refused) => return rate_limited(refused, "new connections").into_response(),
    };
    let limit = usize::try_from(state.config().ws_max_frame_bytes).unwrap_or(usize::MAX);
    let hard_cap = limit.saturating_mul(4).max(1024 * 1024);
    let ws = ws
        .read_buffer_size(READ_CHUNK_BYTES)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap);
    let ws = match offer.echo {
        Some(echo) => ws.protocols([echo]),
        None => ws,
    };
    let wire = (offer.protocol, offer.style);
    // A failed upgrade drops the closure, and the place it held.
    ws.on_upgrade(move |socket| run(state, socket, auth, admitted, wire, limit))
}

/// Frames one connection may send per second, as a window that starts again every second.
struct FrameRate {
    limit: u32,
    second: i64,
    count: u32,
    /// Seconds in a row in which the limit was passed.
    strikes: u32,
}

impl FrameRate {
    /// Whether one more frame is allowed now; `None` when the connection should close.
    fn admit(&mut self) -> Option<bool> {
        let now = Utc::now().timestamp();
        if now != self.second {
            if self.count <= self.limit {
                self.strikes = 0;
            }
            self.second = now;
            self.count = 0;
        }
        self.count += 1;
        if self.count == self.limit + 1 {
            self.strikes += 1;
            if self.strikes >= 5 {
                return None;
            }
        }
        Some(self.count <= self.limit)
    }
}

/// The `error` frame for a refused device request.
fn refusal(e: &DeviceError, reference: Option<String>) -> DeviceServerFrame {
    let (code, message, retry_after) = match e {
        DeviceError::Invalid(_, code, message) => (*code, message.clone(), None),
        DeviceError::RateLimited { retry_after, .. } => (
            "rate_limited",
            e.to_string(),
            u64::try_from(*retry_after).ok(),
        ),
        DeviceError::Conflict(code, message) => (*code, message.clone(), None),
        DeviceError::NotFound(_) => ("not_found", e.to_string(), None),
        DeviceError::Forbidden(why) => ("forbidden", (*why).to_owned(), None),
        DeviceError::BadKey => ("invalid_key", e.to_string(), None),
        // Claims are made over HTTP, never on a device's connection.
        DeviceError::Claim(_) => ("claim_refused", e.to_string(), None),
        // Never the store's own text.
        DeviceError::Store(_) => ("internal", "the server could not do this now".into(), None),
    };
    DeviceServerFrame::Error {
        code: code.to_owned(),
        message,
        retry_after,
        reference,
    }
}

/// The `error` frame of a refused `ota_status`.
fn ota_refusal(e: &unhidra_ota::DeployError) -> DeviceServerFrame {
    use unhidra_ota::DeployError;
    let (code, message) = match e {
        DeployError::Invalid(_, code, message) => (*code, message.clone()),
        DeployError::NotOffered(_) => ("ota_not_offered", e.to_string()),
        DeployError::BadTransition(..) => ("ota_invalid_state", e.to_string()),
        _ => ("internal", "the server could not do this now".to_owned()),
    };
    DeviceServerFrame::Error {
        code: code.to_owned(),
        message,
        retry_after: None,
        reference: None,
    }
}

/// One device connection, from upgrade to close.
async fn run(
    state: AppState,
    socket: WebSocket,
    auth: DeviceAuth,
    admitted: Reservation,
    wire: (&'static str, AuthStyle),
    limit: usize,
) {
    let chat = state.chat();
    let hub = chat.hub();
    let devices = state.devices();
    let metrics = chat.metrics().clone();
    let kind = unhidra_chat::metrics::KindLabel { kind: "device" };
    metrics.connections.get_or_create(&kind).inc();
    let msgpack = wire.0 == SUBPROTOCOL_DEVICE_MSGPACK;
    let registration =
        hub.register_device_reserved(admitted, auth.device, auth.owner, wire, Utc::now());
    let id = registration.id;
    let outbox = registration.outbox;
    let activity = registration.activity;
    // One connection per device: this one replaces any older one.
    hub.close_device_except(
        auth.device,
        id,
        close::REPLACED,
        "replaced by a newer connection",
    );
    let (sink, mut stream) = socket.split();
    let mut writer = spawn_writer(
        std::sync::Arc::clone(&outbox),
        sink,
        chat.write_coalesce,
        None,
    );
    // A revocation or deletion between the key check and the registration above found no
    // connection to close: look again now that it is registered.
    let gone = match devices.connected(&auth).await {
        Err(DeviceError::Store(unhidra_store::StoreError::NotFound { .. })) => true,
        Err(e) => {
            tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "device status not written");
            false
        }
        Ok(()) => false,
    };
    if gone || !devices.still_valid(&auth).await {
        outbox.close(close::REVOKED, "device key revoked");
    }
    hub.send_device_frame(
        id,
        &DeviceServerFrame::Welcome {
            connection: id.to_string(),
            device: auth.device.to_string(),
        },
    );
    tracing::debug!(connection = id, device = %auth.device, "device connected");

    let mut ping = tokio::time::interval(chat.ping_interval.max(std::time::Duration::from_secs(1)));
    ping.tick().await;
    let close_requested = outbox.close_requested();
    tokio::pin!(close_requested);
    let mut rate = FrameRate {
        limit: state.config().rate_limit_messages_per_sec.max(1),
        second: 0,
        count: 0,
        strikes: 0,
    };
    let mut heard = true;
    let mut hello = false;
    // Commands and configuration the server sends unasked, once the device said hello.
    let mut outbound: Option<unhidra_devices::Outbound> = None;
    let mut how = Disconnect::Server;
    let mut closed_by_peer = false;
    loop {
        let next = tokio::select! {
            _ = &mut close_requested => break,
            Some(frame) = async {
                match outbound.as_mut() {
                    Some(o) => o.rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                hub.send_device_frame(id, &frame);
                continue;
            }
            _ = ping.tick() => {
                if !heard {
                    outbox.close(close::POLICY, "no answer to ping");
                    how = Disconnect::Lost;
                    break;
                }
                heard = false;
                hub.ping(id);
                // Revoked on another node, an event missed here, a rotation's grace over, the
                // owner deactivated: the key is checked again every ping interval.
                if !devices.still_valid(&auth).await {
                    outbox.close(close::REVOKED, "device key revoked");
                    break;
                }
                continue;
            }
            next = stream.next() => next,
        };
        let parsed: Option<(Result<DeviceFrame, FrameError>, Option<String>)> = match &next {
            Some(Ok(Message::Text(text))) if text.len() <= limit => {
                let parsed = parse_device_frame(text.as_str());
                let reference = parsed
                    .is_err()
                    .then(|| device_frame_ref(text.as_str()))
                    .flatten();
                Some((parsed, reference))
            }
            Some(Ok(Message::Binary(bytes))) if msgpack && bytes.len() <= limit => {
                let parsed = parse_device_frame_msgpack(bytes);
                let reference = parsed
                    .is_err()
                    .then(|| device_frame_ref_msgpack(bytes))
                    .flatten();
                Some((parsed, reference))
            }
            _ => None,
        };
        if matches!(next, Some(Ok(_))) {
            heard = true;
            activity.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        }
        let Some((parsed, reference)) = parsed else {
            match next {
                Some(Ok(Message::Close(_))) => {
                    closed_by_peer = true;
                    how = Disconnect::Clean;
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.next())
                        .await;
                    break;
                }
                None => {
                    closed_by_peer = true;
                    how = Disconnect::Lost;
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
                        "binary frames are not part of unhidra.device.v1",
                    );
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    devices.seen(&auth, None).await;
                    continue;
                }
                Some(Err(e)) => {
                    let (code, reason) = read_error(&e);
                    outbox.close(code, reason);
                    how = Disconnect::Lost;
                    break;
                }
            }
        };
        match rate.admit() {
            None => {
                outbox.close(close::RATE_LIMITED, "rate limits exceeded again and again");
                break;
            }
            Some(false) => {
                hub.send_device_frame(
                    id,
                    &DeviceServerFrame::Error {
                        code: "rate_limited".into(),
                        message: "too many frames; slow down".into(),
                        retry_after: Some(1),
                        reference,
                    },
                );
                continue;
            }
            Some(true) => {}
        }
        let frame = match parsed {
            Ok(frame) => frame,
            Err(e) => {
                metrics.frame("in", "invalid");
                tracing::info!(device = %auth.device, code = e.code, "device frame refused");
                hub.send_device_frame(id, &DeviceServerFrame::refused(e, reference));
                continue;
            }
        };
        metrics.frame("in", frame.kind());
        if !hello && !matches!(frame, DeviceFrame::Hello { .. } | DeviceFrame::Ping) {
            hub.send_device_frame(
                id,
                &DeviceServerFrame::Error {
                    code: "hello_required".into(),
                    message: "the first frame of a connection is `hello`".into(),
                    retry_after: None,
                    reference: frame_ref(&frame),
                },
            );
            continue;
        }
        match frame {
            DeviceFrame::Hello { .. } if hello => {
                // One per connection: what a device runs does not change while it is connected.
                hub.send_device_frame(
                    id,
                    &DeviceServerFrame::Error {
                        code: "hello_repeated".into(),
                        message: "a connection says `hello` once".into(),
                        retry_after: None,
                        reference: None,
                    },
                );
            }
            DeviceFrame::Hello {
                firmware,
                partition,
                reset_reason,
                secure_version,
                ..
            } => {
                devices.seen(&auth, None).await;
                // Attached before the hello is recorded: from the moment the device is seen
                // running its firmware, frames sent to it (an offer) reach this connection.
                // They are written out once this hello is handled.
                let attached = devices.attach(&auth);
                match devices
                    .hello(
                        &auth,
                        &firmware,
                        partition.as_deref(),
                        reset_reason.as_deref(),
                        secure_version,
                    )
                    .await
                {
                    Ok(()) => {
                        // An update waiting for this boot is confirmed (or rolled back) first.
                        if let Err(e) = state
                            .deployments()
                            .on_hello(auth.device, &firmware, partition.as_deref())
                            .await
                        {
                            tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "update not followed");
                        }
                        if let Err(e) = devices
                            .hello_event(
                                &auth,
                                &firmware,
                                partition.as_deref(),
                                reset_reason.as_deref(),
                            )
                            .await
                        {
                            tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "hello not recorded");
                        }
                        outbound = Some(attached);
                        match devices.on_hello(&auth).await {
                            Ok(frames) => {
                                for frame in &frames {
                                    hub.send_device_frame(id, frame);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "pending commands not sent");
                            }
                        }
                        hello = true;
                    }
                    Err(e) => {
                        devices.detach(&auth, &attached);
                        hub.send_device_frame(id, &refusal(&e, None));
                    }
                }
            }
            DeviceFrame::Heartbeat {
                uptime,
                rssi,
                free_heap,
                battery,
                temperature,
            } => {
                let figures = serde_json::json!({
                    "uptime": uptime,
                    "rssi": rssi,
                    "free_heap": free_heap,
                    "battery": battery,
                    "temperature": temperature,
                    "at": Utc::now(),
                });
                devices.seen(&auth, Some(figures.to_string())).await;
            }
            DeviceFrame::Telemetry { seq, points } => {
                match devices.telemetry(&auth, seq, points).await {
                    Ok(stored) => hub.send_device_frame(
                        id,
                        &DeviceServerFrame::Ack {
                            seq,
                            duplicate: !stored,
                        },
                    ),
                    Err(e) => {
                        tracing::info!(device = %auth.device, seq, error = %e, "telemetry refused");
                        hub.send_device_frame(id, &refusal(&e, Some(seq.to_string())));
                    }
                }
            }
            DeviceFrame::Event { kind, data } => {
                devices.seen(&auth, None).await;
                if let Err(e) = devices.event(&auth, &kind, &data).await {
                    tracing::info!(device = %auth.device, kind, error = %e, "device event refused");
                    hub.send_device_frame(id, &refusal(&e, None));
                }
            }
            DeviceFrame::CommandResult {
                id: command,
                status,
                output,
            } => {
                devices.seen(&auth, None).await;
                if let Err(e) = devices
                    .command_result(&auth, &command, status, output.as_ref())
                    .await
                {
                    hub.send_device_frame(id, &refusal(&e, Some(command)));
                }
            }
            DeviceFrame::Reported { version, state } => {
                devices.seen(&auth, None).await;
                if let Err(e) = devices.reported(&auth, version, &state).await {
                    hub.send_device_frame(id, &refusal(&e, None));
                }
            }
            DeviceFrame::OtaStatus {
                deployment,
                state: ota_state,
                progress,
                reason,
            } => {
                devices.seen(&auth, None).await;
                if let Err(e) = state
                    .deployments()
                    .report(
                        auth.device,
                        &deployment,
                        ota_state,
                        progress,
                        reason.as_deref(),
                    )
                    .await
                {
                    tracing::info!(device = %auth.device, error = %e, "update report refused");
                    hub.send_device_frame(id, &ota_refusal(&e));
                }
            }
            DeviceFrame::Ping => {
                devices.seen(&auth, None).await;
                hub.send_device_frame(id, &DeviceServerFrame::Pong);
            }
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
    if let Some(attached) = &outbound {
        devices.detach(&auth, attached);
    }
    devices.disconnected(&auth, how).await;
    linger(&mut writer, &mut stream, closed_by_peer).await;
    writer.abort();
    hub.unregister(id);
    tracing::debug!(connection = id, device = %auth.device, "device disconnected");
}

/// What a frame's `error` refers to: a batch's seq or a command's id.
fn frame_ref(frame: &DeviceFrame) -> Option<String> {
    match frame {
        DeviceFrame::Telemetry { seq, .. } => Some(seq.to_string()),
        DeviceFrame::CommandResult { id, .. } => Some(id.clone()),
        _ => None,
    }
}
