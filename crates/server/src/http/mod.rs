//! The HTTP layer: the router, and the middleware every request passes through.
//!
//! Outermost first: compression → security headers → CORS → [`finish`] (trace id, problem
//! bodies, metrics, the one log line of an error) → panic catcher → timeout → the route's
//! handler, whose body extractors stop reading at the body limit (413).

pub mod auth;
pub mod extract;
mod finish;
mod security;
pub(crate) mod serve;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
use tower_http::timeout::TimeoutLayer;

pub use finish::{REQUEST_ID, TraceId};

use crate::error::{ApiError, InternalCause};
use crate::state::AppState;

/// Compress only answers that do not offer byte ranges: a range of a compressed body would
/// be counted in bytes of the other one, under the same strong tag.
#[derive(Debug, Clone, Copy)]
struct NotRanged;

impl tower_http::compression::predicate::Predicate for NotRanged {
    fn should_compress<B>(&self, response: &axum::http::Response<B>) -> bool
    where
        B: axum::body::HttpBody,
    {
        !response
            .headers()
            .contains_key(axum::http::header::ACCEPT_RANGES)
    }
}

/// Wraps `routes` (the API and every other route) in the middleware stack.
pub(crate) fn with_middleware(routes: Router<AppState>, state: &AppState) -> Router {
    let config = state.config();
    let body_limit = usize::try_from(config.body_limit).unwrap_or(usize::MAX);
    let stack = ServiceBuilder::new()
        // Downloads (firmware, files) keep their length, tag and byte ranges: never compressed.
        .layer(
            CompressionLayer::new().compress_when(
                DefaultPredicate::new()
                    .and(NotForContentType::const_new("application/octet-stream"))
                    .and(NotRanged),
            ),
        )
        .layer(middleware::from_fn_with_state(
            security::Headers::new(config),
            security::headers,
        ))
        .layer(security::cors(config))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            finish::finish,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout.0,
        ))
        .layer(DefaultBodyLimit::max(body_limit));
    routes
        .fallback(not_found)
        .layer(stack)
        .with_state(state.clone())
}

async fn not_found() -> ApiError {
    ApiError::new(crate::error::Problem::for_status(StatusCode::NOT_FOUND))
}

/// A panic in a handler is answered with a 500 problem; the server carries on.
#[allow(
    clippy::needless_pass_by_value,
    reason = "the signature CatchPanicLayer::custom asks for"
)]
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    response
        .extensions_mut()
        .insert(InternalCause(format!("handler panicked: {message}")));
    response
}

/// How long `/health/ready` waits for a dependency before it calls it unavailable.
pub(crate) const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
