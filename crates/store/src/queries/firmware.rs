//! Firmware images' records on both engines.

/// Expands to a module `$module` with `impl FirmwareStore for $store`.
macro_rules! firmware_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use unhidra_core::UserId;

            use $crate::StoreError;
            use $crate::dialect::{Dialect, get};
            use $crate::firmware::{FirmwareRecord, FirmwareStore};

            type Store = $store;
            type Row = <<Store as Dialect>::Db as sqlx::Database>::Row;

            const COLUMNS: &str = "sha256, size, kind, project, target, version, secure_version, \
                idf_version, elf_sha256, manifest, key_id, uploaded_by, uploaded_at, retired_at";

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("firmware", e)
            }

            fn record(row: &Row) -> Result<FirmwareRecord, StoreError> {
                Ok(FirmwareRecord {
                    sha256: get(row, "sha256")?,
                    size: get(row, "size")?,
                    kind: get(row, "kind")?,
                    project: get(row, "project")?,
                    target: get(row, "target")?,
                    version: get(row, "version")?,
                    secure_version: get(row, "secure_version")?,
                    idf_version: get(row, "idf_version")?,
                    elf_sha256: get(row, "elf_sha256")?,
                    manifest: get(row, "manifest")?,
                    key_id: get(row, "key_id")?,
                    uploaded_by: Store::read_opt_id(get(row, "uploaded_by")?)?.map(UserId),
                    uploaded_at: Store::read_time(get(row, "uploaded_at")?)?,
                    retired_at: Store::read_opt_time(get(row, "retired_at")?)?,
                })
            }

            #[async_trait]
            impl FirmwareStore for Store {
                async fn create_firmware(&self, r: &FirmwareRecord) -> Result<(), StoreError> {
                    sqlx::query(&format!(
                        "INSERT INTO firmware ({COLUMNS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                    ))
                    .bind(&r.sha256)
                    .bind(r.size)
                    .bind(&r.kind)
                    .bind(&r.project)
                    .bind(&r.target)
                    .bind(&r.version)
                    .bind(r.secure_version)
                    .bind(r.idf_version.as_deref())
                    .bind(r.elf_sha256.as_deref())
                    .bind(&r.manifest)
                    .bind(&r.key_id)
                    .bind(r.uploaded_by.map(|u| Store::id(u.0)))
                    .bind(Store::time(r.uploaded_at))
                    .bind(r.retired_at.map(Store::time))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(())
                }

                async fn firmware(&self, sha256: &str) -> Result<FirmwareRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM firmware WHERE sha256 = $1"
                    ))
                    .bind(sha256)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    record(&row)
                }

                async fn list_firmware(
                    &self,
                    project: Option<&str>,
                    target: Option<&str>,
                    limit: u32,
                ) -> Result<Vec<FirmwareRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM firmware \
                         WHERE (CAST($1 AS TEXT) IS NULL OR project = $1) \
                         AND (CAST($2 AS TEXT) IS NULL OR target = $2) \
                         ORDER BY uploaded_at DESC, sha256 LIMIT $3"
                    ))
                    .bind(project)
                    .bind(target)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(record).collect()
                }

                async fn retire_firmware(
                    &self,
                    sha256: &str,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE firmware SET retired_at = $2 \
                         WHERE sha256 = $1 AND retired_at IS NULL",
                    )
                    .bind(sha256)
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }
            }
        }
    };
}

pub(crate) use firmware_queries;
