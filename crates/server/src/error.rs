//! The one error type of every handler, and the RFC 9457 problem document it becomes.
//!
//! A handler returns [`ApiError`]. Its response carries the [`Problem`] as an extension and no
//! body yet; the request middleware (`http::finish`) fills in the `trace_id`, writes the body
//! and logs the error once. Error responses that did not come from a handler — an unknown
//! route, a body over the limit, a timeout, a panic — are given a problem there too.

use std::borrow::Cow;
use std::error::Error as StdError;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use unhidra_store::StoreError;
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document, as every error is answered.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:unhidra:problem:<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the kind of problem.
    pub title: Cow<'static, str>,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// A stable machine-readable code; see `docs/problems.md`.
    pub code: Cow<'static, str>,
    /// The request's trace id, as in `x-request-id` and the server's logs.
    pub trace_id: String,
    /// One entry per field that failed validation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Members particular to this kind of problem, such as `retry_after`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: Map<String, Value>,
}

/// One rule that one field broke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field, as a JSON pointer into the request (`/email`) or a parameter name.
    pub field: String,
    /// A stable code for the rule, such as `too_short`.
    pub code: Cow<'static, str>,
    /// The rule in words.
    pub message: String,
}

impl FieldError {
    /// A broken rule on a field.
    pub fn new(
        field: impl Into<String>,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            code: code.into(),
            message: message.into(),
        }
    }
}

impl Problem {
    /// A problem of the given status and code; the title comes from the status.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        detail: impl Into<String>,
    ) -> Self {
        let code = code.into();
        Self {
            type_uri: format!("urn:unhidra:problem:{code}"),
            title: Cow::Borrowed(status.canonical_reason().unwrap_or("Error")),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            trace_id: String::new(),
            errors: Vec::new(),
            extensions: Map::new(),
        }
    }

    /// The problem for an error status that carries none of its own.
    pub fn for_status(status: StatusCode) -> Self {
        let (code, detail) = match status {
            StatusCode::BAD_REQUEST => ("bad_request", "The request is malformed."),
            StatusCode::UNAUTHORIZED => ("unauthorized", "Authentication is required."),
            StatusCode::FORBIDDEN => ("forbidden", "This is not allowed for you."),
            StatusCode::NOT_FOUND => ("not_found", "There is nothing at this path."),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method_not_allowed",
                "This path does not accept this method.",
            ),
            StatusCode::REQUEST_TIMEOUT => (
                "request_timeout",
                "The request took longer than the server allows.",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "payload_too_large",
                "The request body is larger than the server accepts.",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "The request body has a content type this endpoint does not accept.",
            ),
            StatusCode::UNPROCESSABLE_ENTITY => ("validation_failed", "The request is invalid."),
            StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "Too many requests."),
            StatusCode::SERVICE_UNAVAILABLE => {
                ("unavailable", "The service cannot answer right now.")
            }
            s if s.is_server_error() => ("internal", "An internal error occurred."),
            _ => ("http_error", "The request failed."),
        };
        Self::new(status, code, detail)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Adds a member particular to this kind of problem.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }
}

/// What a handler returns when it cannot answer as asked.
#[derive(Debug)]
pub struct ApiError {
    /// Boxed so that `Result<T, ApiError>` stays small on the happy path.
    problem: Box<Problem>,
    /// Why, for the log only: never shown to the client.
    source: Option<Box<dyn StdError + Send + Sync>>,
}

/// The internal cause of a 5xx, passed from a handler to the middleware that logs it.
#[derive(Debug, Clone)]
pub(crate) struct InternalCause(pub String);

impl ApiError {
    /// Any problem.
    pub fn new(problem: Problem) -> Self {
        Self {
            problem: Box::new(problem),
            source: None,
        }
    }

    /// 400 with a stable code.
    pub fn bad_request(code: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> Self {
        Self::new(Problem::new(StatusCode::BAD_REQUEST, code, detail))
    }

    /// 401, with the detail saying what is missing.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            detail,
        ))
    }

    /// 404 for a thing that does not exist or that the caller may not see.
    pub fn not_found(what: &str) -> Self {
        Self::new(Problem::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("No such {what}."),
        ))
    }

    /// 422 with one entry per broken rule.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let mut problem = Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "The request is invalid; see errors.",
        );
        problem.errors = errors;
        Self::new(problem)
    }

    /// 503 naming what is unavailable.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            detail,
        ))
    }

    /// A streamed body that could not be read to its end (the client went away, a malformed
    /// chunk): 400.
    pub fn unreadable_body(e: &axum::Error) -> Self {
        Self::new(Problem::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("The body could not be read: {e}."),
        ))
    }

    /// 500 for a failure the client cannot act on; `source` goes to the log only.
    pub fn internal(source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            problem: Box::new(Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR)),
            source: Some(source.into()),
        }
    }

    /// Keeps `source` for the log.
    #[must_use]
    pub fn with_source(mut self, source: Box<dyn StdError + Send + Sync>) -> Self {
        self.source = Some(source);
        self
    }

    /// The problem this error is answered with.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        Self::new(problem)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { entity } => Self::not_found(entity),
            StoreError::Conflict { entity, source } => Self::new(Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("This {entity} conflicts with an existing one."),
            ))
            .with_source(source),
            StoreError::Unavailable(source) => Self::new(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "The database is unavailable; try again shortly.",
            ))
            .with_source(source),
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.problem.status().into_response();
        // The headers that go with some problems are derived here, once for every handler.
        if let Some(value) = self
            .problem
            .extensions
            .get("retry_after")
            .and_then(Value::as_i64)
            .and_then(|secs| axum::http::HeaderValue::from_str(&secs.to_string()).ok())
        {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, value);
        }
        if self.problem.status == 401 {
            let challenge = match &*self.problem.code {
                "unauthenticated" => "Bearer",
                _ => "Bearer error=\"invalid_token\"",
            };
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(challenge),
            );
        }
        if let Some(source) = self.source {
            response
                .extensions_mut()
                .insert(InternalCause(error_chain(source.as_ref())));
        }
        response.extensions_mut().insert(*self.problem);
        response
    }
}

pub(crate) use unhidra_core::error_chain;

/// The `429 rate_limited` problem (with `Retry-After`) for a new connection or an HTTP publish
/// that a limit refused.
pub(crate) fn rate_limited(refused: unhidra_chat::Refused, what: &str) -> ApiError {
    ApiError::new(
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "Too many {what} ({}); wait before trying again.",
                refused.scope
            ),
        )
        .with("retry_after", refused.retry_after),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_serialise_per_rfc_9457() {
        let mut problem = ApiError::validation(vec![FieldError::new(
            "/email",
            "invalid_email",
            "not an email",
        )])
        .problem()
        .clone()
        .with("retry_after", 3);
        problem.trace_id = "abc".into();
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(json["type"], "urn:unhidra:problem:validation_failed");
        assert_eq!(json["title"], "Unprocessable Entity");
        assert_eq!(json["status"], 422);
        assert_eq!(json["code"], "validation_failed");
        assert_eq!(json["trace_id"], "abc");
        assert_eq!(json["errors"][0]["field"], "/email");
        assert_eq!(json["retry_after"], 3);
    }

    #[test]
    fn store_errors_never_show_their_source() {
        let err = ApiError::from(StoreError::Other("SELECT secret FROM t".into()));
        let json = serde_json::to_string(err.problem()).unwrap();
        assert!(!json.contains("SELECT"), "{json}");
        assert_eq!(err.problem().status, 500);
    }
}
