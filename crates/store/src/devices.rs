//! Storage of the device fleet: devices and their tags, hashed API keys, presence, alerts and
//! telemetry.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use unhidra_core::UserId;
use uuid::Uuid;

use crate::StoreError;

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceStatus {
    /// Connected, or heard from over HTTP within its inactivity timeout.
    Online,
    /// Not connected, and not yet past its inactivity timeout (or never seen).
    Offline,
    /// Not heard from for longer than its inactivity timeout.
    Silent,
}

impl DeviceStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Silent => "silent",
        }
    }

    /// The status a stored name names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "online" => Some(Self::Online),
            "offline" => Some(Self::Offline),
            "silent" => Some(Self::Silent),
            _ => None,
        }
    }
}

/// A stored device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    /// Its id.
    pub id: Uuid,
    /// The user who manages it; `None` once that account is deleted (admins still do).
    pub owner: Option<UserId>,
    /// Its name.
    pub name: String,
    /// Its model.
    pub model: String,
    /// Where it is.
    pub location: Option<String>,
    /// Its tags, sorted.
    pub tags: Vec<String>,
    /// Free-form metadata, a JSON object as text.
    pub metadata: String,
    /// The hardware's own id (a MAC or chip id), which a claim after a factory reset matches.
    pub hardware_id: Option<String>,
    /// The firmware version its last `hello` reported.
    pub firmware: Option<String>,
    /// Where it stands.
    pub status: DeviceStatus,
    /// When it was last heard from.
    pub last_seen: Option<DateTime<Utc>>,
    /// Its own inactivity timeout in seconds, over the model's and the default.
    pub inactivity_timeout: Option<i64>,
    /// The last heartbeat's figures, a JSON object as text.
    pub heartbeat: Option<String>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A new API key: only its hash is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeviceKey {
    /// The key's id.
    pub id: Uuid,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// The key's first characters, to tell keys apart in listings.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// A stored API key (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeyRecord {
    /// The key's id.
    pub id: Uuid,
    /// The device it belongs to.
    pub device_id: Uuid,
    /// The key's first characters.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When a rotated key stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Which devices a listing shows; every field narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Only this owner's devices.
    pub owner: Option<UserId>,
    /// Name, model, location or hardware id contains this (case-insensitive).
    pub q: Option<String>,
    /// Only devices in this status.
    pub status: Option<DeviceStatus>,
    /// Only this model.
    pub model: Option<String>,
    /// Only devices with this tag.
    pub tag: Option<String>,
    /// Only this firmware version.
    pub firmware: Option<String>,
    /// How many to skip.
    pub offset: u64,
    /// How many at most.
    pub limit: u64,
}

/// Changes to a device; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceChange {
    /// A new name.
    pub name: Option<String>,
    /// A new model.
    pub model: Option<String>,
    /// A new location (`Some(None)` clears it).
    pub location: Option<Option<String>>,
    /// New tags (replacing all).
    pub tags: Option<Vec<String>>,
    /// New metadata, a JSON object as text.
    pub metadata: Option<String>,
    /// A new inactivity timeout in seconds (`Some(None)` clears it).
    pub inactivity_timeout: Option<Option<i64>>,
}

/// What a presence flush writes for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The device.
    pub device_id: Uuid,
    /// When it was last heard from.
    pub at: DateTime<Utc>,
    /// The last heartbeat's figures, if one came since the last flush.
    pub heartbeat: Option<String>,
}

/// What silence detection needs of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The device.
    pub device_id: Uuid,
    /// Its model (the model's timeout applies).
    pub model: String,
    /// Where it stands.
    pub status: DeviceStatus,
    /// When it was last heard from.
    pub last_seen: Option<DateTime<Utc>>,
    /// Its own timeout in seconds.
    pub inactivity_timeout: Option<i64>,
}

/// An alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// Raised, nobody has looked yet.
    Open,
    /// Someone has seen it.
    Acknowledged,
    /// Over: the device came back, or someone closed it.
    Resolved,
}

impl AlertState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    /// The state a stored name names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "open" => Some(Self::Open),
            "acknowledged" => Some(Self::Acknowledged),
            "resolved" => Some(Self::Resolved),
            _ => None,
        }
    }
}

/// A stored alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRecord {
    /// Its id.
    pub id: Uuid,
    /// The device.
    pub device_id: Uuid,
    /// What it is about: `silent`.
    pub kind: String,
    /// Where it stands.
    pub state: AlertState,
    /// What was found, for people.
    pub detail: Option<String>,
    /// When it was raised.
    pub opened_at: DateTime<Utc>,
    /// When someone acknowledged it.
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// Who.
    pub acknowledged_by: Option<UserId>,
    /// When it ended.
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Which alerts a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFilter {
    /// Only this owner's devices' alerts.
    pub owner: Option<UserId>,
    /// Only one device's.
    pub device: Option<Uuid>,
    /// Only alerts in this state; `None` for open and acknowledged ones.
    pub state: Option<AlertState>,
    /// How many to skip.
    pub offset: u64,
    /// How many at most.
    pub limit: u64,
}

/// A telemetry value as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum TelemetryValue {
    /// A number.
    Number(f64),
    /// A flag.
    Bool(bool),
    /// Text.
    Text(String),
    /// An array: `shape` names its element type and dimensions (`f32:24x32`), `data` holds the
    /// packed little-endian values.
    Array {
        /// Element type and dimensions.
        shape: String,
        /// The values.
        data: Vec<u8>,
    },
}

/// One stored point.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryPoint {
    /// The key.
    pub key: String,
    /// When it was measured.
    pub ts: DateTime<Utc>,
    /// The value.
    pub value: TelemetryValue,
}

/// One batch a device sent.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryBatch {
    /// The device.
    pub device_id: Uuid,
    /// The device's sequence number of the batch: a batch with a sequence number stored
    /// already is a repeat and stores nothing.
    pub seq: i64,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// Its points.
    pub points: Vec<TelemetryPoint>,
    /// The device's owner, whose daily budget it counts against too.
    pub owner: Option<UserId>,
    /// What it costs against the daily budgets, in bytes.
    pub cost: u64,
}

/// The daily budgets a telemetry write reserves against (`0`: no limit); a batch counts
/// towards the UTC day it arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TelemetryBudget {
    /// Bytes one device may store that day.
    pub per_device: u64,
    /// Bytes one owner's devices may store that day, together.
    pub per_owner: u64,
}

/// What became of one batch of a telemetry write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored, and its cost reserved.
    Stored,
    /// A repeat of a stored sequence number: nothing written.
    Repeat,
    /// Refused, nothing written: its device's budget for the day would be passed.
    OverDeviceBudget,
    /// Refused, nothing written: its owner's budget for the day would be passed.
    OverOwnerBudget,
}

/// Which points a telemetry read gives: one key, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryRange {
    /// The device.
    pub device_id: Uuid,
    /// The key.
    pub key: String,
    /// Measured at or after this.
    pub from: Option<DateTime<Utc>>,
    /// Measured before this.
    pub to: Option<DateTime<Utc>>,
    /// Measured after this (the cursor: the last point's time of the previous page).
    pub after: Option<DateTime<Utc>>,
    /// At most this many.
    pub limit: u32,
}

/// How a bucket's numbers are summed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The mean.
    Avg,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// How many points.
    Count,
}

impl Aggregate {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Self::Avg => "AVG(num)",
            Self::Min => "MIN(num)",
            Self::Max => "MAX(num)",
            Self::Count => "COUNT(*)",
        }
    }
}

/// One bucket of an aggregate read.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryBucket {
    /// The bucket's start.
    pub start: DateTime<Utc>,
    /// The aggregate of its numeric points (count: of all its points).
    pub value: f64,
}

/// The fleet's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Devices per status.
    pub by_status: Vec<(DeviceStatus, u64)>,
    /// Devices per model.
    pub by_model: Vec<(String, u64)>,
    /// Devices per firmware version (`None`: never said hello).
    pub by_firmware: Vec<(Option<String>, u64)>,
    /// Alerts open or acknowledged.
    pub open_alerts: u64,
}

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandState {
    /// Stored; not yet sent to the device.
    Queued,
    /// Sent to the device; no result yet.
    Delivered,
    /// The device did it.
    Succeeded,
    /// The device did not.
    Failed,
    /// Its time ran out before a result came.
    Expired,
}

impl CommandState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// The state a stored name names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "queued" => Some(Self::Queued),
            "delivered" => Some(Self::Delivered),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }

    /// Whether nothing changes it any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Expired)
    }
}

/// A stored command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    /// Its id.
    pub id: Uuid,
    /// The device.
    pub device_id: Uuid,
    /// What to do.
    pub name: String,
    /// With what, a JSON value as text.
    pub params: String,
    /// Where it stands.
    pub state: CommandState,
    /// The caller's key: a second command with it returns the first.
    pub idempotency_key: Option<String>,
    /// Who sent it.
    pub created_by: Option<UserId>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it expires unless answered.
    pub expires_at: DateTime<Utc>,
    /// When it was sent to the device (the last time).
    pub delivered_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// What the device answered, a JSON value as text.
    pub output: Option<String>,
}

/// A device's configuration: what it should have and what it says it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRecord {
    /// The device.
    pub device_id: Uuid,
    /// The desired configuration, a JSON object as text.
    pub desired: String,
    /// Its version, from 1, raised by every change.
    pub desired_version: i64,
    /// When it last changed.
    pub desired_at: DateTime<Utc>,
    /// The configuration the device last reported, a JSON object as text.
    pub reported: Option<String>,
    /// The version of the desired configuration it had applied then.
    pub reported_version: Option<i64>,
    /// When it reported.
    pub reported_at: Option<DateTime<Utc>>,
}

/// Something a device reported happening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEventRecord {
    /// Its number, rising in the order events were stored.
    pub id: i64,
    /// The device.
    pub device_id: Uuid,
    /// What kind of thing (`hello`, or the device's own kinds).
    pub kind: String,
    /// Anything about it, JSON text.
    pub data: Option<String>,
    /// When it was stored.
    pub at: DateTime<Utc>,
}

/// A stored provisioning token (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningTokenRecord {
    /// Its id.
    pub id: Uuid,
    /// Who owns the devices it makes.
    pub owner: UserId,
    /// Who made it.
    pub created_by: Option<UserId>,
    /// The token's first characters, to tell tokens apart in listings.
    pub prefix: String,
    /// The model a claiming device must report.
    pub model: String,
    /// The tags the devices it makes get, sorted.
    pub tags: Vec<String>,
    /// Claims it allows in all.
    pub max_uses: i64,
    /// Claims made with it.
    pub uses: i64,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When a device last claimed with it.
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A device's claim with a provisioning token, as the store carries it out in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// The model the device reports.
    pub model: String,
    /// The firmware it runs.
    pub firmware: Option<String>,
    /// The device to make when the token's owner has none with its hardware id (`hardware_id`
    /// set; its owner and tags are the token's, filled in by the store).
    pub device: DeviceRecord,
    /// Its new key.
    pub key: NewDeviceKey,
    /// Now.
    pub now: DateTime<Utc>,
}

/// What came of a claim.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// A new device was made.
    Claimed(DeviceRecord),
    /// The device with this hardware id (the token owner's) claimed again: its keys were
    /// revoked, the new key added, the token's tags added to its own.
    Reclaimed {
        /// The device, as it is now.
        device: DeviceRecord,
        /// How many keys were revoked.
        revoked: u64,
    },
    /// Nothing was changed, for this reason.
    Refused(ClaimRefusal),
}

/// Why a claim changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRefusal {
    /// No such token, it was revoked, or its owner is deactivated.
    Unknown,
    /// It expired.
    Expired,
    /// Its claims are used up.
    UsedUp,
    /// It is for another model: this one.
    WrongModel(String),
    /// The token owner's device with this hardware id still has a usable key, or is another
    /// model: its owner revokes its keys to re-provision it.
    NotReclaimable,
}

/// Devices, keys, presence, alerts and telemetry.
#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Stores a new device with its first key. A `hardware_id` that its owner's other device
    /// has is a `Conflict` (other owners' devices may have it too).
    async fn create_device(
        &self,
        device: &DeviceRecord,
        key: &NewDeviceKey,
    ) -> Result<(), StoreError>;

    /// One device.
    async fn device(&self, id: Uuid) -> Result<DeviceRecord, StoreError>;

    /// Devices the filter selects, by name, and how many it selects in all.
    async fn list_devices(
        &self,
        filter: &DeviceFilter,
    ) -> Result<(Vec<DeviceRecord>, u64), StoreError>;

    /// Changes a device and answers it as it is now.
    async fn update_device(
        &self,
        id: Uuid,
        change: &DeviceChange,
        now: DateTime<Utc>,
    ) -> Result<DeviceRecord, StoreError>;

    /// Deletes a device with its keys, alerts and telemetry (the telemetry in rounds first).
    async fn delete_device(&self, id: Uuid) -> Result<(), StoreError>;

    /// The device whose usable key (not revoked, not expired at `now`) has this hash; a device
    /// whose owner's account is deactivated has no usable key.
    async fn device_by_key(
        &self,
        key_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<(DeviceRecord, DeviceKeyRecord), StoreError>;

    /// Whether a key is still usable at `now`: not revoked, not expired, its device there and
    /// its owner (if any) an active account.
    async fn device_key_usable(&self, key_id: Uuid, now: DateTime<Utc>)
    -> Result<bool, StoreError>;

    /// A device's keys, newest first.
    async fn device_keys(&self, device: Uuid) -> Result<Vec<DeviceKeyRecord>, StoreError>;

    /// Adds a key; the device's other usable keys stop working at `old_until` (now, for none).
    async fn rotate_device_key(
        &self,
        device: Uuid,
        key: &NewDeviceKey,
        old_until: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Revokes every key of the device; answers how many were usable.
    async fn revoke_device_keys(&self, device: Uuid, now: DateTime<Utc>)
    -> Result<u64, StoreError>;

    /// Writes the last-seen times (and heartbeats) of many devices in one transaction. A
    /// time never moves backwards.
    async fn record_seen(&self, seen: &[Seen]) -> Result<(), StoreError>;

    /// Sets a device's status at `at` (which also counts as seen) unless it is `status`
    /// already; a device that was silent gets its open `silent` alert resolved at once.
    /// Answers whether the status changed, and the alerts resolved.
    async fn set_device_status(
        &self,
        device: Uuid,
        status: DeviceStatus,
        at: DateTime<Utc>,
    ) -> Result<(bool, Vec<AlertRecord>), StoreError>;

    /// Marks a device silent and opens its `silent` alert, if it is not silent already and was
    /// last seen at or before `cutoff` (a compare-and-set: of several nodes that find it
    /// silent, one opens the alert). Answers the alert opened.
    async fn mark_silent(
        &self,
        device: Uuid,
        cutoff: DateTime<Utc>,
        alert_id: Uuid,
        detail: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<AlertRecord>, StoreError>;

    /// What silence detection needs of every device that was ever seen.
    async fn presences(&self) -> Result<Vec<Presence>, StoreError>;

    /// One alert.
    async fn alert(&self, id: Uuid) -> Result<AlertRecord, StoreError>;

    /// Alerts the filter selects, newest first, and how many in all.
    async fn list_alerts(
        &self,
        filter: &AlertFilter,
    ) -> Result<(Vec<AlertRecord>, u64), StoreError>;

    /// Acknowledges an open alert, or resolves an open or acknowledged one. Answers it as it
    /// is now; `Conflict` if it has moved past `state` already.
    async fn advance_alert(
        &self,
        id: Uuid,
        state: AlertState,
        by: UserId,
        now: DateTime<Utc>,
    ) -> Result<AlertRecord, StoreError>;

    /// Stores batches of points (from many devices) in one transaction, with the latest
    /// value of every key, each batch's cost reserved against its device's and its owner's
    /// budget for the day in the same transaction. Answers what became of each batch: a
    /// repeat is one whatever the budgets; a batch over a budget writes nothing and reserves
    /// nothing.
    async fn append_telemetry(
        &self,
        batches: &[TelemetryBatch],
        budget: &TelemetryBudget,
    ) -> Result<Vec<Appended>, StoreError>;

    /// Stored points of one key in a range, oldest first.
    async fn telemetry(&self, range: &TelemetryRange) -> Result<Vec<TelemetryPoint>, StoreError>;

    /// The numeric points of one key in buckets of `bucket_secs`, oldest first; empty buckets
    /// are left out.
    async fn telemetry_buckets(
        &self,
        range: &TelemetryRange,
        bucket_secs: i64,
        aggregate: Aggregate,
    ) -> Result<Vec<TelemetryBucket>, StoreError>;

    /// The latest point of every key of a device, by key.
    async fn telemetry_latest(&self, device: Uuid) -> Result<Vec<TelemetryPoint>, StoreError>;

    /// How many keys a device has stored.
    async fn telemetry_key_count(&self, device: Uuid) -> Result<u64, StoreError>;

    /// Deletes points measured, batch records received, events stored and alerts resolved
    /// before `before`; at most `limit` points (and `limit` events) per call. Answers the more
    /// numerous of the points and the events deleted, so that a caller repeats while either is
    /// left.
    async fn prune_telemetry(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;

    /// The fleet's counts, over every device or one owner's.
    async fn fleet_counts(&self, owner: Option<UserId>) -> Result<FleetCounts, StoreError>;

    /// Stores a command, or — when its device already has one with the same idempotency key —
    /// answers that one (`false`: nothing stored).
    async fn create_command(
        &self,
        command: &CommandRecord,
    ) -> Result<(CommandRecord, bool), StoreError>;

    /// One command.
    async fn command(&self, id: Uuid) -> Result<CommandRecord, StoreError>;

    /// A device's commands, newest first.
    async fn device_commands(
        &self,
        device: Uuid,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StoreError>;

    /// The commands of these devices that wait for a result and have not expired at `now`,
    /// oldest first.
    async fn pending_commands(
        &self,
        devices: &[Uuid],
        now: DateTime<Utc>,
    ) -> Result<Vec<CommandRecord>, StoreError>;

    /// Marks commands sent to their device (again, after a reconnect).
    async fn mark_delivered(&self, ids: &[Uuid], now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Ends a command of `device` that waits for a result with `state` (succeeded, failed or
    /// expired) and `output`; `None` if it is not that device's, or has ended already.
    async fn finish_command(
        &self,
        device: Uuid,
        id: Uuid,
        state: CommandState,
        output: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<CommandRecord>, StoreError>;

    /// Expires every command that waits past its `expires_at`; answers them.
    async fn expire_commands(&self, now: DateTime<Utc>) -> Result<Vec<CommandRecord>, StoreError>;

    /// Replaces a device's desired configuration; answers the record with its new version.
    async fn set_desired_config(
        &self,
        device: Uuid,
        desired: &str,
        now: DateTime<Utc>,
    ) -> Result<ConfigRecord, StoreError>;

    /// Records what a device reported: its whole configuration and the version it applied.
    async fn set_reported_config(
        &self,
        device: Uuid,
        reported: &str,
        version: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// A device's configuration; `NotFound` if none was ever set or reported.
    async fn device_config(&self, device: Uuid) -> Result<ConfigRecord, StoreError>;

    /// Stores what a device reported happening.
    async fn append_device_event(
        &self,
        device: Uuid,
        kind: &str,
        data: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<DeviceEventRecord, StoreError>;

    /// A device's events, newest first: of one kind when given, older than `before` when
    /// given, at most `limit`.
    async fn device_events(
        &self,
        device: Uuid,
        kind: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeviceEventRecord>, StoreError>;

    /// Stores a new provisioning token (its hash).
    async fn create_provisioning_token(
        &self,
        token: &ProvisioningTokenRecord,
        hash: &str,
    ) -> Result<(), StoreError>;

    /// One provisioning token.
    async fn provisioning_token(&self, id: Uuid) -> Result<ProvisioningTokenRecord, StoreError>;

    /// Provisioning tokens, newest first, `owner`'s only when given; at most `limit`.
    async fn provisioning_tokens(
        &self,
        owner: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<ProvisioningTokenRecord>, StoreError>;

    /// Revokes a provisioning token; false if it was revoked already.
    async fn revoke_provisioning_token(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Carries out a claim in one transaction: uses the token once, then makes the device or
    /// claims the token owner's device with this hardware id again. A refusal changes nothing.
    async fn claim_device(&self, claim: &Claim) -> Result<ClaimOutcome, StoreError>;
}
