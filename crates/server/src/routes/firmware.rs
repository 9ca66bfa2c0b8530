//! `/api/v1/firmware/*`: firmware images, for admins. An upload is the image as the raw body
//! with its signed manifest in the `Unhidra-Manifest` header (base64 of the JSON that
//! `unhidra firmware sign` writes); the body streams through the checks, never held whole.

use std::io::SeekFrom;

use axum::Json as JsonResponse;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use unhidra_ota::{DownloadLink, FirmwareError, FirmwareView, PresentedLink};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::devices::DeviceKeyAuth;
use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx, bearer};
use crate::http::extract::{Json, Query};
use crate::http::serve::{self, Plan};
use crate::state::AppState;

/// The header that carries an upload's signed manifest.
pub(crate) const MANIFEST_HEADER: &str = "unhidra-manifest";

impl From<FirmwareError> for ApiError {
    fn from(err: FirmwareError) -> Self {
        let message = err.to_string();
        match err {
            FirmwareError::Forbidden => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", message).into()
            }
            FirmwareError::NotFound => Self::not_found("firmware image"),
            FirmwareError::BadManifest(code, _) => {
                Self::validation(vec![FieldError::new("/manifest", code, message)])
            }
            FirmwareError::InvalidFact(field, _) => Self::validation(vec![FieldError::new(
                format!("/manifest/{field}"),
                "invalid_format",
                message,
            )]),
            FirmwareError::Signature(e) => Self::validation(vec![FieldError::new(
                "/manifest/signature",
                e.code(),
                message,
            )]),
            FirmwareError::NoTrustedKeys => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "no_trusted_keys", message).into()
            }
            FirmwareError::Image(e) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                e.code(),
                format!("The image is refused: {message}."),
            )
            .into(),
            FirmwareError::Mismatch(field, ..) => Self::validation(vec![FieldError::new(
                format!("/manifest/{field}"),
                "manifest_mismatch",
                message,
            )]),
            FirmwareError::TooLarge(max) => ApiError::new(
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("An image has at most {max} bytes (ota_max_image_bytes)."),
                )
                .with("max_bytes", max),
            ),
            FirmwareError::Conflict(_) => {
                Problem::new(StatusCode::CONFLICT, "firmware_exists", message).into()
            }
            FirmwareError::LinkInvalid => {
                Problem::new(StatusCode::FORBIDDEN, "link_invalid", message).into()
            }
            FirmwareError::LinkExpired => {
                Problem::new(StatusCode::FORBIDDEN, "link_expired", message).into()
            }
            FirmwareError::NoSuchDevice => {
                Self::validation(vec![FieldError::new("/device", "not_found", message)])
            }
            FirmwareError::Busy => ApiError::new(
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "uploads_busy", message)
                    .with("retry_after", 5),
            ),
            FirmwareError::Io(e) => ApiError::internal(e),
            FirmwareError::Store(e) => e.into(),
        }
    }
}

/// How an upload is read.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadParams {
    /// The image is not an ESP32 app image: its facts are the manifest's.
    #[serde(default)]
    generic: bool,
}

/// Uploads a firmware image: the raw body, with its signed manifest (base64 of its JSON) in
/// `Unhidra-Manifest`. The manifest must be signed by a trusted key; an ESP32 image is checked
/// from its own bytes while it streams and must say what the manifest says. Nothing is kept of
/// a refused upload.
#[utoipa::path(post, path = "/api/v1/firmware", tag = "firmware", security(("bearer" = [])),
    params(
        UploadParams,
        ("unhidra-manifest" = String, Header, description = "Base64 of the signed manifest's JSON"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The image"),
    responses(
        (status = 201, description = "Stored", body = FirmwareView),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`firmware_exists`: this image, or this version", body = Problem,
            content_type = "application/problem+json"),
        (status = 413, description = "Larger than `ota_max_image_bytes`", body = Problem,
            content_type = "application/problem+json"),
        (status = 503, description = "`uploads_busy`: four uploads are under way on this node; \
            `Retry-After` says when to try again", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "The manifest or the image is refused; `code` or \
            `errors[]` says why", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Query(params): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, JsonResponse<FirmwareView>), ApiError> {
    let manifest = headers
        .get(MANIFEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let v = v.trim();
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v))
                .ok()
        })
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| {
            ApiError::validation(vec![FieldError::new(
                "/manifest",
                "missing_manifest",
                "the Unhidra-Manifest header carries base64 of the signed manifest's JSON",
            )])
        })?;
    let firmware = state.firmware();
    let mut upload = firmware.begin(&who, &manifest, params.generic).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::unreadable_body(&e))?;
        firmware.write(&mut upload, &chunk).await?;
    }
    let stored = firmware.finish(upload, &ctx).await?;
    Ok((StatusCode::CREATED, JsonResponse(stored)))
}

/// Which images to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Only this project.
    #[param(max_length = 64)]
    project: Option<String>,
    /// Only this target.
    #[param(max_length = 64)]
    target: Option<String>,
}

/// Firmware images, newest first (at most 200).
#[utoipa::path(get, path = "/api/v1/firmware", tag = "firmware", security(("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "The images", body = [FirmwareView]),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Query(params): Query<ListParams>,
) -> Result<JsonResponse<Vec<FirmwareView>>, ApiError> {
    for (field, value) in [("project", &params.project), ("target", &params.target)] {
        if value.as_ref().is_some_and(|v| v.chars().count() > 64) {
            return Err(ApiError::validation(vec![FieldError::new(
                field,
                "invalid_length",
                format!("{field} has at most 64 characters"),
            )]));
        }
    }
    Ok(JsonResponse(
        state
            .firmware()
            .list(&who, params.project.as_deref(), params.target.as_deref())
            .await?,
    ))
}

/// One firmware image, with its signed manifest.
#[utoipa::path(get, path = "/api/v1/firmware/{sha256}", tag = "firmware", security(("bearer" = [])),
    params(("sha256" = String, Path, description = "The image's SHA-256")),
    responses(
        (status = 200, description = "The image", body = FirmwareView),
        (status = 404, description = "No such image", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Path(sha256): Path<String>,
) -> Result<JsonResponse<FirmwareView>, ApiError> {
    Ok(JsonResponse(state.firmware().get(&who, &sha256).await?))
}

/// Retires an image: no new deployment may use it.
#[utoipa::path(post, path = "/api/v1/firmware/{sha256}/retire", tag = "firmware", security(("bearer" = [])),
    params(("sha256" = String, Path, description = "The image's SHA-256")),
    responses(
        (status = 200, description = "Retired", body = FirmwareView),
        (status = 404, description = "No such image", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn retire(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(sha256): Path<String>,
) -> Result<JsonResponse<FirmwareView>, ApiError> {
    Ok(JsonResponse(
        state.firmware().retire(&who, &sha256, &ctx).await?,
    ))
}

/// What a link is asked for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewLink {
    /// The device the link is for.
    #[schema(value_type = String, format = "uuid")]
    device: Uuid,
}

/// Makes a signed download link to an image for one device, valid for `ota_link_ttl`: for a
/// device that cannot send its key with the download (ESP-IDF's `esp_https_ota`). Audited.
#[utoipa::path(post, path = "/api/v1/firmware/{sha256}/links", tag = "firmware", security(("bearer" = [])),
    params(("sha256" = String, Path, description = "The image's SHA-256")),
    request_body = NewLink,
    responses(
        (status = 201, description = "The link", body = DownloadLink),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No such image", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "No such device", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_link(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(sha256): Path<String>,
    Json(body): Json<NewLink>,
) -> Result<(StatusCode, JsonResponse<DownloadLink>), ApiError> {
    let link = state
        .firmware()
        .link(&who, &sha256, body.device, &ctx)
        .await?;
    Ok((StatusCode::CREATED, JsonResponse(link)))
}

/// A download's signed link, when it comes with one.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DownloadParams {
    /// The device a signed link is for.
    device: Option<String>,
    /// The link's expiry, in Unix seconds.
    expires: Option<i64>,
    /// The link's signature.
    sig: Option<String>,
}

/// Downloads an image: with a device's key (`Authorization: Bearer unh_dk_…`), a signed link's
/// query, or an admin's token. `HEAD` answers the headers alone; `Range: bytes=a-b` gets 206
/// with `Content-Range` (one range; several get the whole image), 416 when it is past the end;
/// the `ETag` is the image's SHA-256 (strong: images are immutable), for `If-Range` and
/// `If-None-Match`. The bytes stream from the file.
#[utoipa::path(get, path = "/api/v1/firmware/{sha256}/image", tag = "firmware", security(("bearer" = []), ()),
    params(("sha256" = String, Path, description = "The image's SHA-256"), DownloadParams),
    responses(
        (status = 200, description = "The image", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 206, description = "The range asked for", body = Vec<u8>,
            content_type = "application/octet-stream"),
        (status = 304, description = "`If-None-Match` names this image"),
        (status = 401, description = "No key, link or token", body = Problem,
            content_type = "application/problem+json"),
        (status = 403, description = "`link_invalid` or `link_expired`, or not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No such image", body = Problem,
            content_type = "application/problem+json"),
        (status = 416, description = "`range_not_satisfiable`", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "A query parameter is malformed", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn download(
    State(state): State<AppState>,
    Path(sha256): Path<String>,
    Query(params): Query<DownloadParams>,
    method: Method,
    mut parts: Parts,
) -> Result<Response, ApiError> {
    let firmware = state.firmware();
    if params.device.is_some() || params.expires.is_some() || params.sig.is_some() {
        let (Some(device), Some(expires), Some(sig)) = (
            params
                .device
                .as_deref()
                .and_then(|d| d.parse::<Uuid>().ok()),
            params.expires,
            params.sig.as_deref(),
        ) else {
            return Err(FirmwareError::LinkInvalid.into());
        };
        firmware.check_link(
            &sha256,
            &PresentedLink {
                device,
                expires,
                sig,
            },
        )?;
    } else if bearer(&parts.headers)
        .is_some_and(|t| t.starts_with(unhidra_protocol::device::DEVICE_KEY_PREFIX_TEXT))
    {
        DeviceKeyAuth::from_request_parts(&mut parts, &state).await?;
    } else {
        Auth::<Admin>::from_request_parts(&mut parts, &state).await?;
    }
    // The facts first: a `HEAD`, a 304 or a 416 opens no file.
    let (sha256, size, file_name) = firmware.describe(&sha256).await?;
    let etag = format!("\"{sha256}\"");
    let metrics = firmware.metrics();
    let plan = serve::plan(&parts.headers, &etag, size);
    if plan == Plan::Unsatisfiable {
        return Ok(serve::unsatisfiable(size));
    }
    let response = serve::start(plan, &etag, size).header(
        header::CACHE_CONTROL,
        "private, max-age=31536000, immutable",
    );
    let Plan::Send {
        start,
        len,
        partial,
    } = plan
    else {
        unhidra_ota::OtaMetrics::count(&metrics.downloads, "not_modified");
        return response.body(Body::empty()).map_err(ApiError::internal);
    };
    let response = response
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{file_name}\""),
        );
    let kind = match (&method, partial) {
        (&Method::HEAD, _) => "head",
        (_, true) => "range",
        (_, false) => "whole",
    };
    unhidra_ota::OtaMetrics::count(&metrics.downloads, kind);
    if method == Method::HEAD || len == 0 {
        return response.body(Body::empty()).map_err(ApiError::internal);
    }
    metrics.download_bytes.inc_by(len);
    // A device's range (`partial_http_download` asks 4 KiB at a time): one positioned read,
    // and head and body in one write.
    if len <= unhidra_ota::download::WHOLE_RANGE_BYTES {
        let bytes = firmware.read_range(&sha256, start, len).await?;
        return response.body(Body::from(bytes)).map_err(ApiError::internal);
    }
    let mut image = firmware.open(&sha256).await?;
    if start > 0 {
        image
            .file
            .seek(SeekFrom::Start(start))
            .await
            .map_err(ApiError::internal)?;
    }
    response
        .body(serve::body(image.file.take(len), len))
        .map_err(ApiError::internal)
}
