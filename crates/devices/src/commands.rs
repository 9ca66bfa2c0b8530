//! Commands to devices and their configuration: a command is stored, sent at once to a device
//! connected to this node (or when it next says `hello`), and answered by its `command_result`;
//! one that waits past its time expires. The desired configuration has a version; on `hello`
//! a device whose reported version is older gets the keys that differ.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use unhidra_protocol::DeviceServerFrame;
use unhidra_protocol::device::CommandStatus;
use unhidra_store::StoreError;
use unhidra_store::devices::{CommandRecord, CommandState, ConfigRecord};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{DeviceError, input};

/// How long a command waits for its result when the caller names no `ttl`: a minute.
pub const DEFAULT_TTL_SECS: u64 = 60;
/// The longest a command may wait: seven days.
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// Idempotency keys that start so are the server's own (an OTA offer's); users' may not.
pub const RESERVED_KEY_PREFIX: &str = "unhidra:";
/// The largest `params` or `desired` configuration, in bytes of JSON.
pub const MAX_JSON_BYTES: usize = 8 * 1024;

/// A command a user sends.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// What to do: 1 to 64 ASCII letters, digits and `._:-` (the device's handler name).
    pub name: String,
    /// With what: any JSON value of at most 8 KiB (default `{}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Value>,
    /// Seconds it may wait for its result, 1 to 604800 (default 60).
    #[serde(default)]
    pub ttl: Option<u64>,
    /// The caller's key: a second command with it (for this device) answers the first.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A command as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = DeviceCommand)]
pub struct CommandView {
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// The device.
    #[schema(value_type = String)]
    pub device: Uuid,
    /// What to do.
    pub name: String,
    /// With what.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// `queued`, `delivered`, `succeeded`, `failed` or `expired`.
    pub state: &'static str,
    /// The caller's key, if any.
    pub idempotency_key: Option<String>,
    /// Who sent it.
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Uuid>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it expires unless answered.
    pub expires_at: DateTime<Utc>,
    /// When it was last sent to the device.
    pub delivered_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// What the device answered.
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
}

impl CommandView {
    /// The view of a stored command; one past its time is shown as expired even before the
    /// sweep has written it.
    pub(crate) fn new(c: CommandRecord, now: DateTime<Utc>) -> Self {
        let state = if !c.state.is_final() && c.expires_at <= now {
            CommandState::Expired
        } else {
            c.state
        };
        Self {
            id: c.id,
            device: c.device_id,
            name: c.name,
            params: serde_json::from_str(&c.params).unwrap_or_default(),
            state: state.as_str(),
            idempotency_key: c.idempotency_key,
            created_by: c.created_by.map(|u| u.0),
            created_at: c.created_at,
            expires_at: c.expires_at,
            delivered_at: c.delivered_at,
            finished_at: c.finished_at,
            output: c.output.and_then(|o| serde_json::from_str(&o).ok()),
        }
    }

    /// Whether it has ended.
    pub fn is_final(&self) -> bool {
        matches!(self.state, "succeeded" | "failed" | "expired")
    }
}

/// A command checked and ready to store.
pub(crate) fn parse(
    new: NewCommand,
    device: Uuid,
    created_by: Option<unhidra_core::UserId>,
    now: DateTime<Utc>,
) -> Result<CommandRecord, DeviceError> {
    let name = input::ident("/name", &new.name)?;
    let params = new.params.unwrap_or_else(|| serde_json::json!({}));
    let params = params.to_string();
    if params.len() > MAX_JSON_BYTES {
        return Err(DeviceError::Invalid(
            "/params",
            "too_large",
            format!("params have at most {MAX_JSON_BYTES} bytes of JSON"),
        ));
    }
    let ttl = new.ttl.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(DeviceError::Invalid(
            "/ttl",
            "out_of_range",
            format!("ttl is 1 to {MAX_TTL_SECS} seconds"),
        ));
    }
    if created_by.is_some()
        && new
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.starts_with(RESERVED_KEY_PREFIX))
    {
        return Err(DeviceError::Invalid(
            "/idempotency_key",
            "reserved",
            format!("idempotency keys that start with {RESERVED_KEY_PREFIX:?} are the server's"),
        ));
    }
    if let Some(key) = &new.idempotency_key
        && (key.is_empty()
            || key.chars().count() > 128
            || unhidra_core::forbidden_control(key, unhidra_core::Controls::None).is_some())
    {
        return Err(DeviceError::Invalid(
            "/idempotency_key",
            "invalid_format",
            "an idempotency key has 1 to 128 characters and no control characters".into(),
        ));
    }
    Ok(CommandRecord {
        id: Uuid::new_v4(),
        device_id: device,
        name,
        params,
        state: CommandState::Queued,
        idempotency_key: new.idempotency_key,
        created_by,
        created_at: now,
        expires_at: now + Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX)),
        delivered_at: None,
        finished_at: None,
        output: None,
    })
}

/// The `command` frame of a stored command.
pub(crate) fn frame(c: &CommandRecord) -> DeviceServerFrame {
    DeviceServerFrame::Command {
        id: c.id.to_string(),
        name: c.name.clone(),
        params: serde_json::from_str(&c.params).unwrap_or_default(),
        expires_at: c.expires_at.timestamp_millis(),
    }
}

/// The state a `command_result` ends its command in.
pub(crate) fn outcome(status: CommandStatus) -> CommandState {
    match status {
        CommandStatus::Succeeded => CommandState::Succeeded,
        CommandStatus::Failed => CommandState::Failed,
    }
}

/// A device's configuration as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeviceConfig)]
pub struct ConfigView {
    /// What it should have.
    #[schema(value_type = Object)]
    pub desired: serde_json::Value,
    /// Its version (0: none set yet).
    pub version: i64,
    /// What it last said it has.
    #[schema(value_type = Option<Object>)]
    pub reported: Option<serde_json::Value>,
    /// The version it said it applied.
    pub reported_version: Option<i64>,
    /// When it reported.
    pub reported_at: Option<DateTime<Utc>>,
    /// The keys whose reported value differs from the desired one (`null`: to be unset).
    #[schema(value_type = Object)]
    pub difference: BTreeMap<String, serde_json::Value>,
    /// Whether it reported the current version with nothing different.
    pub in_sync: bool,
}

fn object(text: Option<&str>) -> Option<serde_json::Map<String, serde_json::Value>> {
    text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| match v {
            serde_json::Value::Object(map) => Some(map),
            _ => None,
        })
}

/// The keys of `desired` whose value `reported` lacks or differs in, and `null` for the keys
/// only `reported` has.
pub fn difference(
    desired: &serde_json::Map<String, serde_json::Value>,
    reported: &serde_json::Map<String, serde_json::Value>,
) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for (k, v) in desired {
        if reported.get(k) != Some(v) {
            out.insert(k.clone(), v.clone());
        }
    }
    for k in reported.keys() {
        if !desired.contains_key(k) {
            out.insert(k.clone(), serde_json::Value::Null);
        }
    }
    out
}

impl ConfigView {
    pub(crate) fn new(c: Option<ConfigRecord>) -> Self {
        let Some(c) = c else {
            return Self {
                desired: serde_json::json!({}),
                version: 0,
                reported: None,
                reported_version: None,
                reported_at: None,
                difference: BTreeMap::new(),
                in_sync: true,
            };
        };
        let desired = object(Some(&c.desired)).unwrap_or_default();
        let reported = object(c.reported.as_deref());
        let difference = match &reported {
            Some(r) if c.desired_version > 0 => difference(&desired, r),
            Some(_) => BTreeMap::new(),
            None => desired.clone().into_iter().collect(),
        };
        let in_sync = difference.is_empty()
            && (c.desired_version == 0 || c.reported_version == Some(c.desired_version));
        Self {
            desired: serde_json::Value::Object(desired),
            version: c.desired_version,
            reported: reported.map(serde_json::Value::Object),
            reported_version: c.reported_version,
            reported_at: c.reported_at,
            difference,
            in_sync,
        }
    }
}

/// The `config` frame a device gets on `hello`, if its reported version is older than the
/// desired one: the keys that differ, or the whole configuration when it never reported.
pub(crate) fn config_frame(c: &ConfigRecord) -> Option<DeviceServerFrame> {
    if c.desired_version == 0 || c.reported_version >= Some(c.desired_version) {
        return None;
    }
    let version = u64::try_from(c.desired_version).ok()?;
    let desired = object(Some(&c.desired)).unwrap_or_default();
    Some(match object(c.reported.as_deref()) {
        Some(reported) => DeviceServerFrame::Config {
            version,
            desired: difference(&desired, &reported),
            full: false,
        },
        None => DeviceServerFrame::Config {
            version,
            desired: desired.into_iter().collect(),
            full: true,
        },
    })
}

/// A desired configuration checked: a JSON object of at most 8 KiB.
pub(crate) fn desired_text(value: &serde_json::Value) -> Result<String, DeviceError> {
    if !value.is_object() {
        return Err(DeviceError::Invalid(
            "/desired",
            "invalid_type",
            "the desired configuration is a JSON object".into(),
        ));
    }
    let text = value.to_string();
    if text.len() > MAX_JSON_BYTES {
        return Err(DeviceError::Invalid(
            "/desired",
            "too_large",
            format!("a configuration has at most {MAX_JSON_BYTES} bytes of JSON"),
        ));
    }
    Ok(text)
}

/// `NotFound` as "none yet".
pub(crate) fn optional<T>(found: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match found {
        Ok(t) => Ok(Some(t)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_names_changed_added_and_removed_keys() {
        let desired = serde_json::json!({ "rate": 10, "mode": "eco", "led": true });
        let reported = serde_json::json!({ "rate": 5, "mode": "eco", "old": 1 });
        let d = difference(desired.as_object().unwrap(), reported.as_object().unwrap());
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({ "rate": 10, "led": true, "old": null })
        );
        let c = ConfigRecord {
            device_id: Uuid::nil(),
            desired: desired.to_string(),
            desired_version: 3,
            desired_at: Utc::now(),
            reported: Some(reported.to_string()),
            reported_version: Some(2),
            reported_at: None,
        };
        match config_frame(&c) {
            Some(DeviceServerFrame::Config {
                version,
                full,
                desired,
            }) => {
                assert_eq!((version, full, desired.len()), (3, false, 3));
            }
            other => panic!("{other:?}"),
        }
        let applied = ConfigRecord {
            reported_version: Some(3),
            ..c.clone()
        };
        assert!(config_frame(&applied).is_none());
        let never = ConfigRecord {
            reported: None,
            reported_version: None,
            ..c
        };
        assert!(matches!(
            config_frame(&never),
            Some(DeviceServerFrame::Config { full: true, .. })
        ));
    }
}
