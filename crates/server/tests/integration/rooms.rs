//! Rooms over HTTP: who may see, post, invite and manage, idempotent publishing and history.

use serde_json::{Value, json};

use crate::helpers::{TestApp, create_room, problem, user};
use std::sync::Arc;

use chrono::Utc;
use unhidra_core::ManualClock;
use unhidra_store::Backend;
use unhidra_store::testing::TestDb;

async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = app.client.request(method, app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

use reqwest::Method;

#[tokio::test]
async fn private_rooms_exist_only_for_members() {
    let app = TestApp::spawn().await;
    let (_, owner) = user(&app, "own@example.com").await;
    let (outsider_id, outsider) = user(&app, "out@example.com").await;
    let created = call(
        &app,
        Method::POST,
        "/api/v1/rooms",
        &owner,
        Some(json!({ "name": "  secret  ", "visibility": "private" })),
    )
    .await;
    assert_eq!(created.status(), 201);
    let room: Value = created.json().await.unwrap();
    assert_eq!(
        (room["name"].as_str(), room["role"].as_str()),
        (Some("secret"), Some("owner"))
    );
    let id = room["id"].as_str().unwrap();

    for (method, path, body) in [
        (Method::GET, format!("/api/v1/rooms/{id}"), None),
        (Method::GET, format!("/api/v1/rooms/{id}/messages"), None),
        (Method::GET, format!("/api/v1/rooms/{id}/members"), None),
        (Method::POST, format!("/api/v1/rooms/{id}/join"), None),
        (
            Method::POST,
            format!("/api/v1/rooms/{id}/messages"),
            Some(json!({ "body": "x", "client_msg_id": "1" })),
        ),
        (Method::DELETE, format!("/api/v1/rooms/{id}"), None),
    ] {
        let response = call(&app, method.clone(), &path, &outsider, body).await;
        problem(response, 404, "not_found").await;
    }
    let listed: Value = call(&app, Method::GET, "/api/v1/rooms", &outsider, None)
        .await
        .json()
        .await
        .unwrap();
    assert!(listed.as_array().unwrap().is_empty());

    // Invited, the outsider reads and posts.
    let invited = call(
        &app,
        Method::POST,
        &format!("/api/v1/rooms/{id}/members"),
        &owner,
        Some(json!({ "user_id": outsider_id, "role": "member" })),
    )
    .await;
    assert_eq!(invited.status(), 204);
    let posted = call(
        &app,
        Method::POST,
        &format!("/api/v1/rooms/{id}/messages"),
        &outsider,
        Some(json!({ "body": "hi", "client_msg_id": "1" })),
    )
    .await;
    assert_eq!(posted.status(), 201);
    app.shutdown().await;
}

#[tokio::test]
async fn roles_decide_who_invites_and_manages() {
    let app = TestApp::spawn().await;
    let (owner_id, owner) = user(&app, "o@example.com").await;
    let (member_id, member) = user(&app, "m@example.com").await;
    let (admin_id, admin) = user(&app, "a@example.com").await;
    let (third_id, _) = user(&app, "t@example.com").await;
    let id = &create_room(&app, &owner, "team", "private").await;
    let members = format!("/api/v1/rooms/{id}/members");
    assert_eq!(
        call(
            &app,
            Method::POST,
            &members,
            &owner,
            Some(json!({ "user_id": member_id, "role": "member" }))
        )
        .await
        .status(),
        204
    );
    assert_eq!(
        call(
            &app,
            Method::POST,
            &members,
            &owner,
            Some(json!({ "user_id": admin_id, "role": "admin" }))
        )
        .await
        .status(),
        204
    );

    // A member may not invite; a room admin may add members but not make admins.
    problem(
        call(
            &app,
            Method::POST,
            &members,
            &member,
            Some(json!({ "user_id": third_id, "role": "member" })),
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    problem(
        call(
            &app,
            Method::POST,
            &members,
            &admin,
            Some(json!({ "user_id": third_id, "role": "admin" })),
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        call(
            &app,
            Method::POST,
            &members,
            &admin,
            Some(json!({ "user_id": third_id, "role": "member" }))
        )
        .await
        .status(),
        204
    );
    let body = problem(
        call(
            &app,
            Method::POST,
            &members,
            &owner,
            Some(json!({ "user_id": "nobody", "role": "member" })),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["code"], "unknown_user");

    // A room admin cannot change anyone's role: not demote an owner, not promote a member.
    for (target, role) in [
        (owner_id.clone(), "member"),
        (member_id.clone(), "admin"),
        (member_id.clone(), "member"),
    ] {
        let response = call(
            &app,
            Method::POST,
            &members,
            &admin,
            Some(json!({ "user_id": target, "role": role })),
        )
        .await;
        problem(response, 403, "forbidden").await;
    }
    problem(
        call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rooms/{id}"),
            &owner,
            Some(json!({ "retention_max_age": 1_000_000_000_000_i64 })),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    // Only the owner changes or deletes the room.
    problem(
        call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rooms/{id}"),
            &admin,
            Some(json!({ "name": "x" })),
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    let changed: Value = call(
        &app,
        Method::PATCH,
        &format!("/api/v1/rooms/{id}"),
        &owner,
        Some(json!({ "name": "renamed", "retention_max_count": 100 })),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        (
            changed["name"].as_str(),
            changed["retention_max_count"].as_i64()
        ),
        (Some("renamed"), Some(100))
    );
    problem(
        call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rooms/{id}"),
            &owner,
            Some(json!({ "retention_max_age": 0 })),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;

    // Anyone may leave, but the last owner stays.
    assert_eq!(
        call(
            &app,
            Method::POST,
            &format!("/api/v1/rooms/{id}/leave"),
            &member,
            None
        )
        .await
        .status(),
        204
    );
    problem(
        call(
            &app,
            Method::POST,
            &format!("/api/v1/rooms/{id}/leave"),
            &owner,
            None,
        )
        .await,
        409,
        "last_owner",
    )
    .await;
    problem(
        call(
            &app,
            Method::DELETE,
            &format!("{members}/{owner_id}"),
            &admin,
            None,
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    problem(
        call(
            &app,
            Method::DELETE,
            &format!("/api/v1/rooms/{id}"),
            &admin,
            None,
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        call(
            &app,
            Method::DELETE,
            &format!("/api/v1/rooms/{id}"),
            &owner,
            None
        )
        .await
        .status(),
        204
    );
    problem(
        call(
            &app,
            Method::GET,
            &format!("/api/v1/rooms/{id}"),
            &owner,
            None,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    app.shutdown().await;
}

/// An HTTP history page is bounded in encoded bytes as a WebSocket `history` reply is: a page
/// of long messages is cut to `ws_max_reply_bytes`, keeps the messages nearest the cursor and
/// says `more`.
#[tokio::test]
async fn a_history_page_is_bounded_in_bytes_and_says_more() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |config| config.ws_max_reply_bytes = 128 * 1024,
        None,
    )
    .await;
    let (_, owner) = user(&app, "bytes@example.com").await;
    let id = &create_room(&app, &owner, "long", "public").await;
    let messages = format!("/api/v1/rooms/{id}/messages");
    // 10,000 four-byte characters: about 40 KB each, so three fit in 128 KiB and four do not.
    let long = "🔥".repeat(10_000);
    let mut ids = Vec::new();
    for i in 0..5 {
        let posted = call(
            &app,
            Method::POST,
            &messages,
            &owner,
            Some(json!({ "body": format!("{i}{long}"), "client_msg_id": format!("l{i}") })),
        )
        .await;
        assert_eq!(posted.status(), 201);
        ids.push(
            posted.json::<Value>().await.unwrap()["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let page = |query: String| {
        let app = &app;
        let messages = &messages;
        let owner = &owner;
        async move {
            let response = call(app, Method::GET, &format!("{messages}{query}"), owner, None).await;
            assert_eq!(response.status(), 200);
            let page: Value = response.json().await.unwrap();
            let got: Vec<i64> = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_i64().unwrap())
                .collect();
            (got, page["more"].as_bool().unwrap())
        }
    };
    assert_eq!(
        page(String::new()).await,
        (ids[2..].to_vec(), true),
        "the newest that fit"
    );
    assert_eq!(
        page(format!("?after={}", ids[0] - 1)).await,
        (ids[..3].to_vec(), true),
        "paging forwards keeps the oldest"
    );
    assert_eq!(
        page("?limit=2".to_owned()).await,
        (ids[3..].to_vec(), false),
        "a page within the budget is whole"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn publishing_is_idempotent_and_history_pages() {
    let app = TestApp::spawn().await;
    let (_, owner) = user(&app, "p@example.com").await;
    let (_, reader) = user(&app, "r@example.com").await;
    let id = &create_room(&app, &owner, "news", "public").await;
    let messages = format!("/api/v1/rooms/{id}/messages");
    let first = call(
        &app,
        Method::POST,
        &messages,
        &owner,
        Some(json!({ "body": "one", "client_msg_id": "a" })),
    )
    .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let retry = call(
        &app,
        Method::POST,
        &messages,
        &owner,
        Some(json!({ "body": "one", "client_msg_id": "a" })),
    )
    .await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], first["id"]);
    for i in 0..4 {
        call(
            &app,
            Method::POST,
            &messages,
            &owner,
            Some(json!({ "body": format!("m{i}"), "client_msg_id": format!("b{i}") })),
        )
        .await;
    }
    // A reader of a public room reads without joining, but joins to post.
    let page: Value = call(
        &app,
        Method::GET,
        &format!("{messages}?limit=2"),
        &reader,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let bodies: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m2", "m3"]);
    let before = page["items"][0]["id"].as_i64().unwrap();
    let older: Value = call(
        &app,
        Method::GET,
        &format!("{messages}?before={before}&limit=10"),
        &reader,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(older["items"].as_array().unwrap().len(), 3);
    problem(
        call(
            &app,
            Method::POST,
            &messages,
            &reader,
            Some(json!({ "body": "x", "client_msg_id": "r" })),
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        call(
            &app,
            Method::POST,
            &format!("/api/v1/rooms/{id}/join"),
            &reader,
            None
        )
        .await
        .status(),
        204
    );
    assert_eq!(
        call(
            &app,
            Method::POST,
            &messages,
            &reader,
            Some(json!({ "body": "x", "client_msg_id": "r" }))
        )
        .await
        .status(),
        201
    );
    for bad in [
        json!({ "body": "", "client_msg_id": "z" }),
        json!({ "body": "x", "client_msg_id": "" }),
    ] {
        problem(
            call(&app, Method::POST, &messages, &reader, Some(bad)).await,
            422,
            "validation_failed",
        )
        .await;
    }
    problem(
        call(
            &app,
            Method::GET,
            &format!("{messages}?limit=0"),
            &reader,
            None,
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    let presence: Value = call(
        &app,
        Method::GET,
        &format!("/api/v1/rooms/{id}/presence"),
        &reader,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(presence["online"], json!([]), "nobody is connected");
    app.shutdown().await;
}

#[tokio::test]
async fn search_on_sqlite() {
    search_is_ranked_highlighted_and_scoped_to_membership(Backend::Sqlite).await;
}

#[tokio::test]
async fn search_on_postgres() {
    search_is_ranked_highlighted_and_scoped_to_membership(Backend::Postgres).await;
}

async fn search_is_ranked_highlighted_and_scoped_to_membership(backend: Backend) {
    let app = TestApp::spawn_with(backend, |_| {}, None).await;
    let (_, owner) = user(&app, "s1@example.com").await;
    let (_, stranger) = user(&app, "s2@example.com").await;
    let id = &create_room(&app, &owner, "ops", "private").await;
    for (i, body) in ["deploy failed on node seven", "deploy succeeded", "lunch?"]
        .iter()
        .enumerate()
    {
        call(
            &app,
            Method::POST,
            &format!("/api/v1/rooms/{id}/messages"),
            &owner,
            Some(json!({ "body": body, "client_msg_id": format!("s{i}") })),
        )
        .await;
    }
    let found: Value = call(
        &app,
        Method::GET,
        "/api/v1/search/messages?q=deploy%20failed",
        &owner,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let items = found["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert!(
        items[0]["snippet"]
            .as_str()
            .unwrap()
            .contains("<mark>deploy</mark>"),
        "{found}"
    );
    // The snippet is HTML: the message's own markup comes back escaped.
    call(
        &app,
        Method::POST,
        &format!("/api/v1/rooms/{id}/messages"),
        &owner,
        Some(json!({ "body": "rollout <script>alert(1)</script> & \"done\" and some more words", "client_msg_id": "html" })),
    )
    .await;
    let found: Value = call(
        &app,
        Method::GET,
        "/api/v1/search/messages?q=rollout",
        &owner,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let snippet = found["items"][0]["snippet"].as_str().unwrap();
    // SQLite escapes the tags; PostgreSQL's headline leaves them out. Neither lets them through.
    assert!(
        !snippet.contains("<script") && !snippet.contains("</script"),
        "{snippet}"
    );
    assert!(
        snippet.contains("<mark>rollout</mark>") && snippet.contains("&amp; &quot;done&quot;"),
        "{snippet}"
    );
    let found: Value = call(
        &app,
        Method::GET,
        &format!("/api/v1/search/messages?q=deploy&room={id}&limit=5"),
        &owner,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(found["items"].as_array().unwrap().len(), 2);
    let none: Value = call(
        &app,
        Method::GET,
        "/api/v1/search/messages?q=deploy",
        &stranger,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(none["items"].as_array().unwrap().is_empty(), "not a member");
    problem(
        call(
            &app,
            Method::GET,
            &format!("/api/v1/search/messages?q=deploy&room={id}"),
            &stranger,
            None,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    problem(
        call(
            &app,
            Method::GET,
            "/api/v1/search/messages?q=",
            &owner,
            None,
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    problem(
        call(&app, Method::GET, "/api/v1/search/messages", &owner, None).await,
        422,
        "validation_failed",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn http_publishes_are_limited_per_user_and_refusals_store_nothing() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |c| c.rate_limit_messages_per_sec = 2,
        None,
        clock.clone(),
    )
    .await;
    let (_, owner) = user(&app, "pub-limit@example.com").await;
    let id = create_room(&app, &owner, "limited", "private").await;
    let messages = format!("/api/v1/rooms/{id}/messages");
    let publish = |n: u32| {
        call(
            &app,
            Method::POST,
            &messages,
            &owner,
            Some(json!({ "body": format!("m{n}"), "client_msg_id": format!("c{n}") })),
        )
    };
    assert_eq!(publish(1).await.status(), 201);
    assert_eq!(publish(2).await.status(), 201);
    let refused = publish(3).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    let body = problem(refused, 429, "rate_limited").await;
    assert_eq!(body["retry_after"], 1);
    // A second later the budget is back; the refused message was never stored.
    clock.advance(chrono::Duration::seconds(1));
    assert_eq!(publish(4).await.status(), 201);
    let history: Value = call(&app, Method::GET, &messages, &owner, None)
        .await
        .json()
        .await
        .unwrap();
    let bodies: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m1", "m2", "m4"]);
    app.shutdown().await;
}

#[tokio::test]
async fn control_characters_are_refused_on_sqlite() {
    control_characters_are_refused_with_the_field_named(Backend::Sqlite).await;
}

#[tokio::test]
async fn control_characters_are_refused_on_postgres() {
    control_characters_are_refused_with_the_field_named(Backend::Postgres).await;
}

/// NUL reached PostgreSQL (error 22021, a 500) from a message body or a search; every text
/// input now refuses the control characters it has no use for, identically on both backends,
/// and stores nothing.
async fn control_characters_are_refused_with_the_field_named(backend: Backend) {
    let app = TestApp::spawn_with(backend, |_| {}, None).await;
    let (_, owner) = user(&app, "nul@example.com").await;
    let id = &create_room(&app, &owner, "text", "public").await;
    let path = format!("/api/v1/rooms/{id}/messages");
    let post = |body: Value| call(&app, Method::POST, &path, &owner, Some(body));
    for (body, pointer) in [
        (json!({ "body": "a\u{0}b", "client_msg_id": "c1" }), "/body"),
        (
            json!({ "body": "\u{1b}[2J", "client_msg_id": "c2" }),
            "/body",
        ),
        (
            json!({ "body": "ok", "client_msg_id": "c\u{0}3" }),
            "/client_msg_id",
        ),
    ] {
        let problem = problem(post(body).await, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], pointer, "{problem}");
        assert_eq!(
            problem["errors"][0]["code"], "invalid_characters",
            "{problem}"
        );
    }
    // A display name takes no control characters or bidirectional overrides.
    for name in ["Ada\u{0}", "admin\u{202e}gpj"] {
        let registered = app
            .client
            .post(app.url("/api/v1/auth/register"))
            .json(&json!({ "email": "named@example.com", "password": crate::helpers::PASSWORD, "display_name": name }))
            .send()
            .await
            .unwrap();
        let problem = problem(registered, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], "/display_name", "{problem}");
        assert_eq!(
            problem["errors"][0]["code"], "invalid_characters",
            "{problem}"
        );
    }
    // Line breaks and tabs belong in a message.
    assert_eq!(
        post(json!({ "body": "two\nlines\tand a tab", "client_msg_id": "ok" }))
            .await
            .status(),
        201
    );
    let search = call(
        &app,
        Method::GET,
        "/api/v1/search/messages?q=a%00b",
        &owner,
        None,
    )
    .await;
    let problem = problem(search, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "q", "{problem}");
    let renamed = call(
        &app,
        Method::PATCH,
        &format!("/api/v1/rooms/{id}"),
        &owner,
        Some(json!({ "name": "bad\u{0}name" })),
    )
    .await;
    assert_eq!(renamed.status(), 422);
    // Nothing refused was stored.
    let history: Value = call(
        &app,
        Method::GET,
        &format!("/api/v1/rooms/{id}/messages"),
        &owner,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let bodies: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["two\nlines\tand a tab"]);
    app.shutdown().await;
}

/// With `require_admin_mfa`, an admin without a second factor has a member's rights in rooms:
/// no reading private rooms, changing roles or deleting rooms, over HTTP or WebSocket. The
/// same admin without the requirement has them.
#[tokio::test]
async fn admin_powers_in_rooms_pass_the_second_factor_gate() {
    for required in [true, false] {
        let app = TestApp::spawn_with(
            crate::helpers::default_backend(),
            |c| {
                c.require_admin_mfa = required;
                c.admin_email = Some("root@example.com".into());
                c.admin_password = Some(unhidra_config::Secret::new(crate::helpers::PASSWORD));
            },
            None,
        )
        .await;
        let (member_id, owner) = user(&app, "owner@example.com").await;
        let admin = crate::helpers::access_token(&app, "root@example.com").await;
        let id = &create_room(&app, &owner, "secret", "private").await;
        let read = call(
            &app,
            Method::GET,
            &format!("/api/v1/rooms/{id}/messages"),
            &admin,
            None,
        )
        .await
        .status();
        let demote = call(
            &app,
            Method::POST,
            &format!("/api/v1/rooms/{id}/members"),
            &admin,
            Some(json!({ "user_id": member_id, "role": "member" })),
        )
        .await
        .status();
        let delete = call(
            &app,
            Method::DELETE,
            &format!("/api/v1/rooms/{id}"),
            &admin,
            None,
        )
        .await
        .status();
        if required {
            assert_eq!([read, demote, delete].map(|s| s.as_u16()), [404, 404, 404]);
            // The room is untouched.
            let room = call(
                &app,
                Method::GET,
                &format!("/api/v1/rooms/{id}"),
                &owner,
                None,
            )
            .await;
            assert_eq!(room.status(), 200);
        } else {
            assert_eq!(read, 200);
            assert_eq!(
                demote.as_u16(),
                409,
                "the last owner stays: the power was used"
            );
            assert_eq!(delete.as_u16(), 204);
        }
        app.shutdown().await;
    }
}

/// The bodies of a room's history, oldest first.
async fn bodies(app: &TestApp, token: &str, room: &str) -> Vec<String> {
    let page: Value = call(
        app,
        Method::GET,
        &format!("/api/v1/rooms/{room}/messages?limit=200"),
        token,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect()
}

/// Retention runs by itself every `retention_interval`: with no request asking for it, a room
/// with `retention_max_count` keeps only its newest messages, one with `retention_max_age`
/// loses those older than that, and a room without retention keeps everything.
#[tokio::test]
async fn scheduled_retention_trims_rooms_with_no_request_asking() {
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let app = TestApp::spawn_on(
        TestDb::new(crate::helpers::default_backend()).await,
        |c| {
            c.retention_interval = unhidra_config::HumanDuration::secs(1);
            c.rate_limit_messages_per_sec = 0;
        },
        None,
        clock.clone(),
    )
    .await;
    let (_, owner) = user(&app, "keeper@example.com").await;
    let counted = create_room(&app, &owner, "counted", "public").await;
    let aged = create_room(&app, &owner, "aged", "public").await;
    let kept = create_room(&app, &owner, "kept", "public").await;
    for (room, limit) in [
        (&counted, json!({ "retention_max_count": 3 })),
        (&aged, json!({ "retention_max_age": 3600 })),
    ] {
        let changed = call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rooms/{room}"),
            &owner,
            Some(limit),
        )
        .await;
        assert_eq!(changed.status(), 200);
    }
    let post = |token: String, room: String, body: String| {
        let app = &app;
        async move {
            let posted = call(
                app,
                Method::POST,
                &format!("/api/v1/rooms/{room}/messages"),
                &token,
                Some(json!({ "body": body, "client_msg_id": body })),
            )
            .await;
            assert_eq!(posted.status(), 201);
        }
    };
    for room in [&counted, &aged, &kept] {
        for i in 0..5 {
            post(owner.clone(), room.clone(), format!("m{i}")).await;
        }
    }
    // Two hours later (a new login: the first token has expired), one fresh message.
    clock.advance(chrono::Duration::hours(2));
    let owner = crate::helpers::access_token(&app, "keeper@example.com").await;
    post(owner.clone(), aged.clone(), "fresh".to_owned()).await;

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let trimmed = bodies(&app, &owner, &counted).await.len() == 3
            && bodies(&app, &owner, &aged).await.len() == 1;
        if trimmed || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(bodies(&app, &owner, &counted).await, ["m2", "m3", "m4"]);
    assert_eq!(bodies(&app, &owner, &aged).await, ["fresh"]);
    assert_eq!(
        bodies(&app, &owner, &kept).await,
        ["m0", "m1", "m2", "m3", "m4"]
    );
    app.shutdown().await;
}
