//! Storage of firmware deployments: a deployment, its stages and policy (JSON the OTA
//! capability reads), and one row per device of its cohort with the state of that device's
//! update. Every change of a device's state is a compare-and-set on the states it may leave, so
//! that reports, timeouts and halts on several nodes never move a device twice.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use unhidra_core::UserId;
use uuid::Uuid;

use crate::StoreError;

/// A deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRecord {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The image it rolls out.
    pub firmware_sha256: String,
    /// The cohort's selection as given, JSON.
    pub target: String,
    /// Its stages, JSON.
    pub stages: String,
    /// Its thresholds and timeouts, JSON.
    pub policy: String,
    /// `scheduled`, `running`, `paused`, `halted`, `cancelled` or `completed`.
    pub state: String,
    /// The current stage, from 0.
    pub stage: i64,
    /// When the current stage began.
    pub stage_started_at: Option<DateTime<Utc>>,
    /// Why it halted (or was cancelled).
    pub reason: Option<String>,
    /// Who made it.
    pub created_by: Option<UserId>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it starts (or started).
    pub start_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One device of a deployment's cohort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentDeviceRecord {
    /// The deployment.
    pub deployment_id: Uuid,
    /// The device.
    pub device_id: Uuid,
    /// The stage it belongs to, from 0.
    pub stage: i64,
    /// Where its update stands.
    pub state: String,
    /// Its download, in percent, while it downloads.
    pub progress: Option<i64>,
    /// Why it failed.
    pub reason: Option<String>,
    /// The command that carried its offer.
    pub command_id: Option<Uuid>,
    /// The version it ran when the deployment was made.
    pub from_version: Option<String>,
    /// The partition it ran from then.
    pub from_partition: Option<String>,
    /// When it was offered the image.
    pub offered_at: Option<DateTime<Utc>>,
    /// When it fails unless it has confirmed the image.
    pub deadline: Option<DateTime<Utc>>,
    /// When its row last changed.
    pub updated_at: DateTime<Utc>,
    /// When it joined the deployment, if it came after the deployment was made.
    pub joined_at: Option<DateTime<Utc>>,
}

/// What a device's last `hello` said of its boot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceBoot {
    /// The device.
    pub device_id: Uuid,
    /// The firmware version.
    pub firmware: Option<String>,
    /// The partition it booted from.
    pub partition: Option<String>,
    /// Its anti-rollback version.
    pub secure_version: Option<i64>,
}

/// How many devices of one stage are in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageCount {
    /// The stage.
    pub stage: i64,
    /// The state.
    pub state: String,
    /// How many.
    pub count: u64,
}

/// A change of a deployment, applied only while it is in one of `from` (and at `from_stage`,
/// when given). What is `None` is kept; a reason already there is kept too (the first reason
/// a deployment stopped for stays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentChange<'a> {
    /// The deployment.
    pub id: Uuid,
    /// The states it may leave.
    pub from: &'a [&'a str],
    /// The stage it must be at.
    pub from_stage: Option<i64>,
    /// Its new state.
    pub to: &'a str,
    /// Its new stage.
    pub stage: Option<i64>,
    /// When that stage began.
    pub stage_started_at: Option<DateTime<Utc>>,
    /// Why.
    pub reason: Option<&'a str>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A change of one device's row, applied only while it is in one of `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTransition<'a> {
    /// The deployment.
    pub deployment: Uuid,
    /// The device.
    pub device: Uuid,
    /// The states the row may leave.
    pub from: &'a [&'a str],
    /// Its new state.
    pub to: &'a str,
    /// Its progress (replaced).
    pub progress: Option<i64>,
    /// Why (replaced).
    pub reason: Option<&'a str>,
    /// When.
    pub now: DateTime<Utc>,
}

/// Deployments and their devices.
#[async_trait]
pub trait DeploymentStore: Send + Sync {
    /// Stores a new deployment with its cohort, in one transaction.
    async fn create_deployment(
        &self,
        deployment: &DeploymentRecord,
        devices: &[DeploymentDeviceRecord],
    ) -> Result<(), StoreError>;

    /// One deployment.
    async fn deployment(&self, id: Uuid) -> Result<DeploymentRecord, StoreError>;

    /// Deployments, newest first, at most `limit`.
    async fn list_deployments(&self, limit: u32) -> Result<Vec<DeploymentRecord>, StoreError>;

    /// Deployments in one of these states, oldest first.
    async fn deployments_in(&self, states: &[&str]) -> Result<Vec<DeploymentRecord>, StoreError>;

    /// Applies a change to a deployment; false if it was in none of the change's `from`
    /// states (or, when it names one, not at its `from_stage`).
    async fn change_deployment(&self, change: &DeploymentChange<'_>) -> Result<bool, StoreError>;

    /// A deployment's devices in a state when given, by stage and device, from `offset`.
    async fn deployment_devices(
        &self,
        id: Uuid,
        state: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<DeploymentDeviceRecord>, StoreError>;

    /// How many devices of each stage are in each state.
    async fn deployment_counts(&self, id: Uuid) -> Result<Vec<StageCount>, StoreError>;

    /// The row of a device in a deployment in one of `states` (running or paused, say), whose
    /// own state is not final; the newest if several.
    async fn active_deployment_of(
        &self,
        device: Uuid,
        states: &[&str],
    ) -> Result<Option<(DeploymentRecord, DeploymentDeviceRecord)>, StoreError>;

    /// Which of these devices have a row that is not final in a deployment in one of `states`.
    async fn devices_in_deployments(
        &self,
        devices: &[Uuid],
        states: &[&str],
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Applies a transition; false if the row was in none of its `from` states.
    async fn transition_device(&self, t: &DeviceTransition<'_>) -> Result<bool, StoreError>;

    /// Adds a device to a running or paused deployment (it joined late); false when the
    /// deployment is neither, the device was in it already, or it has an update in progress.
    async fn join_deployment(&self, row: &DeploymentDeviceRecord) -> Result<bool, StoreError>;

    /// How many devices joined a deployment after it was made.
    async fn joined_devices(&self, id: Uuid) -> Result<u64, StoreError>;

    /// Moves a `waiting` device to `offered` with its deadline, before its offer is sent, while
    /// its deployment is running; what the device runs now becomes what it ran before. False if
    /// it was not waiting or the deployment is not running (it ended, or another node offered).
    async fn offer_device(
        &self,
        deployment: Uuid,
        device: Uuid,
        deadline: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Records the command that carries a device's offer.
    async fn set_offer_command(
        &self,
        deployment: Uuid,
        device: Uuid,
        command: Uuid,
    ) -> Result<(), StoreError>;

    /// Rows not final whose deadline is before `now` (in any deployment: nothing stays in
    /// progress); at most `limit`.
    async fn overdue_devices(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DeploymentDeviceRecord>, StoreError>;

    /// What these devices' last `hello` said of their boot.
    async fn device_boots(&self, devices: &[Uuid]) -> Result<Vec<DeviceBoot>, StoreError>;

    /// Records what a device's `hello` says of its boot. The anti-rollback version only rises
    /// (a `hello` without one, or with a lower one, keeps it): it is burnt into eFuses.
    async fn record_boot(&self, boot: &DeviceBoot) -> Result<(), StoreError>;
}
