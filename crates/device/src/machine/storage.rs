//! The offline buffer behind a trait: where sealed telemetry batches wait for their `ack`,
//! and where the next `seq` is kept so that a restart never reuses one.
//!
//! The session keeps only each batch's `seq` and size in memory and asks the storage for the
//! points when it sends a batch, so a storage may keep them in flash rather than in RAM.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;

use unhidra_protocol::device::Point;

/// What a storage holds when the session starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The seq the next batch gets: above every seq this storage has ever been given, even
    /// of batches since removed. 0 when the storage has never held a batch (a new device, or
    /// a wiped buffer): the session then picks its first seq (see [`crate::machine::Session`]).
    pub next_seq: u64,
    /// The batches not yet done, oldest first: `(seq, size)`, the size as [`batch_bytes`].
    pub batches: Vec<(u64, usize)>,
}

/// The offline buffer. Calls are synchronous: a firmware's flash write is, and the file
/// adapter's is a buffered append.
pub trait Storage {
    /// What can go wrong (a full flash, an I/O error).
    type Error: fmt::Debug + fmt::Display;

    /// What is stored, read once when the session starts.
    fn load(&mut self) -> Result<Loaded, Self::Error>;

    /// Keeps a sealed batch. It must be durable (as the storage's policy defines it) when this
    /// returns: the session sends the batch only afterwards, so a seq the server saw is never
    /// lost to a crash and reused.
    fn push(&mut self, seq: u64, points: &[Point]) -> Result<(), Self::Error>;

    /// The points of a batch still held; `None` if it is not.
    fn read(&mut self, seq: u64) -> Result<Option<Vec<Point>>, Self::Error>;

    /// A batch is done (acknowledged, refused, or dropped to make room).
    fn remove(&mut self, seq: u64) -> Result<(), Self::Error>;
}

/// The size the buffer's bounds count for a batch: each point's key and value (as
/// [`unhidra_protocol::device::Value::byte_len`]) plus 16 bytes for its timestamp and framing.
/// An estimate of the payload, not of any encoding.
pub fn batch_bytes(points: &[Point]) -> usize {
    points.iter().map(point_bytes).sum()
}

pub(crate) fn point_bytes(point: &Point) -> usize {
    point.key.len() + point.value.byte_len() + 16
}

/// A storage in memory: for tests, and for devices that accept losing the buffer on a reboot.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    next_seq: u64,
    batches: BTreeMap<u64, Vec<Point>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// The seqs held, oldest first.
    pub fn seqs(&self) -> Vec<u64> {
        self.batches.keys().copied().collect()
    }
}

impl Storage for MemoryStorage {
    type Error = Infallible;

    fn load(&mut self) -> Result<Loaded, Infallible> {
        Ok(Loaded {
            next_seq: self.next_seq,
            batches: self
                .batches
                .iter()
                .map(|(&seq, points)| (seq, batch_bytes(points)))
                .collect(),
        })
    }

    fn push(&mut self, seq: u64, points: &[Point]) -> Result<(), Infallible> {
        self.next_seq = self.next_seq.max(seq + 1);
        self.batches.insert(seq, points.to_vec());
        Ok(())
    }

    fn read(&mut self, seq: u64) -> Result<Option<Vec<Point>>, Infallible> {
        Ok(self.batches.get(&seq).cloned())
    }

    fn remove(&mut self, seq: u64) -> Result<(), Infallible> {
        self.batches.remove(&seq);
        Ok(())
    }
}
