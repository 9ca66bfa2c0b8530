//! The device protocol: the frames a device (firmware, the SDK, a simulator) and the server
//! exchange on `unhidra.device.v1` (JSON text) and `unhidra.device.v1.msgpack` (MessagePack).
//!
//! Parsing reads a frame twice: a first pass sees only its outline (a map? which `type`?) so
//! that every refusal gets the same stable code in both formats, and a second pass builds the
//! typed frame straight from the bytes. Going straight from the bytes, rather than through
//! `serde_json::Value` as the chat parser does, keeps MessagePack `bin` data, the compact form
//! of telemetry arrays.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::{FrameError, is_false};

/// The device subprotocol of JSON text frames.
pub const SUBPROTOCOL_DEVICE_JSON: &str = "unhidra.device.v1";
/// The device subprotocol of the same frames as MessagePack maps in binary frames.
pub const SUBPROTOCOL_DEVICE_MSGPACK: &str = "unhidra.device.v1.msgpack";
/// The prefix of the subprotocol entry that carries a device key: `key.<key>`.
pub const DEVICE_KEY_PREFIX: &str = "key.";
/// How every device key begins (`unh_dk_<random>`): what tells a key from a user's token.
pub const DEVICE_KEY_PREFIX_TEXT: &str = "unh_dk_";
/// How every provisioning (claim) token begins (`unh_pt_<random>`), which a device exchanges
/// for its key at `POST /api/v1/devices/claim`.
pub const CLAIM_TOKEN_PREFIX_TEXT: &str = "unh_pt_";

/// The deepest nesting a MessagePack frame may have, as serde_json allows for JSON text.
const MAX_DEPTH: usize = 128;

/// The `type`s of [`DeviceFrame`], as [`DeviceFrame::kind`] names them.
const DEVICE_FRAME_TYPES: &[&str] = &[
    "hello",
    "heartbeat",
    "telemetry",
    "event",
    "command_result",
    "reported",
    "ota_status",
    "ping",
];

/// What a device sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceFrame {
    /// The first frame of a connection: what the device runs.
    Hello {
        /// The firmware version.
        firmware: String,
        /// The partition or slot it booted from (`ota_0`, `a`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partition: Option<String>,
        /// Why it last reset (`power_on`, `watchdog`, `panic`, …), as the platform says it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reset_reason: Option<String>,
        /// What the firmware can do (`thermal`, `ota`, …).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        capabilities: Vec<String>,
        /// Its anti-rollback version (the eFuse `secure_version` on an ESP32): a deployment
        /// never offers an image below it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secure_version: Option<u32>,
    },
    /// Vital signs. Fields this version does not know are ignored, so newer firmware can
    /// send more; a reading that is not a finite number (JSON `null`, MessagePack NaN) is
    /// taken as absent.
    Heartbeat {
        /// Seconds since boot.
        uptime: u64,
        /// Radio signal strength, dBm.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rssi: Option<i32>,
        /// Free heap, bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        free_heap: Option<u64>,
        /// Battery charge, percent.
        #[serde(
            default,
            deserialize_with = "finite_or_none",
            skip_serializing_if = "Option::is_none"
        )]
        battery: Option<f64>,
        /// Temperature, °C.
        #[serde(
            default,
            deserialize_with = "finite_or_none",
            skip_serializing_if = "Option::is_none"
        )]
        temperature: Option<f64>,
    },
    /// A batch of readings; the server answers `ack {seq}` once the batch is durable.
    Telemetry {
        /// The batch's number: a device never uses one seq for two different batches.
        seq: u64,
        /// The readings.
        points: Vec<Point>,
    },
    /// Something happened (a button, an alarm, a boot). Not acknowledged.
    Event {
        /// What kind of thing.
        kind: String,
        /// Anything about it (JSON; `null` when absent).
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        data: serde_json::Value,
    },
    /// How a `command` ended.
    CommandResult {
        /// The command's id.
        id: String,
        /// Whether it worked.
        status: CommandStatus,
        /// What it returned, or why it failed (JSON).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<serde_json::Value>,
    },
    /// The device's configuration as it is now.
    Reported {
        /// The `version` of the last `config` it applied; absent when it applied none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        /// The whole configuration, key → JSON value.
        state: BTreeMap<String, serde_json::Value>,
    },
    /// Where a firmware update offered by a deployment stands on the device.
    OtaStatus {
        /// The deployment (the `deployment` of the `ota.update` command's params).
        deployment: String,
        /// What the device is doing.
        state: OtaState,
        /// The download's progress, 0 to 100.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<u8>,
        /// Why it failed or rolled back (`bad_signature`, `self_test`, …).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Keep-alive; answered with `pong`.
    Ping,
}

/// The states of an update a device reports in `ota_status`. The server itself marks a device
/// `confirmed` (or `rolled_back`) from the `hello` after its reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtaState {
    /// Downloading (with `progress`).
    Downloading,
    /// Downloaded whole.
    Downloaded,
    /// Checking the signature and the SHA-256.
    Verifying,
    /// Writing it and switching the boot partition.
    Installing,
    /// About to restart into it.
    Rebooting,
    /// Given up (with `reason`).
    Failed,
    /// Came back on the old image (with `reason`, such as `self_test`).
    RolledBack,
}

impl OtaState {
    /// Its name in frames and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Downloaded => "downloaded",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Rebooting => "rebooting",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }
}

impl DeviceFrame {
    /// The `type` of the frame, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Heartbeat { .. } => "heartbeat",
            Self::Telemetry { .. } => "telemetry",
            Self::Event { .. } => "event",
            Self::CommandResult { .. } => "command_result",
            Self::Reported { .. } => "reported",
            Self::OtaStatus { .. } => "ota_status",
            Self::Ping => "ping",
        }
    }

    /// The frame as JSON text (arrays' `data` as numbers).
    pub fn to_json(&self) -> String {
        to_json(self)
    }

    /// The frame in MessagePack: named maps, arrays' `data` as `bin`.
    pub fn to_msgpack(&self) -> Vec<u8> {
        to_msgpack(self)
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// It did what was asked.
    Succeeded,
    /// It did not (unknown command, bad params, the hardware said no).
    Failed,
}

/// One reading of a telemetry batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// When it was read, Unix milliseconds; absent, the server's receive time counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// What was read (see [`valid_telemetry_key`]; the server checks it).
    pub key: String,
    /// The reading.
    pub value: Value,
}

/// A reading: a number, a bool, a string or an array.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A finite number.
    Number(f64),
    /// A bool.
    Bool(bool),
    /// A string.
    Text(String),
    /// A vector or matrix of numbers, such as a thermal camera's frame.
    Array(ArrayValue),
}

impl Value {
    /// The size of the reading itself, in bytes: 8 for a number, 1 for a bool, a string's
    /// UTF-8 length, an array's packed data. Cheap; what the server's limits count.
    pub fn byte_len(&self) -> usize {
        match self {
            Self::Number(_) => 8,
            Self::Bool(_) => 1,
            Self::Text(text) => text.len(),
            Self::Array(array) => array.byte_len(),
        }
    }
}

/// The element type of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit signed integer.
    I16,
    /// 16-bit unsigned integer.
    U16,
}

impl Dtype {
    /// The wire name: `f32`, `i16`, `u16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::I16 => "i16",
            Self::U16 => "u16",
        }
    }

    /// The dtype of a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(Self::F32),
            "i16" => Some(Self::I16),
            "u16" => Some(Self::U16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::I16 | Self::U16 => 2,
        }
    }
}

/// A vector (`shape: [n]`) or a row-major matrix (`shape: [rows, columns]`) of numbers, held
/// packed little-endian whichever form it came in. It always holds what its shape says: one or
/// two dimensions, none of them 0, `shape × dtype` bytes of data, and finite f32 values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayValue {
    shape: Vec<u32>,
    dtype: Dtype,
    data: Vec<u8>,
}

impl ArrayValue {
    /// An array from packed little-endian data; the codes are those of `docs/protocol.md`
    /// (`invalid_shape`, `array_length_mismatch`, `invalid_field` for a non-finite f32).
    pub fn new(shape: Vec<u32>, dtype: Dtype, data: Vec<u8>) -> Result<Self, FrameError> {
        Self::from_wire(shape, dtype, WireData::Packed(data))
    }

    /// An f32 array from its values, row-major.
    pub fn from_f32(shape: Vec<u32>, values: &[f32]) -> Result<Self, FrameError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(shape, Dtype::F32, data)
    }

    fn from_wire(shape: Vec<u32>, dtype: Dtype, data: WireData) -> Result<Self, FrameError> {
        if shape.is_empty() || shape.len() > 2 || shape.contains(&0) {
            return Err(FrameError {
                code: "invalid_shape",
                message: format!(
                    "`shape` is [n] or [rows, columns] of positive integers, not {shape:?}"
                ),
            });
        }
        // In u64: the SDK also runs where usize has 32 bits.
        let count: u64 = shape.iter().map(|&d| u64::from(d)).product();
        let byte_count = count.saturating_mul(dtype.size() as u64);
        let mismatch = |found: String| FrameError {
            code: "array_length_mismatch",
            message: format!(
                "shape {shape:?} of {} needs {count} values ({byte_count} bytes); `data` has {found}",
                dtype.as_str(),
            ),
        };
        let data = match data {
            WireData::Packed(bytes) => {
                if bytes.len() as u64 != byte_count {
                    return Err(mismatch(format!("{} bytes", bytes.len())));
                }
                if dtype == Dtype::F32
                    && let Some(at) = bytes
                        .chunks_exact(4)
                        .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                {
                    return Err(invalid_element(at, dtype));
                }
                bytes
            }
            WireData::Numbers(numbers) => {
                if numbers.len() as u64 != count {
                    return Err(mismatch(format!("{} values", numbers.len())));
                }
                pack(&numbers, dtype)?
            }
        };
        Ok(Self { shape, dtype, data })
    }

    /// `[n]` or `[rows, columns]`.
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The packed little-endian data, row-major.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Always `false`: no dimension is 0.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The size of the packed data, in bytes.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// The elements as f32, row-major (exact for every dtype).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::I16 => self
                .data
                .chunks_exact(2)
                .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::U16 => self
                .data
                .chunks_exact(2)
                .map(|c| f32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        }
    }
}

/// An array's `data` as it came: numbers (JSON, or a MessagePack array) or a MessagePack `bin`.
enum WireData {
    Numbers(Vec<f64>),
    Packed(Vec<u8>),
}

fn invalid_element(at: usize, dtype: Dtype) -> FrameError {
    FrameError {
        code: "invalid_field",
        message: format!(
            "element {at} of `data` is not a finite {} value",
            dtype.as_str()
        ),
    }
}

fn pack(numbers: &[f64], dtype: Dtype) -> Result<Vec<u8>, FrameError> {
    let mut data = Vec::with_capacity(numbers.len() * dtype.size());
    for (at, &n) in numbers.iter().enumerate() {
        let integral = n.fract() == 0.0;
        match dtype {
            Dtype::F32 if (n as f32).is_finite() => {
                data.extend_from_slice(&(n as f32).to_le_bytes());
            }
            Dtype::I16 if integral && (f64::from(i16::MIN)..=f64::from(i16::MAX)).contains(&n) => {
                data.extend_from_slice(&(n as i16).to_le_bytes());
            }
            Dtype::U16 if integral && (0.0..=f64::from(u16::MAX)).contains(&n) => {
                data.extend_from_slice(&(n as u16).to_le_bytes());
            }
            _ => return Err(invalid_element(at, dtype)),
        }
    }
    Ok(data)
}

impl Serialize for ArrayValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // JSON gets numbers; MessagePack (not human-readable) gets the packed bytes as `bin`.
        let human = serializer.is_human_readable();
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("shape", &self.shape)?;
        map.serialize_entry("dtype", &self.dtype)?;
        if human {
            map.serialize_entry("data", &Numbers(self))?;
        } else {
            map.serialize_entry("data", &Packed(&self.data))?;
        }
        map.end()
    }
}

struct Numbers<'a>(&'a ArrayValue);

impl Serialize for Numbers<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let array = self.0;
        let mut seq = serializer.serialize_seq(Some(array.len()))?;
        match array.dtype {
            Dtype::F32 => {
                for v in array.to_f32_vec() {
                    seq.serialize_element(&v)?;
                }
            }
            Dtype::I16 => {
                for c in array.data.chunks_exact(2) {
                    seq.serialize_element(&i16::from_le_bytes([c[0], c[1]]))?;
                }
            }
            Dtype::U16 => {
                for c in array.data.chunks_exact(2) {
                    seq.serialize_element(&u16::from_le_bytes([c[0], c[1]]))?;
                }
            }
        }
        seq.end()
    }
}

struct Packed<'a>(&'a [u8]);

impl Serialize for Packed<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(n) => serializer.serialize_f64(*n),
            Self::Bool(b) => serializer.serialize_bool(*b),
            Self::Text(text) => serializer.serialize_str(text),
            Self::Array(array) => array.serialize(serializer),
        }
    }
}

/// Whether a telemetry key (or an event kind) has the syntax the server accepts: 1–64
/// characters of `A–Z a–z 0–9 _ . : / -`, the first a letter or a digit.
pub fn valid_telemetry_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
}

/// What the server sends to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceServerFrame {
    /// The connection is ready: who the server thinks the device is.
    Welcome {
        /// The connection's id.
        connection: String,
        /// The device's id.
        device: String,
    },
    /// A telemetry batch is durable.
    Ack {
        /// The batch's `seq`.
        seq: u64,
        /// The batch was stored before (a retry): it was not stored again.
        #[serde(default, skip_serializing_if = "is_false")]
        duplicate: bool,
    },
    /// Something to do; answered with `command_result`.
    Command {
        /// The command's id (the device dedupes on it: a command may come more than once).
        id: String,
        /// What to do (`reboot`, `set_interval`, …).
        name: String,
        /// Its arguments (JSON).
        params: serde_json::Value,
        /// Do not start it after this, Unix milliseconds.
        expires_at: i64,
    },
    /// The configuration the device should have.
    Config {
        /// The desired configuration's version; increases with every change.
        version: u64,
        /// Key → JSON value: all of it (`full`), or only the keys that differ from what the
        /// device reported, where `null` means "no longer set, back to the default".
        desired: BTreeMap<String, serde_json::Value>,
        /// Whether `desired` is the whole configuration rather than a difference.
        full: bool,
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
        /// What the error is about: a telemetry batch's `seq` (as text) or a command's `id`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
    },
    /// The answer to `ping`.
    Pong,
}

impl DeviceServerFrame {
    /// An `error` frame.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
            reference: None,
        }
    }

    /// The `error` frame of a refused device frame; `reference` from [`device_frame_ref`].
    pub fn refused(error: FrameError, reference: Option<String>) -> Self {
        Self::Error {
            code: error.code.to_owned(),
            message: error.message,
            retry_after: None,
            reference,
        }
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        to_json(self)
    }

    /// The frame in MessagePack: a map with the same keys as the JSON object.
    pub fn to_msgpack(&self) -> Vec<u8> {
        to_msgpack(self)
    }

    /// The `type` of the frame, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::Ack { .. } => "ack",
            Self::Command { .. } => "command",
            Self::Config { .. } => "config",
            Self::Error { .. } => "error",
            Self::Pong => "pong",
        }
    }
}

fn to_json(frame: &impl Serialize) -> String {
    // A frame is plain data with string keys: serialising it cannot fail.
    serde_json::to_string(frame).unwrap_or_else(|_| {
        String::from(r#"{"type":"error","code":"internal","message":"encoding failed"}"#)
    })
}

fn to_msgpack(frame: &impl Serialize) -> Vec<u8> {
    // Named fields, so that the map is what the JSON object is.
    rmp_serde::to_vec_named(frame).unwrap_or_default()
}

/// Parses a device's text frame.
pub fn parse_device_frame(text: &str) -> Result<DeviceFrame, FrameError> {
    let outline = serde_json::from_str(text).map_err(|e| FrameError {
        code: "invalid_json",
        message: format!("the frame is not JSON: {e}"),
    })?;
    check_outline(outline)?;
    serde_json::from_str(text).map_err(|e| refused(e.to_string()))
}

/// Parses a device's binary frame on the MessagePack subprotocol: a map with the keys of the
/// JSON object (where an array's `data` may also be a `bin`), with the same error codes.
pub fn parse_device_frame_msgpack(bytes: &[u8]) -> Result<DeviceFrame, FrameError> {
    let outline = msgpack_outline(bytes)?;
    check_outline(outline)?;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    DeviceFrame::deserialize(&mut de).map_err(|e| refused(e.to_string()))
}

/// What a refused text frame was about, for the `ref` of its `error`: a telemetry batch's
/// `seq` (as text) or a command result's `id`, when they can be read. So a device can drop the
/// one batch the server will never take, rather than retry it forever.
pub fn device_frame_ref(text: &str) -> Option<String> {
    serde_json::from_str(text).ok().and_then(outline_ref)
}

/// [`device_frame_ref`] for a MessagePack frame.
pub fn device_frame_ref_msgpack(bytes: &[u8]) -> Option<String> {
    msgpack_outline(bytes).ok().and_then(outline_ref)
}

fn msgpack_outline(bytes: &[u8]) -> Result<Outline, FrameError> {
    let invalid = |message: String| FrameError {
        code: "invalid_msgpack",
        message: format!("the frame is not MessagePack: {message}"),
    };
    let mut de = rmp_serde::Deserializer::new(Cursor::new(bytes));
    de.set_max_depth(MAX_DEPTH);
    let outline = Outline::deserialize(&mut de).map_err(|e| invalid(e.to_string()))?;
    // One frame per WebSocket message: bytes after it would be a second frame, silently lost.
    if de.position() != bytes.len() as u64 {
        return Err(invalid(format!(
            "{} bytes follow the frame",
            bytes.len() as u64 - de.position()
        )));
    }
    Ok(outline)
}

fn check_outline(outline: Outline) -> Result<(), FrameError> {
    let Outline::Map { kind, .. } = outline else {
        return Err(FrameError {
            code: "not_an_object",
            message: "a frame is an object (a map) with a `type`".into(),
        });
    };
    match kind.as_deref() {
        None => Err(FrameError {
            code: "missing_type",
            message: "the frame has no `type`".into(),
        }),
        Some(Outline::Text(kind)) if DEVICE_FRAME_TYPES.contains(&kind.as_str()) => Ok(()),
        Some(Outline::Text(kind)) => Err(FrameError {
            code: "unknown_type",
            message: format!(
                "unknown type `{kind}`, expected one of {}",
                DEVICE_FRAME_TYPES.join(", ")
            ),
        }),
        Some(_) => Err(FrameError {
            code: "invalid_field",
            message: "`type` must be a string".into(),
        }),
    }
}

fn outline_ref(outline: Outline) -> Option<String> {
    let Outline::Map { kind, seq, id } = outline else {
        return None;
    };
    match (kind.as_deref(), seq.as_deref(), id.as_deref()) {
        (Some(Outline::Text(k)), Some(Outline::Unsigned(seq)), _) if k == "telemetry" => {
            Some(seq.to_string())
        }
        (Some(Outline::Text(k)), _, Some(Outline::Text(id))) if k == "command_result" => {
            Some(id.clone())
        }
        _ => None,
    }
}

/// The codes the deserializers below carry in a message (`"<code>: <text>"`), since serde's
/// errors are text. Serde's own messages never begin this way.
const CARRIED_CODES: &[&str] = &[
    "invalid_shape",
    "invalid_dtype",
    "array_length_mismatch",
    "invalid_field",
];

fn carry<E: de::Error>(code: &str, message: impl fmt::Display) -> E {
    E::custom(format!("{code}: {message}"))
}

/// The refusal of a frame whose outline was fine: a code carried in the message, a missing
/// field, or else a field of the wrong type or value. (A `type` is known by now, so an "unknown
/// variant" here is a field's, such as `status`.)
fn refused(message: String) -> FrameError {
    for &code in CARRIED_CODES {
        if let Some(rest) = message
            .strip_prefix(code)
            .and_then(|rest| rest.strip_prefix(": "))
        {
            return FrameError {
                code,
                message: rest.to_owned(),
            };
        }
    }
    let code = if message.starts_with("missing field") {
        "missing_field"
    } else {
        "invalid_field"
    };
    FrameError { code, message }
}

/// The first pass over a frame: whether it is a map, and its `type`, `seq` and `id` when they
/// are strings or unsigned integers. Anything else is skipped without being kept.
enum Outline {
    Map {
        kind: Option<Box<Outline>>,
        seq: Option<Box<Outline>>,
        id: Option<Box<Outline>>,
    },
    Text(String),
    Unsigned(u64),
    Other,
}

impl<'de> Deserialize<'de> for Outline {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OutlineVisitor)
    }
}

struct OutlineVisitor;

impl<'de> Visitor<'de> for OutlineVisitor {
    type Value = Outline;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Outline, E> {
        Ok(Outline::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Outline, E> {
        Ok(Outline::Other)
    }

    fn visit_u64<E>(self, v: u64) -> Result<Outline, E> {
        Ok(Outline::Unsigned(v))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Outline, E> {
        Ok(Outline::Other)
    }

    fn visit_str<E>(self, v: &str) -> Result<Outline, E> {
        Ok(Outline::Text(v.to_owned()))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Outline, E> {
        // Serde's derived identifiers take UTF-8 bytes as names, and so does the outline.
        Ok(std::str::from_utf8(v).map_or(Outline::Other, |s| Outline::Text(s.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Outline, E> {
        Ok(Outline::Other)
    }

    fn visit_none<E>(self) -> Result<Outline, E> {
        Ok(Outline::Other)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Outline, D::Error> {
        Skip::deserialize(d).map(|_| Outline::Other)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Outline, D::Error> {
        // A MessagePack extension type.
        Skip::deserialize(d).map(|_| Outline::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Outline, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Outline::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Outline, A::Error> {
        let (mut kind, mut seq, mut id) = (None, None, None);
        while let Some(key) = map.next_key::<Outline>()? {
            let slot = match &key {
                Outline::Text(k) if k == "type" => &mut kind,
                Outline::Text(k) if k == "seq" => &mut seq,
                Outline::Text(k) if k == "id" => &mut id,
                _ => {
                    map.next_value::<Skip>()?;
                    continue;
                }
            };
            *slot = Some(Box::new(map.next_value::<Outline>()?));
        }
        Ok(Outline::Map { kind, seq, id })
    }
}

/// Skips a value of the first pass. Unlike `IgnoredAny`, it descends through the format's
/// `deserialize_any`, so serde_json's nesting limit refuses a too deep frame here, as
/// `invalid_json`, rather than in the second pass.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_bytes<E>(self, _: &[u8]) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_none<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Skip, D::Error> {
        Skip::deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Skip, D::Error> {
        Skip::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// A heartbeat reading: JSON `null` and non-finite numbers are absent.
fn finite_or_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.filter(|v| v.is_finite()))
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum PointField {
    Ts,
    Key,
    Value,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Point {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // By hand rather than derived: a derived struct would also take a positional array.
        deserializer.deserialize_map(PointVisitor)
    }
}

struct PointVisitor;

impl<'de> Visitor<'de> for PointVisitor {
    type Value = Point;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a point {ts?, key, value}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Point, A::Error> {
        let (mut ts, mut key, mut value) = (None, None, None);
        while let Some(field) = map.next_key::<PointField>()? {
            match field {
                PointField::Ts => once(&mut ts, "ts", map.next_value::<Option<i64>>()?)?,
                PointField::Key => once(&mut key, "key", map.next_value::<String>()?)?,
                PointField::Value => once(&mut value, "value", map.next_value::<Value>()?)?,
                PointField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Point {
            ts: ts.flatten(),
            key: key.ok_or_else(|| de::Error::missing_field("key"))?,
            value: value.ok_or_else(|| de::Error::missing_field("value"))?,
        })
    }
}

fn once<T, E: de::Error>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(value);
    Ok(())
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, a bool, a string or an array {shape, dtype, data}")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v as f64))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v as f64))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        if v.is_finite() {
            Ok(Value::Number(v))
        } else {
            Err(E::custom("a number value must be finite"))
        }
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let (mut shape, mut dtype, mut data) = (None, None, None);
        while let Some(field) = map.next_key::<ArrayField>()? {
            match field {
                ArrayField::Shape => {
                    let value = map
                        .next_value::<Vec<u32>>()
                        .map_err(|e| carry("invalid_shape", format!("`shape`: {e}")))?;
                    once(&mut shape, "shape", value)?;
                }
                ArrayField::Dtype => {
                    let name = map
                        .next_value::<String>()
                        .map_err(|e| carry("invalid_dtype", format!("`dtype`: {e}")))?;
                    let value = Dtype::parse(&name).ok_or_else(|| {
                        carry(
                            "invalid_dtype",
                            format!("`dtype` is f32, i16 or u16, not `{name}`"),
                        )
                    })?;
                    once(&mut dtype, "dtype", value)?;
                }
                ArrayField::Data => once(&mut data, "data", map.next_value::<DataField>()?.0)?,
                ArrayField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let missing = |name| {
            de::Error::custom(format!(
                "missing field `{name}` (an object value is an array {{shape, dtype, data}})"
            ))
        };
        let shape = shape.ok_or_else(|| missing("shape"))?;
        let dtype = dtype.ok_or_else(|| missing("dtype"))?;
        let data = data.ok_or_else(|| missing("data"))?;
        ArrayValue::from_wire(shape, dtype, data)
            .map(Value::Array)
            .map_err(|e| carry(e.code, e.message))
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ArrayField {
    Shape,
    Dtype,
    Data,
    #[serde(other)]
    Other,
}

/// An array's `data`: numbers, or a MessagePack `bin`.
struct DataField(WireData);

impl<'de> Deserialize<'de> for DataField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DataVisitor)
    }
}

struct DataVisitor;

impl<'de> Visitor<'de> for DataVisitor {
    type Value = DataField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers or a MessagePack bin")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DataField, A::Error> {
        // The hint comes from the peer: trust it only so far.
        let mut numbers = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(n) = seq.next_element::<f64>()? {
            numbers.push(n);
        }
        Ok(DataField(WireData::Numbers(numbers)))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<DataField, E> {
        Ok(DataField(WireData::Packed(v.to_vec())))
    }

    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<DataField, E> {
        Ok(DataField(WireData::Packed(v)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The MessagePack form of a JSON text, as a device's encoder would write it.
    fn msgpack(json: &str) -> Vec<u8> {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        rmp_serde::to_vec_named(&value).unwrap()
    }

    /// A MessagePack value written by hand, for what JSON cannot say (`bin`, NaN).
    #[derive(Serialize)]
    #[serde(untagged)]
    enum M {
        S(&'static str),
        U(u64),
        F(f64),
        Bin(Bin),
        A(Vec<M>),
        O(BTreeMap<&'static str, M>),
    }

    struct Bin(Vec<u8>);

    impl Serialize for Bin {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }

    fn obj(pairs: Vec<(&'static str, M)>) -> M {
        M::O(pairs.into_iter().collect())
    }

    fn packed(m: &M) -> Vec<u8> {
        rmp_serde::to_vec_named(m).unwrap()
    }

    /// A telemetry frame of one point whose value is `value`.
    fn telemetry_with(value: M) -> Vec<u8> {
        packed(&obj(vec![
            ("type", M::S("telemetry")),
            ("seq", M::U(1)),
            (
                "points",
                M::A(vec![obj(vec![("key", M::S("k")), ("value", value)])]),
            ),
        ]))
    }

    fn array(shape: Vec<u64>, dtype: &'static str, data: M) -> M {
        obj(vec![
            ("shape", M::A(shape.into_iter().map(M::U).collect())),
            ("dtype", M::S(dtype)),
            ("data", data),
        ])
    }

    fn only_value(frame: &DeviceFrame) -> &Value {
        let DeviceFrame::Telemetry { points, .. } = frame else {
            panic!("not telemetry: {frame:?}");
        };
        &points[0].value
    }

    #[test]
    fn every_device_frame_parses_from_json_and_msgpack() {
        let cases = [
            r#"{"type":"hello","firmware":"1.4.2"}"#,
            r#"{"type":"hello","firmware":"1.4.2","partition":"ota_1","reset_reason":"watchdog","capabilities":["thermal","ota"]}"#,
            r#"{"type":"heartbeat","uptime":3600}"#,
            r#"{"type":"heartbeat","uptime":3600,"rssi":-67,"free_heap":81234,"battery":87.5,"temperature":41.2}"#,
            r#"{"type":"telemetry","seq":0,"points":[]}"#,
            r#"{"type":"telemetry","seq":42,"points":[
                {"ts":1767225600000,"key":"temperature","value":21.5},
                {"key":"door.open","value":false},
                {"key":"status","value":"ok"},
                {"key":"count","value":7},
                {"key":"thermal","value":{"shape":[2,3],"dtype":"f32","data":[20.5,21,21.25,-3,0,1e10]}},
                {"key":"adc","value":{"shape":[3],"dtype":"i16","data":[-32768,0,32767]}},
                {"key":"raw","value":{"shape":[1,2],"dtype":"u16","data":[0,65535]}}]}"#,
            r#"{"type":"event","kind":"button"}"#,
            r#"{"type":"event","kind":"alarm","data":{"zone":3,"armed":true}}"#,
            r#"{"type":"command_result","id":"c1","status":"succeeded"}"#,
            r#"{"type":"command_result","id":"c2","status":"failed","output":{"error":"busy"}}"#,
            r#"{"type":"reported","state":{}}"#,
            r#"{"type":"reported","version":3,"state":{"interval":60,"led":"on"}}"#,
            r#"{"type":"ota_status","deployment":"d1","state":"downloading","progress":40}"#,
            r#"{"type":"ota_status","deployment":"d1","state":"rolled_back","reason":"self_test"}"#,
            r#"{"type":"hello","firmware":"2.0.0","partition":"ota_1","secure_version":2}"#,
            r#"{"type":"ping"}"#,
        ];
        let mut kinds = BTreeSet::new();
        for text in cases {
            let frame = parse_device_frame(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            let from_msgpack = parse_device_frame_msgpack(&msgpack(text))
                .unwrap_or_else(|e| panic!("{text} as MessagePack: {e:?}"));
            assert_eq!(from_msgpack, frame, "{text}");
            // What the SDK writes reads back as the same frame, in both formats.
            assert_eq!(parse_device_frame(&frame.to_json()).unwrap(), frame);
            assert_eq!(
                parse_device_frame_msgpack(&frame.to_msgpack()).unwrap(),
                frame
            );
            kinds.insert(frame.kind());
        }
        assert_eq!(kinds, DEVICE_FRAME_TYPES.iter().copied().collect());
    }

    #[test]
    fn fields_read_as_documented() {
        let hello = parse_device_frame(r#"{"type":"hello","firmware":"1.0"}"#).unwrap();
        assert_eq!(
            hello,
            DeviceFrame::Hello {
                firmware: "1.0".into(),
                partition: None,
                reset_reason: None,
                capabilities: vec![],
                secure_version: None,
            }
        );
        // Forward compatibility: fields a newer firmware adds are ignored; a failed sensor's
        // `null` is an absent reading.
        let heartbeat = parse_device_frame(
            r#"{"type":"heartbeat","uptime":5,"cpu_load":0.3,"temperature":null,"wifi":{"ch":6}}"#,
        )
        .unwrap();
        assert_eq!(
            heartbeat,
            DeviceFrame::Heartbeat {
                uptime: 5,
                rssi: None,
                free_heap: None,
                battery: None,
                temperature: None,
            }
        );
        let telemetry = parse_device_frame(
            r#"{"type":"telemetry","seq":9,"points":[
                {"ts":5,"key":"t","value":21.5,"unit":"C"},
                {"key":"b","value":true},
                {"key":"s","value":"ok"},
                {"key":"a","value":{"shape":[2,2],"dtype":"u16","data":[1,2,3,4],"unit":"raw"}}]}"#,
        )
        .unwrap();
        let DeviceFrame::Telemetry { seq, points } = telemetry else {
            panic!("{telemetry:?}");
        };
        assert_eq!(seq, 9);
        assert_eq!(points[0].ts, Some(5));
        assert_eq!(points[0].value, Value::Number(21.5));
        assert_eq!(points[1].ts, None);
        assert_eq!(points[1].value, Value::Bool(true));
        assert_eq!(points[2].value, Value::Text("ok".into()));
        let Value::Array(array) = &points[3].value else {
            panic!("{:?}", points[3]);
        };
        assert_eq!(array.shape(), &[2, 2]);
        assert_eq!(array.dtype(), Dtype::U16);
        assert_eq!(array.data(), &[1, 0, 2, 0, 3, 0, 4, 0]);
        assert_eq!(array.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        let event = parse_device_frame(r#"{"type":"event","kind":"boot"}"#).unwrap();
        assert_eq!(
            event,
            DeviceFrame::Event {
                kind: "boot".into(),
                data: serde_json::Value::Null,
            }
        );
        let result = parse_device_frame(
            r#"{"type":"command_result","id":"c","status":"failed","output":"no"}"#,
        )
        .unwrap();
        assert_eq!(
            result,
            DeviceFrame::CommandResult {
                id: "c".into(),
                status: CommandStatus::Failed,
                output: Some("no".into()),
            }
        );
    }

    #[test]
    fn malformed_device_frames_get_stable_codes() {
        // A telemetry frame of one point whose value is `json`.
        let value = |json: &str| {
            format!(r#"{{"type":"telemetry","seq":1,"points":[{{"key":"k","value":{json}}}]}}"#)
        };
        let cases = [
            ("[1,2]".to_owned(), "not_an_object"),
            ("\"ping\"".to_owned(), "not_an_object"),
            ("7".to_owned(), "not_an_object"),
            (r#"{"seq":1}"#.to_owned(), "missing_type"),
            (r#"{"type":5}"#.to_owned(), "invalid_field"),
            (r#"{"type":null}"#.to_owned(), "invalid_field"),
            (r#"{"type":"dance"}"#.to_owned(), "unknown_type"),
            // A chat frame is not a device frame.
            (r#"{"type":"join","room":"r"}"#.to_owned(), "unknown_type"),
            (r#"{"type":"hello"}"#.to_owned(), "missing_field"),
            (
                r#"{"type":"hello","firmware":5}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"hello","firmware":"1","capabilities":"ota"}"#.to_owned(),
                "invalid_field",
            ),
            (r#"{"type":"heartbeat"}"#.to_owned(), "missing_field"),
            (
                r#"{"type":"heartbeat","uptime":-1}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"heartbeat","uptime":1,"rssi":"strong"}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"telemetry","points":[]}"#.to_owned(),
                "missing_field",
            ),
            (
                r#"{"type":"telemetry","seq":1}"#.to_owned(),
                "missing_field",
            ),
            (
                r#"{"type":"telemetry","seq":1,"points":{}}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"telemetry","seq":1,"points":[{"value":1}]}"#.to_owned(),
                "missing_field",
            ),
            (
                r#"{"type":"telemetry","seq":1,"points":[{"key":"k"}]}"#.to_owned(),
                "missing_field",
            ),
            (value("null"), "invalid_field"),
            (value("[1,2]"), "invalid_field"),
            // Points are objects, never positional arrays.
            (
                r#"{"type":"telemetry","seq":1,"points":[[null,"k",1]]}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"telemetry","seq":1,"points":[{"ts":"now","key":"k","value":1}]}"#
                    .to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"telemetry","seq":1,"points":[{"key":7,"value":1}]}"#.to_owned(),
                "invalid_field",
            ),
            (value(r#"{"dtype":"f32","data":[1]}"#), "missing_field"),
            (value(r#"{"shape":[1],"data":[1]}"#), "missing_field"),
            (value(r#"{"shape":[1],"dtype":"f32"}"#), "missing_field"),
            (
                value(r#"{"shape":[],"dtype":"f32","data":[]}"#),
                "invalid_shape",
            ),
            (
                value(r#"{"shape":[1,1,1],"dtype":"f32","data":[1]}"#),
                "invalid_shape",
            ),
            (
                value(r#"{"shape":[0],"dtype":"f32","data":[]}"#),
                "invalid_shape",
            ),
            (
                value(r#"{"shape":[-1],"dtype":"f32","data":[1]}"#),
                "invalid_shape",
            ),
            (
                value(r#"{"shape":"2x2","dtype":"f32","data":[1]}"#),
                "invalid_shape",
            ),
            (
                value(r#"{"shape":[1],"dtype":"f64","data":[1]}"#),
                "invalid_dtype",
            ),
            (
                value(r#"{"shape":[1],"dtype":32,"data":[1]}"#),
                "invalid_dtype",
            ),
            (
                value(r#"{"shape":[2,2],"dtype":"f32","data":[1,2,3]}"#),
                "array_length_mismatch",
            ),
            (
                value(r#"{"shape":[2],"dtype":"f32","data":[1,"x"]}"#),
                "invalid_field",
            ),
            (
                value(r#"{"shape":[1],"dtype":"i16","data":[1.5]}"#),
                "invalid_field",
            ),
            (
                value(r#"{"shape":[1],"dtype":"i16","data":[40000]}"#),
                "invalid_field",
            ),
            (
                value(r#"{"shape":[1],"dtype":"u16","data":[-1]}"#),
                "invalid_field",
            ),
            (
                value(r#"{"shape":[1],"dtype":"f32","data":[1e39]}"#),
                "invalid_field",
            ),
            (
                value(r#"{"shape":[1],"dtype":"f32","data":"AACAPw=="}"#),
                "invalid_field",
            ),
            (r#"{"type":"event"}"#.to_owned(), "missing_field"),
            (
                r#"{"type":"event","kind":["a"]}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"command_result","status":"failed"}"#.to_owned(),
                "missing_field",
            ),
            (
                r#"{"type":"command_result","id":"c"}"#.to_owned(),
                "missing_field",
            ),
            // An unknown value of a field is not an unknown frame type.
            (
                r#"{"type":"command_result","id":"c","status":"done"}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"reported","version":1}"#.to_owned(),
                "missing_field",
            ),
            (
                r#"{"type":"reported","state":[1]}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"type":"reported","version":-1,"state":{}}"#.to_owned(),
                "invalid_field",
            ),
        ];
        for (text, code) in cases {
            let err = parse_device_frame(&text).unwrap_err();
            assert_eq!(err.code, code, "{text}: {}", err.message);
            let err = parse_device_frame_msgpack(&msgpack(&text)).unwrap_err();
            assert_eq!(err.code, code, "{text} as MessagePack: {}", err.message);
        }
        // What only JSON text can get wrong.
        for text in [
            "",
            "nope",
            r#"{"type":"ping"} {"type":"ping"}"#,
            r#"{"type":"ping""#,
        ] {
            assert_eq!(parse_device_frame(text).unwrap_err().code, "invalid_json");
        }
        let duplicate =
            r#"{"type":"telemetry","seq":1,"points":[{"key":"a","key":"b","value":1}]}"#;
        assert_eq!(
            parse_device_frame(duplicate).unwrap_err().code,
            "invalid_field"
        );
    }

    #[test]
    fn malformed_msgpack_gets_stable_codes() {
        let ping = msgpack(r#"{"type":"ping"}"#);
        let mut trailing = ping.clone();
        trailing.push(0xc0);
        let positional = rmp_serde::to_vec(&("ping",)).unwrap();
        let nan = telemetry_with(M::F(f64::NAN));
        let bin_scalar = telemetry_with(M::Bin(Bin(vec![1, 2])));
        let short_bin = telemetry_with(array(vec![2, 2], "f32", M::Bin(Bin(vec![0; 15]))));
        let odd_bin = telemetry_with(array(vec![3], "i16", M::Bin(Bin(vec![0; 5]))));
        let nan_bin = telemetry_with(array(
            vec![2],
            "f32",
            M::Bin(Bin([1.0f32, f32::NAN]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect())),
        ));
        let mut deep = M::U(1);
        for _ in 0..200 {
            deep = M::A(vec![deep]);
        }
        let deep = packed(&obj(vec![
            ("type", M::S("event")),
            ("kind", M::S("k")),
            ("data", deep),
        ]));
        let cases: [(&[u8], &str); 10] = [
            (b"", "invalid_msgpack"),
            (b"\xc1", "invalid_msgpack"),
            (&ping[..ping.len() - 1], "invalid_msgpack"),
            (&trailing, "invalid_msgpack"),
            (&deep, "invalid_msgpack"),
            (&positional, "not_an_object"),
            (&nan, "invalid_field"),
            (&bin_scalar, "invalid_field"),
            (&short_bin, "array_length_mismatch"),
            (&odd_bin, "array_length_mismatch"),
        ];
        for (bytes, code) in cases {
            let err = parse_device_frame_msgpack(bytes).unwrap_err();
            assert_eq!(err.code, code, "{bytes:x?}: {}", err.message);
        }
        let err = parse_device_frame_msgpack(&nan_bin).unwrap_err();
        assert_eq!(err.code, "invalid_field", "{}", err.message);
        assert!(err.message.contains("element 1"), "{}", err.message);
        // A failed sensor's NaN in a heartbeat is an absent reading, as JSON's null is.
        let heartbeat = packed(&obj(vec![
            ("type", M::S("heartbeat")),
            ("uptime", M::U(1)),
            ("temperature", M::F(f64::NAN)),
        ]));
        assert_eq!(
            parse_device_frame_msgpack(&heartbeat).unwrap(),
            DeviceFrame::Heartbeat {
                uptime: 1,
                rssi: None,
                free_heap: None,
                battery: None,
                temperature: None,
            }
        );
        // Where a string belongs, a UTF-8 `bin` is that string, as serde reads it.
        let hello = packed(&obj(vec![
            ("type", M::S("hello")),
            ("firmware", M::Bin(Bin(b"1.0".to_vec()))),
        ]));
        assert!(matches!(
            parse_device_frame_msgpack(&hello).unwrap(),
            DeviceFrame::Hello { firmware, .. } if firmware == "1.0"
        ));
        let bin_data = packed(&obj(vec![
            ("type", M::S("event")),
            ("kind", M::S("k")),
            ("data", M::Bin(Bin(b"1.0".to_vec()))),
        ]));
        assert_eq!(
            parse_device_frame_msgpack(&bin_data).unwrap_err().code,
            "invalid_field"
        );
        // A MessagePack extension type (here a timestamp) is not JSON, so no field takes it.
        let mut ext = msgpack(r#"{"type":"event","kind":"k","data":null}"#);
        let nil = ext.iter().position(|&b| b == 0xc0).unwrap();
        ext.splice(nil..=nil, [0xd6, 0xff, 0, 0, 0, 1]);
        assert_eq!(
            parse_device_frame_msgpack(&ext).unwrap_err().code,
            "invalid_field"
        );
        let deep_json = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let deep_json = format!(r#"{{"type":"event","kind":"k","data":{deep_json}}}"#);
        assert_eq!(
            parse_device_frame(&deep_json).unwrap_err().code,
            "invalid_json"
        );
    }

    #[test]
    fn bin_array_data_decodes() {
        let values = [21.5f32, -0.25, 1e-3, 3.0e8];
        let f32_bin: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let frame = parse_device_frame_msgpack(&telemetry_with(array(
            vec![2, 2],
            "f32",
            M::Bin(Bin(f32_bin.clone())),
        )))
        .unwrap();
        let Value::Array(thermal) = only_value(&frame) else {
            panic!("{frame:?}");
        };
        assert_eq!(thermal.shape(), &[2, 2]);
        assert_eq!(thermal.dtype(), Dtype::F32);
        assert_eq!(thermal.data(), &f32_bin[..]);
        assert_eq!(thermal.to_f32_vec(), values);
        assert_eq!((thermal.len(), thermal.byte_len()), (4, 16));
        assert!(!thermal.is_empty());

        let i16_bin: Vec<u8> = [-2i16, 300, i16::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let frame = parse_device_frame_msgpack(&telemetry_with(array(
            vec![3],
            "i16",
            M::Bin(Bin(i16_bin)),
        )))
        .unwrap();
        let Value::Array(adc) = only_value(&frame) else {
            panic!("{frame:?}");
        };
        assert_eq!(adc.to_f32_vec(), vec![-2.0, 300.0, 32767.0]);

        // The same array as numbers in a MessagePack array is the same value.
        let as_numbers = parse_device_frame_msgpack(&telemetry_with(array(
            vec![2, 2],
            "f32",
            M::A(values.iter().map(|&v| M::F(f64::from(v))).collect()),
        )))
        .unwrap();
        assert_eq!(only_value(&as_numbers), &Value::Array(thermal.clone()));
    }

    #[test]
    fn arrays_are_numbers_in_json_and_bin_in_msgpack() {
        let array = ArrayValue::new(vec![2], Dtype::I16, vec![0xff, 0xff, 2, 0]).unwrap();
        assert_eq!(
            serde_json::to_string(&array).unwrap(),
            r#"{"shape":[2],"dtype":"i16","data":[-1,2]}"#
        );
        // A 32×24 thermal frame: 3 KiB of bin in MessagePack.
        let pixels: Vec<f32> = (0..768).map(|i| 20.0 + i as f32 / 64.0).collect();
        let thermal = ArrayValue::from_f32(vec![24, 32], &pixels).unwrap();
        assert_eq!(thermal.byte_len(), 3072);
        let frame = DeviceFrame::Telemetry {
            seq: 1,
            points: vec![Point {
                ts: Some(1_767_225_600_000),
                key: "thermal".into(),
                value: Value::Array(thermal.clone()),
            }],
        };
        let bytes = frame.to_msgpack();
        let at = bytes
            .windows(3072)
            .position(|w| w == thermal.data())
            .expect("the packed data travels as it is");
        // bin 16: the marker and a big-endian length of 3072.
        assert_eq!(&bytes[at - 3..at], &[0xc5, 0x0c, 0x00]);
        assert!(bytes.len() < 3072 + 100, "{}", bytes.len());
        assert_eq!(parse_device_frame_msgpack(&bytes).unwrap(), frame);
        assert_eq!(parse_device_frame(&frame.to_json()).unwrap(), frame);
    }

    #[test]
    fn array_constructors_keep_the_invariants() {
        let codes = |r: Result<ArrayValue, FrameError>| r.unwrap_err().code;
        assert_eq!(
            codes(ArrayValue::new(vec![], Dtype::F32, vec![])),
            "invalid_shape"
        );
        assert_eq!(
            codes(ArrayValue::new(vec![1, 1, 1], Dtype::U16, vec![0, 0])),
            "invalid_shape"
        );
        assert_eq!(
            codes(ArrayValue::new(vec![2, 0], Dtype::U16, vec![])),
            "invalid_shape"
        );
        assert_eq!(
            codes(ArrayValue::new(vec![2], Dtype::U16, vec![0; 3])),
            "array_length_mismatch"
        );
        // The product is taken in u64: no overflow where usize is 32 bits.
        assert_eq!(
            codes(ArrayValue::new(
                vec![u32::MAX, u32::MAX],
                Dtype::F32,
                vec![0; 4]
            )),
            "array_length_mismatch"
        );
        assert_eq!(
            codes(ArrayValue::from_f32(vec![1], &[f32::INFINITY])),
            "invalid_field"
        );
        let row = ArrayValue::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((row.len(), row.byte_len()), (3, 12));
        assert_eq!(Value::Array(row).byte_len(), 12);
        assert_eq!(Value::Number(1.0).byte_len(), 8);
        assert_eq!(Value::Bool(true).byte_len(), 1);
        assert_eq!(Value::Text("héllo".into()).byte_len(), 6);
        for dtype in [Dtype::F32, Dtype::I16, Dtype::U16] {
            assert_eq!(Dtype::parse(dtype.as_str()), Some(dtype));
        }
    }

    #[test]
    fn device_server_frames_have_the_documented_shape() {
        let cases = [
            (
                DeviceServerFrame::Welcome {
                    connection: "c1".into(),
                    device: "d1".into(),
                },
                r#"{"type":"welcome","connection":"c1","device":"d1"}"#,
            ),
            (
                DeviceServerFrame::Ack {
                    seq: 42,
                    duplicate: false,
                },
                r#"{"type":"ack","seq":42}"#,
            ),
            (
                DeviceServerFrame::Ack {
                    seq: 42,
                    duplicate: true,
                },
                r#"{"type":"ack","seq":42,"duplicate":true}"#,
            ),
            (
                DeviceServerFrame::Command {
                    id: "cmd1".into(),
                    name: "set_interval".into(),
                    params: serde_json::json!({ "seconds": 30 }),
                    expires_at: 1_767_225_660_000,
                },
                r#"{"type":"command","id":"cmd1","name":"set_interval","params":{"seconds":30},"expires_at":1767225660000}"#,
            ),
            (
                DeviceServerFrame::Config {
                    version: 4,
                    desired: [
                        ("interval".to_owned(), serde_json::json!(60)),
                        ("led".to_owned(), serde_json::Value::Null),
                    ]
                    .into(),
                    full: false,
                },
                r#"{"type":"config","version":4,"desired":{"interval":60,"led":null},"full":false}"#,
            ),
            (
                DeviceServerFrame::Error {
                    code: "rate_limited".into(),
                    message: "slow down".into(),
                    retry_after: Some(1),
                    reference: Some("42".into()),
                },
                r#"{"type":"error","code":"rate_limited","message":"slow down","retry_after":1,"ref":"42"}"#,
            ),
            (
                DeviceServerFrame::error("x", "y"),
                r#"{"type":"error","code":"x","message":"y"}"#,
            ),
            (DeviceServerFrame::Pong, r#"{"type":"pong"}"#),
        ];
        let mut kinds = BTreeSet::new();
        for (frame, json) in cases {
            assert_eq!(frame.to_json(), json);
            let from_msgpack: serde_json::Value =
                rmp_serde::from_slice(&frame.to_msgpack()).unwrap();
            let from_json: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(from_msgpack, from_json, "{json}");
            // The SDK reads them back with serde.
            assert_eq!(
                serde_json::from_str::<DeviceServerFrame>(json).unwrap(),
                frame
            );
            assert_eq!(
                rmp_serde::from_slice::<DeviceServerFrame>(&frame.to_msgpack()).unwrap(),
                frame
            );
            assert!(json.contains(&format!(r#""type":"{}""#, frame.kind())));
            kinds.insert(frame.kind());
        }
        assert_eq!(kinds.len(), 6);
    }

    #[test]
    fn a_refused_frame_names_what_it_was_about() {
        let bad_batch = r#"{"type":"telemetry","seq":42,"points":[{"key":"k","value":null}]}"#;
        let err = parse_device_frame(bad_batch).unwrap_err();
        let reference = device_frame_ref(bad_batch);
        assert_eq!(reference.as_deref(), Some("42"));
        assert_eq!(
            device_frame_ref_msgpack(&msgpack(bad_batch)).as_deref(),
            Some("42")
        );
        let refused = DeviceServerFrame::refused(err, reference);
        assert!(
            refused
                .to_json()
                .starts_with(r#"{"type":"error","code":"invalid_field","message":"#),
            "{}",
            refused.to_json()
        );
        assert!(refused.to_json().ends_with(r#","ref":"42"}"#));
        let bad_result = r#"{"type":"command_result","id":"cmd7","status":"done"}"#;
        assert_eq!(device_frame_ref(bad_result).as_deref(), Some("cmd7"));
        for unrelated in [
            "nope",
            r#"{"type":"telemetry","seq":"42"}"#,
            r#"{"type":"event","seq":42}"#,
            r#"{"type":"telemetry","points":[{"seq":42}]}"#,
        ] {
            assert_eq!(device_frame_ref(unrelated), None, "{unrelated}");
        }
    }

    #[test]
    fn telemetry_keys() {
        for key in [
            "t",
            "temperature",
            "0",
            "env.temp_c",
            "zone:3/door-1",
            &"k".repeat(64),
        ] {
            assert!(valid_telemetry_key(key), "{key}");
        }
        for key in [
            "",
            "_hidden",
            ".t",
            "-t",
            "/t",
            "with space",
            "tempé",
            "a,b",
            "a\nb",
            &"k".repeat(65),
        ] {
            assert!(!valid_telemetry_key(key), "{key}");
        }
    }
}
