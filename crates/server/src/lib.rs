//! Unhidra's server: it opens the store, builds the router with its middleware, and serves
//! until told to stop. This is the only crate that knows HTTP and maps errors to statuses.
//!
//! The binary is a thin caller: `Application::build(config)` binds the listener (so a test can
//! ask for port 0 and read the port back) and `run_until_stopped(shutdown)` serves.

mod build_info;
pub mod error;
pub mod http;
pub mod metrics;
mod routes;
mod shutdown;
mod state;
pub mod telemetry;
mod watch;
mod ws;
mod ws_device;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use chrono::Utc;
use tokio::net::TcpListener;
use unhidra_chat as chat;
use unhidra_config::Config;
use unhidra_core::{Clock, SystemClock};
pub use unhidra_identity as identity;
pub use unhidra_jobs as jobs;
pub use unhidra_mail as mail;
use unhidra_store::{INSTANCE_ID, Store, StoreError, StoreOptions};

pub use build_info::{BUILD, BuildInfo};
pub use routes::{OPENAPI_PATH, openapi};
pub use shutdown::signal as shutdown_signal;
pub use state::AppState;

/// The SQLite file under the data folder when no `database_url` is set.
pub const SQLITE_FILE: &str = "unhidra.db";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data folder could not be created.
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The signing keys could not be loaded.
    #[error("{0}")]
    Keys(#[from] identity::keys::KeyError),
    /// Mail is configured wrongly.
    #[error("{0}")]
    Mail(#[from] mail::MailError),
    /// The first admin could not be created.
    #[error("admin_email/admin_password: {0}")]
    Admin(String),
    /// The device fleet's settings are wrong.
    #[error("{0}")]
    Devices(String),
    /// The firmware settings are wrong, or the firmware folder cannot be made.
    #[error("{0}")]
    Firmware(String),
    /// The files folder cannot be made or read.
    #[error("files: {0}")]
    Files(String),
    /// A cron schedule of the configuration is refused or could not be stored.
    #[error("jobs_cron: {0}")]
    Cron(String),
    /// The store could not be opened or migrated.
    #[error("store: {}", error::error_chain(.0))]
    Store(#[from] StoreError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The URL of the store a config selects: its `database_url`, or SQLite under `data_dir`.
pub fn store_url(config: &Config) -> String {
    match &config.database_url {
        Some(url) => url.expose().to_owned(),
        None => format!("sqlite:{}", config.data_dir.join(SQLITE_FILE).display()),
    }
}

/// [`store_url`] with any password replaced, for logs and `spec`.
pub fn store_url_redacted(config: &Config) -> String {
    match &config.database_url {
        Some(url) => url.redacted(),
        None => store_url(config),
    }
}

/// Opens the store a config selects, creating the data folder if need be. Not migrated yet.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let options = StoreOptions {
        max_connections: config.database_max_connections,
        sqlite_full_sync: config.sqlite_synchronous == unhidra_config::SqliteSynchronous::Full,
        ..StoreOptions::default()
    };
    Ok(unhidra_store::connect(&store_url(config), &options).await?)
}

/// A server that has bound its port and is ready to serve.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    /// Opens and migrates the store the config selects, and binds the listener.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let store = open_store(&config).await?;
        Self::with_store(config, store, Router::new()).await
    }

    /// Like [`Application::build`] over a store already open, with extra routes that pass
    /// through the same middleware (tests use this for routes that misbehave on purpose).
    pub async fn with_store(
        config: Config,
        store: Arc<dyn Store>,
        extra: Router<AppState>,
    ) -> Result<Self, StartError> {
        Self::with_parts(config, store, Arc::new(SystemClock), extra).await
    }

    /// Like [`Application::with_store`] with the clock given, so that tests can move time.
    pub async fn with_parts(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        extra: Router<AppState>,
    ) -> Result<Self, StartError> {
        store.migrate().await?;
        let instance_id = store
            .meta_get_or_insert(INSTANCE_ID, &uuid::Uuid::new_v4().to_string(), Utc::now())
            .await?;
        let addr = config.bind;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let metrics = metrics::Metrics::new(&BUILD);
        let mailer = Arc::new(mail::Mailer::from_config(&config)?);
        if mailer.is_outbox() && config.profile == unhidra_config::Profile::Prod {
            tracing::warn!("no smtp_url: mail is written to the outbox folder, not delivered");
        }
        let chat = chat::Chat::new(
            Arc::clone(&store),
            Arc::clone(&clock),
            &config,
            metrics.ws.clone(),
        );
        let jobs = identity::mail_jobs::register(
            jobs::Jobs::builder(Arc::clone(&store), Arc::clone(&clock), jobs_config(&config))
                .metrics(metrics.jobs.clone()),
            &config,
            Arc::clone(&store),
            Arc::clone(&clock),
            Arc::clone(&mailer),
        )
        .register(
            chat::retention::KIND,
            chat.retention_job(),
            jobs::KindOptions {
                max_attempts: 3,
                timeout: Duration::from_secs(300),
                ..jobs::KindOptions::default()
            },
        )
        .every(
            chat::retention::KIND,
            config.retention_interval.0.max(Duration::from_secs(1)),
        );
        let devices_config =
            unhidra_devices::DevicesConfig::from_config(&config).map_err(StartError::Devices)?;
        let jobs = jobs
            .register(
                unhidra_devices::telemetry::RETENTION_KIND,
                unhidra_devices::telemetry::Retention::new(
                    Arc::clone(&store),
                    Arc::clone(&clock),
                    devices_config.telemetry.retention,
                ),
                jobs::KindOptions {
                    max_attempts: 3,
                    timeout: Duration::from_secs(600),
                    ..jobs::KindOptions::default()
                },
            )
            .every(
                unhidra_devices::telemetry::RETENTION_KIND,
                Duration::from_secs(3600),
            );
        // Rotated audit files age out hourly, even while nothing is written.
        let jobs = match identity::audit_file::AuditFile::from_config(&config) {
            Some(file) => jobs
                .register(
                    identity::audit_file::PRUNE_KIND,
                    identity::audit_file::Prune(file),
                    jobs::KindOptions {
                        max_attempts: 3,
                        ..jobs::KindOptions::default()
                    },
                )
                .every(identity::audit_file::PRUNE_KIND, Duration::from_secs(3600)),
            None => jobs,
        }
        .build();
        configure_cron(&config, &jobs).await?;
        let identity = identity::Identity::new(
            &config,
            Arc::clone(&store),
            Arc::clone(&clock),
            metrics.auth.clone(),
            mailer,
            Arc::clone(&jobs),
        )
        .await?;
        bootstrap_admin(&config, &identity).await?;
        let devices = unhidra_devices::Devices::new(
            Arc::clone(&store),
            Arc::clone(&clock),
            devices_config,
            identity.audit_log(),
            Arc::clone(&jobs),
            metrics.devices.clone(),
        );
        let firmware = firmware_service(
            &config,
            &store,
            &clock,
            identity.audit_log(),
            metrics.ota.clone(),
        )
        .await?;
        let deployments = unhidra_ota::Deployments::new(
            Arc::clone(&store),
            Arc::clone(&clock),
            firmware.clone(),
            devices.clone(),
            identity.audit_log(),
            config.require_admin_mfa,
            config.public_url.as_ref().map(ToString::to_string),
        );
        let files = files_service(&config, &store, &clock, identity.audit_log()).await?;
        let services = state::Services {
            identity,
            chat,
            jobs,
            devices,
            firmware,
            deployments,
            files,
        };
        let state = AppState::new(config, store, metrics, instance_id, services);
        tokio::spawn(follow_revocations(state.clone()));
        tokio::spawn(follow_fleet(state.clone()));
        let router = http::with_middleware(routes::router().merge(extra), &state);
        Ok(Self {
            listener,
            router,
            state,
        })
    }

    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.state.config().bind)
    }

    /// The router with all middleware, for in-process tests.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops accepting, gives requests in flight
    /// `shutdown_grace` to finish, and closes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Self {
            listener,
            router,
            state,
        } = self;
        let config = state.config();
        let addr = listener.local_addr()?;
        tracing::info!(
            address = %addr,
            store = %state.store().backend(),
            profile = %config.profile,
            instance_id = state.instance_id(),
            version = BUILD.version,
            "unhidra listening"
        );
        let grace = config.shutdown_grace.0;
        let reloads = tokio::spawn(reload_keys(state.clone()));
        let (stop_jobs, jobs_stopping) = tokio::sync::watch::channel(false);
        let workers = state.jobs().start(jobs_stopping.clone());
        let presence = {
            let mut stopping = jobs_stopping;
            state
                .devices()
                .start(async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                })
                .await
        };
        let rollouts =
            {
                let mut stopping = stop_jobs.subscribe();
                tokio::spawn(state.deployments().clone().run(
                    config.ota_tick_interval.0,
                    async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                    },
                ))
            };
        let outcome = shutdown::serve(listener, router, &state, shutdown, grace).await;
        reloads.abort();
        // Attempts in flight end (or reach their timeout); what does not end in time is
        // retried by a node once its lease ends.
        stop_jobs.send_replace(true);
        if tokio::time::timeout(grace.max(Duration::from_secs(1)), workers.stopped())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: some jobs were still running; they are retried later");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), rollouts).await;
        match presence {
            Ok(task) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
            Err(e) => {
                tracing::warn!(error = %unhidra_core::error_chain(&e), "device presence was not loaded");
            }
        }
        let outcome = outcome?;
        let abandoned = metrics::in_flight(state.metrics());
        // Notices already promised to users are sent before the process goes.
        if tokio::time::timeout(Duration::from_secs(5), state.identity().mailer().drain())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: some mail was still being sent and may be lost");
        }
        // A request stuck past the grace period may hold a connection; don't wait on it forever.
        let _ = tokio::time::timeout(Duration::from_secs(2), state.store().close()).await;
        match outcome {
            shutdown::Outcome::Drained => tracing::info!("unhidra stopped cleanly"),
            shutdown::Outcome::GraceExpired => tracing::warn!(
                abandoned_requests = abandoned,
                grace_secs = grace.as_secs_f64(),
                "unhidra stopped; the grace period ended before every request finished"
            ),
        }
        Ok(())
    }
}

/// Rereads the signing keys every minute, so that a server that only issues tokens also signs
/// with a key rotated elsewhere (verifying rereads keys older than that by itself).
async fn reload_keys(state: AppState) {
    let mut tick = tokio::time::interval(identity::keys::RELOAD_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = state.identity().keys().reload().await {
            tracing::warn!(error = %e, "signing keys not reloaded");
        }
    }
}

/// Creates the admin named by `admin_email`/`admin_password` if it does not exist.
async fn bootstrap_admin(config: &Config, identity: &identity::Identity) -> Result<(), StartError> {
    let (Some(email), Some(password)) = (&config.admin_email, &config.admin_password) else {
        return Ok(());
    };
    let ctx = identity::RequestContext::default();
    match identity.ensure_admin(email, password.expose(), &ctx).await {
        Ok(true) => tracing::info!(email = %email, "admin created"),
        Ok(false) => tracing::info!(email = %email, "admin exists; left unchanged"),
        Err(e) => return Err(StartError::Admin(e.to_string())),
    }
    Ok(())
}

/// Closes the connections of devices whose keys were revoked, or that were deleted, with 4003.
async fn follow_fleet(state: AppState) {
    let mut events = state.devices().events();
    loop {
        match events.recv().await {
            Ok(unhidra_devices::FleetEvent::Revoked { device }) => {
                state.chat().hub().close_device(
                    device,
                    unhidra_protocol::close::REVOKED,
                    "device key revoked",
                );
            }
            Ok(_) => {}
            // A missed revocation still takes effect: a revoked key is refused at the next
            // connect, and the device's connections are checked again below.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "fleet events were missed");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Closes live connections whose session or user was revoked, with close code 4003.
async fn follow_revocations(state: AppState) {
    let mut revocations = state.identity().revocations();
    loop {
        match revocations.recv().await {
            Ok(identity::Revoked::Session(session)) => state.chat().hub().close_session(
                session,
                unhidra_protocol::close::REVOKED,
                "session revoked",
            ),
            Ok(identity::Revoked::User { user, except }) => state.chat().hub().close_user_except(
                user,
                except,
                unhidra_protocol::close::REVOKED,
                "sessions revoked",
            ),
            // Missed revocations are not lost: every live connection's session is checked.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "revocations were missed; re-checking live connections"
                );
                recheck_connections(&state).await;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Closes, with 4003, every live connection whose session has ended or whose user is no longer
/// active, as the store says now: what a missed revocation would have done. A session the
/// store cannot be asked about is closed too (the client reconnects and is checked afresh).
pub async fn recheck_connections(state: &AppState) {
    let hub = state.chat().hub();
    let now = chrono::Utc::now();
    for session in hub.sessions() {
        let live = match state.store().session_with_user(session).await {
            Ok((session, user)) => session.is_live(now) && user.active,
            Err(unhidra_store::StoreError::NotFound { .. }) => false,
            Err(e) => {
                tracing::warn!(error = %unhidra_core::error_chain(&e), "session re-check failed");
                false
            }
        };
        if !live {
            hub.close_session(session, unhidra_protocol::close::REVOKED, "session revoked");
        }
    }
}

/// Stores the cron schedules of `jobs_cron` (read at load; checked as cron here), which the
/// API then cannot change. Storing one again at every start keeps its next tick.
async fn configure_cron(config: &Config, jobs: &jobs::Jobs) -> Result<(), StartError> {
    for entry in unhidra_config::parse_job_cron(&config.jobs_cron).unwrap_or_default() {
        let refused = |why: String| StartError::Cron(format!("{}: {why}", entry.name));
        let payload = serde_json::from_str(&entry.payload)
            .map_err(|e| refused(format!("the payload is not JSON: {e}")))?;
        let spec = jobs::CronSpec {
            name: entry.name.clone(),
            expression: entry.expression.clone(),
            time_zone: entry.time_zone.clone(),
            kind: entry.kind.clone(),
            payload,
            catch_up: jobs::CatchUp::parse(&entry.catch_up).unwrap_or(jobs::CatchUp::Once),
            enabled: true,
        };
        jobs.put_configured_cron(&spec)
            .await
            .map_err(|e| refused(e.to_string()))?;
    }
    Ok(())
}

/// How the job system runs on this node, from the config (checked at load).
fn jobs_config(config: &Config) -> jobs::JobsConfig {
    jobs::JobsConfig {
        queues: unhidra_config::parse_job_queues(&config.jobs_queues).unwrap_or_default(),
        lease: config.jobs_lease.0,
        poll_interval: config.jobs_poll_interval.0,
        retention: config.jobs_retention.0,
        node: format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        ..jobs::JobsConfig::default()
    }
}

/// Where files' bytes are kept: `<data_dir>/files`, or the S3 bucket of the `s3_*` keys
/// (checked at load).
async fn files_storage(config: &Config) -> Result<Arc<dyn unhidra_media::Storage>, StartError> {
    let failed = |e: std::io::Error| StartError::Files(e.to_string());
    match config.storage_backend {
        unhidra_config::StorageBackend::Local => Ok(Arc::new(
            unhidra_media::LocalStorage::open_dir(config.data_dir.join("files"))
                .await
                .map_err(failed)?,
        )),
        unhidra_config::StorageBackend::S3 => {
            let missing =
                || StartError::Files("storage_backend = \"s3\" needs the s3_* keys".into());
            let s3 = unhidra_s3::S3Config {
                endpoint: config.s3_endpoint.clone().ok_or_else(missing)?,
                bucket: config.s3_bucket.clone().ok_or_else(missing)?,
                region: config.s3_region.clone(),
                access_key_id: config.s3_access_key_id.clone().ok_or_else(missing)?,
                secret_access_key: config
                    .s3_secret_access_key
                    .as_ref()
                    .ok_or_else(missing)?
                    .expose()
                    .into(),
                path_style: config.s3_path_style,
                part_bytes: unhidra_s3::PART_BYTES,
            };
            Ok(Arc::new(unhidra_s3::S3Storage::new(&s3).map_err(failed)?))
        }
    }
}

/// The file service over its storage.
async fn files_service(
    config: &Config,
    store: &Arc<dyn Store>,
    clock: &Arc<dyn Clock>,
    audit: identity::AuditLog,
) -> Result<unhidra_media::Files, StartError> {
    let storage = files_storage(config).await?;
    let limit = |n: u64| (n > 0).then(|| i64::try_from(n).unwrap_or(i64::MAX));
    unhidra_media::Files::open(
        Arc::clone(store),
        storage,
        Arc::clone(clock),
        audit,
        unhidra_media::FilesConfig {
            max_bytes: config.files_max_bytes,
            user_quota: unhidra_store::files::FileQuota {
                max_bytes: limit(config.files_quota_bytes),
                max_files: limit(config.files_quota_files),
            },
            admin_quota: unhidra_store::files::FileQuota {
                max_bytes: limit(config.files_admin_quota_bytes),
                max_files: limit(config.files_admin_quota_files),
            },
            require_admin_mfa: config.require_admin_mfa,
            link_ttl: config.files_link_ttl.0,
        },
    )
    .await
    .map_err(|e| StartError::Files(e.to_string()))
}

/// The firmware service: images under `<data_dir>/firmware`, manifests trusted by the keys of
/// `ota_trusted_keys` (a PEM file of public keys; none: uploads are refused).
async fn firmware_service(
    config: &Config,
    store: &Arc<dyn Store>,
    clock: &Arc<dyn unhidra_core::Clock>,
    audit: identity::AuditLog,
    metrics: unhidra_ota::OtaMetrics,
) -> Result<unhidra_ota::Firmware, StartError> {
    let trusted = match &config.ota_trusted_keys {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                StartError::Firmware(format!("ota_trusted_keys: {}: {e}", path.display()))
            })?;
            let keys = unhidra_ota::TrustedKeys::from_pem(&text).map_err(|e| {
                StartError::Firmware(format!("ota_trusted_keys: {}: {e}", path.display()))
            })?;
            if keys.is_empty() {
                return Err(StartError::Firmware(format!(
                    "ota_trusted_keys: {} holds no PUBLIC KEY block",
                    path.display()
                )));
            }
            keys
        }
        None => unhidra_ota::TrustedKeys::default(),
    };
    unhidra_ota::Firmware::new(
        Arc::clone(store),
        Arc::clone(clock),
        unhidra_ota::FirmwareConfig {
            dir: config.data_dir.join("firmware"),
            max_bytes: config.ota_max_image_bytes,
            trusted,
            require_admin_mfa: config.require_admin_mfa,
            link_ttl: config.ota_link_ttl.0,
        },
        audit,
        metrics,
    )
    .await
    .map_err(|e| StartError::Firmware(e.to_string()))
}
