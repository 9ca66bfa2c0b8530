//! Deployments and their devices, on both backends: every change is a compare-and-set, a
//! device has one open update at most, and what a `hello` says of a boot is kept (its
//! anti-rollback version only rising).

use chrono::{DateTime, Duration, Utc};
use unhidra_store::StoreError;
use unhidra_store::both_backends;
use unhidra_store::deployments::{
    DeploymentChange, DeploymentDeviceRecord, DeploymentRecord, DeviceBoot, DeviceTransition,
};
use unhidra_store::firmware::FirmwareRecord;
use unhidra_store::testing::TestDb;
use uuid::Uuid;

use crate::devices::{device, user};

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

async fn image(db: &TestDb) -> String {
    let sha = "c0".repeat(32);
    db.store
        .create_firmware(&FirmwareRecord {
            sha256: sha.clone(),
            size: 10,
            kind: "generic".into(),
            project: "p".into(),
            target: "t".into(),
            version: "2.0.0".into(),
            secure_version: 1,
            idf_version: None,
            elf_sha256: None,
            manifest: "{}".into(),
            key_id: "k".into(),
            uploaded_by: None,
            uploaded_at: now(),
            retired_at: None,
        })
        .await
        .unwrap();
    sha
}

fn deployment(sha: &str, state: &str) -> DeploymentRecord {
    DeploymentRecord {
        id: Uuid::new_v4(),
        name: "d".into(),
        firmware_sha256: sha.to_owned(),
        target: "{}".into(),
        stages: "[]".into(),
        policy: "{}".into(),
        state: state.into(),
        stage: 0,
        stage_started_at: Some(now()),
        reason: None,
        created_by: None,
        created_at: now(),
        start_at: now(),
        finished_at: None,
    }
}

fn member(deployment: Uuid, device: Uuid, stage: i64) -> DeploymentDeviceRecord {
    DeploymentDeviceRecord {
        deployment_id: deployment,
        device_id: device,
        stage,
        state: "waiting".into(),
        progress: None,
        reason: None,
        command_id: None,
        from_version: None,
        from_partition: None,
        offered_at: None,
        deadline: None,
        updated_at: now(),
        joined_at: None,
    }
}

async fn rows_move_by_compare_and_set_and_a_device_has_one_open_update(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let owner = user(db, "ops@example.com").await;
    let a = device(db, owner, "a", "m", &[]).await;
    let b = device(db, owner, "b", "m", &[]).await;
    let sha = image(db).await;
    db.store
        .record_boot(&DeviceBoot {
            device_id: a,
            firmware: Some("1.0.0".into()),
            partition: Some("ota_0".into()),
            secure_version: Some(2),
        })
        .await
        .unwrap();
    let d = deployment(&sha, "running");
    db.store
        .create_deployment(&d, &[member(d.id, a, 0), member(d.id, b, 1)])
        .await
        .unwrap();

    // A second deployment cannot give a device a second open update; nothing of it is kept.
    let other = deployment(&sha, "running");
    let refused = db
        .store
        .create_deployment(&other, &[member(other.id, b, 0)])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
    assert!(db.store.deployment(other.id).await.is_err());
    assert_eq!(
        db.store
            .devices_in_deployments(&[a, b], &["running"])
            .await
            .unwrap()
            .len(),
        2
    );

    // The offer records what the device runs then, only while the deployment runs.
    let deadline = now() + Duration::hours(1);
    assert!(
        db.store
            .offer_device(d.id, a, deadline, now())
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .offer_device(d.id, a, deadline, now())
            .await
            .unwrap()
    );
    let rows = db
        .store
        .deployment_devices(d.id, Some("offered"), 0, 10)
        .await
        .unwrap();
    assert_eq!(
        (
            rows[0].from_version.as_deref(),
            rows[0].from_partition.as_deref()
        ),
        (Some("1.0.0"), Some("ota_0"))
    );
    let command = Uuid::new_v4();
    db.store.set_offer_command(d.id, a, command).await.unwrap();

    // Transitions only from the states named.
    let forward = DeviceTransition {
        deployment: d.id,
        device: a,
        from: &["offered", "downloading"],
        to: "downloading",
        progress: Some(40),
        reason: None,
        now: now(),
    };
    assert!(db.store.transition_device(&forward).await.unwrap());
    let back = DeviceTransition {
        from: &["waiting"],
        to: "offered",
        ..forward.clone()
    };
    assert!(!db.store.transition_device(&back).await.unwrap());
    let (found, row) = db
        .store
        .active_deployment_of(a, &["running"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.id, row.state.as_str(), row.progress),
        (d.id, "downloading", Some(40))
    );
    assert_eq!(row.command_id, Some(command));
    let counts = db.store.deployment_counts(d.id).await.unwrap();
    assert_eq!(counts.len(), 2);

    // A deployment moves from the named state and stage only; the first reason stays.
    let halt = DeploymentChange {
        id: d.id,
        from: &["running"],
        from_stage: Some(1),
        to: "halted",
        stage: None,
        stage_started_at: None,
        reason: Some("error_threshold"),
        finished_at: Some(now()),
    };
    assert!(
        !db.store.change_deployment(&halt).await.unwrap(),
        "not at stage 1"
    );
    assert!(
        db.store
            .change_deployment(&DeploymentChange {
                from_stage: Some(0),
                ..halt.clone()
            })
            .await
            .unwrap()
    );
    assert!(
        db.store
            .change_deployment(&DeploymentChange {
                from: &["halted"],
                from_stage: None,
                to: "cancelled",
                reason: Some("cancelled"),
                ..halt.clone()
            })
            .await
            .unwrap()
    );
    let ended = db.store.deployment(d.id).await.unwrap();
    assert_eq!(
        (ended.state.as_str(), ended.reason.as_deref(), ended.stage),
        ("cancelled", Some("error_threshold"), 0)
    );
    // Not running any more: no offer.
    assert!(
        !db.store
            .offer_device(d.id, b, deadline, now())
            .await
            .unwrap()
    );

    // Past its deadline a row is overdue, whatever its deployment's state.
    let overdue = db
        .store
        .overdue_devices(deadline + Duration::seconds(1), 10)
        .await
        .unwrap();
    assert_eq!(overdue.len(), 1);
    assert_eq!(overdue[0].device_id, a);
}
both_backends!(rows_move_by_compare_and_set_and_a_device_has_one_open_update);

async fn a_boots_anti_rollback_version_only_rises(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let owner = user(db, "ops@example.com").await;
    let a = device(db, owner, "a", "m", &[]).await;
    for (firmware, secure_version, kept) in [
        ("1.0.0", Some(3), Some(3)),
        ("1.0.1", None, Some(3)),
        ("1.0.2", Some(1), Some(3)),
        ("1.0.3", Some(4), Some(4)),
    ] {
        db.store
            .record_boot(&DeviceBoot {
                device_id: a,
                firmware: Some(firmware.into()),
                partition: Some("ota_1".into()),
                secure_version,
            })
            .await
            .unwrap();
        let boots = db.store.device_boots(&[a]).await.unwrap();
        assert_eq!(
            (boots[0].firmware.as_deref(), boots[0].secure_version),
            (Some(firmware), kept)
        );
    }
}
both_backends!(a_boots_anti_rollback_version_only_rises);

async fn devices_join_running_and_paused_deployments_once_without_a_second_open_update(
    db: &TestDb,
) {
    db.store.migrate().await.unwrap();
    let owner = user(db, "ops@example.com").await;
    let a = device(db, owner, "a", "m", &[]).await;
    let b = device(db, owner, "b", "m", &[]).await;
    let sha = image(db).await;
    let joined = |deployment: Uuid, device: Uuid| DeploymentDeviceRecord {
        joined_at: Some(now()),
        ..member(deployment, device, 1)
    };
    // Not a scheduled, halted or finished deployment.
    for state in ["scheduled", "halted", "cancelled", "completed"] {
        let d = deployment(&sha, state);
        db.store.create_deployment(&d, &[]).await.unwrap();
        assert!(
            !db.store.join_deployment(&joined(d.id, a)).await.unwrap(),
            "{state}"
        );
        assert_eq!(db.store.joined_devices(d.id).await.unwrap(), 0);
    }
    let running = deployment(&sha, "running");
    db.store
        .create_deployment(&running, &[member(running.id, b, 0)])
        .await
        .unwrap();
    assert!(
        db.store
            .join_deployment(&joined(running.id, a))
            .await
            .unwrap()
    );
    // Once: the row is there.
    assert!(
        !db.store
            .join_deployment(&joined(running.id, a))
            .await
            .unwrap()
    );
    let rows = db
        .store
        .deployment_devices(running.id, None, 0, 10)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.device_id == a).unwrap();
    assert_eq!((row.stage, row.state.as_str()), (1, "waiting"));
    assert!(row.joined_at.is_some());
    assert!(
        rows.iter()
            .find(|r| r.device_id == b)
            .unwrap()
            .joined_at
            .is_none()
    );
    assert_eq!(db.store.joined_devices(running.id).await.unwrap(), 1);
    // A paused deployment takes joiners too, but not a device with an update open elsewhere.
    let paused = deployment(&sha, "paused");
    db.store.create_deployment(&paused, &[]).await.unwrap();
    assert!(
        !db.store
            .join_deployment(&joined(paused.id, a))
            .await
            .unwrap()
    );
    let c = device(db, owner, "c", "m", &[]).await;
    assert!(
        db.store
            .join_deployment(&joined(paused.id, c))
            .await
            .unwrap()
    );
    assert_eq!(db.store.joined_devices(paused.id).await.unwrap(), 1);
}
both_backends!(devices_join_running_and_paused_deployments_once_without_a_second_open_update);
