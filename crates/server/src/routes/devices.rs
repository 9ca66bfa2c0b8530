//! `/api/v1/devices/*`, `/api/v1/alerts/*`, `/api/v1/device/*` and `/api/v1/admin/fleet`:
//! the device fleet over HTTP. Users manage devices (owners their own, admins all); devices post
//! telemetry with their key. Every handler checks the caller's right through `Devices`.

use axum::Json as JsonResponse;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::{Deserialize, Serialize};
use unhidra_devices::commands::{CommandView, ConfigView, NewCommand};
use unhidra_devices::events::{EventPage, EventQuery};
use unhidra_devices::provision::{ClaimRequest, Claimed, CreatedToken, NewToken, TokenView};
use unhidra_devices::telemetry::{PointView, Read, ReadQuery};
use unhidra_devices::{
    AlertView, DeviceAuth, DeviceError, DeviceUpdate, DeviceView, FleetSummary, KeyView, ListQuery,
    NewDevice, Page, Registered,
};
use unhidra_store::devices::{AlertState, ClaimRefusal};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx, client_ip};
use crate::http::extract::{Json, Query};
use crate::state::AppState;

impl From<DeviceError> for ApiError {
    fn from(err: DeviceError) -> Self {
        match err {
            DeviceError::NotFound(what) => Self::not_found(what),
            DeviceError::Invalid(field, code, message) => {
                let pointer = if field.starts_with('/') {
                    field.to_owned()
                } else {
                    format!("/{field}")
                };
                Self::validation(vec![FieldError::new(pointer, code, message)])
            }
            DeviceError::Conflict(code, message) => {
                Problem::new(StatusCode::CONFLICT, code, message).into()
            }
            DeviceError::BadKey => Self::unauthorized("The device key is missing or not valid."),
            DeviceError::RateLimited { scope, retry_after } => ApiError::new(
                Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("Too many {scope}; wait before trying again."),
                )
                .with("retry_after", retry_after),
            ),
            DeviceError::Forbidden(why) => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", why).into()
            }
            DeviceError::Claim(why) => claim_refused(&why),
            DeviceError::Store(e) => e.into(),
        }
    }
}

/// A refused claim: a problem whose `code` says why.
fn claim_refused(why: &ClaimRefusal) -> ApiError {
    let (status, code, message) = match why {
        ClaimRefusal::Unknown => (
            StatusCode::UNAUTHORIZED,
            "claim_token_invalid",
            "The provisioning token is not known, or was revoked.".to_owned(),
        ),
        ClaimRefusal::Expired => (
            StatusCode::GONE,
            "claim_token_expired",
            "The provisioning token has expired.".to_owned(),
        ),
        ClaimRefusal::UsedUp => (
            StatusCode::GONE,
            "claim_token_used",
            "The provisioning token's claims are used up.".to_owned(),
        ),
        ClaimRefusal::WrongModel(model) => {
            return ApiError::validation(vec![FieldError::new(
                "/model",
                "model_mismatch",
                format!("the provisioning token is for model {model}"),
            )]);
        }
        ClaimRefusal::NotReclaimable => (
            StatusCode::CONFLICT,
            "device_not_reclaimable",
            "Your device with this hardware id still has a usable key, or is another model: \
             revoke its keys to re-provision it."
                .to_owned(),
        ),
    };
    Problem::new(status, code, message).into()
}

/// Answers that carry a key are kept by no cache.
type NoStore = [(header::HeaderName, &'static str); 1];
const NO_STORE: NoStore = [(header::CACHE_CONTROL, "no-store")];

fn device_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("device"))
}

/// A device authenticated by its key in `Authorization: Bearer unh_dk_…`.
pub(crate) struct DeviceKeyAuth(pub DeviceAuth);

impl FromRequestParts<AppState> for DeviceKeyAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = crate::http::auth::bearer(&parts.headers).unwrap_or_default();
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let ip = client_ip(peer, &parts.headers, state.trusted_proxies());
        Ok(Self(state.devices().authenticate_from(key, ip).await?))
    }
}

/// Registers a device; the answer carries its API key, shown this once.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])),
    request_body = NewDevice,
    responses(
        (status = 201, description = "Registered; store the key on the device now", body = Registered),
        (status = 409, description = "The hardware id is another device's", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many registrations", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Json(body): Json<NewDevice>,
) -> Result<(StatusCode, NoStore, JsonResponse<Registered>), ApiError> {
    let ip = ctx.ip.as_deref().and_then(|ip| ip.parse().ok());
    let made = state.devices().register(&who, body, ip, &ctx).await?;
    Ok((StatusCode::CREATED, NO_STORE, JsonResponse(made)))
}

/// A device's events (its `event` frames and each `hello`), newest first, in pages
/// (`next_before` is the next page's `before`).
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id"), EventQuery),
    responses(
        (status = 200, description = "The events", body = EventPage),
        (status = 404, description = "No such device", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "A parameter is invalid", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn events(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Query(query): Query<EventQuery>,
) -> Result<JsonResponse<EventPage>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .events_of(&who, device_id(&id)?, &query)
            .await?,
    ))
}

/// Makes a provisioning token for devices to claim their keys with; the answer carries the
/// token and its QR code (ESP-IDF `wifi_prov_mgr` JSON with the token added), shown this once.
#[utoipa::path(post, path = "/api/v1/provisioning-tokens", tag = "devices", security(("bearer" = [])),
    request_body = NewToken,
    responses(
        (status = 201, description = "Made; print or show the QR code now", body = CreatedToken),
        (status = 422, description = "A field is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many tokens and registrations", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Json(body): Json<NewToken>,
) -> Result<(StatusCode, NoStore, JsonResponse<CreatedToken>), ApiError> {
    let ip = ctx.ip.as_deref().and_then(|ip| ip.parse().ok());
    let made = state.devices().create_token(&who, body, ip, &ctx).await?;
    Ok((StatusCode::CREATED, NO_STORE, JsonResponse(made)))
}

/// The caller's provisioning tokens (an admin's: everyone's), newest first, 200 at most;
/// never the tokens themselves.
#[utoipa::path(get, path = "/api/v1/provisioning-tokens", tag = "devices", security(("bearer" = [])),
    responses((status = 200, description = "The tokens", body = [TokenView])))]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
) -> Result<JsonResponse<Vec<TokenView>>, ApiError> {
    Ok(JsonResponse(state.devices().tokens(&who).await?))
}

/// Revokes a provisioning token: no device claims with it from now on (the devices it made
/// keep their keys).
#[utoipa::path(delete, path = "/api/v1/provisioning-tokens/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such token", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = id
        .parse()
        .map_err(|_| ApiError::not_found("provisioning token"))?;
    state.devices().revoke_token(&who, id, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A device exchanges a provisioning token for its own key (no other credential). A device
/// whose `hardware_id` its owner has already (a factory reset) keeps its identity: 200, and its
/// old keys stop working; a new device: 201.
#[utoipa::path(post, path = "/api/v1/devices/claim", tag = "devices",
    request_body = ClaimRequest,
    responses(
        (status = 201, description = "A new device; store the key now", body = Claimed),
        (status = 200, description = "The device claimed again; store the new key now", body = Claimed),
        (status = 401, description = "`claim_token_invalid`: unknown or revoked", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`device_not_reclaimable`: your device with this hardware id still has a usable key, or is another model", body = Problem,
            content_type = "application/problem+json"),
        (status = 410, description = "`claim_token_expired` or `claim_token_used`", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid, or `model_mismatch`", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many claims from this address", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn claim(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<ClaimRequest>,
) -> Result<(StatusCode, NoStore, JsonResponse<Claimed>), ApiError> {
    let ip = ctx.ip.as_deref().and_then(|ip| ip.parse().ok());
    let claimed = state.devices().claim(body, ip, &ctx).await?;
    let status = if claimed.reclaimed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, NO_STORE, JsonResponse(claimed)))
}

/// Which devices to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeviceListParams {
    /// Text in the name, model, location or hardware id (case-insensitive).
    #[param(
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    q: Option<String>,
    /// `online`, `offline` or `silent`.
    #[param(pattern = "^(online|offline|silent)$")]
    status: Option<String>,
    /// Only this model.
    #[param(
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    model: Option<String>,
    /// Only devices with this tag.
    #[param(
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    tag: Option<String>,
    /// Only this firmware version.
    #[param(
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    firmware: Option<String>,
    /// The page, from 1.
    #[param(minimum = 1, maximum = 1_000_000)]
    page: Option<u64>,
    /// Devices per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    page_size: Option<u64>,
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DevicePage {
    items: Vec<DeviceView>,
    page: u64,
    page_size: u64,
    total: u64,
}

impl From<Page<DeviceView>> for DevicePage {
    fn from(p: Page<DeviceView>) -> Self {
        Self {
            items: p.items,
            page: p.page,
            page_size: p.page_size,
            total: p.total,
        }
    }
}

/// The caller's devices (an admin's: every device), by name.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])),
    params(DeviceListParams),
    responses(
        (status = 200, description = "A page of devices", body = DevicePage),
        (status = 422, description = "A filter is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Query(p): Query<DeviceListParams>,
) -> Result<JsonResponse<DevicePage>, ApiError> {
    let page = state
        .devices()
        .list(
            &who,
            ListQuery {
                q: p.q,
                status: p.status,
                model: p.model,
                tag: p.tag,
                firmware: p.firmware,
                page: p.page,
                page_size: p.page_size,
            },
        )
        .await?;
    Ok(JsonResponse(page.into()))
}

/// One device, with its last heartbeat's figures.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, description = "The device", body = DeviceView)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<DeviceView>, ApiError> {
    Ok(JsonResponse(
        state.devices().get(&who, device_id(&id)?).await?,
    ))
}

/// Changes a device: absent fields stay, `null` clears.
#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    request_body = DeviceUpdate,
    responses(
        (status = 200, description = "The device as it is now", body = DeviceView),
        (status = 422, description = "A field is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn update(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    Json(body): Json<DeviceUpdate>,
) -> Result<JsonResponse<DeviceView>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .update(&who, device_id(&id)?, body, &ctx)
            .await?,
    ))
}

/// Deletes a device with its keys, alerts and telemetry; its connections close with 4003.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 204, description = "Deleted")))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.devices().delete(&who, device_id(&id)?, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A device's keys (never the keys themselves), newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/keys", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, description = "The keys", body = [KeyView])))]
pub(crate) async fn keys(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<Vec<KeyView>>, ApiError> {
    Ok(JsonResponse(
        state.devices().keys(&who, device_id(&id)?).await?,
    ))
}

/// Rotates a device's key: a new key, shown this once; the old ones keep working for
/// `device_key_grace`.
#[utoipa::path(post, path = "/api/v1/devices/{id}/keys", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 201, description = "The new key", body = Registered)))]
pub(crate) async fn rotate(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<(StatusCode, NoStore, JsonResponse<Registered>), ApiError> {
    let made = state
        .devices()
        .rotate_key(&who, device_id(&id)?, &ctx)
        .await?;
    Ok((StatusCode::CREATED, NO_STORE, JsonResponse(made)))
}

/// How many keys a revocation ended.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = RevokedKeys)]
pub(crate) struct Revoked {
    /// Keys that were usable.
    revoked: u64,
}

/// Revokes every key of a device at once; its live connections close with 4003.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, description = "Revoked", body = Revoked)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<JsonResponse<Revoked>, ApiError> {
    let revoked = state.devices().revoke(&who, device_id(&id)?, &ctx).await?;
    Ok(JsonResponse(Revoked { revoked }))
}

/// A device's stored telemetry of one key: points, oldest first, in pages (`next` is the
/// cursor), or buckets with `bucket` and `agg`.
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id"), ReadQuery),
    responses(
        (status = 200, description = "Points or buckets", body = Read),
        (status = 422, description = "A parameter is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn telemetry(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Query(query): Query<ReadQuery>,
) -> Result<JsonResponse<Read>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .read_telemetry(&who, device_id(&id)?, query)
            .await?,
    ))
}

/// The latest value of every key of a device.
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry/latest", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, description = "One point per key, by key", body = [PointView])))]
pub(crate) async fn latest(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<Vec<PointView>>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .latest_telemetry(&who, device_id(&id)?)
            .await?,
    ))
}

/// A telemetry batch posted by a device (one that sleeps between batches, say).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = TelemetryBatch)]
#[serde(deny_unknown_fields)]
pub(crate) struct Batch {
    /// The batch's number; a repeat is acknowledged again and not stored twice.
    seq: u64,
    /// The points: `{ts?, key, value}`, as in the `telemetry` frame (docs/protocol.md).
    #[schema(value_type = Vec<Object>)]
    points: Vec<unhidra_protocol::device::Point>,
}

/// The acknowledgement of a batch: it is durable.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = TelemetryAck)]
pub(crate) struct Ack {
    /// The batch's number.
    seq: u64,
    /// The batch was stored before; nothing was stored now.
    duplicate: bool,
}

/// Posts a telemetry batch with the device's key (`Authorization: Bearer unh_dk_…`): answered
/// once the batch is durable.
#[utoipa::path(post, path = "/api/v1/device/telemetry", tag = "devices",
    security(("device_key" = [])),
    request_body = Batch,
    responses(
        (status = 200, description = "Stored (or stored before)", body = Ack),
        (status = 401, description = "No valid device key", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "The batch breaks a limit; nothing of it is stored",
            body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many batches from this device, or too many failed \
            key attempts from this address", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn post_telemetry(
    State(state): State<AppState>,
    DeviceKeyAuth(device): DeviceKeyAuth,
    Json(batch): Json<Batch>,
) -> Result<JsonResponse<Ack>, ApiError> {
    let stored = state
        .devices()
        .telemetry(&device, batch.seq, batch.points)
        .await?;
    Ok(JsonResponse(Ack {
        seq: batch.seq,
        duplicate: !stored,
    }))
}

/// How long to wait for a command's result.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitParams {
    /// Seconds to wait for the command to end before answering, 0 to 30 (default 0).
    #[param(minimum = 0, maximum = 30)]
    wait: Option<u64>,
}

fn wait_for(p: &WaitParams) -> Result<std::time::Duration, ApiError> {
    match p.wait.unwrap_or(0) {
        secs @ 0..=30 => Ok(std::time::Duration::from_secs(secs)),
        _ => Err(ApiError::validation(vec![FieldError::new(
            "/wait",
            "out_of_range",
            "wait is 0 to 30 seconds",
        )])),
    }
}

/// Sends a command to a device: delivered at once when it is connected, else when it next
/// connects (unless it expired first). With `wait`, the answer waits for the result.
#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id"), WaitParams),
    request_body = NewCommand,
    responses(
        (status = 201, description = "Stored (and delivered, if the device is connected)", body = CommandView),
        (status = 200, description = "The command sent before with this idempotency key", body = CommandView),
        (status = 422, description = "A field is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn send_command(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Query(wait): Query<WaitParams>,
    Json(body): Json<NewCommand>,
) -> Result<(StatusCode, JsonResponse<CommandView>), ApiError> {
    let wait = wait_for(&wait)?;
    let devices = state.devices();
    let (command, created) = devices.send_command(&who, device_id(&id)?, body).await?;
    let command = if wait.is_zero() || command.is_final() {
        command
    } else {
        devices.wait_command(&who, command.id, wait).await?
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, JsonResponse(command)))
}

/// How many commands to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct CommandListParams {
    /// At most this many, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

/// A device's latest commands, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id"), CommandListParams),
    responses((status = 200, description = "The commands", body = [CommandView])))]
pub(crate) async fn list_commands(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Query(p): Query<CommandListParams>,
) -> Result<JsonResponse<Vec<CommandView>>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .commands(&who, device_id(&id)?, p.limit)
            .await?,
    ))
}

/// One command; with `wait`, once it has ended or the wait is over.
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Command id"), WaitParams),
    responses((status = 200, description = "The command", body = CommandView)))]
pub(crate) async fn get_command(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Query(wait): Query<WaitParams>,
) -> Result<JsonResponse<CommandView>, ApiError> {
    let wait = wait_for(&wait)?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("command"))?;
    Ok(JsonResponse(
        state.devices().wait_command(&who, id, wait).await?,
    ))
}

/// A device's desired configuration.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DesiredConfig {
    /// A JSON object of at most 8 KiB; replaces the one before and raises the version.
    #[schema(value_type = Object)]
    desired: serde_json::Value,
}

/// Replaces a device's desired configuration; a connected device gets the keys that differ
/// from what it reported at once, others at their next connection.
#[utoipa::path(put, path = "/api/v1/devices/{id}/config", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    request_body = DesiredConfig,
    responses(
        (status = 200, description = "The configuration with its new version", body = ConfigView),
        (status = 422, description = "Not an object, or too large", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn put_config(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
    Json(body): Json<DesiredConfig>,
) -> Result<JsonResponse<ConfigView>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .set_config(&who, device_id(&id)?, &body.desired)
            .await?,
    ))
}

/// A device's desired and reported configuration, and the keys that differ.
#[utoipa::path(get, path = "/api/v1/devices/{id}/config", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, description = "The configuration", body = ConfigView)))]
pub(crate) async fn get_config(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Path(id): Path<String>,
) -> Result<JsonResponse<ConfigView>, ApiError> {
    Ok(JsonResponse(
        state.devices().config(&who, device_id(&id)?).await?,
    ))
}

/// Which alerts to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AlertListParams {
    /// `open`, `acknowledged` or `resolved`; absent: open and acknowledged ones.
    #[param(pattern = "^(open|acknowledged|resolved)$")]
    state: Option<String>,
    /// Only this device's.
    #[param(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    device: Option<String>,
    /// The page, from 1.
    #[param(minimum = 1, maximum = 1_000_000)]
    page: Option<u64>,
    /// Alerts per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    page_size: Option<u64>,
}

/// A page of alerts.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AlertPage {
    items: Vec<AlertView>,
    page: u64,
    page_size: u64,
    total: u64,
}

/// Alerts of the caller's devices (an admin's: every device's), newest first.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "devices", security(("bearer" = [])),
    params(AlertListParams),
    responses((status = 200, description = "A page of alerts", body = AlertPage)))]
pub(crate) async fn alerts(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Query(p): Query<AlertListParams>,
) -> Result<JsonResponse<AlertPage>, ApiError> {
    let device = p.device.as_deref().map(device_id).transpose()?;
    let page = state
        .devices()
        .alerts(&who, p.state.as_deref(), device, p.page, p.page_size)
        .await?;
    Ok(JsonResponse(AlertPage {
        items: page.items,
        page: page.page,
        page_size: page.page_size,
        total: page.total,
    }))
}

fn alert_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("alert"))
}

/// Acknowledges an open alert.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/acknowledge", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Alert id")),
    responses(
        (status = 200, description = "Acknowledged", body = AlertView),
        (status = 409, description = "It is acknowledged or resolved already", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn acknowledge(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<JsonResponse<AlertView>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .advance_alert(&who, alert_id(&id)?, AlertState::Acknowledged, &ctx)
            .await?,
    ))
}

/// Resolves an open or acknowledged alert.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/resolve", tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Alert id")),
    responses(
        (status = 200, description = "Resolved", body = AlertView),
        (status = 409, description = "It is resolved already", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn resolve(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<JsonResponse<AlertView>, ApiError> {
    Ok(JsonResponse(
        state
            .devices()
            .advance_alert(&who, alert_id(&id)?, AlertState::Resolved, &ctx)
            .await?,
    ))
}

/// The fleet at a glance: devices per status, model and firmware, and open alerts.
#[utoipa::path(get, path = "/api/v1/admin/fleet", tag = "devices", security(("bearer" = [])),
    responses(
        (status = 200, description = "The summary", body = FleetSummary),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn fleet(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
) -> Result<JsonResponse<FleetSummary>, ApiError> {
    Ok(JsonResponse(state.devices().summary(&who).await?))
}
