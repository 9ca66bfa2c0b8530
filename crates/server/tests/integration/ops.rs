//! Health, readiness, metrics, the OpenAPI document and the docs explorer.

use unhidra_store::Backend;

use crate::helpers::{TestApp, problem};

async fn ready_reflects_the_store(backend: Backend) {
    let app = TestApp::spawn_with(backend, |_| {}, None).await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);
    assert_eq!(
        live.json::<serde_json::Value>().await.unwrap()["status"],
        "live"
    );
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["status"],
        "ready"
    );

    // A migration missing from the database: not ready, and the problem says why.
    app.db
        .execute_raw("DELETE FROM _sqlx_migrations WHERE version = 2")
        .await;
    let body = problem(app.get("/health/ready").await, 503, "not_ready").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("store") && detail.contains("migrations applied"),
        "{detail}"
    );
    assert_eq!(body["failing"][0], "store");
    // Liveness does not depend on the store.
    assert_eq!(app.get("/health/live").await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn ready_reflects_the_store_sqlite() {
    ready_reflects_the_store(Backend::Sqlite).await;
}

#[tokio::test]
async fn ready_reflects_the_store_postgres() {
    ready_reflects_the_store(Backend::Postgres).await;
}

#[tokio::test]
async fn an_unreachable_store_is_not_ready() {
    let app = TestApp::spawn().await;
    app.state.store().close().await;
    let body = problem(app.get("/health/ready").await, 503, "not_ready").await;
    assert!(
        body["detail"].as_str().unwrap().contains("unreachable"),
        "{body}"
    );
    assert!(
        !body.to_string().contains("sqlx"),
        "no library internals: {body}"
    );
    app.shutdown().await;
}

fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_route_template() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        app.get("/health/live").await;
    }
    app.get("/no/such/thing").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    assert_eq!(
        metric_value(
            &text,
            r#"http_requests_total{method="GET",route="/health/live",status="200"}"#
        ),
        Some(3.0),
        "{text}"
    );
    // An unmatched path is counted under one label, never by its raw path.
    assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
    assert!(!text.contains("/no/such/thing"), "{text}");
    assert!(
        text.contains(
            r#"http_request_duration_seconds_bucket{le="0.0005",method="GET",route="/health/live"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains("# TYPE http_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("unhidra_build_info{"), "{text}");
    assert!(text.contains(r#"version="0.1.0""#), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    app.shutdown().await;
}

/// The room retention job runs when the server starts; `/metrics` counts it by kind.
#[tokio::test]
async fn metrics_count_jobs_by_kind() {
    let app = TestApp::spawn().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = app.get("/metrics").await.text().await.unwrap();
        if metric_value(&text, r#"jobs_completed_total{kind="rooms.retention"}"#)
            .is_some_and(|n| n >= 1.0)
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retention job was not counted: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric_value(&text, r#"jobs_started_total{kind="rooms.retention"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE jobs_run_duration_seconds histogram"),
        "{text}"
    );
    // Retention and the other periodic kinds (audit.prune) start in the default queue.
    assert!(
        metric_value(
            &text,
            r#"jobs_queue_latency_seconds_count{queue="default"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn metrics_can_require_a_token() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.metrics_token = Some(unhidra_config::Secret::new("scrape-me")),
        None,
    )
    .await;
    let response = app.get("/metrics").await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"metrics\""
    );
    problem(response, 401, "unauthorized").await;
    let wrong = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("scrape-mf")
        .send()
        .await
        .unwrap();
    problem(wrong, 401, "unauthorized").await;
    let right = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert!(right.text().await.unwrap().contains("http_requests_total"));
    app.shutdown().await;
}

#[tokio::test]
async fn openapi_document_describes_the_routes() {
    let app = TestApp::spawn().await;
    let response = app.get("/api/v1/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc: serde_json::Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/health/live", "/health/ready", "/metrics"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    app.shutdown().await;
}

/// The committed `docs/openapi.json` is the document this build serves, so that an API change
/// shows up in review. `BLESS=1 cargo test` rewrites it.
#[test]
fn openapi_snapshot_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let current = unhidra_server::openapi().to_pretty_json().unwrap() + "\n";
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(path, &current).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == current,
        "docs/openapi.json is out of date; run `BLESS=1 cargo test -p unhidra-server --test integration openapi_snapshot` and review the diff"
    );
}

#[tokio::test]
async fn docs_explorer_is_served_from_the_binary() {
    let app = TestApp::spawn().await;
    let page = app.get("/docs").await;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from elsewhere"
    );
    for asset in [
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/docs/init.js",
        "/docs/favicon.png",
    ] {
        assert!(html.contains(asset), "{asset} not referenced");
        let response = app.get(asset).await;
        assert_eq!(response.status(), 200, "{asset}");
        assert!(!response.bytes().await.unwrap().is_empty(), "{asset}");
    }
    let init = app.get("/docs/init.js").await.text().await.unwrap();
    assert!(init.contains("/api/v1/openapi.json"));
    app.shutdown().await;
}

/// The database going away under a running server (its connections ended, the database
/// dropped): a request that needs the store answers 503 `store_unavailable`, not 500, and
/// readiness answers 503. PostgreSQL only: an SQLite file cannot be taken away from a process
/// that has it open (an unlinked file stays readable through the open descriptors, and file
/// permissions do not stop root), so there is no faithful way to stage this on SQLite.
#[tokio::test]
async fn a_database_dropped_under_the_server_answers_503_store_unavailable() {
    let db = unhidra_store::testing::TestDb::postgres_database().await;
    let app = TestApp::spawn_on(
        db,
        |_| {},
        None,
        std::sync::Arc::new(unhidra_core::SystemClock),
    )
    .await;
    let (_, token) = crate::helpers::user(&app, "gone@example.com").await;
    app.db.remove_database_now().await;

    let me = app
        .client
        .get(app.url("/api/v1/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body = problem(me, 503, "store_unavailable").await;
    assert!(!body.to_string().contains("unhidra_gone"), "{body}");
    let login = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&serde_json::json!({ "email": "gone@example.com", "password": crate::helpers::PASSWORD }))
        .send()
        .await
        .unwrap();
    problem(login, 503, "store_unavailable").await;
    let ready = problem(app.get("/health/ready").await, 503, "not_ready").await;
    assert_eq!(ready["failing"][0], "store");
    assert_eq!(app.get("/health/live").await.status(), 200);
    app.shutdown().await;
}
