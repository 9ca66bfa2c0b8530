//! The queries that read the same on SQLite and PostgreSQL, written once.
//!
//! Each file holds a macro that a backend expands with its store type: the expansion is a
//! module where every query is plain sqlx on concrete types, with what differs taken from the
//! store's [`Dialect`](crate::dialect::Dialect). A macro rather than functions generic over
//! the engine keeps sqlx's executor, argument and decoding bounds out of every signature.

pub(crate) mod cron;
pub(crate) mod deployments;
pub(crate) mod devices;
pub(crate) mod files;
pub(crate) mod firmware;
pub(crate) mod identity;
pub(crate) mod jobs;
pub(crate) mod meta;
pub(crate) mod rooms;
