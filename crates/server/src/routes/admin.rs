//! Admin endpoints: users and the audit log. Every handler takes `Auth<Admin>`.

use axum::Json as JsonResponse;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use unhidra_core::{Role, UserId};
use unhidra_store::identity::UserChange;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx};
use crate::http::extract::{Json, Query};
use crate::identity::{BulkAction, BulkSummary, UserView};
use crate::state::AppState;

/// The largest page of a list.
const MAX_PAGE_SIZE: u64 = 200;
const DEFAULT_PAGE_SIZE: u64 = 50;
/// The last page number accepted; deeper pages are found by searching.
const MAX_PAGE: u64 = 1_000_000;

/// `?q=&page=&page_size=` of admin lists.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// Matches email or display name, case-insensitively; at most 200 characters, no control
    /// characters.
    #[param(
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    q: Option<String>,
    /// 1-based page number.
    #[param(minimum = 1, maximum = 1_000_000)]
    page: Option<u64>,
    /// Items per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    page_size: Option<u64>,
}

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T> {
    items: Vec<T>,
    page: u64,
    page_size: u64,
    total: u64,
}

fn page_params(page: Option<u64>, page_size: Option<u64>) -> Result<(u64, u64), ApiError> {
    let mut errors = Vec::new();
    let page = page.unwrap_or(1);
    if !(1..=MAX_PAGE).contains(&page) {
        errors.push(FieldError::new(
            "page",
            "out_of_range",
            format!("page is between 1 and {MAX_PAGE}"),
        ));
    }
    let size = page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        errors.push(FieldError::new(
            "page_size",
            "out_of_range",
            format!("page_size is between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    if errors.is_empty() {
        Ok((page, size))
    } else {
        Err(ApiError::validation(errors))
    }
}

/// Users, oldest first, filtered by `q`.
#[utoipa::path(get, path = "/api/v1/auth/users", tag = "admin", security(("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "A page of users", body = Page<UserView>),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    _: Auth<Admin>,
    Query(params): Query<ListParams>,
) -> Result<JsonResponse<Page<UserView>>, ApiError> {
    let (page, page_size) = page_params(params.page, params.page_size)?;
    let query = params.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    if let Some(q) = query {
        let problem = if q.chars().count() > 200 {
            Some(("invalid_length", "a search has at most 200 characters"))
        } else if unhidra_core::forbidden_control(q, unhidra_core::Controls::None).is_some() {
            Some(("invalid_characters", "a search has no control characters"))
        } else {
            None
        };
        if let Some((code, message)) = problem {
            return Err(ApiError::validation(vec![FieldError::new(
                "q", code, message,
            )]));
        }
    }
    let (items, total) = state.identity().list_users(query, page, page_size).await?;
    Ok(JsonResponse(Page {
        items,
        page,
        page_size,
        total,
    }))
}

/// A role, as the API spells it.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RoleName {
    User,
    Admin,
}

impl From<RoleName> for Role {
    fn from(name: RoleName) -> Self {
        match name {
            RoleName::User => Role::User,
            RoleName::Admin => Role::Admin,
        }
    }
}

/// What an admin changes about a user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserPatch {
    /// `user` or `admin`.
    role: Option<RoleName>,
    /// `false` deactivates the user and ends their sessions.
    active: Option<bool>,
}

pub(super) fn user_id(raw: &str) -> Result<UserId, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("user"))
}

/// Changes a user's role or activation.
#[utoipa::path(patch, path = "/api/v1/admin/users/{id}", tag = "admin",
    security(("bearer" = [])), request_body = UserPatch,
    params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "The user as it now is", body = UserView),
        (status = 404, description = "No such user", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "An admin cannot demote or deactivate themselves",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn update_user(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    Json(patch): Json<UserPatch>,
) -> Result<JsonResponse<UserView>, ApiError> {
    let id = user_id(&id)?;
    let role = patch.role.map(Role::from);
    let before = match role {
        Some(_) => state.store().user_by_id(id).await.ok().map(|u| u.role),
        None => None,
    };
    let change = UserChange {
        role,
        active: patch.active,
    };
    let view = state
        .identity()
        .update_user(&admin, id, change, &ctx)
        .await?;
    // A live connection acts with the role it had when it connected: a changed role closes
    // the user's connections (4003), and they reconnect with the role stored now.
    if role.is_some() && role != before {
        state
            .chat()
            .hub()
            .close_user(id, unhidra_protocol::close::REVOKED, "role changed");
    }
    Ok(JsonResponse(view))
}

/// One action on many users.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkBody {
    /// User ids, at most 1000.
    #[schema(max_items = 1000)]
    ids: Vec<String>,
    /// `activate`, `deactivate` or `unlock`.
    action: BulkAction,
}

/// Most ids one bulk request may name.
const MAX_BULK: usize = 1000;

/// Activates, deactivates or unlocks many users; says which changed.
#[utoipa::path(post, path = "/api/v1/admin/users/bulk", tag = "admin",
    security(("bearer" = [])), request_body = BulkBody,
    responses(
        (status = 200, description = "What happened to each id", body = BulkSummary),
        (status = 422, description = "Too many ids or an unknown action", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn bulk(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Json(body): Json<BulkBody>,
) -> Result<JsonResponse<BulkSummary>, ApiError> {
    if body.ids.len() > MAX_BULK {
        return Err(ApiError::validation(vec![FieldError::new(
            "/ids",
            "too_many",
            format!("at most {MAX_BULK} ids per request"),
        )]));
    }
    Ok(JsonResponse(
        state
            .identity()
            .bulk(&admin, &body.ids, body.action, &ctx)
            .await?,
    ))
}

/// `?limit=&before=` of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogParams {
    /// Events per page, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// Only events older than this id (the `next_before` of the previous page).
    before: Option<i64>,
}

/// A recorded security event.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditView {
    id: i64,
    at: chrono::DateTime<chrono::Utc>,
    kind: String,
    actor_id: Option<String>,
    subject_id: Option<String>,
    ip: Option<String>,
    trace_id: Option<String>,
    #[schema(value_type = Object)]
    detail: serde_json::Value,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditPage {
    items: Vec<AuditView>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    next_before: Option<i64>,
}

/// The newest security events first.
#[utoipa::path(get, path = "/api/v1/admin/logs", tag = "admin", security(("bearer" = [])),
    params(LogParams),
    responses(
        (status = 200, description = "Events, newest first", body = AuditPage),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn logs(
    State(state): State<AppState>,
    _: Auth<Admin>,
    Query(params): Query<LogParams>,
) -> Result<JsonResponse<AuditPage>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "out_of_range",
            "limit is between 1 and 500",
        )]));
    }
    let events = state.store().audit_events(params.before, limit).await?;
    let next_before = (events.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(JsonResponse(AuditPage {
        items: events
            .into_iter()
            .map(|e| AuditView {
                id: e.id,
                at: e.at,
                kind: e.kind,
                actor_id: e.actor_id.map(|u| u.to_string()),
                subject_id: e.subject_id,
                ip: e.ip,
                trace_id: e.trace_id,
                detail: serde_json::from_str(&e.detail).unwrap_or(serde_json::Value::Null),
            })
            .collect(),
        next_before,
    }))
}

/// A signing key, without its private part.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyView {
    kid: String,
    algorithm: String,
    created_at: chrono::DateTime<chrono::Utc>,
    retired_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether this key signs new tokens on this server now.
    signing: bool,
}

/// The keys that sign and verify access tokens, oldest first.
#[utoipa::path(get, path = "/api/v1/admin/keys", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Keys", body = [KeyView])))]
pub(crate) async fn keys(
    State(state): State<AppState>,
    _: Auth<Admin>,
) -> Result<JsonResponse<Vec<KeyView>>, ApiError> {
    let signing = state.identity().keys().signing_kid();
    let keys = state.store().signing_keys().await?;
    Ok(JsonResponse(
        keys.into_iter()
            .map(|k| KeyView {
                signing: k.kid == signing,
                kid: k.kid,
                algorithm: k.algorithm,
                created_at: k.created_at,
                retired_at: k.retired_at,
            })
            .collect(),
    ))
}

/// Generates a new signing key; this server signs with it at once, others within a minute.
/// Tokens signed before keep working until their key is retired.
#[utoipa::path(post, path = "/api/v1/admin/keys/rotate", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new key", body = KeyView),
        (status = 409, description = "The signing key comes from the configuration", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn rotate_key(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
) -> Result<(axum::http::StatusCode, JsonResponse<KeyView>), ApiError> {
    let kid = state.identity().rotate_key(&admin, &ctx).await?;
    let key = state
        .store()
        .signing_keys()
        .await?
        .into_iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| ApiError::not_found("signing key"))?;
    Ok((
        axum::http::StatusCode::CREATED,
        JsonResponse(KeyView {
            signing: true,
            kid: key.kid,
            algorithm: key.algorithm,
            created_at: key.created_at,
            retired_at: key.retired_at,
        }),
    ))
}

/// Retires a key: tokens it signed are refused from then on. The signing key cannot be retired.
#[utoipa::path(post, path = "/api/v1/admin/keys/{kid}/retire", tag = "admin",
    security(("bearer" = [])),
    params(("kid" = String, Path, description = "Key id")),
    responses(
        (status = 204, description = "Retired"),
        (status = 404, description = "No such key", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "The key signs now", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn retire_key(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(kid): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    state.identity().retire_key(&admin, &kid, &ctx).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
