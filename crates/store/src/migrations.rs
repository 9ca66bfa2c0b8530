//! Migrations embedded in the binary, one list per backend, applied by sqlx's migrator.

use std::borrow::Cow;

use futures_core::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

/// One migration: version, description, SQL.
type Embedded = (i64, &'static str, &'static str);

/// Declares one backend's list: version, description and the file under
/// `migrations/<backend>/`, which is named `NNNN_<description>.sql`.
macro_rules! embedded {
    ($backend:literal: $(($version:literal, $name:literal)),+ $(,)?) => {
        &[$((
            $version,
            $name,
            include_str!(concat!(
                "../migrations/", $backend, "/", stringify!($version), "_", $name, ".sql"
            )),
        )),+]
    };
}

/// SQLite's migrations, oldest first. A new one is appended, never edited once released.
#[allow(clippy::zero_prefixed_literal, reason = "spelled as in the file names")]
pub(crate) const SQLITE: &[Embedded] = embedded!("sqlite":
    (0001, "meta"),
    (0002, "identity"),
    (0003, "one_time_tokens"),
    (0004, "totp"),
    (0005, "rooms"),
    (0006, "search"),
    (0007, "session_factors"),
    (0008, "jobs"),
    (0009, "cron"),
    (0010, "devices"),
    (0011, "jobs_fewer_writes"),
    (0012, "device_commands"),
    (0013, "provisioning"),
    (0014, "device_events"),
    (0015, "firmware"),
    (0016, "deployments"),
    (0017, "deployment_joins"),
);

/// PostgreSQL's migrations, oldest first, in step with [`SQLITE`].
#[allow(clippy::zero_prefixed_literal, reason = "spelled as in the file names")]
pub(crate) const POSTGRES: &[Embedded] = embedded!("postgres":
    (0001, "meta"),
    (0002, "identity"),
    (0003, "one_time_tokens"),
    (0004, "totp"),
    (0005, "rooms"),
    (0006, "search"),
    (0007, "session_factors"),
    (0008, "jobs"),
    (0009, "cron"),
    (0010, "devices"),
    (0011, "jobs_fewer_writes"),
    (0012, "device_commands"),
    (0013, "provisioning"),
    (0014, "device_events"),
    (0015, "firmware"),
    (0016, "deployments"),
    (0017, "deployment_joins"),
);

#[derive(Debug)]
struct Source(&'static [Embedded]);

impl<'s> MigrationSource<'s> for Source {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// The migrator for one backend's list.
pub(crate) async fn migrator(list: &'static [Embedded]) -> Result<Migrator, BoxDynError> {
    Ok(Migrator::new(Source(list)).await?)
}

/// How many of `list` the database has applied successfully.
pub(crate) const APPLIED_SQL: &str = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_migrations() {
        let versions = |list: &[Embedded]| list.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>();
        assert_eq!(versions(SQLITE), versions(POSTGRES));
        assert!(SQLITE.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
