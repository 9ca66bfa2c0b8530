//! The offline buffer in a file: an append-only log of batches and acknowledgements,
//! compacted as it goes, that survives restarts and crashes.
//!
//! The file is `UNHDBUF1` (8 bytes) followed by records, each `length: u32 LE`,
//! `crc32(body): u32 LE`, `body`: a MessagePack map (named fields, arrays as `bin`) of one of
//! `{"next": {"seq"}}` (the seq the next batch gets, written by compaction),
//! `{"batch": {"seq", "points"}}` (a sealed batch) or `{"done": {"seq"}}` (acknowledged,
//! refused or dropped). Loading replays the records and stops at the first one that is short,
//! longer than 16 MiB, fails its checksum or does not decode: a record torn by a crash is
//! ignored, with everything after it. Opening then compacts: the live batches and the next
//! seq are written to `<file>.tmp`, which is synced and renamed over the file (and the folder
//! synced), so the torn tail is gone and appends start clean. Compaction runs again whenever
//! more than half of a file above 64 KiB is dead records.
//!
//! Durability follows [`SyncPolicy`]: by default a batch record is `fsync`ed before
//! [`Storage::push`] returns (the session sends a batch only after that, so a seq the server
//! saw is never lost and reused after a power cut), while `done` records are not — losing one
//! to a power cut only sends that batch again, which the server acknowledges as a duplicate.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unhidra_protocol::device::Point;

use crate::machine::{Loaded, Storage, batch_bytes};

const MAGIC: &[u8; 8] = b"UNHDBUF1";
const HEADER: usize = 8;
/// A longer record is taken as garbage (a torn length), not read.
const MAX_RECORD: usize = 16 << 20;
/// A file smaller than this is never compacted while running.
const COMPACT_ABOVE: u64 = 64 << 10;

/// When the file is synced to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// After every record, `done` too.
    Always,
    /// After every batch record (the default): no batch that may have been sent is lost to
    /// a power cut; an acknowledgement may be, which costs one duplicate.
    #[default]
    Batches,
    /// Never: the operating system writes when it likes. Safe against a crash of the
    /// process, not of the machine (the simulator's choice: many devices, one disk).
    Never,
}

/// What went wrong with the buffer file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading, writing or syncing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file exists and is something else.
    #[error("{0} is not a device buffer file")]
    NotABuffer(PathBuf),
}

/// A record as read.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Next { seq: u64 },
    Batch { seq: u64, points: Vec<Point> },
    Done { seq: u64 },
}

/// A record as written: the same encoding, borrowing the points.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RecordRef<'a> {
    Next { seq: u64 },
    Batch { seq: u64, points: &'a [Point] },
    Done { seq: u64 },
}

/// The buffer of one device in one file.
#[derive(Debug)]
pub struct FileStorage {
    path: PathBuf,
    file: File,
    sync: SyncPolicy,
    next_seq: u64,
    /// Live batches: points and the length of their record.
    batches: BTreeMap<u64, (Vec<Point>, u64)>,
    file_len: u64,
    dead: u64,
    torn: u64,
}

impl FileStorage {
    /// Opens (or creates) the buffer at `path`, syncing as [`SyncPolicy::Batches`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FileError> {
        Self::open_with(path, SyncPolicy::default())
    }

    /// Opens (or creates) the buffer at `path`: replays it, ignores a torn tail, compacts.
    pub fn open_with(path: impl AsRef<Path>, sync: SyncPolicy) -> Result<Self, FileError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| FileError::Io {
            path: path.clone(),
            source,
        };
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        // An empty file is one a crash left right after creating it.
        if !bytes.is_empty() && !bytes.starts_with(MAGIC) {
            return Err(FileError::NotABuffer(path));
        }
        let mut next_seq = 0;
        let mut batches = BTreeMap::new();
        let mut at = MAGIC.len().min(bytes.len());
        while let Some((record, len)) = read_record(&bytes[at..]) {
            match record {
                Record::Next { seq } => next_seq = next_seq.max(seq),
                Record::Batch { seq, points } => {
                    next_seq = next_seq.max(seq + 1);
                    batches.insert(seq, (points, len as u64));
                }
                Record::Done { seq } => {
                    next_seq = next_seq.max(seq + 1);
                    batches.remove(&seq);
                }
            }
            at += len;
        }
        let torn = (bytes.len() - at) as u64;
        let file = compact(&path, next_seq, &batches).map_err(io)?;
        let file_len = MAGIC.len() as u64
            + record_len(&RecordRef::Next { seq: next_seq })
            + batches.values().map(|(_, len)| len).sum::<u64>();
        Ok(Self {
            path,
            file,
            sync,
            next_seq,
            batches,
            file_len,
            dead: 0,
            torn,
        })
    }

    /// Bytes at the end of the file that were ignored when it was opened (a torn record).
    pub fn torn_bytes(&self) -> u64 {
        self.torn
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&mut self, record: &RecordRef<'_>, sync: bool) -> Result<u64, FileError> {
        let bytes = encode(record);
        let io = |source| FileError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&bytes).map_err(io)?;
        if sync {
            self.file.sync_data().map_err(io)?;
        }
        self.file_len += bytes.len() as u64;
        Ok(bytes.len() as u64)
    }
}

impl Storage for FileStorage {
    type Error = FileError;

    fn load(&mut self) -> Result<Loaded, FileError> {
        Ok(Loaded {
            next_seq: self.next_seq,
            batches: self
                .batches
                .iter()
                .map(|(&seq, (points, _))| (seq, batch_bytes(points)))
                .collect(),
        })
    }

    fn push(&mut self, seq: u64, points: &[Point]) -> Result<(), FileError> {
        let sync = self.sync != SyncPolicy::Never;
        let len = self.append(&RecordRef::Batch { seq, points }, sync)?;
        self.next_seq = self.next_seq.max(seq + 1);
        self.batches.insert(seq, (points.to_vec(), len));
        Ok(())
    }

    fn read(&mut self, seq: u64) -> Result<Option<Vec<Point>>, FileError> {
        Ok(self.batches.get(&seq).map(|(points, _)| points.clone()))
    }

    fn remove(&mut self, seq: u64) -> Result<(), FileError> {
        let Some((_, len)) = self.batches.remove(&seq) else {
            return Ok(());
        };
        let sync = self.sync == SyncPolicy::Always;
        let done = self.append(&RecordRef::Done { seq }, sync)?;
        self.dead += len + done;
        if self.file_len > COMPACT_ABOVE && self.dead * 2 > self.file_len {
            self.file = compact(&self.path, self.next_seq, &self.batches).map_err(|source| {
                FileError::Io {
                    path: self.path.clone(),
                    source,
                }
            })?;
            self.file_len = MAGIC.len() as u64
                + record_len(&RecordRef::Next { seq: self.next_seq })
                + self.batches.values().map(|(_, len)| len).sum::<u64>();
            self.dead = 0;
        }
        Ok(())
    }
}

/// A record as stored: length, checksum, body.
fn encode(record: &RecordRef<'_>) -> Vec<u8> {
    // Plain data with string keys: encoding cannot fail.
    let body = rmp_serde::to_vec_named(record).unwrap_or_default();
    let mut bytes = Vec::with_capacity(HEADER + body.len());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    bytes
}

fn record_len(record: &RecordRef<'_>) -> u64 {
    encode(record).len() as u64
}

/// The record at the start of `bytes` and its stored length, unless it is torn.
fn read_record(bytes: &[u8]) -> Option<(Record, usize)> {
    let header = bytes.get(..HEADER)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let body = bytes.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let record = rmp_serde::from_slice(body).ok()?;
    Some((record, HEADER + len))
}

/// Writes the live state to `<path>.tmp`, syncs it, renames it over `path`, syncs the
/// folder, and answers the new file opened for appending.
fn compact(
    path: &Path,
    next_seq: u64,
    batches: &BTreeMap<u64, (Vec<Point>, u64)>,
) -> io::Result<File> {
    replace_durably(path, |out| {
        out.write_all(MAGIC)?;
        out.write_all(&encode(&RecordRef::Next { seq: next_seq }))?;
        for (&seq, (points, _)) in batches {
            out.write_all(&encode(&RecordRef::Batch { seq, points }))?;
        }
        Ok(())
    })?;
    OpenOptions::new().append(true).open(path)
}

/// Replaces `path` with what `write` writes, so that a power loss at any moment leaves either
/// the old file or the new one whole: written to `<path>.tmp`, synced, renamed over `path`,
/// and the folder synced.
pub(crate) fn replace_durably(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        write(&mut out)?;
        out.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Makes the rename itself durable. Not every platform can open a folder: best-effort.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}
