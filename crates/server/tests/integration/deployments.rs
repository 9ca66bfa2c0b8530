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
use unhidra_ota::image::{build_test_image, build_test_image_of};
use unhidra_ota::manifest;

use crate::helpers::{TestApp, default_backend, problem, user, with_admin};
use crate::ws::{Socket, connect, connect_with, next, send};

pub(crate) const OLD: &str = "1.0.0";
pub(crate) const NEW: &str = "2.0.0";

/// How a simulated device takes its update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Installs it, reboots into it, and it passes its self-test.
    Updates,
    /// Installs it; its self-test fails and it comes back on the old image.
    FailsSelfTest,
    /// Takes the offer and never answers.
    Silent,
    /// Its new image resets before its self-test ends, and the next boot rolls it back.
    BootLoops,
    /// Loses power half-way through the download, boots again and resumes it.
    LosesPower,
}

pub(crate) struct Fleet {
    pub(crate) app: TestApp,
    pub(crate) admin: String,
    key: ed25519_dalek::SigningKey,
    pub(crate) clock: Arc<ManualClock>,
    _keys: tempfile::TempDir,
}

pub(crate) async fn fleet() -> Fleet {
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
    pub(crate) async fn upload(&self, version: &str, secure_version: u32) -> String {
        let image = build_test_image(0x0009, version, "greenhouse", secure_version, true);
        self.upload_image(image, version, secure_version).await
    }

    /// Uploads `image`; answers its SHA-256.
    async fn upload_image(&self, image: Vec<u8>, version: &str, secure_version: u32) -> String {
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
    pub(crate) async fn register(&self, name: &str, tag: &str) -> (String, String) {
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

    /// Signs the admin in again (after the clock passed the access token's expiry).
    pub(crate) async fn sign_in_again(&mut self) {
        self.admin = self.app.admin_token().await;
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.app
            .client
            .post(self.app.url(path))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, path: &str) -> Value {
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
    pub(crate) async fn until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
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
    pub(crate) async fn connect(&self, key: &str, hello: Value) -> Socket {
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
    pub(crate) async fn running(&self, firmware: &str, total: u64) {
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

    /// A simulated device on the device SDK: A/B slots in a folder of its own, the SDK's
    /// session over a real socket and its update client. It takes its offer as `behaviour`
    /// says (asked when the offer comes), reboots into the image, runs its self-test, and
    /// answers the offer when it comes again.
    pub(crate) fn spawn_device(
        &self,
        key: String,
        behaviour: impl Fn() -> Behaviour + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_sdk_device(key, SimDevice::default(), behaviour)
    }

    fn spawn_sdk_device(
        &self,
        key: String,
        sim: SimDevice,
        behaviour: impl Fn() -> Behaviour + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        use unhidra_device::machine::{Handlers, Hello, MemoryStorage, Session, SessionConfig};
        use unhidra_device::slots::{SelfTest, Slots};
        use unhidra_device::update::{OFFER_COMMAND, Taken, UpdateOptions, Updater, origin_of};
        use unhidra_device::ws::{Device, WsOptions};

        let url = format!("ws://{}/ws", self.app.addr);
        let clock = Arc::clone(&self.clock);
        let trusted = vec![
            sim.trusts
                .unwrap_or_else(|| self.key.verifying_key().to_bytes()),
        ];
        tokio::spawn(async move {
            let dir = tempfile::tempdir().unwrap();
            // Asked once, when the first offer comes; read by the boots and the power cut.
            let chosen = std::sync::Mutex::new(None::<Behaviour>);
            let power_lost = std::sync::atomic::AtomicBool::new(false);
            let chosen_now = || *chosen.lock().unwrap();
            loop {
                let started =
                    Slots::start(dir.path(), OLD, sim.secure_version, |_| {
                        match chosen_now() {
                            Some(Behaviour::FailsSelfTest) => SelfTest::Failed,
                            Some(Behaviour::BootLoops) => SelfTest::Reset,
                            _ => SelfTest::Passed,
                        }
                    })
                    .unwrap();
                let hello = Hello {
                    firmware: started.boot.version.clone(),
                    partition: Some(started.boot.running.name().into()),
                    reset_reason: Some("software".into()),
                    capabilities: vec!["ota".into()],
                    secure_version: sim
                        .reports_secure_version
                        .then(|| started.slots.secure_version()),
                };
                let config = SessionConfig {
                    hello,
                    ..SessionConfig::default()
                };
                let session = Session::new(
                    config,
                    MemoryStorage::default(),
                    <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7),
                )
                .unwrap();
                let mut device = Device::new(
                    session,
                    Handlers::new(),
                    WsOptions::new(url.clone(), key.clone()),
                );
                let handle = device.handle();
                let mut offers = device.defer(OFFER_COMMAND);
                let mut options =
                    UpdateOptions::new(origin_of(&url), trusted.clone(), "greenhouse", sim.target);
                options.range_size = sim.range_size;
                options.clock = unhidra_device::update::WallClock::new({
                    let clock = clock.clone();
                    move || clock.now().timestamp_millis()
                });
                let mut updater = Updater::new(started.slots, started.rolled_back, options);
                let mut progress = updater.progress();
                let updates = async {
                    loop {
                        let Some(offer) = offers.recv().await else {
                            std::future::pending::<()>().await;
                            return;
                        };
                        let how = *chosen.lock().unwrap().get_or_insert_with(&behaviour);
                        if how == Behaviour::Silent {
                            std::future::pending::<()>().await;
                        }
                        if updater.take(&offer, &handle).await == Taken::Reboot {
                            handle.shutdown().await.unwrap();
                            return;
                        }
                    }
                };
                let power_loss = async {
                    let _ = progress
                        .wait_for(|p| {
                            chosen_now() == Some(Behaviour::LosesPower)
                                && !power_lost.load(Ordering::SeqCst)
                                && p.size > 0
                                && p.received * 2 >= p.size
                        })
                        .await;
                };
                let run = device.run(std::future::pending());
                tokio::pin!(run, updates, power_loss);
                let mut installed = false;
                loop {
                    tokio::select! {
                        // The power cut first: it wins over the next chunk of the download.
                        biased;
                        () = &mut power_loss, if !installed => {
                            // Off mid-download: no close frame, no shutdown.
                            power_lost.store(true, Ordering::SeqCst);
                            break;
                        }
                        stopped = &mut run => {
                            stopped.unwrap();
                            assert!(installed, "the device stopped without an update");
                            break;
                        }
                        () = &mut updates, if !installed => installed = true,
                    }
                }
            }
        })
    }
}

/// What a simulated device is, besides how it takes its update.
#[derive(Clone, Copy)]
struct SimDevice {
    /// Its chip.
    target: &'static str,
    /// Its factory image's (and eFuses') anti-rollback version.
    secure_version: u32,
    /// Whether its `hello` says its anti-rollback version.
    reports_secure_version: bool,
    /// The one public key its firmware trusts (default: the fleet's).
    trusts: Option<[u8; 32]>,
    /// Download ranges, or whole.
    range_size: Option<u64>,
}

impl Default for SimDevice {
    fn default() -> Self {
        Self {
            target: "esp32s3",
            secure_version: 1,
            reports_secure_version: true,
            trusts: None,
            range_size: Some(4096),
        }
    }
}

pub(crate) fn state_count(d: &Value, state: &str) -> u64 {
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
    // The device had its offer already (it is connected): it may be mid-way or done, and is
    // still followed; one that had not would be cancelled with its offer withdrawn.
    let rows = f.get(&format!("/api/v1/deployments/{sid}/devices")).await;
    let row = &rows[0];
    assert_eq!(
        row["state"] == "cancelled",
        row["offered_at"].is_null(),
        "{cancelled:#} {row}"
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

#[tokio::test]
async fn devices_resume_a_cut_download_roll_back_a_boot_loop_and_refuse_what_they_must() {
    let f = fleet().await;
    // 256 KiB: a download that takes many chunks, so that a power cut lands in its middle.
    let image = build_test_image_of(0x0009, NEW, "greenhouse", 1, true, 256 * 1024);
    let sha = f.upload_image(image, NEW, 1).await;
    let stranger = manifest::generate_key().verifying_key().to_bytes();
    let whole = SimDevice {
        range_size: None,
        ..SimDevice::default()
    };
    let cases = [
        ("power-cut", whole, Behaviour::LosesPower),
        ("boot-loop", SimDevice::default(), Behaviour::BootLoops),
        (
            "other-key",
            SimDevice {
                trusts: Some(stranger),
                ..SimDevice::default()
            },
            Behaviour::Updates,
        ),
        (
            "other-chip",
            SimDevice {
                target: "esp32c3",
                ..SimDevice::default()
            },
            Behaviour::Updates,
        ),
        // Its eFuses are at 3 and its hello does not say so: the server cannot know, the
        // device refuses.
        (
            "fused",
            SimDevice {
                secure_version: 3,
                reports_secure_version: false,
                ..SimDevice::default()
            },
            Behaviour::Updates,
        ),
    ];
    let mut ids = std::collections::BTreeMap::new();
    let mut tasks = Vec::new();
    for (name, sim, behaviour) in cases {
        let (id, key) = f.register(name, "bench").await;
        ids.insert(id, name);
        tasks.push(f.spawn_sdk_device(key, sim, move || behaviour));
    }
    f.running(OLD, 5).await;
    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["bench"] } }),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["stages"][0]["size"], 5, "{made:#}");
    // Four of five cannot succeed: the one stage halts once every device has ended.
    let ended = f.until(&id, |d| d["state"] == "halted").await;
    assert_eq!(state_count(&ended, "confirmed"), 1, "{ended:#}");
    let rows = f.get(&format!("/api/v1/deployments/{id}/devices")).await;
    let mut outcomes: Vec<(&str, &str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                ids[r["device"].as_str().unwrap()],
                r["state"].as_str().unwrap(),
                r["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes[0], ("boot-loop", "rolled_back", outcomes[0].2));
    assert_eq!(
        outcomes[1..],
        [
            ("fused", "failed", "downgrade"),
            ("other-chip", "failed", "wrong_target"),
            ("other-key", "failed", "unknown_key"),
            ("power-cut", "confirmed", ""),
        ]
    );
    // The cut download was one whole request, then the rest as a range: the image's bytes
    // were sent once and a part, never twice.
    let metrics = f.app.get("/metrics").await.text().await.unwrap();
    let figure = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        figure(r#"ota_downloads_total{value="whole"}"#),
        1,
        "{metrics}"
    );
    assert!(
        figure(r#"ota_downloads_total{value="range"}"#) >= 2,
        "{metrics}"
    );
    assert_eq!(
        f.get("/api/v1/devices?firmware=2.0.0").await["total"].as_u64(),
        Some(1)
    );
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn the_fleet_simulator_takes_a_rollout_with_failed_self_tests_boot_loops_and_power_cuts() {
    use unhidra_device::simulate::{SimulateOptions, SimulateOta, run};
    let f = fleet().await;
    let sha = f
        .upload_image(
            build_test_image_of(0x0009, NEW, "greenhouse", 1, true, 64 * 1024),
            NEW,
            1,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    for i in 0..10 {
        keys.push(f.register(&format!("sim-{i}"), "sim").await.1);
    }
    let key_file = dir.path().join("keys.txt");
    std::fs::write(&key_file, keys.join("\n")).unwrap();
    // The cohort is the tag's devices, whether they have connected yet or not.
    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["sim"] } }),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["stages"][0]["size"], 10, "{made:#}");
    let mut options = SimulateOptions::new(
        format!("ws://{}/ws", f.app.addr),
        &key_file,
        dir.path().join("devices"),
    );
    options.duration = Duration::from_secs(4);
    options.drain = Duration::from_secs(4);
    options.reading_interval = Duration::from_millis(500);
    options.disconnects = 0;
    options.restarts = 0;
    options.seed = 11;
    let mut ota = SimulateOta::new(
        vec![f.key.verifying_key().to_bytes()],
        "greenhouse",
        "esp32s3",
    );
    ota.factory_version = OLD.into();
    ota.factory_secure_version = 1;
    ota.fail_self_test = 0.3;
    ota.boot_loop = 0.2;
    ota.power_loss = 0.5;
    options.ota = Some(ota);
    let report = run(options).await.unwrap();
    assert!(report.errors.is_empty(), "{report}");
    // Every device installed the image once; those whose new image failed (its self-test, or
    // a boot loop) went back to the old one, and the server saw it.
    assert_eq!(report.updates_installed, 10, "{report}");
    assert!(report.rollbacks > 0 && report.power_losses > 0, "{report}");
    let ended = f
        .until(&id, |d| {
            state_count(d, "confirmed") + state_count(d, "rolled_back") == 10
        })
        .await;
    assert_eq!(
        state_count(&ended, "rolled_back"),
        report.rollbacks,
        "{ended:#} {report}"
    );
}

/// What an operator watching `deployments` and `deployment:<id>` was told.
#[derive(Default)]
struct Told {
    /// Each device's states, as told.
    devices: std::collections::BTreeMap<String, Vec<String>>,
    /// The deployment's states on `deployment:<id>`.
    states: Vec<String>,
    /// The deployment's states on `deployments`.
    listed: Vec<String>,
}

impl Told {
    /// Reads the next update about deployment `id` (fleet updates are skipped); answers it.
    async fn next(&mut self, operator: &mut Socket, id: &str) -> Value {
        let topic = format!("deployment:{id}");
        loop {
            let frame = next(operator).await;
            if frame["type"] != "update" || frame["topic"] == "fleet" {
                continue;
            }
            let seen = frame["data"].clone();
            assert_eq!(seen["deployment"], id, "{frame}");
            let state = seen["state"].as_str().unwrap().to_owned();
            match (frame["topic"].as_str(), seen["event"].as_str()) {
                (Some("deployments"), Some("deployment")) => self.listed.push(state),
                (Some(t), Some("deployment")) if t == topic => self.states.push(state),
                (Some(t), Some("device")) if t == topic => self
                    .devices
                    .entry(seen["device"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(state),
                _ => panic!("{frame}"),
            }
            return seen;
        }
    }
}

/// The next `update` of `topic` on a watcher's socket (other frames are skipped).
async fn update_of(socket: &mut Socket, topic: &str) -> Value {
    loop {
        let frame = next(socket).await;
        if frame["type"] == "update" && frame["topic"] == topic {
            return frame["data"].clone();
        }
    }
}

/// Sends a `watch` and answers the reply (`watching` or an error).
async fn watch(socket: &mut Socket, topic: &str) -> Value {
    send(socket, json!({ "type": "watch", "topic": topic })).await;
    loop {
        let frame = next(socket).await;
        if frame["type"] == "watching" || frame["type"] == "error" {
            return frame;
        }
    }
}

#[tokio::test]
async fn operators_follow_a_rollout_and_owners_their_devices_live_over_websocket() {
    let f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    let (_, alice) = user(&f.app, "alice@example.com").await;
    let (_, bob) = user(&f.app, "bob@example.com").await;
    let mut operator = connect(&f.app, &f.admin).await;
    let mut alice_ws = connect(&f.app, &alice).await;
    let mut bob_ws = connect(&f.app, &bob).await;

    // Refusals are typed, and name the topic.
    let unknown = uuid::Uuid::new_v4();
    for (admin, topic, code) in [
        (false, "deployments".to_owned(), "forbidden"),
        (false, format!("deployment:{unknown}"), "forbidden"),
        (false, "rooms".to_owned(), "invalid_topic"),
        (
            false,
            format!("deployment:{}", unknown.simple()),
            "invalid_topic",
        ),
        (true, format!("deployment:{unknown}"), "not_found"),
    ] {
        let socket = if admin { &mut operator } else { &mut bob_ws };
        let refused = watch(socket, &topic).await;
        assert_eq!(refused["type"], "error", "{topic}: {refused}");
        assert_eq!(refused["code"], code, "{topic}: {refused}");
        assert_eq!(refused["ref"], topic.as_str());
    }
    for socket in [&mut operator, &mut alice_ws, &mut bob_ws] {
        assert_eq!(
            watch(socket, "fleet").await,
            json!({ "type": "watching", "topic": "fleet", "active": true })
        );
    }

    // Owners hear of their own devices only; admins of every one.
    let mut own = Vec::new();
    for token in [&alice, &bob] {
        let made: Value = f
            .app
            .client
            .post(f.app.url("/api/v1/devices"))
            .bearer_auth(token)
            .json(&json!({ "name": "desk", "model": "esp32-c3" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        own.push((
            made["device"]["id"].as_str().unwrap().to_owned(),
            made["key"].as_str().unwrap().to_owned(),
        ));
    }
    let hello = json!({ "type": "hello", "firmware": "0.1.0" });
    let _alice_device = f.connect(&own[0].1, hello.clone()).await;
    let seen = update_of(&mut alice_ws, "fleet").await;
    assert_eq!(
        (&seen["event"], &seen["device"], &seen["status"]),
        (&json!("status"), &json!(own[0].0), &json!("online")),
        "{seen}"
    );
    let _bob_device = f.connect(&own[1].1, hello).await;
    // Bob's first fleet update is his own device: Alice's came earlier on the same feed.
    let seen = update_of(&mut bob_ws, "fleet").await;
    assert_eq!(seen["device"], own[1].0.as_str(), "{seen}");
    let mut admin_saw = Vec::new();
    while admin_saw.len() < 2 {
        let seen = update_of(&mut operator, "fleet").await;
        if seen["event"] == "status" {
            admin_saw.push(seen["device"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(admin_saw, [own[0].0.clone(), own[1].0.clone()]);
    // Unwatched, the feed stops (the reply comes after anything already queued).
    send(
        &mut alice_ws,
        json!({ "type": "unwatch", "topic": "fleet" }),
    )
    .await;
    loop {
        let frame = next(&mut alice_ws).await;
        if frame["type"] == "watching" {
            assert_eq!(frame["active"], false);
            break;
        }
    }

    // An operator follows a rollout from its start to its end.
    assert_eq!(
        watch(&mut operator, "deployments").await["type"],
        "watching"
    );
    // Its devices have said hello once and are offline: their offers wait for them. Two
    // run the SDK; the third is driven frame by frame here.
    let mut keys = Vec::new();
    for i in 0..3 {
        let (device, key) = f.register(&format!("live-{i}"), "live").await;
        let hello = json!({ "type": "hello", "firmware": OLD, "secure_version": 1 });
        drop(f.connect(&key, hello).await);
        keys.push((device, key));
    }
    f.running(OLD, 3).await;
    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["live"] } }),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    let created = update_of(&mut operator, "deployments").await;
    assert_eq!(
        (&created["event"], &created["deployment"], &created["state"]),
        (&json!("deployment"), &json!(id), &json!("running")),
        "{created}"
    );
    let topic = format!("deployment:{id}");
    assert_eq!(watch(&mut operator, &topic).await["active"], true);
    let (manual, manual_key) = keys.pop().unwrap();
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|(_, key)| f.spawn_device(key, || Behaviour::Updates))
        .collect();

    let mut told = Told::default();

    // The third device takes its offer and reports each step; each is told as it is stored.
    let hello = json!({ "type": "hello", "firmware": OLD, "secure_version": 1 });
    let mut socket = f.connect(&manual_key, hello).await;
    loop {
        let frame = next(&mut socket).await;
        if frame["type"] == "command" && frame["name"] == "ota.update" {
            break;
        }
    }
    for (state, progress) in [
        ("downloading", Some(40)),
        ("downloaded", None),
        ("verifying", None),
        ("installing", None),
        ("rebooting", None),
    ] {
        let mut report = json!({ "type": "ota_status", "deployment": id, "state": state });
        if let Some(p) = progress {
            report["progress"] = json!(p);
        }
        send(&mut socket, report).await;
        let seen = loop {
            let seen = told.next(&mut operator, &id).await;
            if seen["device"] == manual.as_str() && seen["state"] == state {
                break seen;
            }
        };
        assert_eq!(seen["progress"], progress.map_or(Value::Null, |p| json!(p)));
    }
    drop(socket);
    let hello = json!({ "type": "hello", "firmware": NEW, "secure_version": 1 });
    let _manual = f.connect(&manual_key, hello).await;

    // Moves of different devices are told in the order their tasks finish: the last
    // device's `confirmed` may come just after the deployment's `completed`.
    let finished = |told: &Told| {
        told.devices.len() == 3
            && told
                .devices
                .values()
                .all(|s| s.last().is_some_and(|s| s == "confirmed"))
            && told.listed.last().is_some_and(|s| s == "completed")
            && told.states.last().is_some_and(|s| s == "completed")
    };
    while !finished(&told) {
        told.next(&mut operator, &id).await;
    }
    assert_eq!(told.states, ["completed"]);
    // The `deployments` topic carried the deployment's own changes, not its devices'.
    assert_eq!(told.listed, ["completed"]);
    assert_eq!(
        told.devices[&manual],
        [
            "downloading",
            "downloaded",
            "verifying",
            "installing",
            "rebooting",
            "confirmed"
        ]
    );
    // Each device's moves come in the order they were stored (an SDK device's reports that
    // arrive after its confirmation are refused, and told of never).
    let order = [
        "offered",
        "downloading",
        "downloaded",
        "verifying",
        "installing",
        "rebooting",
        "confirmed",
    ];
    for (device, seen) in &told.devices {
        let ranks: Vec<usize> = seen
            .iter()
            .map(|s| order.iter().position(|o| o == s).unwrap())
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{device}: {seen:?}");
    }
    for d in tasks {
        d.abort();
    }
}
