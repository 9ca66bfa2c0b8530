//! Firmware deployments with simulated devices over real sockets: each takes its offer (an
//! `ota.update` command), downloads the image in 4 KiB ranges with its signed link, verifies
//! it as the device SDK does, reports its progress, "reboots" (reconnects) and says `hello`
//! with what it runs now. Staged rollouts complete, halt themselves, time out devices, reach
//! devices that were offline, and every refusal is typed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use unhidra_core::{Clock, ManualClock};
use unhidra_device::ota::{DeviceImage, ImageVerifier};
use unhidra_ota::image::build_test_image;
use unhidra_ota::manifest;
use unhidra_protocol::firmware::SignedManifest;

use crate::helpers::{TestApp, default_backend, problem, with_admin};
use crate::ws::{Socket, connect_with, next, send};

const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";

/// How a simulated device takes its update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Installs it, reboots into it, and it passes its self-test.
    Updates,
    /// Installs it; its self-test fails and it comes back on the old image.
    FailsSelfTest,
    /// Takes the offer and never answers.
    Silent,
}

struct Fleet {
    app: TestApp,
    admin: String,
    key: ed25519_dalek::SigningKey,
    clock: Arc<ManualClock>,
    _keys: tempfile::TempDir,
}

async fn fleet() -> Fleet {
    let key = manifest::generate_key();
    let (keys, trusted) = crate::firmware::trusted_keys(&key);
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let db = unhidra_store::testing::TestDb::new(default_backend()).await;
    let app = TestApp::spawn_on(
        db,
        |c| {
            with_admin(c);
            c.ota_trusted_keys = Some(trusted.clone());
            c.ota_tick_interval = unhidra_config::HumanDuration(Duration::from_millis(50));
            c.device_registrations_per_hour = 0;
            c.rate_limit_device_ip_per_minute = 0;
        },
        None,
        clock.clone() as Arc<dyn Clock>,
    )
    .await;
    let admin = app.admin_token().await;
    Fleet {
        app,
        admin,
        key,
        clock,
        _keys: keys,
    }
}

impl Fleet {
    /// Uploads an ESP32 image of `version`; answers its SHA-256.
    async fn upload(&self, version: &str, secure_version: u32) -> String {
        let image = build_test_image(0x0009, version, "greenhouse", secure_version, true);
        let header = crate::firmware::signed_header(&image, version, secure_version, &self.key);
        let stored = self
            .app
            .client
            .post(self.app.url("/api/v1/firmware"))
            .bearer_auth(&self.admin)
            .header("unhidra-manifest", header)
            .body(image)
            .send()
            .await
            .unwrap();
        assert_eq!(stored.status(), 201);
        stored.json::<Value>().await.unwrap()["sha256"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Registers a device tagged `tag`; answers its id and key.
    async fn register(&self, name: &str, tag: &str) -> (String, String) {
        let made: Value = self
            .app
            .client
            .post(self.app.url("/api/v1/devices"))
            .bearer_auth(&self.admin)
            .json(&json!({ "name": name, "model": "esp32-s3", "tags": [tag] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            made["device"]["id"].as_str().unwrap().to_owned(),
            made["key"].as_str().unwrap().to_owned(),
        )
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.app
            .client
            .post(self.app.url(path))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .app
            .client
            .get(self.app.url(path))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    /// Waits until the deployment satisfies `done`; answers it.
    async fn until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let d = self.get(&format!("/api/v1/deployments/{id}")).await;
            if done(&d) {
                return d;
            }
            assert!(tokio::time::Instant::now() < deadline, "{d:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connects a device and says `hello`.
    async fn connect(&self, key: &str, hello: Value) -> Socket {
        let (mut socket, _) = connect_with(
            &self.app,
            Some(&format!("unhidra.device.v1, key.{key}")),
            None,
        )
        .await
        .unwrap();
        assert_eq!(next(&mut socket).await["type"], "welcome");
        send(&mut socket, hello).await;
        socket
    }

    /// Waits until `total` devices run `firmware`.
    async fn running(&self, firmware: &str, total: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self
            .get(&format!("/api/v1/devices?firmware={firmware}"))
            .await["total"]
            .as_u64()
            != Some(total)
        {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A simulated device: connected, it waits for its offer and takes it as `behaviour` says;
    /// after its "reboot" it answers the offer's command and stays connected.
    fn spawn_device(
        &self,
        key: String,
        behaviour: impl Fn() -> Behaviour + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let app_url = self.app.url("");
        let client = self.app.client.clone();
        let trusted = [self.key.verifying_key().to_bytes()];
        let addr = self.app.addr;
        // A device waits for its offer as long as it takes (the test bounds the whole).
        async fn offer_of(socket: &mut Socket) -> Value {
            use futures_util::StreamExt;
            use tokio_tungstenite::tungstenite::Message;
            loop {
                let Some(Ok(message)) = socket.next().await else {
                    std::future::pending::<()>().await;
                    unreachable!();
                };
                let Message::Text(text) = message else {
                    continue;
                };
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "command" && frame["name"] == "ota.update" {
                    return frame;
                }
            }
        }
        let ws = format!("ws://{addr}/ws");
        tokio::spawn(async move {
            let connect = |firmware: &'static str, partition: &'static str| {
                let key = key.clone();
                let ws = ws.clone();
                async move {
                    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
                    let mut request = ws.into_client_request().unwrap();
                    request.headers_mut().insert(
                        "sec-websocket-protocol",
                        format!("unhidra.device.v1, key.{key}").parse().unwrap(),
                    );
                    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
                    assert_eq!(next(&mut socket).await["type"], "welcome");
                    send(
                        &mut socket,
                        json!({ "type": "hello", "firmware": firmware, "partition": partition,
                                "secure_version": 1 }),
                    )
                    .await;
                    socket
                }
            };
            let mut socket = connect(OLD, "ota_0").await;
            let offer = offer_of(&mut socket).await;
            let behaviour = behaviour();
            if behaviour == Behaviour::Silent {
                std::future::pending::<()>().await;
            }
            let params = &offer["params"];
            let deployment = params["deployment"].as_str().unwrap().to_owned();
            let signed: SignedManifest =
                serde_json::from_value(params["manifest"].clone()).unwrap();
            let me = DeviceImage {
                project: "greenhouse".into(),
                target: "esp32s3".into(),
                secure_version: 1,
            };
            let mut verifier = ImageVerifier::new(&signed, &trusted, &me).unwrap();
            let url = format!(
                "{}{}",
                app_url.trim_end_matches('/'),
                params["url"].as_str().unwrap()
            );
            let size = params["size"].as_u64().unwrap();
            let status = |state: &str, progress: Option<u64>, reason: Option<&str>| {
                let mut frame =
                    json!({ "type": "ota_status", "deployment": deployment, "state": state });
                if let Some(p) = progress {
                    frame["progress"] = json!(p);
                }
                if let Some(r) = reason {
                    frame["reason"] = json!(r);
                }
                frame
            };
            // partial_http_download's way: 4 KiB ranges, with the link and no header.
            while verifier.received() < size {
                let start = verifier.received();
                let end = (start + 4096).min(size) - 1;
                let part = client
                    .get(&url)
                    .header("range", format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(part.status(), 206);
                verifier.update(&part.bytes().await.unwrap()).unwrap();
                let progress = verifier.received() * 100 / size;
                send(&mut socket, status("downloading", Some(progress), None)).await;
            }
            for state in ["downloaded", "verifying"] {
                send(&mut socket, status(state, None, None)).await;
            }
            verifier.finish().unwrap();
            for state in ["installing", "rebooting"] {
                send(&mut socket, status(state, None, None)).await;
            }
            drop(socket);
            // The reboot: the new image confirms itself, or its self-test fails and the
            // bootloader goes back to the old one.
            let (firmware, partition) = match behaviour {
                Behaviour::Updates => (NEW, "ota_1"),
                _ => (OLD, "ota_0"),
            };
            let mut socket = connect(firmware, partition).await;
            if behaviour == Behaviour::FailsSelfTest {
                send(&mut socket, status("rolled_back", None, Some("self_test"))).await;
            }
            let again = offer_of(&mut socket).await;
            let outcome = if behaviour == Behaviour::Updates {
                "succeeded"
            } else {
                "failed"
            };
            send(
                &mut socket,
                json!({ "type": "command_result", "id": again["id"], "status": outcome }),
            )
            .await;
            std::future::pending::<()>().await;
        })
    }
}

fn state_count(d: &Value, state: &str) -> u64 {
    d["states"][state].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_staged_rollout_to_twenty_devices_completes_stage_by_stage() {
    let f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    let mut devices = Vec::new();
    for i in 0..20 {
        let (_, key) = f.register(&format!("field-{i}"), "field").await;
        devices.push(f.spawn_device(key, || Behaviour::Updates));
    }
    // Every device has said hello before the deployment resolves its cohort.
    f.running(OLD, 20).await;
    let made = f
        .post(
            "/api/v1/deployments",
            &json!({
                "firmware": sha, "target": { "tags": ["field"] },
                "stages": [{ "percent": 10 }, { "percent": 50 }, { "percent": 100, "success_share": 1.0 }],
            }),
        )
        .await;
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    assert_eq!(made["state"], "running");
    let sizes: Vec<u64> = made["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [2, 8, 10]);
    let id = made["id"].as_str().unwrap().to_owned();
    let done = f.until(&id, |d| d["state"] == "completed").await;
    assert_eq!(state_count(&done, "confirmed"), 20, "{done:#}");
    assert_eq!(done["stage"], 2);
    let rows = f.get(&format!("/api/v1/deployments/{id}/devices")).await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 20);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "confirmed" && r["from_version"] == OLD)
    );
    let metrics = f.app.get("/metrics").await.text().await.unwrap();
    for line in [
        "ota_offers_total 20",
        r#"ota_updates_total{value="confirmed"} 20"#,
        r#"ota_deployments_total{value="completed"} 1"#,
        "ota_uploads_total 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in {metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"ota_downloads_total{value="range"}"#)),
        "{metrics}"
    );
    // Every device runs the new version now, and a second deployment of it finds no one.
    assert_eq!(
        f.get("/api/v1/devices?firmware=2.0.0").await["total"].as_u64(),
        Some(20)
    );
    let again = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["field"] } }),
        )
        .await;
    let again = problem(again, 422, "validation_failed").await;
    assert_eq!(again["errors"][0]["code"], "empty_cohort");
    for d in devices {
        d.abort();
    }
}

#[tokio::test]
async fn a_rollout_whose_installs_fail_their_self_test_halts_at_the_first_stage() {
    let f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    // Three of every ten offers fail their self-test: three of the first stage's ten.
    let offers = Arc::new(AtomicUsize::new(0));
    let mut devices = Vec::new();
    for i in 0..20 {
        let (_, key) = f.register(&format!("field-{i}"), "field").await;
        let offers = Arc::clone(&offers);
        devices.push(f.spawn_device(key, move || {
            if matches!(offers.fetch_add(1, Ordering::SeqCst) % 10, 0 | 3 | 6) {
                Behaviour::FailsSelfTest
            } else {
                Behaviour::Updates
            }
        }));
    }
    f.running(OLD, 20).await;
    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({
                "firmware": sha, "target": { "tags": ["field"] },
                "stages": [{ "percent": 50 }, { "percent": 100 }],
                "error_threshold": { "max_failure_share": 0.25, "min_executed": 4 },
            }),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    let halted = f.until(&id, |d| d["state"] == "halted").await;
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .starts_with("error_threshold"),
        "{halted:#}"
    );
    assert_eq!(halted["stage"], 0, "the second stage never began");
    // Its devices, never offered the image, are cancelled.
    f.until(&id, |d| {
        d["stages"][1]["states"]["cancelled"].as_u64() == Some(10)
    })
    .await;
    // The first stage's devices that had their offer carry on to their end — the failed ones
    // say so — and nothing stays in progress; those the halt reached before their offer are
    // cancelled, never offered.
    let first = |d: &Value, state: &str| d["stages"][0]["states"][state].as_u64().unwrap_or(0);
    let done = f
        .until(&id, |d| {
            first(d, "rolled_back") + first(d, "confirmed") + first(d, "cancelled") == 10
        })
        .await;
    assert!(first(&done, "rolled_back") >= 1, "{done:#}");
    let rows = f.get(&format!("/api/v1/deployments/{id}/devices")).await;
    for row in rows.as_array().unwrap() {
        match row["state"].as_str().unwrap() {
            "rolled_back" => assert!(
                row["reason"] == "self_test" || row["reason"] == "old_version_running",
                "{row}"
            ),
            "cancelled" => assert!(row["offered_at"].is_null(), "{row}"),
            "confirmed" => assert_eq!(row["stage"], 0),
            other => panic!("{other}: {row}"),
        }
    }
    // Nothing is offered after a halt, and a halted deployment does not resume.
    problem(
        f.post(&format!("/api/v1/deployments/{id}/resume"), &json!({}))
            .await,
        409,
        "deployment_state",
    )
    .await;
    for d in devices {
        d.abort();
    }
}

#[tokio::test]
async fn silent_devices_time_out_offline_ones_get_the_offer_on_connect_and_refusals_are_typed() {
    let f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    let (_, silent_key) = f.register("silent", "lab").await;
    let (offline, offline_key) = f.register("offline", "lab").await;
    let (protected, protected_key) = f.register("protected", "lab").await;
    let silent = f.spawn_device(silent_key.clone(), || Behaviour::Silent);
    // This one reports an anti-rollback version above the image's: never offered it.
    let protected_hello = json!({ "type": "hello", "firmware": OLD, "secure_version": 5 });
    let mut stranger = f.connect(&protected_key, protected_hello).await;
    f.running(OLD, 2).await;

    // Bad requests: each typed, nothing made.
    for (body, field, code) in [
        (
            json!({ "firmware": sha, "target": { "tags": ["lab"], "model": "esp32-s3" } }),
            "/target",
            "invalid_target",
        ),
        (
            json!({ "firmware": "0".repeat(64), "target": { "tags": ["lab"] } }),
            "/firmware",
            "not_found",
        ),
        (
            json!({ "firmware": sha, "target": { "tags": ["lab"] }, "stages": [{ "percent": 60 }, { "percent": 30 }] }),
            "/stages",
            "invalid_stage",
        ),
        (
            json!({ "firmware": sha, "target": { "tags": ["lab"] }, "device_timeout": 5 }),
            "/device_timeout",
            "out_of_range",
        ),
        (
            json!({ "firmware": sha, "target": { "devices": [uuid::Uuid::new_v4()] } }),
            "/target/devices",
            "not_found",
        ),
        (
            json!({ "firmware": sha, "target": { "tags": ["nobody"] } }),
            "/target",
            "empty_cohort",
        ),
        (
            json!({ "firmware": sha, "target": { "tags": ["lab"] },
                    "error_threshold": { "max_failures": 0 } }),
            "/error_threshold",
            "out_of_range",
        ),
    ] {
        let refused = problem(
            f.post("/api/v1/deployments", &body).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(
            (
                refused["errors"][0]["field"].as_str(),
                refused["errors"][0]["code"].as_str()
            ),
            (Some(field), Some(code)),
            "{body}"
        );
    }
    assert_eq!(f.get("/api/v1/deployments").await, json!([]));

    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["lab"] }, "device_timeout": 600 }),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["policy"]["skipped"]["downgrade"], 1, "{made:#}");
    assert_eq!(made["stages"][0]["size"], 2);

    // A report on a deployment the device has no update in is refused.
    send(
        &mut stranger,
        json!({ "type": "ota_status", "deployment": id, "state": "downloading", "progress": 5 }),
    )
    .await;
    assert_eq!(next(&mut stranger).await["code"], "ota_not_offered");

    // The offline device connects later and gets its offer then.
    let late = f.spawn_device(offline_key, || Behaviour::Updates);
    let confirmed = f.until(&id, |d| state_count(d, "confirmed") == 1).await;
    assert_eq!(
        confirmed["state"], "running",
        "the silent device holds it open"
    );
    let rows = f
        .get(&format!("/api/v1/deployments/{id}/devices?state=confirmed"))
        .await;
    assert_eq!(rows[0]["device"], offline.as_str());

    // The silent one never answers: past its deadline it fails with `timeout`, and the
    // deployment, every device final, halts (its one stage cannot reach its share).
    f.clock.advance(chrono::Duration::seconds(601));
    f.until(&id, |d| state_count(d, "failed") == 1).await;
    let failed = f
        .get(&format!("/api/v1/deployments/{id}/devices?state=failed"))
        .await;
    assert_eq!(failed[0]["reason"], "timeout");
    let ended = f.until(&id, |d| d["state"] == "halted").await;
    assert!(
        ended["reason"].as_str().unwrap().starts_with("stage 1"),
        "{ended:#}"
    );

    // A deployment for the protected device alone finds no one to offer the image to — even
    // after a hello that leaves its anti-rollback version out (it only rises).
    drop(stranger);
    let mut quiet = f
        .connect(&protected_key, json!({ "type": "hello", "firmware": OLD }))
        .await;
    // Frames are handled in order: the pong comes after the hello is recorded.
    send(&mut quiet, json!({ "type": "ping" })).await;
    while next(&mut quiet).await["type"] != "pong" {}
    let downgrade = problem(
        f.post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "devices": [protected] } }),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(downgrade["errors"][0]["code"], "empty_cohort");
    drop(quiet);
    // An owner cannot take an offer's idempotency key for a command of theirs.
    let reserved = problem(
        f.post(
            &format!("/api/v1/devices/{protected}/commands"),
            &json!({ "name": "noop", "idempotency_key": format!("unhidra:ota:{id}") }),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(reserved["errors"][0]["code"], "reserved");
    // Pause, resume and cancel move a deployment only from the states they apply to; a
    // rollback is a deployment of an older image with an allowed `secure_version`.
    let old = f.upload("0.9.0", 1).await;
    let scheduled: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": old, "target": { "devices": [offline] },
                     "start_at": f.clock.now() + chrono::Duration::hours(1) }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(scheduled["state"], "scheduled", "{scheduled:#}");
    let sid = scheduled["id"].as_str().unwrap();
    let paused: Value = f
        .post(&format!("/api/v1/deployments/{sid}/pause"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(paused["state"], "paused");
    let resumed: Value = f
        .post(&format!("/api/v1/deployments/{sid}/resume"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resumed["state"], "running");
    let cancelled: Value = f
        .post(&format!("/api/v1/deployments/{sid}/cancel"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    // The device had its offer already (it is connected): it may be mid-way, and is still
    // followed; one that had not would be cancelled with its offer withdrawn.
    assert_eq!(
        state_count(&cancelled, "offered") + state_count(&cancelled, "cancelled"),
        1,
        "{cancelled:#}"
    );
    problem(
        f.post(&format!("/api/v1/deployments/{sid}/pause"), &json!({}))
            .await,
        409,
        "deployment_state",
    )
    .await;
    problem(
        f.app
            .get(&format!("/api/v1/deployments/{}", uuid::Uuid::new_v4()))
            .await,
        401,
        "unauthenticated",
    )
    .await;
    silent.abort();
    late.abort();
}
