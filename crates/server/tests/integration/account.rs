//! Flows that go through mail: verification, password change and reset, and account notices.

use serde_json::{Value, json};

use crate::helpers::{TestApp, import_users, problem, shape};

const PASSWORD: &str = "maple orbit candle frost 42";
const NEW_PASSWORD: &str = "harbor lantern seventeen quiet moths";

async fn post(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post_auth(app: &TestApp, path: &str, token: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
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

async fn login_as(app: &TestApp, email: &str, password: &str, agent: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/auth/login"))
        .header("user-agent", agent)
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

async fn token(app: &TestApp, email: &str, password: &str) -> String {
    let response = login_as(app, email, password, "test-agent").await;
    assert_eq!(response.status(), 200);
    let pair: Value = response.json().await.unwrap();
    pair["access_token"].as_str().unwrap().to_owned()
}

async fn me(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .get(app.url("/api/v1/auth/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn registration_mails_a_code_that_verifies_the_email_once() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "amy@example.com").await.status(), 201);
    let mails = app.mails().await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, "amy@example.com");
    assert_eq!(mails[0].subject, "Verify your email address");
    let code = mails[0].code();
    let access = token(&app, "amy@example.com", PASSWORD).await;
    let before: Value = me(&app, &access).await.json().await.unwrap();
    assert_eq!(before["email_verified"], false);

    problem(
        post(
            &app,
            "/api/v1/auth/verify-email",
            json!({ "token": "made-up" }),
        )
        .await,
        400,
        "expired_or_used_token",
    )
    .await;
    let response = post(&app, "/api/v1/auth/verify-email", json!({ "token": code })).await;
    assert_eq!(response.status(), 204);
    let after: Value = me(&app, &access).await.json().await.unwrap();
    assert_eq!(after["email_verified"], true);
    problem(
        post(&app, "/api/v1/auth/verify-email", json!({ "token": code })).await,
        400,
        "expired_or_used_token",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn logins_can_require_a_verified_email() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.require_verified_email = true,
        None,
    )
    .await;
    assert_eq!(register(&app, "ben@example.com").await.status(), 201);
    let first = app.mails().await[0].code();
    problem(
        login_as(&app, "ben@example.com", PASSWORD, "a").await,
        403,
        "email_not_verified",
    )
    .await;
    // A wrong password still says only that the credentials are wrong.
    problem(
        login_as(&app, "ben@example.com", "not the password at all", "a").await,
        401,
        "invalid_credentials",
    )
    .await;
    // Asking again needs a session, which an unverified user cannot get: the code from
    // registration is what they have. A newer code replaces the older one.
    let response = post(&app, "/api/v1/auth/verify-email", json!({ "token": first })).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        login_as(&app, "ben@example.com", PASSWORD, "a")
            .await
            .status(),
        200
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_new_verification_code_replaces_the_old_one() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "cat@example.com").await.status(), 201);
    // The registration's mail goes first: while its job still waits, a second request would
    // join it (one mail, with the newest code), by design.
    app.mail_sent().await;
    let access = token(&app, "cat@example.com", PASSWORD).await;
    let response = post_auth(
        &app,
        "/api/v1/auth/verify-email/request",
        &access,
        json!({}),
    )
    .await;
    assert_eq!(response.status(), 202);
    let mails = app.mails().await;
    assert_eq!(mails.len(), 2);
    let (old, new) = (mails[0].code(), mails[1].code());
    problem(
        post(&app, "/api/v1/auth/verify-email", json!({ "token": old })).await,
        400,
        "expired_or_used_token",
    )
    .await;
    assert_eq!(
        post(&app, "/api/v1/auth/verify-email", json!({ "token": new }))
            .await
            .status(),
        204
    );
    // Verified users are not mailed again.
    post_auth(
        &app,
        "/api/v1/auth/verify-email/request",
        &access,
        json!({}),
    )
    .await;
    assert_eq!(app.mails().await.len(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn a_hidden_duplicate_registration_warns_the_owner_instead() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.hide_existing_accounts = true,
        None,
    )
    .await;
    assert_eq!(register(&app, "dan@example.com").await.status(), 201);
    assert_eq!(register(&app, "dan@example.com").await.status(), 201);
    let mails = app.mails().await;
    // Two jobs, which may be delivered in either order.
    let mut subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    subjects.sort_unstable();
    assert_eq!(
        subjects,
        [
            "Someone tried to create an account with your address",
            "Verify your email address",
        ]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn changing_the_password_ends_other_sessions_and_tells_the_user() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "eli@example.com").await.status(), 201);
    let here = token(&app, "eli@example.com", PASSWORD).await;
    let elsewhere = token(&app, "eli@example.com", PASSWORD).await;
    let change = |current: &'static str, new: &'static str| {
        post_auth(
            &app,
            "/api/v1/auth/password",
            &here,
            json!({ "current_password": current, "new_password": new }),
        )
    };
    let body = problem(
        change("not the current one!", NEW_PASSWORD).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "/current_password");
    let failures = || async {
        let email = unhidra_core::Email::parse("eli@example.com").unwrap();
        app.db
            .store
            .user_by_email(&email)
            .await
            .unwrap()
            .failed_logins
    };
    assert_eq!(
        failures().await,
        1,
        "a wrong current password counts towards the lockout"
    );
    let body = problem(
        change(PASSWORD, "password123").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "/password");
    assert_eq!(change(PASSWORD, NEW_PASSWORD).await.status(), 204);
    assert_eq!(failures().await, 0, "the right one resets the count");

    assert_eq!(me(&app, &here).await.status(), 200, "this session goes on");
    problem(me(&app, &elsewhere).await, 401, "session_revoked").await;
    problem(
        login_as(&app, "eli@example.com", PASSWORD, "test-agent").await,
        401,
        "invalid_credentials",
    )
    .await;
    assert_eq!(
        login_as(&app, "eli@example.com", NEW_PASSWORD, "test-agent")
            .await
            .status(),
        200
    );
    let mails = app.mails().await;
    assert!(
        mails
            .iter()
            .any(|m| m.subject == "Your password was changed")
    );
    app.shutdown().await;
}

#[tokio::test]
async fn password_reset_by_mail() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "fay@example.com").await.status(), 201);
    let session = token(&app, "fay@example.com", PASSWORD).await;
    let before = app.mails().await.len();

    // Unknown accounts get the same answer, and no mail.
    let unknown = post(
        &app,
        "/api/v1/auth/password-reset",
        json!({ "email": "nobody@example.com" }),
    )
    .await;
    assert_eq!(unknown.status(), 202);
    assert_eq!(app.mails().await.len(), before);
    let known = post(
        &app,
        "/api/v1/auth/password-reset",
        json!({ "email": "FAY@example.com" }),
    )
    .await;
    assert_eq!(known.status(), 202);
    let mails = app.mails().await;
    assert_eq!(mails.len(), before + 1);
    assert_eq!(mails[before].subject, "Reset your password");
    let code = mails[before].code();

    // A weak password is refused and the code still works.
    let confirm = |new: &'static str, code: String| {
        post(
            &app,
            "/api/v1/auth/password-reset/confirm",
            json!({ "token": code, "new_password": new }),
        )
    };
    problem(
        confirm("fay@example.com!!", code.clone()).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(confirm(NEW_PASSWORD, code.clone()).await.status(), 204);
    problem(
        confirm(NEW_PASSWORD, code).await,
        400,
        "expired_or_used_token",
    )
    .await;

    problem(me(&app, &session).await, 401, "session_revoked").await;
    problem(
        login_as(&app, "fay@example.com", PASSWORD, "test-agent").await,
        401,
        "invalid_credentials",
    )
    .await;
    let fresh = token(&app, "fay@example.com", NEW_PASSWORD).await;
    let account: Value = me(&app, &fresh).await.json().await.unwrap();
    assert_eq!(
        account["email_verified"], true,
        "the mailed link proves the address"
    );
    assert!(
        app.mails()
            .await
            .iter()
            .any(|m| m.subject == "Your password was reset")
    );
    app.shutdown().await;
}

/// A reset request answers alike whatever the email holds — an account, an imported legacy
/// hash, a locked or a deactivated account, nothing — since what a real account adds (the
/// token, its audit event, the mail) is done after the answer. The mailed token still works.
#[tokio::test]
async fn reset_requests_answer_alike_for_every_email() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.hide_existing_accounts = true;
            c.lockout_threshold = 1;
            c.rate_limit_reset_per_hour = 10;
        },
        None,
    )
    .await;
    assert_eq!(register(&app, "ann@example.com").await.status(), 201);
    assert_eq!(register(&app, "lia@example.com").await.status(), 201);
    let wrong = login_as(&app, "lia@example.com", "not the password!", "t").await;
    assert_eq!(wrong.status(), 401, "and locked");
    let lines = [
        json!({ "email": "leg@example.com", "sha256": "ab".repeat(32) }),
        json!({ "email": "off@example.com", "sha256": "ab".repeat(32), "active": false }),
    ];
    import_users(&app, &lines).await;
    let before = app.mails().await.len();
    let request = |email: &'static str| {
        post(
            &app,
            "/api/v1/auth/password-reset",
            json!({ "email": email }),
        )
    };
    let unknown = shape(request("nobody@example.com").await, &[]).await;
    assert_eq!(unknown.status, 202);
    for email in [
        "ann@example.com",
        "leg@example.com",
        "lia@example.com",
        "off@example.com",
    ] {
        assert_eq!(shape(request(email).await, &[]).await, unknown, "{email}");
    }
    let mails = app.mails().await;
    let mut to: Vec<&str> = mails[before..].iter().map(|m| m.to.as_str()).collect();
    // Each is mailed in the background: in any order.
    to.sort_unstable();
    assert_eq!(
        to,
        ["ann@example.com", "leg@example.com", "lia@example.com"],
        "active accounts only"
    );
    let events = app.db.store.audit_events(None, 500).await.unwrap();
    let requested = events
        .iter()
        .filter(|e| e.kind == "password.reset_requested")
        .count();
    assert_eq!(requested, 3);
    let code = mails[before..]
        .iter()
        .find(|m| m.to == "ann@example.com")
        .unwrap()
        .code();
    let confirmed = post(
        &app,
        "/api/v1/auth/password-reset/confirm",
        json!({ "token": code, "new_password": NEW_PASSWORD }),
    )
    .await;
    assert_eq!(confirmed.status(), 204);
    assert_eq!(
        login_as(&app, "ann@example.com", NEW_PASSWORD, "t")
            .await
            .status(),
        200
    );
    app.shutdown().await;
}

#[tokio::test]
async fn reset_requests_are_limited() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_reset_per_hour = 2,
        None,
    )
    .await;
    for _ in 0..2 {
        let r = post(
            &app,
            "/api/v1/auth/password-reset",
            json!({ "email": "x@example.com" }),
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    problem(
        post(
            &app,
            "/api/v1/auth/password-reset",
            json!({ "email": "x@example.com" }),
        )
        .await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_login_from_a_new_device_is_mailed_once() {
    let app = TestApp::spawn().await;
    assert_eq!(register(&app, "gil@example.com").await.status(), 201);
    assert_eq!(
        login_as(&app, "gil@example.com", PASSWORD, "laptop")
            .await
            .status(),
        200
    );
    assert_eq!(
        login_as(&app, "gil@example.com", PASSWORD, "laptop")
            .await
            .status(),
        200
    );
    let count = |mails: &[crate::helpers::Mailed]| {
        mails
            .iter()
            .filter(|m| m.subject == "New sign-in to your account")
            .count()
    };
    assert_eq!(
        count(&app.mails().await),
        0,
        "the first device and a known one are not news"
    );
    assert_eq!(
        login_as(&app, "gil@example.com", PASSWORD, "phone")
            .await
            .status(),
        200
    );
    let mails = app.mails().await;
    assert_eq!(count(&mails), 1);
    let notice = mails
        .iter()
        .find(|m| m.subject == "New sign-in to your account")
        .unwrap();
    assert!(
        notice.body.contains("phone") && notice.body.contains("127.0.0.1"),
        "{}",
        notice.body
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_lockout_is_mailed_to_the_owner() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.lockout_threshold = 3,
        None,
    )
    .await;
    assert_eq!(register(&app, "hal@example.com").await.status(), 201);
    for _ in 0..3 {
        login_as(&app, "hal@example.com", "not the password at all", "x").await;
    }
    let mails = app.mails().await;
    assert!(mails.iter().any(|m| m.subject == "Your account is locked for a while" && m.to == "hal@example.com"));
    app.shutdown().await;
}
