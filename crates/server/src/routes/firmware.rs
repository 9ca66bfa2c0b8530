//! `/api/v1/firmware/*`: firmware images, for admins. An upload is the image as the raw body
//! with its signed manifest in the `Unhidra-Manifest` header (base64 of the JSON that
//! `unhidra firmware sign` writes); the body streams through the checks, never held whole.

use axum::Json as JsonResponse;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Deserialize;
use unhidra_ota::{FirmwareError, FirmwareView};
use utoipa::IntoParams;

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx};
use crate::http::extract::Query;
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
        let chunk = chunk.map_err(|e| {
            ApiError::new(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("The body could not be read: {e}."),
            ))
        })?;
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
