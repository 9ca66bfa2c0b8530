//! Every route, and the OpenAPI document generated from them.

mod docs;
mod health;
mod metrics;

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{FieldError, Problem};
use crate::state::AppState;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Unhidra",
        description = "A secure, self-hosted real-time backend for people and their devices. \
            Every error is an RFC 9457 problem (`application/problem+json`).",
        license(name = "AGPL-3.0-only"),
    ),
    components(schemas(Problem, FieldError)),
    tags(
        (name = "operations", description = "Health, readiness, metrics and this document."),
    ),
)]
struct ApiDoc;

/// The documented routes and the document describing them.
fn documented() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .routes(routes!(metrics::metrics))
        .split_for_parts()
}

/// The OpenAPI document of this build.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = documented().1;
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// Every route, before middleware.
pub(crate) fn router() -> Router<AppState> {
    let (api, _) = documented();
    let spec = openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned());
    api.route(
        OPENAPI_PATH,
        get(move || {
            let spec = spec.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    spec,
                )
            }
        }),
    )
    .merge(docs::router())
}
