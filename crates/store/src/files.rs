//! Storage of uploaded files' records and their owners' usage and quotas. The bytes are
//! objects in the media capability's storage (a local folder or S3), not rows.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use unhidra_core::UserId;
use uuid::Uuid;

use crate::StoreError;

/// A stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Its id.
    pub id: Uuid,
    /// Who uploaded it; `None` once that account is deleted (the cleanup removes it).
    pub owner: Option<UserId>,
    /// `pending_scan`, `ready`, `quarantined` or `deleted`.
    pub state: String,
    /// `private`, `link` or `public`.
    pub access: String,
    /// Its name as uploaded, sanitised.
    pub name: String,
    /// Its type, read from its content.
    pub content_type: String,
    /// Its length in bytes.
    pub size: i64,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
    /// Where its bytes are in the storage.
    pub storage_key: String,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
    /// When it expires (the cleanup removes it then).
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was deleted.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// How much an owner stores: what counts against a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileUsage {
    /// Bytes of their files that are not deleted.
    pub bytes: i64,
    /// Their files that are not deleted.
    pub files: i64,
}

/// A quota: the most bytes and files (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileQuota {
    /// Bytes.
    pub max_bytes: Option<i64>,
    /// Files.
    pub max_files: Option<i64>,
}

/// Files' records, usage and quotas.
#[async_trait]
pub trait FileStore: Send + Sync {
    /// Stores a new file's record and adds it to its owner's usage, in one transaction, unless
    /// that would pass `quota`: then nothing is stored and the answer is `false`.
    async fn create_file(&self, record: &FileRecord, quota: &FileQuota)
    -> Result<bool, StoreError>;

    /// One file (deleted ones too).
    async fn file(&self, id: Uuid) -> Result<FileRecord, StoreError>;

    /// An owner's files that are not deleted, newest first, older than `before` (its
    /// `created_at` and id) when given, at most `limit`.
    async fn list_files(
        &self,
        owner: UserId,
        before: Option<(DateTime<Utc>, Uuid)>,
        limit: u32,
    ) -> Result<Vec<FileRecord>, StoreError>;

    /// Marks a file deleted and takes it off its owner's usage, in one transaction; answers its
    /// record as it was, or `None` when it was deleted already.
    async fn delete_file(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<FileRecord>, StoreError>;

    /// Sets a file's access; false when it is deleted or unknown.
    async fn set_file_access(&self, id: Uuid, access: &str) -> Result<bool, StoreError>;

    /// An owner's usage.
    async fn file_usage(&self, owner: UserId) -> Result<FileUsage, StoreError>;

    /// The quota an admin set for one user, if any.
    async fn file_quota(&self, owner: UserId) -> Result<Option<FileQuota>, StoreError>;

    /// Sets (or, with `None`, removes) a user's own quota.
    async fn set_file_quota(
        &self,
        owner: UserId,
        quota: Option<&FileQuota>,
    ) -> Result<(), StoreError>;
}
