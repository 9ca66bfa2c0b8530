//! The device fleet over HTTP and the device session over a real socket: registration and
//! keys, every way a device presents its key, hello first, telemetry acknowledged once durable
//! and never stored twice, refusals with their codes, replacement (4009) and revocation (4003).

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{PASSWORD, TestApp, problem, user};
use crate::ws::{Socket, close_code, connect_with, next, send};

async fn app() -> TestApp {
    TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
        },
        None,
    )
    .await
}

/// Registers a device as `token`'s user; answers its id and key.
async fn register(app: &TestApp, token: &str, name: &str) -> (String, String) {
    let made = app
        .client
        .post(app.url("/api/v1/devices"))
        .bearer_auth(token)
        .json(&json!({ "name": name, "model": "esp32-s3", "tags": ["lab"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    (
        made["device"]["id"].as_str().unwrap().to_owned(),
        made["key"].as_str().unwrap().to_owned(),
    )
}

/// Connects the recommended way and reads the welcome frame.
async fn connect_device(app: &TestApp, key: &str) -> Socket {
    let (mut socket, echoed) =
        connect_with(app, Some(&format!("unhidra.device.v1, key.{key}")), None)
            .await
            .unwrap();
    assert_eq!(echoed.as_deref(), Some("unhidra.device.v1"));
    let welcome = next(&mut socket).await;
    assert_eq!(welcome["type"], "welcome");
    socket
}

async fn hello(socket: &mut Socket) {
    send(
        socket,
        json!({ "type": "hello", "firmware": "1.4.2", "capabilities": ["thermal"] }),
    )
    .await;
}

async fn get_json(app: &TestApp, token: &str, path: &str) -> Value {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_device_connects_says_hello_and_its_telemetry_is_acknowledged_once() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (_, bob) = user(&app, "bob@example.com").await;
    let (id, key) = register(&app, &alice, "boiler").await;
    let mut socket = connect_device(&app, &key).await;

    // Nothing but hello (or ping) before hello.
    send(
        &mut socket,
        json!({ "type": "telemetry", "seq": 1, "points": [] }),
    )
    .await;
    let refused = next(&mut socket).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("hello_required"))
    );
    assert_eq!(refused["ref"], "1");
    hello(&mut socket).await;
    send(
        &mut socket,
        json!({ "type": "heartbeat", "uptime": 12, "rssi": -61, "free_heap": 81234 }),
    )
    .await;
    let batch = json!({ "type": "telemetry", "seq": 7, "points": [
        { "key": "temp", "value": 21.5 },
        { "key": "door", "value": true, "ts": chrono::Utc::now().timestamp_millis() - 1000 },
        { "key": "thermal", "value": { "shape": [24, 32], "dtype": "f32", "data": vec![20.5; 768] } },
    ]});
    send(&mut socket, batch.clone()).await;
    assert_eq!(next(&mut socket).await, json!({ "type": "ack", "seq": 7 }));
    // Sent again (the ack was lost, say): acknowledged again, stored once.
    send(&mut socket, batch).await;
    assert_eq!(
        next(&mut socket).await,
        json!({ "type": "ack", "seq": 7, "duplicate": true })
    );
    send(&mut socket, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut socket).await["type"], "pong");

    // A malformed frame and a batch past a limit: each answered with its code, nothing stored.
    socket.send(Message::text("{not json")).await.unwrap();
    assert_eq!(next(&mut socket).await["code"], "invalid_json");
    send(
        &mut socket,
        json!({ "type": "telemetry", "seq": 8, "points": [{ "key": "bad key", "value": 1 }] }),
    )
    .await;
    let refused = next(&mut socket).await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("invalid_key"), Some("8"))
    );
    send(
        &mut socket,
        json!({ "type": "telemetry", "seq": 9, "points": [{ "key": "x", "value": 1, "ts": 0 }] }),
    )
    .await;
    assert_eq!(next(&mut socket).await["code"], "ts_too_old");

    let device = get_json(&app, &alice, &format!("/api/v1/devices/{id}")).await;
    assert_eq!(device["status"], "online");
    assert_eq!(device["connected"], true);
    assert_eq!(device["firmware"], "1.4.2");
    let temps = get_json(
        &app,
        &alice,
        &format!("/api/v1/devices/{id}/telemetry?key=temp"),
    )
    .await;
    assert_eq!(temps["points"].as_array().unwrap().len(), 1);
    assert_eq!(temps["points"][0]["value"], 21.5);
    let latest = get_json(
        &app,
        &alice,
        &format!("/api/v1/devices/{id}/telemetry/latest"),
    )
    .await;
    let keys: Vec<&str> = latest
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["door", "temp", "thermal"]);
    assert_eq!(latest[2]["value"]["shape"], json!([24, 32]));
    // Bob sees none of it.
    let hidden = app
        .client
        .get(app.url(&format!("/api/v1/devices/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    problem(hidden, 404, "not_found").await;
    let hidden = app
        .client
        .get(app.url(&format!("/api/v1/devices/{id}/telemetry?key=temp")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    problem(hidden, 404, "not_found").await;

    // The admin's list of connections shows the device, never its key.
    let admin = crate::helpers::access_token(&app, "root@example.com").await;
    let conns = get_json(&app, &admin, "/api/v1/admin/connections").await;
    let text = conns.to_string();
    assert!(!text.contains(&key));
    let device_conn = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "device")
        .unwrap();
    assert_eq!(device_conn["device"], id.as_str());
    assert_eq!(device_conn["auth"], "key");
    let fleet = get_json(&app, &admin, "/api/v1/admin/fleet").await;
    assert_eq!(
        (fleet["total"].as_u64(), fleet["online"].as_u64()),
        (Some(1), Some(1))
    );

    // A clean close: offline at once.
    socket.close(None).await.unwrap();
    let _ = close_code(&mut socket).await;
    for _ in 0..100 {
        let device = get_json(&app, &alice, &format!("/api/v1/devices/{id}")).await;
        if device["status"] == "offline" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the device did not go offline");
}

#[tokio::test]
async fn every_way_to_present_a_key_and_the_refusals() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (_, key) = register(&app, &alice, "d").await;
    // The firmware style: the key as the only subprotocol, echoed.
    let (mut lone, echoed) = connect_with(&app, Some(&key), None).await.unwrap();
    assert_eq!(echoed.as_deref(), Some(key.as_str()));
    assert_eq!(next(&mut lone).await["type"], "welcome");
    // A newer connection replaces it: 4009.
    let (mut header, echoed) = connect_with(&app, None, Some(&key)).await.unwrap();
    assert_eq!(echoed, None);
    assert_eq!(next(&mut header).await["type"], "welcome");
    assert_eq!(close_code(&mut lone).await, 4009);

    // MessagePack, with a thermal frame as packed f32 in a bin.
    let (mut packed, echoed) = connect_with(
        &app,
        Some(&format!("unhidra.device.v1.msgpack, key.{key}")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(echoed.as_deref(), Some("unhidra.device.v1.msgpack"));
    assert_eq!(close_code(&mut header).await, 4009);
    let welcome = read_msgpack(&mut packed).await;
    assert_eq!(welcome["type"], "welcome");
    let hello = unhidra_protocol::DeviceFrame::Hello {
        firmware: "2.0.0".into(),
        partition: None,
        reset_reason: None,
        capabilities: vec![],
        secure_version: None,
    };
    packed
        .send(Message::binary(hello.to_msgpack()))
        .await
        .unwrap();
    let frame =
        unhidra_protocol::device::ArrayValue::from_f32(vec![24, 32], &[19.25; 768]).unwrap();
    let telemetry = unhidra_protocol::DeviceFrame::Telemetry {
        seq: 1,
        points: vec![unhidra_protocol::device::Point {
            ts: None,
            key: "thermal".into(),
            value: unhidra_protocol::device::Value::Array(frame),
        }],
    };
    packed
        .send(Message::binary(telemetry.to_msgpack()))
        .await
        .unwrap();
    let ack = read_msgpack(&mut packed).await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(1))
    );

    // Refused before the upgrade: a wrong key, a device protocol with no key, a user token as
    // a device key.
    for protocols in [
        format!("unhidra.device.v1, key.{}x", &key[..key.len() - 1]),
        "unhidra.device.v1".to_owned(),
        format!("unhidra.device.v1, key.{alice}"),
        "unh_dk_short".to_owned(),
    ] {
        let refused = connect_with(&app, Some(&protocols), None).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{protocols}");
            }
            other => panic!("{protocols}: {other:?}"),
        }
    }
}

async fn read_msgpack(socket: &mut Socket) -> Value {
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(crate::ws::WAIT, socket.next())
            .await
            .unwrap();
        match message.unwrap().unwrap() {
            Message::Binary(bytes) => return rmp_serde::from_slice(&bytes).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn keys_rotate_and_a_revoked_device_is_closed_with_4003() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (id, key) = register(&app, &alice, "d").await;
    let mut socket = connect_device(&app, &key).await;
    let rotated = app
        .client
        .post(app.url(&format!("/api/v1/devices/{id}/keys")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 201);
    let rotated: Value = rotated.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    let keys = get_json(&app, &alice, &format!("/api/v1/devices/{id}/keys")).await;
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(!keys.to_string().contains(&key) && !keys.to_string().contains(&new_key));

    let revoked = app
        .client
        .post(app.url(&format!("/api/v1/devices/{id}/revoke")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert_eq!(revoked.json::<Value>().await.unwrap()["revoked"], 2);
    assert_eq!(close_code(&mut socket).await, 4003);
    for k in [&key, &new_key] {
        match connect_with(&app, Some(&format!("unhidra.device.v1, key.{k}")), None).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn a_sleeping_device_posts_batches_over_http() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (id, key) = register(&app, &alice, "d").await;
    let post = |body: Value, key: String| {
        let client = app.client.clone();
        let url = app.url("/api/v1/device/telemetry");
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let batch = json!({ "seq": 1, "points": [{ "key": "battery", "value": 87.5 }] });
    let first = post(batch.clone(), key.clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.json::<Value>().await.unwrap(),
        json!({ "seq": 1, "duplicate": false })
    );
    let again = post(batch, key.clone()).await;
    assert_eq!(again.json::<Value>().await.unwrap()["duplicate"], true);
    problem(
        post(json!({ "seq": 2, "points": [] }), "unh_dk_nope".into()).await,
        401,
        "unauthorized",
    )
    .await;
    let too_long = json!({ "seq": 3, "points": [{ "key": "x", "value": "y".repeat(20_000) }] });
    problem(post(too_long, key.clone()).await, 422, "validation_failed").await;
    let latest = get_json(
        &app,
        &alice,
        &format!("/api/v1/devices/{id}/telemetry/latest"),
    )
    .await;
    assert_eq!(latest.as_array().unwrap().len(), 1);
    let device = get_json(&app, &alice, &format!("/api/v1/devices/{id}")).await;
    assert!(device["last_seen"].is_string());
}

#[tokio::test]
async fn commands_and_configuration_reach_the_device_online_and_on_connect() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (id, key) = register(&app, &alice, "d").await;
    let command = |body: Value, wait: u64| {
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/devices/{id}/commands?wait={wait}"));
        let token = alice.clone();
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // Offline: a command and a configuration wait for the device.
    let queued = command(json!({ "name": "blink", "params": { "times": 3 } }), 0).await;
    assert_eq!(queued.status(), 201);
    let queued: Value = queued.json().await.unwrap();
    assert_eq!(queued["state"], "queued");
    let put = app
        .client
        .put(app.url(&format!("/api/v1/devices/{id}/config")))
        .bearer_auth(&alice)
        .json(&json!({ "desired": { "rate": 10 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);

    let mut socket = connect_device(&app, &key).await;
    hello(&mut socket).await;
    assert_eq!(
        next(&mut socket).await,
        json!({ "type": "config", "version": 1, "desired": { "rate": 10 }, "full": true })
    );
    let delivered = next(&mut socket).await;
    assert_eq!(
        (delivered["type"].as_str(), delivered["id"].as_str()),
        (Some("command"), queued["id"].as_str())
    );
    assert_eq!(delivered["params"], json!({ "times": 3 }));
    send(
        &mut socket,
        json!({ "type": "command_result", "id": queued["id"], "status": "succeeded" }),
    )
    .await;
    send(
        &mut socket,
        json!({ "type": "reported", "version": 1, "state": { "rate": 10 } }),
    )
    .await;

    // Online, waited for: the answer carries the device's result.
    let waited = tokio::spawn(command(
        json!({ "name": "read", "idempotency_key": "r-1" }),
        10,
    ));
    let live = next(&mut socket).await;
    assert_eq!(live["type"], "command");
    send(&mut socket, json!({ "type": "command_result", "id": live["id"], "status": "failed", "output": { "why": "busy" } })).await;
    let waited = waited.await.unwrap();
    assert_eq!(waited.status(), 201);
    let waited: Value = waited.json().await.unwrap();
    assert_eq!(
        (waited["state"].as_str(), &waited["output"]),
        (Some("failed"), &json!({ "why": "busy" }))
    );
    // The same idempotency key: the same command, 200.
    let again = command(json!({ "name": "read", "idempotency_key": "r-1" }), 0).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], waited["id"]);
    // A result for no command of this device is refused with its reference.
    send(&mut socket, json!({ "type": "command_result", "id": "00000000-0000-0000-0000-000000000000", "status": "succeeded" })).await;
    let refused = next(&mut socket).await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (
            Some("unknown_command"),
            Some("00000000-0000-0000-0000-000000000000")
        )
    );

    let first = get_json(
        &app,
        &alice,
        &format!("/api/v1/commands/{}", queued["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(first["state"], "succeeded");
    let list = get_json(&app, &alice, &format!("/api/v1/devices/{id}/commands")).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let config = get_json(&app, &alice, &format!("/api/v1/devices/{id}/config")).await;
    assert_eq!(
        (config["version"].as_i64(), config["in_sync"].as_bool()),
        (Some(1), Some(true))
    );
}

#[tokio::test]
async fn a_deactivated_owners_device_is_closed_at_the_next_check() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
            c.ws_ping_interval = unhidra_config::HumanDuration::secs(1);
        },
        None,
    )
    .await;
    let (alice_id, alice) = user(&app, "alice@example.com").await;
    let (_, key) = register(&app, &alice, "d").await;
    let mut socket = connect_device(&app, &key).await;
    hello(&mut socket).await;
    let admin = crate::helpers::access_token(&app, "root@example.com").await;
    let off = app
        .client
        .patch(app.url(&format!("/api/v1/admin/users/{alice_id}")))
        .bearer_auth(&admin)
        .json(&json!({ "active": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), 200);
    assert_eq!(close_code(&mut socket).await, 4003);
    match connect_with(&app, Some(&format!("unhidra.device.v1, key.{key}")), None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("{other:?}"),
    }
}

/// Stored points of a device, over every key its latest values name.
async fn stored_points(app: &TestApp, token: &str, id: &str) -> usize {
    let latest = get_json(
        app,
        token,
        &format!("/api/v1/devices/{id}/telemetry/latest"),
    )
    .await;
    let mut total = 0;
    for point in latest.as_array().unwrap() {
        let key = point["key"].as_str().unwrap();
        let read = get_json(
            app,
            token,
            &format!("/api/v1/devices/{id}/telemetry?key={key}&limit=5000"),
        )
        .await;
        total += read["points"].as_array().unwrap().len();
    }
    total
}

#[tokio::test]
async fn simulated_devices_lose_and_double_nothing_through_drops_and_restarts() {
    use unhidra_device::simulate::{SimulateOptions, run};
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(register(&app, &alice, &format!("sim-{i}")).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    let lines: Vec<&str> = devices.iter().map(|(_, k)| k.as_str()).collect();
    std::fs::write(&keys, lines.join("\n")).unwrap();
    let mut recorded = 0;
    for encoding in [
        unhidra_device::machine::Encoding::Json,
        unhidra_device::machine::Encoding::MsgPack,
    ] {
        let mut options = SimulateOptions::new(
            format!("ws://{}/ws", app.addr),
            &keys,
            dir.path().join("buffers"),
        );
        options.duration = std::time::Duration::from_secs(3);
        options.drain = std::time::Duration::from_secs(10);
        options.reading_interval = std::time::Duration::from_millis(100);
        options.batch_linger = std::time::Duration::from_millis(200);
        options.thermal_every = 5;
        options.disconnects = 2;
        options.restarts = 1;
        options.seed = 7;
        options.encoding = encoding;
        let report = run(options).await.unwrap();
        assert!(report.errors.is_empty(), "{report}");
        assert_eq!(
            (report.unacked, report.refused, report.dropped),
            (0, 0, 0),
            "{report}"
        );
        assert!(
            report.disconnects_injected + report.restarts > 0,
            "{report}"
        );
        recorded += report.points;
    }
    // Every point recorded is stored once: the server holds exactly what the devices read.
    let mut stored = 0;
    for (id, _) in &devices {
        stored += stored_points(&app, &alice, id).await;
    }
    assert_eq!(stored as u64, recorded);
    let fleet = get_json(
        &app,
        &crate::helpers::access_token(&app, "root@example.com").await,
        "/api/v1/admin/fleet",
    )
    .await;
    assert_eq!(fleet["total"], 3);
    let batches: u64 = app
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("telemetry_points_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum();
    assert_eq!(
        batches, stored as u64,
        "points stored by the server and found by reading them"
    );
}

async fn claim(app: &TestApp, token: &str, hardware_id: &str, model: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/devices/claim"))
        .json(&json!({
            "token": token, "hardware_id": hardware_id, "model": model, "firmware": "2.0.1",
        }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_device_claims_its_key_with_a_qr_token_and_claims_again_after_a_reset() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let made = app
        .client
        .post(app.url("/api/v1/provisioning-tokens"))
        .bearer_auth(&alice)
        .json(&json!({
            "model": "esp32-s3", "tags": ["greenhouse"], "max_uses": 2, "ttl": 600,
            "provisioning": { "name": "PROV_1a2b3c", "pop": "abcd1234", "transport": "softap" },
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    assert_eq!(made.headers()["cache-control"], "no-store");
    let made: Value = made.json().await.unwrap();
    let token = made["secret"].as_str().unwrap().to_owned();
    let payload: Value = serde_json::from_str(made["qr_payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        payload,
        json!({ "ver": "v1", "name": "PROV_1a2b3c", "pop": "abcd1234", "transport": "softap",
                "token": token })
    );
    assert!(made["qr_svg"].as_str().unwrap().contains("<svg"));
    let listed = get_json(&app, &alice, "/api/v1/provisioning-tokens").await;
    assert_eq!(listed[0]["uses"], 0);
    assert!(
        !listed.to_string().contains(&token),
        "listings never show the token"
    );

    // A wrong model is refused and uses nothing; the right one gets a key that connects.
    let wrong = problem(
        claim(&app, &token, "24:6f:28:aa:bb:cc", "esp32-c3").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(wrong["errors"][0]["code"], "model_mismatch");
    let first = claim(&app, &token, "24:6f:28:aa:bb:cc", "esp32-s3").await;
    assert_eq!(first.status(), 201);
    assert_eq!(first.headers()["cache-control"], "no-store");
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["reclaimed"], false);
    assert_eq!(first["device"]["tags"], json!(["greenhouse"]));
    assert_eq!(first["device"]["firmware"], "2.0.1");
    let id = first["device"]["id"].as_str().unwrap().to_owned();
    let old_key = first["key"].as_str().unwrap().to_owned();
    let mut socket = connect_device(&app, &old_key).await;
    hello(&mut socket).await;
    let devices = get_json(&app, &alice, "/api/v1/devices").await;
    assert_eq!(devices["items"][0]["id"], id.as_str());

    // A claim of a working device's hardware id takes nothing over; after a factory reset its
    // owner revokes its keys (the connection closes with 4003) and it claims again: the same
    // device, a new key.
    problem(
        claim(&app, &token, "24:6f:28:aa:bb:cc", "esp32-s3").await,
        409,
        "device_not_reclaimable",
    )
    .await;
    let revoked = app
        .client
        .post(app.url(&format!("/api/v1/devices/{id}/revoke")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success());
    assert_eq!(close_code(&mut socket).await, 4003);
    let again = claim(&app, &token, "24:6f:28:aa:bb:cc", "esp32-s3").await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        (again["reclaimed"].as_bool(), again["device"]["id"].as_str()),
        (Some(true), Some(id.as_str()))
    );
    let mut socket = connect_device(&app, again["key"].as_str().unwrap()).await;
    hello(&mut socket).await;

    // The token is used up now; another user's token cannot take this hardware id; garbage is
    // refused with its code.
    problem(
        claim(&app, &token, "24:6f:28:aa:bb:dd", "esp32-s3").await,
        410,
        "claim_token_used",
    )
    .await;
    let (_, bob) = user(&app, "bob@example.com").await;
    let bobs: Value = app
        .client
        .post(app.url("/api/v1/provisioning-tokens"))
        .bearer_auth(&bob)
        .json(&json!({ "model": "esp32-s3" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bobs_token = bobs["secret"].as_str().unwrap();
    // Hardware ids are unique per owner: Alice's device does not keep Bob from claiming one
    // with the same id (a squatter cannot block the real owner, nor learn what exists).
    let bobs_claim = claim(&app, bobs_token, "24:6f:28:aa:bb:cc", "esp32-s3").await;
    assert_eq!(bobs_claim.status(), 201);
    let bobs_claim: Value = bobs_claim.json().await.unwrap();
    assert_eq!(bobs_claim["reclaimed"], false);
    assert_ne!(bobs_claim["device"]["id"], again["device"]["id"]);
    problem(
        claim(&app, "unh_pt_nope", "x1", "esp32-s3").await,
        401,
        "claim_token_invalid",
    )
    .await;
    let missing = app
        .client
        .post(app.url("/api/v1/devices/claim"))
        .json(&json!({ "token": bobs_token, "model": "esp32-s3" }))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 422);

    // Bob cannot revoke Alice's token; his own revoked token claims nothing.
    let alices_id = listed[0]["id"].as_str().unwrap();
    let theirs = app
        .client
        .delete(app.url(&format!("/api/v1/provisioning-tokens/{alices_id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    problem(theirs, 404, "not_found").await;
    let bobs_id = bobs["token"]["id"].as_str().unwrap();
    let revoked = app
        .client
        .delete(app.url(&format!("/api/v1/provisioning-tokens/{bobs_id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    problem(
        claim(&app, bobs_token, "b0:b0:b0", "esp32-s3").await,
        401,
        "claim_token_invalid",
    )
    .await;
    let admin = crate::helpers::access_token(&app, "root@example.com").await;
    let audit = get_json(&app, &admin, "/api/v1/admin/logs").await;
    let kinds: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject_id"] == id.as_str())
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["device.reclaimed", "device.revoked", "device.claimed"]
    );
    let audit = audit.to_string();
    assert!(
        !audit.contains(&token) && !audit.contains(&old_key),
        "no secret is logged"
    );
}

#[tokio::test]
async fn failed_keys_are_limited_per_address_and_devices_have_their_own_connection_limits() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.device_auth_failures_per_minute = 3;
            c.ws_max_connections_per_ip = 1;
        },
        None,
    )
    .await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (_, key) = register(&app, &alice, "d").await;
    // People's limit of one connection from this address leaves devices theirs.
    let (mut person, _) = connect_with(
        &app,
        Some(&format!("unhidra.v1.json, bearer.{alice}")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(next(&mut person).await["type"], "welcome");
    let device = connect_device(&app, &key).await;
    drop(device);

    // Three wrong keys are refused with 401, the fourth with 429; a good key from this
    // address still passes (a hostile neighbour behind the same NAT locks no device out).
    let wrong = format!("unhidra.device.v1, key.{}x", &key[..key.len() - 1]);
    for attempt in 0..4 {
        match connect_with(&app, Some(&wrong), None).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let want = if attempt < 3 { 401 } else { 429 };
                assert_eq!(response.status(), want, "attempt {attempt}");
            }
            other => panic!("{other:?}"),
        }
    }
    let good = app
        .client
        .post(app.url("/api/v1/device/telemetry"))
        .bearer_auth(&key)
        .json(&json!({ "seq": 1, "points": [{ "key": "t", "value": 1 }] }))
        .send()
        .await
        .unwrap();
    assert!(good.status().is_success(), "{}", good.status());
    let still_wrong = app
        .client
        .post(app.url("/api/v1/device/telemetry"))
        .bearer_auth(format!("{}x", &key[..key.len() - 1]))
        .json(&json!({ "seq": 1, "points": [{ "key": "t", "value": 1 }] }))
        .send()
        .await
        .unwrap();
    problem(still_wrong, 429, "rate_limited").await;
}

#[tokio::test]
async fn a_devices_events_and_hellos_are_stored_and_read_by_its_owner() {
    let app = app().await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (id, key) = register(&app, &alice, "d").await;
    let mut socket = connect_device(&app, &key).await;
    // A hello that breaks a rule is refused, and nothing of it is stored.
    for bad in [
        json!({ "type": "hello", "firmware": "1.4 beta" }),
        json!({ "type": "hello", "firmware": "1.4.2", "reset_reason": "x".repeat(60_000) }),
        json!({ "type": "hello", "firmware": "1.4.2", "partition": "ota 1" }),
    ] {
        send(&mut socket, bad).await;
        let refused = next(&mut socket).await;
        assert_eq!(refused["code"], "invalid_format", "{refused}");
    }
    send(
        &mut socket,
        json!({ "type": "hello", "firmware": "1.4.2+build.7", "partition": "ota_1",
                "reset_reason": "panic", "capabilities": [] }),
    )
    .await;
    // One hello a connection: a second changes nothing.
    send(
        &mut socket,
        json!({ "type": "hello", "firmware": "9.9.9", "reset_reason": "panic" }),
    )
    .await;
    let repeated = next(&mut socket).await;
    assert_eq!(repeated["code"], "hello_repeated", "{repeated}");
    send(
        &mut socket,
        json!({ "type": "event", "kind": "door", "data": { "open": true } }),
    )
    .await;
    send(&mut socket, json!({ "type": "event", "kind": "no spaces" })).await;
    let refused = next(&mut socket).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("invalid_key"))
    );
    let page = get_json(&app, &alice, &format!("/api/v1/devices/{id}/events")).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    assert_eq!(
        (items[0]["kind"].as_str(), &items[0]["data"]),
        (Some("door"), &json!({ "open": true }))
    );
    assert_eq!(items[1]["kind"], "hello");
    assert_eq!(items[1]["data"]["reset_reason"], "panic");
    assert_eq!(items[1]["data"]["partition"], "ota_1");
    assert_eq!(items[1]["data"]["firmware"], "1.4.2+build.7");
    let device = get_json(&app, &alice, &format!("/api/v1/devices/{id}")).await;
    assert_eq!(device["firmware"], "1.4.2+build.7");
    let hellos = get_json(
        &app,
        &alice,
        &format!("/api/v1/devices/{id}/events?kind=hello"),
    )
    .await;
    assert_eq!(hellos["items"].as_array().unwrap().len(), 1);
    let (_, bob) = user(&app, "bob@example.com").await;
    let hidden = app
        .client
        .get(app.url(&format!("/api/v1/devices/{id}/events")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    problem(hidden, 404, "not_found").await;
}
