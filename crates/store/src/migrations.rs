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
    (0018, "hardware_ids_per_owner"),
    (0019, "telemetry_usage"),
    (0020, "files"),
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
    (0018, "hardware_ids_per_owner"),
    (0019, "telemetry_usage"),
    (0020, "files"),
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

    /// Upgrading a SQLite database that has devices with hardware ids keeps them, now unique
    /// per owner.
    #[tokio::test]
    async fn hardware_ids_move_to_their_per_owner_column() {
        use sqlx::sqlite::SqlitePoolOptions;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let before = SQLITE.iter().position(|m| m.0 == 18).unwrap();
        migrator(&SQLITE[..before])
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        for (id, owner, hw) in [("d1", "u1", "aa:bb"), ("d2", "u2", "cc:dd")] {
            sqlx::query("INSERT OR IGNORE INTO users (id, email, password_hash, role, active, created_at, updated_at) VALUES ($1, $1, 'x', 'user', 1, 0, 0)")
                .bind(owner)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO devices (id, owner_id, name, model, metadata, hardware_id, status, \
                 created_at, updated_at) VALUES ($1, $2, 'n', 'm', '{}', $3, 'offline', 0, 0)",
            )
            .bind(id)
            .bind(owner)
            .bind(hw)
            .execute(&pool)
            .await
            .unwrap();
        }
        migrator(SQLITE).await.unwrap().run(&pool).await.unwrap();
        let moved: Vec<(String, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT id, hw_id, hardware_id FROM devices ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            moved,
            [
                ("d1".into(), Some("aa:bb".into()), None),
                ("d2".into(), Some("cc:dd".into()), None)
            ]
        );
        // Another owner may have the id now; the same owner may not twice.
        let insert = |id: &'static str, owner: &'static str| {
            sqlx::query(
                "INSERT INTO devices (id, owner_id, name, model, metadata, hw_id, status, \
                 created_at, updated_at) VALUES ($1, $2, 'n', 'm', '{}', 'aa:bb', 'offline', 0, 0)",
            )
            .bind(id)
            .bind(owner)
            .execute(&pool)
        };
        insert("d3", "u2").await.unwrap();
        assert!(insert("d4", "u1").await.is_err());
    }
}
