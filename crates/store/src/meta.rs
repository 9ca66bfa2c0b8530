//! Facts about the installation itself, kept as key → value.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::StoreError;

/// The key under which the installation's id is kept, written once at first start.
pub const INSTANCE_ID: &str = "instance_id";

/// Key → value facts about this installation.
#[async_trait]
pub trait MetaStore {
    /// The value of `key`, or [`StoreError::NotFound`].
    async fn meta_get(&self, key: &str) -> Result<String, StoreError>;

    /// Stores `key` for the first time; [`StoreError::Conflict`] if it exists already.
    async fn meta_insert(
        &self,
        key: &str,
        value: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The value of `key`, storing `value` first if the key is new. Concurrent callers all get
    /// the one value that won.
    async fn meta_get_or_insert(
        &self,
        key: &str,
        value: &str,
        now: DateTime<Utc>,
    ) -> Result<String, StoreError> {
        match self.meta_insert(key, value, now).await {
            Ok(()) => Ok(value.to_owned()),
            Err(StoreError::Conflict { .. }) => self.meta_get(key).await,
            Err(e) => Err(e),
        }
    }
}
