//! What differs between SQLite and PostgreSQL in the queries written once for both.
//!
//! Those queries use `$1`-style placeholders on both engines: sqlx binds SQLite's `$N` by its
//! number, as PostgreSQL does, so one SQL text serves both unchanged. What the engines store
//! differently goes through [`Dialect`], which each backend implements next to its connection:
//! SQLite keeps times as Unix microseconds in INTEGER columns and UUIDs as TEXT, PostgreSQL has
//! TIMESTAMPTZ and UUID, and their full-text search has nothing in common. The queries
//! themselves live in `queries/`, as macros that each backend expands once with its store type.

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
    /// A time as `meta.created_at` stores it.
    type MetaTime;

    /// The case-insensitive `LIKE`.
    const ILIKE: &'static str;
    /// Written after a text parameter that goes into a JSON column.
    const AS_JSON: &'static str;
    /// The time `$1` less `r.retention_max_age` seconds, comparable with a stored time.
    const AGE_CUTOFF: &'static str;
    /// How a transaction that writes begins: it must see, statement by statement, what other
    /// transactions committed (the job claim's check of concurrency limits relies on it).
    const BEGIN_WRITE: &'static str;
    /// Written after the `SELECT` of rows a transaction is about to change, so that two
    /// transactions never take the same row and neither waits for the other; empty where a
    /// writing transaction has the database to itself.
    const SKIP_LOCKED: &'static str;
    /// A statement taking the transaction-long lock `$1` (a BIGINT), which serialises the claims
    /// of one concurrency key across nodes; `None` where writers are serialised already.
    const LOCK_KEY: Option<&'static str>;
    /// A statement notifying channel `$1` with the payload `$2` for other connections that
    /// listen; `None` where no other node could listen.
    const NOTIFY: Option<&'static str>;
    /// The start of the `$5`-second bucket that `ts` falls in, comparable with a stored time.
    const TIME_BUCKET: &'static str;
    /// Full-text search: the terms `$1` in the rooms of user `$2` (or in room `$3` only), at
    /// most `$4`, best first, with the message's columns, `snippet` and `score` (higher is
    /// better).
    const SEARCH: &'static str;

    /// What to bind as `$1` of [`Self::SEARCH`]; `None` if the text has no word to look for.
    fn search_terms(query: &str) -> Option<String>;

    /// A time to bind.
    fn time(t: DateTime<Utc>) -> Self::Time;

    /// A stored time read back.
    fn read_time(stored: Self::Time) -> Result<DateTime<Utc>, StoreError>;

    /// A time to bind to `meta.created_at`.
    fn meta_time(t: DateTime<Utc>) -> Self::MetaTime;

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
