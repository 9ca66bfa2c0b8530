//! Unhidra's realtime wire protocol: the frames a client and the server exchange over the
//! WebSocket at `/ws`, the subprotocol names, and the close codes.
//!
//! This crate does no I/O and knows no runtime, so the server, the device SDK and firmware
//! simulators all parse exactly the same thing. `docs/protocol.md` describes it for people.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod device;
pub mod firmware;

pub use device::{
    DEVICE_KEY_PREFIX, DEVICE_KEY_PREFIX_TEXT, DeviceFrame, DeviceServerFrame, OtaState,
    SUBPROTOCOL_DEVICE_JSON, SUBPROTOCOL_DEVICE_MSGPACK, parse_device_frame,
    parse_device_frame_msgpack,
};

/// The subprotocol of JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "unhidra.v1.json";
/// The subprotocol of the same JSON frames, where one server text message may carry several
/// frames, one per line (`\n` between them; JSON text never holds a raw newline). Client
/// messages are one frame each, as on [`SUBPROTOCOL_JSON`]. A busy room then costs a client one
/// WebSocket message per batch rather than one per frame.
pub const SUBPROTOCOL_JSON_LINES: &str = "unhidra.v1.jsonl";
/// The subprotocol of the same frames in MessagePack, as binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "unhidra.v1.msgpack";
/// The prefix of the subprotocol entry that carries an access token: `bearer.<token>`.
pub const BEARER_PREFIX: &str = "bearer.";

/// Close codes the server uses, beyond RFC 6455's.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// A violation of RFC 6455 framing (reserved bits, unknown opcodes, bad fragments).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame type the protocol does not use (binary on the JSON subprotocol).
    pub const UNSUPPORTED: u16 = 1003;
    /// Invalid UTF-8 in a text frame.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A policy was broken.
    pub const POLICY: u16 = 1008;
    /// A frame larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error.
    pub const INTERNAL: u16 = 1011;
    /// The client reads too slowly to keep up, or the server is overloaded.
    pub const OVERLOADED: u16 = 1013;
    /// The access token expired and no fresh one came in an `auth` frame.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The session, user or device was revoked, or an admin closed the connection.
    pub const REVOKED: u16 = 4003;
    /// A newer connection of the same device took over (devices only): the old one is most
    /// often a half-open socket left behind by a network change.
    pub const REPLACED: u16 = 4009;
    /// Rate limits were exceeded again and again.
    pub const RATE_LIMITED: u16 = 4029;
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Start receiving a room's messages and presence.
    Join {
        /// The room's id.
        room: String,
    },
    /// Stop receiving a room.
    Leave {
        /// The room's id.
        room: String,
    },
    /// Post a message; the server answers `ack` once it is stored.
    Send {
        /// The room's id.
        room: String,
        /// The text.
        body: String,
        /// The client's id for this message; a retry with the same id is acknowledged again
        /// with the same stored id and never stored twice.
        client_msg_id: String,
    },
    /// Ask for stored messages.
    History {
        /// The room's id.
        room: String,
        /// Only messages with a smaller id (older).
        #[serde(default)]
        before: Option<i64>,
        /// Only messages with a larger id (newer).
        #[serde(default)]
        after: Option<i64>,
        /// At most this many (default 50, at most 200).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// After a reconnect: join these rooms and replay every message after the last seen id.
    Resume {
        /// Room id → the last message id the client saw there (0 for none).
        rooms: BTreeMap<String, i64>,
    },
    /// The user is typing in a room.
    Typing {
        /// The room's id.
        room: String,
    },
    /// Keep-alive; answered with `pong`.
    Ping,
    /// A fresh access token, before the current one expires.
    Auth {
        /// The access token.
        token: String,
    },
    /// Start receiving a topic's live updates (`fleet`, `deployments`, `deployment:<id>`).
    Watch {
        /// The topic.
        topic: String,
    },
    /// Stop receiving a topic's updates.
    Unwatch {
        /// The topic.
        topic: String,
    },
}

/// A stored message as frames carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageData {
    /// The room's id.
    pub room: String,
    /// The message's id: increasing, the cursor for history and resume.
    pub id: i64,
    /// The sender's user id.
    pub sender: String,
    /// The text.
    pub body: String,
    /// When it was stored, Unix milliseconds.
    pub ts: i64,
}

impl MessageData {
    /// The length of its JSON encoding, the largest of the wire formats (escapes can make it
    /// six times the body): what the byte bound of a reply counts.
    pub fn encoded_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        // Plain data: serialising it cannot fail.
        let _ = serde_json::to_writer(&mut count, self);
        count.0
    }
}

/// Whether a user came or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// The user's first connection joined the room.
    Online,
    /// The user's last connection left the room.
    Offline,
    /// The user is typing.
    Typing,
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The connection is ready: who the server thinks you are.
    Welcome {
        /// The connection's id.
        connection: String,
        /// The user's id.
        user: String,
    },
    /// A `send` is stored.
    Ack {
        /// The client's id of the message.
        client_msg_id: String,
        /// The stored id.
        id: i64,
        /// When it was stored, Unix milliseconds.
        ts: i64,
    },
    /// A message in a joined room.
    Message(MessageData),
    /// Someone came, went or is typing.
    Presence {
        /// The room's id.
        room: String,
        /// The user's id.
        user: String,
        /// What happened.
        status: PresenceStatus,
    },
    /// The answer to `history` (and the replay of `resume`), oldest first.
    History {
        /// The room's id.
        room: String,
        /// The messages.
        messages: Vec<MessageData>,
        /// The reply was cut short: on a `resume` replay or a `history {after}` page, more
        /// messages follow the last one here (read them with `history {after}`; live messages
        /// continue meanwhile); on any other `history` page, older ones precede the first one
        /// here (`history {before}`). Replies are bounded in bytes (`ws_max_reply_bytes`) as
        /// well as in messages.
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// The answer to `ping`.
    Pong,
    /// A `watch` took effect: the topic's updates follow (or an `unwatch`: they stop).
    Watching {
        /// The topic, as the server names it.
        topic: String,
        /// Whether updates come now (`false` after an `unwatch`).
        active: bool,
    },
    /// A live update of a watched topic: best-effort, never replayed (read the REST API
    /// after a reconnect); `{"event": "lagged", "missed": n}` when the server dropped some.
    Update {
        /// The topic.
        topic: String,
        /// What happened: an object with an `event` field.
        data: serde_json::Value,
    },
    /// A frame could not be carried out; the connection goes on.
    Error {
        /// A stable code (see `docs/protocol.md`).
        code: String,
        /// What went wrong, for people.
        message: String,
        /// Seconds to wait, when rate limited.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        retry_after: Option<u64>,
        /// The `client_msg_id` or room the error is about.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
    },
}

impl ServerFrame {
    /// An `error` frame.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
            reference: None,
        }
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        // A frame is plain data: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(r#"{"type":"error","code":"internal","message":"encoding failed"}"#)
        })
    }

    /// The frame in MessagePack: a map with the same keys as the JSON object.
    pub fn to_msgpack(&self) -> Vec<u8> {
        // Named fields, so that the map is what the JSON object is.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// The `type` of the frame, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::Ack { .. } => "ack",
            Self::Message(_) => "message",
            Self::Presence { .. } => "presence",
            Self::History { .. } => "history",
            Self::Pong => "pong",
            Self::Watching { .. } => "watching",
            Self::Update { .. } => "update",
            Self::Error { .. } => "error",
        }
    }
}

impl ClientFrame {
    /// The `type` of the frame, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Join { .. } => "join",
            Self::Leave { .. } => "leave",
            Self::Send { .. } => "send",
            Self::History { .. } => "history",
            Self::Resume { .. } => "resume",
            Self::Typing { .. } => "typing",
            Self::Ping => "ping",
            Self::Auth { .. } => "auth",
            Self::Watch { .. } => "watch",
            Self::Unwatch { .. } => "unwatch",
        }
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Why a client frame was refused; the code goes into the `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// `invalid_json`, `not_an_object`, `missing_type`, `unknown_type`, `missing_field`,
    /// `invalid_field`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Parses a client's text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
        code: "invalid_json",
        message: format!("the frame is not JSON: {e}"),
    })?;
    parse_value(value)
}

/// Parses a client's binary frame on the MessagePack subprotocol: the same map as the JSON
/// object, so the same checks and error codes apply.
pub fn parse_client_frame_msgpack(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    let value: serde_json::Value = rmp_serde::from_slice(bytes).map_err(|e| FrameError {
        code: "invalid_msgpack",
        message: format!("the frame is not MessagePack: {e}"),
    })?;
    parse_value(value)
}

fn parse_value(value: serde_json::Value) -> Result<ClientFrame, FrameError> {
    let Some(object) = value.as_object() else {
        return Err(FrameError {
            code: "not_an_object",
            message: "a frame is a JSON object with a `type`".into(),
        });
    };
    match object.get("type") {
        None => {
            return Err(FrameError {
                code: "missing_type",
                message: "the frame has no `type`".into(),
            });
        }
        Some(serde_json::Value::String(_)) => {}
        Some(_) => {
            return Err(FrameError {
                code: "invalid_field",
                message: "`type` must be a string".into(),
            });
        }
    }
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        let code = if message.starts_with("unknown variant") {
            "unknown_type"
        } else if message.starts_with("missing field") {
            "missing_field"
        } else {
            "invalid_field"
        };
        FrameError { code, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_frame_parses() {
        let cases = [
            (r#"{"type":"join","room":"r1"}"#, "join"),
            (r#"{"type":"leave","room":"r1"}"#, "leave"),
            (
                r#"{"type":"send","room":"r1","body":"hi","client_msg_id":"c1"}"#,
                "send",
            ),
            (
                r#"{"type":"history","room":"r1","before":10,"limit":5}"#,
                "history",
            ),
            (r#"{"type":"history","room":"r1"}"#, "history"),
            (r#"{"type":"resume","rooms":{"r1":3,"r2":0}}"#, "resume"),
            (r#"{"type":"typing","room":"r1"}"#, "typing"),
            (r#"{"type":"ping"}"#, "ping"),
            (r#"{"type":"auth","token":"t"}"#, "auth"),
        ];
        for (text, kind) in cases {
            let frame = parse_client_frame(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(frame.kind(), kind);
        }
    }

    #[test]
    fn malformed_frames_get_stable_codes() {
        let cases = [
            ("not json", "invalid_json"),
            ("", "invalid_json"),
            ("[1,2]", "not_an_object"),
            ("\"join\"", "not_an_object"),
            (r#"{"room":"r1"}"#, "missing_type"),
            (r#"{"type":5}"#, "invalid_field"),
            (r#"{"type":"dance"}"#, "unknown_type"),
            (r#"{"type":"join"}"#, "missing_field"),
            (r#"{"type":"join","room":5}"#, "invalid_field"),
            (
                r#"{"type":"history","room":"r","limit":-1}"#,
                "invalid_field",
            ),
            (r#"{"type":"resume","rooms":{"r":"x"}}"#, "invalid_field"),
        ];
        for (text, code) in cases {
            let err = parse_client_frame(text).unwrap_err();
            assert_eq!(err.code, code, "{text}: {}", err.message);
        }
    }

    #[test]
    fn msgpack_frames_are_the_json_frames() {
        let send = ClientFrame::Send {
            room: "r".into(),
            body: "hi".into(),
            client_msg_id: "c".into(),
        };
        let bytes = rmp_serde::to_vec_named(&send).unwrap();
        assert_eq!(parse_client_frame_msgpack(&bytes).unwrap(), send);
        let ack = ServerFrame::Ack {
            client_msg_id: "c".into(),
            id: 1,
            ts: 2,
        };
        let back: serde_json::Value = rmp_serde::from_slice(&ack.to_msgpack()).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(&ack.to_json()).unwrap()
        );
        assert_eq!(
            parse_client_frame_msgpack(b"\xc1").unwrap_err().code,
            "invalid_msgpack"
        );
        let unknown = rmp_serde::to_vec_named(&serde_json::json!({ "type": "dance" })).unwrap();
        assert_eq!(
            parse_client_frame_msgpack(&unknown).unwrap_err().code,
            "unknown_type"
        );
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let ack = ServerFrame::Ack {
            client_msg_id: "c1".into(),
            id: 7,
            ts: 1_800_000_000_000,
        };
        assert_eq!(
            ack.to_json(),
            r#"{"type":"ack","client_msg_id":"c1","id":7,"ts":1800000000000}"#
        );
        let message = ServerFrame::Message(MessageData {
            room: "r".into(),
            id: 1,
            sender: "u".into(),
            body: "hi".into(),
            ts: 5,
        });
        assert_eq!(
            message.to_json(),
            r#"{"type":"message","room":"r","id":1,"sender":"u","body":"hi","ts":5}"#
        );
        let error = ServerFrame::Error {
            code: "rate_limited".into(),
            message: "slow down".into(),
            retry_after: Some(2),
            reference: Some("c9".into()),
        };
        assert_eq!(
            error.to_json(),
            r#"{"type":"error","code":"rate_limited","message":"slow down","retry_after":2,"ref":"c9"}"#
        );
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
        assert_eq!(
            ServerFrame::error("x", "y").to_json(),
            r#"{"type":"error","code":"x","message":"y"}"#
        );
    }
}
