//! The embedded backend: one SQLite file in WAL mode with foreign keys and a busy timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};
use uuid::Uuid;

use crate::dialect::Dialect;
use crate::migrations::{self, APPLIED_SQL};
use crate::rooms::fts5_query;
use crate::{Backend, Health, Store, StoreError, StoreOptions};

// The queries written once for both engines, expanded on this one's types.
crate::queries::cron::cron_queries!(cron, super::SqliteStore);
crate::queries::devices::device_queries!(devices, super::SqliteStore);
crate::queries::firmware::firmware_queries!(firmware, super::SqliteStore);
crate::queries::files::file_queries!(files, super::SqliteStore);
crate::queries::deployments::deployment_queries!(deployments, super::SqliteStore);
crate::queries::identity::identity_queries!(identity, super::SqliteStore);
crate::queries::jobs::job_queries!(jobs, super::SqliteStore);
crate::queries::meta::meta_queries!(meta, super::SqliteStore);
crate::queries::rooms::room_queries!(rooms, super::SqliteStore);

/// How long a writer waits for another to finish before it gives up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite behind a connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    path: PathBuf,
}

impl SqliteStore {
    /// No other node shares an SQLite file: the job system's own wake-ups cover every enqueue.
    #[allow(
        clippy::unused_self,
        reason = "the same shape as PostgreSQL's, for the queries written once"
    )]
    fn listen_for_jobs(&self) -> Option<tokio::sync::mpsc::Receiver<crate::jobs::JobWakeup>> {
        None
    }
}

impl SqliteStore {
    /// Opens (creating if need be) the database file at `path`.
    pub async fn open(path: &Path, options: &StoreOptions) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        }
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across application crashes in WAL mode; only a power loss can
            // lose the last transactions, and never corrupts the file. FULL fsyncs every commit.
            .synchronous(if options.sqlite_full_sync {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        Ok(Self {
            pool,
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = migrations::migrator(migrations::SQLITE)
            .await
            .map_err(StoreError::Other)?;
        migrator.run(&self.pool).await?;
        Ok(())
    }

    async fn health(&self) -> Result<Health, StoreError> {
        let has_table: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("health", e))?;
        let applied: i64 = if has_table == 0 {
            0
        } else {
            sqlx::query_scalar(APPLIED_SQL)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx("health", e))?
        };
        Ok(Health {
            applied_migrations: usize::try_from(applied).unwrap_or(0),
            known_migrations: migrations::SQLITE.len(),
        })
    }

    async fn backup(&self, to: &Path) -> Result<(), StoreError> {
        if to.exists() {
            return Err(StoreError::invalid(format!(
                "{} exists already; a backup never overwrites a file",
                to.display()
            )));
        }
        let target = to
            .to_str()
            .ok_or_else(|| StoreError::invalid("the backup path must be valid UTF-8"))?;
        // VACUUM INTO reads one consistent snapshot while writers carry on in the WAL.
        sqlx::query("VACUUM INTO ?1")
            .bind(target)
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::from_sqlx("backup", e))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

impl Dialect for SqliteStore {
    type Db = Sqlite;
    type Time = i64;
    type Id = String;
    // The first migration keeps meta times as RFC 3339 text.
    type MetaTime = String;

    // SQLite's LIKE ignores ASCII case already.
    const ILIKE: &'static str = "LIKE";
    const AS_JSON: &'static str = "";
    const AGE_CUTOFF: &'static str = "$1 - r.retention_max_age * 1000000";
    // IMMEDIATE takes the write lock at once: the transaction's reads are then never outdated
    // by another writer, and it never fails at its first write as a deferred one that read
    // first can (SQLITE_BUSY_SNAPSHOT, which the busy timeout does not retry).
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const SKIP_LOCKED: &'static str = "";
    const LOCK_KEY: Option<&'static str> = None;
    const NOTIFY: Option<&'static str> = None;
    const TIME_BUCKET: &'static str = "(ts / ($5 * 1000000)) * ($5 * 1000000)";
    // FTS5's bm25 is lower for better matches.
    const SEARCH: &'static str = "SELECT m.id, m.room_id, m.sender_id, m.client_msg_id, m.body, \
        m.created_at, snippet(messages_fts, 0, char(57344), char(57345), '…', 12) AS snippet, \
        -bm25(messages_fts) AS score \
        FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid \
        JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = $2 \
        WHERE messages_fts MATCH $1 AND ($3 IS NULL OR m.room_id = $3) \
        ORDER BY bm25(messages_fts) LIMIT $4";

    fn search_terms(query: &str) -> Option<String> {
        fts5_query(query)
    }

    fn time(t: DateTime<Utc>) -> i64 {
        t.timestamp_micros()
    }

    fn read_time(stored: i64) -> Result<DateTime<Utc>, StoreError> {
        DateTime::from_timestamp_micros(stored).ok_or_else(|| {
            StoreError::Other(format!("stored time {stored} is out of range").into())
        })
    }

    fn meta_time(t: DateTime<Utc>) -> String {
        t.to_rfc3339()
    }

    fn id(id: Uuid) -> String {
        id.to_string()
    }

    fn read_id(stored: String) -> Result<Uuid, StoreError> {
        Uuid::parse_str(&stored).map_err(|e| StoreError::Other(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_synchronous_follows_the_options() {
        let dir = tempfile::tempdir().unwrap();
        for (full, expected) in [(false, 1), (true, 2)] {
            let options = StoreOptions {
                sqlite_full_sync: full,
                ..StoreOptions::default()
            };
            let store = SqliteStore::open(&dir.path().join("sync.db"), &options)
                .await
                .unwrap();
            // PRAGMA synchronous: 1 is NORMAL, 2 is FULL, on every pooled connection.
            for _ in 0..3 {
                let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
                    .fetch_one(&store.pool)
                    .await
                    .unwrap();
                assert_eq!(level, expected);
            }
            store.pool.close().await;
        }
    }
}
