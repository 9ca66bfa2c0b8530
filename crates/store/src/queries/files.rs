//! Files' records, usage and quotas on both engines.

/// Expands to a module `$module` with `impl FileStore for $store`.
macro_rules! file_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use unhidra_core::UserId;
            use uuid::Uuid;

            use $crate::StoreError;
            use $crate::dialect::{Dialect, get};
            use $crate::files::{FileQuota, FileRecord, FileStore, FileUsage};

            type Store = $store;
            type Row = <<Store as Dialect>::Db as sqlx::Database>::Row;

            const COLUMNS: &str = "id, owner_id, state, access, name, content_type, size, \
                sha256, storage_key, created_at, expires_at, deleted_at";

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("file", e)
            }

            fn record(row: &Row) -> Result<FileRecord, StoreError> {
                Ok(FileRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    owner: Store::read_opt_id(get(row, "owner_id")?)?.map(UserId),
                    state: get(row, "state")?,
                    access: get(row, "access")?,
                    name: get(row, "name")?,
                    content_type: get(row, "content_type")?,
                    size: get(row, "size")?,
                    sha256: get(row, "sha256")?,
                    storage_key: get(row, "storage_key")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    expires_at: Store::read_opt_time(get(row, "expires_at")?)?,
                    deleted_at: Store::read_opt_time(get(row, "deleted_at")?)?,
                })
            }

            #[async_trait]
            impl FileStore for Store {
                async fn create_file(
                    &self,
                    r: &FileRecord,
                    quota: &FileQuota,
                ) -> Result<bool, StoreError> {
                    let Some(owner) = r.owner else {
                        return Err(StoreError::Other("a new file has an owner".into()));
                    };
                    if quota.max_bytes.is_some_and(|m| r.size > m)
                        || quota.max_files.is_some_and(|m| m < 1)
                    {
                        return Ok(false);
                    }
                    let mut tx = self
                        .pool
                        .begin_with(Store::BEGIN_WRITE)
                        .await
                        .map_err(err)?;
                    // The usage grows only while it stays within the quota: concurrent uploads
                    // (on any node) are serialised by the owner's row.
                    let kept: Option<i64> = sqlx::query_scalar(
                        "INSERT INTO file_usage (owner_id, bytes, files) VALUES ($1, $2, 1) \
                         ON CONFLICT (owner_id) DO UPDATE \
                         SET bytes = file_usage.bytes + excluded.bytes, \
                             files = file_usage.files + 1 \
                         WHERE ($3 IS NULL OR file_usage.bytes + excluded.bytes <= $3) \
                         AND ($4 IS NULL OR file_usage.files + 1 <= $4) \
                         RETURNING bytes",
                    )
                    .bind(Store::id(owner.0))
                    .bind(r.size)
                    .bind(quota.max_bytes)
                    .bind(quota.max_files)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(err)?;
                    if kept.is_none() {
                        return Ok(false);
                    }
                    sqlx::query(&format!(
                        "INSERT INTO files ({COLUMNS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                    ))
                    .bind(Store::id(r.id))
                    .bind(Store::id(owner.0))
                    .bind(&r.state)
                    .bind(&r.access)
                    .bind(&r.name)
                    .bind(&r.content_type)
                    .bind(r.size)
                    .bind(&r.sha256)
                    .bind(&r.storage_key)
                    .bind(Store::time(r.created_at))
                    .bind(r.expires_at.map(Store::time))
                    .bind(r.deleted_at.map(Store::time))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    tx.commit().await.map_err(err)?;
                    Ok(true)
                }

                async fn file(&self, id: Uuid) -> Result<FileRecord, StoreError> {
                    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = $1"))
                        .bind(Store::id(id))
                        .fetch_one(&self.pool)
                        .await
                        .map_err(err)?;
                    record(&row)
                }

                async fn list_files(
                    &self,
                    owner: UserId,
                    before: Option<(DateTime<Utc>, Uuid)>,
                    limit: u32,
                ) -> Result<Vec<FileRecord>, StoreError> {
                    let (at, id) = before.unzip();
                    let rows = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM files WHERE owner_id = $1 AND state <> 'deleted' \
                         AND ($2 IS NULL OR created_at < $2 OR (created_at = $2 AND id < $3)) \
                         ORDER BY created_at DESC, id DESC LIMIT $4"
                    ))
                    .bind(Store::id(owner.0))
                    .bind(at.map(Store::time))
                    .bind(id.map(Store::id))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(record).collect()
                }

                async fn delete_file(
                    &self,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<Option<FileRecord>, StoreError> {
                    let mut tx = self
                        .pool
                        .begin_with(Store::BEGIN_WRITE)
                        .await
                        .map_err(err)?;
                    let Some(row) = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM files WHERE id = $1 AND state <> 'deleted'"
                    ))
                    .bind(Store::id(id))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(err)?
                    else {
                        return Ok(None);
                    };
                    let before = record(&row)?;
                    let done = sqlx::query(
                        "UPDATE files SET state = 'deleted', deleted_at = $2 \
                         WHERE id = $1 AND state <> 'deleted'",
                    )
                    .bind(Store::id(id))
                    .bind(Store::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    if done.rows_affected() != 1 {
                        return Ok(None);
                    }
                    if let Some(owner) = before.owner {
                        sqlx::query(
                            "UPDATE file_usage SET bytes = bytes - $2, files = files - 1 \
                             WHERE owner_id = $1",
                        )
                        .bind(Store::id(owner.0))
                        .bind(before.size)
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    }
                    tx.commit().await.map_err(err)?;
                    Ok(Some(before))
                }

                async fn set_file_access(
                    &self,
                    id: Uuid,
                    access: &str,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE files SET access = $2 WHERE id = $1 AND state <> 'deleted'",
                    )
                    .bind(Store::id(id))
                    .bind(access)
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn file_usage(&self, owner: UserId) -> Result<FileUsage, StoreError> {
                    let row: Option<(i64, i64)> = sqlx::query_as(
                        "SELECT bytes, files FROM file_usage WHERE owner_id = $1",
                    )
                    .bind(Store::id(owner.0))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(row.map_or_else(FileUsage::default, |(bytes, files)| FileUsage {
                        bytes,
                        files,
                    }))
                }

                async fn file_quota(&self, owner: UserId) -> Result<Option<FileQuota>, StoreError> {
                    let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
                        "SELECT max_bytes, max_files FROM file_quotas WHERE owner_id = $1",
                    )
                    .bind(Store::id(owner.0))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(row.map(|(max_bytes, max_files)| FileQuota {
                        max_bytes,
                        max_files,
                    }))
                }

                async fn set_file_quota(
                    &self,
                    owner: UserId,
                    quota: Option<&FileQuota>,
                ) -> Result<(), StoreError> {
                    match quota {
                        Some(q) => sqlx::query(
                            "INSERT INTO file_quotas (owner_id, max_bytes, max_files) \
                             VALUES ($1, $2, $3) ON CONFLICT (owner_id) DO UPDATE \
                             SET max_bytes = excluded.max_bytes, max_files = excluded.max_files",
                        )
                        .bind(Store::id(owner.0))
                        .bind(q.max_bytes)
                        .bind(q.max_files),
                        None => sqlx::query("DELETE FROM file_quotas WHERE owner_id = $1")
                            .bind(Store::id(owner.0)),
                    }
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(())
                }
            }
        }
    };
}

pub(crate) use file_queries;
