//! Extractors whose rejections are problems: a malformed body or query is answered in the same
//! format as every other error, with the field that was wrong.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError, Problem};

/// A JSON request body. Rejects a wrong content type with 415, a body over the limit with 413,
/// malformed JSON with 400 and JSON of the wrong shape with 422 naming each field.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Send the body as application/json.",
            )
            .into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(Problem::for_status(StatusCode::PAYLOAD_TOO_LARGE))
            } else {
                ApiError::bad_request("unreadable_body", "The request body could not be read.")
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses a JSON object into `T`, with problems that say where it went wrong. Every request
/// body of the API is an object; serde would otherwise also read a struct from an array.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        // Valid JSON of another type is a shape error; anything else is malformed.
        if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
            return Err(ApiError::validation(vec![FieldError::new(
                "/",
                "invalid_type",
                "the body must be a JSON object",
            )]));
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let inner = err.inner();
        if inner.is_data() {
            ApiError::validation(vec![field_error(&err.path().to_string(), inner)])
        } else {
            malformed(inner)
        }
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

fn malformed(err: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "malformed_json",
        format!(
            "The body is not valid JSON (line {}, column {}).",
            err.line(),
            err.column()
        ),
    )
}

/// Turns serde's message into a field error with a stable code.
fn field_error(path: &str, err: &serde_json::Error) -> FieldError {
    // serde_json appends the position; the pointer already says where.
    let message = err.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_owned();
    let mut pointer = if path == "." {
        String::new()
    } else {
        format!("/{}", path.replace('.', "/"))
    };
    let code = if let Some(name) = backticked(&message, "missing field `") {
        pointer.push('/');
        pointer.push_str(name);
        "missing_field"
    } else if message.starts_with("unknown field `") {
        // The path already ends at the unknown key.
        "unknown_field"
    } else if message.starts_with("invalid type") {
        "invalid_type"
    } else {
        "invalid_value"
    };
    if pointer.is_empty() {
        pointer.push('/');
    }
    FieldError::new(pointer, code, message)
}

fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A query string. Rejects unknown or malformed parameters with 422 naming them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|err| {
                let message = err.inner().to_string();
                let field = backticked(&message, "missing field `")
                    .or_else(|| backticked(&message, "unknown field `"))
                    .map(str::to_owned)
                    .unwrap_or_else(|| err.path().to_string());
                ApiError::validation(vec![FieldError::new(field, "invalid_query", message)])
            })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "fields are read by serde only")]
    struct Body {
        email: String,
        limits: Limits,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "fields are read by serde only")]
    struct Limits {
        count: u32,
    }

    fn field(body: &str) -> FieldError {
        let err = parse_json::<Body>(body.as_bytes()).unwrap_err();
        assert_eq!(err.problem().status, 422, "{err:?}");
        err.problem().errors[0].clone()
    }

    #[test]
    fn shape_errors_name_the_field() {
        let e = field(r#"{"email": "a@b.c"}"#);
        assert_eq!((e.field.as_str(), &*e.code), ("/limits", "missing_field"));
        let e = field(r#"{"email": "a@b.c", "limits": {"count": "x"}}"#);
        assert_eq!(
            (e.field.as_str(), &*e.code),
            ("/limits/count", "invalid_type")
        );
        let e = field(r#"{"email": "a@b.c", "limits": {"count": 1}, "extra": 1}"#);
        assert_eq!((e.field.as_str(), &*e.code), ("/extra", "unknown_field"));
        let e = field(r#"{"email": 5, "limits": {"count": 1}}"#);
        assert_eq!((e.field.as_str(), &*e.code), ("/email", "invalid_type"));
    }

    #[test]
    fn only_objects_are_bodies() {
        for body in [
            "[\"a\", {\"count\": 1}]",
            "[null, null]",
            "\"text\"",
            "3",
            "null",
        ] {
            let err = parse_json::<Body>(body.as_bytes()).unwrap_err();
            assert_eq!(err.problem().status, 422, "{body}");
            assert_eq!(err.problem().errors[0].field, "/", "{body}");
        }
    }

    #[test]
    fn syntax_errors_are_400() {
        for body in [
            "{",
            "not json",
            r#"{"email": "a", "limits": {"count": 1}} trailing"#,
            "",
        ] {
            let err = parse_json::<Body>(body.as_bytes()).unwrap_err();
            assert_eq!(err.problem().code, "malformed_json", "{body}");
        }
    }

    #[test]
    fn json_content_types() {
        let ok = |v: &'static str| is_json(Some(&header::HeaderValue::from_static(v)));
        assert!(ok("application/json"));
        assert!(ok("application/json; charset=utf-8"));
        assert!(ok("application/merge-patch+json"));
        assert!(!ok("text/plain"));
        assert!(!is_json(None));
    }
}
