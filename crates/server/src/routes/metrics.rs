//! `/metrics`, in the Prometheus (OpenMetrics) text format, optionally behind a bearer token.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, Problem};
use crate::metrics::CONTENT_TYPE;
use crate::state::AppState;

/// Every metric of this server. With `metrics_token` set, only a scraper presenting it as a
/// bearer token may read them.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Metrics in the OpenMetrics text format", body = String,
            content_type = "application/openmetrics-text"),
        (status = 401, description = "The metrics token is missing or wrong", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.config().metrics_token {
        let presented = crate::http::auth::bearer(&headers).unwrap_or("");
        // Constant time, so the token cannot be guessed byte by byte from response times.
        let matches: bool = presented.as_bytes().ct_eq(token.expose().as_bytes()).into();
        if !matches {
            let mut response =
                ApiError::unauthorized("The metrics token is missing or wrong.").into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
            return Ok(response);
        }
    }
    // Read at scrape time: one count, and always current.
    match state.store().count_active_users().await {
        Ok(n) => {
            state
                .metrics()
                .auth
                .active_users
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "active_users not updated");
        }
    }
    Ok((
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics().render(),
    )
        .into_response())
}
