//! `/api/v1/rooms/*`: rooms, members, messages and presence over HTTP, and the admin view of
//! live connections. Every handler checks the caller's right to the room through `Chat`.

use axum::Json as JsonResponse;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use unhidra_core::UserId;
use unhidra_protocol::close;
use unhidra_store::rooms::{RoomChange, RoomRecord, RoomRole, Visibility};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth};
use crate::http::extract::{Json, Query};
use crate::state::AppState;
use unhidra_chat::hub::ConnectionInfo;
use unhidra_chat::{ChatError, message_data};

impl From<ChatError> for ApiError {
    fn from(err: ChatError) -> Self {
        match err {
            ChatError::RoomNotFound => Self::not_found("room"),
            ChatError::MemberNotFound => Self::not_found("member"),
            ChatError::UserNotFound => Self::validation(vec![FieldError::new(
                "/user_id",
                "unknown_user",
                "no such user",
            )]),
            ChatError::Forbidden => Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Your role in this room does not allow this.",
            )
            .into(),
            ChatError::Invalid(field, code, message) => {
                Self::validation(vec![FieldError::new(field, code, message)])
            }
            ChatError::LastOwner => Problem::new(
                StatusCode::CONFLICT,
                "last_owner",
                "A room keeps at least one owner; make someone else owner first.",
            )
            .into(),
            ChatError::Busy => Problem::new(
                StatusCode::CONFLICT,
                "busy",
                "The room's members are changing; try again.",
            )
            .into(),
            ChatError::Store(e) => e.into(),
        }
    }
}

/// Who may see a room, as the API spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum VisibilityName {
    Public,
    Private,
}

impl From<VisibilityName> for Visibility {
    fn from(v: VisibilityName) -> Self {
        match v {
            VisibilityName::Public => Self::Public,
            VisibilityName::Private => Self::Private,
        }
    }
}

/// A member's role, as the API spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RoomRoleName {
    Member,
    Admin,
    Owner,
}

impl From<RoomRoleName> for RoomRole {
    fn from(r: RoomRoleName) -> Self {
        match r {
            RoomRoleName::Member => Self::Member,
            RoomRoleName::Admin => Self::Admin,
            RoomRoleName::Owner => Self::Owner,
        }
    }
}

/// A room as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RoomView {
    id: String,
    name: String,
    /// `public` or `private`.
    visibility: &'static str,
    created_by: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    retention_max_age: Option<i64>,
    retention_max_count: Option<i64>,
    /// The caller's role, if a member.
    role: Option<&'static str>,
}

fn view(room: &RoomRecord, role: Option<RoomRole>) -> RoomView {
    RoomView {
        id: room.id.to_string(),
        name: room.name.clone(),
        visibility: room.visibility.as_str(),
        created_by: room.created_by.map(|u| u.to_string()),
        created_at: room.created_at,
        retention_max_age: room.retention_max_age,
        retention_max_count: room.retention_max_count,
        role: role.map(RoomRole::as_str),
    }
}

fn room_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("room"))
}

/// A new room.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewRoomBody {
    /// 1–100 characters, no control characters, not only spaces.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069][^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    name: String,
    visibility: VisibilityName,
}

/// Creates a room; the caller becomes its owner.
#[utoipa::path(post, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = [])),
    request_body = NewRoomBody,
    responses((status = 201, description = "Created", body = RoomView)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Json(body): Json<NewRoomBody>,
) -> Result<(StatusCode, JsonResponse<RoomView>), ApiError> {
    let room = state
        .chat()
        .create_room(&who, &body.name, body.visibility.into())
        .await?;
    Ok((
        StatusCode::CREATED,
        JsonResponse(view(&room, Some(RoomRole::Owner))),
    ))
}

/// The rooms the caller can see: public ones, and private ones they belong to.
#[utoipa::path(get, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = [])),
    responses((status = 200, description = "Rooms by name", body = [RoomView])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
) -> Result<JsonResponse<Vec<RoomView>>, ApiError> {
    let rooms = state.chat().rooms(&who).await?;
    Ok(JsonResponse(
        rooms.iter().map(|l| view(&l.room, l.role)).collect(),
    ))
}

/// One room.
#[utoipa::path(get, path = "/api/v1/rooms/{id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "Room id")),
    responses((status = 200, description = "The room", body = RoomView)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<RoomView>, ApiError> {
    let (room, role) = state.chat().visible_room(&who, room_id(&id)?).await?;
    Ok(JsonResponse(view(&room, role)))
}

/// Changes to a room.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoomPatch {
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069][^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    name: Option<String>,
    visibility: Option<VisibilityName>,
    /// Seconds a message is kept; `null` keeps them forever.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 3_153_600_000_i64)]
    retention_max_age: Option<Option<i64>>,
    /// Newest messages kept; `null` keeps all.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1_000_000_000_i64)]
    retention_max_count: Option<Option<i64>>,
}

/// A whole number that may be absent (unchanged), `null` (cleared) or a value. JSON Schema
/// counts `5.0` as an integer, so an integral float is taken too.
fn present<'de, D>(deserializer: D) -> Result<Option<Option<i64>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = Option::<serde_json::Number>::deserialize(deserializer)?;
    let Some(number) = value else {
        return Ok(Some(None));
    };
    #[allow(
        clippy::cast_possible_truncation,
        reason = "only integral floats within the i64 range get here"
    )]
    let whole = number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    });
    whole.map(|n| Some(Some(n))).ok_or_else(|| {
        serde::de::Error::custom(format!("invalid type: {number}, expected a whole number"))
    })
}

/// Changes a room (owners).
#[utoipa::path(patch, path = "/api/v1/rooms/{id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "Room id")), request_body = RoomPatch,
    responses((status = 200, description = "The room as it now is", body = RoomView)))]
pub(crate) async fn update(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Json(patch): Json<RoomPatch>,
) -> Result<JsonResponse<RoomView>, ApiError> {
    let id = room_id(&id)?;
    let change = RoomChange {
        name: patch.name,
        visibility: patch.visibility.map(Visibility::from),
        retention_max_age: patch.retention_max_age,
        retention_max_count: patch.retention_max_count,
    };
    let room = state.chat().update_room(&who, id, change).await?;
    let (_, role) = state.chat().visible_room(&who, id).await?;
    Ok(JsonResponse(view(&room, role)))
}

/// Deletes a room with its messages (owners).
#[utoipa::path(delete, path = "/api/v1/rooms/{id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "Room id")),
    responses((status = 204, description = "Deleted")))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.chat().delete_room(&who, room_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A member and their role.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemberBody {
    user_id: String,
    role: RoomRoleName,
}

/// The members of a room.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/members", tag = "rooms",
    security(("bearer" = [])), params(("id" = String, Path, description = "Room id")),
    responses((status = 200, description = "Members", body = [MemberBody])))]
pub(crate) async fn members(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<Vec<serde_json::Value>>, ApiError> {
    let members = state.chat().members(&who, room_id(&id)?).await?;
    Ok(JsonResponse(
        members
            .into_iter()
            .map(|(u, r)| serde_json::json!({ "user_id": u.to_string(), "role": r.as_str() }))
            .collect(),
    ))
}

/// Adds a member or changes their role (room admins add members; owners give any role).
#[utoipa::path(post, path = "/api/v1/rooms/{id}/members", tag = "rooms",
    security(("bearer" = [])), params(("id" = String, Path, description = "Room id")),
    request_body = MemberBody, responses((status = 204, description = "Done")))]
pub(crate) async fn put_member(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Json(body): Json<MemberBody>,
) -> Result<StatusCode, ApiError> {
    let user: UserId = body
        .user_id
        .parse()
        .map_err(|_| ApiError::from(ChatError::UserNotFound))?;
    state
        .chat()
        .put_member(&who, room_id(&id)?, user, body.role.into())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a member (room admins remove members, owners anyone, anyone themselves).
#[utoipa::path(delete, path = "/api/v1/rooms/{id}/members/{user_id}", tag = "rooms",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Room id"),
        ("user_id" = String, Path, description = "User id")),
    responses((status = 204, description = "Removed")))]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let user: UserId = user.parse().map_err(|_| ApiError::not_found("member"))?;
    state
        .chat()
        .remove_member(&who, room_id(&id)?, user)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Joins a public room as a member.
#[utoipa::path(post, path = "/api/v1/rooms/{id}/join", tag = "rooms",
    security(("bearer" = [])), params(("id" = String, Path, description = "Room id")),
    responses((status = 204, description = "A member now")))]
pub(crate) async fn join(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.chat().join(&who, room_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Leaves a room.
#[utoipa::path(post, path = "/api/v1/rooms/{id}/leave", tag = "rooms",
    security(("bearer" = [])), params(("id" = String, Path, description = "Room id")),
    responses((status = 204, description = "Left")))]
pub(crate) async fn leave(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user = who.user_id;
    state
        .chat()
        .remove_member(&who, room_id(&id)?, user)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A message to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishBody {
    /// The text, 1 to 16,384 characters; of the control characters only tab and line breaks.
    #[schema(
        min_length = 1,
        max_length = 16384,
        pattern = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$"
    )]
    body: String,
    /// The publisher's id for it; a retry with the same id is stored once. No control
    /// characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    client_msg_id: String,
}

/// A stored message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageView {
    room: String,
    id: i64,
    sender: String,
    body: String,
    /// Unix milliseconds.
    ts: i64,
}

impl From<unhidra_protocol::MessageData> for MessageView {
    fn from(m: unhidra_protocol::MessageData) -> Self {
        Self {
            room: m.room,
            id: m.id,
            sender: m.sender,
            body: m.body,
            ts: m.ts,
        }
    }
}

/// Publishes a message, as a WebSocket `send` does: stored, then delivered to the room.
#[utoipa::path(post, path = "/api/v1/rooms/{id}/messages", tag = "rooms",
    security(("bearer" = [])), params(("id" = String, Path, description = "Room id")),
    request_body = PublishBody,
    responses(
        (status = 201, description = "Stored and delivered", body = MessageView),
        (status = 200, description = "Stored before with this client_msg_id", body = MessageView),
        (status = 429, description = "More than `rate_limit_messages_per_sec` publishes a second by this user",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn publish(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Json(body): Json<PublishBody>,
) -> Result<(StatusCode, JsonResponse<MessageView>), ApiError> {
    let chat = state.chat();
    chat.admit_publish(who.user_id)
        .map_err(|refused| crate::error::rate_limited(refused, "messages"))?;
    let posted = chat
        .post(&who, room_id(&id)?, &body.client_msg_id, &body.body)
        .await?;
    if posted.new {
        chat.deliver(&posted.message);
    }
    let status = if posted.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, JsonResponse(message_data(posted.message).into())))
}

/// `?before=&after=&limit=` of a room's history.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryParams {
    /// Only messages with a smaller id.
    before: Option<i64>,
    /// Only messages with a larger id.
    after: Option<i64>,
    /// 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

/// A page of history, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HistoryPage {
    items: Vec<MessageView>,
    /// The page was cut short of `limit` to stay within `ws_max_reply_bytes`: ask again from
    /// its first (or, paging forwards with `after`, its last) message.
    more: bool,
}

/// A room's messages: the newest (or those before `before`, or after `after`), oldest first.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/messages", tag = "rooms",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Room id"), HistoryParams),
    responses((status = 200, description = "Messages", body = HistoryPage)))]
pub(crate) async fn history(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Query(params): Query<HistoryParams>,
) -> Result<JsonResponse<HistoryPage>, ApiError> {
    let (messages, more) = state
        .chat()
        .history_page(
            &who,
            room_id(&id)?,
            params.before,
            params.after,
            params.limit,
        )
        .await?;
    Ok(JsonResponse(HistoryPage {
        items: messages.into_iter().map(MessageView::from).collect(),
        more,
    }))
}

/// Who is online in a room.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresenceView {
    /// Users with a connection listening to the room.
    online: Vec<String>,
}

/// Who is online in a room now (on this server).
#[utoipa::path(get, path = "/api/v1/rooms/{id}/presence", tag = "rooms",
    security(("bearer" = [])), params(("id" = String, Path, description = "Room id")),
    responses((status = 200, description = "Online users", body = PresenceView)))]
pub(crate) async fn presence(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<PresenceView>, ApiError> {
    let id = room_id(&id)?;
    state.chat().visible_room(&who, id).await?;
    Ok(JsonResponse(PresenceView {
        online: state
            .chat()
            .hub()
            .online(id)
            .into_iter()
            .map(|u| u.to_string())
            .collect(),
    }))
}

/// Every live WebSocket connection on this server.
#[utoipa::path(get, path = "/api/v1/admin/connections", tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Connections", body = [ConnectionInfo])))]
pub(crate) async fn connections(
    State(state): State<AppState>,
    _: Auth<Admin>,
) -> JsonResponse<Vec<ConnectionInfo>> {
    JsonResponse(state.chat().hub().connections())
}

/// Closes a connection with close code 4003.
#[utoipa::path(delete, path = "/api/v1/admin/connections/{id}", tag = "admin",
    security(("bearer" = [])), params(("id" = String, Path, description = "Connection id")),
    responses((status = 204, description = "Closing")))]
pub(crate) async fn close_connection(
    State(state): State<AppState>,
    _: Auth<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id.parse().map_err(|_| ApiError::not_found("connection"))?;
    if state
        .chat()
        .hub()
        .close(id, close::REVOKED, "closed by an administrator")
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("connection"))
    }
}

/// `?q=&room=&limit=` of a search.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchParams {
    /// The words to find (all of them), 1–200 characters, no control characters.
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    q: String,
    /// Only this room.
    room: Option<String>,
    /// 1–100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// A message found by search.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SearchHitView {
    room: String,
    id: i64,
    sender: String,
    body: String,
    /// Unix milliseconds.
    ts: i64,
    /// Part of the text as HTML: the message's own text escaped, the matches wrapped in
    /// `<mark>` and `</mark>`.
    snippet: String,
    /// Higher is a better match.
    score: f64,
}

/// The search results.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SearchResults {
    items: Vec<SearchHitView>,
}

/// Full-text search over the messages of the rooms the caller belongs to, best match first.
#[utoipa::path(get, path = "/api/v1/search/messages", tag = "rooms",
    security(("bearer" = [])), params(SearchParams),
    responses((status = 200, description = "Matches", body = SearchResults)))]
pub(crate) async fn search(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Query(params): Query<SearchParams>,
) -> Result<JsonResponse<SearchResults>, ApiError> {
    let room = match params.room.as_deref() {
        Some(raw) => Some(room_id(raw)?),
        None => None,
    };
    let hits = state
        .chat()
        .search(&who, &params.q, room, params.limit)
        .await?;
    Ok(JsonResponse(SearchResults {
        items: hits
            .into_iter()
            .map(|h| {
                let m = message_data(h.message);
                SearchHitView {
                    room: m.room,
                    id: m.id,
                    sender: m.sender,
                    body: m.body,
                    ts: m.ts,
                    snippet: h.snippet,
                    score: h.score,
                }
            })
            .collect(),
    }))
}
