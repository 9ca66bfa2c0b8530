//! Deployments with a maintenance window (download at once, install inside it), devices that
//! join a deployment after it was made, and anti-rollback versions that rose after it was made:
//! SDK devices over real sockets, on the fleet's manual clock.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use unhidra_core::Clock;

use crate::deployments::{Behaviour, NEW, OLD, fleet, state_count};
use crate::helpers::problem;

fn hh_mm(t: DateTime<Utc>) -> String {
    t.format("%H:%M").to_string()
}

/// The rows of a deployment's devices, by device id.
async fn rows_of(f: &crate::deployments::Fleet, id: &str) -> Vec<Value> {
    f.get(&format!("/api/v1/deployments/{id}/devices"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

async fn rows_until(
    f: &crate::deployments::Fleet,
    id: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = rows_of(f, id).await;
        if done(&rows) {
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rows:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn devices_download_at_once_and_install_inside_the_maintenance_window() {
    let mut f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    let mut devices = Vec::new();
    for i in 0..2 {
        let (_, key) = f.register(&format!("night-{i}"), "night").await;
        devices.push(f.spawn_device(key, || Behaviour::Updates));
    }
    f.running(OLD, 2).await;
    // Windows are checked: each refusal typed, nothing made.
    for (window, field) in [
        (
            json!({ "start": "2:00", "end": "04:00" }),
            "/maintenance_window/start",
        ),
        (
            json!({ "start": "02:00", "end": "02:00" }),
            "/maintenance_window/end",
        ),
        (
            json!({ "start": "02:00", "end": "04:00", "time_zone": "Atlantis/Capital" }),
            "/maintenance_window/time_zone",
        ),
    ] {
        let refused = f
            .post(
                "/api/v1/deployments",
                &json!({ "firmware": sha, "target": { "tags": ["night"] },
                         "maintenance_window": window }),
            )
            .await;
        let refused = problem(refused, 422, "validation_failed").await;
        assert_eq!(refused["errors"][0]["field"], field, "{refused}");
    }
    assert_eq!(
        f.get("/api/v1/deployments").await.as_array().unwrap().len(),
        0
    );

    // A window that opens in two hours (UTC) and lasts one.
    let now = f.clock.now();
    let window = json!({
        "start": hh_mm(now + Duration::hours(2)),
        "end": hh_mm(now + Duration::hours(3)),
        "time_zone": "UTC",
    });
    let made = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["night"] },
                     "maintenance_window": window }),
        )
        .await;
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    assert_eq!(made["policy"]["maintenance_window"], window);
    let id = made["id"].as_str().unwrap().to_owned();
    // Downloaded and verified at once; none installs before the window.
    let waiting = rows_until(&f, &id, |rows| {
        rows.len() == 2 && rows.iter().all(|r| r["state"] == "verifying")
    })
    .await;
    let opens = (now + Duration::hours(2)).timestamp() / 60 * 60;
    for row in &waiting {
        // The device's time runs from the window's opening.
        let deadline: DateTime<Utc> = row["deadline"].as_str().unwrap().parse().unwrap();
        assert_eq!(deadline.timestamp(), opens + 3600, "{row}");
    }
    let offer = f
        .get(&format!(
            "/api/v1/devices/{}/commands",
            waiting[0]["device"].as_str().unwrap()
        ))
        .await;
    let offer = offer
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ota.update")
        .unwrap()
        .clone();
    assert_eq!(
        offer["params"]["install_window"],
        json!({ "start": opens * 1000, "end": (opens + 3600) * 1000 }),
        "{offer}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        rows_of(&f, &id)
            .await
            .iter()
            .all(|r| r["state"] == "verifying"),
        "installed before the window"
    );
    // The window opens: they install, reboot and confirm.
    f.clock.advance(Duration::hours(2));
    f.sign_in_again().await;
    let done = f.until(&id, |d| d["state"] == "completed").await;
    assert_eq!(state_count(&done, "confirmed"), 2, "{done:#}");
    for d in devices {
        d.abort();
    }
}

#[tokio::test]
async fn a_device_that_is_ready_only_after_its_window_fails_with_window_missed() {
    let mut f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    let (_, key) = f.register("late-riser", "dawn").await;
    let hello = json!({ "type": "hello", "firmware": OLD, "secure_version": 1 });
    drop(f.connect(&key, hello).await);
    f.running(OLD, 1).await;
    // Open now, for half an hour; the device is offline until an hour later.
    let now = f.clock.now();
    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["dawn"] },
                     "device_timeout": 10800,
                     "maintenance_window": {
                         "start": hh_mm(now - Duration::minutes(1)),
                         "end": hh_mm(now + Duration::minutes(30)),
                     } }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(made["policy"]["maintenance_window"]["time_zone"], "UTC");
    let id = made["id"].as_str().unwrap().to_owned();
    f.clock.advance(Duration::hours(1));
    f.sign_in_again().await;
    let device = f.spawn_device(key, || Behaviour::Updates);
    let rows = rows_until(&f, &id, |rows| rows[0]["state"] == "failed").await;
    assert_eq!(rows[0]["reason"], "window_missed", "{rows:#?}");
    let halted = f.until(&id, |d| d["state"] == "halted").await;
    assert_eq!(state_count(&halted, "failed"), 1);
    device.abort();
}

#[tokio::test]
async fn late_devices_join_a_deployment_that_takes_them_and_risen_anti_rollback_versions_fail() {
    let f = fleet().await;
    let sha = f.upload(NEW, 1).await;
    // Two devices said hello and are offline when the deployment is made.
    let (early, early_key) = f.register("early", "late").await;
    let (risen, risen_key) = f.register("risen", "late").await;
    for key in [&early_key, &risen_key] {
        let hello = json!({ "type": "hello", "firmware": OLD, "secure_version": 1 });
        drop(f.connect(key, hello).await);
    }
    f.running(OLD, 2).await;
    let made: Value = f
        .post(
            "/api/v1/deployments",
            &json!({ "firmware": sha, "target": { "tags": ["late"] }, "join_new": true,
                     "stages": [{ "percent": 100, "success_share": 0.5 }] }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(made["policy"]["join_new"], true);
    assert_eq!(made["joined"], 0);
    let id = made["id"].as_str().unwrap().to_owned();

    // A device registered later with the tag joins at its hello; one without it does not.
    let (newcomer, newcomer_key) = f.register("newcomer", "late").await;
    let (_, stranger_key) = f.register("stranger", "elsewhere").await;
    let mut tasks = vec![
        f.spawn_device(newcomer_key, || Behaviour::Updates),
        f.spawn_device(stranger_key, || Behaviour::Updates),
    ];
    let joined = rows_until(&f, &id, |rows| rows.len() == 3).await;
    let row = joined
        .iter()
        .find(|r| r["device"] == newcomer.as_str())
        .unwrap();
    assert!(row["joined_at"].is_string(), "{row}");
    assert!(
        joined
            .iter()
            .filter(|r| r["device"] != newcomer.as_str())
            .all(|r| r["joined_at"].is_null())
    );

    // This one's anti-rollback version rose above the image's meanwhile: its offer is
    // withdrawn and it fails with `downgrade`, not offered an image it would refuse.
    let hello = json!({ "type": "hello", "firmware": OLD, "secure_version": 5 });
    let _risen_socket = f.connect(&risen_key, hello).await;
    let rows = rows_until(&f, &id, |rows| {
        rows.iter()
            .any(|r| r["device"] == risen.as_str() && r["state"] == "failed")
    })
    .await;
    let row = rows.iter().find(|r| r["device"] == risen.as_str()).unwrap();
    assert_eq!(row["reason"], "downgrade", "{row}");

    tasks.push(f.spawn_device(early_key, || Behaviour::Updates));
    let done = f.until(&id, |d| d["state"] == "completed").await;
    assert_eq!(state_count(&done, "confirmed"), 2, "{done:#}");
    assert_eq!(state_count(&done, "failed"), 1, "{done:#}");
    assert_eq!(done["joined"], 1);
    assert_eq!(done["stages"][0]["size"], 3);
    let all = rows_of(&f, &id).await;
    assert!(
        all.iter()
            .any(|r| r["device"] == early.as_str() && r["state"] == "confirmed")
    );
    assert_eq!(all.len(), 3, "{all:#?}");
    for t in tasks {
        t.abort();
    }
}
