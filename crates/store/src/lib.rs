//! Unhidra's storage: the [`Store`] trait with a small typed error, and its two backends,
//! SQLite (the embedded default) and PostgreSQL.
//!
//! This crate knows nothing of HTTP, JSON or configuration files. Each capability adds a trait
//! of its own (see [`MetaStore`]), its queries in `queries/`, written once and expanded for
//! each backend (what the engines do differently is each backend's `Dialect`), and its
//! migrations in `migrations/<backend>/`; [`Store`] gathers them, so callers hold one
//! `Arc<dyn Store>`.
//! The [`identity`] module holds users, sessions, signing keys and the audit log; [`jobs`] the
//! durable job queue; [`cron`] the cron schedules that enqueue into it; [`devices`] the device
//! fleet.

pub mod cron;
pub mod deployments;
pub mod devices;
mod dialect;
mod error;
pub mod files;
pub mod firmware;
pub mod identity;
pub mod jobs;
mod meta;
mod migrations;
mod postgres;
mod queries;
pub mod rooms;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use cron::CronStore;
pub use deployments::DeploymentStore;
pub use devices::DeviceStore;
pub use error::StoreError;
pub use files::FileStore;
pub use firmware::FirmwareStore;
pub use identity::{AuditStore, KeyStore, MfaStore, OneTimeTokenStore, SessionStore, UserStore};
pub use jobs::JobStore;
pub use meta::{INSTANCE_ID, MetaStore};
pub use postgres::PostgresStore;
pub use rooms::RoomStore;
pub use sqlite::SqliteStore;

/// Which engine is behind a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite in WAL mode, one file under the data folder.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// A short name for logs and `spec`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a readiness check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Migrations applied to the database.
    pub applied_migrations: usize,
    /// Migrations this build carries.
    pub known_migrations: usize,
}

impl Health {
    /// Whether the schema is exactly what this build expects.
    pub fn is_migrated(&self) -> bool {
        self.applied_migrations == self.known_migrations
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections held at once.
    pub max_connections: u32,
    /// How long a query waits for a connection before it fails.
    pub acquire_timeout: Duration,
    /// SQLite: whether a commit is fsynced before it returns (survives a power loss), not just
    /// written to the WAL (survives a process crash).
    pub sqlite_full_sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            sqlite_full_sync: false,
        }
    }
}

/// Everything Unhidra stores, whichever engine holds it.
#[async_trait]
pub trait Store:
    MetaStore
    + UserStore
    + SessionStore
    + KeyStore
    + AuditStore
    + OneTimeTokenStore
    + MfaStore
    + RoomStore
    + JobStore
    + CronStore
    + DeviceStore
    + FirmwareStore
    + FileStore
    + DeploymentStore
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The engine behind this store.
    fn backend(&self) -> Backend;

    /// Applies every embedded migration not yet applied. Safe to run again, and from several
    /// processes at once.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks that the database answers, and how far it is migrated.
    async fn health(&self) -> Result<Health, StoreError>;

    /// Writes a consistent copy of the live database to `to`, a path that must not exist yet.
    async fn backup(&self, to: &Path) -> Result<(), StoreError>;

    /// Waits for queries in flight and closes every connection.
    async fn close(&self);
}

/// Opens the store a URL names: `postgres://…` or `sqlite:PATH`.
pub async fn connect(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let opts = url
            .parse()
            .map_err(|e| StoreError::invalid(format!("invalid PostgreSQL URL: {e}")))?;
        Ok(Arc::new(PostgresStore::connect(opts, options).await?))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        Ok(Arc::new(SqliteStore::open(Path::new(path), options).await?))
    } else {
        Err(StoreError::invalid(
            "a database URL starts with postgres:// or sqlite:",
        ))
    }
}
