//! How a connection's writer batches, whatever the socket: when it writes (as soon as the
//! previous write completed, with what queued meanwhile; later only once the socket pushed back)
//! and, on `unhidra.v1.jsonl`, how a batch's text frames share WebSocket messages, one per line.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::outbox::Message;

/// When a connection's writer writes. It writes as soon as the previous write completed, with
/// whatever queued meanwhile, so that a connection that keeps up is never delayed and a stray
/// pair of frames that met in the queue costs no wait. Only when the connection is behind — the
/// socket pushed back (the kernel's send buffer was full) or a write carried [`BEHIND`] frames
/// or more — does the next write wait `coalesce` after it, so that what arrives meanwhile joins
/// it instead of being written frame by frame.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    coalesce: std::time::Duration,
    /// When the next write may go out, if the connection was behind at the last one.
    due: Option<tokio::time::Instant>,
}

/// Frames in one write from which a connection counts as behind even though the socket took
/// them at once: the room fills faster than one write per frame can carry (a stray pair of frames
/// that met in the queue does not count).
const BEHIND: usize = 8;
/// Frames in one write past which a connection counts as far behind: each multiple of this
/// stretches its next wait by another `coalesce`, up to [`MAX_STRETCH`] times.
const FAR_BEHIND: usize = 64;
/// The longest wait, in multiples of `coalesce`.
const MAX_STRETCH: u32 = 3;

impl Pace {
    /// A writer's pace: after a write that found the connection behind, the next waits
    /// `coalesce`.
    pub fn new(coalesce: std::time::Duration) -> Self {
        Self {
            coalesce,
            due: None,
        }
    }

    /// Until when to wait before the next write, if at all.
    pub fn due(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.due.filter(|due| *due > now)
    }

    /// A write of `frames` frames went out at `now`; `pushed_back` says whether the socket
    /// made it wait. A write of a few frames that went straight through lets the next go at
    /// once. One that was pushed back or carried a backlog makes the next wait `coalesce`,
    /// longer after a large backlog (a room far busier than frame-by-frame writing carries), so
    /// that each write carries more.
    pub fn wrote(&mut self, frames: usize, pushed_back: bool, now: tokio::time::Instant) {
        self.due = (pushed_back || frames >= BEHIND).then(|| {
            let stretch = u32::try_from(1 + frames / FAR_BEHIND)
                .unwrap_or(MAX_STRETCH)
                .min(MAX_STRETCH);
            now + self.coalesce * stretch
        });
    }
}

/// Joins runs of text frames into messages of at most `cap` bytes, one frame per line; other
/// messages (pings, the close) keep their place. A frame larger than `cap` travels alone.
pub fn join_lines(frames: VecDeque<Message>, cap: usize) -> VecDeque<Message> {
    fn finish(run: &mut Vec<Bytes>, out: &mut VecDeque<Message>) {
        match run.len() {
            0 => {}
            1 => out.extend(run.pop().map(Message::Text)),
            _ => {
                let len = run.iter().map(|t| t.len() + 1).sum::<usize>();
                let mut joined = Vec::with_capacity(len);
                for (i, text) in run.drain(..).enumerate() {
                    if i > 0 {
                        joined.push(b'\n');
                    }
                    joined.extend_from_slice(&text);
                }
                // Lines of UTF-8 joined by newlines are UTF-8.
                out.push_back(Message::Text(joined.into()));
            }
        }
    }
    let mut out = VecDeque::with_capacity(frames.len().min(8));
    let mut run: Vec<Bytes> = Vec::new();
    let mut run_len = 0;
    for frame in frames {
        match frame {
            Message::Text(text) => {
                if !run.is_empty() && run_len + 1 + text.len() > cap {
                    finish(&mut run, &mut out);
                    run_len = 0;
                }
                run_len += text.len() + usize::from(!run.is_empty());
                run.push(text);
            }
            other => {
                finish(&mut run, &mut out);
                run_len = 0;
                out.push_back(other);
            }
        }
    }
    finish(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::text(s)
    }

    #[test]
    fn a_connection_waits_only_once_behind() {
        let ms = std::time::Duration::from_millis;
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(ms(20));
        assert_eq!(pace.due(start), None, "the first write goes at once");
        pace.wrote(1, false, start);
        assert_eq!(pace.due(start + ms(1)), None, "keeping up: no wait");
        pace.wrote(7, false, start + ms(2));
        assert_eq!(
            pace.due(start + ms(3)),
            None,
            "a few frames the socket took at once: no wait"
        );
        pace.wrote(8, false, start + ms(2));
        assert_eq!(
            pace.due(start + ms(3)),
            Some(start + ms(22)),
            "a backlog: wait"
        );
        pace.wrote(5, true, start + ms(2));
        assert_eq!(
            pace.due(start + ms(3)),
            Some(start + ms(22)),
            "pushed back: wait"
        );
        assert_eq!(pace.due(start + ms(22)), None, "the wait is over");
        pace.wrote(1, false, start + ms(22));
        assert_eq!(pace.due(start + ms(23)), None, "caught up");
        pace.wrote(64, true, start + ms(30));
        assert_eq!(
            pace.due(start + ms(31)),
            Some(start + ms(70)),
            "far behind: longer"
        );
        pace.wrote(1000, true, start + ms(70));
        assert_eq!(
            pace.due(start + ms(71)),
            Some(start + ms(130)),
            "at most 3 ×"
        );
        let mut never = Pace::new(ms(0));
        never.wrote(9, true, start);
        assert_eq!(never.due(start), None, "0s never waits");
    }

    #[test]
    fn text_runs_share_messages_up_to_the_cap_and_others_keep_their_place() {
        let frames: VecDeque<Message> = [
            text("{\"a\":1}"),
            text("{\"b\":2}"),
            Message::Ping,
            text("{\"c\":3}"),
            text("{\"d\":4}"),
            text("{\"e\":5}"),
        ]
        .into();
        // "{"c":3}\n{"d":4}" is 15 bytes: the cap of 16 leaves no room for the third line.
        let joined: Vec<Message> = join_lines(frames, 16).into();
        assert_eq!(
            joined,
            [
                text("{\"a\":1}\n{\"b\":2}"),
                Message::Ping,
                text("{\"c\":3}\n{\"d\":4}"),
                text("{\"e\":5}"),
            ]
        );
        // A frame past the cap travels alone, untouched.
        let big = "x".repeat(40);
        let joined: Vec<Message> = join_lines([text("a"), text(&big), text("b")].into(), 16).into();
        assert_eq!(joined, [text("a"), text(&big), text("b")]);
    }
}
