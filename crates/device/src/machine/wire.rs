//! Frames as WebSocket messages: which subprotocol, how a frame is encoded, how the server's
//! messages are read (a `type` this SDK does not know is ignored, as the protocol asks).

use serde::Deserialize;
use unhidra_protocol::device::{
    DEVICE_KEY_PREFIX, DeviceFrame, DeviceServerFrame, SUBPROTOCOL_DEVICE_JSON,
    SUBPROTOCOL_DEVICE_MSGPACK,
};

/// The frames' format on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `unhidra.device.v1`: JSON text messages.
    #[default]
    Json,
    /// `unhidra.device.v1.msgpack`: MessagePack binary messages (arrays as packed `bin`).
    MsgPack,
}

impl Encoding {
    /// The subprotocol name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => SUBPROTOCOL_DEVICE_JSON,
            Self::MsgPack => SUBPROTOCOL_DEVICE_MSGPACK,
        }
    }

    /// The `Sec-WebSocket-Protocol` value that offers this format and carries the key:
    /// `unhidra.device.v1, key.unh_dk_…`.
    pub fn protocol_header(self, key: &str) -> String {
        format!("{}, {DEVICE_KEY_PREFIX}{key}", self.subprotocol())
    }

    /// A frame as the message this format sends.
    pub fn encode(self, frame: &DeviceFrame) -> Message {
        match self {
            Self::Json => Message::Text(frame.to_json()),
            Self::MsgPack => Message::Binary(frame.to_msgpack()),
        }
    }
}

/// A WebSocket data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (JSON).
    Text(String),
    /// A binary message (MessagePack).
    Binary(Vec<u8>),
}

/// A server message that is not a frame of the device protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable server frame: {0}")]
pub struct DecodeError(pub String);

/// The `type` of a frame, read first so that an unknown one can be told from a broken one.
#[derive(Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: String,
}

const KNOWN: &[&str] = &["welcome", "ack", "command", "config", "error", "pong"];

/// Reads a server message: a text message as JSON, a binary one as MessagePack, whichever
/// subprotocol was agreed. `Ok(None)` for a frame of a `type` this SDK does not know (a newer
/// server's `ota_offer`, say), which a device ignores.
pub fn decode(message: &Message) -> Result<Option<DeviceServerFrame>, DecodeError> {
    let err = |e: &dyn std::fmt::Display| DecodeError(e.to_string());
    let kind: Kind = match message {
        Message::Text(text) => serde_json::from_str(text).map_err(|e| err(&e))?,
        Message::Binary(bytes) => rmp_serde::from_slice(bytes).map_err(|e| err(&e))?,
    };
    if !KNOWN.contains(&kind.kind.as_str()) {
        return Ok(None);
    }
    let frame = match message {
        Message::Text(text) => serde_json::from_str(text).map_err(|e| err(&e))?,
        Message::Binary(bytes) => rmp_serde::from_slice(bytes).map_err(|e| err(&e))?,
    };
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_read_back_and_unknown_types_are_ignored() {
        let ack = DeviceServerFrame::Ack {
            seq: 7,
            duplicate: true,
        };
        for message in [
            Message::Text(ack.to_json()),
            Message::Binary(ack.to_msgpack()),
        ] {
            assert_eq!(decode(&message), Ok(Some(ack.clone())));
        }
        let offer = Message::Text(r#"{"type":"ota_offer","url":"x"}"#.into());
        assert_eq!(decode(&offer), Ok(None));
        assert!(decode(&Message::Text(r#"{"type":"ack"}"#.into())).is_err());
        assert!(decode(&Message::Text("nope".into())).is_err());
        assert_eq!(
            Encoding::MsgPack.protocol_header("unh_dk_x"),
            "unhidra.device.v1.msgpack, key.unh_dk_x"
        );
    }
}
