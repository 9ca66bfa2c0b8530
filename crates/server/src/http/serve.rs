//! Serving stored bytes over HTTP, for firmware images and files alike: a strong entity tag,
//! `If-None-Match` (304), one `Range` (206, or 416 past the end) honouring `If-Range`, `HEAD`,
//! and a body streamed from a reader in bounded pieces.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Problem};

/// The largest piece read at once.
const READ_CHUNK: usize = 64 * 1024;

/// What a request gets of an entity of `size` bytes tagged `etag` (quoted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// `If-None-Match` names it: 304.
    NotModified,
    /// `len` bytes from `start`; `partial`: a 206 for a `Range`.
    Send { start: u64, len: u64, partial: bool },
    /// A `Range` past the end: 416 ([`unsatisfiable`]).
    Unsatisfiable,
}

/// What to send for `headers`.
pub(crate) fn plan(headers: &HeaderMap, etag: &str, size: u64) -> Plan {
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| names_etag(v, etag))
    {
        return Plan::NotModified;
    }
    match wanted_range(headers, etag, size) {
        Ok(Some(r)) => Plan::Send {
            start: *r.start(),
            len: r.end() - r.start() + 1,
            partial: true,
        },
        Ok(None) => Plan::Send {
            start: 0,
            len: size,
            partial: false,
        },
        Err(()) => Plan::Unsatisfiable,
    }
}

/// The 416 answer for an entity of `size` bytes.
pub(crate) fn unsatisfiable(size: u64) -> Response {
    let Ok(unsatisfied) = HeaderValue::from_str(&format!("bytes */{size}")) else {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    };
    (
        [(header::CONTENT_RANGE, unsatisfied)],
        ApiError::new(
            Problem::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("It has {size} bytes."),
            )
            .with("size", size),
        ),
    )
        .into_response()
}

/// The start of the answer to `plan`: its status, `ETag`, `Accept-Ranges`, and for bytes
/// sent, `Content-Length` (and `Content-Range`).
pub(crate) fn start(plan: Plan, etag: &str, size: u64) -> axum::http::response::Builder {
    let response = Response::builder()
        .header(header::ETAG, etag)
        .header(header::ACCEPT_RANGES, "bytes");
    match plan {
        Plan::NotModified => response.status(StatusCode::NOT_MODIFIED),
        Plan::Unsatisfiable => response.status(StatusCode::RANGE_NOT_SATISFIABLE),
        Plan::Send {
            start,
            len,
            partial,
        } => {
            let response = response.header(header::CONTENT_LENGTH, len);
            if partial {
                response.status(StatusCode::PARTIAL_CONTENT).header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{size}", start + len - 1),
                )
            } else {
                response
            }
        }
    }
}

/// A body that streams `len` bytes from `reader`.
pub(crate) fn body(reader: impl tokio::io::AsyncRead + Send + 'static, len: u64) -> Body {
    let capacity = usize::try_from(len).unwrap_or(READ_CHUNK).min(READ_CHUNK);
    Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        reader, capacity,
    ))
}

/// Whether an `If-None-Match` value names this entity tag (weak comparison, as RFC 9110 says
/// for it), or is `*`.
fn names_etag(value: &str, etag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// The one range to serve: `None` for the whole image (no `Range`, an `If-Range` that is not
/// this image's strong tag, a `Range` that does not parse, or several ranges); `Err` when it
/// cannot be satisfied (416).
fn wanted_range(
    headers: &HeaderMap,
    etag: &str,
    size: u64,
) -> Result<Option<std::ops::RangeInclusive<u64>>, ()> {
    use http_range_header::RangeUnsatisfiableError;
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    // If-Range: a date, or any tag but this image's own, means the client's copy may be of
    // something else; it gets the whole image.
    if headers
        .get(header::IF_RANGE)
        .is_some_and(|v| v.as_bytes() != etag.as_bytes())
    {
        return Ok(None);
    }
    match http_range_header::parse_range_header(range).and_then(|r| r.validate(size)) {
        Ok(ranges) if ranges.len() == 1 => Ok(ranges.into_iter().next()),
        Ok(_) | Err(RangeUnsatisfiableError::Invalid(_)) => Ok(None),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let tag = "\"abc\"";
        let range = |pairs: &[(header::HeaderName, &str)]| wanted_range(&headers(pairs), tag, 1000);
        assert_eq!(range(&[]), Ok(None));
        assert_eq!(range(&[(header::RANGE, "bytes=0-99")]), Ok(Some(0..=99)));
        assert_eq!(range(&[(header::RANGE, "bytes=900-")]), Ok(Some(900..=999)));
        assert_eq!(range(&[(header::RANGE, "bytes=-10")]), Ok(Some(990..=999)));
        assert_eq!(
            range(&[(header::RANGE, "bytes=990-5000")]),
            Ok(Some(990..=999))
        );
        assert_eq!(range(&[(header::RANGE, "bytes=1000-")]), Err(()));
        assert_eq!(range(&[(header::RANGE, "bytes=0-1,5-9")]), Ok(None));
        assert_eq!(range(&[(header::RANGE, "pages=1-2")]), Ok(None));
        assert_eq!(range(&[(header::RANGE, "bytes=9-1")]), Ok(None));
        assert_eq!(
            range(&[(header::RANGE, "bytes=0-9"), (header::IF_RANGE, tag)]),
            Ok(Some(0..=9))
        );
        for other in ["\"other\"", "W/\"abc\"", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            assert_eq!(
                range(&[(header::RANGE, "bytes=0-9"), (header::IF_RANGE, other)]),
                Ok(None),
                "{other}"
            );
        }
    }

    #[test]
    fn if_none_match_compares_weakly() {
        assert!(names_etag("\"abc\"", "\"abc\""));
        assert!(names_etag("W/\"abc\"", "\"abc\""));
        assert!(names_etag("\"x\", \"abc\"", "\"abc\""));
        assert!(names_etag("*", "\"abc\""));
        assert!(!names_etag("\"abcd\"", "\"abc\""));
    }
}
