//! Every kind of bad input gets its problem+json answer, and internals never leak.

use std::time::Duration;

use crate::helpers::{TestApp, problem};

#[tokio::test]
async fn unknown_route_is_404() {
    let app = TestApp::spawn().await;
    problem(app.get("/no/such/path").await, 404, "not_found").await;
    problem(app.get("/api/v1/nothing").await, 404, "not_found").await;
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .delete(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET"), "{allow}");
    problem(response, 405, "method_not_allowed").await;
    app.shutdown().await;
}

async fn post_echo(app: &TestApp, content_type: Option<&str>, body: &str) -> reqwest::Response {
    let mut request = app.client.post(app.url("/test/echo")).body(body.to_owned());
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn json_bodies_are_checked_in_order() {
    let app = TestApp::spawn().await;
    let ok = post_echo(&app, Some("application/json"), r#"{"name":"a","count":1}"#).await;
    assert_eq!(ok.status(), 200);

    // Malformed JSON: 400 with where it broke.
    let body = problem(
        post_echo(&app, Some("application/json"), r#"{"name": "a", "#).await,
        400,
        "malformed_json",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("line 1"),
        "{body}"
    );

    // No or wrong content type: 415.
    problem(
        post_echo(&app, None, r#"{"name":"a","count":1}"#).await,
        415,
        "unsupported_media_type",
    )
    .await;
    problem(
        post_echo(&app, Some("text/plain"), r#"{"name":"a","count":1}"#).await,
        415,
        "unsupported_media_type",
    )
    .await;

    // Valid JSON of the wrong shape: 422 naming each field.
    let body = problem(
        post_echo(
            &app,
            Some("application/json"),
            r#"{"name":"a","count":"many"}"#,
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "/count");
    assert_eq!(body["errors"][0]["code"], "invalid_type");
    let body = problem(
        post_echo(&app, Some("application/json"), r#"{"name":"a"}"#).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "/count");
    assert_eq!(body["errors"][0]["code"], "missing_field");

    // A rule of the handler's own: 422 in the same format.
    let body = problem(
        post_echo(&app, Some("application/json"), r#"{"name":"","count":1}"#).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["code"], "required");
    app.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.body_limit = 64,
        None,
    )
    .await;
    let big = format!(r#"{{"name":"{}","count":1}}"#, "x".repeat(200));
    problem(
        post_echo(&app, Some("application/json"), &big).await,
        413,
        "payload_too_large",
    )
    .await;
    // Within the limit still works.
    let ok = post_echo(&app, Some("application/json"), r#"{"name":"a","count":1}"#).await;
    assert_eq!(ok.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.body_limit = 64,
        None,
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let chunk = "x".repeat(100);
    let request = format!(
        "POST /test/echo HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_request_over_the_timeout_is_408() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.request_timeout = unhidra_config::HumanDuration(Duration::from_millis(200)),
        None,
    )
    .await;
    problem(app.get("/test/hang").await, 408, "request_timeout").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_panic_is_a_500_problem_and_the_server_carries_on() {
    let app = TestApp::spawn().await;
    let response = app.get("/test/panic").await;
    let body = problem(response, 500, "internal").await;
    let text = body.to_string();
    assert!(!text.contains("boom") && !text.contains("secret"), "{text}");
    assert!(!text.contains(".rs"), "no source paths: {text}");
    // The same server answers the next request.
    assert_eq!(app.get("/health/live").await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_malformed_query_is_not_a_crash() {
    let app = TestApp::spawn().await;
    // Routes without query parameters ignore them; odd bytes must not break anything.
    let response = app.get("/health/live?%ff%fe=%00&&==").await;
    assert_eq!(response.status(), 200);
    app.shutdown().await;
}
