//! What the API shows of devices, keys, alerts and the fleet.

use chrono::{DateTime, Utc};
use serde::Serialize;
use unhidra_store::devices::{
    AlertRecord, DeviceKeyRecord, DeviceRecord, DeviceStatus, FleetCounts,
};
use utoipa::ToSchema;
use uuid::Uuid;

/// A device.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceView {
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// The user who owns it; absent once that account is deleted.
    #[schema(value_type = Option<String>)]
    pub owner: Option<Uuid>,
    /// Its name.
    pub name: String,
    /// Its model.
    pub model: String,
    /// Where it is.
    pub location: Option<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// Free-form metadata.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// The hardware's own id.
    pub hardware_id: Option<String>,
    /// The firmware version its last `hello` gave.
    pub firmware: Option<String>,
    /// `online`, `offline` or `silent`.
    pub status: &'static str,
    /// Whether it has a live connection to this server.
    pub connected: bool,
    /// When it was last heard from (written every few seconds while it talks).
    pub last_seen: Option<DateTime<Utc>>,
    /// Its own inactivity timeout in seconds, if set.
    pub inactivity_timeout: Option<i64>,
    /// The inactivity timeout that applies (its own, its model's or the default), seconds.
    pub effective_inactivity_timeout: i64,
    /// The last heartbeat's figures.
    #[schema(value_type = Option<Object>)]
    pub heartbeat: Option<serde_json::Value>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl DeviceView {
    pub(crate) fn new(record: DeviceRecord, timeout_secs: i64, connected: bool) -> Self {
        Self {
            id: record.id,
            owner: record.owner.map(|u| u.0),
            name: record.name,
            model: record.model,
            location: record.location,
            tags: record.tags,
            metadata: serde_json::from_str(&record.metadata).unwrap_or_default(),
            hardware_id: record.hardware_id,
            firmware: record.firmware,
            status: record.status.as_str(),
            connected,
            last_seen: record.last_seen,
            inactivity_timeout: record.inactivity_timeout,
            effective_inactivity_timeout: timeout_secs,
            heartbeat: record.heartbeat.and_then(|h| serde_json::from_str(&h).ok()),
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

/// A new device or key: the key is shown this once, and never again.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeviceRegistered)]
pub struct Registered {
    /// The device.
    pub device: DeviceView,
    /// Its API key (`unh_dk_…`): store it on the device now.
    pub key: String,
}

/// A device's API key, as listings show it (never the key).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeviceKeyView)]
pub struct KeyView {
    /// The key's id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// Its first characters.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops (or stopped) working, after a rotation.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether it works now.
    pub usable: bool,
}

impl KeyView {
    pub(crate) fn new(key: DeviceKeyRecord, now: DateTime<Utc>) -> Self {
        Self {
            usable: key.revoked_at.is_none() && key.expires_at.is_none_or(|at| at > now),
            id: key.id,
            prefix: key.prefix,
            created_at: key.created_at,
            expires_at: key.expires_at,
            revoked_at: key.revoked_at,
        }
    }
}

/// An alert about a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AlertView {
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// The device.
    #[schema(value_type = String)]
    pub device: Uuid,
    /// What it is about: `silent`.
    pub kind: String,
    /// `open`, `acknowledged` or `resolved`.
    pub state: &'static str,
    /// What was found.
    pub detail: Option<String>,
    /// When it was opened.
    pub opened_at: DateTime<Utc>,
    /// When someone acknowledged it.
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// Who.
    #[schema(value_type = Option<String>)]
    pub acknowledged_by: Option<Uuid>,
    /// When it ended.
    pub resolved_at: Option<DateTime<Utc>>,
}

impl From<AlertRecord> for AlertView {
    fn from(a: AlertRecord) -> Self {
        Self {
            id: a.id,
            device: a.device_id,
            kind: a.kind,
            state: a.state.as_str(),
            detail: a.detail,
            opened_at: a.opened_at,
            acknowledged_at: a.acknowledged_at,
            acknowledged_by: a.acknowledged_by.map(|u| u.0),
            resolved_at: a.resolved_at,
        }
    }
}

/// How many devices have one value of something.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = FleetCount)]
pub struct Count {
    /// The value (a model, a firmware version; `null`: none reported).
    pub value: Option<String>,
    /// How many devices.
    pub devices: u64,
}

/// The fleet at a glance.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FleetSummary {
    /// Every device counted.
    pub total: u64,
    /// Devices online.
    pub online: u64,
    /// Devices offline.
    pub offline: u64,
    /// Devices silent.
    pub silent: u64,
    /// Per model.
    pub by_model: Vec<Count>,
    /// Per firmware version.
    pub by_firmware: Vec<Count>,
    /// Alerts open or acknowledged.
    pub open_alerts: u64,
}

impl From<FleetCounts> for FleetSummary {
    fn from(c: FleetCounts) -> Self {
        let of = |status| {
            c.by_status
                .iter()
                .filter(|(s, _)| *s == status)
                .map(|(_, n)| *n)
                .sum::<u64>()
        };
        Self {
            total: c.by_status.iter().map(|(_, n)| n).sum(),
            online: of(DeviceStatus::Online),
            offline: of(DeviceStatus::Offline),
            silent: of(DeviceStatus::Silent),
            by_model: c
                .by_model
                .into_iter()
                .map(|(m, n)| Count {
                    value: Some(m),
                    devices: n,
                })
                .collect(),
            by_firmware: c
                .by_firmware
                .into_iter()
                .map(|(f, n)| Count {
                    value: f,
                    devices: n,
                })
                .collect(),
            open_alerts: c.open_alerts,
        }
    }
}
