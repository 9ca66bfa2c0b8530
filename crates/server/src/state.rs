//! What every handler can reach: config, store, metrics, and who this server is.

use std::sync::Arc;

use unhidra_config::Config;
use unhidra_store::Store;

use crate::chat::Chat;
use crate::identity::Identity;
use crate::metrics::Metrics;

/// The capabilities' services a server wires together.
#[derive(Debug)]
pub struct Services {
    /// Accounts, tokens and sessions.
    pub identity: Identity,
    /// Rooms, messages and live connections.
    pub chat: Chat,
    /// Background jobs.
    pub jobs: Arc<unhidra_jobs::Jobs>,
    /// The device fleet.
    pub devices: unhidra_devices::Devices,
    /// Firmware images.
    pub firmware: unhidra_ota::Firmware,
    /// Firmware deployments.
    pub deployments: unhidra_ota::Deployments,
    /// Uploaded files.
    pub files: unhidra_media::Files,
}

/// Shared state of one running server; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Arc<dyn Store>,
    metrics: Metrics,
    instance_id: String,
    identity: Identity,
    chat: Chat,
    jobs: Arc<unhidra_jobs::Jobs>,
    devices: unhidra_devices::Devices,
    firmware: unhidra_ota::Firmware,
    deployments: unhidra_ota::Deployments,
    files: unhidra_media::Files,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Set when the shutdown grace period is over: requests still running are answered 503.
    abandon: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    /// State over an open, migrated store.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Metrics,
        instance_id: String,
        services: Services,
    ) -> Self {
        let Services {
            identity,
            chat,
            jobs,
            devices,
            firmware,
            files,
            deployments,
        } = services;
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        Self(Arc::new(Inner {
            trusted_proxies,
            config,
            store,
            metrics,
            instance_id,
            identity,
            chat,
            jobs,
            devices,
            firmware,
            deployments,
            files,
            abandon: tokio::sync::watch::Sender::new(false),
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

    /// Accounts, tokens and sessions.
    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    /// Background jobs.
    pub fn jobs(&self) -> &Arc<unhidra_jobs::Jobs> {
        &self.0.jobs
    }

    /// The device fleet.
    pub fn devices(&self) -> &unhidra_devices::Devices {
        &self.0.devices
    }

    /// Firmware images.
    pub fn firmware(&self) -> &unhidra_ota::Firmware {
        &self.0.firmware
    }

    /// Uploaded files.
    pub fn files(&self) -> &unhidra_media::Files {
        &self.0.files
    }

    /// Firmware deployments.
    pub fn deployments(&self) -> &unhidra_ota::Deployments {
        &self.0.deployments
    }

    /// Rooms, messages and live connections.
    pub fn chat(&self) -> &Chat {
        &self.0.chat
    }

    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies(&self) -> &[std::net::IpAddr] {
        &self.0.trusted_proxies
    }

    /// The id of this installation, made at its first start and kept in the store.
    pub fn instance_id(&self) -> &str {
        &self.0.instance_id
    }

    /// Ends every request still running with 503; called when the shutdown grace is over.
    pub(crate) fn abandon_requests(&self) {
        self.0.abandon.send_replace(true);
    }

    /// Completes once [`AppState::abandon_requests`] has been called.
    pub(crate) fn abandoned(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.abandon.subscribe();
        async move {
            if rx.wait_for(|a| *a).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
