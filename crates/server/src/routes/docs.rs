//! `/docs`: the interactive API explorer (Swagger UI), served from assets embedded in the
//! binary so that it works offline.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

/// The explorer loads its scripts and styles from here only; Swagger UI sets inline styles.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

const HTML: &str = include_str!("../../assets/docs.html");
const INIT_JS: &str = include_str!("../../assets/docs-init.js");
const BUNDLE_JS: &str = include_str!("../../assets/swagger-ui/swagger-ui-bundle.js");
const CSS: &str = include_str!("../../assets/swagger-ui/swagger-ui.css");
const FAVICON: &[u8] = include_bytes!("../../assets/swagger-ui/favicon-32x32.png");

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/docs",
            get(|| async { asset("text/html; charset=utf-8", HTML.as_bytes(), false) }),
        )
        .route(
            "/docs/init.js",
            get(|| async { asset("text/javascript; charset=utf-8", INIT_JS.as_bytes(), false) }),
        )
        .route(
            "/docs/swagger-ui-bundle.js",
            get(|| async { asset("text/javascript; charset=utf-8", BUNDLE_JS.as_bytes(), true) }),
        )
        .route(
            "/docs/swagger-ui.css",
            get(|| async { asset("text/css; charset=utf-8", CSS.as_bytes(), true) }),
        )
        .route(
            "/docs/favicon.png",
            get(|| async { asset("image/png", FAVICON, true) }),
        )
}

fn asset(content_type: &'static str, body: &'static [u8], long_lived: bool) -> Response {
    let cache = if long_lived {
        // The vendored files change only with the binary; a day keeps upgrades visible.
        "public, max-age=86400"
    } else {
        "no-cache"
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(DOCS_CSP),
            ),
        ],
        axum::body::Bytes::from_static(body),
    )
        .into_response()
}
