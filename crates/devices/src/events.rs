//! What devices report happening: `event {kind, data}` frames, and each `hello` (firmware,
//! partition, reset reason), stored, readable by the device's owner and admins, and pushed as a
//! [`FleetEvent::Device`] to live subscribers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use unhidra_core::Principal;
use unhidra_store::devices::DeviceEventRecord;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use unhidra_protocol::device::valid_telemetry_key;

use crate::{DeviceAuth, DeviceError, Devices, FleetEvent};

/// The largest `data` of one event, in bytes of JSON.
pub const MAX_EVENT_DATA_BYTES: usize = 4096;
/// Events a page shows when no `limit` is asked for.
pub const DEFAULT_EVENT_PAGE: u32 = 50;
/// The most events one page shows.
pub const MAX_EVENT_PAGE: u32 = 500;
/// The kind of the event each `hello` stores.
pub const HELLO: &str = "hello";

/// An event's kind: the syntax of a telemetry key (1 to 64 of ASCII letters, digits and
/// `_.:/-`, starting with a letter or digit).
fn event_kind(field: &'static str, kind: &str) -> Result<String, DeviceError> {
    if valid_telemetry_key(kind) {
        Ok(kind.to_owned())
    } else {
        Err(DeviceError::Invalid(
            field,
            "invalid_key",
            "an event kind is 1 to 64 ASCII letters, digits and `_.:/-`, starting with a letter \
             or digit"
                .into(),
        ))
    }
}

/// An event as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = DeviceEvent)]
pub struct EventView {
    /// Its number: later events have larger ones.
    pub id: i64,
    /// The device.
    #[schema(value_type = String)]
    pub device: Uuid,
    /// What kind of thing.
    pub kind: String,
    /// Anything about it.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// When it was stored.
    pub at: DateTime<Utc>,
}

impl From<DeviceEventRecord> for EventView {
    fn from(record: DeviceEventRecord) -> Self {
        Self {
            id: record.id,
            device: record.device_id,
            kind: record.kind,
            data: record
                .data
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or(serde_json::Value::Null),
            at: record.at,
        }
    }
}

/// Which events to read.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events of this kind.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")]
    pub kind: Option<String>,
    /// Only events older than this one (the `next_before` of the previous page).
    pub before: Option<i64>,
    /// At most this many, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// A page of events, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeviceEventPage)]
pub struct EventPage {
    /// The events.
    pub items: Vec<EventView>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<i64>,
}

impl Devices {
    /// Stores an event a device reported and tells live subscribers. Its kind has a telemetry
    /// key's syntax, its data JSON of at most [`MAX_EVENT_DATA_BYTES`]; a device sends at most
    /// `device_events_per_minute`.
    pub async fn event(
        &self,
        auth: &DeviceAuth,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<EventView, DeviceError> {
        let kind = event_kind("/kind", kind)?;
        let data = if data.is_null() {
            None
        } else {
            let text = data.to_string();
            if text.len() > MAX_EVENT_DATA_BYTES {
                return Err(DeviceError::Invalid(
                    "/data",
                    "too_large",
                    format!("an event's data has at most {MAX_EVENT_DATA_BYTES} bytes of JSON"),
                ));
            }
            Some(text)
        };
        let now = self.now();
        self.limit(
            &self.0.events_per_device,
            &auth.device.to_string(),
            "events",
            "events",
            now,
        )?;
        self.store_event(auth, &kind, data.as_deref(), now).await
    }

    /// Stores the event of a device's `hello`: what it runs and why it started.
    pub async fn hello_event(
        &self,
        auth: &DeviceAuth,
        firmware: &str,
        partition: Option<&str>,
        reset_reason: Option<&str>,
    ) -> Result<EventView, DeviceError> {
        let data = serde_json::json!({
            "firmware": firmware, "partition": partition, "reset_reason": reset_reason,
        });
        self.store_event(auth, HELLO, Some(&data.to_string()), self.now())
            .await
    }

    async fn store_event(
        &self,
        auth: &DeviceAuth,
        kind: &str,
        data: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<EventView, DeviceError> {
        let record = self
            .0
            .store
            .append_device_event(auth.device, kind, data, now)
            .await?;
        let event = EventView::from(record);
        self.emit(FleetEvent::Device {
            owner: auth.owner,
            device_event: event.clone(),
        });
        Ok(event)
    }

    /// A device's events, newest first, for its owner or an admin.
    pub async fn events_of(
        &self,
        who: &Principal,
        device: Uuid,
        query: &EventQuery,
    ) -> Result<EventPage, DeviceError> {
        self.visible(who, device).await?;
        let kind = query
            .kind
            .as_deref()
            .map(|k| event_kind("kind", k))
            .transpose()?;
        let limit = query.limit.unwrap_or(DEFAULT_EVENT_PAGE);
        if !(1..=MAX_EVENT_PAGE).contains(&limit) {
            return Err(DeviceError::Invalid(
                "limit",
                "out_of_range",
                format!("limit is between 1 and {MAX_EVENT_PAGE}"),
            ));
        }
        let items: Vec<EventView> = self
            .0
            .store
            .device_events(device, kind.as_deref(), query.before, limit)
            .await?
            .into_iter()
            .map(EventView::from)
            .collect();
        let next_before = (items.len() == usize::try_from(limit).unwrap_or(usize::MAX))
            .then(|| items.last().map(|e| e.id))
            .flatten();
        Ok(EventPage { items, next_before })
    }
}
