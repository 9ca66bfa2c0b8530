//! One connection's side of the protocol, without the socket: the per-connection frame rate,
//! what each client frame does (join, leave, send in bursts, history, resume, typing), and the
//! error frame for each refusal. The server's WebSocket adapter reads, parses and feeds frames
//! in; everything the session answers goes out through the hub's outbox.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use unhidra_core::Principal;
use unhidra_protocol::{ClientFrame, FrameError, MessageData, ServerFrame, close};
use unhidra_store::rooms::NewMessage;
use uuid::Uuid;

use crate::hub::ConnId;
use crate::{Chat, ChatError, MAX_HISTORY, message_data};

/// The most messages one `resume` replays per room; `more` says when there are others.
const MAX_REPLAY: usize = 1000;

/// How many times a join checks the membership again when members of the room are being
/// removed meanwhile, before it gives up with `busy`.
const MAX_JOIN_RACES: usize = 3;

/// The most rooms one `resume` names: each costs a join and a replay, for one frame of the
/// rate limit. A client in more rooms resumes them over several frames.
pub const MAX_RESUME_ROOMS: usize = 100;

/// How many of `messages`, in the order given, fit in `budget` encoded bytes, and their bytes.
fn fitting<'a>(messages: impl Iterator<Item = &'a MessageData>, budget: usize) -> (usize, usize) {
    let (mut count, mut used) = (0, 0usize);
    for message in messages {
        let next = used.saturating_add(message.encoded_len() + 1);
        if next > budget {
            break;
        }
        (count, used) = (count + 1, next);
    }
    (count, used)
}

/// Cuts a reply's messages (oldest first) to at most `budget` encoded bytes, keeping at least
/// one so that paging always moves on: the newest when `keep_newest` (a page read backwards,
/// towards older messages), else the oldest. Says whether any was cut, and the bytes kept.
pub(crate) fn fit(
    messages: &mut Vec<MessageData>,
    budget: usize,
    keep_newest: bool,
) -> (bool, usize) {
    let (kept, used) = if keep_newest {
        fitting(messages.iter().rev(), budget)
    } else {
        fitting(messages.iter(), budget)
    };
    let (kept, used) = match (kept, messages.first(), messages.last()) {
        // Not even one fits: the one nearest the cursor goes alone.
        (0, Some(first), Some(last)) => {
            (1, if keep_newest { last } else { first }.encoded_len() + 1)
        }
        fits => (fits.0, used),
    };
    if kept >= messages.len() {
        return (false, used);
    }
    if keep_newest {
        messages.drain(..messages.len() - kept);
    } else {
        messages.truncate(kept);
    }
    (true, used)
}

/// Like [`fit`] for a page that continues a reply (oldest kept): it may keep nothing.
fn fit_more(messages: &mut Vec<MessageData>, budget: usize) -> (bool, usize) {
    let (kept, used) = fitting(messages.iter(), budget);
    let cut = kept < messages.len();
    messages.truncate(kept);
    (cut, used)
}

/// The most `send` frames stored as one group (and at most a quarter of the connection's queue,
/// since each one queues an `ack` for the sender, and its broadcast if the sender listens).
pub const MAX_BURST: usize = 64;

/// Consecutive `send` frames of one connection to one room, stored as one group.
#[derive(Debug)]
pub struct Burst {
    /// The room, as the frames name it.
    pub room: String,
    /// `(client_msg_id, body)` in the order they came.
    pub items: Vec<(String, String)>,
}

/// What the adapter does after [`Session::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Nothing more.
    Done,
    /// An `auth` frame brought this token: verify it and call [`Session::reauthenticated`].
    Authenticate(String),
    /// A `watch` of this topic: live updates are the adapter's (they are not chat's).
    Watch(String),
    /// An `unwatch` of this topic.
    Unwatch(String),
}

/// What to do with a frame under the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Handle it.
    Handle,
    /// Drop it (an `error` frame said why).
    Drop,
    /// Close the connection.
    Close,
}

/// A token bucket: `rate` frames per second, bursts up to `rate`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        Self {
            rate,
            tokens: rate,
            last: std::time::Instant::now(),
        }
    }

    /// Takes a token; false when the bucket is empty. A rate of 0 means no limit.
    fn take(&mut self) -> bool {
        if !self.ready() {
            return false;
        }
        if self.rate > 0.0 {
            self.tokens -= 1.0;
        }
        true
    }

    /// Whether a token is there to take (refilling first), without taking it.
    fn ready(&mut self) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        self.tokens >= 1.0
    }
}

/// One connection's side of the protocol: what each client frame does. The WebSocket adapter
/// reads and parses frames and feeds them in; replies and broadcasts go out through the hub.
#[derive(Debug)]
pub struct Session<'a> {
    chat: &'a Chat,
    id: ConnId,
    who: Principal,
    expires: DateTime<Utc>,
    bucket: Bucket,
    /// Frames refused in a row by the bucket.
    strikes: u32,
}

impl<'a> Session<'a> {
    /// Applies the per-connection frame rate: an `error` frame with `retry_after` when the
    /// bucket is empty, and a close with 4029 when refusals go on for a second's worth of
    /// frames.
    pub fn admit_frame(&mut self) -> Admit {
        if self.bucket.take() {
            self.strikes = 0;
            return Admit::Handle;
        }
        let chat = self.chat;
        chat.metrics().limited("connection");
        self.strikes += 1;
        if self.strikes > chat.frames_per_sec.max(1) {
            chat.hub().close(
                self.id,
                close::RATE_LIMITED,
                "rate limit exceeded again and again",
            );
            return Admit::Close;
        }
        self.reply(&ServerFrame::Error {
            code: "rate_limited".to_owned(),
            message: "too many frames; slow down".to_owned(),
            retry_after: Some(1),
            reference: None,
        });
        // The refused frame is dropped; the connection goes on.
        Admit::Drop
    }

    fn reply(&self, frame: &ServerFrame) {
        self.chat.hub().send_to(self.id, frame);
    }

    fn error(&self, code: &str, message: impl Into<String>, reference: Option<String>) {
        self.reply(&ServerFrame::Error {
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
            reference,
        });
    }

    fn chat_error(&self, err: &ChatError, reference: Option<String>) {
        let (code, message) = match err {
            ChatError::RoomNotFound => ("room_not_found", "no such room".to_owned()),
            ChatError::MemberNotFound => ("not_found", "no such member".to_owned()),
            ChatError::UserNotFound => ("unknown_user", "no such user".to_owned()),
            ChatError::Forbidden => (
                "forbidden",
                "your role in this room does not allow this (join the room first)".to_owned(),
            ),
            ChatError::Invalid(_, code, message) => (*code, message.clone()),
            ChatError::LastOwner => ("last_owner", err.to_string()),
            ChatError::Busy => ("busy", err.to_string()),
            ChatError::Store(e) => {
                tracing::error!(error = %unhidra_core::error_chain(e), "websocket frame failed");
                ("internal", "the frame could not be carried out".to_owned())
            }
        };
        self.error(code, message, reference);
    }

    fn room_id(&self, room: &str) -> Option<Uuid> {
        let parsed = room.parse().ok();
        if parsed.is_none() {
            self.error("room_not_found", "no such room", Some(room.to_owned()));
        }
        parsed
    }

    /// [`Session::handle`] on the heap: its state (store calls and all) is only allocated
    /// while a frame is being handled, not for as long as the connection is idle.
    pub async fn handle_boxed(&mut self, parsed: Result<ClientFrame, FrameError>) -> Handled {
        Box::pin(self.handle(parsed)).await
    }

    /// [`Session::send`] on the heap, like [`Session::handle_boxed`].
    pub async fn send_boxed(&mut self, burst: Burst) {
        Box::pin(self.send(burst)).await;
    }

    /// Stores a burst of `send`s to one room as one group, then, message by message in order,
    /// acknowledges it and broadcasts a new one: durable, acknowledged, broadcast.
    pub async fn send(&mut self, burst: Burst) {
        let received = std::time::Instant::now();
        let chat = self.chat;
        let Ok(id) = burst.room.parse::<Uuid>() else {
            for _ in &burst.items {
                self.error("room_not_found", "no such room", Some(burst.room.clone()));
            }
            return;
        };
        let items: Vec<NewMessage<'_>> = burst
            .items
            .iter()
            .map(|(client_msg_id, body)| NewMessage {
                client_msg_id,
                body,
            })
            .collect();
        match chat.post_group(&self.who, id, &items).await {
            Ok(group) => {
                for ((client_msg_id, _), outcome) in burst.items.iter().zip(&group.outcomes) {
                    match outcome {
                        Ok((stored, new)) => {
                            self.reply(&ServerFrame::Ack {
                                client_msg_id: client_msg_id.clone(),
                                id: stored.id,
                                ts: stored.created_at.timestamp_millis(),
                            });
                            if *new {
                                chat.deliver(stored);
                                chat.metrics()
                                    .delivery
                                    .observe(received.elapsed().as_secs_f64());
                            }
                        }
                        Err(e) => self.chat_error(e, Some(client_msg_id.clone())),
                    }
                }
            }
            Err(e) => {
                for (client_msg_id, _) in &burst.items {
                    self.chat_error(&e, Some(client_msg_id.clone()));
                }
            }
        }
    }

    /// Carries out one frame (a `send` too, as a burst of one).
    pub async fn handle(&mut self, parsed: Result<ClientFrame, FrameError>) -> Handled {
        let frame = match parsed {
            Ok(frame) => frame,
            Err(e) => {
                self.error(e.code, e.message, None);
                return Handled::Done;
            }
        };
        let chat = self.chat;
        chat.metrics().frame("in", frame.kind());
        match frame {
            ClientFrame::Ping => self.reply(&ServerFrame::Pong),
            ClientFrame::Join { room } => {
                let Some(id) = self.room_id(&room) else {
                    return Handled::Done;
                };
                if let Err(e) = self.join(id, false).await {
                    self.chat_error(&e, Some(room));
                }
            }
            ClientFrame::Leave { room } => {
                let Some(id) = self.room_id(&room) else {
                    return Handled::Done;
                };
                chat.hub().unsubscribe(self.id, id);
            }
            ClientFrame::Send {
                room,
                body,
                client_msg_id,
            } => {
                self.send(Burst {
                    room,
                    items: vec![(client_msg_id, body)],
                })
                .await;
            }
            ClientFrame::History {
                room,
                before,
                after,
                limit,
            } => {
                let Some(id) = self.room_id(&room) else {
                    return Handled::Done;
                };
                match chat.history_page(&self.who, id, before, after, limit).await {
                    Ok((messages, more)) => {
                        self.reply(&ServerFrame::History {
                            room: id.to_string(),
                            messages,
                            more,
                        });
                    }
                    Err(e) => self.chat_error(&e, Some(room)),
                }
            }
            ClientFrame::Resume { rooms } if rooms.len() > MAX_RESUME_ROOMS => {
                self.error(
                    "too_many_rooms",
                    format!("a resume names at most {MAX_RESUME_ROOMS} rooms; send several"),
                    None,
                );
            }
            ClientFrame::Resume { rooms } => {
                // One entry per room however its id is spelled (hyphenated, plain, braced,
                // `urn:uuid:`, any case), from the earliest message asked for.
                let mut wanted: BTreeMap<Uuid, i64> = BTreeMap::new();
                for (room, last_seen) in rooms {
                    if let Some(id) = self.room_id(&room) {
                        let from = wanted.entry(id).or_insert(last_seen);
                        *from = (*from).min(last_seen);
                    }
                }
                for (id, last_seen) in wanted {
                    // A connection closed meanwhile (too slow for its queue, say) gets no more.
                    if chat.hub().is_closing(self.id) {
                        break;
                    }
                    self.resume(id, last_seen).await;
                }
            }
            ClientFrame::Typing { room } => {
                let Some(id) = self.room_id(&room) else {
                    return Handled::Done;
                };
                match chat.visible_room(&self.who, id).await {
                    Ok((_, Some(_))) => chat.hub().typing(id, self.who.user_id),
                    Ok((_, None)) => self.chat_error(&ChatError::Forbidden, Some(room)),
                    Err(e) => self.chat_error(&e, Some(room)),
                }
            }
            ClientFrame::Auth { token } => return Handled::Authenticate(token),
            ClientFrame::Watch { topic } => return Handled::Watch(topic),
            ClientFrame::Unwatch { topic } => return Handled::Unwatch(topic),
        }
        Handled::Done
    }

    /// Applies what a fresh token from an `auth` frame proved: the same session goes on with
    /// the new expiry; another session's token, or none that verified, gets an error frame.
    pub fn reauthenticated(&mut self, verified: Option<(Principal, DateTime<Utc>)>) {
        match verified {
            // The same session: revoking it must still close this connection.
            Some((who, expires)) if who.session_id == self.who.session_id => {
                self.who = who;
                self.expires = expires;
            }
            Some(_) => self.error(
                "session_mismatch",
                "the token belongs to another session; reconnect with it instead",
                None,
            ),
            None => self.error("invalid_token", "the token is not valid", None),
        }
    }

    /// Joins a room (see [`Chat::join`]) and subscribes the connection, holding live frames
    /// back when `held`. The membership check and the subscription are atomic with respect to
    /// removing the member: a removal in between makes the check run again.
    async fn join(&self, id: Uuid, held: bool) -> Result<(), ChatError> {
        let hub = self.chat.hub();
        for _ in 0..MAX_JOIN_RACES {
            let removals = hub.removals(id);
            self.chat.join(&self.who, id).await?;
            if hub.subscribe_checked(self.id, id, removals, held) {
                return Ok(());
            }
        }
        Err(ChatError::Busy)
    }

    /// Joins a room and replays every message after `last_seen`, then lets live messages
    /// through: nothing missed, nothing twice.
    async fn resume(&self, id: Uuid, last_seen: i64) {
        let chat = self.chat;
        let room = id.to_string();
        if let Err(e) = self.join(id, true).await {
            return self.chat_error(&e, Some(room));
        }
        let mut replay = Vec::new();
        let mut after = last_seen;
        let mut more = false;
        let mut budget = chat.max_reply_bytes;
        loop {
            match chat
                .history(&self.who, id, None, Some(after), Some(MAX_HISTORY), budget)
                .await
            {
                Ok(page) => {
                    let full = page.len() == usize::try_from(MAX_HISTORY).unwrap_or(usize::MAX);
                    let mut page: Vec<MessageData> = page.into_iter().map(message_data).collect();
                    // A bounded replay, in messages and in bytes: past it, the client pages
                    // with `history {after}`.
                    let (cut, used) = if replay.is_empty() {
                        fit(&mut page, budget, false)
                    } else {
                        fit_more(&mut page, budget)
                    };
                    budget = budget.saturating_sub(used);
                    if let Some(last) = page.last() {
                        after = last.id;
                    }
                    replay.extend(page);
                    if cut || (full && replay.len() >= MAX_REPLAY) {
                        more = true;
                        break;
                    }
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    chat.hub().release_held(
                        self.id,
                        id,
                        &ServerFrame::History {
                            room: room.clone(),
                            messages: Vec::new(),
                            more: false,
                        },
                        i64::MAX,
                    );
                    return self.chat_error(&e, Some(room));
                }
            }
        }
        chat.hub().release_held(
            self.id,
            id,
            &ServerFrame::History {
                room,
                messages: replay,
                more,
            },
            after,
        );
    }
}

impl<'a> Session<'a> {
    /// The session of a connection the hub registered, for a caller whose token is valid until
    /// `expires`.
    pub fn new(chat: &'a Chat, id: ConnId, who: Principal, expires: DateTime<Utc>) -> Self {
        Self {
            chat,
            id,
            who,
            expires,
            bucket: Bucket::new(chat.frames_per_sec),
            strikes: 0,
        }
    }

    /// Who the connection belongs to.
    pub fn who(&self) -> &Principal {
        &self.who
    }

    /// When the connection's token expires.
    pub fn expires(&self) -> DateTime<Utc> {
        self.expires
    }

    /// The most `send`s gathered into one burst for this connection.
    pub fn burst_limit(&self) -> usize {
        (self.chat.hub().queue_limit() / 4).clamp(1, MAX_BURST)
    }

    /// Whether the frame rate admits another frame now, without taking it.
    pub fn ready(&mut self) -> bool {
        self.bucket.ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(bodies: &[&str]) -> Vec<MessageData> {
        bodies
            .iter()
            .zip(1..)
            .map(|(body, id)| MessageData {
                room: "r".into(),
                id,
                sender: "s".into(),
                body: (*body).to_owned(),
                ts: 0,
            })
            .collect()
    }

    fn ids(messages: &[MessageData]) -> Vec<i64> {
        messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn a_reply_is_cut_to_its_byte_budget_from_the_right_end() {
        let one = messages(&["x"])[0].encoded_len() + 1;
        let mut forward = messages(&["x", "x", "x", "x"]);
        assert_eq!(fit(&mut forward, 2 * one, false), (true, 2 * one));
        assert_eq!(ids(&forward), [1, 2], "paging forwards keeps the oldest");
        let mut backward = messages(&["x", "x", "x", "x"]);
        assert_eq!(fit(&mut backward, 2 * one, true), (true, 2 * one));
        assert_eq!(ids(&backward), [3, 4], "paging backwards keeps the newest");
        let mut whole = messages(&["x", "x"]);
        assert_eq!(fit(&mut whole, 2 * one, false), (false, 2 * one));
        assert_eq!(ids(&whole), [1, 2]);
    }

    #[test]
    fn escapes_count_and_one_message_always_goes() {
        // A control character becomes a six-byte `\u0001` escape in JSON.
        let control = "\u{1}".repeat(100);
        let mut page = messages(&[&control, "x"]);
        assert!(page[0].encoded_len() > 600);
        let long = page[0].encoded_len() + 1;
        assert_eq!(fit(&mut page, 10, false), (true, long));
        assert_eq!(ids(&page), [1], "paging always moves on");
        let mut next = messages(&[&control]);
        assert_eq!(fit_more(&mut next, 10), (true, 0));
        assert!(next.is_empty(), "a continuation may add nothing");
    }
}
