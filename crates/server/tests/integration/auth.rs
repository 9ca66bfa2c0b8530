//! Identity over HTTP: accounts, tokens, refresh rotation, sessions, lockout, admin, audit.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{Duration, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use unhidra_core::ManualClock;
use unhidra_store::Backend;
use unhidra_store::testing::TestDb;

use crate::helpers::{TestApp, import_users, problem, shape};

const PASSWORD: &str = "maple orbit candle frost 42";
const ADMIN: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "velvet thunder quietly seven lamps";

fn with_admin(c: &mut unhidra_config::Config) {
    c.admin_email = Some(ADMIN.to_owned());
    c.admin_password = Some(unhidra_config::Secret::new(ADMIN_PASSWORD));
}

async fn post(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn register(app: &TestApp, email: &str) -> reqwest::Response {
    post(
        app,
        "/api/v1/auth/register",
        json!({ "email": email, "password": PASSWORD }),
    )
    .await
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    post(
        app,
        "/api/v1/auth/login",
        json!({ "email": email, "password": password }),
    )
    .await
}

/// Registers and logs in; returns the token pair.
async fn signed_in(app: &TestApp, email: &str) -> Value {
    assert_eq!(register(app, email).await.status(), 201);
    let response = login(app, email, PASSWORD).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn get_with(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn access(pair: &Value) -> String {
    pair["access_token"].as_str().unwrap().to_owned()
}

fn refresh_token(pair: &Value) -> String {
    pair["refresh_token"].as_str().unwrap().to_owned()
}

fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// An Ed25519 key as PEM, and the key pair itself for signing test tokens.
fn ed25519_pem() -> (String, Vec<u8>) {
    let rng = ring::rand::SystemRandom::new();
    let der = Ed25519KeyPair::generate_pkcs8(&rng)
        .unwrap()
        .as_ref()
        .to_vec();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(&der)
    );
    (pem, der)
}

async fn audit_kinds(app: &TestApp) -> Vec<String> {
    app.db
        .store
        .audit_events(None, 500)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn user_count(app: &TestApp) -> u64 {
    app.db.store.list_users(None, 0, 1).await.unwrap().total
}

#[tokio::test]
async fn register_normalises_and_refuses_duplicates() {
    let app = TestApp::spawn().await;
    let response = post(
        &app,
        "/api/v1/auth/register",
        json!({ "email": "  Ada@Example.COM ", "password": PASSWORD, "display_name": "Ada" }),
    )
    .await;
    assert_eq!(response.status(), 201);
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["display_name"], "Ada");
    assert_eq!(user["role"], "user");
    assert_eq!(user["email_verified"], false);
    assert!(user.get("password_hash").is_none());

    let body = problem(register(&app, "ADA@example.com").await, 409, "email_taken").await;
    assert!(body["detail"].is_string());
    assert_eq!(user_count(&app).await, 1);
    assert_eq!(audit_kinds(&app).await, ["user.registered"]);
    app.shutdown().await;
}

/// With accounts hidden, registering a taken email answers like a new registration: status,
/// headers and body alike but for the id and time, and what a new account stores beyond the
/// account itself (its audit event, its verification token) is done after the answer, as the
/// taken email's notice is.
#[tokio::test]
async fn hidden_accounts_answer_a_taken_email_like_a_new_one() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.hide_existing_accounts = true,
        None,
    )
    .await;
    let first = register(&app, "eve@example.com").await;
    let second = register(&app, "eve@example.com").await;
    let (first, second) = (
        shape(first, &["id", "created_at"]).await,
        shape(second, &["id", "created_at"]).await,
    );
    assert_eq!(first.status, 201);
    assert_eq!(first, second);
    assert_eq!(user_count(&app).await, 1, "nothing stored the second time");
    let mails = app.mails().await;
    assert_eq!(mails.len(), 2, "a verification, then a notice");
    assert_eq!(audit_kinds(&app).await, ["user.registered"]);
    app.shutdown().await;
}

#[tokio::test]
async fn weak_passwords_get_one_error_per_rule_and_store_nothing() {
    let app = TestApp::spawn().await;
    let response = post(
        &app,
        "/api/v1/auth/register",
        json!({ "email": "frank.castle@example.com", "password": "password1" }),
    )
    .await;
    let body = problem(response, 422, "validation_failed").await;
    let codes: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["field"], "/password");
            e["code"].as_str().unwrap()
        })
        .collect();
    assert_eq!(codes, ["too_short", "common_password", "too_weak"]);

    let response = post(
        &app,
        "/api/v1/auth/register",
        json!({ "email": "frank.castle@example.com", "password": "frank.castle-likes-long-walks" }),
    )
    .await;
    let body = problem(response, 422, "validation_failed").await;
    assert!(
        body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == "contains_email")
    );

    let response = post(
        &app,
        "/api/v1/auth/register",
        json!({ "email": "not-an-email", "password": PASSWORD }),
    )
    .await;
    let body = problem(response, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "/email");
    assert_eq!(body["errors"][0]["code"], "invalid_email");
    assert_eq!(user_count(&app).await, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn login_issues_an_rfc_9068_access_token_and_me_works() {
    let app = TestApp::spawn().await;
    let pair = signed_in(&app, "gus@example.com").await;
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    assert!(refresh_token(&pair).len() >= 43, "at least 256 bits");
    let token = access(&pair);
    let header = jwt_part(&token, 0);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], header["kid"]);
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    let claims = jwt_part(&token, 1);
    for claim in ["iss", "aud", "sub", "sid", "role", "iat", "exp", "jti"] {
        assert!(!claims[claim].is_null(), "{claim} missing: {claims}");
    }
    assert_eq!(claims["aud"], "unhidra");
    assert_eq!(claims["role"], "user");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );

    let me: Value = get_with(&app, "/api/v1/auth/me", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["email"], "gus@example.com");
    assert_eq!(me["id"], claims["sub"]);
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "hana@example.com").await.status(), 201);
    let wrong = problem(
        login(&app, "hana@example.com", "wrong password here!").await,
        401,
        "invalid_credentials",
    )
    .await;
    let unknown = problem(
        login(&app, "nobody@example.com", PASSWORD).await,
        401,
        "invalid_credentials",
    )
    .await;
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("trace_id");
        v
    };
    assert_eq!(strip(wrong), strip(unknown));
    // Not an email at all: refused as input, before any limit or lookup.
    let body = problem(
        login(&app, "not an email", PASSWORD).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "/email", "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_good_token_are_refused() {
    let app = TestApp::spawn().await;
    let response = app.get("/api/v1/auth/me").await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    problem(response, 401, "unauthenticated").await;
    let response = get_with(&app, "/api/v1/auth/me", "not.a.jwt").await;
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    problem(response, 401, "invalid_token").await;
    app.shutdown().await;
}

#[tokio::test]
async fn forged_tokens_are_refused() {
    let (pem, der) = ed25519_pem();
    let db = TestDb::new(crate::helpers::default_backend()).await;
    let app = TestApp::spawn_on(
        db,
        |c| c.signing_key = Some(unhidra_config::Secret::new(pem.clone())),
        None,
        Arc::new(unhidra_core::SystemClock),
    )
    .await;
    let pair = signed_in(&app, "ivan@example.com").await;
    let good = access(&pair);
    let header = jwt_part(&good, 0);
    let claims = jwt_part(&good, 1);
    assert_eq!(get_with(&app, "/api/v1/auth/me", &good).await.status(), 200);

    let sign = |claims: &Value, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.typ = Some("at+jwt".into());
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    };
    let ours = EncodingKey::from_ed_der(&der);
    let kid = header["kid"].as_str().unwrap();
    // Signed with the real key, the same claims pass: the forgeries below fail for one reason each.
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &sign(&claims, kid, &ours))
            .await
            .status(),
        200
    );

    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.example.com");
    let mut expired = claims.clone();
    expired["exp"] = json!(Utc::now().timestamp() - 10);
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let other = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let other_key = EncodingKey::from_ed_der(other.as_ref());

    let public = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(kid.to_owned());
    hs.typ = Some("at+jwt".into());
    let hs256 = jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(&public)).unwrap();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "at+jwt", "kid": kid}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut no_typ = Header::new(Algorithm::EdDSA);
    no_typ.kid = Some(kid.to_owned());
    let plain_jwt = jsonwebtoken::encode(&no_typ, &claims, &ours).unwrap();
    let mut tampered = good.clone();
    tampered.insert(good.rfind('.').unwrap() + 2, 'A');

    for (name, token, code) in [
        ("wrong aud", sign(&wrong_aud, kid, &ours), "invalid_token"),
        ("wrong iss", sign(&wrong_iss, kid, &ours), "invalid_token"),
        ("expired", sign(&expired, kid, &ours), "token_expired"),
        ("no exp", sign(&no_exp, kid, &ours), "invalid_token"),
        (
            "unknown kid",
            sign(&claims, "not-a-key", &other_key),
            "invalid_token",
        ),
        (
            "other key, our kid",
            sign(&claims, kid, &other_key),
            "invalid_token",
        ),
        ("HS256 with the public key", hs256, "invalid_token"),
        ("alg none", none, "invalid_token"),
        ("typ JWT", plain_jwt, "invalid_token"),
        ("tampered signature", tampered, "invalid_token"),
    ] {
        let response = get_with(&app, "/api/v1/auth/me", &token).await;
        assert_eq!(response.status(), 401, "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{name}: {body}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn access_tokens_expire_with_the_clock() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |_| {},
        None,
        clock.clone(),
    )
    .await;
    let pair = signed_in(&app, "jane@example.com").await;
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&pair))
            .await
            .status(),
        200
    );
    clock.advance(Duration::minutes(16));
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&pair)).await,
        401,
        "token_expired",
    )
    .await;
    // The refresh token still works and gives a fresh access token.
    let fresh: Value = post(
        &app,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": refresh_token(&pair) }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&fresh))
            .await
            .status(),
        200
    );
    // Past the refresh token's own lifetime, it is refused.
    clock.advance(Duration::days(15));
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&fresh) }),
        )
        .await,
        401,
        "invalid_refresh_token",
    )
    .await;
    app.shutdown().await;
}

async fn refresh_rotates_and_reuse_revokes_the_session(backend: Backend) {
    let app = TestApp::spawn_with(backend, |_| {}, None).await;
    let first = signed_in(&app, "kim@example.com").await;
    let second: Value = post(
        &app,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": refresh_token(&first) }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_ne!(refresh_token(&first), refresh_token(&second));
    assert_eq!(
        jwt_part(&access(&first), 1)["sid"],
        jwt_part(&access(&second), 1)["sid"]
    );
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&second))
            .await
            .status(),
        200
    );

    // The first refresh token again: someone replays it. The whole session ends.
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&first) }),
        )
        .await,
        401,
        "refresh_token_reused",
    )
    .await;
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&second)).await,
        401,
        "session_revoked",
    )
    .await;
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&second) }),
        )
        .await,
        401,
        "invalid_refresh_token",
    )
    .await;
    assert!(
        audit_kinds(&app)
            .await
            .contains(&"refresh.reused".to_owned())
    );
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": "made-up" }),
        )
        .await,
        401,
        "invalid_refresh_token",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session_sqlite() {
    refresh_rotates_and_reuse_revokes_the_session(Backend::Sqlite).await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session_postgres() {
    refresh_rotates_and_reuse_revokes_the_session(Backend::Postgres).await;
}

#[tokio::test]
async fn logout_and_session_revocation_take_effect_at_once() {
    let app = TestApp::spawn().await;
    let laptop = signed_in(&app, "lee@example.com").await;
    let phone: Value = login(&app, "lee@example.com", PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let sessions: Value = get_with(&app, "/api/v1/auth/sessions", &access(&laptop))
        .await
        .json()
        .await
        .unwrap();
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    assert_eq!(sessions[0]["ip"], "127.0.0.1");

    // Revoke the phone's session from the laptop.
    let phone_sid = jwt_part(&access(&phone), 1)["sid"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = app
        .client
        .delete(app.url(&format!("/api/v1/auth/sessions/{phone_sid}")))
        .bearer_auth(access(&laptop))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&phone)).await,
        401,
        "session_revoked",
    )
    .await;

    // Someone else's session is not found, whatever its id.
    let other = signed_in(&app, "mia@example.com").await;
    let other_sid = jwt_part(&access(&other), 1)["sid"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = app
        .client
        .delete(app.url(&format!("/api/v1/auth/sessions/{other_sid}")))
        .bearer_auth(access(&laptop))
        .send()
        .await
        .unwrap();
    problem(response, 404, "not_found").await;
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&other))
            .await
            .status(),
        200
    );

    let response = app
        .client
        .post(app.url("/api/v1/auth/logout"))
        .bearer_auth(access(&laptop))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&laptop)).await,
        401,
        "session_revoked",
    )
    .await;
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&laptop) }),
        )
        .await,
        401,
        "invalid_refresh_token",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn ten_failures_lock_the_account_and_the_lock_ends() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |_| {},
        None,
        clock.clone(),
    )
    .await;
    assert_eq!(register(&app, "ned@example.com").await.status(), 201);
    for _ in 0..10 {
        problem(
            login(&app, "ned@example.com", "not the password at all").await,
            401,
            "invalid_credentials",
        )
        .await;
        // Slow enough to stay under the five-per-minute throttle.
        clock.advance(Duration::seconds(13));
    }
    // Locked: even the right password is refused until the lock ends.
    let response = login(&app, "ned@example.com", PASSWORD).await;
    assert_eq!(response.headers()["retry-after"], "47");
    let body = problem(response, 429, "account_locked").await;
    assert_eq!(body["retry_after"], 47);
    clock.advance(Duration::seconds(48));
    assert_eq!(login(&app, "ned@example.com", PASSWORD).await.status(), 200);
    let kinds = audit_kinds(&app).await;
    assert!(kinds.contains(&"account.locked".to_owned()), "{kinds:?}");
    app.shutdown().await;
}

/// Statuses of 20 wrong passwords for one account, sent all at once or one after another, and
/// the failures the store counted.
async fn twenty_wrong_passwords(backend: Backend, at_once: bool) -> (Vec<u16>, u32) {
    let app = TestApp::spawn_with(backend, |_| {}, None).await;
    assert_eq!(register(&app, "olga@example.com").await.status(), 201);
    let attempt = || {
        let client = app.client.clone();
        let url = app.url("/api/v1/auth/login");
        async move {
            client
                .post(url)
                .json(
                    &json!({ "email": "olga@example.com", "password": "wrong wrong wrong wrong" }),
                )
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let mut statuses = Vec::new();
    if at_once {
        let tasks: Vec<_> = (0..20).map(|_| tokio::spawn(attempt())).collect();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
    } else {
        for _ in 0..20 {
            statuses.push(attempt().await);
        }
    }
    statuses.sort_unstable();
    let stored = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("olga@example.com").unwrap())
        .await
        .unwrap();
    // The right password is throttled too: the limit is on attempts, not on failures only.
    problem(
        login(&app, "olga@example.com", PASSWORD).await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
    (statuses, stored.failed_logins)
}

async fn parallel_failures_lock_exactly_like_sequential_ones(backend: Backend) {
    let sequential = twenty_wrong_passwords(backend, false).await;
    let parallel = twenty_wrong_passwords(backend, true).await;
    let expected: Vec<u16> = [401; 5].into_iter().chain([429; 15]).collect();
    assert_eq!(sequential, (expected.clone(), 5));
    assert_eq!(parallel, (expected, 5), "no attempt slipped past the limit");
}

#[tokio::test]
async fn parallel_failures_lock_exactly_like_sequential_ones_sqlite() {
    parallel_failures_lock_exactly_like_sequential_ones(Backend::Sqlite).await;
}

#[tokio::test]
async fn parallel_failures_lock_exactly_like_sequential_ones_postgres() {
    parallel_failures_lock_exactly_like_sequential_ones(Backend::Postgres).await;
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_role() {
    let app = TestApp::spawn_with(crate::helpers::default_backend(), with_admin, None).await;
    let user = signed_in(&app, "pat@example.com").await;
    for path in ["/api/v1/auth/users", "/api/v1/admin/logs"] {
        problem(get_with(&app, path, &access(&user)).await, 403, "forbidden").await;
        problem(app.get(path).await, 401, "unauthenticated").await;
    }
    let admin: Value = login(&app, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let page: Value = get_with(
        &app,
        "/api/v1/auth/users?q=PAT&page=1&page_size=10",
        &access(&admin),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(page["total"], 1);
    assert_eq!(
        (page["page"].as_u64(), page["page_size"].as_u64()),
        (Some(1), Some(10))
    );
    assert_eq!(page["items"][0]["email"], "pat@example.com");
    let all: Value = get_with(&app, "/api/v1/auth/users", &access(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["total"], 2);
    for bad in [
        "page=0",
        "page_size=0",
        "page_size=201",
        "page=x",
        "sort=name",
    ] {
        let response = get_with(&app, &format!("/api/v1/auth/users?{bad}"), &access(&admin)).await;
        problem(response, 422, "validation_failed").await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn deactivation_revokes_everything_at_once() {
    let app = TestApp::spawn_with(crate::helpers::default_backend(), with_admin, None).await;
    let admin: Value = login(&app, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let user = signed_in(&app, "quinn@example.com").await;
    let id = jwt_part(&access(&user), 1)["sub"]
        .as_str()
        .unwrap()
        .to_owned();
    let patch = |body: Value, who: String, id: String| {
        app.client
            .patch(app.url(&format!("/api/v1/admin/users/{id}")))
            .bearer_auth(who)
            .json(&body)
            .send()
    };
    let changed: Value = patch(json!({ "active": false }), access(&admin), id.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(changed["active"], false);
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&user)).await,
        401,
        "session_revoked",
    )
    .await;
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&user) }),
        )
        .await,
        401,
        "invalid_refresh_token",
    )
    .await;
    problem(
        login(&app, "quinn@example.com", PASSWORD).await,
        403,
        "account_disabled",
    )
    .await;

    // Promote after reactivation; the role applies to the next request, not the next token.
    let changed: Value = patch(
        json!({ "active": true, "role": "admin" }),
        access(&admin),
        id.clone(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (changed["active"].as_bool(), changed["role"].as_str()),
        (Some(true), Some("admin"))
    );
    let again: Value = login(&app, "quinn@example.com", PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        get_with(&app, "/api/v1/auth/users", &access(&again))
            .await
            .status(),
        200
    );

    // An admin cannot lock themselves out, and a bad role is a validation error.
    let admin_id = jwt_part(&access(&admin), 1)["sub"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = patch(json!({ "role": "user" }), access(&admin), admin_id)
        .await
        .unwrap();
    problem(response, 409, "cannot_change_self").await;
    let response = patch(json!({ "role": "owner" }), access(&admin), id.clone())
        .await
        .unwrap();
    problem(response, 422, "validation_failed").await;
    let response = patch(
        json!({ "active": false }),
        access(&admin),
        uuid::Uuid::new_v4().to_string(),
    )
    .await
    .unwrap();
    problem(response, 404, "not_found").await;
    let kinds = audit_kinds(&app).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "user.updated").count(),
        2,
        "{kinds:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn bulk_actions_report_each_id() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            with_admin(c);
            c.lockout_threshold = 3;
        },
        None,
    )
    .await;
    let admin: Value = login(&app, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let a: Value = register(&app, "ray@example.com")
        .await
        .json()
        .await
        .unwrap();
    let b: Value = register(&app, "sam@example.com")
        .await
        .json()
        .await
        .unwrap();
    let missing = uuid::Uuid::new_v4().to_string();
    let bulk = |action: &'static str, ids: Vec<Value>| {
        app.client
            .post(app.url("/api/v1/admin/users/bulk"))
            .bearer_auth(access(&admin))
            .json(&json!({ "ids": ids, "action": action }))
            .send()
    };
    let summary: Value = bulk(
        "deactivate",
        vec![
            a["id"].clone(),
            b["id"].clone(),
            json!(missing),
            json!("junk"),
        ],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(summary["updated"].as_array().unwrap().len(), 2);
    assert_eq!(summary["not_found"], json!([missing, "junk"]));
    let summary: Value = bulk("deactivate", vec![a["id"].clone()])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["unchanged"], json!([a["id"]]));
    let summary: Value = bulk("activate", vec![a["id"].clone()])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["updated"], json!([a["id"]]));
    let response = bulk("delete", vec![a["id"].clone()]).await.unwrap();
    problem(response, 422, "validation_failed").await;

    // Unlock clears a lock after failed logins.
    for _ in 0..3 {
        login(&app, "ray@example.com", "not the password at all").await;
    }
    problem(
        login(&app, "ray@example.com", PASSWORD).await,
        429,
        "account_locked",
    )
    .await;
    let summary: Value = bulk("unlock", vec![a["id"].clone(), b["id"].clone()])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["updated"], json!([a["id"]]));
    assert_eq!(summary["unchanged"], json!([b["id"]]));
    assert_eq!(login(&app, "ray@example.com", PASSWORD).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn the_audit_log_pages_newest_first() {
    let app = TestApp::spawn_with(crate::helpers::default_backend(), with_admin, None).await;
    let admin: Value = login(&app, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    login(&app, ADMIN, "wrong password entirely").await;
    let page: Value = get_with(&app, "/api/v1/admin/logs?limit=2", &access(&admin))
        .await
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items[0]["kind"], "login.failed");
    assert_eq!(items[0]["detail"]["reason"], "wrong_password");
    assert!(items[0]["trace_id"].is_string());
    assert_eq!(items[1]["kind"], "login.succeeded");
    let before = page["next_before"].as_i64().unwrap();
    let older: Value = get_with(
        &app,
        &format!("/api/v1/admin/logs?limit=10&before={before}"),
        &access(&admin),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(
        older["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "user.registered")
    );
    assert!(older["next_before"].is_null());
    problem(
        get_with(&app, "/api/v1/admin/logs?limit=0", &access(&admin)).await,
        422,
        "validation_failed",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid_until_retired() {
    let app = TestApp::spawn().await;
    let before = signed_in(&app, "tara@example.com").await;
    let old_kid = jwt_part(&access(&before), 0)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let identity = app.state.identity();
    let new_kid = unhidra_server::identity::keys::rotate(&*app.db.store, Utc::now())
        .await
        .unwrap();
    identity.keys().reload().await.unwrap();
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
        "{kids:?}"
    );
    // No one is logged out, and new tokens use the new key.
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&before))
            .await
            .status(),
        200
    );
    let after: Value = login(&app, "tara@example.com", PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(jwt_part(&access(&after), 0)["kid"], new_kid.as_str());
    // The signing key cannot be retired; the old one can, and its tokens stop working.
    assert!(
        unhidra_server::identity::keys::retire(&*app.db.store, &new_kid, Utc::now())
            .await
            .is_err()
    );
    unhidra_server::identity::keys::retire(&*app.db.store, &old_kid, Utc::now())
        .await
        .unwrap();
    identity.keys().reload().await.unwrap();
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&before)).await,
        401,
        "invalid_token",
    )
    .await;
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&after))
            .await
            .status(),
        200
    );
    app.shutdown().await;
}

#[tokio::test]
async fn outdated_hashes_are_upgraded_at_login() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "uma@example.com").await.status(), 201);
    let email = unhidra_core::Email::parse("uma@example.com").unwrap();
    let old = app
        .db
        .store
        .user_by_email(&email)
        .await
        .unwrap()
        .password_hash;
    assert!(old.contains("m=1024,t=1,p=1"), "{old}");
    let mut db = app.stop_keeping_db().await;
    db.reopen().await;
    let app = TestApp::spawn_on(
        db,
        |c| c.argon2_memory_kib = 2048,
        None,
        Arc::new(unhidra_core::SystemClock),
    )
    .await;
    assert_eq!(login(&app, "uma@example.com", PASSWORD).await.status(), 200);
    let new = app
        .db
        .store
        .user_by_email(&email)
        .await
        .unwrap()
        .password_hash;
    assert!(new.contains("m=2048,t=1,p=1"), "{new}");
    // And the new hash still takes the password.
    assert_eq!(login(&app, "uma@example.com", PASSWORD).await.status(), 200);
    app.shutdown().await;
}

async fn login_from(
    app: &TestApp,
    client_ip: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/auth/login"))
        .header("x-forwarded-for", client_ip)
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

/// Runs an async test body `name(backend)` once on SQLite and once on PostgreSQL, as
/// `name::sqlite` and `name::postgres`.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(unhidra_store::Backend::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(unhidra_store::Backend::Postgres).await;
            }
        }
    };
}

/// A server behind a trusted proxy at 127.0.0.1, so that tests choose client addresses.
async fn behind_proxy(
    backend: Backend,
    tweak: impl FnOnce(&mut unhidra_config::Config),
) -> TestApp {
    TestApp::spawn_with(
        backend,
        |c| {
            c.trusted_proxies = vec!["127.0.0.1".to_owned()];
            tweak(c);
        },
        None,
    )
    .await
}

const WRONG: &str = "nope nope nope nope";

/// Five failures from one address for one account throttle that pair only: the same address
/// logs in to another account, and the account's owner logs in from elsewhere.
async fn failures_throttle_the_address_and_account_pair(backend: Backend) {
    let app = behind_proxy(backend, |_| {}).await;
    assert_eq!(register(&app, "vic@example.com").await.status(), 201);
    assert_eq!(register(&app, "wes@example.com").await.status(), 201);
    for _ in 0..5 {
        let r = login_from(&app, "10.1.1.1", "vic@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    let response = login_from(&app, "10.1.1.1", "vic@example.com", PASSWORD).await;
    assert!(response.headers().contains_key("retry-after"));
    let body = problem(response, 429, "rate_limited").await;
    assert!(
        (1..=60).contains(&body["retry_after"].as_i64().unwrap()),
        "{body}"
    );
    // A neighbour's failures do not stop a correct password for another account...
    assert_eq!(
        login_from(&app, "10.1.1.1", "wes@example.com", PASSWORD)
            .await
            .status(),
        200
    );
    // ...and the owner, elsewhere, is not refused.
    assert_eq!(
        login_from(&app, "10.2.2.2", "vic@example.com", PASSWORD)
            .await
            .status(),
        200
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"auth_rate_limited_total{route="login"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"auth_logins_total{result="success"} 2"#),
        "{metrics}"
    );
    assert!(audit_kinds(&app).await.contains(&"rate_limited".to_owned()));
    app.shutdown().await;
}
on_both_backends!(failures_throttle_the_address_and_account_pair);

/// One address spraying a password over many accounts is stopped by the address's own cap.
async fn spraying_from_one_address_is_capped(backend: Backend) {
    let app = behind_proxy(backend, |c| c.rate_limit_login_ip_per_minute = 12).await;
    assert_eq!(register(&app, "vic@example.com").await.status(), 201);
    for i in 0..12 {
        let r = login_from(&app, "10.1.1.1", &format!("guess{i}@example.com"), WRONG).await;
        assert_eq!(
            r.status(),
            401,
            "attempt {i}: one failure per account is below the pair limit"
        );
    }
    problem(
        login_from(&app, "10.1.1.1", "vic@example.com", PASSWORD).await,
        429,
        "rate_limited",
    )
    .await;
    // Another address is not affected.
    assert_eq!(
        login_from(&app, "10.2.2.2", "vic@example.com", PASSWORD)
            .await
            .status(),
        200
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"auth_failures_total{reason="unknown_email"} 12"#),
        "{metrics}"
    );
    app.shutdown().await;
}
on_both_backends!(spraying_from_one_address_is_capped);

#[tokio::test]
async fn the_address_cap_defaults_to_thirty_failures_a_minute() {
    let app = behind_proxy(crate::helpers::default_backend(), |_| {}).await;
    for i in 0..30 {
        let r = login_from(&app, "10.1.1.1", &format!("g{i}@example.com"), WRONG).await;
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    problem(
        login_from(&app, "10.1.1.1", "g99@example.com", WRONG).await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
}

/// Failures from many addresses cannot keep the owner's correct password out: below the
/// lockout threshold nothing refuses it, and the lockout is what protects the account.
async fn others_cannot_throttle_an_account(backend: Backend) {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(backend).await,
        |c| c.trusted_proxies = vec!["127.0.0.1".to_owned()],
        None,
        clock.clone(),
    )
    .await;
    assert_eq!(register(&app, "vic@example.com").await.status(), 201);
    for i in 0..9 {
        let r = login_from(&app, &format!("10.3.3.{i}"), "vic@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    assert_eq!(
        login_from(&app, "10.4.4.4", "vic@example.com", PASSWORD)
            .await
            .status(),
        200,
        "nine failures from elsewhere do not refuse the owner"
    );
    // Ten consecutive failures lock the account, from however many addresses...
    for i in 0..10 {
        let r = login_from(&app, &format!("10.5.5.{i}"), "vic@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    let locked = problem(
        login_from(&app, "10.4.4.4", "vic@example.com", PASSWORD).await,
        429,
        "account_locked",
    )
    .await;
    assert_eq!(locked["retry_after"], 60);
    // ...and each next lock lasts twice as long.
    clock.advance(Duration::seconds(61));
    for i in 0..10 {
        let r = login_from(&app, &format!("10.6.6.{i}"), "vic@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    let locked = problem(
        login_from(&app, "10.4.4.4", "vic@example.com", PASSWORD).await,
        429,
        "account_locked",
    )
    .await;
    assert_eq!(locked["retry_after"], 120);
    app.shutdown().await;
}
on_both_backends!(others_cannot_throttle_an_account);

/// Wrong passwords sent at once from twenty addresses are judged like twenty in a row: ten
/// are checked and lock the account, and none gets past the lockout.
async fn parallel_failures_from_many_addresses_stop_at_the_lockout(backend: Backend) {
    let app = behind_proxy(backend, |_| {}).await;
    assert_eq!(register(&app, "vic@example.com").await.status(), 201);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let client = app.client.clone();
            let url = app.url("/api/v1/auth/login");
            tokio::spawn(async move {
                client
                    .post(url)
                    .header("x-forwarded-for", format!("10.7.7.{i}"))
                    .json(&json!({ "email": "vic@example.com", "password": WRONG }))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses.sort_unstable();
    let expected: Vec<u16> = [401; 10].into_iter().chain([429; 10]).collect();
    assert_eq!(statuses, expected);
    let stored = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("vic@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored.failed_logins, 10,
        "no guess slipped past the lockout"
    );
    app.shutdown().await;
}
on_both_backends!(parallel_failures_from_many_addresses_stop_at_the_lockout);

/// An admin's unlock ends the lock and every address's throttle for the account.
async fn an_unlock_clears_the_account_throttles(backend: Backend) {
    let app = behind_proxy(backend, with_admin).await;
    let admin: Value = login(&app, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let vic: Value = register(&app, "vic@example.com")
        .await
        .json()
        .await
        .unwrap();
    for address in ["10.1.1.1", "10.2.2.2"] {
        for _ in 0..5 {
            let r = login_from(&app, address, "vic@example.com", WRONG).await;
            assert_eq!(r.status(), 401);
        }
    }
    problem(
        login_from(&app, "10.1.1.1", "vic@example.com", PASSWORD).await,
        429,
        "rate_limited",
    )
    .await;
    problem(
        login_from(&app, "10.3.3.3", "vic@example.com", PASSWORD).await,
        429,
        "account_locked",
    )
    .await;
    let summary: Value = app
        .client
        .post(app.url("/api/v1/admin/users/bulk"))
        .bearer_auth(access(&admin))
        .json(&json!({ "ids": [vic["id"]], "action": "unlock" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["updated"], json!([vic["id"]]), "{summary}");
    assert_eq!(
        login_from(&app, "10.1.1.1", "vic@example.com", PASSWORD)
            .await
            .status(),
        200,
        "the address that failed five times is let in again"
    );
    // The count starts afresh: five more failures from there before a refusal.
    for _ in 0..5 {
        let r = login_from(&app, "10.2.2.2", "vic@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    problem(
        login_from(&app, "10.2.2.2", "vic@example.com", WRONG).await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
}
on_both_backends!(an_unlock_clears_the_account_throttles);

/// With accounts hidden, a locked account answers exactly like an unknown email: status,
/// problem and headers alike (and the same Argon2 work, which no test times).
async fn hidden_accounts_do_not_tell_a_lock(backend: Backend) {
    let app = behind_proxy(backend, |c| c.hide_existing_accounts = true).await;
    assert_eq!(register(&app, "lia@example.com").await.status(), 201);
    lock_out(&app, "lia@example.com").await;
    let locked = login_from(&app, "10.3.3.3", "lia@example.com", PASSWORD).await;
    let unknown = login_from(&app, "10.3.3.3", "nobody@example.com", PASSWORD).await;
    let unknown = shape(unknown, &[]).await;
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.body["code"], "invalid_credentials");
    assert_eq!(shape(locked, &[]).await, unknown);
    app.shutdown().await;
}

/// Ten wrong passwords from two addresses (five each, the pair limit): the account is locked.
async fn lock_out(app: &TestApp, email: &str) {
    for address in ["10.1.1.1", "10.2.2.2"] {
        for _ in 0..5 {
            let r = login_from(app, address, email, WRONG).await;
            assert_eq!(r.status(), 401);
        }
    }
    assert_eq!(
        app.db
            .store
            .user_by_email(&unhidra_core::Email::parse(email).unwrap())
            .await
            .unwrap()
            .failed_logins,
        10,
        "locked"
    );
}

/// A login password longer than 1024 bytes (four for each of the 256 characters the policy
/// allows) is refused before the account is looked up or anything is hashed, with the answer
/// of a wrong password, alike for every email; it is no account's failure. One of 1024 bytes
/// is checked as usual. At a re-authentication, an overlong password is a wrong one.
async fn overlong_passwords_are_wrong_unhashed(backend: Backend) {
    let app = behind_proxy(backend, |c| c.hide_existing_accounts = true).await;
    assert_eq!(register(&app, "ann@example.com").await.status(), 201);
    verified(&app, "ann@example.com").await;
    let response = login(&app, "ann@example.com", PASSWORD).await;
    assert_eq!(response.status(), 200);
    let pair: Value = response.json().await.unwrap();
    let overlong = "é".repeat(513);
    assert_eq!(overlong.len(), 1026);
    let failures = || async {
        app.db
            .store
            .user_by_email(&unhidra_core::Email::parse("ann@example.com").unwrap())
            .await
            .unwrap()
            .failed_logins
    };
    let known = shape(
        login_from(&app, "10.6.6.6", "ann@example.com", &overlong).await,
        &[],
    )
    .await;
    let unknown = shape(
        login_from(&app, "10.6.6.6", "nobody@example.com", &overlong).await,
        &[],
    )
    .await;
    let wrong = shape(
        login_from(&app, "10.6.6.6", "ann@example.com", WRONG).await,
        &[],
    )
    .await;
    assert_eq!(known.status, 401);
    assert_eq!(known, unknown);
    assert_eq!(known, wrong);
    assert_eq!(failures().await, 1, "only the wrong password counted");
    let events = app.db.store.audit_events(None, 500).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "login.failed" && e.detail.contains("password_too_long"))
            .count(),
        2
    );
    let longest = "a".repeat(1024);
    let r = login_from(&app, "10.7.7.7", "ann@example.com", &longest).await;
    problem(r, 401, "invalid_credentials").await;
    assert_eq!(failures().await, 2, "checked, and wrong");

    let reauth = app
        .client
        .post(app.url("/api/v1/auth/reauthenticate"))
        .bearer_auth(access(&pair))
        .json(&json!({ "current_password": overlong }))
        .send()
        .await
        .unwrap();
    problem(reauth, 422, "validation_failed").await;
    assert_eq!(failures().await, 3, "a wrong current password");
    app.shutdown().await;
}
on_both_backends!(overlong_passwords_are_wrong_unhashed);

/// Marks `email`'s address as verified, as following the mailed link does.
async fn verified(app: &TestApp, email: &str) {
    let user = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse(email).unwrap())
        .await
        .unwrap();
    app.db
        .store
        .set_email_verified(user.id, chrono::Utc::now())
        .await
        .unwrap();
}

/// With accounts hidden, an account is usable once its address is verified: else whoever
/// registers an email with a password of their choosing and logs in with it would learn
/// whether the email was free. The right password of an unverified account answers like a
/// wrong one and mails a fresh link; after following it, the login works.
async fn hidden_accounts_log_in_only_once_verified(backend: Backend) {
    let app = behind_proxy(backend, |c| c.hide_existing_accounts = true).await;
    assert_eq!(register(&app, "new@example.com").await.status(), 201);
    let mailed = app.mails().await.len();
    let unknown = shape(
        login_from(&app, "10.7.7.7", "nobody@example.com", WRONG).await,
        &[],
    )
    .await;
    let right = shape(
        login_from(&app, "10.7.7.7", "new@example.com", PASSWORD).await,
        &[],
    )
    .await;
    assert_eq!(
        right, unknown,
        "the right password of an unverified account"
    );
    let mails = app.mails().await;
    assert_eq!(mails.len(), mailed + 1, "a fresh verification link");
    let code = mails.last().unwrap().code();
    let followed = post(&app, "/api/v1/auth/verify-email", json!({ "token": code })).await;
    assert_eq!(followed.status(), 204);
    assert_eq!(login(&app, "new@example.com", PASSWORD).await.status(), 200);
    app.shutdown().await;
}
on_both_backends!(hidden_accounts_log_in_only_once_verified);

/// An Argon2id hash of [`PASSWORD`] at `memory_kib` KiB and one pass.
async fn argon2_hash(memory_kib: u32) -> String {
    use unhidra_server::identity::hasher::{HashParams, Hasher};
    Hasher::new(
        HashParams {
            memory_kib,
            iterations: 1,
            parallelism: 1,
        },
        1,
    )
    .unwrap()
    .hash(PASSWORD)
    .await
    .unwrap()
}

/// With accounts hidden, a wrong password gets the answer of an unknown email whatever the
/// account holds: a current hash, an imported legacy SHA-256 digest, an imported Argon2 hash
/// cheaper or costlier than new ones, a lock. (Cheaper hashes are padded to the cost of a
/// new one; costlier ones are flagged by the import. Timing is measured by
/// `unhidra-bench login-timing`, never asserted here.)
async fn hidden_accounts_answer_every_wrong_password_alike(backend: Backend) {
    let app = behind_proxy(backend, |c| c.hide_existing_accounts = true).await;
    assert_eq!(register(&app, "ann@example.com").await.status(), 201);
    assert_eq!(register(&app, "lia@example.com").await.status(), 201);
    lock_out(&app, "lia@example.com").await;
    let sha256 = unhidra_core::secret::hash_hex(format!("NaCl{PASSWORD}").as_bytes());
    let summary = import_users(
        &app,
        &[
            json!({ "email": "leg@example.com", "sha256": sha256, "salt": "NaCl", "email_verified": true }),
            json!({ "email": "low@example.com", "password_hash": argon2_hash(64).await, "email_verified": true }),
            json!({ "email": "big@example.com", "password_hash": argon2_hash(4096).await, "email_verified": true }),
        ],
    )
    .await;
    assert_eq!(summary.imported, 3);
    assert_eq!(
        summary.costlier,
        ["big@example.com"],
        "the test profile hashes with 1024 KiB"
    );
    let unknown = shape(
        login_from(&app, "10.4.4.4", "nobody@example.com", WRONG).await,
        &[],
    )
    .await;
    assert_eq!(unknown.status, 401);
    for email in [
        "ann@example.com",
        "leg@example.com",
        "low@example.com",
        "big@example.com",
        "lia@example.com",
    ] {
        let answer = shape(login_from(&app, "10.4.4.4", email, WRONG).await, &[]).await;
        assert_eq!(answer, unknown, "{email}");
    }
    // The padding changes nothing for the right password: the imported hashes still verify,
    // and are upgraded.
    for email in ["leg@example.com", "low@example.com", "big@example.com"] {
        assert_eq!(
            login_from(&app, "10.5.5.5", email, PASSWORD).await.status(),
            200,
            "{email}"
        );
        let stored = app
            .db
            .store
            .user_by_email(&unhidra_core::Email::parse(email).unwrap())
            .await
            .unwrap();
        assert!(
            stored
                .password_hash
                .starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
            "{email}: {}",
            stored.password_hash
        );
    }
    app.shutdown().await;
}
on_both_backends!(hidden_accounts_answer_every_wrong_password_alike);

on_both_backends!(hidden_accounts_do_not_tell_a_lock);

/// Attempts from one IPv6 network count together (a /64 by default): a client cannot dodge
/// the limit by moving within its network.
#[tokio::test]
async fn ipv6_clients_are_limited_per_network() {
    let app = behind_proxy(crate::helpers::default_backend(), |_| {}).await;
    assert_eq!(register(&app, "vic@example.com").await.status(), 201);
    for i in 1..=5 {
        let r = login_from(
            &app,
            &format!("2001:db8:1:2::{i:x}"),
            "vic@example.com",
            WRONG,
        )
        .await;
        assert_eq!(r.status(), 401);
    }
    problem(
        login_from(
            &app,
            "2001:db8:1:2:ffff:ffff:ffff:ffff",
            "vic@example.com",
            WRONG,
        )
        .await,
        429,
        "rate_limited",
    )
    .await;
    // The next /64 is another client.
    assert_eq!(
        login_from(&app, "2001:db8:1:3::1", "vic@example.com", WRONG)
            .await
            .status(),
        401
    );
    app.shutdown().await;

    // The prefix is configurable: with /128 every address is its own client.
    let app = behind_proxy(crate::helpers::default_backend(), |c| {
        c.rate_limit_ipv6_prefix = 128;
    })
    .await;
    assert_eq!(register(&app, "vic@example.com").await.status(), 201);
    for i in 1..=6 {
        let r = login_from(
            &app,
            &format!("2001:db8:1:2::{i:x}"),
            "vic@example.com",
            WRONG,
        )
        .await;
        assert_eq!(r.status(), 401);
    }
    app.shutdown().await;
}

/// An email that does not parse is refused before any limit is touched, so an attacker's
/// megabyte of "email" is never a key kept in memory, and never uses up anyone's attempts.
#[tokio::test]
async fn unparsable_emails_are_refused_before_the_limits() {
    let app = behind_proxy(crate::helpers::default_backend(), |_| {}).await;
    let huge = "a".repeat(512 * 1024);
    for email in ["not an email", huge.as_str(), "x@", "@example.com"] {
        for _ in 0..6 {
            problem(
                login_from(&app, "10.1.1.1", email, WRONG).await,
                422,
                "validation_failed",
            )
            .await;
        }
    }
    let reset = app
        .client
        .post(app.url("/api/v1/auth/password-reset"))
        .header("x-forwarded-for", "10.1.1.1")
        .json(&json!({ "email": huge }))
        .send()
        .await
        .unwrap();
    problem(reset, 422, "validation_failed").await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("auth_rate_limited_total{"), "{metrics}");
    // The address has all its attempts left.
    for _ in 0..5 {
        let r = login_from(&app, "10.1.1.1", "vic@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn forwarded_for_is_ignored_without_a_trusted_proxy() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        let r = login_from(&app, &format!("10.9.9.{i}"), "x@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    // Every attempt came from 127.0.0.1, whatever the header said.
    problem(
        login_from(&app, "10.9.9.99", "x@example.com", WRONG).await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn registrations_and_refreshes_are_limited_per_address() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.rate_limit_register_per_hour = 2;
            c.rate_limit_refresh_per_minute = 2;
        },
        None,
    )
    .await;
    let pair = signed_in(&app, "wes@example.com").await;
    assert_eq!(register(&app, "xena@example.com").await.status(), 201);
    problem(
        register(&app, "yuri@example.com").await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(
        user_count(&app).await,
        2,
        "a refused registration stores nothing"
    );
    let next: Value = post(
        &app,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": refresh_token(&pair) }),
    )
    .await
    .json()
    .await
    .unwrap();
    post(
        &app,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": "junk" }),
    )
    .await;
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&next) }),
        )
        .await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn audit_events_are_also_json_lines_in_a_file() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.audit_minimise = true,
        None,
    )
    .await;
    signed_in(&app, "wil@example.com").await;
    let stored = app.db.store.audit_events(None, 10).await.unwrap();
    assert_eq!(
        stored[0].ip.as_deref(),
        Some("127.0.0.0/24"),
        "minimised before it is stored"
    );
    let text = std::fs::read_to_string(app.data_dir().join("audit/audit.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["user.registered", "login.succeeded"]);
    assert_eq!(lines[1]["ip"], "127.0.0.0/24");
    assert_eq!(lines[1]["id"], stored[0].id);
    assert!(lines[1]["trace_id"].is_string());
    assert!(
        !text.contains("wil@example.com"),
        "no emails in the audit log"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_retry_within_the_grace_window_gets_the_same_successor() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |c| c.refresh_reuse_grace = unhidra_config::HumanDuration::secs(10),
        None,
        clock.clone(),
    )
    .await;
    let first = signed_in(&app, "xia@example.com").await;
    let refresh = |token: String| {
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": token }),
        )
    };
    let a: Value = refresh(refresh_token(&first)).await.json().await.unwrap();
    clock.advance(Duration::seconds(3));
    // The second tab retries with the same token: same successor, session intact.
    let b = refresh(refresh_token(&first)).await;
    assert_eq!(b.status(), 200);
    let b: Value = b.json().await.unwrap();
    assert_eq!(refresh_token(&a), refresh_token(&b));
    assert_eq!(
        get_with(&app, "/api/v1/auth/me", &access(&b))
            .await
            .status(),
        200
    );
    // Once the successor is used, the old token is a replay again, grace or not.
    let c: Value = refresh(refresh_token(&b)).await.json().await.unwrap();
    problem(
        refresh(refresh_token(&first)).await,
        401,
        "refresh_token_reused",
    )
    .await;
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&c)).await,
        401,
        "session_revoked",
    )
    .await;

    // And past the window, a retry is a replay.
    let other = signed_in(&app, "yan@example.com").await;
    refresh(refresh_token(&other)).await;
    clock.advance(Duration::seconds(11));
    problem(
        refresh(refresh_token(&other)).await,
        401,
        "refresh_token_reused",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn admins_rotate_and_retire_keys_over_the_api() {
    let app = TestApp::spawn_with(crate::helpers::default_backend(), with_admin, None).await;
    let admin: Value = login(&app, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let old_kid = jwt_part(&access(&admin), 0)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let call =
        |path: String, token: String| app.client.post(app.url(&path)).bearer_auth(token).send();
    let rotated = call("/api/v1/admin/keys/rotate".into(), access(&admin))
        .await
        .unwrap();
    assert_eq!(rotated.status(), 201);
    let new_kid = rotated.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let keys: Value = get_with(&app, "/api/v1/admin/keys", &access(&admin))
        .await
        .json()
        .await
        .unwrap();
    let signing: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["signing"] == true)
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(signing, [new_kid.as_str()]);
    let refused = call(
        format!("/api/v1/admin/keys/{new_kid}/retire"),
        access(&admin),
    )
    .await
    .unwrap();
    problem(refused, 409, "key_in_use").await;
    let missing = call(
        "/api/v1/admin/keys/no-such-kid/retire".into(),
        access(&admin),
    )
    .await
    .unwrap();
    problem(missing, 404, "not_found").await;
    assert_eq!(
        call(
            format!("/api/v1/admin/keys/{old_kid}/retire"),
            access(&admin)
        )
        .await
        .unwrap()
        .status(),
        204
    );
    // The admin's own token was signed by the old key: it stops working too.
    problem(
        get_with(&app, "/api/v1/auth/me", &access(&admin)).await,
        401,
        "invalid_token",
    )
    .await;
    let kinds = audit_kinds(&app).await;
    assert!(kinds.contains(&"key.rotated".to_owned()) && kinds.contains(&"key.retired".to_owned()));

    // With the key in the configuration, rotation is refused with the way to do it.
    let (pem, _) = ed25519_pem();
    let configured = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            with_admin(c);
            c.signing_key = Some(unhidra_config::Secret::new(pem.clone()));
        },
        None,
    )
    .await;
    let admin: Value = login(&configured, ADMIN, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let response = configured
        .client
        .post(configured.url("/api/v1/admin/keys/rotate"))
        .bearer_auth(access(&admin))
        .send()
        .await
        .unwrap();
    problem(response, 409, "signing_key_configured").await;
    configured.shutdown().await;
    app.shutdown().await;
}

/// Argon2 hashes costing more than `argon2_max_*` are refused at import, naming the line, and
/// one stored before the ceiling was lowered is never verified at login (so one login cannot
/// allocate what the hash asks for): the login is refused, logged and audited, and counts as
/// no failure of the user's.
async fn costly_hashes_are_refused(backend: Backend) {
    use unhidra_server::identity::RequestContext;
    use unhidra_server::identity::hasher::{HashParams, Hasher};
    use unhidra_server::identity::import::ImportError;

    let costly = Hasher::new(
        HashParams {
            memory_kib: 2048,
            iterations: 1,
            parallelism: 1,
        },
        1,
    )
    .unwrap()
    .hash(PASSWORD)
    .await
    .unwrap();
    let line = |email: &str| json!({ "email": email, "password_hash": costly }).to_string();
    let app = TestApp::spawn_with(backend, |_| {}, None).await;
    let summary = app
        .state
        .identity()
        .import_users(&line("old@example.com"), &RequestContext::default())
        .await
        .unwrap();
    assert_eq!(summary.imported, 1, "under the default ceiling");
    let mut db = app.stop_keeping_db().await;
    db.reopen().await;
    let app = TestApp::spawn_on(
        db,
        |c| c.argon2_max_memory_kib = 1024,
        None,
        Arc::new(unhidra_core::SystemClock),
    )
    .await;

    let text = format!(
        "{}\n{}\n",
        json!({ "email": "fine@example.com", "sha256": "ab".repeat(32) }),
        line("new@example.com")
    );
    let refused = app
        .state
        .identity()
        .import_users(&text, &RequestContext::default())
        .await;
    let Err(ImportError::Invalid(problems)) = refused else {
        panic!("imported: {refused:?}");
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with(
            "line 2: password_hash: its Argon2 memory (KiB) 2048 is above argon2_max_memory_kib = 1024"
        ),
        "{problems:?}"
    );
    assert!(!problems[0].contains(&costly), "the hash is not repeated");
    assert_eq!(user_count(&app).await, 1, "nothing imported");

    problem(
        login(&app, "old@example.com", PASSWORD).await,
        401,
        "invalid_credentials",
    )
    .await;
    let stored = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("old@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(stored.password_hash, costly, "not rehashed");
    assert_eq!(stored.failed_logins, 0, "not the user's failure");
    let events = app.db.store.audit_events(None, 50).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "login.refused" && e.detail.contains("hash_over_ceiling")),
        "{events:?}"
    );
    app.shutdown().await;
}
on_both_backends!(costly_hashes_are_refused);

/// A session ends `session_max_age` after its login however often it is refreshed: then even a
/// refresh token well inside `refresh_token_ttl` is refused with 401 `invalid_refresh_token`.
#[tokio::test]
async fn a_session_past_its_max_age_cannot_be_refreshed() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |c| c.session_max_age = unhidra_config::HumanDuration::secs(3600),
        None,
        clock.clone(),
    )
    .await;
    let first = signed_in(&app, "aging@example.com").await;
    clock.advance(Duration::minutes(50));
    let refreshed = post(
        &app,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": refresh_token(&first) }),
    )
    .await;
    assert_eq!(refreshed.status(), 200, "inside the session's age");
    let second: Value = refreshed.json().await.unwrap();
    // Twenty minutes on, the second refresh token is twenty minutes old (its lifetime is
    // 14 days), but the session is seventy.
    clock.advance(Duration::minutes(20));
    problem(
        post(
            &app,
            "/api/v1/auth/refresh",
            json!({ "refresh_token": refresh_token(&second) }),
        )
        .await,
        401,
        "invalid_refresh_token",
    )
    .await;
    assert!(
        !audit_kinds(&app)
            .await
            .contains(&"refresh.reused".to_owned()),
        "an aged-out session is not a replay"
    );
    app.shutdown().await;
}

/// Two nodes over one database. A key rotated on one node is trusted by the other at the first
/// token it signs (an unknown `kid` makes the keyset reload), a retirement on one node reaches
/// the other within a minute (nodes reread the keys every minute), and the other node then
/// signs with the newest key. Time moves on the first node's clock only.
#[tokio::test]
async fn another_nodes_rotation_and_retirement_are_picked_up() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let a = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        with_admin,
        None,
        clock.clone(),
    )
    .await;
    let b = a
        .spawn_beside(with_admin, Arc::new(unhidra_core::SystemClock))
        .await;
    let kid = |pair: &Value| {
        jwt_part(&access(pair), 0)["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let from_a = signed_in(&a, "nodes@example.com").await;
    let old_kid = kid(&from_a);
    let admin: Value = login(&b, ADMIN, ADMIN_PASSWORD).await.json().await.unwrap();
    let rotated = b
        .client
        .post(b.url("/api/v1/admin/keys/rotate"))
        .bearer_auth(access(&admin))
        .send()
        .await
        .unwrap();
    assert!(rotated.status().is_success(), "{}", rotated.status());
    let new_kid = rotated.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let from_b: Value = login(&b, "nodes@example.com", PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kid(&from_b), new_kid, "b signs with its new key at once");

    // An unknown kid is looked up at most every 5 s; a's keys were loaded when it started.
    clock.advance(Duration::seconds(6));
    assert_eq!(
        get_with(&a, "/api/v1/auth/me", &access(&from_b))
            .await
            .status(),
        200,
        "a trusts b's new key at its first token"
    );
    let jwks: Value = a.get("/.well-known/jwks.json").await.json().await.unwrap();
    assert!(jwks.to_string().contains(&new_kid), "{jwks}");

    // b retires the old key; within a minute a refuses its tokens and signs with the new one.
    let admin: Value = login(&b, ADMIN, ADMIN_PASSWORD).await.json().await.unwrap();
    let retired = b
        .client
        .post(b.url(&format!("/api/v1/admin/keys/{old_kid}/retire")))
        .bearer_auth(access(&admin))
        .send()
        .await
        .unwrap();
    assert!(retired.status().is_success(), "{}", retired.status());
    clock.advance(Duration::seconds(61));
    problem(
        get_with(&a, "/api/v1/auth/me", &access(&from_a)).await,
        401,
        "invalid_token",
    )
    .await;
    let again: Value = login(&a, "nodes@example.com", PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kid(&again), new_kid, "a signs with the newest key");
    assert_eq!(
        get_with(&a, "/api/v1/auth/me", &access(&again))
            .await
            .status(),
        200
    );
    b.shutdown().await;
    a.shutdown().await;
}
