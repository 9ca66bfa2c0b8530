//! What differs between SQLite and PostgreSQL in the queries written once for both.
//!
//! Those queries use `$1`-style placeholders on both engines: sqlx binds SQLite's `$N` by its
//! number, as PostgreSQL does, so one SQL text serves both unchanged. What the engines store
//! differently goes through [`Dialect`]: SQLite keeps times as Unix microseconds in INTEGER
//! columns and UUIDs as TEXT, PostgreSQL has TIMESTAMPTZ and UUID. The queries themselves live
//! in `queries/`, as macros that each backend expands once with its own store type.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use crate::StoreError;

/// How one engine stores what the shared queries bind and read.
pub(crate) trait Dialect {
    /// The engine.
    type Db: sqlx::Database;
    /// A time as bound and read.
    type Time;
    /// A UUID as bound and read.
    type Id;

    /// The case-insensitive `LIKE`.
    const ILIKE: &'static str;
    /// Written after a text parameter that goes into a JSON column.
    const AS_JSON: &'static str;
    /// The time `$1` less `r.retention_max_age` seconds, comparable with a stored time.
    const AGE_CUTOFF: &'static str;

    /// A time to bind.
    fn time(t: DateTime<Utc>) -> Self::Time;

    /// A stored time read back.
    fn read_time(stored: Self::Time) -> Result<DateTime<Utc>, StoreError>;

    /// A UUID to bind.
    fn id(id: Uuid) -> Self::Id;

    /// A stored UUID read back.
    fn read_id(stored: Self::Id) -> Result<Uuid, StoreError>;

    /// A stored time that may be NULL.
    fn read_opt_time(stored: Option<Self::Time>) -> Result<Option<DateTime<Utc>>, StoreError> {
        stored.map(Self::read_time).transpose()
    }

    /// A stored UUID that may be NULL.
    fn read_opt_id(stored: Option<Self::Id>) -> Result<Option<Uuid>, StoreError> {
        stored.map(Self::read_id).transpose()
    }
}

impl Dialect for crate::SqliteStore {
    type Db = sqlx::Sqlite;
    type Time = i64;
    type Id = String;

    // SQLite's LIKE ignores ASCII case already.
    const ILIKE: &'static str = "LIKE";
    const AS_JSON: &'static str = "";
    const AGE_CUTOFF: &'static str = "$1 - r.retention_max_age * 1000000";

    fn time(t: DateTime<Utc>) -> i64 {
        t.timestamp_micros()
    }

    fn read_time(stored: i64) -> Result<DateTime<Utc>, StoreError> {
        DateTime::from_timestamp_micros(stored).ok_or_else(|| {
            StoreError::Other(format!("stored time {stored} is out of range").into())
        })
    }

    fn id(id: Uuid) -> String {
        id.to_string()
    }

    fn read_id(stored: String) -> Result<Uuid, StoreError> {
        Uuid::parse_str(&stored).map_err(|e| StoreError::Other(Box::new(e)))
    }
}

impl Dialect for crate::PostgresStore {
    type Db = sqlx::Postgres;
    type Time = DateTime<Utc>;
    type Id = Uuid;

    const ILIKE: &'static str = "ILIKE";
    const AS_JSON: &'static str = "::jsonb";
    const AGE_CUTOFF: &'static str = "$1 - make_interval(secs => r.retention_max_age)";

    fn time(t: DateTime<Utc>) -> DateTime<Utc> {
        t
    }

    fn read_time(stored: DateTime<Utc>) -> Result<DateTime<Utc>, StoreError> {
        Ok(stored)
    }

    fn id(id: Uuid) -> Uuid {
        id
    }

    fn read_id(stored: Uuid) -> Result<Uuid, StoreError> {
        Ok(stored)
    }
}

/// One column of a row, with a typed error.
pub(crate) fn get<'r, R, T>(row: &'r R, column: &str) -> Result<T, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get(column)
        .map_err(|e| StoreError::from_sqlx("row", e))
}
