//! The installation's key → value facts on both engines.

/// Expands to a module `$module` with `impl MetaStore for $store`.
macro_rules! meta_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};

            use $crate::StoreError;
            use $crate::dialect::Dialect;
            use $crate::meta::MetaStore;

            type Store = $store;

            #[async_trait]
            impl MetaStore for Store {
                async fn meta_get(&self, key: &str) -> Result<String, StoreError> {
                    sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
                        .bind(key)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| StoreError::from_sqlx("meta", e))
                }

                async fn meta_insert(
                    &self,
                    key: &str,
                    value: &str,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query("INSERT INTO meta (key, value, created_at) VALUES ($1, $2, $3)")
                        .bind(key)
                        .bind(value)
                        .bind(Store::meta_time(now))
                        .execute(&self.pool)
                        .await
                        .map_err(|e| StoreError::from_sqlx("meta", e))?;
                    Ok(())
                }
            }
        }
    };
}

pub(crate) use meta_queries;
