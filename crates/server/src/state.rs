//! What every handler can reach: config, store, metrics, and who this server is.

use std::sync::Arc;

use unhidra_config::Config;
use unhidra_store::Store;

use crate::metrics::Metrics;

/// Shared state of one running server; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Arc<dyn Store>,
    metrics: Metrics,
    instance_id: String,
}

impl AppState {
    /// State over an open, migrated store.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Metrics,
        instance_id: String,
    ) -> Self {
        Self(Arc::new(Inner {
            config,
            store,
            metrics,
            instance_id,
        }))
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The id of this installation, made at its first start and kept in the store.
    pub fn instance_id(&self) -> &str {
        &self.0.instance_id
    }
}
