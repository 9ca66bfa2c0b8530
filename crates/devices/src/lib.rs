//! The device fleet: devices and their API keys, who may manage them, presence and
//! silent-device alerts, and telemetry.
//!
//! [`Devices`] takes the store, a clock, its configuration, the audit log and the jobs system
//! as arguments, parses every input once ([`input`]) and answers [`DeviceError`]. It knows no
//! HTTP and no SQL; the server's routes and WebSocket session call it. Owners manage their own
//! devices, admins every device; to anyone else a device does not exist.

pub mod commands;
pub mod events;
pub mod input;
pub mod key;
pub mod metrics;
mod presence;
pub mod provision;
pub mod telemetry;
pub mod views;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use unhidra_config::Config;
use unhidra_core::ratelimit::address_key;
use unhidra_core::{Clock, Principal, SlidingWindow, UserId};
use unhidra_identity::{AuditLog, RequestContext};
use unhidra_jobs::Jobs;
use unhidra_store::devices::{
    AlertFilter, AlertRecord, AlertState, DeviceChange, DeviceFilter, DeviceRecord, DeviceStatus,
    NewDeviceKey,
};
use unhidra_store::{Store, StoreError};
use uuid::Uuid;

pub use key::{ClaimToken, DeviceKey};
pub use metrics::DeviceMetrics;
use presence::{Presence, Touch};
pub use views::{AlertView, DeviceView, FleetSummary, KeyView, Registered};

/// Devices per page when none is asked for, and at most.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// The largest page.
pub const MAX_PAGE_SIZE: u64 = 200;

/// Why a fleet operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No such device, or one the caller may not see.
    #[error("no such {0}")]
    NotFound(&'static str),
    /// A field is wrong: (JSON pointer, code, message).
    #[error("{2}")]
    Invalid(&'static str, &'static str, String),
    /// Taken already: (code, message).
    #[error("{1}")]
    Conflict(&'static str, String),
    /// The device key is missing, malformed, unknown, expired or revoked.
    #[error("the device key is not valid")]
    BadKey,
    /// Too many attempts: the limit's scope and the seconds to wait.
    #[error("too many {scope}; retry in {retry_after} s")]
    RateLimited {
        /// What was limited (`registrations`, `telemetry`).
        scope: &'static str,
        /// Seconds to wait.
        retry_after: i64,
    },
    /// The caller may not do this (not an admin).
    #[error("{0}")]
    Forbidden(&'static str),
    /// A claim with a provisioning token was refused.
    #[error("the claim was refused: {0:?}")]
    Claim(unhidra_store::devices::ClaimRefusal),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a user asks to register.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// 1 to 100 characters.
    pub name: String,
    /// The model: 1 to 64 ASCII letters, digits and `._:-`.
    pub model: String,
    /// Where it is; up to 200 characters.
    #[serde(default)]
    pub location: Option<String>,
    /// At most 32 tags, each like a model, lower-cased.
    #[serde(default)]
    pub tags: Vec<String>,
    /// A JSON object of at most 8 KiB.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Option<serde_json::Value>,
    /// Seconds without traffic after which it counts as silent (10 s to 30 days); absent: its
    /// model's, or the default.
    #[serde(default)]
    pub inactivity_timeout: Option<i64>,
    /// The hardware's own id (MAC, chip id), unique across the fleet.
    #[serde(default)]
    pub hardware_id: Option<String>,
    /// For admins: the user who owns it (default: the caller).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub owner: Option<UserId>,
}

/// Changes to a device; absent fields stay as they are, `null` clears.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceUpdate {
    /// A new name.
    #[serde(default)]
    pub name: Option<String>,
    /// A new model.
    #[serde(default)]
    pub model: Option<String>,
    /// A new location; `null` clears it.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub location: Option<Option<String>>,
    /// New tags, replacing all.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// New metadata, replacing all.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// A new inactivity timeout in seconds; `null` goes back to the model's or the default.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub inactivity_timeout: Option<Option<i64>>,
}

/// `Some(None)` for an explicit `null`, `None` for an absent field.
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Which devices to list, as the caller asks.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Text in the name, model, location or hardware id.
    pub q: Option<String>,
    /// `online`, `offline` or `silent`.
    pub status: Option<String>,
    /// A model.
    pub model: Option<String>,
    /// A tag.
    pub tag: Option<String>,
    /// A firmware version.
    pub firmware: Option<String>,
    /// The page, from 1.
    pub page: Option<u64>,
    /// Devices per page.
    pub page_size: Option<u64>,
}

/// One page of a listing.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The page, from 1.
    pub page: u64,
    /// Items per page.
    pub page_size: u64,
    /// Items in all.
    pub total: u64,
}

/// An authenticated device: what its connection and its HTTP calls act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    /// The device.
    pub device: Uuid,
    /// Its owner.
    pub owner: Option<UserId>,
    /// The key it used (its id, never the key).
    pub key_id: Uuid,
}

/// Something that happened in the fleet, for live subscribers and the server.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FleetEvent {
    /// A device's status changed.
    Status {
        /// The device.
        device: Uuid,
        /// Its owner.
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<UserId>,
        /// `online`, `offline` or `silent`.
        status: &'static str,
        /// Why: `connected`, `closed` (a clean close), `lost` (no close frame: a reset, a ping
        /// timeout), `silent`, `returned`.
        reason: &'static str,
    },
    /// An alert was opened, acknowledged or resolved.
    Alert {
        /// Its owner (of the device).
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<UserId>,
        /// The alert.
        alert: AlertView,
    },
    /// A command was stored, delivered or ended.
    Command {
        /// Its device's owner.
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<UserId>,
        /// The command.
        command: commands::CommandView,
    },
    /// A device reported something happening (an `event` frame, or its `hello`).
    Device {
        /// Its owner.
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<UserId>,
        /// The event.
        device_event: events::EventView,
    },
    /// The device's keys were revoked, or it was deleted: its connections must close (4003).
    Revoked {
        /// The device.
        device: Uuid,
    },
}

/// How a connection ended, as silence detection and the fleet's events tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The device sent a close frame.
    Clean,
    /// The connection was lost: a reset, a ping timeout, no close frame (1006).
    Lost,
    /// The server closed it (revocation, shutdown, a protocol error).
    Server,
}

/// The fleet's settings, from the configuration.
#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// Silent after this long without traffic, unless the device or its model says otherwise.
    pub default_timeout: Duration,
    /// Per model.
    pub model_timeouts: HashMap<String, Duration>,
    /// How long a rotated key keeps working.
    pub key_grace: Duration,
    /// How often last-seen times are written.
    pub presence_flush: std::time::Duration,
    /// Telemetry limits.
    pub telemetry: telemetry::Limits,
    /// Registrations (and provisioning tokens) per hour per user and per address.
    pub registrations_per_hour: u32,
    /// Claims per hour per address.
    pub claims_per_hour: u32,
    /// Failed key attempts per minute per address.
    pub auth_failures_per_minute: u32,
    /// Events one device may send per minute.
    pub events_per_minute: u32,
    /// The URL devices reach this server at, for provisioning payloads.
    pub public_url: Option<String>,
    /// IPv6 clients are limited per network of this many bits.
    pub ipv6_prefix: u8,
    /// Whether admin powers need a second factor.
    pub require_admin_mfa: bool,
    /// Who is mailed when an alert opens: the owner, and these addresses.
    pub alert_mail_owner: bool,
    /// Further addresses mailed when an alert opens.
    pub alert_mail_to: Vec<String>,
}

impl DevicesConfig {
    /// The settings the configuration gives; an error names the key and what is wrong.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let mut model_timeouts = HashMap::new();
        for item in config
            .device_model_timeouts
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (model, secs) = item
                .split_once('=')
                .ok_or_else(|| format!("device_model_timeouts: {item:?} is not model=seconds"))?;
            let secs: i64 = secs.trim().parse().map_err(|_| {
                format!("device_model_timeouts: {secs:?} is not a number of seconds")
            })?;
            input::timeout(Some(secs))
                .map_err(|e| format!("device_model_timeouts: {model}: {e}"))?;
            input::ident("/model", model.trim())
                .map_err(|e| format!("device_model_timeouts: {model:?}: {e}"))?;
            model_timeouts.insert(model.trim().to_owned(), Duration::seconds(secs));
        }
        let default_timeout = chrono::Duration::from_std(config.device_inactivity_timeout.0)
            .map_err(|e| format!("device_inactivity_timeout: {e}"))?;
        let mut alert_mail_owner = false;
        let mut alert_mail_to = Vec::new();
        for item in config
            .device_alert_mail
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if item == "owner" {
                alert_mail_owner = true;
            } else {
                let email = unhidra_core::Email::parse(item)
                    .map_err(|e| format!("device_alert_mail: {item:?}: {e}"))?;
                alert_mail_to.push(email.as_str().to_owned());
            }
        }
        Ok(Self {
            default_timeout,
            model_timeouts,
            key_grace: chrono::Duration::from_std(config.device_key_grace.0)
                .map_err(|e| format!("device_key_grace: {e}"))?,
            presence_flush: config.device_presence_flush.0,
            telemetry: telemetry::Limits::from_config(config)?,
            registrations_per_hour: config.device_registrations_per_hour,
            claims_per_hour: config.device_claims_per_hour,
            auth_failures_per_minute: config.device_auth_failures_per_minute,
            events_per_minute: config.device_events_per_minute,
            public_url: config.public_url.as_ref().map(ToString::to_string),
            ipv6_prefix: u8::try_from(config.rate_limit_ipv6_prefix).unwrap_or(128),
            require_admin_mfa: config.require_admin_mfa,
            alert_mail_owner,
            alert_mail_to,
        })
    }
}

/// The fleet service; cloning it is cheap and shares everything.
#[derive(Debug, Clone)]
pub struct Devices(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: DevicesConfig,
    audit: AuditLog,
    jobs: Arc<Jobs>,
    metrics: DeviceMetrics,
    presence: Mutex<Presence>,
    /// Woken when a deadline earlier than the one waited for is set.
    deadline_changed: tokio::sync::Notify,
    events: tokio::sync::broadcast::Sender<FleetEvent>,
    registrations_per_user: SlidingWindow,
    registrations_per_ip: SlidingWindow,
    claims_per_ip: SlidingWindow,
    auth_failures_per_ip: SlidingWindow,
    events_per_device: SlidingWindow,
    /// One alert mail per device an hour.
    alert_mail_per_device: SlidingWindow,
    telemetry: telemetry::Ingest,
    /// The frames to send to each device connected to this node: its connection's channel.
    outbound: Mutex<
        HashMap<
            Uuid,
            (
                Uuid,
                tokio::sync::mpsc::Sender<unhidra_protocol::DeviceServerFrame>,
            ),
        >,
    >,
}

/// Frames waiting for one device connection at most; past it a command waits for the next
/// delivery (at `hello`, or the next sweep).
const OUTBOUND: usize = 64;

/// How often queued commands are looked for (for devices connected here) and expired ones
/// marked.
pub const COMMAND_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Now, in the whole microseconds that both stores keep.
fn now_of(clock: &dyn Clock) -> DateTime<Utc> {
    let now = clock.now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

impl Devices {
    /// The service over a store. Starts the telemetry writer; [`Devices::start`] starts presence
    /// and silence detection.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: DevicesConfig,
        audit: AuditLog,
        jobs: Arc<Jobs>,
        metrics: DeviceMetrics,
    ) -> Self {
        let hour = Duration::hours(1);
        let telemetry = telemetry::Ingest::start(
            Arc::clone(&store),
            config.telemetry.clone(),
            metrics.clone(),
        );
        Self(Arc::new(Inner {
            registrations_per_user: SlidingWindow::new(config.registrations_per_hour, hour),
            registrations_per_ip: SlidingWindow::new(config.registrations_per_hour, hour),
            claims_per_ip: SlidingWindow::new(config.claims_per_hour, hour),
            auth_failures_per_ip: SlidingWindow::new(
                config.auth_failures_per_minute,
                Duration::minutes(1),
            ),
            events_per_device: SlidingWindow::new(config.events_per_minute, Duration::minutes(1)),
            alert_mail_per_device: SlidingWindow::new(1, hour),
            store,
            clock,
            config,
            audit,
            jobs,
            metrics,
            presence: Mutex::new(Presence::default()),
            deadline_changed: tokio::sync::Notify::new(),
            events: tokio::sync::broadcast::channel(1024).0,
            telemetry,
            outbound: Mutex::new(HashMap::new()),
        }))
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        self.0
            .presence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> DateTime<Utc> {
        now_of(&*self.0.clock)
    }

    /// The fleet's metrics.
    pub fn metrics(&self) -> &DeviceMetrics {
        &self.0.metrics
    }

    /// The fleet's events as they happen.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<FleetEvent> {
        self.0.events.subscribe()
    }

    fn emit(&self, event: FleetEvent) {
        let _ = self.0.events.send(event);
    }

    fn is_admin(&self, who: &Principal) -> bool {
        who.has_admin_powers(self.0.config.require_admin_mfa)
    }

    /// The timeout that applies to a device: its own, its model's, or the default.
    fn timeout_of(&self, own: Option<i64>, model: &str) -> Duration {
        own.map(Duration::seconds)
            .or_else(|| self.0.config.model_timeouts.get(model).copied())
            .unwrap_or(self.0.config.default_timeout)
    }

    fn view(&self, mut record: DeviceRecord) -> DeviceView {
        let timeout = self.timeout_of(record.inactivity_timeout, &record.model);
        let (connected, heard) = {
            let presence = self.presence();
            (
                presence.is_connected(record.id),
                presence.last_seen(record.id),
            )
        };
        // What this node heard since the last write is newer than the store's.
        record.last_seen = record.last_seen.max(heard);
        DeviceView::new(record, timeout.num_seconds(), connected)
    }

    /// A device the caller may see.
    async fn visible(&self, who: &Principal, id: Uuid) -> Result<DeviceRecord, DeviceError> {
        let record = match self.0.store.device(id).await {
            Err(StoreError::NotFound { .. }) => return Err(DeviceError::NotFound("device")),
            other => other?,
        };
        if self.is_admin(who) || record.owner == Some(who.user_id) {
            Ok(record)
        } else {
            Err(DeviceError::NotFound("device"))
        }
    }

    /// Whom a new device (or provisioning token) is for: the caller, or for an admin, the
    /// user named.
    async fn owner_for(
        &self,
        who: &Principal,
        owner: Option<UserId>,
    ) -> Result<UserId, DeviceError> {
        match owner {
            Some(owner) if owner != who.user_id => {
                if !self.is_admin(who) {
                    return Err(DeviceError::Forbidden(
                        "only admins register devices for someone else",
                    ));
                }
                match self.0.store.user_by_id(owner).await {
                    Ok(_) => Ok(owner),
                    Err(StoreError::NotFound { .. }) => Err(DeviceError::Invalid(
                        "/owner",
                        "unknown_user",
                        "no such user".into(),
                    )),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(who.user_id),
        }
    }

    /// One attempt of a limited kind (`scope` for the metric, `what` for the caller).
    fn limit(
        &self,
        window: &SlidingWindow,
        key: &str,
        scope: &'static str,
        what: &'static str,
        now: DateTime<Utc>,
    ) -> Result<(), DeviceError> {
        window
            .try_acquire(key, now)
            .map(drop)
            .map_err(|retry_after| {
                self.0.metrics.limited(scope);
                DeviceError::RateLimited {
                    scope: what,
                    retry_after,
                }
            })
    }

    /// A registration (or a provisioning token), per address and per user.
    fn limit_registration(
        &self,
        who: &Principal,
        ip: Option<IpAddr>,
        now: DateTime<Utc>,
    ) -> Result<(), DeviceError> {
        if let Some(ip) = ip {
            let key = address_key(ip, self.0.config.ipv6_prefix);
            self.limit(
                &self.0.registrations_per_ip,
                &key,
                "registration_ip",
                "registrations",
                now,
            )?;
        }
        self.limit(
            &self.0.registrations_per_user,
            &who.user_id.to_string(),
            "registration_user",
            "registrations",
            now,
        )
    }

    /// Registers a device for the caller (or, for an admin, for `owner`) and answers it with
    /// its key, which is shown this once.
    pub async fn register(
        &self,
        who: &Principal,
        new: NewDevice,
        ip: Option<IpAddr>,
        ctx: &RequestContext,
    ) -> Result<Registered, DeviceError> {
        let owner = self.owner_for(who, new.owner).await?;
        let now = self.now();
        let record = DeviceRecord {
            id: Uuid::new_v4(),
            owner: Some(owner),
            name: input::name(&new.name)?,
            model: input::ident("/model", &new.model)?,
            location: input::location(new.location.as_deref())?,
            tags: input::tags(&new.tags)?,
            metadata: input::metadata(new.metadata.as_ref())?,
            hardware_id: new
                .hardware_id
                .as_deref()
                .map(|h| input::ident("/hardware_id", h))
                .transpose()?,
            firmware: None,
            status: DeviceStatus::Offline,
            last_seen: None,
            inactivity_timeout: input::timeout(new.inactivity_timeout)?,
            heartbeat: None,
            created_at: now,
            updated_at: now,
        };
        // Limits after parsing, so that malformed requests cost no attempt.
        self.limit_registration(who, ip, now)?;
        let key = DeviceKey::generate();
        match self
            .0
            .store
            .create_device(&record, &new_key(&key, now))
            .await
        {
            Err(StoreError::Conflict { .. }) => {
                return Err(DeviceError::Conflict(
                    "hardware_id_taken",
                    "another of this owner's devices has this hardware id".into(),
                ));
            }
            other => other?,
        }
        self.0.metrics.registered.inc();
        self.0
            .audit
            .record(
                "device.registered",
                Some(who.user_id),
                Some(record.id.to_string()),
                ctx,
                serde_json::json!({ "owner": owner, "model": record.model, "key": key.shown() }),
            )
            .await;
        Ok(Registered {
            device: self.view(record),
            key: key.expose().to_owned(),
        })
    }

    /// One device the caller may see.
    pub async fn get(&self, who: &Principal, id: Uuid) -> Result<DeviceView, DeviceError> {
        let record = self.visible(who, id).await?;
        Ok(self.view(record))
    }

    /// The devices the caller may see (an owner's own, an admin's all), filtered and paged.
    pub async fn list(
        &self,
        who: &Principal,
        query: ListQuery,
    ) -> Result<Page<DeviceView>, DeviceError> {
        let status = query
            .status
            .as_deref()
            .map(|s| {
                DeviceStatus::parse(s).ok_or_else(|| {
                    DeviceError::Invalid(
                        "status",
                        "invalid_value",
                        "status is online, offline or silent".into(),
                    )
                })
            })
            .transpose()?;
        let (page, page_size) = paging(query.page, query.page_size)?;
        let text = |field: &'static str, value: Option<String>| {
            value
                .filter(|v| !v.is_empty())
                .map(|v| {
                    if v.chars().count() > 100
                        || unhidra_core::forbidden_control(&v, unhidra_core::Controls::None)
                            .is_some()
                    {
                        Err(DeviceError::Invalid(
                            field,
                            "invalid_format",
                            format!("{field} has at most 100 characters and no control characters"),
                        ))
                    } else {
                        Ok(v)
                    }
                })
                .transpose()
        };
        let filter = DeviceFilter {
            owner: (!self.is_admin(who)).then_some(who.user_id),
            q: text("q", query.q)?,
            status,
            model: text("model", query.model)?,
            tag: text("tag", query.tag)?.map(|t| t.to_ascii_lowercase()),
            firmware: text("firmware", query.firmware)?,
            offset: (page - 1).saturating_mul(page_size),
            limit: page_size,
        };
        let (records, total) = self.0.store.list_devices(&filter).await?;
        Ok(Page {
            items: records.into_iter().map(|r| self.view(r)).collect(),
            page,
            page_size,
            total,
        })
    }

    /// Changes a device; audited (`device.updated`, with the fields changed: a longer
    /// inactivity timeout quiets its alerts).
    pub async fn update(
        &self,
        who: &Principal,
        id: Uuid,
        update: DeviceUpdate,
        ctx: &RequestContext,
    ) -> Result<DeviceView, DeviceError> {
        let before = self.visible(who, id).await?;
        let change = DeviceChange {
            name: update.name.as_deref().map(input::name).transpose()?,
            model: update
                .model
                .as_deref()
                .map(|m| input::ident("/model", m))
                .transpose()?,
            location: update
                .location
                .map(|l| input::location(l.as_deref()))
                .transpose()?,
            tags: update.tags.as_deref().map(input::tags).transpose()?,
            metadata: update
                .metadata
                .as_ref()
                .map(|m| input::metadata(Some(m)))
                .transpose()?,
            inactivity_timeout: update.inactivity_timeout.map(input::timeout).transpose()?,
        };
        let record = self.0.store.update_device(id, &change, self.now()).await?;
        let changed: Vec<&str> = [
            ("name", change.name.is_some()),
            ("model", change.model.is_some()),
            ("location", change.location.is_some()),
            ("tags", change.tags.is_some()),
            ("metadata", change.metadata.is_some()),
            ("inactivity_timeout", change.inactivity_timeout.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect();
        self.0
            .audit
            .record(
                "device.updated",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "fields": changed, "inactivity_timeout": record.inactivity_timeout }),
            )
            .await;
        if change.model.is_some() || change.inactivity_timeout.is_some() {
            let timeout = self.timeout_of(record.inactivity_timeout, &record.model);
            self.presence()
                .load(id, before.status, record.last_seen, timeout);
            self.0.deadline_changed.notify_one();
        }
        Ok(self.view(record))
    }

    /// Deletes a device with its keys, alerts and telemetry; its connections close.
    pub async fn delete(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<(), DeviceError> {
        let record = self.visible(who, id).await?;
        self.0.store.delete_device(id).await?;
        self.presence().forget(id);
        self.0.telemetry.forget(id);
        self.emit(FleetEvent::Revoked { device: id });
        self.0
            .audit
            .record(
                "device.deleted",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "owner": record.owner, "name": record.name }),
            )
            .await;
        Ok(())
    }

    /// A device's keys (never the keys themselves).
    pub async fn keys(&self, who: &Principal, id: Uuid) -> Result<Vec<KeyView>, DeviceError> {
        self.visible(who, id).await?;
        let now = self.now();
        Ok(self
            .0
            .store
            .device_keys(id)
            .await?
            .into_iter()
            .map(|k| KeyView::new(k, now))
            .collect())
    }

    /// Gives a device a new key; the keys it had keep working for `device_key_grace`, so that
    /// the new one can be installed first. Answers the new key, shown this once.
    pub async fn rotate_key(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<Registered, DeviceError> {
        let record = self.visible(who, id).await?;
        let now = self.now();
        let key = DeviceKey::generate();
        let until = now + self.0.config.key_grace;
        self.0
            .store
            .rotate_device_key(id, &new_key(&key, now), until)
            .await?;
        self.0
            .audit
            .record(
                "device.key_rotated",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "key": key.shown(), "old_keys_until": until }),
            )
            .await;
        Ok(Registered {
            device: self.view(record),
            key: key.expose().to_owned(),
        })
    }

    /// Revokes every key of a device at once; its live connections close with 4003. A new key
    /// comes from [`Devices::rotate_key`].
    pub async fn revoke(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<u64, DeviceError> {
        self.visible(who, id).await?;
        let revoked = self.0.store.revoke_device_keys(id, self.now()).await?;
        self.emit(FleetEvent::Revoked { device: id });
        self.0
            .audit
            .record(
                "device.revoked",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "keys": revoked }),
            )
            .await;
        Ok(revoked)
    }

    /// The device a key from `ip` belongs to, if the key is usable now. Failed attempts are
    /// limited per address (`device_auth_failures_per_minute`): past the limit a refused key
    /// is answered `RateLimited` instead of `BadKey` until the window has passed. A good key
    /// always passes, so a hostile client at a site's address (behind the same NAT), or one
    /// that fills the limiter's table, locks no working device out.
    pub async fn authenticate_from(
        &self,
        key: &str,
        ip: Option<IpAddr>,
    ) -> Result<DeviceAuth, DeviceError> {
        let result = self.authenticate(key).await;
        let Some(ip) = ip else {
            return result;
        };
        // Only a refused key counts; a store that could not answer does not.
        if matches!(result, Err(DeviceError::BadKey)) {
            self.0
                .auth_failures_per_ip
                .try_acquire(&address_key(ip, self.0.config.ipv6_prefix), self.now())
                .map_err(|retry_after| {
                    self.0.metrics.limited("auth_ip");
                    DeviceError::RateLimited {
                        scope: "failed device-key attempts",
                        retry_after,
                    }
                })?;
        }
        result
    }

    /// The device a key belongs to, if the key is usable now.
    pub async fn authenticate(&self, key: &str) -> Result<DeviceAuth, DeviceError> {
        let Some(key) = DeviceKey::from_client(key) else {
            self.0.metrics.auth_failed.inc();
            return Err(DeviceError::BadKey);
        };
        match self.0.store.device_by_key(&key.hash(), self.now()).await {
            Ok((device, stored)) => Ok(DeviceAuth {
                device: device.id,
                owner: device.owner,
                key_id: stored.id,
            }),
            Err(StoreError::NotFound { .. }) => {
                self.0.metrics.auth_failed.inc();
                Err(DeviceError::BadKey)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a connected device's key still works: not revoked, not expired (a rotation's
    /// grace is over), its device not deleted and its owner active. Connections ask it
    /// every ping interval, so a revocation on another node (or an event missed here) ends
    /// them too. A store that cannot answer keeps the connection.
    pub async fn still_valid(&self, auth: &DeviceAuth) -> bool {
        match self
            .0
            .store
            .device_key_usable(auth.key_id, self.now())
            .await
        {
            Ok(usable) => usable,
            Err(e) => {
                tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "device key not re-checked");
                true
            }
        }
    }

    /// A device's connection opened: it is online at once (written now).
    pub async fn connected(&self, auth: &DeviceAuth) -> Result<(), DeviceError> {
        let record = self.0.store.device(auth.device).await?;
        let now = self.now();
        let timeout = self.timeout_of(record.inactivity_timeout, &record.model);
        let first = self.presence().connect(auth.device, now, timeout);
        self.0.deadline_changed.notify_one();
        self.0.metrics.connected.set(self.connected_count());
        if first {
            self.set_status(auth, DeviceStatus::Online, now, "connected")
                .await?;
        }
        Ok(())
    }

    /// A device's connection closed: offline once its last one here is gone (written now).
    pub async fn disconnected(&self, auth: &DeviceAuth, how: Disconnect) {
        let now = self.now();
        let last = self.presence().disconnect(auth.device, now);
        self.0.metrics.connected.set(self.connected_count());
        self.0.metrics.disconnected(how);
        if !last {
            return;
        }
        let reason = match how {
            Disconnect::Clean => "closed",
            Disconnect::Lost => "lost",
            Disconnect::Server => "closed_by_server",
        };
        // A device that went silent while connected stays silent until it is heard again.
        let silent = self
            .0
            .store
            .device(auth.device)
            .await
            .is_ok_and(|d| d.status == DeviceStatus::Silent);
        if !silent
            && let Err(e) = self
                .set_status(auth, DeviceStatus::Offline, now, reason)
                .await
        {
            tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "offline status not written");
        }
    }

    fn connected_count(&self) -> i64 {
        i64::try_from(self.presence().connected()).unwrap_or(i64::MAX)
    }

    async fn set_status(
        &self,
        auth: &DeviceAuth,
        status: DeviceStatus,
        at: DateTime<Utc>,
        reason: &'static str,
    ) -> Result<(), DeviceError> {
        let (changed, resolved) = self
            .0
            .store
            .set_device_status(auth.device, status, at)
            .await?;
        if changed {
            self.0.metrics.transition(status);
            self.emit(FleetEvent::Status {
                device: auth.device,
                owner: auth.owner,
                status: status.as_str(),
                reason,
            });
        }
        for alert in resolved {
            self.0.metrics.alerts_resolved.inc();
            self.emit(FleetEvent::Alert {
                owner: auth.owner,
                alert: AlertView::from(alert),
            });
        }
        Ok(())
    }

    /// Traffic from a device; with a heartbeat's figures (a JSON object as text). Costs no
    /// database write unless the device was silent.
    pub async fn seen(&self, auth: &DeviceAuth, heartbeat: Option<String>) {
        let now = self.now();
        let mut touch = self.presence().touch(auth.device, now, heartbeat.clone());
        if touch == Touch::Unknown {
            // First heard on this node (a device that posts over HTTP, say): learn it.
            match self.0.store.device(auth.device).await {
                Ok(d) => {
                    let timeout = self.timeout_of(d.inactivity_timeout, &d.model);
                    let mut presence = self.presence();
                    presence.load(d.id, d.status, d.last_seen, timeout);
                    touch = presence.touch(auth.device, now, heartbeat);
                }
                Err(e) => {
                    tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "device presence not loaded");
                    return;
                }
            }
            self.0.deadline_changed.notify_one();
        }
        if let Touch::Returned(status) = touch {
            self.0.deadline_changed.notify_one();
            if let Err(e) = self.set_status(auth, status, now, "returned").await {
                tracing::warn!(device = %auth.device, error = %unhidra_core::error_chain(&e), "return from silence not written");
            }
        }
    }

    /// A device's `hello`: its firmware version (as a manifest's version may be), and the
    /// partition and reset reason, identifiers when given. Nothing is written of a refused one.
    pub async fn hello(
        &self,
        auth: &DeviceAuth,
        firmware: &str,
        partition: Option<&str>,
        reset_reason: Option<&str>,
        secure_version: Option<u32>,
    ) -> Result<(), DeviceError> {
        input::firmware_version(firmware)?;
        if let Some(partition) = partition {
            input::ident("partition", partition)?;
        }
        if let Some(reason) = reset_reason {
            input::ident("reset_reason", reason)?;
        }
        self.0
            .store
            .record_boot(&unhidra_store::deployments::DeviceBoot {
                device_id: auth.device,
                firmware: Some(firmware.to_owned()),
                partition: partition.map(str::to_owned),
                secure_version: secure_version.map(i64::from),
            })
            .await?;
        Ok(())
    }

    /// Stores a telemetry batch and answers once it is durable: `Ok(true)` when it was stored
    /// now, `Ok(false)` when this `seq` was stored before (acknowledge again, store nothing).
    pub async fn telemetry(
        &self,
        auth: &DeviceAuth,
        seq: u64,
        points: Vec<unhidra_protocol::device::Point>,
    ) -> Result<bool, DeviceError> {
        let now = self.now();
        self.seen(auth, None).await;
        self.0
            .telemetry
            .submit(auth.device, auth.owner, seq, points, now)
            .await
    }

    /// Loads every device's stored presence (after a start, deadlines come from the stored
    /// `last_seen`, so a device that died while the server was down is still reported) and
    /// starts writing presence and watching for silence. The tasks stop when `stop` resolves;
    /// the last presence is written then.
    pub async fn start(
        &self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, DeviceError> {
        for p in self.0.store.presences().await? {
            let timeout = self.timeout_of(p.inactivity_timeout, &p.model);
            self.presence()
                .load(p.device_id, p.status, p.last_seen, timeout);
        }
        let this = self.clone();
        Ok(tokio::spawn(async move {
            tokio::pin!(stop);
            let mut flush = tokio::time::interval(this.0.config.presence_flush);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sweep = tokio::time::interval(COMMAND_SWEEP);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let wait = this
                    .presence()
                    .next_deadline()
                    .map(|at| (at - this.0.clock.now()).to_std().unwrap_or_default())
                    .unwrap_or(std::time::Duration::from_secs(3600));
                tokio::select! {
                    () = &mut stop => break,
                    _ = flush.tick() => this.flush_presence().await,
                    _ = sweep.tick() => {
                        if let Err(e) = this.sweep_commands().await {
                            tracing::warn!(error = %unhidra_core::error_chain(&e), "command sweep failed");
                        }
                    }
                    () = tokio::time::sleep(wait) => {
                        this.check_silence().await;
                    }
                    () = this.0.deadline_changed.notified() => {}
                }
            }
            this.flush_presence().await;
        }))
    }

    /// Writes the last-seen times heard since the last write, in one transaction.
    pub async fn flush_presence(&self) {
        let seen = self.presence().take_dirty();
        if seen.is_empty() {
            return;
        }
        if let Err(e) = self.0.store.record_seen(&seen).await {
            tracing::warn!(devices = seen.len(), error = %unhidra_core::error_chain(&e), "presence not written; trying again");
            self.presence().restore_dirty(seen);
        }
    }

    /// Marks silent every device whose deadline has come and who has not been heard from (on
    /// this node, nor, as the store shows, on any other), opening its alert. Answers the alerts
    /// opened here.
    pub async fn check_silence(&self) -> Vec<AlertView> {
        let now = self.now();
        let overdue = self.presence().overdue(now);
        let mut opened = Vec::new();
        for o in overdue {
            let cutoff = now - o.timeout;
            let detail = format!(
                "no traffic for {} s (last seen {})",
                (now - o.last_seen).num_seconds(),
                o.last_seen.to_rfc3339()
            );
            match self
                .0
                .store
                .mark_silent(o.device, cutoff, Uuid::new_v4(), &detail, now)
                .await
            {
                Ok(Some(alert)) => {
                    self.presence().set_status(o.device, DeviceStatus::Silent);
                    let delay = (now - (o.last_seen + o.timeout)).num_milliseconds();
                    self.0.metrics.silent(delay);
                    let owner = self
                        .0
                        .store
                        .device(o.device)
                        .await
                        .ok()
                        .and_then(|d| d.owner);
                    let view = AlertView::from(alert);
                    self.emit(FleetEvent::Status {
                        device: o.device,
                        owner,
                        status: DeviceStatus::Silent.as_str(),
                        reason: "silent",
                    });
                    self.emit(FleetEvent::Alert {
                        owner,
                        alert: view.clone(),
                    });
                    self.0
                        .audit
                        .record(
                            "device.silent",
                            None,
                            Some(o.device.to_string()),
                            &RequestContext::default(),
                            serde_json::json!({ "alert": view.id, "last_seen": o.last_seen }),
                        )
                        .await;
                    self.mail_alert(o.device, owner, &view).await;
                    opened.push(view);
                }
                // Heard from elsewhere, silent already, or deleted: learn what the store says.
                Ok(None) => match self.0.store.device(o.device).await {
                    Ok(d) => {
                        let timeout = self.timeout_of(d.inactivity_timeout, &d.model);
                        self.presence().load(d.id, d.status, d.last_seen, timeout);
                    }
                    Err(_) => self.presence().forget(o.device),
                },
                Err(e) => {
                    tracing::warn!(device = %o.device, error = %unhidra_core::error_chain(&e), "silence not recorded; trying again in 5 s");
                    self.presence().defer(o.device, now + Duration::seconds(5));
                }
            }
        }
        opened
    }

    /// Mails an opened alert, as configured, through the jobs system (with its retries).
    async fn mail_alert(&self, device: Uuid, owner: Option<UserId>, alert: &AlertView) {
        let mut to = self.0.config.alert_mail_to.clone();
        // Only an active owner whose address is verified: an account opened with someone
        // else's address must not make the server mail them.
        if self.0.config.alert_mail_owner
            && let Some(owner) = owner
            && let Ok(user) = self.0.store.user_by_id(owner).await
            && user.active
            && user.email_verified_at.is_some()
        {
            to.push(user.email.as_str().to_owned());
        }
        if to.is_empty() {
            return;
        }
        // At most one mail per device an hour, however often it comes and goes.
        if self
            .0
            .alert_mail_per_device
            .try_acquire(&device.to_string(), self.now())
            .is_err()
        {
            tracing::info!(device = %device, "silent alert not mailed: one was mailed within the hour");
            return;
        }
        let name = self
            .0
            .store
            .device(device)
            .await
            .map(|d| d.name)
            .unwrap_or_default();
        for address in to {
            let mail = unhidra_mail::Mail {
                to: address,
                subject: format!("Unhidra: device {name} is silent"),
                body: format!(
                    "The device {name} ({device}) has gone silent: {}.\n\nAlert {} opened at {}.\n",
                    alert.detail.as_deref().unwrap_or("no traffic"),
                    alert.id,
                    alert.opened_at.to_rfc3339()
                ),
            };
            let payload = serde_json::to_value(&mail).unwrap_or_default();
            if let Err(e) = self
                .0
                .jobs
                .enqueue(unhidra_mail::SEND_KIND, &payload, Default::default())
                .await
            {
                tracing::warn!(device = %device, error = %unhidra_core::error_chain(&e), "alert mail not enqueued");
            }
        }
    }

    /// Alerts the caller may see: open and acknowledged ones unless a state is asked for.
    pub async fn alerts(
        &self,
        who: &Principal,
        state: Option<&str>,
        device: Option<Uuid>,
        page: Option<u64>,
        page_size: Option<u64>,
    ) -> Result<Page<AlertView>, DeviceError> {
        let state = state
            .map(|s| {
                AlertState::parse(s).ok_or_else(|| {
                    DeviceError::Invalid(
                        "state",
                        "invalid_value",
                        "state is open, acknowledged or resolved".into(),
                    )
                })
            })
            .transpose()?;
        if let Some(device) = device {
            self.visible(who, device).await?;
        }
        let (page, page_size) = paging(page, page_size)?;
        let filter = AlertFilter {
            owner: (!self.is_admin(who)).then_some(who.user_id),
            device,
            state,
            offset: (page - 1).saturating_mul(page_size),
            limit: page_size,
        };
        let (alerts, total) = self.0.store.list_alerts(&filter).await?;
        Ok(Page {
            items: alerts.into_iter().map(AlertView::from).collect(),
            page,
            page_size,
            total,
        })
    }

    /// Acknowledges or resolves an alert of a device the caller may see.
    pub async fn advance_alert(
        &self,
        who: &Principal,
        id: Uuid,
        to: AlertState,
        ctx: &RequestContext,
    ) -> Result<AlertView, DeviceError> {
        let alert: AlertRecord = match self.0.store.alert(id).await {
            Err(StoreError::NotFound { .. }) => return Err(DeviceError::NotFound("alert")),
            other => other?,
        };
        let device = self
            .visible(who, alert.device_id)
            .await
            .map_err(|_| DeviceError::NotFound("alert"))?;
        let advanced = match self
            .0
            .store
            .advance_alert(id, to, who.user_id, self.now())
            .await
        {
            Err(StoreError::Conflict { .. }) => {
                return Err(DeviceError::Conflict(
                    "alert_state",
                    format!("the alert is {} already", alert.state.as_str()),
                ));
            }
            other => other?,
        };
        let view = AlertView::from(advanced);
        self.0
            .audit
            .record(
                &format!("device.alert_{}", to.as_str()),
                Some(who.user_id),
                Some(alert.device_id.to_string()),
                ctx,
                serde_json::json!({ "alert": id }),
            )
            .await;
        self.emit(FleetEvent::Alert {
            owner: device.owner,
            alert: view.clone(),
        });
        Ok(view)
    }

    /// The fleet's summary: every device for an admin, the caller's own otherwise.
    pub async fn summary(&self, who: &Principal) -> Result<FleetSummary, DeviceError> {
        let owner = (!self.is_admin(who)).then_some(who.user_id);
        let counts = self.0.store.fleet_counts(owner).await?;
        Ok(FleetSummary::from(counts))
    }

    /// Whether the caller may watch a device's events: an admin, or its owner.
    pub fn may_watch(&self, who: &Principal, owner: Option<UserId>) -> bool {
        self.is_admin(who) || owner == Some(who.user_id)
    }

    /// Stored telemetry of a device the caller may see.
    pub async fn read_telemetry(
        &self,
        who: &Principal,
        id: Uuid,
        query: telemetry::ReadQuery,
    ) -> Result<telemetry::Read, DeviceError> {
        self.visible(who, id).await?;
        telemetry::read(&*self.0.store, id, query).await
    }

    /// The latest value of every key of a device the caller may see.
    pub async fn latest_telemetry(
        &self,
        who: &Principal,
        id: Uuid,
    ) -> Result<Vec<telemetry::PointView>, DeviceError> {
        self.visible(who, id).await?;
        Ok(self
            .0
            .store
            .telemetry_latest(id)
            .await?
            .into_iter()
            .map(telemetry::PointView::from)
            .collect())
    }
}

impl Devices {
    fn outbound(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<
            Uuid,
            (
                Uuid,
                tokio::sync::mpsc::Sender<unhidra_protocol::DeviceServerFrame>,
            ),
        >,
    > {
        self.0
            .outbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The frames the server sends a device's connection unasked (commands, configuration):
    /// the newest connection of a device gets them.
    pub fn attach(&self, auth: &DeviceAuth) -> Outbound {
        let (tx, rx) = tokio::sync::mpsc::channel(OUTBOUND);
        let token = Uuid::new_v4();
        self.outbound().insert(auth.device, (token, tx));
        Outbound { rx, token }
    }

    /// Forgets a connection's channel, unless a newer connection replaced it.
    pub fn detach(&self, auth: &DeviceAuth, attached: &Outbound) {
        let mut outbound = self.outbound();
        if outbound
            .get(&auth.device)
            .is_some_and(|(token, _)| *token == attached.token)
        {
            outbound.remove(&auth.device);
        }
    }

    /// Hands frames to a device connected here; answers whether they were queued.
    fn push(&self, device: Uuid, frames: Vec<unhidra_protocol::DeviceServerFrame>) -> bool {
        let Some((_, tx)) = self.outbound().get(&device).cloned() else {
            return false;
        };
        frames.into_iter().all(|f| tx.try_send(f).is_ok())
    }

    fn emit_command(&self, owner: Option<UserId>, record: unhidra_store::devices::CommandRecord) {
        let command = commands::CommandView::new(record, self.now());
        self.emit(FleetEvent::Command { owner, command });
    }

    /// Sends a command to a device the caller may see: stored, then delivered at once when the
    /// device is connected here (otherwise at its next `hello`, or the next sweep). Answers the
    /// command and whether it is new (`false`: its idempotency key named an earlier one).
    pub async fn send_command(
        &self,
        who: &Principal,
        device: Uuid,
        new: commands::NewCommand,
    ) -> Result<(commands::CommandView, bool), DeviceError> {
        let record = self.visible(who, device).await?;
        let command = commands::parse(new, device, Some(who.user_id), self.now())?;
        self.deliver(record.owner, command).await
    }

    /// Sends a command on the server's own behalf (an OTA offer), to any device: as
    /// [`Devices::send_command`] does, with no sender.
    pub async fn send_service_command(
        &self,
        device: Uuid,
        new: commands::NewCommand,
    ) -> Result<(commands::CommandView, bool), DeviceError> {
        let owner = self.0.store.device(device).await?.owner;
        let command = commands::parse(new, device, None, self.now())?;
        self.deliver(owner, command).await
    }

    /// Stores a command, then hands it to the device when it is connected here.
    async fn deliver(
        &self,
        owner: Option<UserId>,
        command: unhidra_store::devices::CommandRecord,
    ) -> Result<(commands::CommandView, bool), DeviceError> {
        let now = self.now();
        let device = command.device_id;
        let (stored, created) = self.0.store.create_command(&command).await?;
        if created && self.push(device, vec![commands::frame(&stored)]) {
            self.0.store.mark_delivered(&[stored.id], now).await?;
        }
        let stored = self.0.store.command(stored.id).await?;
        if created {
            self.emit_command(owner, stored.clone());
        }
        Ok((commands::CommandView::new(stored, now), created))
    }

    /// Ends a command that waits for its result as expired, with `why` as its output (an
    /// offer withdrawn); false if it had ended already.
    pub async fn withdraw_command(
        &self,
        device: Uuid,
        id: Uuid,
        why: &str,
    ) -> Result<bool, DeviceError> {
        let output = serde_json::json!({ "withdrawn": why }).to_string();
        let ended = self
            .0
            .store
            .finish_command(
                device,
                id,
                unhidra_store::devices::CommandState::Expired,
                Some(&output),
                self.now(),
            )
            .await?;
        let Some(ended) = ended else {
            return Ok(false);
        };
        let owner = self.0.store.device(device).await.ok().and_then(|d| d.owner);
        self.emit_command(owner, ended);
        Ok(true)
    }

    /// A command of a device the caller may see.
    pub async fn command(
        &self,
        who: &Principal,
        id: Uuid,
    ) -> Result<commands::CommandView, DeviceError> {
        let stored = match self.0.store.command(id).await {
            Err(StoreError::NotFound { .. }) => return Err(DeviceError::NotFound("command")),
            other => other?,
        };
        self.visible(who, stored.device_id)
            .await
            .map_err(|_| DeviceError::NotFound("command"))?;
        Ok(commands::CommandView::new(stored, self.now()))
    }

    /// A command, once it has ended or `wait` has passed, whichever comes first.
    pub async fn wait_command(
        &self,
        who: &Principal,
        id: Uuid,
        wait: std::time::Duration,
    ) -> Result<commands::CommandView, DeviceError> {
        let mut events = self.events();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let view = self.command(who, id).await?;
            if view.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(view);
            }
            // Ended on this node: an event; on another: seen at the next look.
            let ended = async {
                loop {
                    match events.recv().await {
                        Ok(FleetEvent::Command { command, .. }) if command.id == id => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                        _ => {}
                    }
                }
            };
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + std::time::Duration::from_millis(500)),
                ended,
            )
            .await;
        }
    }

    /// A device's latest commands, newest first.
    pub async fn commands(
        &self,
        who: &Principal,
        device: Uuid,
        limit: Option<u32>,
    ) -> Result<Vec<commands::CommandView>, DeviceError> {
        self.visible(who, device).await?;
        let limit = limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(DeviceError::Invalid(
                "limit",
                "out_of_range",
                "limit is from 1 to 200".into(),
            ));
        }
        let now = self.now();
        Ok(self
            .0
            .store
            .device_commands(device, limit)
            .await?
            .into_iter()
            .map(|c| commands::CommandView::new(c, now))
            .collect())
    }

    /// A device's `command_result`. A result for a command that is not this device's, or has
    /// ended already, is refused (`unknown_command`).
    pub async fn command_result(
        &self,
        auth: &DeviceAuth,
        id: &str,
        status: unhidra_protocol::device::CommandStatus,
        output: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        let unknown = || {
            DeviceError::Invalid(
                "id",
                "unknown_command",
                "no command with this id waits for this device's result".into(),
            )
        };
        let id: Uuid = id.parse().map_err(|_| unknown())?;
        let output = output.map(serde_json::Value::to_string);
        if output
            .as_ref()
            .is_some_and(|o| o.len() > commands::MAX_JSON_BYTES)
        {
            return Err(DeviceError::Invalid(
                "output",
                "invalid_length",
                format!(
                    "a command's output has at most {} bytes of JSON",
                    commands::MAX_JSON_BYTES
                ),
            ));
        }
        let ended = self
            .0
            .store
            .finish_command(
                auth.device,
                id,
                commands::outcome(status),
                output.as_deref(),
                self.now(),
            )
            .await?
            .ok_or_else(unknown)?;
        self.emit_command(auth.owner, ended);
        Ok(())
    }

    /// What a device gets after its `hello`: the commands that wait for it (marked delivered)
    /// and, if its reported configuration is older than the desired one, the difference.
    pub async fn on_hello(
        &self,
        auth: &DeviceAuth,
    ) -> Result<Vec<unhidra_protocol::DeviceServerFrame>, DeviceError> {
        let now = self.now();
        let mut frames = Vec::new();
        if let Some(config) = commands::optional(self.0.store.device_config(auth.device).await)?
            && let Some(frame) = commands::config_frame(&config)
        {
            frames.push(frame);
        }
        let pending = self.0.store.pending_commands(&[auth.device], now).await?;
        if !pending.is_empty() {
            let ids: Vec<Uuid> = pending.iter().map(|c| c.id).collect();
            self.0.store.mark_delivered(&ids, now).await?;
            frames.extend(pending.iter().map(commands::frame));
        }
        Ok(frames)
    }

    /// Delivers the queued commands of the devices connected here (those sent on other nodes
    /// reach them this way), and expires commands past their time (on every node: each
    /// expired command is answered to one). Runs every [`COMMAND_SWEEP`].
    pub async fn sweep_commands(&self) -> Result<(), DeviceError> {
        let now = self.now();
        for c in self.0.store.expire_commands(now).await? {
            let owner = self
                .0
                .store
                .device(c.device_id)
                .await
                .ok()
                .and_then(|d| d.owner);
            self.emit_command(owner, c);
        }
        let here: Vec<Uuid> = self.outbound().keys().copied().collect();
        if !here.is_empty() {
            let queued: Vec<_> = self
                .0
                .store
                .pending_commands(&here, now)
                .await?
                .into_iter()
                .filter(|c| c.state == unhidra_store::devices::CommandState::Queued)
                .collect();
            let mut sent = Vec::new();
            for c in &queued {
                if self.push(c.device_id, vec![commands::frame(c)]) {
                    sent.push(c.id);
                }
            }
            if !sent.is_empty() {
                self.0.store.mark_delivered(&sent, now).await?;
            }
        }
        Ok(())
    }

    /// Replaces a device's desired configuration; a device connected here gets the difference
    /// at once.
    pub async fn set_config(
        &self,
        who: &Principal,
        device: Uuid,
        desired: &serde_json::Value,
    ) -> Result<commands::ConfigView, DeviceError> {
        self.visible(who, device).await?;
        let text = commands::desired_text(desired)?;
        let stored = self
            .0
            .store
            .set_desired_config(device, &text, self.now())
            .await?;
        if let Some(frame) = commands::config_frame(&stored) {
            self.push(device, vec![frame]);
        }
        Ok(commands::ConfigView::new(Some(stored)))
    }

    /// A device's desired and reported configuration and how they differ.
    pub async fn config(
        &self,
        who: &Principal,
        device: Uuid,
    ) -> Result<commands::ConfigView, DeviceError> {
        self.visible(who, device).await?;
        let stored = commands::optional(self.0.store.device_config(device).await)?;
        Ok(commands::ConfigView::new(stored))
    }

    /// A device's `reported`: its whole configuration and the version it applied.
    pub async fn reported(
        &self,
        auth: &DeviceAuth,
        version: Option<u64>,
        state: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<(), DeviceError> {
        let text = serde_json::to_string(state).unwrap_or_else(|_| "{}".into());
        if text.len() > commands::MAX_JSON_BYTES {
            return Err(DeviceError::Invalid(
                "state",
                "invalid_length",
                format!(
                    "a reported configuration has at most {} bytes of JSON",
                    commands::MAX_JSON_BYTES
                ),
            ));
        }
        let version = version.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        self.0
            .store
            .set_reported_config(auth.device, &text, version, self.now())
            .await?;
        Ok(())
    }
}

/// The frames the server sends one device connection unasked.
#[derive(Debug)]
pub struct Outbound {
    /// Commands and configuration for the connection to write.
    pub rx: tokio::sync::mpsc::Receiver<unhidra_protocol::DeviceServerFrame>,
    token: Uuid,
}

fn new_key(key: &DeviceKey, now: DateTime<Utc>) -> NewDeviceKey {
    NewDeviceKey {
        id: Uuid::new_v4(),
        hash: key.hash(),
        prefix: key.shown(),
        created_at: now,
    }
}

/// A page number from 1 and a page size from 1 to [`MAX_PAGE_SIZE`].
fn paging(page: Option<u64>, size: Option<u64>) -> Result<(u64, u64), DeviceError> {
    let page = page.unwrap_or(1);
    let size = size.unwrap_or(DEFAULT_PAGE_SIZE);
    if page == 0 || page > 1_000_000 {
        return Err(DeviceError::Invalid(
            "page",
            "out_of_range",
            "page is from 1 to 1000000".into(),
        ));
    }
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        return Err(DeviceError::Invalid(
            "page_size",
            "out_of_range",
            format!("page_size is from 1 to {MAX_PAGE_SIZE}"),
        ));
    }
    Ok((page, size))
}
