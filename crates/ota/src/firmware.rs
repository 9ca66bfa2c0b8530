//! Firmware images on the server: an admin uploads an image with its signed manifest; the
//! image streams to a temporary file in the firmware folder while it is checked (its size cap,
//! and for an ESP32 image every byte of its format), the manifest is verified against the
//! trusted keys and compared with what the image says of itself, and only then is the file
//! renamed to its SHA-256 and the record stored. A refused upload leaves nothing behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use unhidra_core::hex;
use unhidra_core::{Clock, OpaqueToken, Principal, UserId};
use unhidra_identity::{AuditLog, RequestContext};
use unhidra_store::firmware::FirmwareRecord;
use unhidra_store::{Store, StoreError};
use utoipa::ToSchema;

use crate::download::{DownloadLink, ImageCache, LINK_KEY_META};
use crate::image::{ImageChecker, ImageError};
use crate::manifest::{Manifest, SignatureError, SignedManifest, TrustedKeys};

/// How the temporary file of an upload under way is named, before its SHA-256.
const UPLOAD_PREFIX: &str = ".upload-";

/// Uploads one node takes at once (each holds a file open and hashes as it writes).
pub const MAX_CONCURRENT_UPLOADS: usize = 4;

/// Images a listing shows at most.
pub const LIST_LIMIT: u32 = 200;

/// Why a firmware operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// Only admins manage firmware.
    #[error("only admins manage firmware")]
    Forbidden,
    /// No such image.
    #[error("no such firmware image")]
    NotFound,
    /// The manifest is not JSON of the documented shape: (code, message).
    #[error("{1}")]
    BadManifest(&'static str, String),
    /// A fact of the manifest breaks its rule: (field, the rule).
    #[error("the manifest's {0}: {1}")]
    InvalidFact(&'static str, &'static str),
    /// The manifest's signature was refused.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The server trusts no signing key (`ota_trusted_keys`).
    #[error("no firmware signing key is trusted (set ota_trusted_keys)")]
    NoTrustedKeys,
    /// The image is not a well-formed ESP32 image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The manifest says something else than the image: (field, the manifest's, the image's).
    #[error("the manifest's {0} is {1:?}, the image's {2:?}")]
    Mismatch(&'static str, String, String),
    /// The image is larger than `ota_max_image_bytes`.
    #[error("an image has at most {0} bytes")]
    TooLarge(u64),
    /// An image with this SHA-256, or this project, target and version, exists.
    #[error("{0}")]
    Conflict(String),
    /// The firmware folder could not be written.
    #[error("the firmware folder: {0}")]
    Io(#[from] std::io::Error),
    /// A download link whose signature does not hold (another image, device or expiry).
    #[error("the download link is not valid")]
    LinkInvalid,
    /// A download link past its expiry.
    #[error("the download link has expired")]
    LinkExpired,
    /// No such device (for a link).
    #[error("no such device")]
    NoSuchDevice,
    /// [`MAX_CONCURRENT_UPLOADS`] uploads are under way on this node.
    #[error("{MAX_CONCURRENT_UPLOADS} firmware uploads are under way; try again shortly")]
    Busy,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The firmware settings.
#[derive(Debug, Clone)]
pub struct FirmwareConfig {
    /// Where images are kept, each named by its SHA-256.
    pub dir: PathBuf,
    /// The largest image.
    pub max_bytes: u64,
    /// The keys whose manifests are accepted.
    pub trusted: TrustedKeys,
    /// Whether admin powers need a second factor.
    pub require_admin_mfa: bool,
    /// How long a signed download link works.
    pub link_ttl: std::time::Duration,
}

/// An image as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = FirmwareImage)]
pub struct FirmwareView {
    /// Its SHA-256: its id.
    pub sha256: String,
    /// Its length in bytes.
    pub size: i64,
    /// `esp32` (facts read from the image) or `generic`.
    pub kind: String,
    /// Its project.
    pub project: String,
    /// The chip or board it is for.
    pub target: String,
    /// Its version.
    pub version: String,
    /// Its anti-rollback version.
    pub secure_version: i64,
    /// The ESP-IDF version it was built with.
    pub idf_version: Option<String>,
    /// The SHA-256 of its ELF file.
    pub elf_sha256: Option<String>,
    /// The signed manifest, as devices get it.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    /// The key that signed it.
    pub key_id: String,
    /// Who uploaded it.
    #[schema(value_type = Option<String>)]
    pub uploaded_by: Option<uuid::Uuid>,
    /// When.
    pub uploaded_at: DateTime<Utc>,
    /// When it was retired (no new deployments).
    pub retired_at: Option<DateTime<Utc>>,
}

impl From<FirmwareRecord> for FirmwareView {
    fn from(r: FirmwareRecord) -> Self {
        Self {
            manifest: serde_json::from_str(&r.manifest).unwrap_or(serde_json::Value::Null),
            sha256: r.sha256,
            size: r.size,
            kind: r.kind,
            project: r.project,
            target: r.target,
            version: r.version,
            secure_version: r.secure_version,
            idf_version: r.idf_version,
            elf_sha256: r.elf_sha256,
            key_id: r.key_id,
            uploaded_by: r.uploaded_by.map(|u| u.0),
            uploaded_at: r.uploaded_at,
            retired_at: r.retired_at,
        }
    }
}

/// An upload under way: its bytes go to a temporary file, which is removed unless the upload
/// is finished.
#[derive(Debug)]
pub struct Upload {
    signed: SignedManifest,
    who: UserId,
    checker: Option<ImageChecker>,
    hasher: Sha256,
    size: u64,
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    kept: bool,
    /// Its place among the uploads under way.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The firmware service; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct Firmware(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: FirmwareConfig,
    audit: AuditLog,
    /// The key download links are signed with, shared by every node through the store.
    links: unhidra_core::LinkSigner,
    cache: ImageCache,
    metrics: crate::OtaMetrics,
    uploads: Arc<tokio::sync::Semaphore>,
}

/// A SHA-256 in hex, as the API takes it.
pub(crate) fn sha_of(text: &str) -> Result<String, FirmwareError> {
    let text = text.to_ascii_lowercase();
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text)
    } else {
        Err(FirmwareError::NotFound)
    }
}

impl Firmware {
    /// The service over a store; creates the firmware folder, and the link key in the store
    /// when it has none.
    pub async fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: FirmwareConfig,
        audit: AuditLog,
        metrics: crate::OtaMetrics,
    ) -> Result<Self, FirmwareError> {
        std::fs::create_dir_all(&config.dir)?;
        sweep(&config.dir, store.as_ref()).await;
        let link_key = store
            .meta_get_or_insert(LINK_KEY_META, &OpaqueToken::generate().hash(), clock.now())
            .await?
            .into_bytes();
        Ok(Self(Arc::new(Inner {
            store,
            clock,
            config,
            audit,
            links: unhidra_core::LinkSigner::new(link_key),
            cache: ImageCache::default(),
            metrics,
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
        })))
    }

    pub(crate) fn clock(&self) -> &dyn Clock {
        self.0.clock.as_ref()
    }

    pub(crate) fn config(&self) -> &FirmwareConfig {
        &self.0.config
    }

    pub(crate) fn link_signer(&self) -> &unhidra_core::LinkSigner {
        &self.0.links
    }

    pub(crate) fn cache(&self) -> &ImageCache {
        &self.0.cache
    }

    /// The OTA metrics.
    pub fn metrics(&self) -> &crate::OtaMetrics {
        &self.0.metrics
    }

    fn admin(&self, who: &Principal) -> Result<(), FirmwareError> {
        if who.has_admin_powers(self.0.config.require_admin_mfa) {
            Ok(())
        } else {
            Err(FirmwareError::Forbidden)
        }
    }

    /// The file of an image.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.0.config.dir.join(sha256)
    }

    /// Starts an upload with its signed manifest (JSON text). `generic`: the image is not an
    /// ESP32 app image, and the manifest's facts are taken as given.
    pub async fn begin(
        &self,
        who: &Principal,
        manifest: &str,
        generic: bool,
    ) -> Result<Upload, FirmwareError> {
        self.admin(who)?;
        let signed: SignedManifest = serde_json::from_str(manifest)
            .map_err(|e| FirmwareError::BadManifest("invalid_manifest", e.to_string()))?;
        if self.0.config.trusted.is_empty() {
            return Err(FirmwareError::NoTrustedKeys);
        }
        self.0.config.trusted.verify(&signed)?;
        if let Some((field, rule)) = signed.manifest.invalid_fact() {
            return Err(FirmwareError::InvalidFact(field, rule));
        }
        if signed.manifest.size > self.0.config.max_bytes {
            return Err(FirmwareError::TooLarge(self.0.config.max_bytes));
        }
        let slot = Arc::clone(&self.0.uploads)
            .try_acquire_owned()
            .map_err(|_| FirmwareError::Busy)?;
        let temp = self
            .0
            .config
            .dir
            .join(format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4()));
        let file = tokio::fs::File::create(&temp).await?;
        Ok(Upload {
            signed,
            who: who.user_id,
            checker: (!generic).then(ImageChecker::new),
            hasher: Sha256::new(),
            size: 0,
            file: Some(file),
            temp,
            kept: false,
            _slot: slot,
        })
    }

    /// Takes the next chunk of an upload: refused at once past the size cap or at the first
    /// byte that breaks the image's format.
    pub async fn write(&self, upload: &mut Upload, chunk: &[u8]) -> Result<(), FirmwareError> {
        upload.size += chunk.len() as u64;
        let max = self.0.config.max_bytes.min(upload.signed.manifest.size);
        if upload.size > max {
            return Err(if upload.size > self.0.config.max_bytes {
                FirmwareError::TooLarge(self.0.config.max_bytes)
            } else {
                FirmwareError::Mismatch(
                    "size",
                    upload.signed.manifest.size.to_string(),
                    format!("more than {}", upload.signed.manifest.size),
                )
            });
        }
        if let Some(checker) = &mut upload.checker {
            checker.update(chunk)?;
        }
        upload.hasher.update(chunk);
        if let Some(file) = &mut upload.file {
            file.write_all(chunk).await?;
        }
        Ok(())
    }

    /// Ends an upload: the image must be whole and be the manifest's. Then its file is synced
    /// and renamed to its SHA-256, and its record stored.
    pub async fn finish(
        &self,
        mut upload: Upload,
        ctx: &RequestContext,
    ) -> Result<FirmwareView, FirmwareError> {
        let sha256 = hex(&std::mem::take(&mut upload.hasher).finalize());
        let claimed = upload.signed.manifest.clone();
        let (kind, idf_version, elf_sha256) = match upload.checker.take() {
            Some(checker) => {
                let image = checker.finish()?;
                compare(&claimed, &image)?;
                ("esp32", Some(image.idf_version), Some(image.elf_sha256))
            }
            None => ("generic", None, None),
        };
        if claimed.sha256 != sha256 {
            return Err(FirmwareError::Mismatch("sha256", claimed.sha256, sha256));
        }
        if claimed.size != upload.size {
            return Err(FirmwareError::Mismatch(
                "size",
                claimed.size.to_string(),
                upload.size.to_string(),
            ));
        }
        if let Some(mut file) = upload.file.take() {
            file.flush().await?;
            file.sync_all().await?;
        }
        let now = self.0.clock.now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        let record = FirmwareRecord {
            sha256: sha256.clone(),
            size: i64::try_from(upload.size).unwrap_or(i64::MAX),
            kind: kind.into(),
            project: claimed.project.clone(),
            target: claimed.target.clone(),
            version: claimed.version.clone(),
            secure_version: i64::from(claimed.secure_version),
            idf_version,
            elf_sha256,
            manifest: serde_json::to_string(&upload.signed).unwrap_or_default(),
            key_id: upload.signed.key_id.clone(),
            uploaded_by: Some(upload.who),
            uploaded_at: now,
            retired_at: None,
        };
        let target = self.path_of(&sha256);
        // The file first, then the record: a record never names a missing file. The file is
        // named by its SHA-256, so replacing one is replacing it with the same bytes. A file
        // without a record (a crash between the two, or a refused record) is overwritten by
        // the next upload of the same image.
        tokio::fs::rename(&upload.temp, &target).await?;
        upload.kept = true;
        if let Err(e) = self.0.store.create_firmware(&record).await {
            // The file goes only when no record owns it; when that cannot be told (the store
            // failed), it stays, harmless.
            if matches!(
                self.0.store.firmware(&sha256).await,
                Err(StoreError::NotFound { .. })
            ) {
                let _ = tokio::fs::remove_file(&target).await;
            }
            return Err(match e {
                StoreError::Conflict { .. } => FirmwareError::Conflict(format!(
                    "{} {} for {} exists already (or this image does)",
                    claimed.project, claimed.version, claimed.target
                )),
                e => e.into(),
            });
        }
        self.0.metrics.uploads.inc();
        self.0
            .audit
            .record(
                "firmware.uploaded",
                Some(upload.who),
                Some(sha256),
                ctx,
                serde_json::json!({
                    "project": record.project, "target": record.target,
                    "version": record.version, "secure_version": record.secure_version,
                    "key_id": record.key_id, "size": record.size,
                }),
            )
            .await;
        Ok(FirmwareView::from(record))
    }

    /// Images, newest first, of a project and target when given.
    pub async fn list(
        &self,
        who: &Principal,
        project: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<FirmwareView>, FirmwareError> {
        self.admin(who)?;
        Ok(self
            .0
            .store
            .list_firmware(project, target, LIST_LIMIT)
            .await?
            .into_iter()
            .map(FirmwareView::from)
            .collect())
    }

    /// One image.
    pub async fn get(&self, who: &Principal, sha256: &str) -> Result<FirmwareView, FirmwareError> {
        self.admin(who)?;
        self.record(sha256).await.map(FirmwareView::from)
    }

    pub(crate) async fn record(&self, sha256: &str) -> Result<FirmwareRecord, FirmwareError> {
        match self.0.store.firmware(&sha_of(sha256)?).await {
            Err(StoreError::NotFound { .. }) => Err(FirmwareError::NotFound),
            other => Ok(other?),
        }
    }

    /// Retires an image: no new deployment may use it; its file stays for devices mid-way.
    pub async fn retire(
        &self,
        who: &Principal,
        sha256: &str,
        ctx: &RequestContext,
    ) -> Result<FirmwareView, FirmwareError> {
        self.admin(who)?;
        let record = self.record(sha256).await?;
        if self
            .0
            .store
            .retire_firmware(&record.sha256, self.0.clock.now())
            .await?
        {
            self.0
                .audit
                .record(
                    "firmware.retired",
                    Some(who.user_id),
                    Some(record.sha256.clone()),
                    ctx,
                    serde_json::json!({ "project": record.project, "version": record.version }),
                )
                .await;
        }
        self.record(&record.sha256).await.map(FirmwareView::from)
    }

    /// The signed manifest of an image, as devices get it in an offer.
    pub async fn signed_manifest(&self, sha256: &str) -> Result<SignedManifest, FirmwareError> {
        let record = self.record(sha256).await?;
        serde_json::from_str(&record.manifest)
            .map_err(|e| FirmwareError::BadManifest("invalid_manifest", e.to_string()))
    }

    /// A signed download link to an image for a device, made by an admin (to hand to a
    /// device by other means, or to try a download); audited.
    pub async fn link(
        &self,
        who: &Principal,
        sha256: &str,
        device: uuid::Uuid,
        ctx: &RequestContext,
    ) -> Result<DownloadLink, FirmwareError> {
        self.admin(who)?;
        let record = self.record(sha256).await?;
        match self.0.store.device(device).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => return Err(FirmwareError::NoSuchDevice),
            Err(e) => return Err(e.into()),
        }
        let link = self.sign_link(&record.sha256, device);
        self.0
            .audit
            .record(
                "firmware.link_made",
                Some(who.user_id),
                Some(record.sha256),
                ctx,
                serde_json::json!({ "device": device, "expires_at": link.expires_at }),
            )
            .await;
        Ok(link)
    }

    /// The folder images are kept in.
    pub fn dir(&self) -> &Path {
        &self.0.config.dir
    }
}

/// Removes what a previous run left behind: the temporary files of uploads it was killed in
/// the middle of, and images renamed into place whose record was never stored (killed between
/// the two). A file whose record cannot be read now stays.
async fn sweep(dir: &Path, store: &dyn Store) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan = if name.starts_with(UPLOAD_PREFIX) {
            true
        } else if sha_of(&name).is_ok_and(|sha| sha == name) {
            matches!(
                store.firmware(&name).await,
                Err(StoreError::NotFound { .. })
            )
        } else {
            false
        };
        if orphan {
            tracing::info!(file = %name, "firmware folder: leftover removed");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The manifest must say what the ESP32 image says of itself.
fn compare(claimed: &Manifest, image: &crate::EspImage) -> Result<(), FirmwareError> {
    let pairs: [(&'static str, String, String); 4] = [
        ("version", claimed.version.clone(), image.version.clone()),
        ("project", claimed.project.clone(), image.project.clone()),
        ("target", claimed.target.clone(), image.chip.to_owned()),
        (
            "secure_version",
            claimed.secure_version.to_string(),
            image.secure_version.to_string(),
        ),
    ];
    for (field, manifest, found) in pairs {
        if manifest != found {
            return Err(FirmwareError::Mismatch(field, manifest, found));
        }
    }
    Ok(())
}
