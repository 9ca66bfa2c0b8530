//! Cron schedules over HTTP: an admin stores, replaces, lists and deletes them; bad input gets
//! a problem naming the field and stores nothing; schedules of the configuration are stored at
//! start and are not the API's to change; a running server's scheduler enqueues each tick.

use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};
use unhidra_core::{Clock, ManualClock};
use unhidra_store::jobs::JobFilter;

use crate::helpers::{TestApp, default_backend, problem, test_config, user, with_admin};

/// A kind the server registers itself.
const KIND: &str = "rooms.retention";

/// A server that runs no job queue (nor scheduler), unless `tweak` says otherwise.
async fn spawn(tweak: impl FnOnce(&mut unhidra_config::Config)) -> TestApp {
    TestApp::spawn_with(
        default_backend(),
        |c| {
            with_admin(c);
            c.jobs_queues = String::new();
            tweak(c);
        },
        None,
    )
    .await
}

async fn admin_token(app: &TestApp) -> String {
    app.admin_token().await
}

async fn put(app: &TestApp, name: &str, token: &str, body: &Value) -> reqwest::Response {
    app.client
        .put(app.url(&format!("/api/v1/admin/cron/{name}")))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn delete(app: &TestApp, name: &str, token: &str) -> reqwest::Response {
    app.client
        .delete(app.url(&format!("/api/v1/admin/cron/{name}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn list(app: &TestApp, token: &str) -> Vec<Value> {
    let response = app
        .client
        .get(app.url("/api/v1/admin/cron"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn nightly() -> Value {
    json!({
        "expression": "0 3 * * *",
        "time_zone": "Europe/Berlin",
        "kind": KIND,
        "payload": { "why": "nightly" },
    })
}

#[tokio::test]
async fn an_admin_stores_replaces_lists_and_deletes_cron_schedules() {
    let app = spawn(|_| {}).await;
    let token = admin_token(&app).await;
    let created = put(&app, "nightly", &token, &nightly()).await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["name"], "nightly");
    assert_eq!(created["expression"], "0 3 * * *");
    assert_eq!(created["time_zone"], "Europe/Berlin");
    assert_eq!(created["kind"], KIND);
    assert_eq!(created["payload"], json!({ "why": "nightly" }));
    assert_eq!(created["catch_up"], "once");
    assert_eq!(created["enabled"], true);
    assert!(created["last_tick_at"].is_null());
    // 03:00 in Berlin is 01:00 or 02:00 UTC, within a day from now.
    let next: chrono::DateTime<Utc> = created["next_tick_at"].as_str().unwrap().parse().unwrap();
    assert!(next > Utc::now() && next <= Utc::now() + chrono::Duration::days(1));
    assert!(matches!(
        next.format("%H:%M").to_string().as_str(),
        "01:00" | "02:00"
    ));

    // The same again replaces it, keeping its next tick.
    let replaced = put(&app, "nightly", &token, &nightly()).await;
    assert_eq!(replaced.status(), 200);
    let replaced: Value = replaced.json().await.unwrap();
    assert_eq!(replaced["next_tick_at"], created["next_tick_at"]);
    // Defaults: UTC, `{}`, once, enabled.
    let hourly = put(
        &app,
        "hourly",
        &token,
        &json!({ "expression": "0 * * * *", "kind": KIND, "catch_up": "skip" }),
    )
    .await;
    assert_eq!(hourly.status(), 201);
    let hourly: Value = hourly.json().await.unwrap();
    assert_eq!(hourly["time_zone"], "UTC");
    assert_eq!(hourly["payload"], json!({}));
    assert_eq!(hourly["catch_up"], "skip");

    let names: Vec<Value> = list(&app, &token)
        .await
        .into_iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, ["hourly", "nightly"]);

    assert_eq!(delete(&app, "hourly", &token).await.status(), 204);
    problem(delete(&app, "hourly", &token).await, 404, "not_found").await;
    assert_eq!(list(&app, &token).await.len(), 1);

    let logs: Value = app
        .client
        .get(app.url("/api/v1/admin/logs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = logs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .filter(|k| k.starts_with("cron."))
        .collect();
    assert_eq!(
        kinds,
        ["cron.deleted", "cron.saved", "cron.saved", "cron.saved"]
    );

    // Others are refused.
    let (_, user) = user(&app, "someone@example.com").await;
    problem(
        put(&app, "nightly", &user, &nightly()).await,
        403,
        "forbidden",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn bad_schedules_get_a_problem_naming_the_field_and_store_nothing() {
    let app = spawn(|_| {}).await;
    let token = admin_token(&app).await;
    let with = |key: &str, value: Value| {
        let mut body = nightly();
        body[key] = value;
        body
    };
    for (body, field, code) in [
        (
            with("expression", json!("0 3 * *")),
            "/expression",
            "invalid_cron",
        ),
        (
            with("expression", json!("0 0 3 * * *")),
            "/expression",
            "invalid_cron",
        ),
        (
            with("expression", json!("@daily")),
            "/expression",
            "invalid_cron",
        ),
        (
            with("expression", json!("0 3 L * *")),
            "/expression",
            "invalid_cron",
        ),
        (
            with("expression", json!("0 0 30 2 *")),
            "/expression",
            "invalid_cron",
        ),
        (
            with("time_zone", json!("Mars/Olympus")),
            "/time_zone",
            "unknown_time_zone",
        ),
        (with("kind", json!("no.such.kind")), "/kind", "unknown_kind"),
        (
            with("catch_up", json!("sometimes")),
            "/catch_up",
            "invalid_value",
        ),
    ] {
        let refused = problem(
            put(&app, "nightly", &token, &body).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(refused["errors"][0]["field"], field, "{refused}");
        if !matches!(field, "/catch_up" | "/payload") {
            assert_eq!(refused["errors"][0]["code"], code, "{refused}");
        }
    }
    let refused = problem(
        put(&app, "bad%20name", &token, &nightly()).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(refused["errors"][0]["field"], "name", "{refused}");
    assert!(list(&app, &token).await.is_empty(), "nothing stored");
    app.shutdown().await;
}

#[tokio::test]
async fn schedules_of_the_configuration_are_stored_at_start_and_kept_from_the_api() {
    let app = spawn(|c| {
        c.jobs_cron = format!("nightly|0 3 * * *|UTC|{KIND}|skip|{{\"from\": \"config\"}}");
    })
    .await;
    let token = admin_token(&app).await;
    let schedules = list(&app, &token).await;
    assert_eq!(schedules.len(), 1);
    assert_eq!(schedules[0]["name"], "nightly");
    assert_eq!(schedules[0]["catch_up"], "skip");
    assert_eq!(schedules[0]["payload"], json!({ "from": "config" }));
    problem(
        put(&app, "nightly", &token, &nightly()).await,
        409,
        "cron_configured",
    )
    .await;
    problem(
        delete(&app, "nightly", &token).await,
        409,
        "cron_configured",
    )
    .await;
    app.shutdown().await;

    // A schedule the jobs service refuses stops the start, naming it.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.jobs_cron = format!("nightly|0 3 * *|UTC|{KIND}");
    let refused = unhidra_server::Application::build(config)
        .await
        .unwrap_err();
    let message = refused.to_string();
    assert!(
        message.starts_with("jobs_cron: nightly: expression: "),
        "{message}"
    );
}

/// A server that runs its queues runs the scheduler: a tick enqueues its job once.
#[tokio::test]
async fn a_running_server_enqueues_each_tick() {
    let db = unhidra_store::testing::TestDb::new(default_backend()).await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        db,
        |c| {
            with_admin(c);
            c.jobs_poll_interval =
                unhidra_config::HumanDuration(std::time::Duration::from_millis(10));
        },
        None,
        clock.clone() as Arc<dyn Clock>,
    )
    .await;
    let token = admin_token(&app).await;
    let created = put(
        &app,
        "every-minute",
        &token,
        &json!({ "expression": "* * * * *", "kind": KIND }),
    )
    .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let tick = created["next_tick_at"].as_str().unwrap().to_owned();
    // Just past the tick, and well before the next one (a minute later): 61 s from a start a
    // moment before a minute's end would pass both.
    let at: chrono::DateTime<Utc> = tick.parse().unwrap();
    clock.advance(at - clock.now() + chrono::Duration::seconds(1));
    let ticked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let jobs = app
                .db
                .store
                .list_jobs(&JobFilter::default(), 100, 0)
                .await
                .unwrap();
            let ours: Vec<_> = jobs
                .into_iter()
                .filter(|j| {
                    j.unique_key
                        .as_deref()
                        .is_some_and(|k| k.starts_with("cron:"))
                })
                .collect();
            if !ours.is_empty() {
                return ours;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the tick's job");
    assert_eq!(ticked.len(), 1);
    assert_eq!(
        ticked[0].unique_key.as_deref(),
        Some(&*format!("cron:every-minute:{tick}"))
    );
    app.shutdown().await;
}
