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
        let safe = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !safe {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a storage key",
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn objects_appear_whole_and_are_read_in_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open_dir(dir.path()).await.unwrap();
        let key = "u1/2026/03/01/f1";
        let mut w = storage.create(key).await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        assert!(
            storage.open(key, 0, 5).await.is_err(),
            "not visible before finish"
        );
        w.finish().await.unwrap();
        let mut read = String::new();
        storage
            .open(key, 6, 5)
            .await
            .unwrap()
            .read_to_string(&mut read)
            .await
            .unwrap();
        assert_eq!(read, "world");
        storage.delete(key).await.unwrap();
        storage.delete(key).await.unwrap();
        assert!(storage.open(key, 0, 1).await.is_err());
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
