//! Devices, keys, presence, alerts and telemetry, on both backends.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use unhidra_core::{Email, Role, UserId};
use unhidra_store::devices::{
    Aggregate, AlertFilter, AlertState, Appended, CommandRecord, CommandState, DeviceChange,
    DeviceFilter, DeviceRecord, DeviceStatus, NewDeviceKey, Seen, TelemetryBatch, TelemetryBudget,
    TelemetryPoint, TelemetryRange, TelemetryValue,
};
use unhidra_store::identity::NewUser;
use unhidra_store::testing::TestDb;
use unhidra_store::{StoreError, both_backends};
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

pub(crate) async fn user(db: &TestDb, email: &str) -> UserId {
    let id = UserId::new();
    db.store
        .create_user(&NewUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: None,
            password_hash: "x".into(),
            role: Role::User,
            now: now(),
        })
        .await
        .unwrap();
    id
}

fn new_key(hash: &str, at: DateTime<Utc>) -> NewDeviceKey {
    NewDeviceKey {
        id: Uuid::new_v4(),
        hash: hash.to_owned(),
        prefix: hash[..4].to_owned(),
        created_at: at,
    }
}

fn record(owner: UserId, name: &str, model: &str, tags: &[&str]) -> DeviceRecord {
    let at = now();
    DeviceRecord {
        id: Uuid::new_v4(),
        owner: Some(owner),
        name: name.to_owned(),
        model: model.to_owned(),
        location: None,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        metadata: "{}".into(),
        hardware_id: None,
        firmware: None,
        status: DeviceStatus::Offline,
        last_seen: None,
        inactivity_timeout: None,
        heartbeat: None,
        created_at: at,
        updated_at: at,
    }
}

pub(crate) async fn device(
    db: &TestDb,
    owner: UserId,
    name: &str,
    model: &str,
    tags: &[&str],
) -> Uuid {
    let device = record(owner, name, model, tags);
    let hash = format!("{:0>64}", device.id.simple());
    db.store
        .create_device(&device, &new_key(&hash, device.created_at))
        .await
        .unwrap();
    device.id
}

async fn devices_are_listed_filtered_changed_and_deleted(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let bob = user(db, "bob@example.com").await;
    let a = device(db, alice, "boiler", "esp32-s3", &["lab", "heat"]).await;
    let b = device(db, alice, "attic sensor", "esp32-c3", &["lab"]).await;
    let c = device(db, bob, "garage", "esp32-s3", &[]).await;

    let stored = db.store.device(a).await.unwrap();
    assert_eq!(stored.tags, ["heat", "lab"]);
    assert_eq!(stored.owner, Some(alice));
    assert_eq!(stored.status, DeviceStatus::Offline);

    let list = |filter: DeviceFilter| {
        let store = db.store.clone();
        async move {
            let (found, total) = store
                .list_devices(&DeviceFilter {
                    limit: 50,
                    ..filter
                })
                .await
                .unwrap();
            (found.into_iter().map(|d| d.id).collect::<Vec<_>>(), total)
        }
    };
    assert_eq!(list(DeviceFilter::default()).await, (vec![b, a, c], 3));
    let alices = DeviceFilter {
        owner: Some(alice),
        ..DeviceFilter::default()
    };
    assert_eq!(list(alices.clone()).await, (vec![b, a], 2));
    let tagged = DeviceFilter {
        tag: Some("heat".into()),
        ..DeviceFilter::default()
    };
    assert_eq!(list(tagged).await, (vec![a], 1));
    let model = DeviceFilter {
        model: Some("esp32-s3".into()),
        ..DeviceFilter::default()
    };
    assert_eq!(list(model).await, (vec![a, c], 2));
    let q = DeviceFilter {
        q: Some("ATTIC".into()),
        ..DeviceFilter::default()
    };
    assert_eq!(list(q).await, (vec![b], 1));
    let wild = DeviceFilter {
        q: Some("%".into()),
        ..DeviceFilter::default()
    };
    assert_eq!(list(wild).await, (vec![], 0));
    let page = DeviceFilter {
        offset: 1,
        limit: 1,
        ..DeviceFilter::default()
    };
    let (found, total) = db.store.list_devices(&page).await.unwrap();
    assert_eq!((found.len(), found[0].id, total), (1, a, 3));

    // A hardware id belongs to one of an owner's devices.
    let mut first = record(alice, "one", "m", &[]);
    first.hardware_id = Some("aa:bb".into());
    db.store
        .create_device(&first, &new_key(&"1".repeat(64), now()))
        .await
        .unwrap();
    let mut second = record(alice, "two", "m", &[]);
    second.hardware_id = Some("aa:bb".into());
    let taken = db
        .store
        .create_device(&second, &new_key(&"2".repeat(64), now()))
        .await;
    assert!(
        matches!(taken, Err(StoreError::Conflict { .. })),
        "{taken:?}"
    );
    assert!(matches!(
        db.store.device(second.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // Another owner's device may have it.
    let mut elsewhere = record(bob, "three", "m", &[]);
    elsewhere.hardware_id = Some("aa:bb".into());
    db.store
        .create_device(&elsewhere, &new_key(&"3".repeat(64), now()))
        .await
        .unwrap();
    assert_eq!(
        db.store
            .device(elsewhere.id)
            .await
            .unwrap()
            .hardware_id
            .as_deref(),
        Some("aa:bb")
    );

    let changed = db
        .store
        .update_device(
            a,
            &DeviceChange {
                name: Some("boiler room".into()),
                location: Some(Some("basement".into())),
                tags: Some(vec!["heat".into()]),
                inactivity_timeout: Some(Some(90)),
                ..DeviceChange::default()
            },
            now(),
        )
        .await
        .unwrap();
    assert_eq!(changed.name, "boiler room");
    assert_eq!(changed.location.as_deref(), Some("basement"));
    assert_eq!(changed.tags, ["heat"]);
    assert_eq!(changed.inactivity_timeout, Some(90));
    assert_eq!(changed.model, "esp32-s3");
    let cleared = db
        .store
        .update_device(
            a,
            &DeviceChange {
                location: Some(None),
                ..DeviceChange::default()
            },
            now(),
        )
        .await
        .unwrap();
    assert_eq!(cleared.location, None);
    assert_eq!(cleared.tags, ["heat"]);
    assert!(matches!(
        db.store
            .update_device(Uuid::new_v4(), &DeviceChange::default(), now())
            .await,
        Err(StoreError::NotFound { .. })
    ));

    db.store.delete_device(b).await.unwrap();
    assert!(matches!(
        db.store.device(b).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        db.store.delete_device(b).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(list(alices).await.1, 2);
}
both_backends!(devices_are_listed_filtered_changed_and_deleted);

async fn keys_rotate_with_a_grace_period_and_are_revoked(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let t0 = now();
    let mut dev = record(alice, "d", "m", &[]);
    dev.created_at = t0;
    let old = "a".repeat(64);
    db.store
        .create_device(&dev, &new_key(&old, t0))
        .await
        .unwrap();
    let (found, key) = db.store.device_by_key(&old, t0).await.unwrap();
    assert_eq!((found.id, key.device_id), (dev.id, dev.id));
    assert!(matches!(
        db.store.device_by_key(&"f".repeat(64), t0).await,
        Err(StoreError::NotFound { .. })
    ));

    let new = "b".repeat(64);
    let grace = t0 + Duration::hours(1);
    db.store
        .rotate_device_key(dev.id, &new_key(&new, t0), grace)
        .await
        .unwrap();
    assert!(
        db.store
            .device_by_key(&old, t0 + Duration::minutes(59))
            .await
            .is_ok()
    );
    assert!(db.store.device_by_key(&old, grace).await.is_err());
    assert!(
        db.store
            .device_by_key(&new, grace + Duration::days(1))
            .await
            .is_ok()
    );
    let keys = db.store.device_keys(dev.id).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        keys.iter().filter(|k| k.expires_at == Some(grace)).count(),
        1
    );

    // A second rotation does not give the first key a longer life.
    let newer = "c".repeat(64);
    let later = grace + Duration::hours(5);
    db.store
        .rotate_device_key(dev.id, &new_key(&newer, t0), later)
        .await
        .unwrap();
    assert!(
        db.store
            .device_by_key(&old, grace + Duration::minutes(1))
            .await
            .is_err()
    );
    assert!(
        db.store
            .device_by_key(&new, grace + Duration::hours(1))
            .await
            .is_ok()
    );

    let revoked = db.store.revoke_device_keys(dev.id, t0).await.unwrap();
    assert_eq!(revoked, 3);
    for hash in [&old, &new, &newer] {
        assert!(db.store.device_by_key(hash, t0).await.is_err());
    }
    assert_eq!(db.store.revoke_device_keys(dev.id, t0).await.unwrap(), 0);
}
both_backends!(keys_rotate_with_a_grace_period_and_are_revoked);

async fn silence_is_a_compare_and_set_and_ends_when_the_device_returns(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let id = device(db, alice, "d", "m", &[]).await;
    let t0 = now();
    // Never seen: never silent.
    assert!(
        db.store
            .mark_silent(id, t0, Uuid::new_v4(), "x", t0)
            .await
            .unwrap()
            .is_none()
    );
    assert!(db.store.presences().await.unwrap().is_empty());

    let (changed, resolved) = db
        .store
        .set_device_status(id, DeviceStatus::Online, t0)
        .await
        .unwrap();
    assert!(changed && resolved.is_empty());
    let (changed, _) = db
        .store
        .set_device_status(id, DeviceStatus::Online, t0)
        .await
        .unwrap();
    assert!(!changed);

    let t1 = t0 + Duration::seconds(10);
    db.store
        .record_seen(&[Seen {
            device_id: id,
            at: t1,
            heartbeat: Some(r#"{"uptime":5}"#.into()),
        }])
        .await
        .unwrap();
    // An older time never moves last_seen back; a missing heartbeat keeps the last one.
    db.store
        .record_seen(&[Seen {
            device_id: id,
            at: t0,
            heartbeat: None,
        }])
        .await
        .unwrap();
    let stored = db.store.device(id).await.unwrap();
    assert_eq!(stored.last_seen, Some(t1));
    assert_eq!(stored.heartbeat.as_deref(), Some(r#"{"uptime":5}"#));

    // Seen after the cutoff: not silent.
    assert!(
        db.store
            .mark_silent(id, t0, Uuid::new_v4(), "x", t1)
            .await
            .unwrap()
            .is_none()
    );
    let alert_id = Uuid::new_v4();
    let opened = db
        .store
        .mark_silent(
            id,
            t1,
            alert_id,
            "no traffic for 60 s",
            t1 + Duration::seconds(60),
        )
        .await
        .unwrap()
        .expect("opened");
    assert_eq!(
        (opened.id, opened.state, opened.kind.as_str()),
        (alert_id, AlertState::Open, "silent")
    );
    assert_eq!(
        db.store.device(id).await.unwrap().status,
        DeviceStatus::Silent
    );
    // A second node finding the same silence opens nothing.
    assert!(
        db.store
            .mark_silent(id, t1, Uuid::new_v4(), "x", t1)
            .await
            .unwrap()
            .is_none()
    );
    let presences = db.store.presences().await.unwrap();
    assert_eq!(presences.len(), 1);
    assert_eq!(presences[0].status, DeviceStatus::Silent);

    let (open, total) = db
        .store
        .list_alerts(&AlertFilter {
            owner: Some(alice),
            limit: 10,
            ..AlertFilter::default()
        })
        .await
        .unwrap();
    assert_eq!((open.len(), total), (1, 1));
    let counts = db.store.fleet_counts(Some(alice)).await.unwrap();
    assert_eq!(counts.open_alerts, 1);
    assert_eq!(counts.by_status, vec![(DeviceStatus::Silent, 1)]);

    let back = t1 + Duration::seconds(90);
    let (changed, resolved) = db
        .store
        .set_device_status(id, DeviceStatus::Online, back)
        .await
        .unwrap();
    assert!(changed);
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].state, AlertState::Resolved);
    assert_eq!(resolved[0].resolved_at, Some(back));
    assert_eq!(db.store.device(id).await.unwrap().last_seen, Some(back));
    let (open, _) = db
        .store
        .list_alerts(&AlertFilter {
            limit: 10,
            ..AlertFilter::default()
        })
        .await
        .unwrap();
    assert!(open.is_empty());
    let (all, total) = db
        .store
        .list_alerts(&AlertFilter {
            state: Some(AlertState::Resolved),
            device: Some(id),
            limit: 10,
            ..AlertFilter::default()
        })
        .await
        .unwrap();
    assert_eq!((all.len(), total), (1, 1));

    // Silent again: a new alert, acknowledged and then resolved by hand.
    let second = db
        .store
        .mark_silent(id, back, Uuid::new_v4(), "again", back)
        .await
        .unwrap()
        .expect("second alert");
    let acked = db
        .store
        .advance_alert(second.id, AlertState::Acknowledged, alice, back)
        .await
        .unwrap();
    assert_eq!(
        (acked.state, acked.acknowledged_by),
        (AlertState::Acknowledged, Some(alice))
    );
    let again = db
        .store
        .advance_alert(second.id, AlertState::Acknowledged, alice, back)
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
    let done = db
        .store
        .advance_alert(second.id, AlertState::Resolved, alice, back)
        .await
        .unwrap();
    assert_eq!(done.state, AlertState::Resolved);
    assert!(matches!(
        db.store
            .advance_alert(Uuid::new_v4(), AlertState::Resolved, alice, back)
            .await,
        Err(StoreError::NotFound { .. })
    ));
    // Retention takes resolved alerts too.
    let resolved = AlertFilter {
        state: Some(AlertState::Resolved),
        limit: 10,
        ..AlertFilter::default()
    };
    assert_eq!(db.store.list_alerts(&resolved).await.unwrap().1, 2);
    db.store
        .prune_telemetry(back + Duration::days(1), 100)
        .await
        .unwrap();
    assert_eq!(db.store.list_alerts(&resolved).await.unwrap().1, 0);
}
both_backends!(silence_is_a_compare_and_set_and_ends_when_the_device_returns);

fn point(key: &str, ts: DateTime<Utc>, value: TelemetryValue) -> TelemetryPoint {
    TelemetryPoint {
        key: key.to_owned(),
        ts,
        value,
    }
}

async fn telemetry_is_stored_once_per_batch_with_latest_values(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let a = device(db, alice, "a", "m", &[]).await;
    let b = device(db, alice, "b", "m", &[]).await;
    let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let s = |n: i64| t0 + Duration::seconds(n);
    let frame: Vec<u8> = (0..768u32)
        .flat_map(|i| (i as f32 / 10.0).to_le_bytes())
        .collect();
    let batches = vec![
        TelemetryBatch {
            device_id: a,
            seq: 1,
            received_at: s(0),
            owner: None,
            cost: 0,
            points: vec![
                point("temp", s(0), TelemetryValue::Number(20.5)),
                point("temp", s(30), TelemetryValue::Number(21.5)),
                point("door", s(0), TelemetryValue::Bool(true)),
                point("mode", s(0), TelemetryValue::Text("eco".into())),
                point(
                    "thermal",
                    s(0),
                    TelemetryValue::Array {
                        shape: "f32:24x32".into(),
                        data: frame.clone(),
                    },
                ),
            ],
        },
        TelemetryBatch {
            device_id: b,
            seq: 1,
            received_at: s(0),
            owner: None,
            cost: 0,
            points: vec![point("temp", s(0), TelemetryValue::Number(5.0))],
        },
        // The same batch twice in one call: stored once.
        TelemetryBatch {
            device_id: b,
            seq: 1,
            received_at: s(0),
            owner: None,
            cost: 0,
            points: vec![point("temp", s(0), TelemetryValue::Number(5.0))],
        },
    ];
    assert_eq!(
        db.store
            .append_telemetry(&batches, &TelemetryBudget::default())
            .await
            .unwrap(),
        [Appended::Stored, Appended::Stored, Appended::Repeat]
    );
    // A repeat of a stored batch stores nothing, even with other points.
    let repeat = TelemetryBatch {
        device_id: a,
        seq: 1,
        received_at: s(60),
        owner: None,
        cost: 0,
        points: vec![point("temp", s(60), TelemetryValue::Number(99.0))],
    };
    let next = TelemetryBatch {
        device_id: a,
        seq: 2,
        received_at: s(60),
        owner: None,
        cost: 0,
        points: vec![
            point("temp", s(90), TelemetryValue::Number(23.5)),
            point("temp", s(60), TelemetryValue::Number(22.5)),
        ],
    };
    assert_eq!(
        db.store
            .append_telemetry(&[repeat, next], &TelemetryBudget::default())
            .await
            .unwrap(),
        [Appended::Repeat, Appended::Stored]
    );

    let range = |after: Option<DateTime<Utc>>, limit: u32| TelemetryRange {
        device_id: a,
        key: "temp".into(),
        from: None,
        to: None,
        after,
        limit,
    };
    let temps = db.store.telemetry(&range(None, 10)).await.unwrap();
    let values: Vec<_> = temps.iter().map(|p| (p.ts, p.value.clone())).collect();
    assert_eq!(
        values,
        [
            (s(0), TelemetryValue::Number(20.5)),
            (s(30), TelemetryValue::Number(21.5)),
            (s(60), TelemetryValue::Number(22.5)),
            (s(90), TelemetryValue::Number(23.5)),
        ]
    );
    let page = db.store.telemetry(&range(Some(s(30)), 1)).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].ts, s(60));
    let window = TelemetryRange {
        from: Some(s(30)),
        to: Some(s(90)),
        ..range(None, 10)
    };
    assert_eq!(db.store.telemetry(&window).await.unwrap().len(), 2);

    let latest = db.store.telemetry_latest(a).await.unwrap();
    let keys: Vec<_> = latest.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["door", "mode", "temp", "thermal"]);
    assert_eq!(latest[0].value, TelemetryValue::Bool(true));
    assert_eq!(latest[1].value, TelemetryValue::Text("eco".into()));
    assert_eq!(
        (latest[2].ts, &latest[2].value),
        (s(90), &TelemetryValue::Number(23.5))
    );
    assert_eq!(
        latest[3].value,
        TelemetryValue::Array {
            shape: "f32:24x32".into(),
            data: frame
        }
    );
    assert_eq!(db.store.telemetry_key_count(a).await.unwrap(), 4);
    assert_eq!(db.store.telemetry_key_count(b).await.unwrap(), 1);

    // Minute buckets: [0, 30] and [60, 90].
    let buckets = db
        .store
        .telemetry_buckets(&range(None, 10), 60, Aggregate::Avg)
        .await
        .unwrap();
    let got: Vec<_> = buckets.iter().map(|b| (b.start, b.value)).collect();
    assert_eq!(got, [(s(0), 21.0), (s(60), 23.0)]);
    let max = db
        .store
        .telemetry_buckets(&range(None, 10), 60, Aggregate::Max)
        .await
        .unwrap();
    assert_eq!(max[1].value, 23.5);
    let count = db
        .store
        .telemetry_buckets(&range(None, 10), 3600, Aggregate::Count)
        .await
        .unwrap();
    assert_eq!(count.len(), 1);
    assert_eq!(count[0].value, 4.0);

    // Pruning goes by measurement time, in rounds.
    assert_eq!(db.store.prune_telemetry(s(31), 2).await.unwrap(), 2);
    assert_eq!(db.store.prune_telemetry(s(31), 100).await.unwrap(), 4);
    assert_eq!(db.store.prune_telemetry(s(31), 100).await.unwrap(), 0);
    assert_eq!(db.store.telemetry(&range(None, 10)).await.unwrap().len(), 2);
    // Deleting a device deletes its telemetry.
    db.store.delete_device(a).await.unwrap();
    assert!(db.store.telemetry_latest(a).await.unwrap().is_empty());
}
both_backends!(telemetry_is_stored_once_per_batch_with_latest_values);

async fn telemetry_budgets_are_reserved_with_the_write_per_device_and_owner(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let a = device(db, alice, "a", "m", &[]).await;
    let b = device(db, alice, "b", "m", &[]).await;
    let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let batch = |device: Uuid, seq: i64, at: DateTime<Utc>, cost: u64| TelemetryBatch {
        device_id: device,
        seq,
        received_at: at,
        owner: Some(alice),
        cost,
        points: vec![point("temp", at, TelemetryValue::Number(1.0))],
    };
    let budget = TelemetryBudget {
        per_device: 100,
        per_owner: 150,
    };
    let append = |batches: Vec<TelemetryBatch>| async move {
        db.store.append_telemetry(&batches, &budget).await.unwrap()
    };
    // In one write: the device's budget holds for batches written together, and a batch over
    // it stores nothing; then the owner's holds across the owner's devices.
    assert_eq!(
        append(vec![
            batch(a, 1, t0, 60),
            batch(a, 2, t0, 60),
            batch(a, 3, t0, 40)
        ])
        .await,
        [
            Appended::Stored,
            Appended::OverDeviceBudget,
            Appended::Stored
        ]
    );
    assert_eq!(
        append(vec![batch(b, 1, t0, 60), batch(b, 2, t0, 10)]).await,
        [Appended::OverOwnerBudget, Appended::Stored]
    );
    // A refused batch was not stored: the same seq later (under the budget) is new. A stored
    // one repeated is a repeat whatever the budgets, and costs nothing again.
    assert_eq!(
        append(vec![batch(a, 1, t0, 1000), batch(b, 1, t0, 40)]).await,
        [Appended::Repeat, Appended::Stored]
    );
    assert_eq!(
        append(vec![batch(b, 3, t0, 1)]).await,
        [Appended::OverOwnerBudget]
    );
    let read = |device: Uuid| TelemetryRange {
        device_id: device,
        key: "temp".into(),
        from: None,
        to: None,
        after: None,
        limit: 10,
    };
    assert_eq!(db.store.telemetry(&read(a)).await.unwrap().len(), 1);
    // The next UTC day starts again.
    let tomorrow = t0 + Duration::days(1);
    assert_eq!(
        append(vec![batch(a, 4, tomorrow, 100), batch(b, 4, tomorrow, 50)]).await,
        [Appended::Stored, Appended::Stored]
    );
    // No limits: nothing is counted.
    let free = TelemetryBudget::default();
    assert_eq!(
        db.store
            .append_telemetry(&[batch(a, 5, tomorrow, u64::MAX)], &free)
            .await
            .unwrap(),
        [Appended::Stored]
    );
}
both_backends!(telemetry_budgets_are_reserved_with_the_write_per_device_and_owner);

/// Two writers (two pools, as two nodes) whose batches share devices and owners in opposite
/// orders: the budgets' rows are locked in one order, so neither waits for the other in a
/// cycle (PostgreSQL would abort one with "deadlock detected"), and the budgets hold.
async fn writers_sharing_scopes_in_opposite_orders_do_not_deadlock(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let other = db.another_handle().await;
    let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let mut devices = Vec::new();
    for o in 0..8 {
        let owner = user(db, &format!("owner{o}@example.com")).await;
        for d in 0..4 {
            devices.push((
                device(db, owner, &format!("d{o}-{d}"), "m", &[]).await,
                owner,
            ));
        }
    }
    let budget = TelemetryBudget {
        per_device: 1_000,
        per_owner: 3_000,
    };
    let batches = |seq: i64, reversed: bool| {
        let mut all: Vec<TelemetryBatch> = devices
            .iter()
            .map(|&(device_id, owner)| TelemetryBatch {
                device_id,
                seq,
                received_at: t0,
                owner: Some(owner),
                cost: 100,
                points: vec![point("temp", t0, TelemetryValue::Number(1.0))],
            })
            .collect();
        if reversed {
            all.reverse();
        }
        all
    };
    let stores = [Arc::clone(&db.store), Arc::clone(&other.store)];
    let mut stored = 0;
    for round in 0..6 {
        let writers: Vec<_> = (0..2)
            .map(|i| {
                let store = Arc::clone(&stores[i]);
                let batches = batches(round * 2 + i as i64, i == 1);
                tokio::spawn(async move { store.append_telemetry(&batches, &budget).await })
            })
            .collect();
        for writer in writers {
            let outcomes = writer.await.unwrap().expect("no writer is aborted");
            stored += outcomes.iter().filter(|o| **o == Appended::Stored).count();
        }
    }
    // Ten batches of 100 bytes fit a device's 1,000; thirty fit an owner's 3,000 over its four
    // devices: 8 owners × 30.
    assert_eq!(stored, 240);
    other.store.close().await;
}
both_backends!(writers_sharing_scopes_in_opposite_orders_do_not_deadlock);

fn new_command(device: Uuid, key: Option<&str>, at: DateTime<Utc>, ttl: i64) -> CommandRecord {
    CommandRecord {
        id: Uuid::new_v4(),
        device_id: device,
        name: "reboot".into(),
        params: "{}".into(),
        state: CommandState::Queued,
        idempotency_key: key.map(str::to_owned),
        created_by: None,
        created_at: at,
        expires_at: at + Duration::seconds(ttl),
        delivered_at: None,
        finished_at: None,
        output: None,
    }
}

async fn commands_are_idempotent_delivered_answered_and_expired(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let a = device(db, alice, "a", "m", &[]).await;
    let b = device(db, alice, "b", "m", &[]).await;
    let t0 = now();
    let first = new_command(a, Some("k1"), t0, 60);
    let (stored, created) = db.store.create_command(&first).await.unwrap();
    assert!(created);
    assert_eq!(stored, first);
    // The same key again: the first command, nothing new stored.
    let (again, created) = db
        .store
        .create_command(&new_command(a, Some("k1"), t0, 60))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    // Another device may use the same key; no key means no deduplication.
    assert!(
        db.store
            .create_command(&new_command(b, Some("k1"), t0, 60))
            .await
            .unwrap()
            .1
    );
    let short = new_command(a, None, t0, 5);
    db.store.create_command(&short).await.unwrap();
    db.store
        .create_command(&new_command(a, None, t0, 60))
        .await
        .unwrap();

    let pending = db.store.pending_commands(&[a], t0).await.unwrap();
    assert_eq!(pending.len(), 3);
    db.store.mark_delivered(&[first.id], t0).await.unwrap();
    assert_eq!(
        db.store.command(first.id).await.unwrap().state,
        CommandState::Delivered
    );
    // Past the short one's expiry it is no longer pending, and the sweep expires it.
    let later = t0 + Duration::seconds(10);
    assert_eq!(
        db.store
            .pending_commands(&[a, b], later)
            .await
            .unwrap()
            .len(),
        3
    );
    let expired = db.store.expire_commands(later).await.unwrap();
    assert_eq!(expired.iter().map(|c| c.id).collect::<Vec<_>>(), [short.id]);
    assert_eq!(expired[0].state, CommandState::Expired);
    // A result from another device, or a second result, changes nothing.
    assert!(
        db.store
            .finish_command(b, first.id, CommandState::Succeeded, None, later)
            .await
            .unwrap()
            .is_none()
    );
    let done = db
        .store
        .finish_command(
            a,
            first.id,
            CommandState::Succeeded,
            Some(r#"{"ok":true}"#),
            later,
        )
        .await
        .unwrap()
        .expect("finished");
    assert_eq!(
        (done.state, done.output.as_deref()),
        (CommandState::Succeeded, Some(r#"{"ok":true}"#))
    );
    assert!(
        db.store
            .finish_command(a, first.id, CommandState::Failed, None, later)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(db.store.device_commands(a, 10).await.unwrap().len(), 3);
}
both_backends!(commands_are_idempotent_delivered_answered_and_expired);

async fn configuration_has_versions_and_a_report(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let a = device(db, alice, "a", "m", &[]).await;
    let t0 = now();
    assert!(matches!(
        db.store.device_config(a).await,
        Err(StoreError::NotFound { .. })
    ));
    // A report before anything is desired.
    db.store
        .set_reported_config(a, r#"{"rate":5}"#, None, t0)
        .await
        .unwrap();
    let c = db.store.device_config(a).await.unwrap();
    assert_eq!(
        (c.desired_version, c.reported.as_deref()),
        (0, Some(r#"{"rate":5}"#))
    );
    let c = db
        .store
        .set_desired_config(a, r#"{"rate":10}"#, t0)
        .await
        .unwrap();
    assert_eq!(c.desired_version, 1);
    let c = db
        .store
        .set_desired_config(a, r#"{"rate":20}"#, t0)
        .await
        .unwrap();
    assert_eq!(
        (c.desired_version, c.desired.as_str()),
        (2, r#"{"rate":20}"#)
    );
    assert_eq!(c.reported.as_deref(), Some(r#"{"rate":5}"#));
    db.store
        .set_reported_config(a, r#"{"rate":20}"#, Some(2), t0)
        .await
        .unwrap();
    let c = db.store.device_config(a).await.unwrap();
    assert_eq!((c.reported_version, c.desired_version), (Some(2), 2));
}
both_backends!(configuration_has_versions_and_a_report);
