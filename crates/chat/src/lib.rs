//! Chat: rooms, membership and messages, with the authorisation rules every endpoint and every
//! WebSocket frame goes through, and the hub that delivers to connected clients. This crate
//! knows the store's traits and the wire protocol, but no HTTP, no WebSocket library and no SQL.
//!
//! Rules: anyone signed in may see, join and read a public room; a private room exists only
//! for its members (to others it is "not found"). Members post; room admins and owners add and
//! remove members; owners change and delete the room. A site admin may manage any room.

pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod retention;
pub mod session;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use unhidra_core::ratelimit::address_key;
use unhidra_core::{Clock, Controls, SlidingWindow, UserId, forbidden_control};
use unhidra_protocol::{MessageData, ServerFrame};
use unhidra_store::rooms::{
    MessageRange, MessageRecord, NewMessage, RoomChange, RoomListing, RoomRecord, RoomRole,
    SearchHit, Visibility,
};
use unhidra_store::{Store, StoreError};
use uuid::Uuid;

use crate::hub::Hub;
use crate::metrics::WsMetrics;
use unhidra_core::Principal;

/// The longest room name, in characters.
pub const MAX_ROOM_NAME: usize = 100;
/// The longest message, in characters.
pub const MAX_BODY: usize = 16 * 1024;
/// The longest `client_msg_id`, in characters.
pub const MAX_CLIENT_MSG_ID: usize = 128;
/// The longest retention by age: a hundred years, in seconds.
pub const MAX_RETENTION_AGE: i64 = 100 * 365 * 24 * 3600;
/// The largest retention by count.
pub const MAX_RETENTION_COUNT: i64 = 1_000_000_000;
/// Messages per history page when none is asked for, and at most.
pub const DEFAULT_HISTORY: u32 = 50;
/// The largest history page.
pub const MAX_HISTORY: u32 = 200;

/// Why a chat operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// No such room, or a private room the caller does not belong to.
    #[error("no such room")]
    RoomNotFound,
    /// No such member.
    #[error("no such member")]
    MemberNotFound,
    /// No such user.
    #[error("no such user")]
    UserNotFound,
    /// The caller's role in the room does not allow this.
    #[error("your role in this room does not allow this")]
    Forbidden,
    /// A field is wrong: (field, code, message).
    #[error("{2}")]
    Invalid(&'static str, &'static str, String),
    /// The last owner cannot leave or be demoted.
    #[error("a room keeps at least one owner")]
    LastOwner,
    /// Members of the room kept being removed while the caller joined; try again.
    #[error("the room's members are changing; try again")]
    Busy,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stored message as the API shows it.
pub fn message_data(m: MessageRecord) -> MessageData {
    MessageData {
        room: m.room_id.to_string(),
        id: m.id,
        sender: m.sender_id.to_string(),
        body: m.body,
        ts: m.created_at.timestamp_millis(),
    }
}

/// The chat service.
#[derive(Debug)]
pub struct Chat {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    hub: Hub,
    metrics: WsMetrics,
    conn_per_ip: SlidingWindow,
    /// New device connections per address: devices count apart from people.
    device_conn_per_ip: SlidingWindow,
    conn_per_user: SlidingWindow,
    /// HTTP publishes per user and second: the same budget as one connection's frames.
    publish_per_user: SlidingWindow,
    max_per_ip: usize,
    max_devices_per_ip: usize,
    /// Frames per second a connection may send.
    pub frames_per_sec: u32,
    /// How often idle connections are pinged.
    pub ping_interval: std::time::Duration,
    /// How long after a write that found it behind (a backlog, or a socket that pushed back) a
    /// connection waits before the next (`ws_write_coalesce`; stretched for a very large
    /// backlog).
    pub write_coalesce: std::time::Duration,
    /// The largest `history` reply or `resume` replay per room, in encoded bytes.
    pub max_reply_bytes: usize,
    /// Site admins use their powers only with a second factor.
    require_admin_mfa: bool,
    /// The bits of an IPv6 address that name one client for the per-address limits.
    ipv6_prefix: u8,
    /// One lock per room, held from storing a message to queueing its broadcast, so that a
    /// room's messages are stored, committed and delivered in the order of their ids.
    order: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

/// A message stored by [`Chat::post`], with the room's order held until it is dropped:
/// acknowledge it and [`Chat::deliver`] it first.
#[derive(Debug)]
pub struct Posted {
    /// The stored message.
    pub message: MessageRecord,
    /// Whether it is new (false for a retry of a stored `client_msg_id`).
    pub new: bool,
    _order: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// Messages of one sender to one room stored as a group (see [`Chat::post_group`]); the room's
/// order lock is held until this is dropped, so the caller acknowledges and delivers first.
#[derive(Debug)]
pub struct PostedGroup {
    /// Per item, in order: the stored message and whether it is new, or why it was refused.
    pub outcomes: Vec<Result<(MessageRecord, bool), ChatError>>,
    _order: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// Checks a message's length and its `client_msg_id`'s.
fn valid_message(item: &NewMessage<'_>) -> Result<(), ChatError> {
    if item.body.is_empty() || item.body.chars().count() > MAX_BODY {
        return Err(ChatError::Invalid(
            "/body",
            "invalid_length",
            format!("a message has 1 to {MAX_BODY} characters"),
        ));
    }
    if forbidden_control(item.body, Controls::LineBreaks).is_some() {
        return Err(ChatError::Invalid(
            "/body",
            "invalid_characters",
            "a message has no control characters but tab and line breaks".into(),
        ));
    }
    let id = item.client_msg_id;
    if id.is_empty() || id.chars().count() > MAX_CLIENT_MSG_ID {
        return Err(ChatError::Invalid(
            "/client_msg_id",
            "invalid_length",
            format!("a client_msg_id has 1 to {MAX_CLIENT_MSG_ID} characters"),
        ));
    }
    if forbidden_control(id, Controls::None).is_some() {
        return Err(ChatError::Invalid(
            "/client_msg_id",
            "invalid_characters",
            "a client_msg_id has no control characters".into(),
        ));
    }
    Ok(())
}

/// Why a new connection or an HTTP publish was refused by a limit: the scope and the seconds
/// to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// `ip`, `user`, `concurrent` or `publish`.
    pub scope: &'static str,
    /// Seconds until the next attempt may be accepted.
    pub retry_after: i64,
}

impl Chat {
    /// The service over a store, with its hub and the limits of the config.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: &unhidra_config::Config,
        metrics: WsMetrics,
    ) -> Self {
        let minute = chrono::Duration::minutes(1);
        Self {
            store,
            clock,
            hub: Hub::new(
                usize::try_from(config.ws_queue_frames).unwrap_or(256),
                usize::try_from(config.ws_queue_bytes).unwrap_or(usize::MAX),
                metrics.clone(),
            )
            .with_ipv6_prefix(u8::try_from(config.rate_limit_ipv6_prefix).unwrap_or(128)),
            metrics,
            conn_per_ip: SlidingWindow::new(config.rate_limit_ip_per_minute, minute),
            device_conn_per_ip: SlidingWindow::new(config.rate_limit_device_ip_per_minute, minute),
            conn_per_user: SlidingWindow::new(config.rate_limit_user_per_minute, minute),
            publish_per_user: SlidingWindow::new(
                config.rate_limit_messages_per_sec,
                chrono::Duration::seconds(1),
            ),
            max_per_ip: usize::try_from(config.ws_max_connections_per_ip).unwrap_or(usize::MAX),
            max_devices_per_ip: usize::try_from(config.ws_max_device_connections_per_ip)
                .unwrap_or(usize::MAX),
            frames_per_sec: config.rate_limit_messages_per_sec,
            ping_interval: config.ws_ping_interval.0,
            write_coalesce: config.ws_write_coalesce.0,
            max_reply_bytes: usize::try_from(config.ws_max_reply_bytes).unwrap_or(usize::MAX),
            require_admin_mfa: config.require_admin_mfa,
            ipv6_prefix: u8::try_from(config.rate_limit_ipv6_prefix).unwrap_or(128),
            order: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &WsMetrics {
        &self.metrics
    }

    /// Admits a new connection under the per-address and per-user limits.
    pub fn admit(
        &self,
        ip: Option<std::net::IpAddr>,
        user: UserId,
    ) -> Result<hub::Reservation, Refused> {
        self.admit_key(ip, &user.to_string(), false)
    }

    /// Admits a device's new connection under the per-address limits of devices
    /// (`ws_max_device_connections_per_ip`, `rate_limit_device_ip_per_minute`, apart from
    /// people's) and, per device, the per-user one.
    pub fn admit_device(
        &self,
        ip: Option<std::net::IpAddr>,
        device: Uuid,
    ) -> Result<hub::Reservation, Refused> {
        self.admit_key(ip, &format!("device:{device}"), true)
    }

    /// The limits of a new connection; admitted, it holds its place among its network's
    /// connections until it registers (the [`hub::Reservation`], to pass to the hub).
    fn admit_key(
        &self,
        ip: Option<std::net::IpAddr>,
        key: &str,
        device: bool,
    ) -> Result<hub::Reservation, Refused> {
        let now = self.now();
        let refuse = |scope: &'static str, retry_after: i64| {
            self.metrics.limited(scope);
            Refused { scope, retry_after }
        };
        let (most, window) = if device {
            (self.max_devices_per_ip, &self.device_conn_per_ip)
        } else {
            (self.max_per_ip, &self.conn_per_ip)
        };
        // An IPv6 client counts as its network (`rate_limit_ipv6_prefix`), as for logins; the
        // place is held from here, so that handshakes under way count too.
        let reservation = self
            .hub
            .reserve(ip, device, most)
            .ok_or_else(|| refuse("concurrent", 1))?;
        if let Some(ip) = ip {
            window
                .try_acquire(&address_key(ip, self.ipv6_prefix), now)
                .map_err(|secs| refuse("ip", secs))?;
        }
        self.conn_per_user
            .try_acquire(key, now)
            .map_err(|secs| refuse("user", secs))?;
        Ok(reservation)
    }

    /// Admits an HTTP publish under the per-user limit (`rate_limit_messages_per_sec`).
    pub fn admit_publish(&self, user: UserId) -> Result<(), Refused> {
        self.publish_per_user
            .try_acquire(&user.to_string(), self.now())
            .map(drop)
            .map_err(|retry_after| {
                self.metrics.limited("publish");
                Refused {
                    scope: "publish",
                    retry_after,
                }
            })
    }

    /// Full-text search over the rooms the caller belongs to, best first.
    pub async fn search(
        &self,
        who: &Principal,
        query: &str,
        room: Option<Uuid>,
        limit: Option<u32>,
    ) -> Result<Vec<SearchHit>, ChatError> {
        if query.is_empty() || query.chars().count() > 200 {
            return Err(ChatError::Invalid(
                "q",
                "invalid_length",
                "a search has 1 to 200 characters".into(),
            ));
        }
        if forbidden_control(query, Controls::None).is_some() {
            return Err(ChatError::Invalid(
                "q",
                "invalid_characters",
                "a search has no control characters".into(),
            ));
        }
        let limit = limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ChatError::Invalid(
                "limit",
                "out_of_range",
                "limit is between 1 and 100".into(),
            ));
        }
        if let Some(room) = room {
            self.visible_room(who, room).await?;
        }
        Ok(self
            .store
            .search_messages(who.user_id, query, room, limit)
            .await?)
    }

    /// The hub of live connections.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn now(&self) -> DateTime<Utc> {
        stored_now(&*self.clock)
    }

    /// Room retention as a background job: see [`retention`].
    pub fn retention_job(&self) -> retention::RetentionJob {
        retention::RetentionJob::new(Arc::clone(&self.store), Arc::clone(&self.clock))
    }

    /// The room and the caller's role; a private room the caller does not belong to is not
    /// found (unless the caller is a site admin).
    pub async fn visible_room(
        &self,
        who: &Principal,
        id: Uuid,
    ) -> Result<(RoomRecord, Option<RoomRole>), ChatError> {
        let (room, role) = match self.store.room_with_role(id, who.user_id).await {
            Ok(found) => found,
            Err(StoreError::NotFound { .. }) => return Err(ChatError::RoomNotFound),
            Err(e) => return Err(e.into()),
        };
        if room.visibility == Visibility::Private && role.is_none() && !self.admin_powers(who) {
            return Err(ChatError::RoomNotFound);
        }
        Ok((room, role))
    }

    /// Whether the caller may act as `needed` in the room (site admins always may).
    fn allowed(&self, who: &Principal, role: Option<RoomRole>, needed: RoomRole) -> bool {
        self.admin_powers(who) || role.is_some_and(|r| r >= needed)
    }

    /// Whether the caller may use site-admin powers here (`require_admin_mfa` holds an admin
    /// without a second factor to the rights of a member).
    fn admin_powers(&self, who: &Principal) -> bool {
        who.has_admin_powers(self.require_admin_mfa)
    }

    /// Creates a room; the caller becomes its owner.
    pub async fn create_room(
        &self,
        who: &Principal,
        name: &str,
        visibility: Visibility,
    ) -> Result<RoomRecord, ChatError> {
        let name = valid_name(name)?;
        let room = RoomRecord {
            id: Uuid::new_v4(),
            name,
            visibility,
            created_by: Some(who.user_id),
            created_at: self.now(),
            retention_max_age: None,
            retention_max_count: None,
        };
        self.store.create_room(&room, who.user_id).await?;
        Ok(room)
    }

    /// The rooms the caller can see.
    pub async fn rooms(&self, who: &Principal) -> Result<Vec<RoomListing>, ChatError> {
        Ok(self.store.visible_rooms(who.user_id).await?)
    }

    /// Changes a room (owners).
    pub async fn update_room(
        &self,
        who: &Principal,
        id: Uuid,
        mut change: RoomChange,
    ) -> Result<RoomRecord, ChatError> {
        let (_, role) = self.visible_room(who, id).await?;
        if !self.allowed(who, role, RoomRole::Owner) {
            return Err(ChatError::Forbidden);
        }
        if let Some(name) = &change.name {
            change.name = Some(valid_name(name)?);
        }
        for (field, value, most) in [
            (
                "/retention_max_age",
                change.retention_max_age.flatten(),
                MAX_RETENTION_AGE,
            ),
            (
                "/retention_max_count",
                change.retention_max_count.flatten(),
                MAX_RETENTION_COUNT,
            ),
        ] {
            if value.is_some_and(|v| !(1..=most).contains(&v)) {
                return Err(ChatError::Invalid(
                    field,
                    "out_of_range",
                    format!("must be between 1 and {most}"),
                ));
            }
        }
        Ok(self.store.update_room(id, &change).await?)
    }

    /// Deletes a room with its messages (owners).
    pub async fn delete_room(&self, who: &Principal, id: Uuid) -> Result<(), ChatError> {
        let (_, role) = self.visible_room(who, id).await?;
        if !self.allowed(who, role, RoomRole::Owner) {
            return Err(ChatError::Forbidden);
        }
        self.store.delete_room(id).await?;
        self.hub.forget_room(id);
        self.order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        Ok(())
    }

    /// The members of a room (anyone who may see it).
    pub async fn members(
        &self,
        who: &Principal,
        id: Uuid,
    ) -> Result<Vec<(UserId, RoomRole)>, ChatError> {
        self.visible_room(who, id).await?;
        Ok(self.store.members(id).await?)
    }

    /// Adds a member or changes their role: room admins add members, owners give any role.
    pub async fn put_member(
        &self,
        who: &Principal,
        id: Uuid,
        user: UserId,
        role: RoomRole,
    ) -> Result<(), ChatError> {
        let (_, mine) = self.visible_room(who, id).await?;
        let theirs = self.store.room_role(id, user).await?;
        // Room admins only add new members; changing anyone's role is the owners' (otherwise an
        // admin could demote an owner and then remove them).
        let needed = if role == RoomRole::Member && theirs.is_none() {
            RoomRole::Admin
        } else {
            RoomRole::Owner
        };
        if !self.allowed(who, mine, needed) {
            return Err(ChatError::Forbidden);
        }
        match self.store.user_by_id(user).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => return Err(ChatError::UserNotFound),
            Err(e) => return Err(e.into()),
        }
        if role != RoomRole::Owner && self.is_last_owner(id, user).await? {
            return Err(ChatError::LastOwner);
        }
        self.store.put_member(id, user, role, self.now()).await?;
        Ok(())
    }

    async fn is_last_owner(&self, room: Uuid, user: UserId) -> Result<bool, ChatError> {
        let members = self.store.members(room).await?;
        let owners: Vec<UserId> = members
            .iter()
            .filter(|(_, r)| *r == RoomRole::Owner)
            .map(|(u, _)| *u)
            .collect();
        Ok(owners == [user])
    }

    /// Removes a member: room admins remove members, owners anyone, and anyone themselves.
    pub async fn remove_member(
        &self,
        who: &Principal,
        id: Uuid,
        user: UserId,
    ) -> Result<(), ChatError> {
        let (_, mine) = self.visible_room(who, id).await?;
        let theirs = self.store.room_role(id, user).await?;
        let Some(theirs) = theirs else {
            return Err(ChatError::MemberNotFound);
        };
        let needed = if user == who.user_id {
            RoomRole::Member
        } else if theirs == RoomRole::Member {
            RoomRole::Admin
        } else {
            RoomRole::Owner
        };
        if !self.allowed(who, mine, needed) {
            return Err(ChatError::Forbidden);
        }
        if theirs == RoomRole::Owner && self.is_last_owner(id, user).await? {
            return Err(ChatError::LastOwner);
        }
        self.store.remove_member(id, user).await?;
        self.hub.unsubscribe_user(id, user);
        Ok(())
    }

    /// Joins a public room as a member.
    pub async fn join(&self, who: &Principal, id: Uuid) -> Result<RoomRole, ChatError> {
        let (room, role) = self.visible_room(who, id).await?;
        if let Some(role) = role {
            return Ok(role);
        }
        if room.visibility == Visibility::Private {
            return Err(ChatError::RoomNotFound);
        }
        self.store
            .put_member(id, who.user_id, RoomRole::Member, self.now())
            .await?;
        Ok(RoomRole::Member)
    }

    /// Stores a message once per `client_msg_id`; returns it and whether it is new. The caller
    /// acknowledges, then calls [`Chat::deliver`] for a new one: durable, acknowledged,
    /// broadcast, in that order.
    pub async fn post(
        &self,
        who: &Principal,
        id: Uuid,
        client_msg_id: &str,
        body: &str,
    ) -> Result<Posted, ChatError> {
        let item = NewMessage {
            client_msg_id,
            body,
        };
        let mut group = self.post_group(who, id, &[item]).await?;
        let (message, new) =
            group
                .outcomes
                .pop()
                .unwrap_or(Err(ChatError::Store(StoreError::NotFound {
                    entity: "message",
                })))?;
        Ok(Posted {
            message,
            new,
            _order: group._order.take(),
        })
    }

    /// Like [`Chat::post`] for several messages of one sender to one room, stored with one
    /// statement (group commit) under one order lock: a connection that sent a burst pays
    /// one authorisation check and one store call for all of it. An item that is not valid is
    /// refused on its own; the others are stored in order. An error of the room (not found,
    /// not a member, the store failing) refuses the whole group.
    pub async fn post_group(
        &self,
        who: &Principal,
        id: Uuid,
        items: &[NewMessage<'_>],
    ) -> Result<PostedGroup, ChatError> {
        let checks: Vec<Result<(), ChatError>> = items.iter().map(valid_message).collect();
        let valid: Vec<NewMessage<'_>> = items
            .iter()
            .zip(&checks)
            .filter(|(_, check)| check.is_ok())
            .map(|(item, _)| *item)
            .collect();
        let mut stored = Vec::new().into_iter();
        let mut order = None;
        if !valid.is_empty() {
            let (_, role) = self.visible_room(who, id).await?;
            if role.is_none() {
                // Readers of a public room join it before they post.
                return Err(ChatError::Forbidden);
            }
            let lock = Arc::clone(
                self.order
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(id)
                    .or_default(),
            );
            order = Some(lock.lock_owned().await);
            stored = self
                .store
                .append_messages(id, who.user_id, &valid, self.now())
                .await?
                .into_iter();
        }
        let outcomes = checks
            .into_iter()
            .map(|check| {
                check?;
                stored
                    .next()
                    .ok_or(ChatError::Store(StoreError::NotFound { entity: "message" }))
            })
            .collect();
        Ok(PostedGroup {
            outcomes,
            _order: order,
        })
    }

    /// Delivers a newly stored message to the room's connections.
    pub fn deliver(&self, message: &MessageRecord) {
        self.hub.broadcast_message(
            message.room_id,
            &ServerFrame::Message(message_data(message.clone())),
            Some(message.id),
        );
    }

    /// Messages of a room in a range, oldest first (anyone who may see the room), read no
    /// further than `max_bytes` of bodies allow (see [`MessageRange::max_bytes`]).
    pub async fn history(
        &self,
        who: &Principal,
        id: Uuid,
        before: Option<i64>,
        after: Option<i64>,
        limit: Option<u32>,
        max_bytes: usize,
    ) -> Result<Vec<MessageRecord>, ChatError> {
        let limit = limit.unwrap_or(DEFAULT_HISTORY);
        if !(1..=MAX_HISTORY).contains(&limit) {
            return Err(ChatError::Invalid(
                "limit",
                "out_of_range",
                format!("limit is between 1 and {MAX_HISTORY}"),
            ));
        }
        self.visible_room(who, id).await?;
        Ok(self
            .store
            .messages(
                id,
                MessageRange {
                    before,
                    after,
                    limit,
                    max_bytes: Some(max_bytes),
                },
            )
            .await?)
    }

    /// A page of a room's history as the wire carries it, cut to `ws_max_reply_bytes` encoded
    /// bytes (keeping at least one message, the one nearest the cursor); says whether it was
    /// cut. What `history` answers over WebSocket and HTTP alike.
    pub async fn history_page(
        &self,
        who: &Principal,
        id: Uuid,
        before: Option<i64>,
        after: Option<i64>,
        limit: Option<u32>,
    ) -> Result<(Vec<MessageData>, bool), ChatError> {
        let records = self
            .history(who, id, before, after, limit, self.max_reply_bytes)
            .await?;
        let mut messages: Vec<MessageData> = records.into_iter().map(message_data).collect();
        let (more, _) = session::fit(&mut messages, self.max_reply_bytes, after.is_none());
        Ok((messages, more))
    }
}

/// The clock's time at the store's precision (microseconds).
fn stored_now(clock: &dyn Clock) -> DateTime<Utc> {
    let now = clock.now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

fn valid_name(name: &str) -> Result<String, ChatError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_ROOM_NAME {
        return Err(ChatError::Invalid(
            "/name",
            "invalid_length",
            format!("a room name has 1 to {MAX_ROOM_NAME} characters"),
        ));
    }
    if forbidden_control(name, Controls::None).is_some() {
        return Err(ChatError::Invalid(
            "/name",
            "invalid_characters",
            "a room name has no control characters".into(),
        ));
    }
    Ok(name.to_owned())
}
