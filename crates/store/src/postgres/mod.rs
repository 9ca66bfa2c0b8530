//! The scale-out backend: a PostgreSQL server.

mod wakeups;

use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::dialect::Dialect;
use crate::migrations::{self, APPLIED_SQL};
use crate::rooms::fts5_query;
use crate::{Backend, Health, Store, StoreError, StoreOptions};

// The queries written once for both engines, expanded on this one's types.
crate::queries::cron::cron_queries!(cron, super::PostgresStore);
crate::queries::devices::device_queries!(devices, super::PostgresStore);
crate::queries::firmware::firmware_queries!(firmware, super::PostgresStore);
crate::queries::files::file_queries!(files, super::PostgresStore);
crate::queries::deployments::deployment_queries!(deployments, super::PostgresStore);
crate::queries::identity::identity_queries!(identity, super::PostgresStore);
crate::queries::jobs::job_queries!(jobs, super::PostgresStore);
crate::queries::meta::meta_queries!(meta, super::PostgresStore);
crate::queries::rooms::room_queries!(rooms, super::PostgresStore);

/// PostgreSQL behind a connection pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(super) pool: PgPool,
}

impl PostgresStore {
    /// Connects with the given options; tests use them to pick a schema of their own.
    pub async fn connect(
        connect: PgConnectOptions,
        options: &StoreOptions,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        Ok(Self { pool })
    }

    /// The listener of [`JobStore::job_wakeups`](crate::JobStore::job_wakeups).
    fn listen_for_jobs(&self) -> Option<tokio::sync::mpsc::Receiver<crate::jobs::JobWakeup>> {
        Some(wakeups::start(self.pool.clone()))
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = migrations::migrator(migrations::POSTGRES)
            .await
            .map_err(StoreError::Other)?;
        migrator.run(&self.pool).await?;
        Ok(())
    }

    async fn health(&self) -> Result<Health, StoreError> {
        let has_table: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx("health", e))?;
        let applied: i64 = if has_table {
            sqlx::query_scalar(APPLIED_SQL)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx("health", e))?
        } else {
            0
        };
        Ok(Health {
            applied_migrations: usize::try_from(applied).unwrap_or(0),
            known_migrations: migrations::POSTGRES.len(),
        })
    }

    async fn backup(&self, _to: &Path) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "unhidra backup copies SQLite only; back up PostgreSQL with pg_dump or pg_basebackup",
        ))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

impl Dialect for PostgresStore {
    type Db = Postgres;
    type Time = DateTime<Utc>;
    type Id = Uuid;
    type MetaTime = DateTime<Utc>;

    const ILIKE: &'static str = "ILIKE";
    const AS_JSON: &'static str = "::jsonb";
    const AGE_CUTOFF: &'static str = "$1 - make_interval(secs => r.retention_max_age)";
    // Spelled out, so that a server whose default is REPEATABLE READ does not give the claim's
    // check one snapshot for the whole transaction.
    const BEGIN_WRITE: &'static str = "BEGIN ISOLATION LEVEL READ COMMITTED";
    const SKIP_LOCKED: &'static str = "FOR UPDATE SKIP LOCKED";
    const LOCK_KEY: Option<&'static str> = Some("SELECT pg_advisory_xact_lock($1)");
    const NOTIFY: Option<&'static str> = Some("SELECT pg_notify($1, $2)");
    const TIME_BUCKET: &'static str = "date_bin(make_interval(secs => CAST($5 AS DOUBLE PRECISION)), \
        ts, TIMESTAMPTZ '1970-01-01 00:00:00+00')";
    const SEARCH: &'static str = "SELECT m.id, m.room_id, m.sender_id, m.client_msg_id, m.body, \
        m.created_at, ts_headline('simple', m.body, q, 'StartSel=' || chr(57344) || \
        ', StopSel=' || chr(57345) || \
        ', MaxWords=24, MinWords=8, MaxFragments=1, FragmentDelimiter=…') AS snippet, \
        ts_rank(m.body_tsv, q)::float8 AS score \
        FROM messages m, plainto_tsquery('simple', $1) q, room_members rm \
        WHERE rm.room_id = m.room_id AND rm.user_id = $2 AND m.body_tsv @@ q \
        AND ($3::uuid IS NULL OR m.room_id = $3) \
        ORDER BY score DESC, m.id DESC LIMIT $4";

    // plainto_tsquery reads the text itself; the words only tell whether there is one.
    fn search_terms(query: &str) -> Option<String> {
        fts5_query(query).map(|_| query.to_owned())
    }

    fn time(t: DateTime<Utc>) -> DateTime<Utc> {
        t
    }

    fn read_time(stored: DateTime<Utc>) -> Result<DateTime<Utc>, StoreError> {
        Ok(stored)
    }

    fn meta_time(t: DateTime<Utc>) -> DateTime<Utc> {
        t
    }

    fn id(id: Uuid) -> Uuid {
        id
    }

    fn read_id(stored: Uuid) -> Result<Uuid, StoreError> {
        Ok(stored)
    }
}
