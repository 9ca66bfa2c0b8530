//! Fresh, isolated databases for tests: a temp SQLite file, or a PostgreSQL schema of its own.
//!
//! PostgreSQL is found through `TEST_POSTGRES_URL` (default: the local server's `test`
//! database). Tests never share a database, so they run in parallel.

use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::{Backend, PostgresStore, SqliteStore, Store, StoreOptions};

/// The variable naming the PostgreSQL server that tests use.
pub const POSTGRES_URL_VAR: &str = "TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The PostgreSQL URL tests connect to.
pub fn postgres_url() -> String {
    std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// A database that exists for one test; dropping it removes it.
#[derive(Debug)]
pub struct TestDb {
    /// The store, not yet migrated.
    pub store: Arc<dyn Store>,
    /// A URL that opens the same database, for a server or a CLI run under test.
    pub url: String,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    Sqlite(
        #[allow(dead_code, reason = "held so the folder lives as long as the test")]
        tempfile::TempDir,
    ),
    Postgres {
        schema: String,
    },
    /// A PostgreSQL database of its own, for tests that take the whole database away.
    PostgresDatabase {
        name: String,
    },
    /// Another handle on a database some other [`TestDb`] removes.
    Shared,
}

impl TestDb {
    /// A fresh database on `backend`.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self::sqlite().await,
            Backend::Postgres => Self::postgres().await,
        }
    }

    /// A new SQLite file in a temp folder.
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("unhidra.db");
        let store = SqliteStore::open(&path, &StoreOptions::default())
            .await
            .expect("open SQLite");
        Self {
            store: Arc::new(store),
            url: format!("sqlite:{}", path.display()),
            cleanup: Cleanup::Sqlite(dir),
        }
    }

    /// A new schema on the test PostgreSQL server, made the connections' search path.
    pub async fn postgres() -> Self {
        let url = postgres_url();
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&url).await.unwrap_or_else(|e| {
            panic!("PostgreSQL for tests at {POSTGRES_URL_VAR}={url} is not reachable: {e}")
        });
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .expect("create schema");
        let _ = admin.close().await;
        let options: PgConnectOptions = url.parse().expect("TEST_POSTGRES_URL");
        let options = options.options([("search_path", schema.as_str())]);
        let store = PostgresStore::connect(options, &StoreOptions::default())
            .await
            .expect("connect PostgreSQL");
        let sep = if url.contains('?') { '&' } else { '?' };
        Self {
            store: Arc::new(store),
            url: format!("{url}{sep}options=-c%20search_path%3D{schema}"),
            cleanup: Cleanup::Postgres { schema },
        }
    }

    /// A new database of its own on the test PostgreSQL server (not a schema), for a test that
    /// drops it under a running server.
    pub async fn postgres_database() -> Self {
        let url = postgres_url();
        let name = format!("unhidra_gone_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&url).await.unwrap_or_else(|e| {
            panic!("PostgreSQL for tests at {POSTGRES_URL_VAR}={url} is not reachable: {e}")
        });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create database");
        let _ = admin.close().await;
        // The same server and credentials, another database: swap the URL's path.
        let (base, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
        let authority_end = base.find("://").map_or(0, |i| i + 3);
        let path_start = base[authority_end..]
            .find('/')
            .map_or(base.len(), |i| authority_end + i);
        let mut own = format!("{}/{name}", &base[..path_start]);
        if !query.is_empty() {
            own = format!("{own}?{query}");
        }
        let options: PgConnectOptions = own.parse().expect("TEST_POSTGRES_URL");
        let store = PostgresStore::connect(options, &StoreOptions::default())
            .await
            .expect("connect PostgreSQL");
        Self {
            store: Arc::new(store),
            url: own,
            cleanup: Cleanup::PostgresDatabase { name },
        }
    }

    /// Takes the database of [`TestDb::postgres_database`] away under whoever uses it: ends
    /// its connections and drops it, as an operator's mistake or a lost server would.
    pub async fn remove_database_now(&self) {
        let Cleanup::PostgresDatabase { name } = &self.cleanup else {
            panic!("only a database of its own can be removed under a server");
        };
        let mut admin = PgConnection::connect(&postgres_url())
            .await
            .expect("connect PostgreSQL");
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(name)
            .execute(&mut admin)
            .await
            .expect("terminate the database's connections");
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .expect("drop the database");
        let _ = admin.close().await;
    }

    /// Ends the connections of [`TestDb::postgres_database`] that listen for notifications
    /// (the job wake-up listener), as a network failure or a server restart would; answers how
    /// many it ended.
    pub async fn end_listeners(&self) -> i64 {
        let Cleanup::PostgresDatabase { name } = &self.cleanup else {
            panic!("only a database of its own has listeners no other test shares");
        };
        let mut admin = PgConnection::connect(&postgres_url())
            .await
            .expect("connect PostgreSQL");
        let ended: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND query LIKE 'LISTEN%') ended",
        )
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .expect("end the listeners");
        let _ = admin.close().await;
        ended
    }

    /// A second handle on the same database with a pool of its own, as a second server node
    /// has; removing the database stays with `self`.
    pub async fn another_handle(&self) -> Self {
        Self {
            store: crate::connect(&self.url, &StoreOptions::default())
                .await
                .expect("open the database again"),
            url: self.url.clone(),
            cleanup: Cleanup::Shared,
        }
    }

    /// Opens the store again, after a server that used it closed it.
    pub async fn reopen(&mut self) {
        self.store = crate::connect(&self.url, &StoreOptions::default())
            .await
            .expect("reopen");
    }

    /// Runs SQL on a connection of its own, to put the database in states the API cannot
    /// (such as a migration rolled back by hand).
    pub async fn execute_raw(&self, sql: &str) {
        if self.url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(&self.url)
                .await
                .expect("connect");
            sqlx::raw_sql(sql)
                .execute(&mut conn)
                .await
                .expect("execute");
            let _ = conn.close().await;
        } else {
            let mut conn = PgConnection::connect(&self.url).await.expect("connect");
            sqlx::raw_sql(sql)
                .execute(&mut conn)
                .await
                .expect("execute");
            let _ = conn.close().await;
        }
    }

    /// Closes the store and removes the database.
    pub async fn drop_db(self) {
        self.store.close().await;
        let drop = match &self.cleanup {
            Cleanup::Postgres { schema } => format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
            Cleanup::PostgresDatabase { name } => {
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            }
            Cleanup::Sqlite(_) | Cleanup::Shared => return,
        };
        if let Ok(mut admin) = PgConnection::connect(&postgres_url()).await {
            let _ = sqlx::query(&drop).execute(&mut admin).await;
            let _ = admin.close().await;
        }
    }
}

/// Runs one async test body against SQLite and against PostgreSQL, each in a fresh database.
///
/// ```text
/// async fn meta_round_trip(db: &TestDb) { … }
/// both_backends!(meta_round_trip);
/// ```
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {

            #[tokio::test]
            async fn sqlite() {
                let db = $crate::testing::TestDb::new($crate::Backend::Sqlite).await;
                super::$name(&db).await;
                db.drop_db().await;
            }

            #[tokio::test]
            async fn postgres() {
                let db = $crate::testing::TestDb::new($crate::Backend::Postgres).await;
                super::$name(&db).await;
                db.drop_db().await;
            }
        }
    };
}
