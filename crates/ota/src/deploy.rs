//! Deployments: a stored image rolled out to a cohort in stages, each device's update followed
//! from the offer to its confirmation, and the whole halted by itself when too many fail.
//!
//! - The cohort is resolved when the deployment is made (`devices`, `tags` or `model`) and
//!   kept; a device registered later does not join. Devices that already run the version, that
//!   report a `secure_version` above the image's (ESP-IDF would refuse the image at boot), or
//!   that are in another deployment's update are left out, and counted.
//! - Stages are cumulative shares (`percent`) or counts of the cohort; the devices are shuffled
//!   into them. A stage ends when `success_share` of its devices confirmed the image and its
//!   `soak` has passed since it began; then the next stage's devices are offered the image. A
//!   stage that can no longer reach its share halts the deployment, and so does the error
//!   threshold (failures as a count or a share, once `min_executed` devices have finished).
//! - An offer is a command `ota.update` with the signed manifest and a signed download link;
//!   like any command it reaches a device that is offline when it next connects. The device
//!   reports `ota_status` frames as it goes; the server marks it `confirmed` only when a
//!   `hello` after the reboot reports the new version from another partition, and
//!   `rolled_back` when the device comes back on its old version. A device that does neither
//!   before its deadline (`device_timeout` after the offer) is `failed` with reason `timeout`.
//!
//! Every change is a compare-and-set in the store, so several nodes ticking at once, reports and
//! timeouts never move a device or a deployment twice. No HTTP, no SQL.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use unhidra_core::{Clock, Principal};
use unhidra_devices::Devices;
use unhidra_devices::commands::NewCommand;
use unhidra_identity::{AuditLog, RequestContext};
use unhidra_protocol::OtaState;
use unhidra_store::deployments::{
    DeploymentChange, DeploymentDeviceRecord, DeploymentRecord, DeviceTransition, StageCount,
};
use unhidra_store::devices::DeviceFilter;
use unhidra_store::{Store, StoreError};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::OtaMetrics;
use crate::firmware::{Firmware, FirmwareError};
use crate::window::{MaintenanceWindow, Window};

/// The command that carries an offer.
pub use unhidra_protocol::firmware::OFFER_COMMAND;
use unhidra_protocol::firmware::{InstallWindow, Offer};
/// The idempotency key of an offer's command starts so; users' keys may not
/// (`unhidra_devices::commands::RESERVED_KEY_PREFIX`).
const OFFER_KEY_PREFIX: &str = "unhidra:ota:";

/// Devices a deployment may hold at most.
pub const MAX_COHORT: usize = 100_000;
/// Stages a deployment may have at most.
pub const MAX_STAGES: usize = 10;
/// Devices a listing of a deployment's devices shows at most.
pub const PAGE: u64 = 500;

/// How long a device has, from its offer, unless the deployment says: an hour.
const DEFAULT_DEVICE_TIMEOUT: u64 = 3600;
/// The share of a stage that must confirm the image unless the stage says.
const DEFAULT_SUCCESS_SHARE: f64 = 0.95;
/// Offers made per deployment and tick at most (the rest follow at the next tick).
const OFFERS_PER_TICK: u64 = 1000;

/// A device's states that are final.
const FINAL: &[&str] = &["confirmed", "failed", "rolled_back", "cancelled"];
/// A device's states between its offer and its end, in order.
const IN_FLIGHT: &[&str] = &[
    "offered",
    "downloading",
    "downloaded",
    "verifying",
    "installing",
    "rebooting",
];
/// Every state of a deployment.
const ALL_STATES: &[&str] = &[
    "scheduled",
    "running",
    "paused",
    "halted",
    "cancelled",
    "completed",
];
/// Deployments whose devices' reports still count.
const TRACKED: &[&str] = &["running", "paused", "halted", "cancelled", "completed"];

/// The states of a device's update in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// In a stage not begun yet.
    Waiting,
    /// Offered the image.
    Offered,
    /// Downloading it.
    Downloading,
    /// Downloaded it.
    Downloaded,
    /// Checking it.
    Verifying,
    /// Installing it.
    Installing,
    /// Restarting into it.
    Rebooting,
    /// Runs it, confirmed by its `hello`.
    Confirmed,
    /// Gave up, or timed out.
    Failed,
    /// Came back on its old image.
    RolledBack,
    /// Never offered it: the deployment ended first.
    Cancelled,
}

impl UpdateState {
    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Offered => "offered",
            Self::Downloading => "downloading",
            Self::Downloaded => "downloaded",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Rebooting => "rebooting",
            Self::Confirmed => "confirmed",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Why a deployment operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Only admins deploy firmware.
    #[error("only admins deploy firmware")]
    Forbidden,
    /// No such deployment.
    #[error("no such deployment")]
    NotFound,
    /// A field is invalid: (JSON pointer, code, message).
    #[error("{2}")]
    Invalid(&'static str, &'static str, String),
    /// The image is retired.
    #[error("the image is retired: no new deployment may use it")]
    Retired,
    /// No device of the selection can take the image.
    #[error("no device of the selection can take this image ({0})")]
    EmptyCohort(String),
    /// The deployment is not in a state the operation applies to.
    #[error("the deployment is {0}")]
    WrongState(String),
    /// A device reported on a deployment it has no update in.
    #[error("this device has no update in deployment {0}")]
    NotOffered(String),
    /// A device reported a state its update cannot move to.
    #[error("an update that is {0} cannot become {1}")]
    BadTransition(String, &'static str),
    /// The firmware service refused.
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    /// The device service refused.
    #[error(transparent)]
    Devices(#[from] unhidra_devices::DeviceError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which devices a deployment is for: exactly one of the three.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// These devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub devices: Vec<Uuid>,
    /// The devices with any of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The devices of this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// A stage: how far it reaches into the cohort, what it needs to end, how long it soaks.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// The share of the cohort offered the image by the end of this stage, 1 to 100
    /// (cumulative: `5`, `25`, `100`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Or the number of devices offered it by then (cumulative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The share of this stage's devices that must confirm the image, 0 to 1 (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_share: Option<f64>,
    /// Seconds the stage runs at least before the next begins (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<u64>,
}

/// When a deployment halts itself: failures (failed or rolled back) as a count or a share of
/// the devices that finished, once `min_executed` have.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorThreshold {
    /// Halt at this many failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u64>,
    /// Halt when this share of the finished devices failed, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_share: Option<f64>,
    /// Devices that must have finished before the threshold applies (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_executed: Option<u64>,
}

/// A deployment as an admin asks for it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    /// The image, by its SHA-256.
    pub firmware: String,
    /// A name (default: the image's project and version).
    #[serde(default)]
    pub name: Option<String>,
    /// Which devices.
    pub target: Target,
    /// Its stages (default: one, every device at once).
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// When it halts itself (default: never, but for a stage that cannot succeed).
    #[serde(default)]
    pub error_threshold: Option<ErrorThreshold>,
    /// Seconds a device has from its offer to confirm the image, 60 to 604800 (default 3600).
    #[serde(default)]
    pub device_timeout: Option<u64>,
    /// When it starts (default: now).
    #[serde(default)]
    pub start_at: Option<DateTime<Utc>>,
    /// When devices install: they download at once and install inside the next opening of
    /// this daily window (default: at once).
    #[serde(default)]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Whether devices that match the target only later (registered, tagged, or back from
    /// another deployment) join it at their next `hello` while it runs or is paused, in its
    /// last stage (default: false; the cohort is the one resolved at creation).
    #[serde(default)]
    pub join_new: bool,
}

/// What a deployment keeps of its policy.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Policy {
    /// When it halts itself.
    pub error_threshold: ErrorThreshold,
    /// Seconds a device has from its offer.
    pub device_timeout: u64,
    /// Devices left out when it was made, by why (`current`, `downgrade`, `busy`).
    pub skipped: BTreeMap<String, u64>,
    /// Its maintenance window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Whether devices join it later.
    #[serde(default)]
    pub join_new: bool,
}

/// One stage as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StageView {
    /// Its devices.
    pub size: u64,
    /// The share of them that must confirm.
    pub success_share: f64,
    /// Seconds it soaks.
    pub soak: u64,
    /// Its devices by state.
    pub states: BTreeMap<String, u64>,
}

/// A deployment as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Deployment)]
pub struct DeploymentView {
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The image's SHA-256.
    pub firmware: String,
    /// The image's version.
    pub version: String,
    /// Which devices it was made for.
    pub target: Target,
    /// `scheduled`, `running`, `paused`, `halted`, `cancelled` or `completed`.
    pub state: String,
    /// The current stage, from 0.
    pub stage: i64,
    /// Why it halted, or was cancelled.
    pub reason: Option<String>,
    /// Its stages, with their devices by state.
    pub stages: Vec<StageView>,
    /// Every device by state.
    pub states: BTreeMap<String, u64>,
    /// Devices that joined after it was made (`join_new`).
    pub joined: u64,
    /// Its policy.
    pub policy: Policy,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it starts (or started).
    pub start_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One device of a deployment as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeploymentDevice)]
pub struct DeploymentDeviceView {
    /// The device.
    #[schema(value_type = String)]
    pub device: Uuid,
    /// Its stage.
    pub stage: i64,
    /// `waiting`, `offered`, `downloading`, `downloaded`, `verifying`, `installing`,
    /// `rebooting`, `confirmed`, `failed`, `rolled_back` or `cancelled`.
    pub state: String,
    /// Its download's progress, in percent.
    pub progress: Option<i64>,
    /// Why it failed.
    pub reason: Option<String>,
    /// The version it ran before.
    pub from_version: Option<String>,
    /// When it was offered the image.
    pub offered_at: Option<DateTime<Utc>>,
    /// When it fails unless it confirmed.
    pub deadline: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it joined, if it came after the deployment was made.
    pub joined_at: Option<DateTime<Utc>>,
}

impl From<DeploymentDeviceRecord> for DeploymentDeviceView {
    fn from(r: DeploymentDeviceRecord) -> Self {
        Self {
            device: r.device_id,
            stage: r.stage,
            state: r.state,
            progress: r.progress,
            reason: r.reason,
            from_version: r.from_version,
            offered_at: r.offered_at,
            deadline: r.deadline,
            updated_at: r.updated_at,
            joined_at: r.joined_at,
        }
    }
}

/// A stage as stored: its size resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredStage {
    size: u64,
    success_share: f64,
    soak: u64,
}

/// A change in a deployment, for live watchers (operators' `watch` of `deployments` or
/// `deployment:<id>`). Best-effort: the API is the record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DeploymentEvent {
    /// The deployment was made, or changed state or stage.
    Deployment {
        /// The deployment.
        deployment: Uuid,
        /// Its state now.
        state: String,
        /// Its stage now, from 0, when it changed.
        #[serde(skip_serializing_if = "Option::is_none")]
        stage: Option<i64>,
        /// Why (a halt's or cancellation's reason).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// One of its devices moved.
    Device {
        /// The deployment.
        deployment: Uuid,
        /// The device.
        device: Uuid,
        /// Its state now.
        state: String,
        /// Its download's progress, in percent.
        #[serde(skip_serializing_if = "Option::is_none")]
        progress: Option<i64>,
        /// Why it failed or was cancelled.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl DeploymentEvent {
    /// The deployment it is about.
    pub fn deployment(&self) -> Uuid {
        match self {
            Self::Deployment { deployment, .. } | Self::Device { deployment, .. } => *deployment,
        }
    }
}

/// How many deployment events a slow watcher may fall behind before it is told it lagged.
const EVENT_BUFFER: usize = 1024;

/// Locks that keep each device's events in the order of its moves.
const ORDERING_STRIPES: usize = 64;

/// The deployment service; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct Deployments(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    firmware: Firmware,
    devices: Devices,
    audit: AuditLog,
    require_admin_mfa: bool,
    /// Prefixed to a download link's path in offers (the server's public URL), if any.
    public_url: Option<String>,
    events: tokio::sync::broadcast::Sender<DeploymentEvent>,
    /// Held from a row's write to its event, by device (or deployment): two moves of one
    /// device reach watchers in the order they were stored.
    ordering: Box<[tokio::sync::Mutex<()>]>,
}

fn invalid(field: &'static str, code: &'static str, message: impl Into<String>) -> DeployError {
    DeployError::Invalid(field, code, message.into())
}

fn share(field: &'static str, value: Option<f64>, default: f64) -> Result<f64, DeployError> {
    match value {
        None => Ok(default),
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Some(_) => Err(invalid(field, "out_of_range", "a share is 0 to 1")),
    }
}

/// The stages' sizes over a cohort of `n` devices: cumulative reach turned into each stage's
/// own number of devices, the last one taking every remaining device.
fn resolve_stages(stages: &[Stage], n: u64) -> Result<Vec<StoredStage>, DeployError> {
    if stages.len() > MAX_STAGES {
        return Err(invalid(
            "/stages",
            "too_many",
            format!("at most {MAX_STAGES} stages"),
        ));
    }
    let one = [Stage {
        percent: Some(100.0),
        count: None,
        success_share: None,
        soak: None,
    }];
    let stages = if stages.is_empty() { &one[..] } else { stages };
    let mut out = Vec::new();
    let mut reached = 0u64;
    let (mut last_percent, mut last_count) = (0.0_f64, 0_u64);
    for (i, stage) in stages.iter().enumerate() {
        let last = i + 1 == stages.len();
        // As declared, whatever the cohort's size: each stage reaches further.
        let declared_more = match (stage.percent, stage.count) {
            (Some(p), None) => {
                let more = p > last_percent;
                last_percent = p;
                more
            }
            (None, Some(c)) => {
                let more = c > last_count;
                last_count = c;
                more
            }
            _ => true,
        };
        if !declared_more {
            return Err(invalid(
                "/stages",
                "invalid_stage",
                "stages reach further each time (they are cumulative)",
            ));
        }
        let reach = match (stage.percent, stage.count) {
            (Some(p), None) if p > 0.0 && p <= 100.0 => {
                // At least one device per stage, so that a small cohort still soaks.
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss,
                    reason = "a share of at most 100 000 devices"
                )]
                let reach = ((p / 100.0) * n as f64).ceil() as u64;
                reach.max(1)
            }
            (None, Some(c)) if c > 0 => c,
            _ => {
                return Err(invalid(
                    "/stages",
                    "invalid_stage",
                    "each stage has either `percent` (more than 0, at most 100) or `count` \
                     (at least 1)",
                ));
            }
        };
        let reach = if last { n } else { reach.min(n) };
        if reach < reached {
            return Err(invalid(
                "/stages",
                "invalid_stage",
                "stages reach further each time (they are cumulative)",
            ));
        }
        let soak = stage.soak.unwrap_or(0);
        if soak > 30 * 24 * 3600 {
            return Err(invalid(
                "/stages",
                "out_of_range",
                "a stage soaks at most 30 days",
            ));
        }
        out.push(StoredStage {
            size: reach - reached,
            success_share: share("/stages", stage.success_share, DEFAULT_SUCCESS_SHARE)?,
            soak,
        });
        reached = reach;
    }
    // A small cohort leaves some stages empty: they are dropped (one stays).
    if out.iter().any(|s| s.size > 0) {
        out.retain(|s| s.size > 0);
    }
    Ok(out)
}

fn parse_stored<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, DeployError> {
    serde_json::from_str(text).map_err(|e| DeployError::Store(StoreError::Other(Box::new(e))))
}

/// The order of a device's states, for reports that may only move forward.
fn rank(state: &str) -> Option<usize> {
    IN_FLIGHT.iter().position(|s| *s == state)
}

impl Deployments {
    /// The service.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        firmware: Firmware,
        devices: Devices,
        audit: AuditLog,
        require_admin_mfa: bool,
        public_url: Option<String>,
    ) -> Self {
        Self(Arc::new(Inner {
            store,
            clock,
            firmware,
            devices,
            audit,
            require_admin_mfa,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_owned()),
            events: tokio::sync::broadcast::channel(EVENT_BUFFER).0,
            ordering: (0..ORDERING_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }))
    }

    /// Live changes of every deployment on this node (a watcher filters them).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<DeploymentEvent> {
        self.0.events.subscribe()
    }

    /// Whether `who` may follow deployments live (as the API: admins).
    pub fn may_watch(&self, who: &Principal) -> bool {
        self.admin(who).is_ok()
    }

    fn emit(&self, event: DeploymentEvent) {
        // No watcher is not an error.
        let _ = self.0.events.send(event);
    }

    fn ordering(&self, id: Uuid) -> &tokio::sync::Mutex<()> {
        // Ids are random: their last byte spreads them over the stripes.
        &self.0.ordering[usize::from(id.as_bytes()[15]) % ORDERING_STRIPES]
    }

    /// Moves a device's row (compare-and-set); watchers hear of it when it moved.
    async fn transition(&self, t: &DeviceTransition<'_>) -> Result<bool, DeployError> {
        let _ordered = self.ordering(t.device).lock().await;
        let moved = self.0.store.transition_device(t).await?;
        if moved {
            self.emit(DeploymentEvent::Device {
                deployment: t.deployment,
                device: t.device,
                state: t.to.to_owned(),
                progress: t.progress,
                reason: t.reason.map(str::to_owned),
            });
        }
        Ok(moved)
    }

    /// Changes a deployment (compare-and-set); watchers hear of it when it changed.
    async fn change(&self, c: &DeploymentChange<'_>) -> Result<bool, DeployError> {
        let _ordered = self.ordering(c.id).lock().await;
        let changed = self.0.store.change_deployment(c).await?;
        if changed {
            self.emit(DeploymentEvent::Deployment {
                deployment: c.id,
                state: c.to.to_owned(),
                stage: c.stage,
                reason: c.reason.map(str::to_owned),
            });
        }
        Ok(changed)
    }

    fn admin(&self, who: &Principal) -> Result<(), DeployError> {
        if who.has_admin_powers(self.0.require_admin_mfa) {
            Ok(())
        } else {
            Err(DeployError::Forbidden)
        }
    }

    fn now(&self) -> DateTime<Utc> {
        let now = self.0.clock.now();
        DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
    }

    /// Makes a deployment: checks the request, resolves and keeps its cohort, shuffles it into
    /// stages, and starts it now or at `start_at`. Audited.
    pub async fn create(
        &self,
        who: &Principal,
        new: NewDeployment,
        ctx: &RequestContext,
    ) -> Result<DeploymentView, DeployError> {
        self.admin(who)?;
        let image = self.0.firmware.get(who, &new.firmware).await?;
        if image.retired_at.is_some() {
            return Err(DeployError::Retired);
        }
        let name = match new.name.as_deref().map(str::trim) {
            None | Some("") => format!("{} {}", image.project, image.version),
            Some(n)
                if n.chars().count() <= 100
                    && unhidra_core::forbidden_control(n, unhidra_core::Controls::None)
                        .is_none() =>
            {
                n.to_owned()
            }
            Some(_) => {
                return Err(invalid(
                    "/name",
                    "invalid_length",
                    "a name has at most 100 characters and no control characters",
                ));
            }
        };
        let device_timeout = new.device_timeout.unwrap_or(DEFAULT_DEVICE_TIMEOUT);
        if !(60..=7 * 24 * 3600).contains(&device_timeout) {
            return Err(invalid(
                "/device_timeout",
                "out_of_range",
                "device_timeout is 60 to 604800 seconds",
            ));
        }
        let threshold = new.error_threshold.clone().unwrap_or_default();
        share(
            "/error_threshold/max_failure_share",
            threshold.max_failure_share,
            0.0,
        )?;
        // A threshold of nothing would halt at the first device, even a confirmed one.
        if threshold.max_failures == Some(0) || threshold.max_failure_share == Some(0.0) {
            return Err(invalid(
                "/error_threshold",
                "out_of_range",
                "max_failures is at least 1 and max_failure_share more than 0",
            ));
        }
        let now = self.now();
        let start_at = new.start_at.unwrap_or(now).max(now);
        if start_at > now + Duration::days(365) {
            return Err(invalid(
                "/start_at",
                "out_of_range",
                "a deployment starts within a year",
            ));
        }
        if let Some(window) = &new.maintenance_window {
            Window::parse(window)?;
        }
        let selected = self.select(&new.target).await?;
        // Who can take the image: not those that run it, not below their anti-rollback
        // version, not those another deployment is updating.
        let busy: HashSet<Uuid> = self
            .0
            .store
            .devices_in_deployments(&selected, ALL_STATES)
            .await?
            .into_iter()
            .collect();
        let mut skipped = BTreeMap::<String, u64>::new();
        let mut cohort = Vec::new();
        for boot in self.0.store.device_boots(&selected).await? {
            let why = if boot.firmware.as_deref() == Some(image.version.as_str()) {
                Some("current")
            } else if boot
                .secure_version
                .is_some_and(|v| v > image.secure_version)
            {
                Some("downgrade")
            } else if busy.contains(&boot.device_id) {
                Some("busy")
            } else {
                None
            };
            match why {
                Some(why) => *skipped.entry(why.to_owned()).or_default() += 1,
                None => cohort.push(boot),
            }
        }
        if cohort.is_empty() {
            let why = if skipped.is_empty() {
                "it selects no device".to_owned()
            } else {
                skipped
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(DeployError::EmptyCohort(why));
        }
        let stages = resolve_stages(&new.stages, cohort.len() as u64)?;
        cohort.shuffle(&mut rand::rng());
        let id = Uuid::new_v4();
        let mut rows = Vec::with_capacity(cohort.len());
        let mut at = 0usize;
        for (index, stage) in stages.iter().enumerate() {
            let size = usize::try_from(stage.size).unwrap_or(usize::MAX);
            for boot in cohort.iter().skip(at).take(size) {
                rows.push(DeploymentDeviceRecord {
                    deployment_id: id,
                    device_id: boot.device_id,
                    stage: i64::try_from(index).unwrap_or_default(),
                    state: "waiting".into(),
                    progress: None,
                    reason: None,
                    command_id: None,
                    from_version: boot.firmware.clone(),
                    from_partition: boot.partition.clone(),
                    offered_at: None,
                    deadline: None,
                    updated_at: now,
                    joined_at: None,
                });
            }
            at += size;
        }
        let policy = Policy {
            error_threshold: threshold,
            device_timeout,
            skipped,
            maintenance_window: new.maintenance_window.clone(),
            join_new: new.join_new,
        };
        let started = start_at <= now;
        let record = DeploymentRecord {
            id,
            name,
            firmware_sha256: image.sha256.clone(),
            target: serde_json::to_string(&new.target).unwrap_or_default(),
            stages: serde_json::to_string(&stages).unwrap_or_default(),
            policy: serde_json::to_string(&policy).unwrap_or_default(),
            state: if started { "running" } else { "scheduled" }.into(),
            stage: 0,
            stage_started_at: started.then_some(now),
            reason: None,
            created_by: Some(who.user_id),
            created_at: now,
            start_at,
            finished_at: None,
        };
        self.0.store.create_deployment(&record, &rows).await?;
        self.emit(DeploymentEvent::Deployment {
            deployment: id,
            state: record.state.clone(),
            stage: Some(0),
            reason: None,
        });
        self.0
            .audit
            .record(
                "deployment.created",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({
                    "firmware": image.sha256, "version": image.version,
                    "devices": rows.len(), "stages": stages.len(), "skipped": policy.skipped,
                }),
            )
            .await;
        if started && let Err(e) = self.offer_stage(&record).await {
            // Made and running: the next tick makes the offers still owed.
            tracing::warn!(deployment = %id, error = %e, "first offers not made");
        }
        self.view(self.0.store.deployment(id).await?).await
    }

    /// The ids a target selects.
    async fn select(&self, target: &Target) -> Result<Vec<Uuid>, DeployError> {
        let kinds = usize::from(!target.devices.is_empty())
            + usize::from(!target.tags.is_empty())
            + usize::from(target.model.is_some());
        if kinds != 1 {
            return Err(invalid(
                "/target",
                "invalid_target",
                "a target names exactly one of `devices`, `tags` or `model`",
            ));
        }
        if target.devices.len() > MAX_COHORT || target.tags.len() > 32 {
            return Err(invalid(
                "/target",
                "too_many",
                format!("a target names at most {MAX_COHORT} devices or 32 tags"),
            ));
        }
        let mut ids: Vec<Uuid> = Vec::new();
        if !target.devices.is_empty() {
            let mut seen = HashSet::new();
            for id in &target.devices {
                if !seen.insert(*id) {
                    continue;
                }
                match self.0.store.device(*id).await {
                    Ok(_) => ids.push(*id),
                    Err(StoreError::NotFound { .. }) => {
                        return Err(invalid(
                            "/target/devices",
                            "not_found",
                            format!("no device {id}"),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(ids);
        }
        let filters: Vec<DeviceFilter> = if let Some(model) = &target.model {
            vec![DeviceFilter {
                model: Some(model.clone()),
                ..DeviceFilter::default()
            }]
        } else {
            target
                .tags
                .iter()
                .map(|tag| DeviceFilter {
                    tag: Some(tag.clone()),
                    ..DeviceFilter::default()
                })
                .collect()
        };
        let mut seen = HashSet::new();
        for mut filter in filters {
            filter.limit = 1000;
            loop {
                let (page, _) = self.0.store.list_devices(&filter).await?;
                let got = page.len() as u64;
                for d in page {
                    if seen.insert(d.id) {
                        ids.push(d.id);
                    }
                }
                if ids.len() > MAX_COHORT {
                    return Err(invalid(
                        "/target",
                        "too_many",
                        format!("a deployment has at most {MAX_COHORT} devices"),
                    ));
                }
                if got < filter.limit {
                    break;
                }
                filter.offset += got;
            }
        }
        Ok(ids)
    }

    /// A deployment with its counts.
    async fn view(&self, d: DeploymentRecord) -> Result<DeploymentView, DeployError> {
        let stages: Vec<StoredStage> = parse_stored(&d.stages)?;
        let counts = self.0.store.deployment_counts(d.id).await?;
        let version = self
            .0
            .store
            .firmware(&d.firmware_sha256)
            .await
            .map(|f| f.version)
            .unwrap_or_default();
        let joined = self.0.store.joined_devices(d.id).await?;
        let mut states = BTreeMap::new();
        let mut per_stage: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); stages.len()];
        for StageCount {
            stage,
            state,
            count,
        } in counts
        {
            *states.entry(state.clone()).or_default() += count;
            if let Some(s) = usize::try_from(stage)
                .ok()
                .and_then(|i| per_stage.get_mut(i))
            {
                *s.entry(state).or_default() += count;
            }
        }
        Ok(DeploymentView {
            id: d.id,
            name: d.name,
            firmware: d.firmware_sha256,
            version,
            target: parse_stored(&d.target)?,
            state: d.state,
            stage: d.stage,
            reason: d.reason,
            stages: stages
                .into_iter()
                .zip(per_stage)
                .map(|(s, states)| StageView {
                    // As evaluated: its devices now (joiners in, deleted devices out).
                    size: states.values().sum(),
                    success_share: s.success_share,
                    soak: s.soak,
                    states,
                })
                .collect(),
            states,
            joined,
            policy: parse_stored(&d.policy)?,
            created_at: d.created_at,
            start_at: d.start_at,
            finished_at: d.finished_at,
        })
    }

    async fn record(&self, id: Uuid) -> Result<DeploymentRecord, DeployError> {
        match self.0.store.deployment(id).await {
            Err(StoreError::NotFound { .. }) => Err(DeployError::NotFound),
            other => Ok(other?),
        }
    }

    /// One deployment.
    pub async fn get(&self, who: &Principal, id: Uuid) -> Result<DeploymentView, DeployError> {
        self.admin(who)?;
        self.view(self.record(id).await?).await
    }

    /// Deployments, newest first (at most 200).
    pub async fn list(&self, who: &Principal) -> Result<Vec<DeploymentView>, DeployError> {
        self.admin(who)?;
        let mut out = Vec::new();
        for d in self.0.store.list_deployments(200).await? {
            out.push(self.view(d).await?);
        }
        Ok(out)
    }

    /// A deployment's devices, in a state when given, by stage, a page of at most [`PAGE`].
    pub async fn devices(
        &self,
        who: &Principal,
        id: Uuid,
        state: Option<UpdateState>,
        offset: u64,
    ) -> Result<Vec<DeploymentDeviceView>, DeployError> {
        self.admin(who)?;
        self.record(id).await?;
        Ok(self
            .0
            .store
            .deployment_devices(id, state.map(UpdateState::as_str), offset, PAGE)
            .await?
            .into_iter()
            .map(DeploymentDeviceView::from)
            .collect())
    }

    /// Pauses a running deployment: no new offers; devices mid-way carry on.
    pub async fn pause(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<DeploymentView, DeployError> {
        self.admin(who)?;
        let d = self.record(id).await?;
        self.move_to(&d, &["running", "scheduled"], "paused", None)
            .await?;
        self.audit(who, id, "deployment.paused", ctx).await;
        self.get(who, id).await
    }

    /// Resumes a paused deployment where it was.
    pub async fn resume(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<DeploymentView, DeployError> {
        self.admin(who)?;
        let d = self.record(id).await?;
        self.move_to(&d, &["paused"], "running", None).await?;
        self.audit(who, id, "deployment.resumed", ctx).await;
        let d = self.record(id).await?;
        self.offer_stage(&d).await?;
        self.get(who, id).await
    }

    /// Cancels a deployment: devices not yet updating are withdrawn; those mid-way carry on
    /// and are still followed.
    pub async fn cancel(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<DeploymentView, DeployError> {
        self.admin(who)?;
        let d = self.record(id).await?;
        self.stop(
            &d,
            &["scheduled", "running", "paused", "halted"],
            "cancelled",
            "cancelled",
        )
        .await?;
        self.audit(who, id, "deployment.cancelled", ctx).await;
        self.get(who, id).await
    }

    async fn audit(&self, who: &Principal, id: Uuid, kind: &str, ctx: &RequestContext) {
        self.0
            .audit
            .record(
                kind,
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({}),
            )
            .await;
    }

    async fn move_to(
        &self,
        d: &DeploymentRecord,
        from: &[&str],
        to: &str,
        reason: Option<&str>,
    ) -> Result<(), DeployError> {
        let now = self.now();
        let finished = matches!(to, "halted" | "cancelled" | "completed").then_some(now);
        let started = (to == "running" && d.stage_started_at.is_none()).then_some(now);
        let changed = self
            .change(&DeploymentChange {
                id: d.id,
                from,
                from_stage: None,
                to,
                stage: None,
                stage_started_at: started,
                reason,
                finished_at: finished,
            })
            .await?;
        if !changed {
            return Err(DeployError::WrongState(
                self.record(d.id).await.map(|d| d.state).unwrap_or_default(),
            ));
        }
        if matches!(to, "halted" | "completed") {
            self.0
                .audit
                .record(
                    &format!("deployment.{to}"),
                    None,
                    Some(d.id.to_string()),
                    &RequestContext::default(),
                    serde_json::json!({ "reason": reason }),
                )
                .await;
        }
        if matches!(to, "halted" | "completed" | "cancelled") {
            OtaMetrics::count(&self.0.firmware.metrics().deployments, static_state(to));
        }
        Ok(())
    }

    /// Ends a deployment (halted or cancelled): its waiting devices are cancelled, and so are
    /// those whose offer has not reached them yet (the offer is withdrawn). Devices that have
    /// their offer may be mid-way: they are still followed to their end (or their deadline).
    async fn stop(
        &self,
        d: &DeploymentRecord,
        from: &[&str],
        to: &str,
        reason: &str,
    ) -> Result<(), DeployError> {
        self.move_to(d, from, to, Some(reason)).await?;
        for state in ["waiting", "offered"] {
            // Rows left as they are stay in the listing: the next page starts past them.
            let mut offset = 0;
            loop {
                let rows = self
                    .0
                    .store
                    .deployment_devices(d.id, Some(state), offset, PAGE)
                    .await?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    if !self.withdraw(d.id, &row, reason).await? {
                        offset += 1;
                    }
                }
            }
        }
        tracing::info!(deployment = %d.id, state = to, reason, "deployment ended");
        Ok(())
    }

    /// Cancels a device's row unless its offer has reached it (or is being sent: no command
    /// yet, which the sender checks itself), withdrawing the offer; true if it was cancelled.
    async fn withdraw(
        &self,
        deployment: Uuid,
        row: &DeploymentDeviceRecord,
        reason: &str,
    ) -> Result<bool, DeployError> {
        if row.state == "offered" {
            let queued = match row.command_id {
                Some(command) => self
                    .0
                    .store
                    .command(command)
                    .await
                    .is_ok_and(|c| c.state == unhidra_store::devices::CommandState::Queued),
                None => false,
            };
            if !queued {
                return Ok(false);
            }
        }
        let moved = self
            .transition(&DeviceTransition {
                deployment,
                device: row.device_id,
                from: &[row.state.as_str()],
                to: "cancelled",
                progress: None,
                reason: Some(reason),
                now: self.now(),
            })
            .await?;
        if moved {
            OtaMetrics::count(&self.0.firmware.metrics().updates, "cancelled");
        }
        if moved && let Some(command) = row.command_id {
            self.0
                .devices
                .withdraw_command(row.device_id, command, reason)
                .await?;
        }
        Ok(moved)
    }

    /// Offers the image to the waiting devices of the current stage and those before it. A
    /// device whose offer cannot be sent waits again for the next tick.
    async fn offer_stage(&self, d: &DeploymentRecord) -> Result<(), DeployError> {
        if d.state != "running" {
            return Ok(());
        }
        let signed = self.0.firmware.signed_manifest(&d.firmware_sha256).await?;
        let policy: Policy = parse_stored(&d.policy)?;
        let now = self.now();
        let rows: Vec<DeploymentDeviceRecord> = self
            .0
            .store
            .deployment_devices(d.id, Some("waiting"), 0, OFFERS_PER_TICK)
            .await?
            .into_iter()
            .filter(|r| r.stage <= d.stage)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        // With a maintenance window, the device's time runs from the window's opening: it
        // downloads now and installs then.
        let opening = match &policy.maintenance_window {
            Some(w) => Some(Window::parse(w)?.next_opening(now)),
            None => None,
        };
        let from = opening.map_or(now, |o| o.start.max(now));
        let deadline =
            from + Duration::seconds(i64::try_from(policy.device_timeout).unwrap_or(i64::MAX));
        let ttl = u64::try_from((deadline - now).num_seconds())
            .unwrap_or(1)
            .clamp(1, unhidra_devices::commands::MAX_TTL_SECS);
        let install_window = opening.map(|o| InstallWindow {
            start: o.start.timestamp_millis(),
            end: o.end.timestamp_millis(),
        });
        // Anti-rollback versions as the devices report them now: one that rose since the
        // deployment was made would refuse the image (or brick trying): it fails here instead.
        let ids: Vec<Uuid> = rows.iter().map(|r| r.device_id).collect();
        let above: HashSet<Uuid> = self
            .0
            .store
            .device_boots(&ids)
            .await?
            .into_iter()
            .filter(|b| {
                b.secure_version
                    .is_some_and(|v| v > i64::from(signed.manifest.secure_version))
            })
            .map(|b| b.device_id)
            .collect();
        let mut made = Vec::new();
        for row in rows {
            if above.contains(&row.device_id) {
                self.refuse_downgrade(d, row.device_id, &["waiting"])
                    .await?;
                continue;
            }
            // The row first, while the deployment runs: a deployment that ends meanwhile (or
            // another node's offer) wins, and no offer goes out that the deployment does not
            // know of.
            let offered = {
                let _ordered = self.ordering(row.device_id).lock().await;
                let offered = self
                    .0
                    .store
                    .offer_device(d.id, row.device_id, deadline, now)
                    .await?;
                if offered {
                    self.emit(DeploymentEvent::Device {
                        deployment: d.id,
                        device: row.device_id,
                        state: "offered".into(),
                        progress: None,
                        reason: None,
                    });
                }
                offered
            };
            if !offered {
                continue;
            }
            // The link works as long as the offer does (it comes again after reconnects).
            let link = self
                .0
                .firmware
                .sign_link_until(&d.firmware_sha256, row.device_id, deadline);
            let url = match &self.0.public_url {
                Some(base) => format!("{base}{}", link.url),
                None => link.url,
            };
            let offer = Offer {
                deployment: d.id.to_string(),
                manifest: signed.clone(),
                url,
                size: signed.manifest.size,
                install_window,
            };
            let params = serde_json::to_value(&offer)
                .map_err(|e| DeployError::Store(StoreError::Other(Box::new(e))))?;
            let sent = self
                .0
                .devices
                .send_service_command(
                    row.device_id,
                    NewCommand {
                        name: OFFER_COMMAND.into(),
                        params: Some(params),
                        ttl: Some(ttl),
                        idempotency_key: Some(format!("{OFFER_KEY_PREFIX}{}", d.id)),
                    },
                )
                .await;
            let command = match sent {
                Ok((command, _))
                    if command.name == OFFER_COMMAND && command.created_by.is_none() =>
                {
                    command
                }
                other => {
                    tracing::warn!(deployment = %d.id, device = %row.device_id, outcome = ?other.map(|c| c.0.id), "offer not sent; the device waits again");
                    self.transition(&DeviceTransition {
                        deployment: d.id,
                        device: row.device_id,
                        from: &["offered"],
                        to: "waiting",
                        progress: None,
                        reason: None,
                        now,
                    })
                    .await?;
                    continue;
                }
            };
            self.0
                .store
                .set_offer_command(d.id, row.device_id, command.id)
                .await?;
            self.0.firmware.metrics().offers.inc();
            let mut row = row;
            row.state = "offered".into();
            row.command_id = Some(command.id);
            made.push(row);
        }
        // Ended while offers went out (no new one is made once it has: `offer_device` checks):
        // those are withdrawn, unless their device has them already.
        if !made.is_empty() {
            let current = self.record(d.id).await?;
            if current.state != "running" {
                let reason = current.reason.unwrap_or_else(|| current.state.clone());
                for row in &made {
                    self.withdraw(d.id, row, &reason).await?;
                }
            }
        }
        Ok(())
    }

    /// A device's report on its update.
    pub async fn report(
        &self,
        device: Uuid,
        deployment: &str,
        state: OtaState,
        progress: Option<u8>,
        reason: Option<&str>,
    ) -> Result<(), DeployError> {
        if let Some(reason) = reason
            && !valid_reason(reason)
        {
            return Err(invalid(
                "reason",
                "invalid_format",
                "a reason is 1 to 64 ASCII letters, digits and `._:-`",
            ));
        }
        if progress.is_some_and(|p| p > 100) {
            return Err(invalid("progress", "out_of_range", "progress is 0 to 100"));
        }
        let not_offered = || DeployError::NotOffered(deployment.chars().take(64).collect());
        let id: Uuid = deployment.parse().map_err(|_| not_offered())?;
        let Some((d, row)) = self.0.store.active_deployment_of(device, TRACKED).await? else {
            return Err(not_offered());
        };
        if d.id != id || row.state == "waiting" {
            return Err(not_offered());
        }
        let to = state.as_str();
        let from: Vec<&str> = match state {
            OtaState::Failed | OtaState::RolledBack => IN_FLIGHT.to_vec(),
            _ => {
                let at = rank(to).unwrap_or(usize::MAX);
                IN_FLIGHT
                    .iter()
                    .copied()
                    .filter(|s| rank(s).is_some_and(|r| r <= at))
                    .collect()
            }
        };
        let reason = match state {
            OtaState::Failed | OtaState::RolledBack => Some(reason.unwrap_or("unknown")),
            _ => None,
        };
        let moved = self
            .transition(&DeviceTransition {
                deployment: d.id,
                device,
                from: &from,
                to,
                progress: progress.map(i64::from),
                reason,
                now: self.now(),
            })
            .await?;
        if !moved {
            return Err(DeployError::BadTransition(row.state, to));
        }
        if matches!(state, OtaState::Failed | OtaState::RolledBack) {
            self.ended(&d, device, to, reason).await;
        }
        Ok(())
    }

    /// What a device's `hello` says of its update: the new version from another partition is
    /// `confirmed`; the old one after the install began is `rolled_back`; an anti-rollback
    /// version that rose above the image's before the update began fails it (`downgrade`).
    /// A device in no deployment joins one that takes newcomers (`join_new`) and targets it.
    /// Called once the hello is stored.
    pub async fn on_hello(
        &self,
        device: Uuid,
        firmware: &str,
        partition: Option<&str>,
    ) -> Result<(), DeployError> {
        let Some((d, row)) = self.0.store.active_deployment_of(device, TRACKED).await? else {
            return self.join(device).await;
        };
        let image = self.0.store.firmware(&d.firmware_sha256).await?;
        if matches!(row.state.as_str(), "waiting" | "offered") {
            let boot = self.0.store.device_boots(&[device]).await?;
            if boot
                .first()
                .and_then(|b| b.secure_version)
                .is_some_and(|v| v > image.secure_version)
            {
                self.refuse_downgrade(&d, device, &[row.state.as_str()])
                    .await?;
                if let Some(command) = row.command_id {
                    self.0
                        .devices
                        .withdraw_command(device, command, "downgrade")
                        .await?;
                }
                return self.evaluate(d.id).await;
            }
        }
        if row.state == "waiting" {
            return Ok(());
        }
        let version = image.version;
        // When the device said where it ran from before, the new version must run from
        // elsewhere: the same partition would mean nothing was switched.
        let moved_partition = match (row.from_partition.as_deref(), partition) {
            (Some(before), Some(now)) => before != now,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let (to, from, reason): (&str, &[&str], Option<&str>) =
            if firmware == version && moved_partition {
                ("confirmed", IN_FLIGHT, None)
            } else if firmware != version {
                // Only after the restart it announced: a reconnect while installing is not a
                // rollback.
                ("rolled_back", &["rebooting"], Some("old_version_running"))
            } else {
                return Ok(());
            };
        let moved = self
            .transition(&DeviceTransition {
                deployment: d.id,
                device,
                from,
                to,
                progress: None,
                reason,
                now: self.now(),
            })
            .await?;
        if moved {
            self.ended(&d, device, to, reason).await;
        }
        Ok(())
    }

    /// A device that is in no deployment joins the oldest running or paused one that takes
    /// newcomers, targets it and has an image it can take, in its last stage; audited, and
    /// offered the image at once when that stage has begun.
    async fn join(&self, device: Uuid) -> Result<(), DeployError> {
        let mut open = Vec::new();
        for d in self.0.store.deployments_in(&["running", "paused"]).await? {
            if parse_stored::<Policy>(&d.policy)?.join_new {
                open.push(d);
            }
        }
        if open.is_empty() {
            return Ok(());
        }
        open.sort_by_key(|d| d.created_at);
        let record = match self.0.store.device(device).await {
            Ok(record) => record,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let boot = self
            .0
            .store
            .device_boots(&[device])
            .await?
            .into_iter()
            .next()
            .unwrap_or_default();
        for d in open {
            let target: Target = parse_stored(&d.target)?;
            let targeted = target.devices.contains(&device)
                || target.model.as_deref() == Some(record.model.as_str())
                || target.tags.iter().any(|t| record.tags.contains(t));
            if !targeted {
                continue;
            }
            let image = self.0.store.firmware(&d.firmware_sha256).await?;
            // A retired image takes no new device; nor does a deployment at the cohort's size.
            if image.retired_at.is_some()
                || boot.firmware.as_deref() == Some(image.version.as_str())
                || boot
                    .secure_version
                    .is_some_and(|v| v > image.secure_version)
            {
                continue;
            }
            let members: u64 = self
                .0
                .store
                .deployment_counts(d.id)
                .await?
                .iter()
                .map(|c| c.count)
                .sum();
            if members >= MAX_COHORT as u64 {
                continue;
            }
            let stages: Vec<StoredStage> = parse_stored(&d.stages)?;
            let now = self.now();
            let row = DeploymentDeviceRecord {
                deployment_id: d.id,
                device_id: device,
                stage: i64::try_from(stages.len().saturating_sub(1)).unwrap_or_default(),
                state: "waiting".into(),
                progress: None,
                reason: None,
                command_id: None,
                from_version: boot.firmware.clone(),
                from_partition: boot.partition.clone(),
                offered_at: None,
                deadline: None,
                updated_at: now,
                joined_at: Some(now),
            };
            // Not twice into one deployment, nor with an update open elsewhere (another node's
            // join may have won).
            let joined = {
                let _ordered = self.ordering(device).lock().await;
                let joined = self.0.store.join_deployment(&row).await?;
                if joined {
                    self.emit(DeploymentEvent::Device {
                        deployment: d.id,
                        device,
                        state: "waiting".into(),
                        progress: None,
                        reason: None,
                    });
                }
                joined
            };
            if !joined {
                continue;
            }
            tracing::info!(deployment = %d.id, %device, "device joined the deployment");
            self.0
                .audit
                .record(
                    "deployment.device_joined",
                    None,
                    Some(d.id.to_string()),
                    &RequestContext::default(),
                    serde_json::json!({ "device": device, "stage": row.stage }),
                )
                .await;
            return self.offer_stage(&self.record(d.id).await?).await;
        }
        Ok(())
    }

    /// A device whose anti-rollback version is above the image's fails with `downgrade`
    /// (from one of `from`); its offer, if any, is withdrawn. The deployment is evaluated at
    /// its next tick.
    async fn refuse_downgrade(
        &self,
        d: &DeploymentRecord,
        device: Uuid,
        from: &[&str],
    ) -> Result<(), DeployError> {
        let moved = self
            .transition(&DeviceTransition {
                deployment: d.id,
                device,
                from,
                to: "failed",
                progress: None,
                reason: Some("downgrade"),
                now: self.now(),
            })
            .await?;
        if moved {
            tracing::info!(deployment = %d.id, %device, "update refused: a downgrade below the device's anti-rollback version");
            self.counted(d, device, "failed", Some("downgrade")).await;
        }
        Ok(())
    }

    /// A device's update ended: counted and audited.
    async fn counted(&self, d: &DeploymentRecord, device: Uuid, state: &str, reason: Option<&str>) {
        OtaMetrics::count(&self.0.firmware.metrics().updates, static_state(state));
        self.0
            .audit
            .record(
                &format!("deployment.device_{state}"),
                None,
                Some(d.id.to_string()),
                &RequestContext::default(),
                serde_json::json!({ "device": device, "reason": reason }),
            )
            .await;
    }

    /// A device's update ended: counted and audited, then the deployment looked at again.
    async fn ended(&self, d: &DeploymentRecord, device: Uuid, state: &str, reason: Option<&str>) {
        self.counted(d, device, state, reason).await;
        if let Err(e) = self.evaluate(d.id).await {
            tracing::warn!(deployment = %d.id, error = %e, "deployment not evaluated");
        }
    }

    /// Looks at a running deployment: halts it past its error threshold or when its stage can
    /// no longer succeed, moves to the next stage, or completes it.
    pub async fn evaluate(&self, id: Uuid) -> Result<(), DeployError> {
        let d = self.record(id).await?;
        if d.state != "running" {
            return Ok(());
        }
        let stages: Vec<StoredStage> = parse_stored(&d.stages)?;
        let policy: Policy = parse_stored(&d.policy)?;
        let counts = self.0.store.deployment_counts(id).await?;
        let count = |stage: Option<i64>, states: &[&str]| -> u64 {
            counts
                .iter()
                .filter(|c| {
                    stage.is_none_or(|s| c.stage == s) && states.contains(&c.state.as_str())
                })
                .map(|c| c.count)
                .sum()
        };
        let failures = count(None, &["failed", "rolled_back"]);
        let executed = failures + count(None, &["confirmed"]);
        let t = &policy.error_threshold;
        if executed >= t.min_executed.unwrap_or(1).max(1) && executed > 0 {
            #[allow(clippy::cast_precision_loss, reason = "counts of at most 100 000")]
            let failed_share = failures as f64 / executed as f64;
            if t.max_failures.is_some_and(|m| failures >= m)
                || t.max_failure_share.is_some_and(|s| failed_share >= s)
            {
                let reason = format!("error_threshold: {failures} of {executed} failed");
                return self.halt(&d, &reason).await;
            }
        }
        let Some(stage) = usize::try_from(d.stage).ok().and_then(|i| stages.get(i)) else {
            return Ok(());
        };
        // The stage's devices as they are now (a deleted device leaves its stage).
        let size = counts
            .iter()
            .filter(|c| c.stage == d.stage)
            .map(|c| c.count)
            .sum::<u64>();
        let confirmed = count(Some(d.stage), &["confirmed"]);
        let finished = count(Some(d.stage), FINAL);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a share of at most 100 000 devices"
        )]
        let needed = ((stage.success_share * size as f64).ceil() as u64).min(size);
        let now = self.now();
        let soaked = d.stage_started_at.is_none_or(|at| {
            now >= at + Duration::seconds(i64::try_from(stage.soak).unwrap_or(i64::MAX))
        });
        if confirmed >= needed {
            if !soaked {
                return Ok(());
            }
            let next = d.stage + 1;
            if usize::try_from(next).is_ok_and(|n| n < stages.len()) {
                // From this stage only: a node that read the deployment earlier cannot move it
                // back.
                if self
                    .change(&DeploymentChange {
                        id,
                        from: &["running"],
                        from_stage: Some(d.stage),
                        to: "running",
                        stage: Some(next),
                        stage_started_at: Some(now),
                        reason: None,
                        finished_at: None,
                    })
                    .await?
                {
                    tracing::info!(deployment = %id, stage = next, "deployment stage begins");
                    self.offer_stage(&self.record(id).await?).await?;
                }
            } else if count(None, FINAL) == counts.iter().map(|c| c.count).sum::<u64>() {
                match self.move_to(&d, &["running"], "completed", None).await {
                    Ok(()) => tracing::info!(deployment = %id, "deployment completed"),
                    // Another node or a report got there first.
                    Err(DeployError::WrongState(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        } else if finished == size {
            let reason = format!(
                "stage {}: {confirmed} of {size} confirmed, {needed} needed",
                d.stage + 1,
            );
            return self.halt(&d, &reason).await;
        }
        Ok(())
    }

    /// Halts a running deployment; one that another node or a report halted (or that was
    /// paused) meanwhile is left as it is.
    async fn halt(&self, d: &DeploymentRecord, reason: &str) -> Result<(), DeployError> {
        match self.stop(d, &["running"], "halted", reason).await {
            Err(DeployError::WrongState(_)) => Ok(()),
            other => other,
        }
    }

    /// What every node does every few seconds: starts scheduled deployments that are due,
    /// fails devices past their deadline, makes the offers still owed, and looks at every
    /// running deployment.
    pub async fn tick(&self) -> Result<(), DeployError> {
        let now = self.now();
        for d in self.0.store.deployments_in(&["scheduled"]).await? {
            if d.start_at <= now
                && self
                    .change(&DeploymentChange {
                        id: d.id,
                        from: &["scheduled"],
                        from_stage: None,
                        to: "running",
                        stage: None,
                        stage_started_at: Some(now),
                        reason: None,
                        finished_at: None,
                    })
                    .await?
            {
                tracing::info!(deployment = %d.id, "deployment started");
            }
        }
        for row in self.0.store.overdue_devices(now, 1000).await? {
            let moved = self
                .transition(&DeviceTransition {
                    deployment: row.deployment_id,
                    device: row.device_id,
                    from: IN_FLIGHT,
                    to: "failed",
                    progress: None,
                    reason: Some("timeout"),
                    now,
                })
                .await?;
            if moved {
                if let Some(command) = row.command_id {
                    self.0
                        .devices
                        .withdraw_command(row.device_id, command, "timeout")
                        .await?;
                }
                let d = self.record(row.deployment_id).await?;
                self.ended(&d, row.device_id, "failed", Some("timeout"))
                    .await;
            }
        }
        // One deployment's trouble does not hold the others up.
        for d in self.0.store.deployments_in(&["running"]).await? {
            if let Err(e) = self.offer_stage(&d).await {
                tracing::warn!(deployment = %d.id, error = %e, "offers not made");
            }
            if let Err(e) = self.evaluate(d.id).await {
                tracing::warn!(deployment = %d.id, error = %e, "deployment not evaluated");
            }
        }
        Ok(())
    }

    /// Ticks every `every` until `stop` resolves.
    pub async fn run(
        self,
        every: std::time::Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::warn!(error = %e, "deployments not ticked");
                    }
                }
                () = &mut stop => return,
            }
        }
    }
}

/// A final state's name as a metric label (a bounded set).
fn static_state(state: &str) -> &'static str {
    FINAL
        .iter()
        .chain(ALL_STATES)
        .find(|s| **s == state)
        .copied()
        .unwrap_or("other")
}

fn valid_reason(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(percent: Option<f64>, count: Option<u64>) -> Stage {
        Stage {
            percent,
            count,
            success_share: None,
            soak: None,
        }
    }

    #[test]
    fn stages_are_cumulative_and_the_last_takes_the_rest() {
        let sizes = |stages: &[Stage], n| {
            resolve_stages(stages, n)
                .unwrap()
                .iter()
                .map(|s| s.size)
                .collect::<Vec<_>>()
        };
        let staged = [
            stage(Some(10.0), None),
            stage(Some(50.0), None),
            stage(Some(100.0), None),
        ];
        assert_eq!(sizes(&staged, 20), [2, 8, 10]);
        assert_eq!(sizes(&staged, 3), [1, 1, 1]);
        assert_eq!(sizes(&staged, 1), [1]);
        assert_eq!(sizes(&[], 7), [7]);
        assert_eq!(
            sizes(&[stage(None, Some(2)), stage(Some(30.0), None)], 10),
            [2, 8]
        );
        for bad in [
            vec![stage(Some(50.0), None), stage(Some(20.0), None)],
            vec![stage(Some(0.0), None)],
            vec![stage(Some(10.0), Some(3))],
            vec![stage(None, None)],
        ] {
            assert!(resolve_stages(&bad, 10).is_err(), "{bad:?}");
        }
    }
}
