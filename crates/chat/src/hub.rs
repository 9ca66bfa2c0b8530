//! The hub: every live WebSocket connection, which rooms it listens to, and delivery.
//!
//! A broadcast encodes its frame once and hands the same bytes to every subscriber's bounded
//! queue without waiting; a connection whose queue is full reads too slowly and is closed with
//! 1013, so one slow client never holds up a room or grows the server's memory.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use unhidra_core::UserId;
use unhidra_core::ratelimit::address_network;
use unhidra_protocol::{PresenceStatus, ServerFrame, close};
use uuid::Uuid;

use crate::metrics::{FrameLabels, WsMetrics};
use crate::outbox::{Message, Outbox};

/// A connection's id, unique within this process.
pub type ConnId = u64;

/// What the admin API shows of a connection.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ConnectionInfo {
    /// The connection's id.
    pub id: String,
    /// `user` or `device`.
    pub kind: &'static str,
    /// The user's id; for a device, its owner's (absent once that account is deleted).
    pub user: Option<String>,
    /// The device's id, for a device's connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The client's address.
    pub ip: Option<String>,
    /// The wire format: `unhidra.v1.json`, `unhidra.v1.jsonl`, `unhidra.v1.msgpack`,
    /// `unhidra.device.v1` or `unhidra.device.v1.msgpack`.
    pub protocol: &'static str,
    /// How the client presented its credential (never the credential itself).
    pub auth: AuthStyle,
    /// When it connected.
    pub connected_at: DateTime<Utc>,
    /// When the client last sent a frame (a WebSocket ping or pong counts); the connect time
    /// until then.
    pub last_activity: DateTime<Utc>,
    /// The rooms it listens to.
    pub rooms: Vec<String>,
}

/// A frame encoded at most once per wire format, however many connections get it.
struct Encoded<'a> {
    frame: &'a ServerFrame,
    json: Option<Bytes>,
    msgpack: Option<Bytes>,
}

impl<'a> Encoded<'a> {
    fn new(frame: &'a ServerFrame) -> Self {
        Self {
            frame,
            json: None,
            msgpack: None,
        }
    }

    fn message(&mut self, msgpack: bool) -> Message {
        if msgpack {
            let frame = self.frame;
            Message::Binary(
                self.msgpack
                    .get_or_insert_with(|| frame.to_msgpack().into())
                    .clone(),
            )
        } else {
            let frame = self.frame;
            Message::Text(
                self.json
                    .get_or_insert_with(|| Bytes::from(frame.to_json()))
                    .clone(),
            )
        }
    }
}

/// How a connection presented its token on the upgrade. The token itself is never kept: in the
/// firmware style the subprotocol *is* the token, so the listing says the style instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthStyle {
    /// A protocol name and `bearer.<token>` in `Sec-WebSocket-Protocol` (browsers).
    Bearer,
    /// The token as the only subprotocol, echoed back (ESP32 firmware).
    TokenOnly,
    /// `Authorization: Bearer` on the upgrade request.
    AuthorizationHeader,
    /// A device protocol name and `key.<key>` in `Sec-WebSocket-Protocol`.
    Key,
}

struct Conn {
    /// Whether frames go out as MessagePack.
    msgpack: bool,
    /// The user; for a device, its owner (or none).
    user: Option<UserId>,
    /// The user's session; none for a device.
    session: Option<Uuid>,
    /// The device, for a device's connection.
    device: Option<Uuid>,
    ip: Option<IpAddr>,
    protocol: &'static str,
    auth: AuthStyle,
    connected_at: DateTime<Utc>,
    /// Unix milliseconds of the client's last frame (0 before the first).
    activity: Arc<AtomicI64>,
    outbox: Arc<Outbox>,
    rooms: HashSet<Uuid>,
    /// Rooms being resumed: their live messages wait here until the replay is sent.
    held: HashMap<Uuid, Held>,
    /// Rooms just resumed: the last message id their replay held. A message stored before the
    /// replay was read may be broadcast only after it was sent (its sender was slower than the
    /// replay): such a message is already in the replay and is dropped, until the first newer
    /// one comes (deliveries of a room come in id order).
    floors: HashMap<Uuid, i64>,
}

/// Live messages of a room held back while its replay is read, bounded like the queue.
#[derive(Default)]
struct Held {
    messages: Vec<(Option<i64>, Message)>,
    bytes: usize,
}

#[derive(Default)]
struct State {
    conns: HashMap<ConnId, Conn>,
    /// Room → its listening connections.
    rooms: HashMap<Uuid, HashSet<ConnId>>,
    /// Room → how many times members were removed from it: a subscription checked against a
    /// membership read before a removal is refused ([`Hub::subscribe_checked`]).
    removals: HashMap<Uuid, u64>,
    /// (An address's network, whether devices') → its open connections.
    per_network: HashMap<(IpAddr, bool), usize>,
    /// (An address's network, whether devices') → connections admitted and not registered yet
    /// (mid-handshake): they count towards the limit too.
    pending: HashMap<(IpAddr, bool), usize>,
}

fn decrement(map: &mut HashMap<(IpAddr, bool), usize>, key: (IpAddr, bool)) {
    if let Some(count) = map.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            map.remove(&key);
        }
    }
}

/// A place held for a new connection from one address's network, taken by
/// [`Hub::reserve`] when it is admitted and given up when it registers — or when the upgrade
/// fails and this is dropped — so that many handshakes at once cannot pass a limit that each
/// checked alone.
pub struct Reservation {
    state: Arc<Mutex<State>>,
    key: Option<(IpAddr, bool)>,
    ip: Option<IpAddr>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("network", &self.key)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// The address it was made for.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            decrement(&mut state.pending, key);
        }
    }
}

/// Every live connection of this process.
pub struct Hub {
    queue: usize,
    queue_bytes: usize,
    /// IPv6 addresses count as their network of this many bits.
    ipv6_prefix: u8,
    metrics: WsMetrics,
    next: AtomicU64,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("queue", &self.queue)
            .field("queue_bytes", &self.queue_bytes)
            .finish_non_exhaustive()
    }
}

/// A registered connection: its id, and its outbox (frames to write, in order, and close
/// requests from elsewhere: admin, revocation, slow reader, shutdown).
#[derive(Debug)]
pub struct Registration {
    /// The id.
    pub id: ConnId,
    /// What the connection's writer sends.
    pub outbox: Arc<Outbox>,
    /// Unix milliseconds of the client's last frame, for the admin API: the reader updates it.
    pub activity: Arc<AtomicI64>,
}

impl Hub {
    /// A hub whose connections queue at most `queue` frames and `queue_bytes` bytes each.
    pub fn new(queue: usize, queue_bytes: usize, metrics: WsMetrics) -> Self {
        Self {
            queue: queue.max(1),
            queue_bytes,
            ipv6_prefix: 128,
            metrics,
            next: AtomicU64::new(1),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Counts IPv6 clients by their network of `bits` (`rate_limit_ipv6_prefix`) in
    /// [`Hub::connections_from`].
    #[must_use]
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.min(128);
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new connection speaking `protocol` (one of the `SUBPROTOCOL_*` names).
    pub fn register(
        &self,
        user: UserId,
        session: Uuid,
        ip: Option<IpAddr>,
        (protocol, auth): (&'static str, AuthStyle),
        now: DateTime<Utc>,
    ) -> Registration {
        self.insert(
            Some(user),
            Some(session),
            None,
            ip,
            (protocol, auth),
            now,
            None,
        )
    }

    /// Holds a place for a connection of people (or, with `devices`, of devices) from `ip`'s
    /// network, unless `most` are open or being opened from it already; `None` then. Without
    /// an address, nothing is counted.
    pub fn reserve(&self, ip: Option<IpAddr>, devices: bool, most: usize) -> Option<Reservation> {
        let Some(ip) = ip else {
            return Some(Reservation {
                state: Arc::clone(&self.state),
                key: None,
                ip: None,
            });
        };
        let key = (address_network(ip, self.ipv6_prefix), devices);
        let mut state = self.state();
        let open = state.per_network.get(&key).copied().unwrap_or(0);
        let opening = state.pending.get(&key).copied().unwrap_or(0);
        if open + opening >= most {
            return None;
        }
        *state.pending.entry(key).or_default() += 1;
        Some(Reservation {
            state: Arc::clone(&self.state),
            key: Some(key),
            ip: Some(ip),
        })
    }

    /// Registers a person's connection admitted with `reservation`, which it turns into an
    /// open connection in the same step.
    pub fn register_reserved(
        &self,
        reservation: Reservation,
        user: UserId,
        session: Uuid,
        wire: (&'static str, AuthStyle),
        now: DateTime<Utc>,
    ) -> Registration {
        let ip = reservation.ip;
        self.insert(
            Some(user),
            Some(session),
            None,
            ip,
            wire,
            now,
            Some(reservation),
        )
    }

    /// Registers a device's connection admitted with `reservation` (see
    /// [`Hub::register_reserved`]).
    pub fn register_device_reserved(
        &self,
        reservation: Reservation,
        device: Uuid,
        owner: Option<UserId>,
        wire: (&'static str, AuthStyle),
        now: DateTime<Utc>,
    ) -> Registration {
        let ip = reservation.ip;
        self.insert(owner, None, Some(device), ip, wire, now, Some(reservation))
    }

    /// Registers a device's connection; `owner` is its owner's, for the listing.
    pub fn register_device(
        &self,
        device: Uuid,
        owner: Option<UserId>,
        ip: Option<IpAddr>,
        wire: (&'static str, AuthStyle),
        now: DateTime<Utc>,
    ) -> Registration {
        self.insert(owner, None, Some(device), ip, wire, now, None)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the registrations' fields, in one place"
    )]
    fn insert(
        &self,
        user: Option<UserId>,
        session: Option<Uuid>,
        device: Option<Uuid>,
        ip: Option<IpAddr>,
        (protocol, auth): (&'static str, AuthStyle),
        now: DateTime<Utc>,
        mut reservation: Option<Reservation>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(self.queue, self.queue_bytes));
        let activity = Arc::new(AtomicI64::new(0));
        let mut state = self.state();
        // The place it held becomes the open connection's, under the same lock.
        if let Some(key) = reservation.as_mut().and_then(|r| r.key.take()) {
            decrement(&mut state.pending, key);
        }
        if let Some(ip) = ip {
            let network = address_network(ip, self.ipv6_prefix);
            *state
                .per_network
                .entry((network, device.is_some()))
                .or_default() += 1;
        }
        state.conns.insert(
            id,
            Conn {
                msgpack: protocol == unhidra_protocol::SUBPROTOCOL_MSGPACK
                    || protocol == unhidra_protocol::SUBPROTOCOL_DEVICE_MSGPACK,
                user,
                session,
                device,
                ip,
                protocol,
                auth,
                connected_at: now,
                activity: Arc::clone(&activity),
                outbox: Arc::clone(&outbox),
                rooms: HashSet::new(),
                held: HashMap::new(),
                floors: HashMap::new(),
            },
        );
        drop(state);
        Registration {
            id,
            outbox,
            activity,
        }
    }

    /// Removes a connection from every room, announcing users whose last connection left.
    pub fn unregister(&self, id: ConnId) {
        let rooms: Vec<Uuid> = {
            let state = self.state();
            state
                .conns
                .get(&id)
                .map(|c| c.rooms.iter().copied().collect())
                .unwrap_or_default()
        };
        for room in rooms {
            self.unsubscribe(id, room);
        }
        let mut state = self.state();
        let Some(conn) = state.conns.remove(&id) else {
            return;
        };
        if let Some(ip) = conn.ip {
            let key = (address_network(ip, self.ipv6_prefix), conn.device.is_some());
            decrement(&mut state.per_network, key);
        }
    }

    /// Starts delivering a room's frames to a connection; announces the user if this is their
    /// first connection in the room.
    pub fn subscribe(&self, id: ConnId, room: Uuid) {
        let announce = Self::subscribe_locked(&mut self.state(), id, room, false);
        if let Some(user) = announce {
            self.presence(room, user, PresenceStatus::Online);
        }
    }

    /// How many times members were removed from a room; read it before checking a membership
    /// and pass it to [`Hub::subscribe_checked`].
    pub fn removals(&self, room: Uuid) -> u64 {
        self.state().removals.get(&room).copied().unwrap_or(0)
    }

    /// Subscribes (holding live frames back when `held`, for a resume) only if no member was
    /// removed from the room since `removals` was read: a membership checked in between may be
    /// stale, and the caller checks again. Atomic with [`Hub::unsubscribe_user`], so that a
    /// member removed while joining never stays subscribed.
    pub fn subscribe_checked(&self, id: ConnId, room: Uuid, removals: u64, held: bool) -> bool {
        let announce = {
            let mut state = self.state();
            if state.removals.get(&room).copied().unwrap_or(0) != removals {
                return false;
            }
            Self::subscribe_locked(&mut state, id, room, held)
        };
        if let Some(user) = announce {
            self.presence(room, user, PresenceStatus::Online);
        }
        true
    }

    /// Adds the subscription; returns the user to announce when it is their first connection
    /// in the room.
    fn subscribe_locked(state: &mut State, id: ConnId, room: Uuid, held: bool) -> Option<UserId> {
        let user = state.conns.get(&id).and_then(|c| c.user)?;
        if held && let Some(conn) = state.conns.get_mut(&id) {
            conn.held.entry(room).or_default();
        }
        let already = Self::user_in_room(state, room, user);
        if !state.rooms.entry(room).or_default().insert(id) {
            return None;
        }
        if let Some(conn) = state.conns.get_mut(&id) {
            conn.rooms.insert(room);
        }
        (!already).then_some(user)
    }

    /// Stops delivering a room to a connection; announces the user if it was their last.
    pub fn unsubscribe(&self, id: ConnId, room: Uuid) {
        let announce = {
            let mut state = self.state();
            let Some(user) = state.conns.get(&id).and_then(|c| c.user) else {
                return;
            };
            let removed = state
                .rooms
                .get_mut(&room)
                .is_some_and(|set| set.remove(&id));
            if state.rooms.get(&room).is_some_and(HashSet::is_empty) {
                state.rooms.remove(&room);
            }
            if let Some(conn) = state.conns.get_mut(&id) {
                conn.rooms.remove(&room);
                conn.floors.remove(&room);
            }
            (removed && !Self::user_in_room(&state, room, user)).then_some(user)
        };
        if let Some(user) = announce {
            self.presence(room, user, PresenceStatus::Offline);
        }
    }

    fn user_in_room(state: &State, room: Uuid, user: UserId) -> bool {
        state.rooms.get(&room).is_some_and(|set| {
            set.iter().any(|c| {
                state
                    .conns
                    .get(c)
                    .is_some_and(|conn| conn.user == Some(user))
            })
        })
    }

    /// Stops every connection of a user listening to a room (they left or were removed).
    pub fn unsubscribe_user(&self, room: Uuid, user: UserId) {
        let conns: Vec<ConnId> = {
            let mut state = self.state();
            *state.removals.entry(room).or_default() += 1;
            state
                .rooms
                .get(&room)
                .map(|set| {
                    set.iter()
                        .copied()
                        .filter(|c| {
                            state
                                .conns
                                .get(c)
                                .is_some_and(|conn| conn.user == Some(user))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        for conn in conns {
            self.unsubscribe(conn, room);
        }
    }

    /// Forgets a deleted room.
    pub fn forget_room(&self, room: Uuid) {
        let mut state = self.state();
        if let Some(conns) = state.rooms.remove(&room) {
            for id in conns {
                if let Some(conn) = state.conns.get_mut(&id) {
                    conn.rooms.remove(&room);
                    conn.floors.remove(&room);
                }
            }
        }
    }

    /// Users with a connection listening to a room.
    pub fn online(&self, room: Uuid) -> Vec<UserId> {
        let state = self.state();
        let mut users: Vec<UserId> = state
            .rooms
            .get(&room)
            .map(|set| {
                set.iter()
                    .filter_map(|c| state.conns.get(c).and_then(|c| c.user))
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        users.dedup();
        users
    }

    fn presence(&self, room: Uuid, user: UserId, status: PresenceStatus) {
        self.broadcast(
            room,
            &ServerFrame::Presence {
                room: room.to_string(),
                user: user.to_string(),
                status,
            },
        );
    }

    /// Announces that a user is typing.
    pub fn typing(&self, room: Uuid, user: UserId) {
        self.presence(room, user, PresenceStatus::Typing);
    }

    /// Delivers a frame to every connection listening to a room, encoded once.
    pub fn broadcast(&self, room: Uuid, frame: &ServerFrame) {
        self.broadcast_message(room, frame, None);
    }

    /// Like [`Hub::broadcast`], for a stored message with its id, so that a connection resuming
    /// the room can drop what its replay already holds.
    pub fn broadcast_message(&self, room: Uuid, frame: &ServerFrame, id: Option<i64>) {
        let mut encoded = Encoded::new(frame);
        let mut state = self.state();
        let State { rooms, conns, .. } = &mut *state;
        if let Some(set) = rooms.get(&room) {
            self.metrics
                .frames
                .get_or_create(&FrameLabels {
                    direction: "out",
                    r#type: frame.kind(),
                })
                .inc_by(u64::try_from(set.len()).unwrap_or(0));
            for conn_id in set {
                let Some(conn) = conns.get_mut(conn_id) else {
                    continue;
                };
                // Nothing is encoded for a connection that is going away.
                if conn.outbox.is_closing() {
                    continue;
                }
                let message = encoded.message(conn.msgpack);
                match conn.held.get_mut(&room) {
                    Some(held) => {
                        held.bytes = held.bytes.saturating_add(message.len());
                        held.messages.push((id, message));
                        if held.messages.len() > self.queue || held.bytes > self.queue_bytes {
                            conn.held.clear();
                            conn.outbox
                                .close_now(close::OVERLOADED, "too slow to keep up");
                        }
                    }
                    None => {
                        if let (Some(id), Some(floor)) = (id, conn.floors.get(&room).copied()) {
                            if id <= floor {
                                continue;
                            }
                            conn.floors.remove(&room);
                        }
                        Self::offer(conn, message);
                    }
                }
            }
        }
    }

    /// Sends the replay, then the held live frames that are newer than it, in order: no gap
    /// and no duplicate.
    pub fn release_held(&self, id: ConnId, room: Uuid, replay: &ServerFrame, replayed_to: i64) {
        let mut state = self.state();
        let Some(conn) = state.conns.get_mut(&id) else {
            return;
        };
        let held = conn.held.remove(&room).unwrap_or_default();
        if conn.outbox.is_closing() {
            return;
        }
        let replay = Encoded::new(replay).message(conn.msgpack);
        Self::offer(conn, replay);
        let mut newer = false;
        for (message_id, message) in held.messages {
            if message_id.is_none_or(|m| m > replayed_to) {
                newer |= message_id.is_some();
                Self::offer(conn, message);
            }
        }
        if !newer && replayed_to < i64::MAX {
            conn.floors.insert(room, replayed_to);
        }
    }

    /// Delivers a frame to one connection.
    pub fn send_to(&self, id: ConnId, frame: &ServerFrame) {
        self.metrics.frame("out", frame.kind());
        let state = self.state();
        if let Some(conn) = state.conns.get(&id).filter(|c| !c.outbox.is_closing()) {
            Self::offer(conn, Encoded::new(frame).message(conn.msgpack));
        }
    }

    /// Delivers a frame to every connection of a user: targeted delivery for other
    /// capabilities (device commands, admin notices).
    pub fn send_to_user(&self, user: UserId, frame: &ServerFrame) -> usize {
        let mut encoded = Encoded::new(frame);
        let state = self.state();
        let mut delivered = 0;
        for conn in state
            .conns
            .values()
            .filter(|c| c.device.is_none() && c.user == Some(user) && !c.outbox.is_closing())
        {
            Self::offer(conn, encoded.message(conn.msgpack));
            delivered += 1;
        }
        delivered
    }

    /// Queues a message without waiting; a full queue means the reader is too slow, and what
    /// waits for it is dropped with the connection.
    fn offer(conn: &Conn, message: Message) {
        if conn.outbox.push(message).is_err() {
            conn.outbox
                .close_now(close::OVERLOADED, "too slow to keep up");
        }
    }

    /// Whether a connection is gone or going away: work for it can stop.
    pub fn is_closing(&self, id: ConnId) -> bool {
        self.state()
            .conns
            .get(&id)
            .is_none_or(|c| c.outbox.is_closing())
    }

    /// Closes one connection; false if there is none with that id.
    pub fn close(&self, id: ConnId, code: u16, reason: &str) -> bool {
        let state = self.state();
        match state.conns.get(&id) {
            Some(conn) => {
                conn.outbox.close(code, reason);
                true
            }
            None => false,
        }
    }

    /// Closes every connection of a session.
    pub fn close_session(&self, session: Uuid, code: u16, reason: &str) {
        for conn in self
            .state()
            .conns
            .values()
            .filter(|c| c.session == Some(session))
        {
            conn.outbox.close(code, reason);
        }
    }

    /// The session of every live connection, to re-check after revocations were missed.
    pub fn sessions(&self) -> Vec<Uuid> {
        let mut sessions: Vec<Uuid> = self
            .state()
            .conns
            .values()
            .filter_map(|c| c.session)
            .collect();
        sessions.sort_unstable();
        sessions.dedup();
        sessions
    }

    /// Closes every connection of a user but those of `except`.
    pub fn close_user_except(&self, user: UserId, except: Option<Uuid>, code: u16, reason: &str) {
        for conn in self
            .state()
            .conns
            .values()
            .filter(|c| c.device.is_none() && c.user == Some(user) && c.session != except)
        {
            conn.outbox.close(code, reason);
        }
    }

    /// Closes every connection of a user.
    pub fn close_user(&self, user: UserId, code: u16, reason: &str) {
        for conn in self
            .state()
            .conns
            .values()
            .filter(|c| c.device.is_none() && c.user == Some(user))
        {
            conn.outbox.close(code, reason);
        }
    }

    /// Closes every connection of a device.
    pub fn close_device(&self, device: Uuid, code: u16, reason: &str) -> usize {
        let state = self.state();
        let mut closed = 0;
        for conn in state.conns.values().filter(|c| c.device == Some(device)) {
            conn.outbox.close(code, reason);
            closed += 1;
        }
        closed
    }

    /// Closes every connection of a device but `keep` (a newer one replaces them).
    pub fn close_device_except(&self, device: Uuid, keep: ConnId, code: u16, reason: &str) {
        for (_, conn) in self
            .state()
            .conns
            .iter()
            .filter(|(id, c)| c.device == Some(device) && **id != keep)
        {
            conn.outbox.close(code, reason);
        }
    }

    /// Delivers a device frame to one connection, in its wire format.
    pub fn send_device_frame(&self, id: ConnId, frame: &unhidra_protocol::DeviceServerFrame) {
        self.metrics.frame("out", frame.kind());
        let state = self.state();
        if let Some(conn) = state.conns.get(&id).filter(|c| !c.outbox.is_closing()) {
            let message = if conn.msgpack {
                Message::Binary(frame.to_msgpack().into())
            } else {
                Message::Text(bytes::Bytes::from(frame.to_json()))
            };
            Self::offer(conn, message);
        }
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        for conn in self.state().conns.values() {
            conn.outbox.close(code, reason);
        }
    }

    /// How many connections of people (or, with `devices`, of devices) come from one
    /// address's network (an IPv6 address's first [`Hub::with_ipv6_prefix`] bits; an IPv4
    /// address itself). Kept as counts, so that this costs the same with 10,000 connections.
    pub fn connections_from(&self, ip: IpAddr, devices: bool) -> usize {
        let network = address_network(ip, self.ipv6_prefix);
        self.state()
            .per_network
            .get(&(network, devices))
            .copied()
            .unwrap_or(0)
    }

    /// Queues a WebSocket ping for a connection.
    pub fn ping(&self, id: ConnId) {
        if let Some(conn) = self.state().conns.get(&id) {
            Self::offer(conn, Message::Ping);
        }
    }

    /// The most frames one connection's queue holds.
    pub fn queue_limit(&self) -> usize {
        self.queue
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.state().conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connection, for the admin API.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let state = self.state();
        let mut list: Vec<ConnectionInfo> = state
            .conns
            .iter()
            // One that is closing (still reading what its client sends) is not listed.
            .filter(|(_, c)| !c.outbox.is_closing())
            .map(|(id, c)| ConnectionInfo {
                id: id.to_string(),
                kind: if c.device.is_some() { "device" } else { "user" },
                user: c.user.map(|u| u.to_string()),
                device: c.device.map(|d| d.to_string()),
                ip: c.ip.map(|ip| ip.to_string()),
                protocol: c.protocol,
                auth: c.auth,
                connected_at: c.connected_at,
                last_activity: match c.activity.load(Ordering::Relaxed) {
                    0 => c.connected_at,
                    millis => DateTime::from_timestamp_millis(millis).unwrap_or(c.connected_at),
                },
                rooms: c.rooms.iter().map(Uuid::to_string).collect(),
            })
            .collect();
        list.sort_by_key(|c| c.connected_at);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_under_way_hold_their_places_until_they_register_or_fail() {
        let hub = hub();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let wire = (unhidra_protocol::SUBPROTOCOL_JSON, AuthStyle::Bearer);
        // Two places at most: two handshakes at once take them both, a third waits.
        let first = hub.reserve(Some(ip), false, 2).unwrap();
        let second = hub.reserve(Some(ip), false, 2).unwrap();
        assert!(hub.reserve(Some(ip), false, 2).is_none());
        // Devices count apart, and so do other addresses.
        assert!(hub.reserve(Some(ip), true, 2).is_some());
        assert!(
            hub.reserve(Some("192.0.2.8".parse().unwrap()), false, 2)
                .is_some()
        );
        // One registers: its place is its connection's now, not counted twice.
        let user = UserId(Uuid::new_v4());
        let conn = hub.register_reserved(first, user, Uuid::new_v4(), wire, Utc::now());
        assert_eq!(hub.connections_from(ip, false), 1);
        assert!(hub.reserve(Some(ip), false, 2).is_none());
        // The other fails: dropped, its place is free again.
        drop(second);
        let third = hub.reserve(Some(ip), false, 2).unwrap();
        assert!(hub.reserve(Some(ip), false, 2).is_none());
        drop(third);
        hub.unregister(conn.id);
        assert!(hub.state().pending.is_empty() && hub.state().per_network.is_empty());
        // Without an address nothing is counted.
        assert!(hub.reserve(None, false, 0).is_some());
    }

    fn hub() -> Hub {
        Hub::new(8, 1 << 20, WsMetrics::default())
    }

    #[test]
    fn a_removal_between_check_and_subscribe_refuses_the_subscription() {
        let hub = hub();
        let user = UserId(Uuid::new_v4());
        let room = Uuid::new_v4();
        let registration = hub.register(
            user,
            Uuid::new_v4(),
            None,
            (unhidra_protocol::SUBPROTOCOL_JSON, AuthStyle::Bearer),
            Utc::now(),
        );
        let id = registration.id;
        // The membership was read, then the member was removed: the subscription is refused.
        let seen = hub.removals(room);
        hub.unsubscribe_user(room, user);
        assert!(!hub.subscribe_checked(id, room, seen, false));
        assert!(hub.connections()[0].rooms.is_empty());
        // Checked afresh, with no removal since, it holds; a later removal ends it.
        let seen = hub.removals(room);
        assert!(hub.subscribe_checked(id, room, seen, false));
        assert_eq!(hub.connections()[0].rooms, [room.to_string()]);
        hub.unsubscribe_user(room, user);
        assert!(hub.connections()[0].rooms.is_empty());
    }

    #[test]
    fn connections_are_counted_per_network_people_apart_from_devices() {
        let hub = hub().with_ipv6_prefix(64);
        let wire = (unhidra_protocol::SUBPROTOCOL_JSON, AuthStyle::Bearer);
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let user = UserId(Uuid::new_v4());
        let people: Vec<ConnId> = [v4, a, b]
            .into_iter()
            .map(|ip| {
                hub.register(user, Uuid::new_v4(), Some(ip), wire, Utc::now())
                    .id
            })
            .collect();
        let device = hub
            .register_device(Uuid::new_v4(), Some(user), Some(b), wire, Utc::now())
            .id;
        assert_eq!(hub.connections_from(v4, false), 1);
        assert_eq!(hub.connections_from(a, false), 2, "one /64");
        assert_eq!(hub.connections_from(a, true), 1);
        assert_eq!(hub.connections_from(other, false), 0);
        hub.unregister(people[1]);
        hub.unregister(device);
        hub.unregister(device);
        assert_eq!(hub.connections_from(b, false), 1);
        assert_eq!(hub.connections_from(b, true), 0);
        hub.unregister(people[0]);
        hub.unregister(people[2]);
        assert!(
            hub.state().per_network.is_empty(),
            "no count outlives its connections"
        );
    }
}
