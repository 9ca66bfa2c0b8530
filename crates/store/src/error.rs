//! The store's error: what callers may act on, with the engine's own error kept for the log.

use std::error::Error as StdError;

/// Why a store operation failed. The engine's message is kept as the source, for logs only: it
/// may contain SQL and must never reach a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing asked for does not exist.
    #[error("{entity} not found")]
    NotFound {
        /// What was looked for, such as `meta`.
        entity: &'static str,
    },
    /// The write would break a uniqueness or reference rule.
    #[error("{entity} conflicts with an existing one")]
    Conflict {
        /// What was written.
        entity: &'static str,
        /// The engine's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The database cannot be reached right now.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn StdError + Send + Sync>),
    /// This backend does not do that; the message says what to use instead.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The request cannot be carried out as given; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// Anything else; a bug or a broken database.
    #[error("database error")]
    Other(#[source] Box<dyn StdError + Send + Sync>),
}

impl StoreError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    /// Classifies an engine error for an operation on `entity`.
    pub(crate) fn from_sqlx(entity: &'static str, err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::RowNotFound => Self::NotFound { entity },
            sqlx::Error::Database(ref db)
                if db.is_unique_violation() || db.is_foreign_key_violation() =>
            {
                Self::Conflict {
                    entity,
                    source: Box::new(err),
                }
            }
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| server_gone(&c)) => {
                Self::Unavailable(Box::new(err))
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(Box::new(err)),
            other => Self::Other(Box::new(other)),
        }
    }
}

/// Whether a PostgreSQL SQLSTATE says the database cannot be used right now rather than that
/// the statement was wrong: a connection exception (class 08, but not 08P01, a protocol
/// violation, which is a bug to see as one), the server shutting down or terminating the
/// connection (57P01–57P03), too many connections (53300), or the database not existing
/// (3D000). SQLite's codes are numbers and never match.
fn server_gone(sqlstate: &str) -> bool {
    (sqlstate.starts_with("08") && sqlstate != "08P01")
        || matches!(sqlstate, "57P01" | "57P02" | "57P03" | "53300" | "3D000")
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(e) => Self::from_sqlx("migration", e),
            other => Self::Other(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_gone;

    #[test]
    fn a_lost_server_is_told_apart_from_a_wrong_statement() {
        for gone in ["08006", "08001", "57P01", "57P02", "57P03", "3D000"] {
            assert!(server_gone(gone), "{gone}");
        }
        // A syntax error, a unique violation, and SQLite's numeric codes are not.
        for other in ["42601", "23505", "57014", "5", "2067"] {
            assert!(!server_gone(other), "{other}");
        }
    }
}
