//! Over-the-air update metrics, registered by the server in its registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

/// A label with one bounded value.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Label {
    /// The value: an outcome, a state or a kind of answer.
    pub value: &'static str,
}

/// The OTA metrics; cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct OtaMetrics {
    /// Firmware images stored.
    pub uploads: Counter,
    /// Offers sent to devices.
    pub offers: Counter,
    /// Devices' updates that ended, by how (`confirmed`, `failed`, `rolled_back`,
    /// `cancelled`).
    pub updates: Family<Label, Counter>,
    /// Deployments that ended, by how (`completed`, `halted`, `cancelled`).
    pub deployments: Family<Label, Counter>,
    /// Image downloads answered, by kind (`whole`, `range`, `head`, `not_modified`).
    pub downloads: Family<Label, Counter>,
    /// Image bytes in download answers (a download cut short counts whole).
    pub download_bytes: Counter<u64, AtomicU64>,
}

impl OtaMetrics {
    /// Counts one of a family.
    pub fn count(family: &Family<Label, Counter>, value: &'static str) {
        family.get_or_create(&Label { value }).inc();
    }

    /// Adds every metric to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ota_uploads",
            "Firmware images stored",
            self.uploads.clone(),
        );
        registry.register(
            "ota_offers",
            "Update offers sent to devices",
            self.offers.clone(),
        );
        registry.register(
            "ota_updates",
            "Devices' updates that ended, by how (confirmed, failed, rolled_back, cancelled)",
            self.updates.clone(),
        );
        registry.register(
            "ota_deployments",
            "Deployments that ended, by how (completed, halted, cancelled)",
            self.deployments.clone(),
        );
        registry.register(
            "ota_downloads",
            "Image downloads answered, by kind (whole, range, head, not_modified)",
            self.downloads.clone(),
        );
        registry.register_with_unit(
            "ota_download",
            "Image bytes in download answers",
            Unit::Bytes,
            self.download_bytes.clone(),
        );
    }
}
