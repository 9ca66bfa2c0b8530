//! Storage of rooms, their members and their messages.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use unhidra_core::UserId;
use uuid::Uuid;

use crate::StoreError;

/// Who may see a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Anyone signed in may see, join and read it.
    Public,
    /// Only members.
    Private,
}

impl Visibility {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "public" => Ok(Self::Public),
            "private" => Ok(Self::Private),
            other => Err(StoreError::Other(
                format!("stored visibility {other:?}").into(),
            )),
        }
    }
}

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RoomRole {
    /// Posts and reads.
    Member,
    /// Also adds and removes members.
    Admin,
    /// Also changes and deletes the room.
    Owner,
}

impl RoomRole {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "member" => Ok(Self::Member),
            "admin" => Ok(Self::Admin),
            "owner" => Ok(Self::Owner),
            other => Err(StoreError::Other(
                format!("stored room role {other:?}").into(),
            )),
        }
    }
}

/// A stored room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Who may see it.
    pub visibility: Visibility,
    /// Who created it.
    pub created_by: Option<UserId>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Messages older than this many seconds are deleted.
    pub retention_max_age: Option<i64>,
    /// Only this many newest messages are kept.
    pub retention_max_count: Option<i64>,
}

/// A room and the caller's role in it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomListing {
    /// The room.
    pub room: RoomRecord,
    /// The caller's role; `None` for a public room they have not joined.
    pub role: Option<RoomRole>,
}

/// Changes to a room; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomChange {
    /// A new name.
    pub name: Option<String>,
    /// A new visibility.
    pub visibility: Option<Visibility>,
    /// New retention by age (`Some(None)` clears it).
    pub retention_max_age: Option<Option<i64>>,
    /// New retention by count (`Some(None)` clears it).
    pub retention_max_count: Option<Option<i64>>,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Increasing id.
    pub id: i64,
    /// The room.
    pub room_id: Uuid,
    /// Who sent it.
    pub sender_id: UserId,
    /// The sender's id for it.
    pub client_msg_id: String,
    /// The text.
    pub body: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// A message to store: the sender's id for it and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewMessage<'a> {
    /// The sender's id for it (a retry carries the same one).
    pub client_msg_id: &'a str,
    /// The text.
    pub body: &'a str,
}

/// Puts the answer of a group insert in the order of `items`: `inserted` are the rows the
/// insert returned, `earlier` those stored before under the other ids. The first item with an
/// inserted id is new; a repeat of it later in `items` is not.
pub(crate) fn in_item_order(
    items: &[NewMessage<'_>],
    inserted: Vec<MessageRecord>,
    earlier: Vec<MessageRecord>,
) -> Result<Vec<(MessageRecord, bool)>, StoreError> {
    let inserted: std::collections::HashMap<String, MessageRecord> = inserted
        .into_iter()
        .map(|m| (m.client_msg_id.clone(), m))
        .collect();
    let earlier: std::collections::HashMap<String, MessageRecord> = earlier
        .into_iter()
        .map(|m| (m.client_msg_id.clone(), m))
        .collect();
    let mut announced = std::collections::HashSet::new();
    items
        .iter()
        .map(|item| {
            if let Some(m) = inserted.get(item.client_msg_id) {
                Ok((m.clone(), announced.insert(item.client_msg_id)))
            } else {
                earlier
                    .get(item.client_msg_id)
                    .map(|m| (m.clone(), false))
                    .ok_or(StoreError::NotFound { entity: "message" })
            }
        })
        .collect()
}

/// The `client_msg_id`s of `items` that the insert did not return.
pub(crate) fn not_inserted<'a>(
    items: &[NewMessage<'a>],
    inserted: &[MessageRecord],
) -> Vec<&'a str> {
    let mut ids: Vec<&str> = items
        .iter()
        .map(|item| item.client_msg_id)
        .filter(|id| !inserted.iter().any(|m| m.client_msg_id == *id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A message found by search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// The message.
    pub message: MessageRecord,
    /// A part of its text as HTML: the text escaped, matches wrapped in `<mark>` and `</mark>`.
    pub snippet: String,
    /// Higher is better.
    pub score: f64,
}

/// The words of a search, each quoted for FTS5 so that user input is never query syntax.
pub fn fts5_query(text: &str) -> Option<String> {
    let terms: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .take(16)
        .map(|t| format!("\"{t}\""))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

/// Which messages of a room to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRange {
    /// Only ids below.
    pub before: Option<i64>,
    /// Only ids above.
    pub after: Option<i64>,
    /// At most this many: the newest ones below `before`, or the oldest ones above `after`.
    pub limit: u32,
    /// Stop reading, from the cursor outward, at the first message that takes the bodies read
    /// past this many bytes (but not before two are read): a reply bounded in bytes asks for no
    /// more than it can hold, and still sees that there is more. `None` reads up to `limit`.
    pub max_bytes: Option<usize>,
}

/// Rooms, members and messages.
#[async_trait]
pub trait RoomStore {
    /// Creates a room with its creator as owner.
    async fn create_room(&self, room: &RoomRecord, owner: UserId) -> Result<(), StoreError>;

    /// The rooms a user can see (public ones and those they belong to), by name, with their role.
    async fn visible_rooms(&self, user: UserId) -> Result<Vec<RoomListing>, StoreError>;

    /// Changes a room and returns it as it now is.
    async fn update_room(&self, id: Uuid, change: &RoomChange) -> Result<RoomRecord, StoreError>;

    /// Deletes a room with its members and messages.
    async fn delete_room(&self, id: Uuid) -> Result<(), StoreError>;

    /// The room with this id and the user's role in it (if a member), in one query: what every
    /// frame's authorisation needs.
    async fn room_with_role(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<(RoomRecord, Option<RoomRole>), StoreError>;

    /// A user's role in a room, if they are a member.
    async fn room_role(&self, room: Uuid, user: UserId) -> Result<Option<RoomRole>, StoreError>;

    /// Adds a member, or changes their role.
    async fn put_member(
        &self,
        room: Uuid,
        user: UserId,
        role: RoomRole,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Removes a member; false if they were not one.
    async fn remove_member(&self, room: Uuid, user: UserId) -> Result<bool, StoreError>;

    /// The members and their roles, by role then join time.
    async fn members(&self, room: Uuid) -> Result<Vec<(UserId, RoomRole)>, StoreError>;

    /// Stores a message unless the sender stored one with this `client_msg_id` in this room
    /// already; returns the stored message and whether it is new.
    async fn append_message(
        &self,
        room: Uuid,
        sender: UserId,
        client_msg_id: &str,
        body: &str,
        now: DateTime<Utc>,
    ) -> Result<(MessageRecord, bool), StoreError> {
        let item = NewMessage {
            client_msg_id,
            body,
        };
        self.append_messages(room, sender, &[item], now)
            .await?
            .pop()
            .ok_or(StoreError::NotFound { entity: "message" })
    }

    /// Stores several messages of one sender in one room with one statement (group commit),
    /// their ids increasing in the order given; each is skipped if the sender stored one with
    /// its `client_msg_id` before (or earlier in `items`). Returns, in the order given, the
    /// stored message and whether it is new.
    async fn append_messages(
        &self,
        room: Uuid,
        sender: UserId,
        items: &[NewMessage<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<(MessageRecord, bool)>, StoreError>;

    /// Messages of a room in a range, oldest first.
    async fn messages(
        &self,
        room: Uuid,
        range: MessageRange,
    ) -> Result<Vec<MessageRecord>, StoreError>;

    /// Messages matching `query` in the rooms `user` belongs to (or in `room` only), best
    /// first, with a snippet where matches are wrapped in `<mark>` and `</mark>`.
    async fn search_messages(
        &self,
        user: UserId,
        query: &str,
        room: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<SearchHit>, StoreError>;

    /// Applies every room's retention; returns how many messages were deleted.
    async fn apply_retention(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// Marks the start of a match in the snippets the databases build (a private-use character,
/// so that the text itself can be escaped before the marks become HTML).
pub(crate) const MATCH_START: char = '\u{E000}';
/// Marks the end of a match.
pub(crate) const MATCH_END: char = '\u{E001}';

/// Turns a database snippet into safe HTML: every `<`, `>`, `&`, `"` and `'` of the message
/// escaped, and the match marks turned into balanced `<mark>…</mark>`. A message that itself
/// contains the private-use mark characters can at most highlight part of its own text.
pub(crate) fn snippet_html(raw: &str) -> String {
    let mut html = String::with_capacity(raw.len() + 16);
    let mut open = false;
    for c in raw.chars() {
        match c {
            MATCH_START if !open => {
                html.push_str("<mark>");
                open = true;
            }
            MATCH_END if open => {
                html.push_str("</mark>");
                open = false;
            }
            MATCH_START | MATCH_END => {}
            '<' => html.push_str("&lt;"),
            '>' => html.push_str("&gt;"),
            '&' => html.push_str("&amp;"),
            '"' => html.push_str("&quot;"),
            '\'' => html.push_str("&#39;"),
            c => html.push(c),
        }
    }
    if open {
        html.push_str("</mark>");
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_escaped_and_marks_balanced() {
        assert_eq!(
            snippet_html("a <b>\u{E000}deploy\u{E001}</b> & 'x' \"y\""),
            "a &lt;b&gt;<mark>deploy</mark>&lt;/b&gt; &amp; &#39;x&#39; &quot;y&quot;"
        );
        // Stray or nested marks (from the text itself) never unbalance the HTML.
        assert_eq!(
            snippet_html("\u{E001}a\u{E000}\u{E000}b"),
            "a<mark>b</mark>"
        );
        assert_eq!(snippet_html("plain"), "plain");
    }
}
