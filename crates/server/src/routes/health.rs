//! `/health/live` and `/health/ready`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::http::READY_CHECK_TIMEOUT;
use crate::state::AppState;

/// The answer of a health endpoint that passed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Status {
    /// `live` or `ready`.
    status: &'static str,
    /// With `ready`: the circuit breaker of each dependency that jobs call (SMTP), as this
    /// node sees it (not shown with `hide_existing_accounts`). An open circuit holds those
    /// jobs back but does not make the node unready: it still serves everything else.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    circuits: Vec<Circuit>,
}

/// A dependency's circuit breaker.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Circuit {
    /// The dependency, such as `smtp`.
    dependency: String,
    /// `closed`, `half_open` or `open`.
    state: &'static str,
}

/// The process is up and answering.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process is up", body = Status)))]
pub(crate) async fn live() -> Json<Status> {
    Json(Status {
        status: "live",
        circuits: Vec::new(),
    })
}

/// Every dependency is reachable and the database is migrated; 503 names what is not.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "A dependency is unavailable", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn ready(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let store = state.store();
    let backend = store.backend().name();
    let checked = tokio::time::timeout(READY_CHECK_TIMEOUT, store.health()).await;
    let failure = match checked {
        Ok(Ok(health)) if health.is_migrated() => {
            if let Some(failure) = storage_failure(&state).await {
                return Err(
                    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", failure)
                        .with("failing", vec!["storage"])
                        .into(),
                );
            }
            // With hidden accounts the circuits stay out of this unauthenticated answer: only
            // an existing account's reset sends mail, so the SMTP circuit's moves could tell
            // which emails have one (`/metrics` has them).
            let hidden = state.config().hide_existing_accounts;
            let circuits = state
                .jobs()
                .breakers()
                .iter()
                .filter(|_| !hidden)
                .map(|b| Circuit {
                    dependency: b.name().to_owned(),
                    state: b.state().as_str(),
                })
                .collect();
            return Ok(Json(Status {
                status: "ready",
                circuits,
            }));
        }
        Ok(Ok(health)) => format!(
            "store ({backend}): {} of {} migrations applied",
            health.applied_migrations, health.known_migrations
        ),
        Ok(Err(err)) => {
            tracing::warn!(error = %crate::error::error_chain(&err), "readiness: store check failed");
            format!("store ({backend}): unreachable")
        }
        Err(_) => format!("store ({backend}): no answer within {READY_CHECK_TIMEOUT:?}"),
    };
    Err(
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", failure)
            .with("failing", vec!["store"])
            .into(),
    )
}

/// Why the files' storage is not ready (an S3 bucket that does not answer), if it is not.
async fn storage_failure(state: &AppState) -> Option<String> {
    let backend = match state.config().storage_backend {
        unhidra_config::StorageBackend::Local => "local",
        unhidra_config::StorageBackend::S3 => "s3",
    };
    match tokio::time::timeout(READY_CHECK_TIMEOUT, state.files().check_storage()).await {
        Ok(Ok(())) => None,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness: storage check failed");
            Some(format!("storage ({backend}): unreachable"))
        }
        Err(_) => Some(format!(
            "storage ({backend}): no answer within {READY_CHECK_TIMEOUT:?}"
        )),
    }
}
