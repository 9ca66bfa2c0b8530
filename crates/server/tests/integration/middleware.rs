//! Request ids, security headers, CORS and compression on every response.

use crate::helpers::{TestApp, problem};

#[tokio::test]
async fn every_response_has_a_request_id() {
    let app = TestApp::spawn().await;
    let a = app.get("/health/live").await;
    let b = app.get("/health/live").await;
    let id = |r: &reqwest::Response| r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id(&a).len(), 32);
    assert_ne!(id(&a), id(&b));

    // A problem's trace id is the generated request id.
    let response = app.get("/missing").await;
    let request_id = id(&response);
    let body = problem(response, 404, "not_found").await;
    assert_eq!(body["trace_id"], request_id.as_str());
    app.shutdown().await;
}

#[tokio::test]
async fn an_incoming_request_id_is_kept() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/missing"))
        .header("x-request-id", "client-req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-req-42");
    let body = problem(response, 404, "not_found").await;
    assert_eq!(body["trace_id"], "client-req-42");

    // An id that could forge log lines is replaced.
    let response = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "evil id\twith spaces")
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_ne!(id, "evil id\twith spaces");
    assert_eq!(id.len(), 32);
    app.shutdown().await;
}

#[tokio::test]
async fn a_traceparent_gives_the_trace_id() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/missing"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-request-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    let body = problem(response, 404, "not_found").await;
    assert_eq!(body["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    app.shutdown().await;
}

#[tokio::test]
async fn security_headers_on_success_and_error() {
    let app = TestApp::spawn().await;
    for path in ["/health/live", "/missing", "/test/panic"] {
        let response = app.get(path).await;
        let h = response.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        // No TLS in front: no HSTS.
        assert!(!h.contains_key("strict-transport-security"), "{path}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn hsts_when_served_over_https() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.public_url = Some("https://unhidra.example.com".parse().unwrap()),
        None,
    )
    .await;
    let response = app.get("/health/live").await;
    let hsts = response.headers()["strict-transport-security"]
        .to_str()
        .unwrap();
    assert!(hsts.starts_with("max-age=63072000"), "{hsts}");
    app.shutdown().await;
}

#[tokio::test]
async fn cors_follows_the_allow_list() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.allowed_origins = vec!["https://app.example.com".to_owned()],
        None,
    )
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/health/live"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("GET"), "{methods}");
    let refused = preflight("https://evil.example.com").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );

    // Errors carry CORS headers too, so a browser app can read the problem.
    let response = app
        .client
        .get(app.url("/missing"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(
        response.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("x-request-id")
    );
    app.shutdown().await;
}

#[tokio::test]
async fn large_responses_are_compressed() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    app.shutdown().await;
}
