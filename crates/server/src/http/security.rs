//! Security headers on every response, and CORS from the configured allow-list.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use unhidra_config::Config;

use super::REQUEST_ID;

/// The API's policy: it serves no scripts, styles or frames. Pages (such as `/docs`) set their
/// own, and this one is then left alone.
const API_CSP: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
/// Two years, subdomains included: the value the HSTS preload list asks for.
const HSTS: &str = "max-age=63072000; includeSubDomains";

/// The headers added to every response, computed once from config.
#[derive(Debug, Clone)]
pub(crate) struct Headers(Arc<Vec<(HeaderName, HeaderValue)>>);

impl Headers {
    pub(crate) fn new(config: &Config) -> Self {
        let mut list = vec![
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(API_CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            ),
        ];
        // HSTS only means something over TLS; behind a TLS proxy, the public URL says so.
        if config
            .public_url
            .as_ref()
            .is_some_and(|u| u.scheme() == "https")
        {
            list.push((
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static(HSTS),
            ));
        }
        Self(Arc::new(list))
    }
}

pub(crate) async fn headers(State(headers): State<Headers>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let map = response.headers_mut();
    for (name, value) in headers.0.iter() {
        if !map.contains_key(name) {
            map.insert(name.clone(), value.clone());
        }
    }
    response
}

/// CORS for the origins in `allowed_origins`; `*` allows any origin (without credentials).
pub(crate) fn cors(config: &Config) -> CorsLayer {
    let origins = &config.allowed_origins;
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static(REQUEST_ID),
            HeaderName::from_static("traceparent"),
        ])
        .expose_headers([HeaderName::from_static(REQUEST_ID), header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(600))
}
