//! The WebSocket gateway over a real socket: authentication styles, frames, acks before
//! broadcasts, idempotent sends, history, resume without gaps or duplicates, and close codes.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::{PASSWORD, TestApp, access_token, create_room, problem, user};

/// Bounds every wait for a frame, so a broken server fails the test instead of hanging it.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Publishes over HTTP, as servers and scripts do.
async fn publish(
    app: &TestApp,
    token: &str,
    room: &str,
    body: &str,
    client_msg_id: &str,
) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/api/v1/rooms/{room}/messages")))
        .bearer_auth(token)
        .json(&json!({ "body": body, "client_msg_id": client_msg_id }))
        .send()
        .await
        .unwrap()
}

pub(crate) fn ws_url(app: &TestApp) -> String {
    format!("ws://{}/ws", app.addr)
}

pub(crate) async fn connect_with(
    app: &TestApp,
    protocols: Option<&str>,
    bearer: Option<&str>,
) -> Result<(Socket, Option<String>), WsError> {
    let mut request = ws_url(app).into_client_request().unwrap();
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
    }
    if let Some(t) = bearer {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
    }
    let (socket, response) = tokio_tungstenite::connect_async(request).await?;
    let echoed = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok((socket, echoed))
}

/// Connects the browser way and reads the welcome frame.
pub(crate) async fn connect(app: &TestApp, token: &str) -> Socket {
    let (mut socket, echoed) =
        connect_with(app, Some(&format!("unhidra.v1.json, bearer.{token}")), None)
            .await
            .unwrap();
    assert_eq!(echoed.as_deref(), Some("unhidra.v1.json"));
    assert_eq!(next(&mut socket).await["type"], "welcome");
    socket
}

pub(crate) async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next text frame, as JSON.
pub(crate) async fn next(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame in time");
        match message.expect("open").expect("readable") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next frame that is not presence.
async fn next_non_presence(socket: &mut Socket) -> Value {
    loop {
        let frame = next(socket).await;
        if frame["type"] != "presence" {
            return frame;
        }
    }
}

/// Reads until the server closes, returning the close code.
pub(crate) async fn close_code(socket: &mut Socket) -> u16 {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("closed in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) | None => return 1005,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("read failed before the close: {e}"),
        }
    }
}

#[tokio::test]
async fn all_three_ways_to_authenticate() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
    )
    .await;
    let (_, token) = user(&app, "ws1@example.com").await;
    let _browser = connect(&app, &token).await;
    // The ESP32 firmware style: a lone token, echoed as it came.
    let (mut lone, echoed) = connect_with(&app, Some(&token), None).await.unwrap();
    assert_eq!(echoed.as_deref(), Some(token.as_str()));
    assert_eq!(next(&mut lone).await["type"], "welcome");
    // Non-browser clients: Authorization on the upgrade request.
    let (mut header, echoed) = connect_with(&app, None, Some(&token)).await.unwrap();
    assert_eq!(echoed, None);
    assert_eq!(next(&mut header).await["type"], "welcome");
    // The listing names each style and wire format, and never holds the token.
    let admin = access_token(&app, "root@example.com").await;
    let list = app
        .client
        .get(app.url("/api/v1/admin/connections"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!list.contains(&token), "the token is listed: {list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    let mut seen: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["auth"].to_string(), c["protocol"].to_string()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                r#""authorization-header""#.into(),
                r#""unhidra.v1.json""#.into()
            ),
            (r#""bearer""#.into(), r#""unhidra.v1.json""#.into()),
            (r#""token-only""#.into(), r#""unhidra.v1.json""#.into()),
        ]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_and_origins_are_refused_before_the_upgrade() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.allowed_origins = vec!["https://app.example.com".into()],
        None,
    )
    .await;
    let (_, token) = user(&app, "ws2@example.com").await;
    let status = |r: Result<(Socket, Option<String>), WsError>| match r {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
        Ok(_) => 101,
    };
    assert_eq!(
        status(connect_with(&app, Some("unhidra.v1.json"), None).await),
        401
    );
    assert_eq!(
        status(connect_with(&app, Some("unhidra.v1.json, bearer.forged"), None).await),
        401
    );
    assert_eq!(
        status(connect_with(&app, Some("garbage-token"), None).await),
        401
    );
    let from = |origin: &'static str| {
        let mut request = ws_url(&app).into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!("unhidra.v1.json, bearer.{token}")).unwrap(),
        );
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_static(origin));
        tokio_tungstenite::connect_async(request)
    };
    assert_eq!(
        status(
            from("https://evil.example.com")
                .await
                .map(|(s, _)| (s, None))
        ),
        403
    );
    assert!(
        from("https://app.example.com").await.is_ok(),
        "an allowed origin"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn send_is_stored_then_acked_then_broadcast_once() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = user(&app, "alice@example.com").await;
    let (bob_id, bob) = user(&app, "bob@example.com").await;
    let lobby = create_room(&app, &alice, "lobby", "public").await;
    let mut a = connect(&app, &alice).await;
    let mut b = connect(&app, &bob).await;
    send(&mut a, json!({ "type": "join", "room": lobby })).await;
    // Alice's own arrival first, so that she is listening when Bob joins.
    let own = next(&mut a).await;
    assert_eq!(
        (own["type"].as_str(), own["user"].as_str()),
        (Some("presence"), Some(alice_id.as_str()))
    );
    send(&mut b, json!({ "type": "join", "room": lobby })).await;
    // Alice sees Bob come online: both are listening now.
    loop {
        let frame = next(&mut a).await;
        if frame["type"] == "presence" && frame["user"] == bob_id.as_str() {
            assert_eq!(frame["status"], "online");
            break;
        }
    }
    send(
        &mut a,
        json!({ "type": "send", "room": lobby, "body": "hello", "client_msg_id": "m1" }),
    )
    .await;
    let ack = next_non_presence(&mut a).await;
    assert_eq!(
        (ack["type"].as_str(), ack["client_msg_id"].as_str()),
        (Some("ack"), Some("m1"))
    );
    let echo = next_non_presence(&mut a).await;
    assert_eq!(
        echo["type"], "message",
        "the ack comes before the broadcast"
    );
    let got = next_non_presence(&mut b).await;
    assert_eq!(
        (got["type"].as_str(), got["body"].as_str()),
        (Some("message"), Some("hello"))
    );
    assert_eq!(got["id"], ack["id"]);
    assert_eq!(got["sender"], alice_id.as_str());

    // A retry: acknowledged again with the same id, stored once, not broadcast again.
    send(
        &mut a,
        json!({ "type": "send", "room": lobby, "body": "hello", "client_msg_id": "m1" }),
    )
    .await;
    let again = next_non_presence(&mut a).await;
    assert_eq!(
        (again["type"].as_str(), &again["id"]),
        (Some("ack"), &ack["id"])
    );
    send(&mut b, json!({ "type": "ping" })).await;
    assert_eq!(
        next_non_presence(&mut b).await["type"],
        "pong",
        "no second copy reached bob"
    );
    let stored: Value = app
        .client
        .get(app.url(&format!("/api/v1/rooms/{lobby}/messages")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["items"].as_array().unwrap().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn frames_larger_than_one_read_and_bursts_arrive_whole_and_in_order() {
    // The burst below is a flood by the default per-connection limit.
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_messages_per_sec = 0,
        None,
    )
    .await;
    let (_, alice) = user(&app, "wide@example.com").await;
    let lobby = create_room(&app, &alice, "wide", "public").await;
    let mut a = connect(&app, &alice).await;
    send(&mut a, json!({ "type": "join", "room": lobby })).await;
    // A body of 16 Ki characters, several of them multi-byte: the frame spans many socket reads.
    let body: String = "é".repeat(8 * 1024) + &"z".repeat(8 * 1024);
    send(
        &mut a,
        json!({ "type": "send", "room": lobby, "body": body, "client_msg_id": "big" }),
    )
    .await;
    let ack = next_non_presence(&mut a).await;
    assert_eq!(ack["type"], "ack");
    let echo = next_non_presence(&mut a).await;
    assert_eq!(echo["body"].as_str(), Some(body.as_str()));
    // A burst written back to back is delivered complete and in order, however the writer
    // batches its flushes.
    for i in 0..200 {
        let frame = json!({ "type": "send", "room": lobby, "body": format!("n{i}"), "client_msg_id": format!("b{i}") });
        a.feed(Message::text(frame.to_string())).await.unwrap();
    }
    a.flush().await.unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < 200 {
        let frame = next_non_presence(&mut a).await;
        if frame["type"] == "message" {
            bodies.push(frame["body"].as_str().unwrap().to_owned());
        }
    }
    let expected: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
    assert_eq!(bodies, expected);
    // Sends read together are stored as one group, but every frame is still answered in the
    // order it came: a ping between two sends is answered between their acks, and a retry
    // inside the burst gets the first one's id.
    for frame in [
        json!({ "type": "send", "room": lobby, "body": "x1", "client_msg_id": "m1" }),
        json!({ "type": "send", "room": lobby, "body": "x2", "client_msg_id": "m2" }),
        json!({ "type": "ping" }),
        json!({ "type": "send", "room": lobby, "body": "x3", "client_msg_id": "m3" }),
        json!({ "type": "send", "room": lobby, "body": "x1 again", "client_msg_id": "m1" }),
        json!({ "type": "send", "room": lobby, "body": "", "client_msg_id": "m4" }),
    ] {
        a.feed(Message::text(frame.to_string())).await.unwrap();
    }
    a.flush().await.unwrap();
    let mut answers = Vec::new();
    let mut ids = std::collections::HashMap::new();
    while answers.len() < 6 {
        let frame = next_non_presence(&mut a).await;
        match frame["type"].as_str().unwrap() {
            "ack" => {
                let cid = frame["client_msg_id"].as_str().unwrap().to_owned();
                let id = frame["id"].as_i64().unwrap();
                assert_eq!(*ids.entry(cid.clone()).or_insert(id), id, "{cid}");
                answers.push(format!("ack {cid}"));
            }
            "error" => answers.push(format!("error {}", frame["ref"].as_str().unwrap())),
            "pong" => answers.push("pong".to_owned()),
            _ => {}
        }
    }
    assert_eq!(
        answers,
        ["ack m1", "ack m2", "pong", "ack m3", "ack m1", "error m4"]
    );
    assert!(ids["m1"] < ids["m2"] && ids["m2"] < ids["m3"], "{ids:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_frames_get_error_frames_and_the_connection_goes_on() {
    let app = TestApp::spawn().await;
    let (_, token) = user(&app, "mal@example.com").await;
    let private = create_room(&app, &token, "mine", "private").await;
    let (_, other) = user(&app, "other@example.com").await;
    let mut socket = connect(&app, &other).await;
    for (frame, code) in [
        ("not json", "invalid_json"),
        ("[]", "not_an_object"),
        (r#"{"room":"x"}"#, "missing_type"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"join"}"#, "missing_field"),
        (r#"{"type":"join","room":7}"#, "invalid_field"),
        (r#"{"type":"join","room":"not-a-uuid"}"#, "room_not_found"),
    ] {
        socket.send(Message::text(frame)).await.unwrap();
        let answer = next(&mut socket).await;
        assert_eq!(
            (answer["type"].as_str(), answer["code"].as_str()),
            (Some("error"), Some(code)),
            "{frame}"
        );
    }
    // A private room is not found for a non-member, whatever its real id.
    send(&mut socket, json!({ "type": "join", "room": private })).await;
    assert_eq!(next(&mut socket).await["code"], "room_not_found");
    send(
        &mut socket,
        json!({ "type": "send", "room": private, "body": "x", "client_msg_id": "c" }),
    )
    .await;
    let refused = next(&mut socket).await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("room_not_found"), Some("c"))
    );
    send(&mut socket, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut socket).await["type"], "pong");
    app.shutdown().await;
}

#[tokio::test]
async fn resume_replays_the_gap_without_duplicates() {
    let app = TestApp::spawn().await;
    let (_, alice) = user(&app, "ra@example.com").await;
    let lobby = create_room(&app, &alice, "lobby", "public").await;
    let mut a = connect(&app, &alice).await;
    send(&mut a, json!({ "type": "join", "room": lobby })).await;
    send(
        &mut a,
        json!({ "type": "send", "room": lobby, "body": "first", "client_msg_id": "1" }),
    )
    .await;
    let ack = next_non_presence(&mut a).await;
    let last_seen = ack["id"].as_i64().unwrap();
    a.close(None).await.unwrap();

    // While Alice is away, three messages arrive.
    for i in 0..3 {
        let r = publish(
            &app,
            &alice,
            &lobby,
            &format!("missed {i}"),
            &format!("away-{i}"),
        )
        .await;
        assert_eq!(r.status(), 201);
    }
    let mut back = connect(&app, &alice).await;
    send(
        &mut back,
        json!({ "type": "resume", "rooms": { lobby.clone(): last_seen } }),
    )
    .await;
    let replay = next_non_presence(&mut back).await;
    assert_eq!(replay["type"], "history");
    let bodies: Vec<&str> = replay["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["missed 0", "missed 1", "missed 2"]);
    // Live delivery goes on after the replay.
    publish(&app, &alice, &lobby, "live", "live").await;
    let live = next_non_presence(&mut back).await;
    assert_eq!(
        (live["type"].as_str(), live["body"].as_str()),
        (Some("message"), Some("live"))
    );

    send(
        &mut back,
        json!({ "type": "history", "room": lobby, "limit": 2 }),
    )
    .await;
    let page = next_non_presence(&mut back).await;
    let bodies: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["missed 2", "live"]);
    app.shutdown().await;
}

#[tokio::test]
async fn close_codes_for_oversize_frames_admins_and_shutdown() {
    let mut app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.ws_max_frame_bytes = 1024;
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
    )
    .await;
    let (_, token) = user(&app, "big@example.com").await;
    let mut socket = connect(&app, &token).await;
    socket.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(close_code(&mut socket).await, 1009);

    let admin = access_token(&app, "root@example.com").await;
    let mut watched = connect(&app, &token).await;
    let listing = || async {
        let list: Value = app
            .client
            .get(app.url("/api/v1/admin/connections"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        list[0].clone()
    };
    let listed = listing().await;
    assert_eq!(listed["kind"], "user");
    assert_eq!(listed["protocol"], "unhidra.v1.json");
    assert_eq!(listed["auth"], "bearer");
    assert_eq!(listed["ip"], "127.0.0.1");
    assert_eq!(listed["last_activity"], listed["connected_at"], "{listed}");
    // A frame from the client moves its last activity on.
    tokio::time::sleep(Duration::from_millis(20)).await;
    send(&mut watched, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut watched).await["type"], "pong");
    let active = listing().await;
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(
        time(&active["last_activity"]) > time(&active["connected_at"]),
        "{active}"
    );
    let id = listed["id"].as_str().unwrap().to_owned();
    let closed = app
        .client
        .delete(app.url(&format!("/api/v1/admin/connections/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    assert_eq!(close_code(&mut watched).await, 4003);

    let mut last = connect(&app, &token).await;
    let stopped = tokio::spawn(app.stop());
    assert_eq!(
        close_code(&mut last).await,
        1001,
        "told before the server goes"
    );
    stopped.await.unwrap().unwrap();
    app.db.drop_db().await;
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_with_4001() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.access_token_ttl = unhidra_config::HumanDuration(Duration::from_secs(2)),
        None,
    )
    .await;
    let (_, token) = user(&app, "exp@example.com").await;
    let mut socket = connect(&app, &token).await;
    assert_eq!(close_code(&mut socket).await, 4001);
    app.shutdown().await;
}

#[tokio::test]
async fn revoking_a_session_or_user_closes_their_connections_with_4003() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
    )
    .await;
    let (user_id, token) = user(&app, "rev@example.com").await;
    let mut socket = connect(&app, &token).await;
    let logout = app
        .client
        .post(app.url("/api/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 204);
    assert_eq!(
        close_code(&mut socket).await,
        4003,
        "logout ends the session's connections"
    );

    let fresh: Value = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({ "email": "rev@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut socket = connect(&app, fresh["access_token"].as_str().unwrap()).await;
    let admin: Value = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({ "email": "root@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let deactivated = app
        .client
        .patch(app.url(&format!("/api/v1/admin/users/{user_id}")))
        .bearer_auth(admin["access_token"].as_str().unwrap())
        .json(&json!({ "active": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(deactivated.status(), 200);
    assert_eq!(
        close_code(&mut socket).await,
        4003,
        "deactivation ends every connection"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn new_connections_are_limited_per_address() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_ip_per_minute = 2,
        None,
    )
    .await;
    let (_, token) = user(&app, "many@example.com").await;
    let _a = connect(&app, &token).await;
    let _b = connect(&app, &token).await;
    match connect_with(
        &app,
        Some(&format!("unhidra.v1.json, bearer.{token}")),
        None,
    )
    .await
    {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"ws_rate_limited_total{scope="ip"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ws_connections{kind="user"} 2"#),
        "{metrics}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_frames_is_refused_then_closed_with_4029() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_messages_per_sec = 3,
        None,
    )
    .await;
    let (_, token) = user(&app, "flood@example.com").await;
    let mut socket = connect(&app, &token).await;
    for _ in 0..20 {
        send(&mut socket, json!({ "type": "ping" })).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("pong") => pongs += 1,
                    Some("error") => {
                        assert_eq!(frame["code"], "rate_limited");
                        assert_eq!(frame["retry_after"], 1);
                        limited += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 4029);
    assert!(
        pongs >= 3 && limited >= 1,
        "{pongs} pongs, {limited} refusals"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.ws_ping_interval = unhidra_config::HumanDuration(Duration::from_secs(1)),
        None,
    )
    .await;
    let (_, token) = user(&app, "silent@example.com").await;
    // Connect but read nothing (so no pong goes back) until the server gives up.
    let (mut socket, _) = connect_with(
        &app,
        Some(&format!("unhidra.v1.json, bearer.{token}")),
        None,
    )
    .await
    .unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut waited = 0;
    while app.state.chat().hub().len() == 1 && waited < 40 {
        tick.tick().await;
        waited += 1;
    }
    assert_eq!(app.state.chat().hub().len(), 0, "reaped");
    assert_eq!(close_code(&mut socket).await, 1008);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"ws_disconnects_total{code="1008"} 1"#),
        "{metrics}"
    );
    app.shutdown().await;
}

fn msgpack(frame: &Value) -> Message {
    Message::binary(rmp_serde::to_vec_named(frame).unwrap())
}

async fn next_msgpack(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame in time");
        match message.expect("open").expect("readable") {
            Message::Binary(bytes) => return rmp_serde::from_slice(&bytes).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_msgpack_subprotocol_carries_the_same_frames() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = user(&app, "mp1@example.com").await;
    let (_, bob) = user(&app, "mp2@example.com").await;
    let lobby = create_room(&app, &alice, "lobby", "public").await;
    let (mut packed, echoed) = connect_with(
        &app,
        Some(&format!("unhidra.v1.msgpack, bearer.{bob}")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(echoed.as_deref(), Some("unhidra.v1.msgpack"));
    assert_eq!(next_msgpack(&mut packed).await["type"], "welcome");
    packed
        .send(msgpack(&json!({ "type": "join", "room": lobby })))
        .await
        .unwrap();
    packed
        .send(msgpack(&json!({ "type": "ping" })))
        .await
        .unwrap();
    loop {
        if next_msgpack(&mut packed).await["type"] == "pong" {
            break;
        }
    }
    // A JSON client's message reaches the MessagePack client as MessagePack.
    let mut text = connect(&app, &alice).await;
    send(&mut text, json!({ "type": "join", "room": lobby })).await;
    send(
        &mut text,
        json!({ "type": "send", "room": lobby, "body": "hej", "client_msg_id": "x" }),
    )
    .await;
    let delivered = loop {
        let frame = next_msgpack(&mut packed).await;
        if frame["type"] == "message" {
            break frame;
        }
    };
    assert_eq!(
        (delivered["body"].as_str(), delivered["sender"].as_str()),
        (Some("hej"), Some(alice_id.as_str()))
    );
    // Sends written back to back are stored together and answered in order, as on JSON.
    for i in 0..3 {
        packed
            .feed(msgpack(
                &json!({ "type": "send", "room": lobby, "body": format!("p{i}"), "client_msg_id": format!("p{i}") }),
            ))
            .await
            .unwrap();
    }
    packed
        .feed(msgpack(&json!({ "type": "ping" })))
        .await
        .unwrap();
    packed.flush().await.unwrap();
    let mut answers = Vec::new();
    while answers.last().is_none_or(|a| a != "pong") {
        let frame = next_msgpack(&mut packed).await;
        match frame["type"].as_str().unwrap() {
            "ack" => answers.push(frame["client_msg_id"].as_str().unwrap().to_owned()),
            "pong" => answers.push("pong".to_owned()),
            _ => {}
        }
    }
    assert_eq!(answers, ["p0", "p1", "p2", "pong"]);
    // Malformed MessagePack gets an error frame, in MessagePack.
    packed.send(Message::binary(vec![0xc1])).await.unwrap();
    let error = next_msgpack(&mut packed).await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("invalid_msgpack"))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_with_1013_and_released() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.ws_queue_frames = 4;
            c.rate_limit_messages_per_sec = 0;
        },
        None,
    )
    .await;
    let (_, alice) = user(&app, "slow-pub@example.com").await;
    let (_, bob) = user(&app, "slow-sub@example.com").await;
    let lobby = create_room(&app, &alice, "lobby", "public").await;

    // The subscriber asks for a tiny receive buffer, joins, and then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let mut request = ws_url(&app).into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("unhidra.v1.json, bearer.{bob}")).unwrap(),
    );
    let (slow, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let mut slow: Socket = slow;
    assert_eq!(next(&mut slow).await["type"], "welcome");
    send(&mut slow, json!({ "type": "join", "room": lobby })).await;
    send(&mut slow, json!({ "type": "ping" })).await;
    while next(&mut slow).await["type"] != "pong" {}

    // Large messages fill the socket buffers, then the four-frame queue.
    let mut publisher = connect(&app, &alice).await;
    let body = "x".repeat(16 * 1024);
    let mut sent = 0;
    while app.state.chat().hub().len() == 2 && sent < 400 {
        send(
            &mut publisher,
            json!({ "type": "send", "room": lobby, "body": body, "client_msg_id": sent.to_string() }),
        )
        .await;
        while next_non_presence(&mut publisher).await["type"] != "ack" {}
        sent += 1;
    }
    let mut waited = 0;
    while app.state.chat().hub().len() != 1 && waited < 40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    assert_eq!(
        app.state.chat().hub().len(),
        1,
        "only the publisher is left"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"ws_disconnects_total{code="1013"} 1"#),
        "{metrics}"
    );
    // Reading again, the subscriber gets what was already on its way, then the end.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server let go of the connection");
    // The publisher was not held up by the slow one.
    send(
        &mut publisher,
        json!({ "type": "send", "room": lobby, "body": "still here", "client_msg_id": "last" }),
    )
    .await;
    assert_eq!(next_non_presence(&mut publisher).await["type"], "ack");
    app.shutdown().await;
}

#[tokio::test]
async fn the_json_lines_subprotocol_batches_frames_one_per_line() {
    let app = TestApp::spawn().await;
    let (_, alice) = user(&app, "lines-pub@example.com").await;
    let (_, bob) = user(&app, "lines-sub@example.com").await;
    let lobby = create_room(&app, &alice, "lobby", "public").await;
    let (mut socket, echoed) =
        connect_with(&app, Some(&format!("unhidra.v1.jsonl, bearer.{bob}")), None)
            .await
            .unwrap();
    assert_eq!(echoed.as_deref(), Some("unhidra.v1.jsonl"));
    let welcome = read_lines(&mut socket).await;
    assert_eq!(welcome[0]["type"], "welcome");
    let id: u64 = welcome[0]["connection"].as_str().unwrap().parse().unwrap();

    // Frames queued together (the test's runtime has one thread, so the writer cannot run
    // between these calls) go out as one WebSocket message, one frame per line.
    let hub = app.state.chat().hub();
    for _ in 0..3 {
        hub.send_to(id, &unhidra_protocol::ServerFrame::Pong);
    }
    let batch = read_lines(&mut socket).await;
    assert_eq!(batch.len(), 3, "{batch:?}");
    assert!(batch.iter().all(|f| f["type"] == "pong"), "{batch:?}");

    // Messages arrive whole and in order, however they are batched.
    send(&mut socket, json!({ "type": "join", "room": lobby })).await;
    // Frames of one connection are handled in order: at the pong, the join is done.
    send(&mut socket, json!({ "type": "ping" })).await;
    while !read_lines(&mut socket)
        .await
        .iter()
        .any(|f| f["type"] == "pong")
    {}
    for i in 0..3 {
        let published = publish(&app, &alice, &lobby, &format!("line {i}"), &format!("l{i}")).await;
        assert_eq!(published.status(), 201);
    }
    let mut bodies = Vec::new();
    while bodies.len() < 3 {
        for frame in read_lines(&mut socket).await {
            if frame["type"] == "message" {
                bodies.push(frame["body"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(bodies, ["line 0", "line 1", "line 2"]);
    app.shutdown().await;
}

/// The frames of the next WebSocket text message, one per line.
async fn read_lines(socket: &mut Socket) -> Vec<Value> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("readable");
        if let Message::Text(text) = message {
            return text
                .as_str()
                .split('\n')
                .map(|line| serde_json::from_str(line).expect("one JSON frame per line"))
                .collect();
        }
    }
}

#[tokio::test]
async fn a_burst_cut_short_by_the_rate_limit_is_still_answered_in_order() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_messages_per_sec = 3,
        None,
    )
    .await;
    let (_, owner) = user(&app, "burst-owner@example.com").await;
    let (_, guest) = user(&app, "burst-guest@example.com").await;
    let lobby = create_room(&app, &owner, "lobby", "public").await;
    let mut socket = connect(&app, &guest).await;
    // Four sends in one write to a room the guest has not joined: the bucket holds three.
    for i in 1..=4 {
        let frame = json!({ "type": "send", "room": lobby, "body": "hi", "client_msg_id": format!("s{i}") });
        socket.feed(Message::text(frame.to_string())).await.unwrap();
    }
    socket.flush().await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let frame = next_non_presence(&mut socket).await;
        assert_eq!(frame["type"], "error", "{frame}");
        answers.push(format!(
            "{} {}",
            frame["code"].as_str().unwrap(),
            frame["ref"].as_str().unwrap_or("-")
        ));
    }
    assert_eq!(
        answers,
        [
            "forbidden s1",
            "forbidden s2",
            "forbidden s3",
            "rate_limited -"
        ]
    );
    app.shutdown().await;
}

/// The per-address connection limits count an IPv6 client as its /64 (one subscriber holds
/// 2^64 addresses), as the login limits do.
#[tokio::test]
async fn ipv6_clients_are_limited_per_network_on_the_gateway() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.trusted_proxies = vec!["127.0.0.1".to_owned()];
            c.ws_max_connections_per_ip = 2;
        },
        None,
    )
    .await;
    let (_, token) = user(&app, "v6@example.com").await;
    let from = |address: &str| {
        let mut request = ws_url(&app).into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!("unhidra.v1.json, bearer.{token}")).unwrap(),
        );
        request
            .headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(address).unwrap());
        tokio_tungstenite::connect_async(request)
    };
    let (_first, _) = from("2001:db8:1:2::1").await.unwrap();
    let (_second, _) = from("2001:db8:1:2::2").await.unwrap();
    match from("2001:db8:1:2:ffff::3").await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 429),
        other => panic!("a third connection from the same /64 must be refused: {other:?}"),
    }
    let (_other_network, _) = from("2001:db8:1:3::1").await.unwrap();
    app.shutdown().await;
}

/// The session of the token, from the caller's own session listing.
async fn session_of(app: &TestApp, token: &str) -> uuid::Uuid {
    let sessions: Value = app
        .client
        .get(app.url("/api/v1/auth/sessions"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let current = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == true)
        .unwrap();
    current["id"].as_str().unwrap().parse().unwrap()
}

/// Sends a ping and reads up to its pong; returns the types of the frames before it.
async fn until_pong(socket: &mut Socket) -> Vec<String> {
    send(socket, json!({ "type": "ping" })).await;
    let mut seen = Vec::new();
    loop {
        let frame = next(socket).await;
        if frame["type"] == "pong" {
            return seen;
        }
        seen.push(frame["type"].as_str().unwrap().to_owned());
    }
}

/// A revocation whose broadcast the follower missed (a lag) is not lost: the re-check it runs
/// then closes every connection whose session ended, and leaves the others open.
#[tokio::test]
async fn missed_revocations_are_found_by_a_recheck() {
    let app = TestApp::spawn().await;
    let (_, token) = user(&app, "lag@example.com").await;
    let (_, other) = user(&app, "stays@example.com").await;
    let mut revoked = connect(&app, &token).await;
    let mut kept = connect(&app, &other).await;
    let session = session_of(&app, &token).await;
    // Revoked in the store only, as if its broadcast had been lost.
    assert!(
        app.state
            .store()
            .revoke_session(session, "test", chrono::Utc::now())
            .await
            .unwrap()
    );
    unhidra_server::recheck_connections(&app.state).await;
    assert_eq!(close_code(&mut revoked).await, 4003);
    assert_eq!(until_pong(&mut kept).await, Vec::<String>::new());
    app.shutdown().await;
}

/// A connection acts with the role it connected with; a role change closes it (4003), and the
/// client reconnects with the role stored now. Naming the same role again changes nothing.
#[tokio::test]
async fn a_role_change_closes_the_users_live_connections() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
    )
    .await;
    let admin = access_token(&app, "root@example.com").await;
    let (id, token) = user(&app, "promoted@example.com").await;
    let set_role = |role: &'static str| {
        app.client
            .patch(app.url(&format!("/api/v1/admin/users/{id}")))
            .bearer_auth(&admin)
            .json(&json!({ "role": role }))
            .send()
    };
    let mut socket = connect(&app, &token).await;
    assert_eq!(set_role("admin").await.unwrap().status(), 200);
    assert_eq!(close_code(&mut socket).await, 4003);
    let mut again = connect(&app, &token).await;
    assert_eq!(set_role("admin").await.unwrap().status(), 200);
    assert_eq!(
        until_pong(&mut again).await,
        Vec::<String>::new(),
        "same role: still open"
    );
    app.shutdown().await;
}

/// Joining checks membership and subscribes atomically with respect to removal: a member who
/// keeps sending `join` while being removed never stays subscribed.
#[tokio::test]
async fn a_member_removed_while_joining_gets_nothing_afterwards() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_messages_per_sec = 0,
        None,
    )
    .await;
    let (_, owner) = user(&app, "keeper@example.com").await;
    let (member_id, member) = user(&app, "churn@example.com").await;
    let room = create_room(&app, &owner, "churn", "private").await;
    let members = app.url(&format!("/api/v1/rooms/{room}/members"));
    let mut socket = connect(&app, &member).await;
    for round in 0..50 {
        let added = app
            .client
            .post(&members)
            .bearer_auth(&owner)
            .json(&json!({ "user_id": member_id, "role": "member" }))
            .send()
            .await
            .unwrap();
        assert!(added.status().is_success(), "{}", added.status());
        for _ in 0..20 {
            send(&mut socket, json!({ "type": "join", "room": room })).await;
        }
        let removed = app
            .client
            .delete(format!("{members}/{member_id}"))
            .bearer_auth(&owner)
            .send()
            .await
            .unwrap();
        assert_eq!(removed.status(), 204);
        // Every join is handled before the pong.
        until_pong(&mut socket).await;
        assert_eq!(
            publish(
                &app,
                &owner,
                &room,
                "after the removal",
                &format!("r{round}")
            )
            .await
            .status(),
            201
        );
        let seen = until_pong(&mut socket).await;
        assert!(
            !seen.iter().any(|t| t == "message"),
            "round {round}: a removed member received {seen:?}"
        );
    }
    app.shutdown().await;
}

/// An `auth` frame with a fresh token of the same session keeps the connection past the first
/// token's expiry; a token that does not verify, or one of another session, is refused with an
/// error frame and changes nothing.
#[tokio::test]
async fn an_auth_frame_extends_the_connection_and_refuses_other_tokens() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.access_token_ttl = unhidra_config::HumanDuration(Duration::from_secs(4)),
        None,
    )
    .await;
    let (_, _) = user(&app, "renew@example.com").await;
    let pair: Value = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({ "email": "renew@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let connected = tokio::time::Instant::now();
    let mut socket = connect(&app, pair["access_token"].as_str().unwrap()).await;
    send(&mut socket, json!({ "type": "auth", "token": "forged" })).await;
    let refused = next_non_presence(&mut socket).await;
    assert_eq!(refused["code"], "invalid_token", "{refused}");
    let other_session = access_token(&app, "renew@example.com").await;
    send(
        &mut socket,
        json!({ "type": "auth", "token": other_session }),
    )
    .await;
    let refused = next_non_presence(&mut socket).await;
    assert_eq!(refused["code"], "session_mismatch", "{refused}");
    // Tokens expire on whole seconds: the first within 3–4 s of the login, a fresh one taken
    // 2 s after the connect at least 5 s after it. 4.6 s after the connect lies between.
    tokio::time::sleep_until(connected + Duration::from_secs(2)).await;
    let fresh: Value = app
        .client
        .post(app.url("/api/v1/auth/refresh"))
        .json(&json!({ "refresh_token": pair["refresh_token"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(fresh["access_token"].is_string(), "{fresh}");
    send(
        &mut socket,
        json!({ "type": "auth", "token": fresh["access_token"] }),
    )
    .await;
    tokio::time::sleep_until(connected + Duration::from_millis(4600)).await;
    assert_eq!(
        until_pong(&mut socket).await,
        Vec::<String>::new(),
        "still open after the first token expired"
    );
    assert_eq!(
        close_code(&mut socket).await,
        4001,
        "then the fresh one expires"
    );
    app.shutdown().await;
}

/// Reads frames until a presence frame about `user` with `status` arrives.
async fn presence_of(socket: &mut Socket, user: &str, status: &str) {
    loop {
        let frame = next(socket).await;
        if frame["type"] == "presence" && frame["user"] == user && frame["status"] == status {
            return;
        }
    }
}

/// `typing` reaches the room's other listeners as presence; `leave` stops delivery to that
/// connection; a user's last connection going away is announced `offline`.
#[tokio::test]
async fn typing_leave_and_offline_reach_the_room() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = user(&app, "typist@example.com").await;
    let (bob_id, bob) = user(&app, "watcher@example.com").await;
    let room = create_room(&app, &alice, "typing", "public").await;
    let mut a = connect(&app, &alice).await;
    let mut b = connect(&app, &bob).await;
    send(&mut b, json!({ "type": "join", "room": room })).await;
    presence_of(&mut b, &bob_id, "online").await;
    send(&mut a, json!({ "type": "join", "room": room })).await;
    presence_of(&mut b, &alice_id, "online").await;
    send(&mut a, json!({ "type": "typing", "room": room })).await;
    presence_of(&mut b, &alice_id, "typing").await;
    // Bob leaves: a message posted afterwards does not reach him.
    send(&mut b, json!({ "type": "leave", "room": room })).await;
    assert!(
        until_pong(&mut b).await.iter().all(|t| t == "presence"),
        "leave is silent"
    );
    assert_eq!(
        publish(&app, &alice, &room, "after bob left", "t1")
            .await
            .status(),
        201
    );
    let seen = until_pong(&mut b).await;
    assert!(!seen.iter().any(|t| t == "message"), "{seen:?}");
    // Bob listens again; Alice's last connection closes: Bob sees her go offline.
    send(&mut b, json!({ "type": "join", "room": room })).await;
    until_pong(&mut b).await;
    a.close(None).await.unwrap();
    presence_of(&mut b, &alice_id, "offline").await;
    app.shutdown().await;
}

/// New connections are limited per user and minute (`rate_limit_user_per_minute`) and live
/// ones per address (`ws_max_connections_per_ip`); a refusal is a 429 before the upgrade.
#[tokio::test]
async fn connection_limits_per_user_and_per_address() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.rate_limit_user_per_minute = 2;
            c.ws_max_connections_per_ip = 3;
        },
        None,
    )
    .await;
    let status = |r: Result<(Socket, Option<String>), WsError>| match r {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
        Ok(_) => 101,
    };
    let bearer = |token: &str| format!("unhidra.v1.json, bearer.{token}");
    let (_, busy) = user(&app, "many@example.com").await;
    let _first = connect_with(&app, Some(&bearer(&busy)), None)
        .await
        .unwrap();
    let _second = connect_with(&app, Some(&bearer(&busy)), None)
        .await
        .unwrap();
    assert_eq!(
        status(connect_with(&app, Some(&bearer(&busy)), None).await),
        429,
        "a third connection of the user within the minute"
    );
    let (_, other) = user(&app, "neighbour@example.com").await;
    let _third = connect_with(&app, Some(&bearer(&other)), None)
        .await
        .unwrap();
    let (_, late) = user(&app, "late@example.com").await;
    assert_eq!(
        status(connect_with(&app, Some(&bearer(&late)), None).await),
        429,
        "a fourth live connection from the address"
    );
    app.shutdown().await;
}

/// A password accepted by the policy and different from [`PASSWORD`].
const NEW_PASSWORD: &str = "harbor lantern seventeen quiet moths";

/// A password change ends the user's other sessions at once: their live connections close with
/// 4003, while the session that changed the password, and its connection, go on.
#[tokio::test]
async fn a_password_change_closes_the_other_sessions_connections_with_4003() {
    let app = TestApp::spawn().await;
    let (_, here) = user(&app, "pw-change@example.com").await;
    let elsewhere = access_token(&app, "pw-change@example.com").await;
    let mut kept = connect(&app, &here).await;
    let mut ended = connect(&app, &elsewhere).await;
    let changed = app
        .client
        .post(app.url("/api/v1/auth/password"))
        .bearer_auth(&here)
        .json(&json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 204);
    assert_eq!(close_code(&mut ended).await, 4003);
    assert_eq!(
        until_pong(&mut kept).await,
        Vec::<String>::new(),
        "the changing session's connection stays open"
    );
    app.shutdown().await;
}

/// A completed password reset ends every session of the user, so every live connection of
/// theirs closes with 4003; another user's connection stays open.
#[tokio::test]
async fn a_password_reset_closes_every_connection_of_the_user_with_4003() {
    let app = TestApp::spawn().await;
    let (_, first) = user(&app, "pw-reset@example.com").await;
    let second = access_token(&app, "pw-reset@example.com").await;
    let (_, bystander) = user(&app, "pw-bystander@example.com").await;
    let mut a = connect(&app, &first).await;
    let mut b = connect(&app, &second).await;
    let mut other = connect(&app, &bystander).await;
    let requested = app
        .client
        .post(app.url("/api/v1/auth/password-reset"))
        .json(&json!({ "email": "pw-reset@example.com" }))
        .send()
        .await
        .unwrap();
    assert_eq!(requested.status(), 202);
    let mail = app
        .mails()
        .await
        .into_iter()
        .find(|m| m.subject == "Reset your password")
        .expect("a reset mail");
    let confirmed = app
        .client
        .post(app.url("/api/v1/auth/password-reset/confirm"))
        .json(&json!({ "token": mail.code(), "new_password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(confirmed.status(), 204);
    assert_eq!(close_code(&mut a).await, 4003);
    assert_eq!(close_code(&mut b).await, 4003);
    assert_eq!(until_pong(&mut other).await, Vec::<String>::new());
    app.shutdown().await;
}

/// Presenting a rotated refresh token again revokes its session (reuse detection): the live
/// connection of that session closes with 4003; the user's other session is not touched.
#[tokio::test]
async fn a_replayed_refresh_token_closes_its_sessions_connection_with_4003() {
    let app = TestApp::spawn().await;
    let (_, other_session) = user(&app, "replay@example.com").await;
    let pair: Value = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({ "email": "replay@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut replayed = connect(&app, pair["access_token"].as_str().unwrap()).await;
    let mut kept = connect(&app, &other_session).await;
    let refresh = |token: Value| {
        app.client
            .post(app.url("/api/v1/auth/refresh"))
            .json(&json!({ "refresh_token": token }))
            .send()
    };
    let rotated = refresh(pair["refresh_token"].clone()).await.unwrap();
    assert_eq!(rotated.status(), 200);
    problem(
        refresh(pair["refresh_token"].clone()).await.unwrap(),
        401,
        "refresh_token_reused",
    )
    .await;
    assert_eq!(close_code(&mut replayed).await, 4003);
    assert_eq!(until_pong(&mut kept).await, Vec::<String>::new());
    app.shutdown().await;
}

/// The ids of the messages a resumed `socket` receives for `room`, replayed or live, in arrival
/// order, and whether the `history` reply came before any live message: reads until the
/// message with body `last` arrived.
async fn resumed_ids(mut socket: Socket, room: &str, last: &str) -> (Vec<i64>, bool) {
    let socket = &mut socket;
    let mut ids = Vec::new();
    let mut history_first = None;
    let mut done = false;
    while !done {
        let frame = next_non_presence(socket).await;
        match frame["type"].as_str() {
            Some("history") => {
                assert_eq!(frame["room"], room, "{frame}");
                assert_eq!(frame.get("more"), None, "one reply holds the gap: {frame}");
                history_first.get_or_insert(ids.is_empty());
                for m in frame["messages"].as_array().unwrap() {
                    ids.push(m["id"].as_i64().unwrap());
                    done |= m["body"] == last;
                }
            }
            Some("message") => {
                assert_eq!(frame["room"], room, "{frame}");
                history_first.get_or_insert(false);
                ids.push(frame["id"].as_i64().unwrap());
                done |= frame["body"] == last;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    (ids, history_first == Some(true))
}

/// `resume` while another client keeps sending: each resumed client gets the replay first,
/// then the live messages, and sees every message after its cursor exactly once, in order,
/// with no gap where the replay hands over to live delivery.
#[tokio::test]
async fn resume_while_messages_keep_arriving_has_no_gap_and_no_duplicate() {
    const SENT: usize = 300;
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.rate_limit_messages_per_sec = 0,
        None,
    )
    .await;
    let (_, alice) = user(&app, "resumer@example.com").await;
    let (_, bob) = user(&app, "sender@example.com").await;
    let room = create_room(&app, &alice, "busy", "public").await;
    let cursor = publish(&app, &alice, &room, "before", "before").await;
    assert_eq!(cursor.status(), 201);
    let cursor = cursor.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();

    let mut sender = connect(&app, &bob).await;
    send(&mut sender, json!({ "type": "join", "room": room })).await;
    // Acks come in order; each one tells the resumers how far the sender got.
    let (progress_tx, progress) = tokio::sync::watch::channel(Vec::<i64>::new());
    let sending = {
        let room = room.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..SENT {
                send(
                    &mut sender,
                    json!({ "type": "send", "room": room, "body": format!("b{i}"), "client_msg_id": format!("b{i}") }),
                )
                .await;
                let ack = loop {
                    let frame = next_non_presence(&mut sender).await;
                    if frame["type"] == "ack" {
                        break frame;
                    }
                };
                acked.push(ack["id"].as_i64().unwrap());
                progress_tx.send_replace(acked.clone());
            }
            acked
        })
    };
    // Three clients resume at different points of the stream, each on a connection of its own,
    // and read from then on.
    let last = format!("b{}", SENT - 1);
    let mut resumers = Vec::new();
    for after in [10, 100, 200] {
        let mut progress = progress.clone();
        progress
            .wait_for(|acked| acked.len() >= after)
            .await
            .unwrap();
        let mut socket = connect(&app, &alice).await;
        send(
            &mut socket,
            json!({ "type": "resume", "rooms": { room.clone(): cursor } }),
        )
        .await;
        let (room, last) = (room.clone(), last.clone());
        resumers.push(tokio::spawn(async move {
            resumed_ids(socket, &room, &last).await
        }));
    }
    let acked = tokio::time::timeout(6 * WAIT, sending)
        .await
        .expect("the sender finished in time")
        .unwrap();
    for (n, resumer) in resumers.into_iter().enumerate() {
        let (ids, history_first) = resumer.await.unwrap();
        assert!(history_first, "resumer {n}: the replay comes first");
        assert_eq!(ids, acked, "resumer {n}: every message once, in order");
    }
    app.shutdown().await;
}
