//! The database of one measurement of `unhidra-bench jobs`, made for it and removed after: an
//! SQLite file in a fresh folder, or a database of its own on the PostgreSQL server (created
//! with `CREATE DATABASE`, dropped with `DROP DATABASE … WITH (FORCE)`), so that no run sees
//! another's rows, dead tuples or statistics.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::BoxError;
use crate::server;

/// How long creating or dropping a database may take.
const ADMIN_WITHIN: Duration = Duration::from_secs(30);

/// Numbers the databases of this process.
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A database that exists for one measurement.
#[derive(Debug)]
pub enum TempDb {
    /// `jobs.db` in a folder of its own.
    Sqlite {
        /// The folder, removed with it.
        dir: PathBuf,
        /// `sqlite:…/jobs.db`.
        url: String,
    },
    /// A database of its own on the server that `admin_url` names.
    Postgres {
        /// Where `CREATE DATABASE` and `DROP DATABASE` are sent.
        admin_url: String,
        /// Its name.
        name: String,
        /// The admin URL with its database swapped for this one.
        url: String,
    },
}

impl TempDb {
    /// A new SQLite file in a new folder under the temporary folder.
    pub fn sqlite() -> Result<Self, BoxError> {
        let dir = server::fresh_data_dir()?;
        let url = format!("sqlite:{}", dir.join("jobs.db").display());
        Ok(Self::Sqlite { dir, url })
    }

    /// A new, empty database on the PostgreSQL server of `admin_url`, named `prefix_<pid>_<n>`.
    pub async fn postgres(admin_url: &str, prefix: &str) -> Result<Self, BoxError> {
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let url = with_database(admin_url, &name)?;
        let create = async {
            let mut admin = PgConnection::connect(admin_url)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL at {admin_url}: {e}"))?;
            let created = sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await;
            let _ = admin.close().await;
            created.map_err(|e| format!("cannot create database {name}: {e}"))
        };
        tokio::time::timeout(ADMIN_WITHIN, create)
            .await
            .map_err(|_| {
                format!("PostgreSQL at {admin_url} did not answer within {ADMIN_WITHIN:?}")
            })??;
        Ok(Self::Postgres {
            admin_url: admin_url.to_owned(),
            name,
            url,
        })
    }

    /// The URL the store (or graphile-worker) opens.
    pub fn url(&self) -> &str {
        match self {
            Self::Sqlite { url, .. } | Self::Postgres { url, .. } => url,
        }
    }

    /// Removes it, ending any connection that is left.
    pub async fn remove(self) {
        match self {
            Self::Sqlite { dir, .. } => server::remove_dir(&dir),
            Self::Postgres {
                admin_url, name, ..
            } => {
                let drop = async {
                    let mut admin = PgConnection::connect(&admin_url).await?;
                    let dropped =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await
                            .map(|_| ());
                    let _ = admin.close().await;
                    dropped
                };
                match tokio::time::timeout(ADMIN_WITHIN, drop).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => crate::note(&format!("cannot drop database {name}: {e}")),
                    Err(_) => crate::note(&format!(
                        "cannot drop database {name}: no answer within {ADMIN_WITHIN:?}"
                    )),
                }
            }
        }
    }
}

/// Checks that `url` is a PostgreSQL URL of this machine: the bench talks to 127.0.0.1 only.
pub fn check_local_postgres(url: &str) -> Result<(), BoxError> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("--postgres {url}: not a postgres:// URL"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    if matches!(host, "127.0.0.1" | "localhost" | "::1") {
        Ok(())
    } else {
        Err(format!(
            "--postgres {url}: the bench only talks to this machine (127.0.0.1, localhost or ::1)"
        )
        .into())
    }
}

/// `url` with its database (the path) replaced by `name`, its query kept.
fn with_database(url: &str, name: &str) -> Result<String, BoxError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let authority_start = base.find("://").ok_or("not a URL")? + 3;
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut own = format!("{}/{name}", &base[..path_start]);
    if !query.is_empty() {
        own.push('?');
        own.push_str(query);
    }
    Ok(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_swapped() {
        let swap = |url: &str| with_database(url, "b").unwrap_or_default();
        assert_eq!(
            swap("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(swap("postgres://u@localhost"), "postgres://u@localhost/b");
        assert_eq!(
            swap("postgres://u:p@127.0.0.1/test?sslmode=disable"),
            "postgres://u:p@127.0.0.1/b?sslmode=disable"
        );
    }

    #[test]
    fn only_this_machine_is_accepted() {
        assert!(check_local_postgres("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(check_local_postgres("postgresql://u:p@localhost/test").is_ok());
        assert!(check_local_postgres("postgres://u@[::1]:5432/test").is_ok());
        assert!(check_local_postgres("postgres://u@10.0.0.5/test").is_err());
        assert!(check_local_postgres("postgres://u@127.0.0.1.example.com/test").is_err());
        assert!(check_local_postgres("mysql://127.0.0.1/test").is_err());
    }
}
