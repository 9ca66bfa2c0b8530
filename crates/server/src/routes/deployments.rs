//! `/api/v1/deployments/*`: firmware rollouts, for admins (docs/ota.md, "Deployments").

use axum::Json as JsonResponse;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use unhidra_ota::deploy::DeploymentDeviceView;
use unhidra_ota::{DeployError, DeploymentView, NewDeployment};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx};
use crate::http::extract::{Json, Query};
use crate::state::AppState;

impl From<DeployError> for ApiError {
    fn from(err: DeployError) -> Self {
        let message = err.to_string();
        match err {
            DeployError::Forbidden => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", message).into()
            }
            DeployError::NotFound => Self::not_found("deployment"),
            DeployError::Invalid(field, code, _) => {
                Self::validation(vec![FieldError::new(field, code, message)])
            }
            DeployError::Retired => Self::validation(vec![FieldError::new(
                "/firmware",
                "firmware_retired",
                message,
            )]),
            DeployError::EmptyCohort(_) => {
                Self::validation(vec![FieldError::new("/target", "empty_cohort", message)])
            }
            DeployError::WrongState(_) => {
                Problem::new(StatusCode::CONFLICT, "deployment_state", message).into()
            }
            DeployError::NotOffered(_) | DeployError::BadTransition(..) => {
                Problem::new(StatusCode::CONFLICT, "ota_invalid_state", message).into()
            }
            DeployError::Firmware(unhidra_ota::FirmwareError::NotFound) => {
                Self::validation(vec![FieldError::new(
                    "/firmware",
                    "not_found",
                    "no such firmware image",
                )])
            }
            DeployError::Firmware(e) => e.into(),
            DeployError::Devices(e) => e.into(),
            DeployError::Store(e) => e.into(),
        }
    }
}

fn deployment_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("deployment"))
}

/// Makes a deployment: the cohort is resolved now and kept, shuffled into the stages; it
/// starts now or at `start_at`. Devices that run the version already, whose `secure_version`
/// is above the image's, or that another deployment is updating are left out (`policy.skipped`).
#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", security(("bearer" = [])),
    request_body = NewDeployment,
    responses(
        (status = 201, description = "Made", body = DeploymentView),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid, the image is retired or unknown, or no \
            device can take it (`empty_cohort`)", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Json(body): Json<NewDeployment>,
) -> Result<(StatusCode, JsonResponse<DeploymentView>), ApiError> {
    let made = state.deployments().create(&who, body, &ctx).await?;
    Ok((StatusCode::CREATED, JsonResponse(made)))
}

/// Deployments, newest first (at most 200), with their counts.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", security(("bearer" = [])),
    responses(
        (status = 200, description = "The deployments", body = [DeploymentView]),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
) -> Result<JsonResponse<Vec<DeploymentView>>, ApiError> {
    Ok(JsonResponse(state.deployments().list(&who).await?))
}

/// One deployment: its state, stage, and devices by state per stage.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Deployment id")),
    responses(
        (status = 200, description = "The deployment", body = DeploymentView),
        (status = 404, description = "No such deployment", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Path(id): Path<String>,
) -> Result<JsonResponse<DeploymentView>, ApiError> {
    Ok(JsonResponse(
        state.deployments().get(&who, deployment_id(&id)?).await?,
    ))
}

/// Which devices of a deployment to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DevicesQuery {
    /// Only devices in this state.
    #[param(inline)]
    state: Option<unhidra_ota::deploy::UpdateState>,
    /// Devices to skip (pages of 500), at most 100000.
    #[serde(default)]
    #[param(maximum = 100_000)]
    offset: u64,
}

/// A deployment's devices with the state of each one's update, by stage (pages of 500).
#[utoipa::path(get, path = "/api/v1/deployments/{id}/devices", tag = "deployments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Deployment id"), DevicesQuery),
    responses(
        (status = 200, description = "The devices", body = [DeploymentDeviceView]),
        (status = 404, description = "No such deployment", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn devices(
    State(state): State<AppState>,
    Auth(who, ..): Auth<Admin>,
    Path(id): Path<String>,
    Query(query): Query<DevicesQuery>,
) -> Result<JsonResponse<Vec<DeploymentDeviceView>>, ApiError> {
    if query.offset > unhidra_ota::deploy::MAX_COHORT as u64 {
        return Err(ApiError::validation(vec![FieldError::new(
            "offset",
            "out_of_range",
            "offset is at most 100000",
        )]));
    }
    Ok(JsonResponse(
        state
            .deployments()
            .devices(&who, deployment_id(&id)?, query.state, query.offset)
            .await?,
    ))
}

macro_rules! deployment_action {
    ($name:ident, $path:literal, $summary:literal) => {
        #[doc = $summary]
        #[utoipa::path(post, path = $path, tag = "deployments", security(("bearer" = [])),
            params(("id" = String, Path, description = "Deployment id")),
            responses(
                (status = 200, description = "The deployment now", body = DeploymentView),
                (status = 404, description = "No such deployment", body = Problem,
                    content_type = "application/problem+json"),
                (status = 409, description = "`deployment_state`: not in a state this applies to",
                    body = Problem, content_type = "application/problem+json"),
            ))]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            Auth(who, ..): Auth<Admin>,
            Ctx(ctx): Ctx,
            Path(id): Path<String>,
        ) -> Result<JsonResponse<DeploymentView>, ApiError> {
            Ok(JsonResponse(
                state
                    .deployments()
                    .$name(&who, deployment_id(&id)?, &ctx)
                    .await?,
            ))
        }
    };
}

deployment_action!(
    pause,
    "/api/v1/deployments/{id}/pause",
    "Pauses a deployment: no new offers; devices mid-way carry on."
);
deployment_action!(
    resume,
    "/api/v1/deployments/{id}/resume",
    "Resumes a paused deployment where it stopped."
);
deployment_action!(
    cancel,
    "/api/v1/deployments/{id}/cancel",
    "Cancels a deployment: offers not yet taken up are withdrawn; devices mid-way are still followed."
);
