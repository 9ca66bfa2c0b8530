//! The middleware that opens and closes every request: it picks the trace id, runs the request
//! inside a span carrying it, writes the problem body of an error, logs the error once and
//! records the request's metrics.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::{ApiError, InternalCause, PROBLEM_JSON, Problem};
use crate::metrics::InFlight;
use crate::state::AppState;

/// The header that carries the request id both ways.
pub const REQUEST_ID: &str = "x-request-id";
const TRACEPARENT: &str = "traceparent";

/// The trace id of the request being handled, in its extensions for handlers that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceId(pub String);

/// The ids of one request: the trace id that logs carry, and the request id echoed back.
struct Ids {
    trace_id: String,
    request_id: HeaderValue,
}

impl Ids {
    /// A W3C `traceparent` gives the trace id; else a client's `x-request-id` is kept; else one
    /// is made. A client's `x-request-id` is always echoed as it came.
    fn from_headers(headers: &HeaderMap) -> Self {
        let incoming = headers
            .get(REQUEST_ID)
            .filter(|v| is_safe_id(v.as_bytes()))
            .cloned();
        let trace_id = headers
            .get(TRACEPARENT)
            .and_then(|v| traceparent_trace_id(v.as_bytes()))
            .or_else(|| {
                incoming
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            // A thread-local generator: no system call per request.
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let request_id = incoming.unwrap_or_else(|| {
            HeaderValue::from_str(&trace_id).unwrap_or(HeaderValue::from_static("invalid"))
        });
        Self {
            trace_id,
            request_id,
        }
    }
}

/// A request id is kept only if it cannot forge log lines: 1–128 characters of `[A-Za-z0-9._:-]`.
fn is_safe_id(bytes: &[u8]) -> bool {
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The trace id of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, not all zeros.
fn traceparent_trace_id(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = parts.next().is_none()
        && hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then(|| trace.to_owned())
}

pub(crate) async fn finish(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let ids = Ids::from_headers(req.headers());
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!(
        "request",
        trace_id = %ids.trace_id,
        method = %method,
        route = %route,
    );
    req.extensions_mut().insert(TraceId(ids.trace_id.clone()));

    let metrics = state.metrics();
    let in_flight = InFlight::start(&metrics.http_in_flight);
    let mut response = tokio::select! {
        response = next.run(req).instrument(span.clone()) => response,
        () = state.abandoned() => ApiError::new(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "The server is shutting down; retry against another instance or shortly.",
        ))
        .into_response(),
    };
    drop(in_flight);

    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        response = span.in_scope(|| problem_response(response, &ids.trace_id));
    }
    response.headers_mut().insert(REQUEST_ID, ids.request_id);
    let elapsed = started.elapsed();
    metrics.observe_request(
        method.as_str(),
        &route,
        status.as_u16(),
        elapsed.as_secs_f64(),
    );
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "request finished"
        );
    });
    response
}

/// Writes the problem body of an error response, and logs the error: client errors at info
/// (bad input is expected), server errors at error with their internal cause.
fn problem_response(mut response: Response, trace_id: &str) -> Response {
    let status = response.status();
    let given = response.extensions_mut().remove::<Problem>();
    let cause = response.extensions_mut().remove::<InternalCause>();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if given.is_none() && is_problem {
        return response;
    }
    let mut problem = given.unwrap_or_else(|| Problem::for_status(status));
    problem.trace_id = trace_id.to_owned();
    if status.is_server_error() {
        tracing::error!(
            status = status.as_u16(),
            code = %problem.code,
            cause = cause.as_ref().map_or("", |c| c.0.as_str()),
            "request failed"
        );
    } else {
        tracing::info!(
            status = status.as_u16(),
            code = %problem.code,
            detail = %problem.detail,
            "request rejected"
        );
    }
    let body = serde_json::to_vec(&problem).unwrap_or_else(|_| b"{}".to_vec());
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_gives_the_trace_id() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            traceparent_trace_id(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"garbage",
        ] {
            assert_eq!(traceparent_trace_id(bad), None);
        }
    }

    #[test]
    fn unsafe_request_ids_are_replaced() {
        assert!(is_safe_id(b"req-123_abc.def:1"));
        assert!(!is_safe_id(b""));
        assert!(!is_safe_id(b"a b"));
        assert!(!is_safe_id(b"line\nbreak"));
        assert!(!is_safe_id(&[b'a'; 129]));
    }
}
