//! Two-factor authentication: enrolment, login with a code, no replay, recovery codes, a recent
//! password for changing the factor, and admins held to enrolment — per session — when the
//! config says so.

use std::sync::Arc;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use totp_rs::{Algorithm, Secret, TOTP};
use unhidra_core::ManualClock;
use unhidra_store::Backend;
use unhidra_store::testing::TestDb;

use crate::helpers::{TestApp, problem};

const PASSWORD: &str = "maple orbit candle frost 42";

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = app.client.post(app.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn login(app: &TestApp, email: &str) -> Value {
    let response = post(
        app,
        "/api/v1/auth/login",
        None,
        json!({ "email": email, "password": PASSWORD }),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn code_at(secret: &str, clock: &ManualClock) -> String {
    use unhidra_core::Clock;
    let bytes = Secret::Encoded(secret.to_owned()).to_bytes().unwrap();
    let totp = TOTP::new(Algorithm::SHA1, 6, 1, 30, bytes, None, String::new()).unwrap();
    totp.generate(u64::try_from(clock.now().timestamp()).unwrap())
}

/// A server on a manual clock, a user, and the user's access token.
async fn setup() -> (TestApp, Arc<ManualClock>, String) {
    setup_on(crate::helpers::default_backend()).await
}

/// [`setup`] on `backend`.
async fn setup_on(backend: Backend) -> (TestApp, Arc<ManualClock>, String) {
    setup_with(backend, |_| {}).await
}

/// [`setup_on`], with the config changed by `tweak`.
async fn setup_with(
    backend: Backend,
    tweak: impl FnOnce(&mut unhidra_config::Config),
) -> (TestApp, Arc<ManualClock>, String) {
    // Mid-step, so that "one step later" is unambiguous.
    let start = Utc::now();
    let start = start - Duration::seconds(start.timestamp() % 30) + Duration::seconds(10);
    let clock = Arc::new(ManualClock::new(start));
    // Behind a trusted proxy, so that a test may speak from another address; without the
    // header every request comes from 127.0.0.1.
    let app = TestApp::spawn_on(
        TestDb::new(backend).await,
        |c| {
            c.trusted_proxies = vec!["127.0.0.1".to_owned()];
            tweak(c);
        },
        None,
        clock.clone(),
    )
    .await;
    let response = post(
        &app,
        "/api/v1/auth/register",
        None,
        json!({ "email": "zoe@example.com", "password": PASSWORD }),
    )
    .await;
    assert_eq!(response.status(), 201);
    let token = login(&app, "zoe@example.com").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    (app, clock, token)
}

/// Enrols TOTP and returns the secret and the recovery codes.
async fn enrol(app: &TestApp, clock: &ManualClock, token: &str) -> (String, Vec<String>) {
    let setup: Value = post(app, "/api/v1/auth/totp/setup", Some(token), json!({}))
        .await
        .json()
        .await
        .unwrap();
    let secret = setup["secret"].as_str().unwrap().to_owned();
    let response = post(
        app,
        "/api/v1/auth/totp/enable",
        Some(token),
        json!({ "code": code_at(&secret, clock) }),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let codes = body["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    (secret, codes)
}

#[tokio::test]
async fn enrolment_gives_an_authenticator_uri_and_recovery_codes() {
    let (app, clock, token) = setup().await;
    let setup: Value = post(&app, "/api/v1/auth/totp/setup", Some(&token), json!({}))
        .await
        .json()
        .await
        .unwrap();
    let secret = setup["secret"].as_str().unwrap();
    let uri = setup["otpauth_uri"].as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/Unhidra:zoe%40example.com?secret="),
        "{uri}"
    );
    assert!(uri.contains("issuer=Unhidra"), "{uri}");
    assert!(setup["qr_svg"].as_str().unwrap().starts_with("<?xml"));
    assert_eq!(secret.len(), 32, "160 bits in base32");

    let wrong = post(
        &app,
        "/api/v1/auth/totp/enable",
        Some(&token),
        json!({ "code": "000000" }),
    )
    .await;
    let body = problem(wrong, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["code"], "wrong_code");
    let response = post(
        &app,
        "/api/v1/auth/totp/enable",
        Some(&token),
        json!({ "code": code_at(secret, &clock) }),
    )
    .await;
    let codes: Value = response.json().await.unwrap();
    assert_eq!(codes["recovery_codes"].as_array().unwrap().len(), 10);
    problem(
        post(&app, "/api/v1/auth/totp/setup", Some(&token), json!({})).await,
        409,
        "totp_already_enabled",
    )
    .await;
    assert!(
        app.mails()
            .await
            .iter()
            .any(|m| m.subject == "Two-factor authentication is on")
    );
    app.shutdown().await;
}

#[tokio::test]
async fn login_needs_a_code_and_a_code_works_once() {
    let (app, clock, token) = setup().await;
    let (secret, _) = enrol(&app, &clock, &token).await;
    clock.advance(Duration::seconds(30));

    let first = login(&app, "zoe@example.com").await;
    assert_eq!(first["mfa_required"], true);
    assert!(first.get("access_token").is_none());
    let code = code_at(&secret, &clock);
    let done = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": first["mfa_token"], "code": code }),
    )
    .await;
    assert_eq!(done.status(), 200);
    let pair: Value = done.json().await.unwrap();
    assert!(pair["access_token"].is_string());

    // The same code again, within its window: refused.
    let second = login(&app, "zoe@example.com").await;
    let replay = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": second["mfa_token"], "code": code }),
    )
    .await;
    problem(replay, 422, "validation_failed").await;
    // The next step's code works (one step of drift is allowed).
    clock.advance(Duration::seconds(30));
    let next = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": second["mfa_token"], "code": code_at(&secret, &clock) }),
    )
    .await;
    assert_eq!(next.status(), 200);
    // A used challenge is spent.
    let again = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": second["mfa_token"], "code": code_at(&secret, &clock) }),
    )
    .await;
    problem(again, 401, "invalid_mfa_token").await;
    app.shutdown().await;
}

/// A six-digit code that is none of the codes accepted now (this step and its neighbours).
fn wrong_code(secret: &str, clock: &ManualClock) -> String {
    use unhidra_core::Clock;
    let bytes = Secret::Encoded(secret.to_owned()).to_bytes().unwrap();
    let totp = TOTP::new(Algorithm::SHA1, 6, 1, 30, bytes, None, String::new()).unwrap();
    let now = u64::try_from(clock.now().timestamp()).unwrap();
    let accepted: Vec<String> = [now - 30, now, now + 30]
        .iter()
        .map(|t| totp.generate(*t))
        .collect();
    (0..4)
        .map(|i| format!("{i}{i}{i}{i}{i}{i}"))
        .find(|c| !accepted.contains(c))
        .unwrap()
}

/// Wrong codes count towards the account's lockout like wrong passwords: with the right
/// password, ten wrong codes over two challenges lock the account, mail the notice and are
/// audited; the right password is refused while the lock lasts.
async fn wrong_codes_lock_the_account(backend: Backend) {
    let (app, clock, token) = setup_on(backend).await;
    let (secret, _) = enrol(&app, &clock, &token).await;
    clock.advance(Duration::seconds(30));
    for round in 0..2 {
        let challenge = login(&app, "zoe@example.com").await;
        assert_eq!(challenge["mfa_required"], true, "{challenge}");
        for _ in 0..5 {
            let r = post(
                &app,
                "/api/v1/auth/login/mfa",
                None,
                json!({ "mfa_token": challenge["mfa_token"], "code": wrong_code(&secret, &clock) }),
            )
            .await;
            problem(r, 422, "validation_failed").await;
        }
        if round == 0 {
            // Past the minute of the (address, account) limit: a new challenge is not free,
            // the failures stay counted.
            clock.advance(Duration::seconds(61));
        }
    }
    let stored = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("zoe@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(stored.failed_logins, 10);
    // From another address, which the (address, account) limit does not refuse.
    let locked = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .header("x-forwarded-for", "10.9.9.9")
        .json(&json!({ "email": "zoe@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert!(locked.headers().contains_key("retry-after"));
    problem(locked, 429, "account_locked").await;
    let events = app.db.store.audit_events(None, 500).await.unwrap();
    let failed = events
        .iter()
        .filter(|e| e.kind == "login.mfa_failed")
        .count();
    assert_eq!(failed, 10);
    assert!(events.iter().any(|e| e.kind == "account.locked"));
    let mails = app.mails().await;
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.subject == "Your account is locked for a while")
            .count(),
        1
    );
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_codes_lock_the_account_sqlite() {
    wrong_codes_lock_the_account(Backend::Sqlite).await;
}

#[tokio::test]
async fn wrong_codes_lock_the_account_postgres() {
    wrong_codes_lock_the_account(Backend::Postgres).await;
}

/// A challenge obtained before the lock cannot be used to guess on during it.
#[tokio::test]
async fn a_locked_account_takes_no_codes() {
    let (app, clock, token) = setup().await;
    let (secret, _) = enrol(&app, &clock, &token).await;
    clock.advance(Duration::seconds(30));
    let open = login(&app, "zoe@example.com").await;
    // Ten wrong codes over two more challenges lock the account.
    for round in 0..2 {
        let challenge = login(&app, "zoe@example.com").await;
        for _ in 0..5 {
            post(
                &app,
                "/api/v1/auth/login/mfa",
                None,
                json!({ "mfa_token": challenge["mfa_token"], "code": wrong_code(&secret, &clock) }),
            )
            .await;
        }
        if round == 0 {
            clock.advance(Duration::seconds(61));
        }
    }
    // Even the right code is refused on the challenge opened before the lock (sent from
    // another address, which no rate limit refuses).
    let r = app
        .client
        .post(app.url("/api/v1/auth/login/mfa"))
        .header("x-forwarded-for", "10.9.9.9")
        .json(&json!({ "mfa_token": open["mfa_token"], "code": code_at(&secret, &clock) }))
        .send()
        .await
        .unwrap();
    problem(r, 429, "account_locked").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_challenge_allows_five_tries_and_expires() {
    let (app, clock, token) = setup().await;
    let (secret, _) = enrol(&app, &clock, &token).await;
    clock.advance(Duration::seconds(30));
    let challenge = login(&app, "zoe@example.com").await;
    for _ in 0..5 {
        let r = post(
            &app,
            "/api/v1/auth/login/mfa",
            None,
            json!({ "mfa_token": challenge["mfa_token"], "code": "123456" }),
        )
        .await;
        assert_eq!(r.status(), 422);
    }
    // The address's minute of guesses is over too; past it, the challenge itself is spent.
    clock.advance(Duration::seconds(61));
    let spent = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": challenge["mfa_token"], "code": code_at(&secret, &clock) }),
    )
    .await;
    problem(spent, 401, "invalid_mfa_token").await;

    let late = login(&app, "zoe@example.com").await;
    clock.advance(Duration::minutes(6));
    let expired = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": late["mfa_token"], "code": code_at(&secret, &clock) }),
    )
    .await;
    problem(expired, 401, "invalid_mfa_token").await;
    app.shutdown().await;
}

#[tokio::test]
async fn recovery_codes_work_once_and_can_disable() {
    let (app, clock, token) = setup().await;
    let (_, codes) = enrol(&app, &clock, &token).await;
    let challenge = login(&app, "zoe@example.com").await;
    // Typed loosely: case, spaces and dashes do not matter.
    let typed = codes[0].to_uppercase().replace('-', " ");
    let done = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": challenge["mfa_token"], "code": typed }),
    )
    .await;
    assert_eq!(done.status(), 200);
    let again = login(&app, "zoe@example.com").await;
    let reuse = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": again["mfa_token"], "code": codes[0] }),
    )
    .await;
    problem(reuse, 422, "validation_failed").await;
    assert!(
        app.mails()
            .await
            .iter()
            .any(|m| m.subject == "A recovery code was used")
    );

    problem(
        post(
            &app,
            "/api/v1/auth/totp/disable",
            Some(&token),
            json!({ "code": "wrong-code" }),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    let off = post(
        &app,
        "/api/v1/auth/totp/disable",
        Some(&token),
        json!({ "code": codes[1] }),
    )
    .await;
    assert_eq!(off.status(), 204);
    let plain = login(&app, "zoe@example.com").await;
    assert!(plain["access_token"].is_string(), "no code needed any more");
    problem(
        post(
            &app,
            "/api/v1/auth/totp/disable",
            Some(&token),
            json!({ "code": codes[2] }),
        )
        .await,
        409,
        "totp_not_set_up",
    )
    .await;
    app.shutdown().await;
}

/// Wrong codes at `totp/disable` count towards the lockout like wrong codes at login: a
/// stolen access token (with a recent password) does not buy endless guesses at the code. At
/// the threshold the account locks, for the disable and for logins.
async fn wrong_codes_at_disable_lock_the_account(backend: Backend) {
    let (app, clock, token) = setup_with(backend, |c| c.lockout_threshold = 3).await;
    let (secret, codes) = enrol(&app, &clock, &token).await;
    let disable = |code: String| {
        post(
            &app,
            "/api/v1/auth/totp/disable",
            Some(&token),
            json!({ "code": code }),
        )
    };
    problem(
        disable("not-a-recovery-code".to_owned()).await,
        422,
        "validation_failed",
    )
    .await;
    for _ in 0..2 {
        let wrong = wrong_code(&secret, &clock);
        problem(disable(wrong).await, 422, "validation_failed").await;
    }
    let zoe = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("zoe@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(zoe.failed_logins, 3);
    problem(disable(codes[0].clone()).await, 429, "account_locked").await;
    assert_eq!(stored_factor(&app).await, Some(true), "still on");
    let login = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({ "email": "zoe@example.com", "password": PASSWORD }),
    )
    .await;
    problem(login, 429, "account_locked").await;
    let events = app.db.store.audit_events(None, 500).await.unwrap();
    let failed: Vec<_> = events.iter().filter(|e| e.kind == "mfa.failed").collect();
    assert_eq!(failed.len(), 3);
    assert!(
        failed.iter().all(|e| e.detail.contains("wrong_code")),
        "{failed:?}"
    );
    assert!(events.iter().any(|e| e.kind == "account.locked"));
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_codes_at_disable_lock_the_account_sqlite() {
    wrong_codes_at_disable_lock_the_account(Backend::Sqlite).await;
}

#[tokio::test]
async fn wrong_codes_at_disable_lock_the_account_postgres() {
    wrong_codes_at_disable_lock_the_account(Backend::Postgres).await;
}

#[tokio::test]
async fn admins_can_be_held_to_enrolment() {
    let start = Utc::now();
    let clock = Arc::new(ManualClock::new(
        start - Duration::seconds(start.timestamp() % 30) + Duration::seconds(10),
    ));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |c| {
            c.require_admin_mfa = true;
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
        clock.clone(),
    )
    .await;
    let token = login(&app, "root@example.com").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let users = |t: String| {
        app.client
            .get(app.url("/api/v1/auth/users"))
            .bearer_auth(t)
            .send()
    };
    problem(
        users(token.clone()).await.unwrap(),
        403,
        "mfa_enrollment_required",
    )
    .await;
    enrol(&app, &clock, &token).await;
    assert_eq!(
        users(token).await.unwrap().status(),
        200,
        "enrolled: the admin routes open"
    );
    app.shutdown().await;
}

/// Reads zoe's stored TOTP factor: `None`, or whether it is enabled.
async fn stored_factor(app: &TestApp) -> Option<bool> {
    let zoe = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("zoe@example.com").unwrap())
        .await
        .unwrap();
    app.db
        .store
        .totp_factor(zoe.id)
        .await
        .unwrap()
        .map(|f| f.enabled)
}

async fn reauthenticate(app: &TestApp, token: &str, password: &str) -> reqwest::Response {
    post(
        app,
        "/api/v1/auth/reauthenticate",
        Some(token),
        json!({ "current_password": password }),
    )
    .await
}

/// Setting up, enabling and disabling TOTP need the password presented within
/// `reauth_window` (5 minutes); a refusal stores nothing, and `reauthenticate` opens the
/// window again. A refresh is no re-authentication.
async fn second_factor_changes_need_a_recent_password(backend: Backend) {
    // Access tokens outlive the test's clock moves, so that only the window is tested.
    let (app, clock, token) = setup_with(backend, |c| {
        c.access_token_ttl = unhidra_config::HumanDuration::secs(3600);
    })
    .await;
    let past_window = Duration::minutes(5) + Duration::seconds(1);
    clock.advance(past_window);
    problem(
        post(&app, "/api/v1/auth/totp/setup", Some(&token), json!({})).await,
        403,
        "reauthentication_required",
    )
    .await;
    assert_eq!(stored_factor(&app).await, None, "no secret stored");

    // A wrong password is refused and counted like a failed login.
    let wrong = reauthenticate(&app, &token, "not the password at all").await;
    let body = problem(wrong, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["code"], "wrong_password");
    let zoe = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("zoe@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(zoe.failed_logins, 1);
    problem(
        post(&app, "/api/v1/auth/totp/setup", Some(&token), json!({})).await,
        403,
        "reauthentication_required",
    )
    .await;

    assert_eq!(reauthenticate(&app, &token, PASSWORD).await.status(), 204);
    let setup: Value = post(&app, "/api/v1/auth/totp/setup", Some(&token), json!({}))
        .await
        .json()
        .await
        .unwrap();
    let secret = setup["secret"].as_str().unwrap().to_owned();
    assert_eq!(stored_factor(&app).await, Some(false));

    clock.advance(past_window);
    let enable = post(
        &app,
        "/api/v1/auth/totp/enable",
        Some(&token),
        json!({ "code": code_at(&secret, &clock) }),
    )
    .await;
    problem(enable, 403, "reauthentication_required").await;
    assert_eq!(stored_factor(&app).await, Some(false), "not enabled");
    assert_eq!(reauthenticate(&app, &token, PASSWORD).await.status(), 204);
    let enabled = post(
        &app,
        "/api/v1/auth/totp/enable",
        Some(&token),
        json!({ "code": code_at(&secret, &clock) }),
    )
    .await;
    assert_eq!(enabled.status(), 200);
    let codes: Value = enabled.json().await.unwrap();
    let recovery = codes["recovery_codes"][0].as_str().unwrap().to_owned();

    clock.advance(past_window);
    let disable = post(
        &app,
        "/api/v1/auth/totp/disable",
        Some(&token),
        json!({ "code": recovery }),
    )
    .await;
    problem(disable, 403, "reauthentication_required").await;
    assert_eq!(stored_factor(&app).await, Some(true), "still on");
    assert_eq!(reauthenticate(&app, &token, PASSWORD).await.status(), 204);
    // The recovery code was not spent by the refusal.
    let off = post(
        &app,
        "/api/v1/auth/totp/disable",
        Some(&token),
        json!({ "code": recovery }),
    )
    .await;
    assert_eq!(off.status(), 204);
    assert_eq!(stored_factor(&app).await, None, "off: the secret is gone");

    let events = app.db.store.audit_events(None, 500).await.unwrap();
    assert_eq!(
        events.iter().filter(|e| e.kind == "reauth.failed").count(),
        1
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "reauthenticated")
            .count(),
        3
    );
    app.shutdown().await;
}

#[tokio::test]
async fn second_factor_changes_need_a_recent_password_sqlite() {
    second_factor_changes_need_a_recent_password(Backend::Sqlite).await;
}

#[tokio::test]
async fn second_factor_changes_need_a_recent_password_postgres() {
    second_factor_changes_need_a_recent_password(Backend::Postgres).await;
}

/// A refreshed access token carries its session's last password, not a new one.
#[tokio::test]
async fn a_refresh_does_not_count_as_reauthentication() {
    let (app, clock, _) = setup().await;
    let pair = login(&app, "zoe@example.com").await;
    clock.advance(Duration::minutes(5) + Duration::seconds(1));
    let refreshed: Value = post(
        &app,
        "/api/v1/auth/refresh",
        None,
        json!({ "refresh_token": pair["refresh_token"] }),
    )
    .await
    .json()
    .await
    .unwrap();
    let token = refreshed["access_token"].as_str().unwrap();
    problem(
        post(&app, "/api/v1/auth/totp/setup", Some(token), json!({})).await,
        403,
        "reauthentication_required",
    )
    .await;
    app.shutdown().await;
}

/// Wrong passwords on `reauthenticate` count towards the account's lockout like failed logins:
/// ten lock the account for every login, and more than five a minute are throttled.
async fn wrong_reauthentication_passwords_lock_the_account(backend: Backend) {
    let (app, clock, token) = setup_on(backend).await;
    for round in 0..2 {
        for _ in 0..5 {
            let r = reauthenticate(&app, &token, "not the password at all").await;
            problem(r, 422, "validation_failed").await;
        }
        // The sixth in a minute is throttled, not checked.
        problem(
            reauthenticate(&app, &token, "not the password at all").await,
            429,
            "rate_limited",
        )
        .await;
        if round == 0 {
            clock.advance(Duration::seconds(61));
        }
    }
    let zoe = app
        .db
        .store
        .user_by_email(&unhidra_core::Email::parse("zoe@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(zoe.failed_logins, 10);
    let locked = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({ "email": "zoe@example.com", "password": PASSWORD }),
    )
    .await;
    problem(locked, 429, "account_locked").await;
    let events = app.db.store.audit_events(None, 500).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "account.locked"));
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_reauthentication_passwords_lock_the_account_sqlite() {
    wrong_reauthentication_passwords_lock_the_account(Backend::Sqlite).await;
}

#[tokio::test]
async fn wrong_reauthentication_passwords_lock_the_account_postgres() {
    wrong_reauthentication_passwords_lock_the_account(Backend::Postgres).await;
}

/// The second factor belongs to the session: a session opened with the password alone before
/// the admin enrolled (a stolen one, say) ends when TOTP is enabled instead of gaining admin
/// powers; the enrolling session counts as verified; a session from a login with a code does
/// too; and after TOTP is turned off no session counts any more.
async fn a_session_from_before_enrolment_gains_no_admin_powers(backend: Backend) {
    let start = Utc::now();
    let clock = Arc::new(ManualClock::new(
        start - Duration::seconds(start.timestamp() % 30) + Duration::seconds(10),
    ));
    let app = TestApp::spawn_on(
        TestDb::new(backend).await,
        |c| {
            c.require_admin_mfa = true;
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
        clock.clone(),
    )
    .await;
    let token = |v: Value| v["access_token"].as_str().unwrap().to_owned();
    let earlier = token(login(&app, "root@example.com").await);
    let enrolling = token(login(&app, "root@example.com").await);
    let users = |t: &str| {
        app.client
            .get(app.url("/api/v1/auth/users"))
            .bearer_auth(t)
            .send()
    };
    let (secret, codes) = enrol(&app, &clock, &enrolling).await;
    problem(users(&earlier).await.unwrap(), 401, "session_revoked").await;
    assert_eq!(users(&enrolling).await.unwrap().status(), 200);

    clock.advance(Duration::seconds(30));
    let challenge = login(&app, "root@example.com").await;
    let with_code: Value = post(
        &app,
        "/api/v1/auth/login/mfa",
        None,
        json!({ "mfa_token": challenge["mfa_token"], "code": code_at(&secret, &clock) }),
    )
    .await
    .json()
    .await
    .unwrap();
    let with_code = token(with_code);
    assert_eq!(users(&with_code).await.unwrap().status(), 200);

    let off = post(
        &app,
        "/api/v1/auth/totp/disable",
        Some(&enrolling),
        json!({ "code": codes[0] }),
    )
    .await;
    assert_eq!(off.status(), 204);
    for t in [&enrolling, &with_code] {
        problem(users(t).await.unwrap(), 403, "mfa_enrollment_required").await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_session_from_before_enrolment_gains_no_admin_powers_sqlite() {
    a_session_from_before_enrolment_gains_no_admin_powers(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_session_from_before_enrolment_gains_no_admin_powers_postgres() {
    a_session_from_before_enrolment_gains_no_admin_powers(Backend::Postgres).await;
}
