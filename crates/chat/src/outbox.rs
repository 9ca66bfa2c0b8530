//! A connection's outbound side: the frames waiting to be written and the request to close.
//!
//! The hub pushes frames without waiting; the connection's writer takes everything queued at
//! once and writes it with one flush, so a busy room costs one write per batch rather than one
//! per frame. The queue is bounded in frames and in bytes; a full queue means the reader is too
//! slow: the push fails and the caller closes the connection (1013), dropping what waits,
//! instead of growing memory. An idle connection holds an empty queue, with nothing allocated.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

/// A WebSocket message as the hub queues it. The hub encodes a frame once per wire format and
/// every listening connection's queue holds a clone of the same bytes; the server's WebSocket
/// adapter turns each into its library's message when it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message: UTF-8 by construction ([`Message::text`]).
    Text(Bytes),
    /// A binary message (MessagePack).
    Binary(Bytes),
    /// A WebSocket ping with no payload.
    Ping,
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(Bytes::from(text.into()))
    }

    /// The payload's length, which the queue's byte bound counts.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(bytes) | Self::Binary(bytes) => bytes.len(),
            Self::Ping => 0,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frames queued for one connection, and its close request.
#[derive(Debug)]
pub struct Outbox {
    limit: usize,
    byte_limit: usize,
    state: Mutex<State>,
    /// Wakes the writer: frames or a close request are waiting.
    writer: Notify,
    /// Wakes a writer that is waiting to batch: the queue is half full, so it writes now.
    half_full: Notify,
    /// Wakes everyone waiting for a close request (the reader).
    closed: Notify,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Message>,
    /// The payload bytes of `frames`.
    bytes: usize,
    close: Option<(u16, String)>,
}

/// What the writer does next.
#[derive(Debug)]
pub enum Next {
    /// Writes these frames, in order, with one flush.
    Frames(VecDeque<Message>),
    /// Sends a close frame with this code and reason, and stops.
    Close(u16, String),
}

/// The queue was full: the reader is too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Outbox {
    /// An outbox that queues at most `limit` frames holding at most `byte_limit` payload bytes
    /// (frames the writer has taken and is writing are not counted: at most as much again).
    pub fn new(limit: usize, byte_limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            byte_limit,
            state: Mutex::new(State::default()),
            writer: Notify::new(),
            half_full: Notify::new(),
            closed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame without waiting. Once a close is requested, frames are dropped: the
    /// connection is going away.
    pub fn push(&self, message: Message) -> Result<(), Full> {
        let mut state = self.state();
        if state.close.is_some() {
            return Ok(());
        }
        let bytes = state.bytes.saturating_add(message.len());
        if state.frames.len() >= self.limit || bytes > self.byte_limit {
            return Err(Full);
        }
        state.bytes = bytes;
        state.frames.push_back(message);
        let queued = state.frames.len();
        drop(state);
        // A writer that has not taken the earlier frames yet will take this one with them.
        if queued == 1 {
            self.writer.notify_one();
        }
        if queued == self.limit.div_ceil(2) {
            self.half_full.notify_one();
        }
        Ok(())
    }

    /// Asks for the connection to be closed; the first reason wins. Frames queued before it
    /// are still written first.
    pub fn close(&self, code: u16, reason: &str) {
        let mut state = self.state();
        if state.close.is_none() {
            state.close = Some((code, reason.to_owned()));
        }
        drop(state);
        self.writer.notify_one();
        self.closed.notify_waiters();
    }

    /// Asks for the connection to be closed at once: what is queued is dropped, and only the
    /// close frame goes out (a reader too slow for its queue would not read the rest anyway).
    pub fn close_now(&self, code: u16, reason: &str) {
        let mut state = self.state();
        state.frames = VecDeque::new();
        state.bytes = 0;
        drop(state);
        self.close(code, reason);
    }

    /// Whether a close was requested: nothing more is queued, so nothing need be encoded.
    pub fn is_closing(&self) -> bool {
        self.state().close.is_some()
    }

    /// The code of the close requested, if one was.
    pub fn close_code(&self) -> Option<u16> {
        self.state().close.as_ref().map(|(code, _)| *code)
    }

    /// Waits for a close request and returns it.
    pub async fn close_requested(&self) -> (u16, String) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            // Registered before the check, so that a close in between is not missed.
            notified.as_mut().enable();
            if let Some(reason) = self.state().close.clone() {
                return reason;
            }
            notified.await;
        }
    }

    /// Waits for work: every queued frame at once, or, when none is left, the close request.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut state = self.state();
                if !state.frames.is_empty() {
                    state.bytes = 0;
                    return Next::Frames(std::mem::take(&mut state.frames));
                }
                if let Some((code, reason)) = state.close.clone() {
                    return Next::Close(code, reason);
                }
            }
            // `notify_one` leaves a permit when nobody waits, so a push between the check and
            // this wait is not missed.
            self.writer.notified().await;
        }
    }

    /// Waits until the queue is half full: a writer waiting to batch stops waiting then, so that
    /// a burst is not refused as a slow reader.
    pub async fn half_full(&self) {
        loop {
            let notified = self.half_full.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.len() >= self.limit.div_ceil(2) {
                return;
            }
            notified.await;
        }
    }

    /// Moves the frames queued since [`Outbox::next`] to the end of `frames` (a close request
    /// stays for the next call).
    pub fn take_more(&self, frames: &mut VecDeque<Message>) {
        let mut state = self.state();
        state.bytes = 0;
        frames.append(&mut state.frames);
    }

    /// How many frames are queued.
    pub fn len(&self) -> usize {
        self.state().frames.len()
    }

    /// Whether no frame is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::text(s)
    }

    fn texts(next: Next) -> Vec<String> {
        match next {
            Next::Frames(frames) => frames
                .into_iter()
                .map(|m| match m {
                    Message::Text(t) => String::from_utf8_lossy(&t).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect(),
            Next::Close(code, reason) => vec![format!("close {code} {reason}")],
        }
    }

    #[tokio::test]
    async fn the_writer_takes_everything_queued_in_order() {
        let outbox = Outbox::new(8, usize::MAX);
        for s in ["a", "b", "c"] {
            outbox.push(text(s)).unwrap();
        }
        assert_eq!(outbox.len(), 3);
        assert_eq!(texts(outbox.next().await), ["a", "b", "c"]);
        assert!(outbox.is_empty());
    }

    #[tokio::test]
    async fn frames_queued_after_the_take_join_the_same_batch() {
        let outbox = Outbox::new(8, usize::MAX);
        outbox.push(text("a")).unwrap();
        let Next::Frames(mut frames) = outbox.next().await else {
            panic!("frames first")
        };
        outbox.push(text("b")).unwrap();
        outbox.close(1001, "bye");
        outbox.take_more(&mut frames);
        assert_eq!(texts(Next::Frames(frames)), ["a", "b"]);
        assert_eq!(texts(outbox.next().await), ["close 1001 bye"]);
    }

    #[tokio::test]
    async fn a_half_full_queue_wakes_a_batching_writer() {
        let outbox = std::sync::Arc::new(Outbox::new(4, usize::MAX));
        let waiting = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            async move { outbox.half_full().await }
        });
        outbox.push(text("a")).unwrap();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        outbox.push(text("b")).unwrap();
        waiting.await.unwrap();
        // Already half full: no wait at all.
        outbox.half_full().await;
    }

    #[tokio::test]
    async fn a_full_queue_refuses_instead_of_growing() {
        let outbox = Outbox::new(2, usize::MAX);
        outbox.push(text("a")).unwrap();
        outbox.push(text("b")).unwrap();
        assert_eq!(outbox.push(text("c")), Err(Full));
        assert_eq!(texts(outbox.next().await), ["a", "b"]);
        outbox.push(text("d")).unwrap();
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_too() {
        let outbox = Outbox::new(100, 10);
        outbox.push(text("12345")).unwrap();
        outbox.push(text("67890")).unwrap();
        assert_eq!(outbox.push(text("x")), Err(Full), "past 10 bytes");
        outbox.push(Message::Ping).unwrap();
        // What the writer took no longer counts.
        let Next::Frames(taken) = outbox.next().await else {
            panic!("frames first")
        };
        assert_eq!(taken.len(), 3);
        outbox.push(text("abcdefghij")).unwrap();
        assert_eq!(outbox.push(text("k")), Err(Full));
    }

    #[tokio::test]
    async fn close_now_drops_what_waits() {
        let outbox = Outbox::new(8, usize::MAX);
        outbox.push(text("a")).unwrap();
        assert!(!outbox.is_closing());
        outbox.close_now(1013, "too slow");
        assert!(outbox.is_closing());
        assert_eq!(texts(outbox.next().await), ["close 1013 too slow"]);
        // The bytes were given back with the frames.
        assert_eq!(outbox.state().bytes, 0);
    }

    #[tokio::test]
    async fn queued_frames_go_out_before_the_close_and_later_ones_are_dropped() {
        let outbox = Outbox::new(8, usize::MAX);
        outbox.push(text("a")).unwrap();
        outbox.close(1013, "too slow");
        outbox.close(1000, "second reason loses");
        outbox.push(text("late")).unwrap();
        assert_eq!(outbox.close_code(), Some(1013));
        assert_eq!(texts(outbox.next().await), ["a"]);
        assert_eq!(texts(outbox.next().await), ["close 1013 too slow"]);
        assert_eq!(
            outbox.close_requested().await,
            (1013, "too slow".to_owned())
        );
    }

    #[tokio::test]
    async fn a_waiting_writer_and_reader_are_woken() {
        let outbox = std::sync::Arc::new(Outbox::new(8, usize::MAX));
        let writer = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            async move { texts(outbox.next().await) }
        });
        let reader = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            async move { outbox.close_requested().await }
        });
        tokio::task::yield_now().await;
        outbox.push(text("x")).unwrap();
        assert_eq!(writer.await.unwrap(), ["x"]);
        outbox.close(4003, "revoked");
        assert_eq!(reader.await.unwrap(), (4003, "revoked".to_owned()));
        assert_eq!(texts(outbox.next().await), ["close 4003 revoked"]);
    }
}
