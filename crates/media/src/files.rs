//! The file service: uploads streamed to storage with their size capped as they stream, typed
//! by their content, named safely and counted against their owner's quota in the store's
//! transaction; downloads checked against the file's access; deletion; usage and quotas.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use unhidra_core::{Clock, Principal, Role, UserId};
use unhidra_identity::{AuditLog, RequestContext};
use unhidra_store::files::{FileQuota, FileRecord, FileUsage};
use unhidra_store::{Store, StoreError};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::kinds::{self, Kind, SNIFF_BYTES};
use crate::names::{self, NameError};
use crate::storage::{ObjectWriter, Reader, Storage};

/// Uploads at once per node; past it, `Busy`.
pub const MAX_UPLOADS: usize = 32;

/// Uploads at once per user on one node, so that one account cannot hold every slot.
pub const MAX_UPLOADS_PER_USER: usize = 4;

/// The longest name an upload may give (it is kept shorter: `names::MAX_NAME_CHARS`).
pub const MAX_GIVEN_NAME_CHARS: usize = 1000;

/// The most files one listing page has.
pub const MAX_PAGE: u32 = 200;

/// Why a file operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Not the caller's file, and not an admin.
    #[error("this file is not yours")]
    Forbidden,
    /// No such file (or not one the caller may know of).
    #[error("no such file")]
    NotFound,
    /// Larger than `files_max_bytes`.
    #[error("a file has at most {0} bytes")]
    TooLarge(u64),
    /// It would take its owner past their quota.
    #[error("the upload would pass your quota of {max_bytes:?} bytes and {max_files:?} files")]
    QuotaExceeded {
        /// The quota's bytes.
        max_bytes: Option<i64>,
        /// The quota's files.
        max_files: Option<i64>,
        /// The owner's usage before this upload.
        usage: FileUsage,
    },
    /// Its content is not of an allowed type (what it seems to be, when known).
    #[error("this type of file is not accepted{}", .0.map(|m| format!(" ({m})")).unwrap_or_default())]
    UnsupportedType(Option<&'static str>),
    /// Its name's extension is not its content's type.
    #[error("the name ends in .{extension}, but the content is {detected}")]
    TypeMismatch {
        /// The name's extension.
        extension: String,
        /// The type of the content.
        detected: &'static str,
    },
    /// Its name is refused.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An empty body.
    #[error("the file is empty")]
    Empty,
    /// A field is invalid: (JSON pointer, code, message).
    #[error("{2}")]
    Invalid(&'static str, &'static str, String),
    /// Too many uploads at once on this node.
    #[error("too many uploads at once; try again shortly")]
    Busy,
    /// A link to a file whose access is `private`.
    #[error("the file's access is private: set it to `link` to share it by link")]
    NotShared,
    /// A link this server did not sign for this file (or one its access no longer allows).
    #[error("the link is not valid for this file")]
    LinkInvalid,
    /// A genuine link that has expired.
    #[error("the link has expired")]
    LinkExpired,
    /// The storage failed.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who may download a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Its owner and admins.
    Private,
    /// Also whoever has a signed link to it.
    Link,
    /// Anyone, signed in or not.
    Public,
}

impl Access {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Link => "link",
            Self::Public => "public",
        }
    }

    fn parse(stored: &str) -> Self {
        match stored {
            "public" => Self::Public,
            "link" => Self::Link,
            _ => Self::Private,
        }
    }
}

/// A file as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = File)]
pub struct FileView {
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// Its owner.
    #[schema(value_type = Option<String>)]
    pub owner: Option<Uuid>,
    /// Its name, as uploaded and sanitised.
    pub name: String,
    /// Its type, read from its content.
    pub content_type: String,
    /// Its length in bytes.
    pub size: i64,
    /// Its SHA-256.
    pub sha256: String,
    /// `pending_scan`, `ready`, `quarantined` or `deleted`.
    pub state: String,
    /// Who may download it.
    pub access: Access,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
}

impl From<&FileRecord> for FileView {
    fn from(r: &FileRecord) -> Self {
        Self {
            id: r.id,
            owner: r.owner.map(|u| u.0),
            name: r.name.clone(),
            content_type: r.content_type.clone(),
            size: r.size,
            sha256: r.sha256.clone(),
            state: r.state.clone(),
            access: Access::parse(&r.access),
            created_at: r.created_at,
        }
    }
}

/// Usage against a quota, as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageView {
    /// Bytes stored.
    pub bytes: i64,
    /// Files stored.
    pub files: i64,
    /// The most bytes (`null`: no limit).
    pub max_bytes: Option<i64>,
    /// The most files (`null`: no limit).
    pub max_files: Option<i64>,
    /// Whether an admin set this user's quota (over their role's).
    pub custom: bool,
}

/// A page of files, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FilePage {
    /// The files.
    pub items: Vec<FileView>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// What the file service is configured with.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// The largest file, in bytes.
    pub max_bytes: u64,
    /// Each role's quota.
    pub user_quota: FileQuota,
    /// An admin's quota.
    pub admin_quota: FileQuota,
    /// Whether admin powers need a second factor.
    pub require_admin_mfa: bool,
    /// How long a signed link works when its maker names no `ttl`.
    pub link_ttl: std::time::Duration,
}

/// A signed link to a file's bytes.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileLink {
    /// The path and query to fetch, relative to the server's address.
    pub url: String,
    /// Until when it works.
    pub expires_at: DateTime<Utc>,
}

/// What a file link's signature covers comes after this.
const LINK_DOMAIN: &str = "unhidra-file-link-v1";

/// The store's meta key of the links' key (one for every node).
const LINK_KEY_META: &str = "files_link_key";

/// The longest a link may work: a week.
pub const MAX_LINK_TTL: u64 = 7 * 24 * 3600;

/// The path a file's bytes are served at, which its links are signed for.
fn content_path(id: Uuid) -> String {
    format!("/api/v1/files/{id}/content")
}

/// The file service; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct Files(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
    config: FilesConfig,
    uploads: Arc<tokio::sync::Semaphore>,
    /// Uploads under way, per user.
    uploading: Arc<std::sync::Mutex<std::collections::HashMap<UserId, usize>>>,
    links: unhidra_core::LinkSigner,
}

/// A user's place among the uploads under way; given back when dropped.
struct UserSlot {
    uploading: Arc<std::sync::Mutex<std::collections::HashMap<UserId, usize>>>,
    user: UserId,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self
            .uploading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// An upload under way: [`Files::write`] its chunks, then [`Files::finish`] it. Dropped
/// unfinished, nothing of it is kept.
pub struct Upload {
    owner: UserId,
    name: String,
    access: Access,
    quota: FileQuota,
    key: String,
    id: Uuid,
    writer: Option<Box<dyn ObjectWriter>>,
    /// The first bytes, until they tell the type.
    head: Vec<u8>,
    kind: Option<&'static Kind>,
    hasher: Sha256,
    size: u64,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _user_slot: UserSlot,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("id", &self.id)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &'static str, code: &'static str, message: &str) -> FilesError {
    FilesError::Invalid(field, code, message.to_owned())
}

impl Files {
    /// The service, over `storage`; the key of its signed links is read from the store (made
    /// there by the first node to start).
    pub async fn open(
        store: Arc<dyn Store>,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        config: FilesConfig,
    ) -> Result<Self, FilesError> {
        let key = store
            .meta_get_or_insert(
                LINK_KEY_META,
                &unhidra_core::OpaqueToken::generate().hash(),
                clock.now(),
            )
            .await?;
        Ok(Self(Arc::new(Inner {
            store,
            storage,
            clock,
            audit,
            config,
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS)),
            uploading: Arc::default(),
            links: unhidra_core::LinkSigner::new(key.into_bytes()),
        })))
    }

    fn now(&self) -> DateTime<Utc> {
        let now = self.0.clock.now();
        DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
    }

    fn is_admin(&self, who: &Principal) -> bool {
        who.has_admin_powers(self.0.config.require_admin_mfa)
    }

    /// The quota of `user` (`role`): the one an admin set for them, or their role's.
    async fn quota_of(&self, user: UserId, role: Role) -> Result<(FileQuota, bool), FilesError> {
        Ok(match self.0.store.file_quota(user).await? {
            Some(own) => (own, true),
            None if role == Role::Admin => (self.0.config.admin_quota, false),
            None => (self.0.config.user_quota, false),
        })
    }

    /// Starts an upload of a file named `name` (as the client calls it) for `who`.
    /// `declared` (a `Content-Length`) lets a body that cannot fit be refused before it
    /// streams.
    pub async fn begin(
        &self,
        who: &Principal,
        name: &str,
        access: Access,
        declared: Option<u64>,
    ) -> Result<Upload, FilesError> {
        if name.chars().count() > MAX_GIVEN_NAME_CHARS {
            return Err(invalid(
                "name",
                "invalid_length",
                "a name has at most 1000 characters",
            ));
        }
        let name = names::sanitise(name)?;
        let max = self.0.config.max_bytes;
        if declared.is_some_and(|d| d > max) {
            return Err(FilesError::TooLarge(max));
        }
        let (quota, _) = self.quota_of(who.user_id, who.role).await?;
        let usage = self.0.store.file_usage(who.user_id).await?;
        let declared = i64::try_from(declared.unwrap_or(0)).unwrap_or(i64::MAX);
        if quota
            .max_bytes
            .is_some_and(|m| usage.bytes.saturating_add(declared) > m)
            || quota.max_files.is_some_and(|m| usage.files >= m)
        {
            return Err(FilesError::QuotaExceeded {
                max_bytes: quota.max_bytes,
                max_files: quota.max_files,
                usage,
            });
        }
        let user_slot = {
            let mut map = self
                .0
                .uploading
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = map.entry(who.user_id).or_default();
            if *n >= MAX_UPLOADS_PER_USER {
                return Err(FilesError::Busy);
            }
            *n += 1;
            UserSlot {
                uploading: Arc::clone(&self.0.uploading),
                user: who.user_id,
            }
        };
        let slot = Arc::clone(&self.0.uploads)
            .try_acquire_owned()
            .map_err(|_| FilesError::Busy)?;
        let now = self.now();
        let id = Uuid::new_v4();
        // Organised by owner and day; the name plays no part.
        let key = format!(
            "{}/{:04}/{:02}/{:02}/{}",
            who.user_id.0.simple(),
            now.year(),
            now.month(),
            now.day(),
            id.simple()
        );
        let writer = self.0.storage.create(&key).await?;
        Ok(Upload {
            owner: who.user_id,
            name,
            access,
            quota,
            key,
            id,
            writer: Some(writer),
            head: Vec::new(),
            kind: None,
            hasher: Sha256::new(),
            size: 0,
            _slot: slot,
            _user_slot: user_slot,
        })
    }

    /// Takes the next chunk: refused as soon as the file passes `files_max_bytes`, or once
    /// its first bytes show a type that is not allowed.
    pub async fn write(&self, upload: &mut Upload, chunk: &[u8]) -> Result<(), FilesError> {
        upload.size += chunk.len() as u64;
        if upload.size > self.0.config.max_bytes {
            return Err(FilesError::TooLarge(self.0.config.max_bytes));
        }
        if upload.kind.is_none() {
            let room = SNIFF_BYTES.saturating_sub(upload.head.len());
            upload
                .head
                .extend_from_slice(&chunk[..room.min(chunk.len())]);
            if upload.head.len() >= SNIFF_BYTES {
                upload.kind =
                    Some(kinds::sniff(&upload.head, false).map_err(FilesError::UnsupportedType)?);
            }
        }
        upload.hasher.update(chunk);
        match &mut upload.writer {
            Some(writer) => writer.write(chunk).await?,
            None => return Err(std::io::Error::other("the upload is finished").into()),
        }
        Ok(())
    }

    /// Ends an upload: its type agrees with its name's extension (one is added to a name
    /// without), its bytes are made durable, and its record is stored within its owner's
    /// quota — or nothing is kept.
    pub async fn finish(
        &self,
        mut upload: Upload,
        ctx: &RequestContext,
    ) -> Result<FileView, FilesError> {
        if upload.size == 0 {
            return Err(FilesError::Empty);
        }
        let kind = match upload.kind {
            Some(kind) => kind,
            None => kinds::sniff(&upload.head, true).map_err(FilesError::UnsupportedType)?,
        };
        let name = match names::extension(&upload.name) {
            Some(ext) if kind.extensions.contains(&ext.as_str()) => upload.name.clone(),
            Some(ext) => {
                return Err(FilesError::TypeMismatch {
                    extension: ext,
                    detected: kind.mime,
                });
            }
            None => format!("{}.{}", upload.name, kind.extensions[0]),
        };
        let Some(writer) = upload.writer.take() else {
            return Err(std::io::Error::other("the upload is finished").into());
        };
        let sha256 = unhidra_core::hex(&std::mem::take(&mut upload.hasher).finalize());
        let record = FileRecord {
            id: upload.id,
            owner: Some(upload.owner),
            // Scanning plugs in here: until it does, a file is ready once stored.
            state: "ready".into(),
            access: upload.access.as_str().into(),
            name,
            content_type: kind.mime.into(),
            size: i64::try_from(upload.size).unwrap_or(i64::MAX),
            sha256,
            storage_key: upload.key.clone(),
            created_at: self.now(),
            expires_at: None,
            deleted_at: None,
        };
        // From here to the record the work runs in a task of its own: a client that goes away
        // (or a request timeout) cannot stop it between the object and its record, which would
        // leave bytes no quota counts.
        let files = self.clone();
        let quota = upload.quota;
        let stored = tokio::spawn(async move { files.store_object(writer, record, quota).await })
            .await
            .map_err(|e| FilesError::Io(std::io::Error::other(e)))??;
        let Some(record) = stored else {
            let usage = self.0.store.file_usage(upload.owner).await?;
            return Err(FilesError::QuotaExceeded {
                max_bytes: upload.quota.max_bytes,
                max_files: upload.quota.max_files,
                usage,
            });
        };
        self.0
            .audit
            .record(
                "file.uploaded",
                Some(upload.owner),
                Some(record.id.to_string()),
                ctx,
                serde_json::json!({
                    "size": record.size, "content_type": record.content_type,
                    "access": record.access,
                }),
            )
            .await;
        Ok(FileView::from(&record))
    }

    /// Makes an upload's object durable, then stores its record within `quota`; the record,
    /// or `None` over the quota (the object removed). A failed store call removes the object
    /// only when the record is not there (a commit whose answer was lost may have stored it).
    async fn store_object(
        &self,
        writer: Box<dyn ObjectWriter>,
        record: FileRecord,
        quota: FileQuota,
    ) -> Result<Option<FileRecord>, FilesError> {
        writer.finish().await?;
        match self.0.store.create_file(&record, &quota).await {
            Ok(true) => Ok(Some(record)),
            Ok(false) => {
                self.remove_object(&record.storage_key).await;
                Ok(None)
            }
            Err(e) => {
                if matches!(
                    self.0.store.file(record.id).await,
                    Err(StoreError::NotFound { .. })
                ) {
                    self.remove_object(&record.storage_key).await;
                }
                Err(e.into())
            }
        }
    }

    async fn remove_object(&self, key: &str) {
        if let Err(e) = self.0.storage.delete(key).await {
            tracing::warn!(key, error = %e, "an object of a refused upload was not removed");
        }
    }

    /// A file the caller may see: their own, or any for an admin. Others' files are
    /// `NotFound`, so that ids tell nothing.
    async fn visible(&self, who: &Principal, id: Uuid) -> Result<FileRecord, FilesError> {
        let record = found(self.0.store.file(id).await)?;
        if record.state == "deleted" {
            return Err(FilesError::NotFound);
        }
        if record.owner == Some(who.user_id) || self.is_admin(who) {
            Ok(record)
        } else {
            Err(FilesError::NotFound)
        }
    }

    /// One file's record.
    pub async fn get(&self, who: &Principal, id: Uuid) -> Result<FileView, FilesError> {
        Ok(FileView::from(&self.visible(who, id).await?))
    }

    /// The caller's files, newest first, a page of at most `limit` (1–200, default 50) after
    /// `cursor`.
    pub async fn list(
        &self,
        who: &Principal,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<FilePage, FilesError> {
        let limit = limit.unwrap_or(50);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(invalid("limit", "out_of_range", "limit is 1 to 200"));
        }
        let before = cursor.map(parse_cursor).transpose()?;
        let records = self.0.store.list_files(who.user_id, before, limit).await?;
        let next_cursor = (records.len() == limit as usize)
            .then(|| records.last().map(cursor_of))
            .flatten();
        Ok(FilePage {
            items: records.iter().map(FileView::from).collect(),
            next_cursor,
        })
    }

    /// A file to download, and its bytes from `start` (`len` of them): a public file for
    /// anyone, others for their owner or an admin. Only `ready` files are served.
    pub async fn record_for_download(
        &self,
        who: Option<&Principal>,
        id: Uuid,
    ) -> Result<FileRecord, FilesError> {
        let record = found(self.0.store.file(id).await)?;
        let allowed = match who {
            _ if record.access == "public" => true,
            Some(who) => record.owner == Some(who.user_id) || self.is_admin(who),
            None => false,
        };
        if !allowed || record.state != "ready" {
            return Err(FilesError::NotFound);
        }
        Ok(record)
    }

    /// A signed link to a file's bytes, for whoever holds it, valid `ttl` seconds (60 s to a
    /// week; default `files_link_ttl`). The file's owner or an admin makes it, for a file whose
    /// access is `link` (or `public`); setting the access back to `private` ends every link.
    /// Audited.
    pub async fn create_link(
        &self,
        who: &Principal,
        id: Uuid,
        ttl: Option<u64>,
        ctx: &RequestContext,
    ) -> Result<FileLink, FilesError> {
        let record = self.visible(who, id).await?;
        if record.access == Access::Private.as_str() {
            return Err(FilesError::NotShared);
        }
        let ttl = match ttl {
            Some(t) if (60..=MAX_LINK_TTL).contains(&t) => t,
            Some(_) => {
                return Err(invalid(
                    "/ttl",
                    "out_of_range",
                    "a link works 60 seconds to a week",
                ));
            }
            None => self.0.config.link_ttl.as_secs().clamp(60, MAX_LINK_TTL),
        };
        let expires = self.now().timestamp() + i64::try_from(ttl).unwrap_or(i64::MAX / 2);
        let by = who.user_id.0.to_string();
        let path = content_path(id);
        let sig = self
            .0
            .links
            .sign(LINK_DOMAIN, &["GET", &path, &by], expires);
        self.0
            .audit
            .record(
                "file.link_created",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "expires": expires }),
            )
            .await;
        Ok(FileLink {
            url: format!("{path}?by={by}&expires={expires}&sig={sig}"),
            expires_at: DateTime::from_timestamp(expires, 0).unwrap_or_else(|| self.now()),
        })
    }

    /// A file to download with a signed link: the signature (constant time) before anything
    /// else, then its expiry; then the file must still allow links, and the link's maker still
    /// be its owner or an admin.
    pub async fn record_for_link(
        &self,
        id: Uuid,
        by: Uuid,
        expires: i64,
        sig: &str,
    ) -> Result<FileRecord, FilesError> {
        let by_text = by.to_string();
        self.0
            .links
            .verify(
                LINK_DOMAIN,
                &["GET", &content_path(id), &by_text],
                expires,
                sig,
                self.now().timestamp(),
            )
            .map_err(|e| match e {
                unhidra_core::LinkError::Invalid => FilesError::LinkInvalid,
                unhidra_core::LinkError::Expired => FilesError::LinkExpired,
            })?;
        let record = found(self.0.store.file(id).await)?;
        if record.state != "ready" {
            return Err(FilesError::NotFound);
        }
        if record.access == Access::Private.as_str() {
            return Err(FilesError::LinkInvalid);
        }
        let maker_may = record.owner == Some(UserId(by))
            || match self.0.store.user_by_id(UserId(by)).await {
                Ok(u) => u.active && u.role == Role::Admin,
                Err(StoreError::NotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
        if !maker_may {
            return Err(FilesError::LinkInvalid);
        }
        Ok(record)
    }

    /// Whether the storage answers (for readiness).
    pub async fn check_storage(&self) -> std::io::Result<()> {
        self.0.storage.check().await
    }

    /// The bytes of a file the caller was given by [`Files::record_for_download`].
    pub async fn read(
        &self,
        record: &FileRecord,
        start: u64,
        len: u64,
    ) -> Result<Reader, FilesError> {
        Ok(self.0.storage.open(&record.storage_key, start, len).await?)
    }

    /// Changes who may download a file (its owner, or an admin). Audited.
    pub async fn set_access(
        &self,
        who: &Principal,
        id: Uuid,
        access: Access,
        ctx: &RequestContext,
    ) -> Result<FileView, FilesError> {
        let mut record = self.visible(who, id).await?;
        if !self.0.store.set_file_access(id, access.as_str()).await? {
            return Err(FilesError::NotFound);
        }
        record.access = access.as_str().into();
        self.0
            .audit
            .record(
                "file.access_changed",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "access": access.as_str() }),
            )
            .await;
        Ok(FileView::from(&record))
    }

    /// Deletes a file (its owner, or an admin): off its owner's usage at once, its bytes
    /// removed from the storage. Audited.
    pub async fn delete(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<(), FilesError> {
        self.visible(who, id).await?;
        let Some(record) = self.0.store.delete_file(id, self.now()).await? else {
            return Err(FilesError::NotFound);
        };
        // The record says deleted whatever happens next: a storage that fails here leaves an
        // orphan object for the cleanup, never a file that is served. In a task of its own,
        // so that a client that goes away does not stop it.
        let storage = Arc::clone(&self.0.storage);
        let key = record.storage_key.clone();
        let removed = tokio::spawn(async move { storage.delete(&key).await }).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(file = %id, error = %e, "a deleted file's object was not removed");
        }
        self.0
            .audit
            .record(
                "file.deleted",
                Some(who.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({ "size": record.size }),
            )
            .await;
        Ok(())
    }

    /// A user's usage and quota: the caller's own, or any user's for an admin.
    pub async fn usage(&self, who: &Principal, user: UserId) -> Result<UsageView, FilesError> {
        if user != who.user_id && !self.is_admin(who) {
            return Err(FilesError::Forbidden);
        }
        let role = if user == who.user_id {
            who.role
        } else {
            found(self.0.store.user_by_id(user).await)?.role
        };
        let (quota, custom) = self.quota_of(user, role).await?;
        let usage = self.0.store.file_usage(user).await?;
        Ok(UsageView {
            bytes: usage.bytes,
            files: usage.files,
            max_bytes: quota.max_bytes,
            max_files: quota.max_files,
            custom,
        })
    }

    /// Sets (or, with `None`, removes) one user's quota over their role's; admins only.
    /// Audited.
    pub async fn set_quota(
        &self,
        who: &Principal,
        user: UserId,
        quota: Option<FileQuota>,
        ctx: &RequestContext,
    ) -> Result<UsageView, FilesError> {
        if !self.is_admin(who) {
            return Err(FilesError::Forbidden);
        }
        if let Some(q) = &quota
            && (q.max_bytes.is_some_and(|m| m < 0) || q.max_files.is_some_and(|m| m < 0))
        {
            return Err(invalid(
                "/max_bytes",
                "out_of_range",
                "a quota is 0 or more",
            ));
        }
        found(self.0.store.user_by_id(user).await)?;
        self.0.store.set_file_quota(user, quota.as_ref()).await?;
        self.0
            .audit
            .record(
                "file.quota_set",
                Some(who.user_id),
                Some(user.0.to_string()),
                ctx,
                serde_json::json!({
                    "max_bytes": quota.and_then(|q| q.max_bytes),
                    "max_files": quota.and_then(|q| q.max_files),
                }),
            )
            .await;
        self.usage(who, user).await
    }
}

/// A store answer, with "no such row" as the service's `NotFound` (a file or a user).
fn found<T>(answer: Result<T, StoreError>) -> Result<T, FilesError> {
    answer.map_err(|e| match e {
        StoreError::NotFound { .. } => FilesError::NotFound,
        e => FilesError::Store(e),
    })
}

fn cursor_of(r: &FileRecord) -> String {
    format!("{}_{}", r.created_at.timestamp_micros(), r.id.simple())
}

fn parse_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), FilesError> {
    let bad = || invalid("cursor", "invalid_format", "not a cursor this API gave");
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id = Uuid::try_parse(id).map_err(|_| bad())?;
    Ok((at, id))
}
