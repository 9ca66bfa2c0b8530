//! Where files' bytes are: objects under keys (`<owner>/<yyyy>/<mm>/<dd>/<id>`), written as a
//! stream and read back in ranges. A local folder is the default; other backends (S3) plug in
//! behind the same trait.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Bytes read from an object.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;

/// An object being written: nothing is visible under its key until [`ObjectWriter::finish`];
/// dropped unfinished, what was written is removed.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends a chunk.
    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()>;

    /// Makes the object durable and visible under its key.
    async fn finish(self: Box<Self>) -> std::io::Result<()>;
}

/// A storage backend.
#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Starts writing the object `key` (a new key: objects are never overwritten).
    async fn create(&self, key: &str) -> std::io::Result<Box<dyn ObjectWriter>>;

    /// Reads `len` bytes of `key` from `start`.
    async fn open(&self, key: &str, start: u64, len: u64) -> std::io::Result<Reader>;

    /// Removes `key`; one that is not there is no error.
    async fn delete(&self, key: &str) -> std::io::Result<()>;

    /// Whether the backend answers (for readiness); a folder always does.
    async fn check(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `key` is one Unhidra makes: `/`-separated parts of ASCII letters, digits, `-` and
/// `_`, so that no key can leave a folder or a bucket's prefix, or need escaping.
pub fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The error for a key [`is_key`] refuses.
pub fn not_a_key() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a storage key")
}

/// Objects as files in a folder: a key's `/`s are sub-folders.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    dir: PathBuf,
}

/// The prefix of a file being written, in the storage's folder.
const PARTIAL_PREFIX: &str = ".partial-";

impl LocalStorage {
    /// Objects under `dir` (made if missing); files an earlier run left half-written are
    /// removed.
    pub async fn open_dir(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        tokio::fs::create_dir_all(&dir).await?;
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(PARTIAL_PREFIX))
            {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        Ok(Self { dir })
    }

    /// The file of `key`: keys are made by Unhidra (ids and dates), and anything that could
    /// leave the folder is refused.
    fn path_of(&self, key: &str) -> std::io::Result<PathBuf> {
        if !is_key(key) {
            return Err(not_a_key());
        }
        Ok(self.dir.join(key))
    }
}

struct LocalWriter {
    partial: PathBuf,
    path: PathBuf,
    file: Option<tokio::fs::File>,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.write_all(chunk).await,
            None => Err(std::io::Error::other("the object is finished")),
        }
    }

    async fn finish(mut self: Box<Self>) -> std::io::Result<()> {
        let Some(mut file) = self.file.take() else {
            return Err(std::io::Error::other("the object is finished"));
        };
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        if let Some(parent) = self.path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&self.partial, &self.path).await?;
        sync_dir(self.path.parent()).await;
        // Renamed: nothing left for `drop` to remove.
        self.partial = PathBuf::new();
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.partial.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Syncs a folder, so that a rename in it survives a crash (best effort).
async fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Ok(d) = tokio::fs::File::open(dir).await
    {
        let _ = d.sync_all().await;
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn create(&self, key: &str) -> std::io::Result<Box<dyn ObjectWriter>> {
        let path = self.path_of(key)?;
        let partial = self
            .dir
            .join(format!("{PARTIAL_PREFIX}{}", uuid::Uuid::new_v4()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .await?;
        Ok(Box::new(LocalWriter {
            partial,
            path,
            file: Some(file),
        }))
    }

    async fn open(&self, key: &str, start: u64, len: u64) -> std::io::Result<Reader> {
        let mut file = tokio::fs::File::open(self.path_of(key)?).await?;
        if start > 0 {
            file.seek(SeekFrom::Start(start)).await?;
        }
        Ok(Box::pin(file.take(len)))
    }

    async fn delete(&self, key: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path_of(key)?).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// What every backend must do, as one story that each backend's tests run.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use tokio::io::AsyncReadExt;

    use super::Storage;

    /// The bytes of `key` from `start`, `len` of them.
    pub async fn read(storage: &dyn Storage, key: &str, start: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        storage
            .open(key, start, len)
            .await
            .unwrap_or_else(|e| panic!("open {key}: {e}"))
            .read_to_end(&mut out)
            .await
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        out
    }

    /// Whether `key` is missing: opening it is `NotFound`.
    pub async fn is_missing(storage: &dyn Storage, key: &str) -> bool {
        match storage.open(key, 0, 1).await {
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            Ok(_) => false,
        }
    }

    /// Writes `len` bytes (a known pattern) under a new key in `chunk`-byte writes, then reads
    /// them back whole and in ranges; an object is invisible until finished, one dropped
    /// unfinished is never seen, a deleted one is gone (and deleting it again is no error), a
    /// missing one is `NotFound`, and keys that could escape are refused. Keys are new on
    /// every run, so that runs can share a bucket.
    pub async fn story(storage: &dyn Storage, len: usize, chunk: usize) {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let key = format!("u{run}/2026/03/01/f1");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();

        let mut w = storage.create(&key).await.expect("create");
        for part in data.chunks(chunk) {
            w.write(part).await.expect("write");
        }
        assert!(is_missing(storage, &key).await, "visible before finish");
        w.finish().await.expect("finish");

        assert_eq!(read(storage, &key, 0, len as u64).await, data, "whole");
        let mid = len / 2;
        let n = 7.min(len - mid);
        assert_eq!(
            read(storage, &key, mid as u64, n as u64).await,
            &data[mid..mid + n],
            "a range in the middle"
        );
        assert_eq!(
            read(storage, &key, len as u64 - 3, 3).await,
            &data[len - 3..],
            "the last bytes"
        );
        assert_eq!(read(storage, &key, 0, 1).await, &data[..1], "the first");

        storage.delete(&key).await.expect("delete");
        assert!(is_missing(storage, &key).await, "gone once deleted");
        storage
            .delete(&key)
            .await
            .expect("deleting a missing key is no error");
        assert!(is_missing(storage, &format!("u{run}/never")).await);

        let dropped = format!("u{run}/2026/03/01/f2");
        let mut w = storage.create(&dropped).await.expect("create");
        for part in data.chunks(chunk) {
            w.write(part).await.expect("write");
        }
        drop(w);
        assert!(is_missing(storage, &dropped).await, "an unfinished object");

        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", "a/b.c", "a/b?c", ""] {
            assert!(storage.create(bad).await.is_err(), "{bad:?} refused");
            assert!(storage.open(bad, 0, 1).await.is_err(), "{bad:?} refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_folder_keeps_objects_as_every_backend_must() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open_dir(dir.path()).await.unwrap();
        testing::story(&storage, 100_000, 4096).await;
        testing::story(&storage, 11, 3).await;
        // Nothing half-written is left beside the objects.
        let partial = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX));
        assert!(!partial);
    }

    #[tokio::test]
    async fn an_unfinished_object_leaves_nothing_and_keys_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open_dir(dir.path()).await.unwrap();
        let mut w = storage.create("u1/f2").await.unwrap();
        w.write(b"half").await.unwrap();
        drop(w);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        for key in ["../x", "/etc/passwd", "a//b", "a/./b", "a/b.c", ""] {
            assert!(storage.create(key).await.is_err(), "{key}");
        }
    }
}
