//! `/api/v1/files/*` and usage: uploads as the raw body (the name in `?name=`), streamed to
//! storage with the size capped as it streams; records, listings, access, deletion; the bytes
//! with ranges and entity tags, served so that nothing uploaded runs in Unhidra's origin.

use axum::Json as JsonResponse;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde::Deserialize;
use unhidra_media::{Access, FileLink, FilePage, FileView, FilesError, UsageView};
use unhidra_store::files::FileQuota;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::admin::user_id;
use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx, bearer};
use crate::http::extract::{Json, Query};
use crate::http::serve::{self, Plan};
use crate::state::AppState;

impl From<FilesError> for ApiError {
    fn from(err: FilesError) -> Self {
        let message = err.to_string();
        match err {
            FilesError::Forbidden => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", message).into()
            }
            FilesError::NotFound => Self::not_found("file"),
            FilesError::TooLarge(max) => ApiError::new(
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("A file has at most {max} bytes (files_max_bytes)."),
                )
                .with("max_bytes", max),
            ),
            FilesError::QuotaExceeded {
                max_bytes,
                max_files,
                usage,
            } => ApiError::new(
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded", message)
                    .with("max_bytes", max_bytes)
                    .with("max_files", max_files)
                    .with("used_bytes", usage.bytes)
                    .with("used_files", usage.files),
            ),
            FilesError::UnsupportedType(detected) => ApiError::new(
                Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_type",
                    format!("{message}: the accepted types are JPEG, PNG, GIF, WebP, TIFF, PDF and plain text, told from the content."),
                )
                .with("detected", detected),
            ),
            FilesError::TypeMismatch { detected, .. } => ApiError::new(
                Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "type_mismatch", message)
                    .with("detected", detected),
            ),
            FilesError::Name(e) => {
                let code = match e {
                    unhidra_media::names::NameError::Empty => "invalid_length",
                    unhidra_media::names::NameError::Executable(_) => "unsafe_name",
                };
                Self::validation(vec![FieldError::new("name", code, message)])
            }
            FilesError::Empty => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "empty_file", message).into(),
            FilesError::Invalid(field, code, _) => {
                Self::validation(vec![FieldError::new(field, code, message)])
            }
            FilesError::NotShared => {
                Problem::new(StatusCode::CONFLICT, "file_not_shared", message).into()
            }
            FilesError::LinkInvalid => {
                Problem::new(StatusCode::FORBIDDEN, "link_invalid", message).into()
            }
            FilesError::LinkExpired => {
                Problem::new(StatusCode::GONE, "link_expired", message).into()
            }
            FilesError::Busy => ApiError::new(
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "uploads_busy", message)
                    .with("retry_after", 2),
            ),
            FilesError::Io(e) => ApiError::internal(e),
            FilesError::Store(e) => e.into(),
        }
    }
}

/// How an upload is stored.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadParams {
    /// The file's name (sanitised: no path, no control characters, no extension that runs;
    /// its extension must be its content's type, and is added when missing).
    #[param(min_length = 1, max_length = 1000)]
    name: String,
    /// Who may download it (default `private`).
    #[serde(default)]
    access: Option<Access>,
}

/// Uploads a file: the raw body (its `Content-Type` is not believed: the type comes from the
/// content), streamed to storage and refused with 413 as soon as it passes `files_max_bytes`
/// or the uploader's quota. Nothing is kept of a refused upload.
#[utoipa::path(post, path = "/api/v1/files", tag = "files", security(("bearer" = [])),
    params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The file"),
    responses(
        (status = 201, description = "Stored", body = FileView),
        (status = 413, description = "`payload_too_large` (past `files_max_bytes`) or \
            `quota_exceeded` (with the quota and the usage)", body = Problem,
            content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_type` (the content is not an accepted \
            type) or `type_mismatch` (the name's extension is another type)", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "`empty_file`, or the name is refused (`unsafe_name`, \
            `invalid_length`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`uploads_busy`: try again shortly", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Query(params): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, JsonResponse<FileView>), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let files = state.files();
    let access = params.access.unwrap_or(Access::Private);
    let mut upload = files.begin(&who, &params.name, access, declared).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::unreadable_body(&e))?;
        files.write(&mut upload, &chunk).await?;
    }
    let stored = files.finish(upload, &ctx).await?;
    Ok((StatusCode::CREATED, JsonResponse(stored)))
}

/// Which page of files.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// The `next_cursor` of the page before.
    #[param(pattern = "^[0-9]{1,18}_[0-9a-f]{32}$")]
    cursor: Option<String>,
    /// Files per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

/// The caller's files, newest first.
#[utoipa::path(get, path = "/api/v1/files", tag = "files", security(("bearer" = [])),
    params(ListParams),
    responses((status = 200, description = "A page of files", body = FilePage)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Query(params): Query<ListParams>,
) -> Result<JsonResponse<FilePage>, ApiError> {
    Ok(JsonResponse(
        state
            .files()
            .list(&who, params.cursor.as_deref(), params.limit)
            .await?,
    ))
}

fn file_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(id).map_err(|_| ApiError::not_found("file"))
}

/// One file's record (the caller's own, or any for an admin).
#[utoipa::path(get, path = "/api/v1/files/{id}", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "The file", body = FileView),
        (status = 404, description = "No such file of yours", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<FileView>, ApiError> {
    Ok(JsonResponse(state.files().get(&who, file_id(&id)?).await?))
}

/// A change of a file.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileChange {
    /// Who may download it.
    access: Access,
}

/// Changes who may download a file. Audited.
#[utoipa::path(patch, path = "/api/v1/files/{id}", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id")),
    request_body = FileChange,
    responses(
        (status = 200, description = "The file", body = FileView),
        (status = 404, description = "No such file of yours", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn update(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    Json(change): Json<FileChange>,
) -> Result<JsonResponse<FileView>, ApiError> {
    Ok(JsonResponse(
        state
            .files()
            .set_access(&who, file_id(&id)?, change.access, &ctx)
            .await?,
    ))
}

/// Deletes a file: its bytes go, and it leaves its owner's usage at once. Audited.
#[utoipa::path(delete, path = "/api/v1/files/{id}", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such file of yours", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.files().delete(&who, file_id(&id)?, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A signed link's query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ContentParams {
    /// Who made the link.
    #[param(max_length = 36)]
    by: Option<String>,
    /// Until when it works, Unix seconds.
    expires: Option<i64>,
    /// Its signature.
    #[param(max_length = 100)]
    sig: Option<String>,
}

/// A link's lifetime.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LinkRequest {
    /// Seconds it works, 60 to 604800 (default `files_link_ttl`).
    #[serde(default)]
    ttl: Option<u64>,
}

/// Makes a signed link to a file's bytes, for anyone who holds it (the file's access must be
/// `link` or `public`; setting it to `private` ends every link). Audited.
#[utoipa::path(post, path = "/api/v1/files/{id}/links", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id")),
    request_body = LinkRequest,
    responses(
        (status = 201, description = "The link", body = FileLink),
        (status = 404, description = "No such file of yours", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`file_not_shared`: its access is `private`", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_link(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    Json(request): Json<LinkRequest>,
) -> Result<(StatusCode, JsonResponse<FileLink>), ApiError> {
    let link = state
        .files()
        .create_link(&who, file_id(&id)?, request.ttl, &ctx)
        .await?;
    Ok((StatusCode::CREATED, JsonResponse(link)))
}

/// A file's bytes: a public file for anyone, others for their owner or an admin, or with a
/// signed link's `by`, `expires` and `sig` (403 `link_invalid`, 410 `link_expired`). `HEAD`,
/// `Range` (206; 416 past the end), a strong `ETag` (its SHA-256) for `If-None-Match` (304)
/// and `If-Range`; served as an attachment with `nosniff` and a sandboxing CSP, so that
/// nothing uploaded runs in this origin.
#[utoipa::path(get, path = "/api/v1/files/{id}/content", tag = "files", security(("bearer" = []), ()),
    params(("id" = String, Path, description = "The file's id"), ContentParams),
    responses(
        (status = 200, description = "The file, of the type its content has (one of the \
            accepted ones)", body = Vec<u8>, content_type = "*/*"),
        (status = 206, description = "The range asked for", body = Vec<u8>,
            content_type = "*/*"),
        (status = 304, description = "`If-None-Match` names it"),
        (status = 403, description = "`link_invalid`", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No such file that you may read", body = Problem,
            content_type = "application/problem+json"),
        (status = 410, description = "`link_expired`", body = Problem,
            content_type = "application/problem+json"),
        (status = 416, description = "`range_not_satisfiable`", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn content(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(link): Query<ContentParams>,
    method: Method,
    mut parts: Parts,
) -> Result<Response, ApiError> {
    let id = file_id(&id)?;
    let files = state.files();
    let record = if link.by.is_some() || link.expires.is_some() || link.sig.is_some() {
        let (Some(by), Some(expires), Some(sig)) = (
            link.by.as_deref().and_then(|b| Uuid::try_parse(b).ok()),
            link.expires,
            link.sig.as_deref(),
        ) else {
            return Err(FilesError::LinkInvalid.into());
        };
        files.record_for_link(id, by, expires, sig).await?
    } else {
        let who = if bearer(&parts.headers).is_some() {
            Some(
                Auth::<crate::http::auth::AnyUser>::from_request_parts(&mut parts, &state)
                    .await?
                    .0,
            )
        } else {
            None
        };
        files.record_for_download(who.as_ref(), id).await?
    };
    let size = u64::try_from(record.size).unwrap_or_default();
    let etag = format!("\"{}\"", record.sha256);
    let plan = serve::plan(&parts.headers, &etag, size);
    if plan == Plan::Unsatisfiable {
        return Ok(serve::unsatisfiable(size));
    }
    // Revalidated at each use (cheap with the tag): a file made private or deleted is not
    // served from a cache afterwards.
    let cache = if record.access == "public" {
        "public, no-cache"
    } else {
        "private, no-cache"
    };
    let response = serve::start(plan, &etag, size)
        .header(header::CACHE_CONTROL, cache)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox",
        );
    let Plan::Send { start, len, .. } = plan else {
        return response.body(Body::empty()).map_err(ApiError::internal);
    };
    let response = response
        .header(header::CONTENT_TYPE, &record.content_type)
        .header(header::CONTENT_DISPOSITION, disposition(&record.name));
    if method == Method::HEAD || len == 0 {
        return response.body(Body::empty()).map_err(ApiError::internal);
    }
    let reader = files.read(&record, start, len).await?;
    response
        .body(serve::body(reader, len))
        .map_err(ApiError::internal)
}

/// `attachment` with the name: ASCII in `filename` (others as `_`), and whole in `filename*`
/// (RFC 6266, RFC 8187).
fn disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// The caller's usage and quota.
#[utoipa::path(get, path = "/api/v1/me/usage", tag = "files", security(("bearer" = [])),
    responses((status = 200, description = "Usage and quota", body = UsageView)))]
pub(crate) async fn my_usage(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
) -> Result<JsonResponse<UsageView>, ApiError> {
    Ok(JsonResponse(state.files().usage(&who, who.user_id).await?))
}

/// A user's usage and quota; admins only.
#[utoipa::path(get, path = "/api/v1/admin/users/{id}/usage", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The user's id")),
    responses(
        (status = 200, description = "Usage and quota", body = UsageView),
        (status = 404, description = "No such user", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn user_usage(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Path(id): Path<String>,
) -> Result<JsonResponse<UsageView>, ApiError> {
    Ok(JsonResponse(
        state.files().usage(&who, user_id(&id)?).await?,
    ))
}

/// A user's own quota.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuotaChange {
    /// The most bytes (`null`: no limit).
    #[schema(minimum = 0)]
    max_bytes: Option<i64>,
    /// The most files (`null`: no limit).
    #[schema(minimum = 0)]
    max_files: Option<i64>,
}

/// Sets one user's quota over their role's; admins only. Audited.
#[utoipa::path(put, path = "/api/v1/admin/users/{id}/quota", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The user's id")),
    request_body = QuotaChange,
    responses(
        (status = 200, description = "Usage and the new quota", body = UsageView),
        (status = 404, description = "No such user", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn set_quota(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    Json(change): Json<QuotaChange>,
) -> Result<JsonResponse<UsageView>, ApiError> {
    let quota = FileQuota {
        max_bytes: change.max_bytes,
        max_files: change.max_files,
    };
    Ok(JsonResponse(
        state
            .files()
            .set_quota(&who, user_id(&id)?, Some(quota), &ctx)
            .await?,
    ))
}

/// Removes one user's own quota: their role's applies again; admins only. Audited.
#[utoipa::path(delete, path = "/api/v1/admin/users/{id}/quota", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "The user's id")),
    responses(
        (status = 200, description = "Usage and the role's quota", body = UsageView),
        (status = 404, description = "No such user", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn reset_quota(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<JsonResponse<UsageView>, ApiError> {
    Ok(JsonResponse(
        state
            .files()
            .set_quota(&who, user_id(&id)?, None, &ctx)
            .await?,
    ))
}
