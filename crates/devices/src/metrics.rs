//! The fleet's Prometheus metrics, registered by the server in its registry.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use unhidra_store::devices::DeviceStatus;

use crate::Disconnect;

/// A label with one bounded value.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Label {
    /// The value: a status, a scope, an outcome or a close kind.
    pub value: &'static str,
}

/// The fleet's metrics; cloning shares them.
#[derive(Debug, Clone)]
pub struct DeviceMetrics {
    /// Devices registered on this node.
    pub registered: Counter,
    /// Device connections refused for a bad key.
    pub auth_failed: Counter,
    /// Devices with a live connection to this node.
    pub connected: Gauge<i64, AtomicI64>,
    /// Status changes written by this node, by new status.
    pub transitions: Family<Label, Counter>,
    /// Device connections that ended, by how (`clean`, `lost`, `server`).
    pub disconnects: Family<Label, Counter>,
    /// Silent alerts this node opened.
    pub alerts_opened: Counter,
    /// Alerts resolved because the device came back.
    pub alerts_resolved: Counter,
    /// How late a silent device was marked, after its deadline.
    pub silence_delay: Histogram,
    /// Telemetry batches, by outcome (`stored`, `duplicate`, `refused`, `failed`).
    pub batches: Family<Label, Counter>,
    /// Telemetry points stored.
    pub points: Counter<u64, AtomicU64>,
    /// Batches per store write.
    pub write_batches: Histogram,
    /// Attempts refused by a rate limit, by scope.
    pub limited: Family<Label, Counter>,
    /// Claims with a provisioning token, by outcome (`claimed`, `reclaimed`, `unknown`,
    /// `expired`, `used_up`, `wrong_model`, `hardware_taken`, `not_reclaimable`).
    pub claims: Family<Label, Counter>,
}

impl Default for DeviceMetrics {
    fn default() -> Self {
        Self {
            registered: Counter::default(),
            auth_failed: Counter::default(),
            connected: Gauge::default(),
            transitions: Family::default(),
            disconnects: Family::default(),
            alerts_opened: Counter::default(),
            alerts_resolved: Counter::default(),
            silence_delay: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            batches: Family::default(),
            points: Counter::default(),
            write_batches: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            limited: Family::default(),
            claims: Family::default(),
        }
    }
}

impl DeviceMetrics {
    /// Adds every metric to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "devices_registered",
            "Devices registered",
            self.registered.clone(),
        );
        registry.register(
            "devices_auth_failed",
            "Device connections and calls refused for a bad key",
            self.auth_failed.clone(),
        );
        registry.register(
            "devices_connected",
            "Devices with a live connection to this node",
            self.connected.clone(),
        );
        registry.register(
            "devices_status_changes",
            "Device status changes, by new status",
            self.transitions.clone(),
        );
        registry.register(
            "devices_disconnects",
            "Device connections ended, by how (clean, lost, server)",
            self.disconnects.clone(),
        );
        registry.register(
            "devices_alerts_opened",
            "Silent-device alerts opened",
            self.alerts_opened.clone(),
        );
        registry.register(
            "devices_alerts_resolved",
            "Silent-device alerts resolved when the device came back",
            self.alerts_resolved.clone(),
        );
        registry.register_with_unit(
            "devices_silence_delay",
            "How long after its deadline a silent device was marked",
            Unit::Seconds,
            self.silence_delay.clone(),
        );
        registry.register(
            "telemetry_batches",
            "Telemetry batches, by outcome",
            self.batches.clone(),
        );
        registry.register(
            "telemetry_points",
            "Telemetry points stored",
            self.points.clone(),
        );
        registry.register(
            "telemetry_write_batches",
            "Telemetry batches per store write",
            self.write_batches.clone(),
        );
        registry.register(
            "devices_rate_limited",
            "Device registrations and batches refused by a rate limit, by scope",
            self.limited.clone(),
        );
        registry.register(
            "devices_claims",
            "Device claims with a provisioning token, by outcome",
            self.claims.clone(),
        );
    }

    pub(crate) fn claim(&self, outcome: &'static str) {
        self.claims.get_or_create(&Label { value: outcome }).inc();
    }

    pub(crate) fn limited(&self, scope: &'static str) {
        self.limited.get_or_create(&Label { value: scope }).inc();
    }

    pub(crate) fn transition(&self, status: DeviceStatus) {
        self.transitions
            .get_or_create(&Label {
                value: status.as_str(),
            })
            .inc();
    }

    pub(crate) fn disconnected(&self, how: Disconnect) {
        let value = match how {
            Disconnect::Clean => "clean",
            Disconnect::Lost => "lost",
            Disconnect::Server => "server",
        };
        self.disconnects.get_or_create(&Label { value }).inc();
    }

    pub(crate) fn silent(&self, late_ms: i64) {
        self.alerts_opened.inc();
        #[allow(clippy::cast_precision_loss, reason = "a delay in milliseconds")]
        self.silence_delay.observe(late_ms.max(0) as f64 / 1000.0);
    }

    pub(crate) fn batch(&self, outcome: &'static str) {
        self.batches.get_or_create(&Label { value: outcome }).inc();
    }
}
