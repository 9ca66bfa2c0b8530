//! Background jobs over HTTP: an admin reads, lists, counts, cancels and retries jobs, and
//! requeues or purges the dead letters; everyone else is refused.
//!
//! The servers here run no job queue (`jobs_queues` empty), so that the jobs a test enqueues
//! stay where it put them and no periodic job joins them.

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use unhidra_server::jobs::EnqueueOptions;
use unhidra_store::jobs::{AttemptOutcome, Enqueued, Finish, Finished, JobRecord};

use crate::helpers::{TestApp, default_backend, problem, with_admin};

/// The kind the server registers itself.
const KIND: &str = "rooms.retention";

async fn spawn() -> TestApp {
    TestApp::spawn_with(
        default_backend(),
        |c| {
            with_admin(c);
            c.jobs_queues = String::new();
        },
        None,
    )
    .await
}

async fn admin_token(app: &TestApp) -> String {
    app.admin_token().await
}

/// Enqueues a job of [`KIND`], due in `due_in` (now if zero).
async fn enqueue(app: &TestApp, payload: Value, due_in: Duration) -> JobRecord {
    let options = EnqueueOptions {
        run_at: (due_in > Duration::zero()).then(|| Utc::now() + due_in),
        ..EnqueueOptions::default()
    };
    match app.state.jobs().enqueue(KIND, &payload, options).await {
        Ok(Enqueued::New(job)) => job,
        other => panic!("enqueue: {other:?}"),
    }
}

/// Enqueues a job and has a made-up worker claim the oldest available job and discard it, as a
/// failing handler would; answers the discarded job as it was claimed.
async fn discarded(app: &TestApp, error: &str) -> JobRecord {
    enqueue(app, json!({}), Duration::zero()).await;
    let store = &*app.db.store;
    let now = Utc::now();
    let job = store
        .claim_jobs(
            "default",
            1,
            "test-worker",
            now,
            now + Duration::seconds(30),
        )
        .await
        .unwrap()
        .remove(0);
    let finished = Finished {
        id: job.id,
        attempt: job.attempt,
        worker: "test-worker".to_owned(),
        started_at: now,
        finish: Finish::Discard {
            error: error.to_owned(),
            outcome: AttemptOutcome::Discarded,
        },
    };
    assert_eq!(
        store
            .finish_jobs(&[finished], Utc::now())
            .await
            .unwrap()
            .len(),
        1
    );
    job
}

async fn get(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn post(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn ok(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200, "{:?}", response.url().path());
    response.json().await.unwrap()
}

/// The audit events of `kind`, newest first.
async fn audited(app: &TestApp, token: &str, kind: &str) -> Vec<Value> {
    let page = ok(get(app, "/api/v1/admin/logs", token).await).await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

#[tokio::test]
async fn an_admin_reads_cancels_and_retries_a_job() {
    let app = spawn().await;
    let token = admin_token(&app).await;
    let job = enqueue(&app, json!({ "room": "r1" }), Duration::days(1)).await;
    let path = format!("/api/v1/jobs/{}", job.id);

    let read = ok(get(&app, &path, &token).await).await;
    assert_eq!(read["id"], job.id.to_string());
    assert_eq!(read["kind"], KIND);
    assert_eq!(read["queue"], "default");
    assert_eq!(read["state"], "scheduled");
    assert_eq!(read["payload"], json!({ "room": "r1" }));
    assert_eq!(read["attempts"], json!([]));

    let cancel = format!("/api/v1/admin/jobs/{}/cancel", job.id);
    let cancelled = ok(post(&app, &cancel, &token).await).await;
    assert_eq!(cancelled["state"], "cancelled");
    assert!(cancelled["finished_at"].is_string());
    assert!(
        cancelled.get("payload").is_none(),
        "actions answer no payload"
    );
    // Cancelling again answers the job as it is.
    assert_eq!(
        ok(post(&app, &cancel, &token).await).await["state"],
        "cancelled"
    );

    let retry = format!("/api/v1/admin/jobs/{}/retry", job.id);
    let retried = ok(post(&app, &retry, &token).await).await;
    assert_eq!(retried["state"], "available");
    assert_eq!(retried["attempt"], 0);
    assert!(retried["finished_at"].is_null());
    // A job that waits already is not retried again: 409, and its state said.
    let refused = problem(post(&app, &retry, &token).await, 409, "job_state").await;
    assert_eq!(refused["state"], "available");
    assert_eq!(
        ok(get(&app, &path, &token).await).await["state"],
        "available"
    );

    let cancels = audited(&app, &token, "job.cancelled").await;
    assert_eq!(cancels.len(), 2);
    assert_eq!(cancels[0]["subject_id"], job.id.to_string());
    assert_eq!(cancels[0]["detail"]["kind"], KIND);
    assert!(cancels[0]["actor_id"].is_string());
    let retries = audited(&app, &token, "job.retried").await;
    assert_eq!(retries.len(), 1, "a refused retry is not recorded");
    assert_eq!(retries[0]["subject_id"], job.id.to_string());
    app.shutdown().await;
}

#[tokio::test]
async fn a_job_shows_its_attempts_and_a_finished_one_is_not_cancelled() {
    let app = spawn().await;
    let token = admin_token(&app).await;
    let dead = discarded(&app, "SMTP said no").await;
    let read = ok(get(&app, &format!("/api/v1/jobs/{}", dead.id), &token).await).await;
    assert_eq!(read["state"], "discarded");
    assert_eq!(read["last_error"], "SMTP said no");
    let attempts = read["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["worker"], "test-worker");
    assert_eq!(attempts[0]["outcome"], "discarded");
    assert_eq!(attempts[0]["error"], "SMTP said no");
    assert!(attempts[0]["started_at"].is_string() && attempts[0]["finished_at"].is_string());

    let refused = problem(
        post(
            &app,
            &format!("/api/v1/admin/jobs/{}/cancel", dead.id),
            &token,
        )
        .await,
        409,
        "job_state",
    )
    .await;
    assert_eq!(refused["state"], "discarded");
    assert!(audited(&app, &token, "job.cancelled").await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn unknown_and_malformed_job_ids() {
    let app = spawn().await;
    let token = admin_token(&app).await;
    let unknown = uuid::Uuid::now_v7();
    problem(
        get(&app, &format!("/api/v1/jobs/{unknown}"), &token).await,
        404,
        "not_found",
    )
    .await;
    for action in ["cancel", "retry"] {
        let path = format!("/api/v1/admin/jobs/{unknown}/{action}");
        problem(post(&app, &path, &token).await, 404, "not_found").await;
        let path = format!("/api/v1/admin/jobs/not-a-uuid/{action}");
        let body = problem(post(&app, &path, &token).await, 422, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], "id", "{body}");
    }
    let body = problem(
        get(&app, "/api/v1/jobs/not-a-uuid", &token).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "id", "{body}");
    app.shutdown().await;
}

/// The ids of a listing's items.
fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_listing_filters_pages_and_refuses_bad_filters() {
    let app = spawn().await;
    let token = admin_token(&app).await;
    let dead = discarded(&app, "Quota EXCEEDED").await;
    let waiting = enqueue(&app, json!({}), Duration::zero()).await;
    let later = enqueue(&app, json!({}), Duration::days(1)).await;
    let (dead, waiting, later) = (
        dead.id.to_string(),
        waiting.id.to_string(),
        later.id.to_string(),
    );

    let all = ok(get(&app, "/api/v1/admin/jobs", &token).await).await;
    assert_eq!(
        ids(&all),
        [later.as_str(), waiting.as_str(), dead.as_str()],
        "newest first"
    );
    assert_eq!(
        (&all["total"], &all["page"], &all["page_size"]),
        (&json!(3), &json!(1), &json!(50))
    );
    assert!(
        all["items"][0].get("payload").is_none(),
        "listings carry no payload"
    );

    let list = |query: &'static str| {
        let app = &app;
        let token = &token;
        async move { ok(get(app, &format!("/api/v1/admin/jobs?{query}"), token).await).await }
    };
    assert_eq!(ids(&list("state=scheduled").await), [later.as_str()]);
    assert_eq!(
        ids(&list("state=discarded&kind=rooms.retention").await),
        [dead.as_str()]
    );
    assert!(ids(&list("kind=mail.send").await).is_empty());
    assert_eq!(list("queue=default").await["total"], 3);
    assert!(ids(&list("queue=bulk").await).is_empty());
    assert_eq!(ids(&list("q=quota%20exceeded").await), [dead.as_str()]);
    assert_eq!(
        list("q=%20%20&kind=").await["total"],
        3,
        "blank filters filter nothing"
    );
    let second = list("page=2&page_size=1").await;
    assert_eq!(ids(&second), [waiting.as_str()]);
    assert_eq!((&second["total"], &second["page"]), (&json!(3), &json!(2)));
    assert!(ids(&list("page=9&page_size=1").await).is_empty());

    for (query, field) in [
        ("state=dead", "state"),
        ("state=", "state"),
        ("kind=no%20spaces", "kind"),
        ("queue=a%2Fb", "queue"),
        ("q=a%00b", "q"),
        ("page=0", "page"),
        ("page_size=201", "page_size"),
    ] {
        let response = get(&app, &format!("/api/v1/admin/jobs?{query}"), &token).await;
        let body = problem(response, 422, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], field, "{query}: {body}");
    }
    let long = format!("/api/v1/admin/jobs?q={}", "x".repeat(201));
    let body = problem(get(&app, &long, &token).await, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "q");
    problem(
        get(&app, "/api/v1/admin/jobs?sort=kind", &token).await,
        422,
        "validation_failed",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn stats_count_and_dead_letters_are_requeued_and_purged() {
    let app = spawn().await;
    let token = admin_token(&app).await;
    let first = discarded(&app, "boom").await;
    let second = discarded(&app, "boom").await;
    enqueue(&app, json!({}), Duration::days(1)).await;

    let stats = ok(get(&app, "/api/v1/admin/jobs/stats", &token).await).await;
    let mut counts: Vec<(String, String, i64)> = stats["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["state"].as_str().unwrap().to_owned(),
                c["count"].as_i64().unwrap(),
            )
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            (KIND.to_owned(), "discarded".to_owned(), 2),
            (KIND.to_owned(), "scheduled".to_owned(), 1),
        ]
    );
    assert!(stats["oldest_due_age_seconds"].is_null(), "nothing is due");

    // Requeue one kind that has none, then every kind.
    let none = ok(post(&app, "/api/v1/admin/jobs/requeue?kind=mail.send", &token).await).await;
    assert_eq!(none["count"], 0);
    let requeued = ok(post(&app, "/api/v1/admin/jobs/requeue", &token).await).await;
    assert_eq!(requeued["count"], 2);
    let stats = ok(get(&app, "/api/v1/admin/jobs/stats", &token).await).await;
    assert!(
        stats["oldest_due_age_seconds"].as_u64().is_some(),
        "{stats}"
    );
    for job in [&first, &second] {
        let read = ok(get(&app, &format!("/api/v1/jobs/{}", job.id), &token).await).await;
        assert_eq!(
            (&read["state"], &read["attempt"]),
            (&json!("available"), &json!(0))
        );
    }

    // Discard one again and purge the dead letters of the kind.
    discarded(&app, "boom again").await;
    let purge = |query: &'static str| {
        app.client
            .delete(app.url(&format!("/api/v1/admin/jobs/discarded{query}")))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(
        ok(purge("?kind=rooms.retention").await.unwrap()).await["count"],
        1
    );
    assert_eq!(ok(purge("").await.unwrap()).await["count"], 0);
    let body = problem(
        purge("?kind=a%20b").await.unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "kind");
    assert_eq!(
        ok(get(&app, "/api/v1/admin/jobs?state=discarded", &token).await).await["total"],
        0
    );

    let requeues = audited(&app, &token, "jobs.requeued").await;
    assert_eq!(requeues.len(), 2);
    assert_eq!(requeues[0]["detail"], json!({ "kind": null, "count": 2 }));
    assert_eq!(
        requeues[1]["detail"],
        json!({ "kind": "mail.send", "count": 0 })
    );
    let purges = audited(&app, &token, "jobs.purged").await;
    assert_eq!(purges.len(), 2, "a refused purge is not recorded");
    assert_eq!(purges[1]["detail"], json!({ "kind": KIND, "count": 1 }));
    app.shutdown().await;
}

#[tokio::test]
async fn job_endpoints_are_for_admins_only() {
    let app = spawn().await;
    let job = enqueue(
        &app,
        json!({ "email": "someone@example.com" }),
        Duration::days(1),
    )
    .await;
    let (_, user) = crate::helpers::user(&app, "pat@example.com").await;
    let id = job.id;
    let reads = [
        format!("/api/v1/jobs/{id}"),
        "/api/v1/admin/jobs".to_owned(),
        "/api/v1/admin/jobs/stats".to_owned(),
    ];
    for path in &reads {
        problem(get(&app, path, &user).await, 403, "forbidden").await;
        problem(app.get(path).await, 401, "unauthenticated").await;
    }
    for path in [
        format!("/api/v1/admin/jobs/{id}/cancel"),
        format!("/api/v1/admin/jobs/{id}/retry"),
        "/api/v1/admin/jobs/requeue".to_owned(),
    ] {
        problem(post(&app, &path, &user).await, 403, "forbidden").await;
    }
    let purge = app
        .client
        .delete(app.url("/api/v1/admin/jobs/discarded"))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    problem(purge, 403, "forbidden").await;
    // Nothing changed.
    let token = admin_token(&app).await;
    let read = ok(get(&app, &format!("/api/v1/jobs/{id}"), &token).await).await;
    assert_eq!(read["state"], "scheduled");
    app.shutdown().await;
}
