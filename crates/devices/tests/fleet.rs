//! The fleet service over a real store, on both backends, with a manual clock.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use unhidra_config::{Config, Profile};
use unhidra_core::{Email, ManualClock, Principal, Role, UserId};
use unhidra_devices::telemetry::ReadQuery;
use unhidra_devices::{
    DeviceError, DeviceMetrics, Devices, DevicesConfig, Disconnect, FleetEvent, ListQuery,
    NewDevice,
};
use unhidra_identity::{AuditLog, RequestContext};
use unhidra_protocol::device::{ArrayValue, Point, Value};
use unhidra_store::both_backends;
use unhidra_store::devices::{AlertState, ClaimRefusal, DeviceStatus};
use unhidra_store::identity::NewUser;
use unhidra_store::testing::TestDb;
use uuid::Uuid;

struct Fleet {
    devices: Devices,
    clock: Arc<ManualClock>,
    alice: Principal,
    bob: Principal,
    admin: Principal,
}

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

async fn user(db: &TestDb, email: &str, role: Role) -> Principal {
    let id = UserId::new();
    db.store
        .create_user(&NewUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: None,
            password_hash: "x".into(),
            role,
            now: start(),
        })
        .await
        .unwrap();
    Principal {
        user_id: id,
        role,
        session_id: Uuid::new_v4(),
        mfa: true,
    }
}

fn config(edit: impl FnOnce(&mut Config)) -> DevicesConfig {
    let mut config = Config::defaults(Profile::Test);
    edit(&mut config);
    DevicesConfig::from_config(&config).unwrap()
}

fn service(db: &TestDb, clock: &Arc<ManualClock>, config: DevicesConfig) -> Devices {
    let clock: Arc<dyn unhidra_core::Clock> = clock.clone();
    let jobs = unhidra_jobs::Jobs::builder(
        Arc::clone(&db.store),
        Arc::clone(&clock),
        Default::default(),
    )
    .build();
    Devices::new(
        Arc::clone(&db.store),
        Arc::clone(&clock),
        config,
        AuditLog::store_only(Arc::clone(&db.store), Arc::clone(&clock)),
        jobs,
        DeviceMetrics::default(),
    )
}

async fn fleet(db: &TestDb, config: DevicesConfig) -> Fleet {
    db.store.migrate().await.unwrap();
    let clock = Arc::new(ManualClock::new(start()));
    Fleet {
        devices: service(db, &clock, config),
        alice: user(db, "alice@example.com", Role::User).await,
        bob: user(db, "bob@example.com", Role::User).await,
        admin: user(db, "admin@example.com", Role::Admin).await,
        clock,
    }
}

fn sensor(name: &str) -> NewDevice {
    NewDevice {
        name: name.into(),
        model: "esp32-s3".into(),
        tags: vec!["Lab".into()],
        ..NewDevice::default()
    }
}

fn ctx() -> RequestContext {
    RequestContext::default()
}

async fn devices_are_their_owners_and_keys_rotate_and_revoke(db: &TestDb) {
    let f = fleet(db, config(|c| c.device_registrations_per_hour = 3)).await;
    let mut events = f.devices.events();
    let made = f
        .devices
        .register(&f.alice, sensor("boiler"), None, &ctx())
        .await
        .unwrap();
    assert!(made.key.starts_with("unh_dk_"));
    assert_eq!(made.device.tags, ["lab"]);
    assert_eq!(made.device.status, "offline");
    assert_eq!(made.device.effective_inactivity_timeout, 120);
    let id = made.device.id;
    let auth = f.devices.authenticate(&made.key).await.unwrap();
    assert_eq!((auth.device, auth.owner), (id, Some(f.alice.user_id)));

    // Bob does not see Alice's device; an admin does.
    assert!(matches!(
        f.devices.get(&f.bob, id).await,
        Err(DeviceError::NotFound(_))
    ));
    assert_eq!(f.devices.get(&f.admin, id).await.unwrap().name, "boiler");
    assert_eq!(
        f.devices
            .list(&f.bob, ListQuery::default())
            .await
            .unwrap()
            .total,
        0
    );
    assert_eq!(
        f.devices
            .list(&f.admin, ListQuery::default())
            .await
            .unwrap()
            .total,
        1
    );
    assert!(matches!(
        f.devices.revoke(&f.bob, id, &ctx()).await,
        Err(DeviceError::NotFound(_))
    ));

    // Bad input is refused with its field and stores nothing.
    let bad = NewDevice {
        name: " ".into(),
        ..sensor("x")
    };
    match f.devices.register(&f.alice, bad, None, &ctx()).await {
        Err(DeviceError::Invalid(field, code, _)) => {
            assert_eq!((field, code), ("/name", "invalid_length"));
        }
        other => panic!("{other:?}"),
    }
    let bad_model = NewDevice {
        model: "esp 32".into(),
        ..sensor("x")
    };
    assert!(matches!(
        f.devices.register(&f.alice, bad_model, None, &ctx()).await,
        Err(DeviceError::Invalid("/model", _, _))
    ));
    assert_eq!(
        f.devices
            .list(&f.alice, ListQuery::default())
            .await
            .unwrap()
            .total,
        1
    );
    // Only admins register for someone else.
    let for_bob = NewDevice {
        owner: Some(f.bob.user_id),
        ..sensor("b")
    };
    assert!(matches!(
        f.devices
            .register(&f.alice, for_bob.clone(), None, &ctx())
            .await,
        Err(DeviceError::Forbidden(_))
    ));
    let bobs = f
        .devices
        .register(&f.admin, for_bob, None, &ctx())
        .await
        .unwrap();
    assert_eq!(bobs.device.owner, Some(f.bob.user_id.0));

    // Rotation: both keys work through the grace period, then only the new one.
    let rotated = f.devices.rotate_key(&f.alice, id, &ctx()).await.unwrap();
    assert_ne!(rotated.key, made.key);
    assert!(f.devices.authenticate(&made.key).await.is_ok());
    assert!(f.devices.authenticate(&rotated.key).await.is_ok());
    let keys = f.devices.keys(&f.alice, id).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter()
            .all(|k| k.usable && k.prefix.starts_with("unh_dk_") && k.prefix.len() == 12)
    );
    f.clock.advance(Duration::hours(24));
    assert!(matches!(
        f.devices.authenticate(&made.key).await,
        Err(DeviceError::BadKey)
    ));
    assert!(f.devices.authenticate(&rotated.key).await.is_ok());

    // Revocation ends every key at once and tells the server to close its connections.
    assert_eq!(f.devices.revoke(&f.alice, id, &ctx()).await.unwrap(), 1);
    assert!(matches!(
        f.devices.authenticate(&rotated.key).await,
        Err(DeviceError::BadKey)
    ));
    let mut revoked = false;
    while let Ok(event) = events.try_recv() {
        revoked |= event == FleetEvent::Revoked { device: id };
    }
    assert!(revoked);
    for garbage in ["", "unh_dk_", "not a key", &format!("{}x", rotated.key)] {
        assert!(matches!(
            f.devices.authenticate(garbage).await,
            Err(DeviceError::BadKey)
        ));
    }
    let quiet = unhidra_devices::DeviceUpdate {
        inactivity_timeout: Some(Some(3600)),
        ..Default::default()
    };
    f.devices.update(&f.alice, id, quiet, &ctx()).await.unwrap();
    let audit = db.store.audit_events(None, 50).await.unwrap();
    let kinds: Vec<&str> = audit.iter().map(|e| e.kind.as_str()).collect();
    for kind in [
        "device.registered",
        "device.key_rotated",
        "device.revoked",
        "device.updated",
    ] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
    assert!(
        audit
            .iter()
            .all(|e| !e.detail.contains(&made.key) && !e.detail.contains(&rotated.key))
    );

    // A hardware id is one of an owner's devices (another owner may register it too: ids are
    // public, and a squatter must not block their real owner); registrations are limited per
    // user.
    let hw = NewDevice {
        hardware_id: Some("aa:bb:cc".into()),
        ..sensor("one")
    };
    f.devices
        .register(&f.alice, hw.clone(), None, &ctx())
        .await
        .unwrap();
    assert!(matches!(
        f.devices.register(&f.alice, hw.clone(), None, &ctx()).await,
        Err(DeviceError::Conflict("hardware_id_taken", _))
    ));
    f.devices.register(&f.bob, hw, None, &ctx()).await.unwrap();
    // (The 24 hours above emptied the hourly window: two attempts so far.)
    f.devices
        .register(&f.alice, sensor("four"), None, &ctx())
        .await
        .unwrap();
    assert!(matches!(
        f.devices
            .register(&f.alice, sensor("five"), None, &ctx())
            .await,
        Err(DeviceError::RateLimited { .. })
    ));

    f.devices.delete(&f.alice, id, &ctx()).await.unwrap();
    assert!(matches!(
        f.devices.get(&f.admin, id).await,
        Err(DeviceError::NotFound(_))
    ));
}
both_backends!(devices_are_their_owners_and_keys_rotate_and_revoke);

async fn silence_is_detected_on_time_and_ends_when_the_device_returns(db: &TestDb) {
    let f = fleet(db, config(|_| {})).await;
    let made = f
        .devices
        .register(&f.alice, sensor("boiler"), None, &ctx())
        .await
        .unwrap();
    let id = made.device.id;
    let auth = f.devices.authenticate(&made.key).await.unwrap();
    // A device never seen is never silent.
    f.clock.advance(Duration::hours(1));
    assert!(f.devices.check_silence().await.is_empty());

    let mut events = f.devices.events();
    f.devices.connected(&auth).await.unwrap();
    assert_eq!(
        db.store.device(id).await.unwrap().status,
        DeviceStatus::Online
    );
    assert!(matches!(
        events.try_recv().unwrap(),
        FleetEvent::Status {
            status: "online",
            reason: "connected",
            ..
        }
    ));
    f.clock.advance(Duration::seconds(30));
    f.devices.seen(&auth, Some(r#"{"uptime":30}"#.into())).await;
    f.devices.flush_presence().await;
    let stored = db.store.device(id).await.unwrap();
    assert_eq!(stored.last_seen, Some(f.clock_now()));
    assert_eq!(stored.heartbeat.as_deref(), Some(r#"{"uptime":30}"#));

    // Quiet for one second less than the timeout: nothing. At the timeout: silent.
    f.clock.advance(Duration::seconds(119));
    assert!(f.devices.check_silence().await.is_empty());
    f.clock.advance(Duration::seconds(1));
    let opened = f.devices.check_silence().await;
    assert_eq!(opened.len(), 1);
    assert_eq!((opened[0].device, opened[0].state), (id, "open"));
    assert_eq!(
        db.store.device(id).await.unwrap().status,
        DeviceStatus::Silent
    );
    assert!(f.devices.check_silence().await.is_empty());
    let page = f
        .devices
        .alerts(&f.alice, None, None, None, None)
        .await
        .unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(
        f.devices
            .alerts(&f.bob, None, None, None, None)
            .await
            .unwrap()
            .total,
        0
    );
    assert_eq!(f.devices.summary(&f.admin).await.unwrap().silent, 1);

    // Traffic brings it back: online again, the alert resolved.
    f.clock.advance(Duration::seconds(5));
    f.devices.seen(&auth, None).await;
    assert_eq!(
        db.store.device(id).await.unwrap().status,
        DeviceStatus::Online
    );
    let resolved = f
        .devices
        .alerts(&f.alice, Some("resolved"), Some(id), None, None)
        .await
        .unwrap();
    assert_eq!(resolved.total, 1);
    let mut kinds = Vec::new();
    while let Ok(event) = events.try_recv() {
        kinds.push(match event {
            FleetEvent::Status { status, .. } => status.to_owned(),
            FleetEvent::Alert { alert, .. } => format!("alert {}", alert.state),
            FleetEvent::Revoked { .. } => "revoked".into(),
            FleetEvent::Command { .. } => "command".into(),
            FleetEvent::Device { device_event, .. } => device_event.kind,
        });
    }
    assert_eq!(kinds, ["silent", "alert open", "online", "alert resolved"]);

    // A clean close: offline, not silent.
    f.devices.disconnected(&auth, Disconnect::Clean).await;
    assert_eq!(
        db.store.device(id).await.unwrap().status,
        DeviceStatus::Offline
    );

    // The server stops; the device dies meanwhile. After a restart its deadline comes from
    // the stored last_seen, and it is reported.
    f.devices.flush_presence().await;
    let clock = Arc::new(ManualClock::new(f.clock_now() + Duration::minutes(10)));
    let restarted = service(db, &clock, config(|_| {}));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = restarted
        .start(async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    let opened = restarted.check_silence().await;
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].device, id);
    // Acknowledged, then resolved by hand.
    let acked = restarted
        .advance_alert(&f.alice, opened[0].id, AlertState::Acknowledged, &ctx())
        .await
        .unwrap();
    assert_eq!(acked.state, "acknowledged");
    assert!(matches!(
        restarted
            .advance_alert(&f.bob, opened[0].id, AlertState::Resolved, &ctx())
            .await,
        Err(DeviceError::NotFound(_))
    ));
    assert!(matches!(
        restarted
            .advance_alert(&f.alice, opened[0].id, AlertState::Acknowledged, &ctx())
            .await,
        Err(DeviceError::Conflict(..))
    ));
    stop.send(()).unwrap();
    task.await.unwrap();
}
both_backends!(silence_is_detected_on_time_and_ends_when_the_device_returns);

impl Fleet {
    fn clock_now(&self) -> DateTime<Utc> {
        unhidra_core::Clock::now(&*self.clock)
    }
}

fn point(key: &str, ts: Option<i64>, value: Value) -> Point {
    Point {
        ts,
        key: key.into(),
        value,
    }
}

async fn telemetry_is_acknowledged_once_and_bad_batches_store_nothing(db: &TestDb) {
    let f = fleet(
        db,
        config(|c| {
            c.telemetry_max_keys = 3;
            c.telemetry_max_points = 10;
        }),
    )
    .await;
    let made = f
        .devices
        .register(&f.alice, sensor("cam"), None, &ctx())
        .await
        .unwrap();
    let id = made.device.id;
    let auth = f.devices.authenticate(&made.key).await.unwrap();
    let ms = |secs: i64| (start() + Duration::seconds(secs)).timestamp_millis();
    let frame = ArrayValue::from_f32(vec![24, 32], &vec![21.5; 768]).unwrap();
    let batch = vec![
        point("temp", Some(ms(-10)), Value::Number(20.5)),
        point("temp", None, Value::Number(21.0)),
        point("thermal", Some(ms(-5)), Value::Array(frame)),
    ];
    assert!(f.devices.telemetry(&auth, 1, batch.clone()).await.unwrap());
    // The same seq again: acknowledged, not stored twice.
    assert!(!f.devices.telemetry(&auth, 1, batch).await.unwrap());
    let read = |key: &str| ReadQuery {
        key: key.into(),
        from: None,
        to: None,
        limit: None,
        cursor: None,
        bucket: None,
        agg: None,
    };
    let temps = f
        .devices
        .read_telemetry(&f.alice, id, read("temp"))
        .await
        .unwrap();
    assert_eq!(temps.points.as_ref().unwrap().len(), 2);
    assert!(matches!(
        f.devices.read_telemetry(&f.bob, id, read("temp")).await,
        Err(DeviceError::NotFound(_))
    ));
    let latest = f.devices.latest_telemetry(&f.alice, id).await.unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!(latest[1].value["shape"], serde_json::json!([24, 32]));
    assert_eq!(latest[1].value["data"].as_array().unwrap().len(), 768);

    // Every refusal names its reason, and nothing of the batch is stored.
    let refused = [
        (
            vec![point("bad key", None, Value::Number(1.0))],
            "invalid_key",
        ),
        (
            vec![point("x", None, Value::Text("y".repeat(20_000)))],
            "invalid_length",
        ),
        (
            vec![point("x", Some(ms(3600)), Value::Number(1.0))],
            "ts_in_future",
        ),
        (vec![point("x", Some(0), Value::Number(1.0))], "ts_too_old"),
        (
            (0..11)
                .map(|i| point("temp", Some(ms(-i)), Value::Number(1.0)))
                .collect(),
            "invalid_length",
        ),
        (
            vec![
                point("a", None, Value::Number(1.0)),
                point("b", None, Value::Number(1.0)),
            ],
            "too_many_keys",
        ),
    ];
    for (seq, (points, code)) in (2..).zip(refused) {
        match f.devices.telemetry(&auth, seq, points).await {
            Err(DeviceError::Invalid(_, got, _)) => assert_eq!(got, code),
            other => panic!("{code}: {other:?}"),
        }
    }
    assert_eq!(db.store.telemetry_key_count(id).await.unwrap(), 2);
    // A refused seq was not recorded: it can be sent again, fixed.
    assert!(
        f.devices
            .telemetry(&auth, 2, vec![point("door", None, Value::Bool(true))])
            .await
            .unwrap()
    );
    assert_eq!(db.store.telemetry_key_count(id).await.unwrap(), 3);

    // Buckets.
    let mut q = read("temp");
    q.bucket = Some("1d".into());
    let buckets = f.devices.read_telemetry(&f.alice, id, q).await.unwrap();
    assert_eq!(buckets.buckets.unwrap().len(), 1);
    let mut q = read("temp");
    q.bucket = Some("1w".into());
    assert!(matches!(
        f.devices.read_telemetry(&f.alice, id, q).await,
        Err(DeviceError::Invalid("bucket", _, _))
    ));
}
both_backends!(telemetry_is_acknowledged_once_and_bad_batches_store_nothing);

async fn a_bad_batch_fails_alone_and_a_deactivated_owner_ends_its_devices_keys(db: &TestDb) {
    let f = fleet(db, config(|_| {})).await;
    let a = f
        .devices
        .register(&f.alice, sensor("a"), None, &ctx())
        .await
        .unwrap();
    let b = f
        .devices
        .register(&f.alice, sensor("b"), None, &ctx())
        .await
        .unwrap();
    let auth_a = f.devices.authenticate(&a.key).await.unwrap();
    let auth_b = f.devices.authenticate(&b.key).await.unwrap();
    // A NUL (which PostgreSQL cannot store) is refused before anything is written.
    match f
        .devices
        .telemetry(
            &auth_a,
            1,
            vec![point("mode", None, Value::Text("a\0b".into()))],
        )
        .await
    {
        Err(DeviceError::Invalid(_, code, _)) => assert_eq!(code, "invalid_value"),
        other => panic!("{other:?}"),
    }
    // A batch the store refuses (its device is gone) fails alone, whatever it was grouped with.
    db.store.delete_device(b.device.id).await.unwrap();
    let (first, second) = tokio::join!(
        f.devices
            .telemetry(&auth_a, 2, vec![point("temp", None, Value::Number(1.0))]),
        f.devices
            .telemetry(&auth_b, 2, vec![point("temp", None, Value::Number(1.0))]),
    );
    assert!(first.unwrap());
    assert!(matches!(second, Err(DeviceError::Store(_))), "{second:?}");
    assert!(!f.devices.still_valid(&auth_b).await);

    // An owner deactivated: their devices' keys stop working, for new and live connections.
    assert!(f.devices.still_valid(&auth_a).await);
    db.store
        .update_user(
            f.alice.user_id,
            unhidra_store::identity::UserChange {
                active: Some(false),
                ..Default::default()
            },
            start(),
        )
        .await
        .unwrap();
    assert!(!f.devices.still_valid(&auth_a).await);
    assert!(matches!(
        f.devices.authenticate(&a.key).await,
        Err(DeviceError::BadKey)
    ));
}
both_backends!(a_bad_batch_fails_alone_and_a_deactivated_owner_ends_its_devices_keys);

async fn commands_reach_the_device_and_configuration_its_difference(db: &TestDb) {
    use unhidra_devices::commands::NewCommand;
    use unhidra_protocol::DeviceServerFrame;
    use unhidra_protocol::device::CommandStatus;
    let f = fleet(db, config(|_| {})).await;
    let made = f
        .devices
        .register(&f.alice, sensor("a"), None, &ctx())
        .await
        .unwrap();
    let id = made.device.id;
    let auth = f.devices.authenticate(&made.key).await.unwrap();
    let reboot = |key: Option<&str>, ttl: Option<u64>| NewCommand {
        name: "reboot".into(),
        params: Some(serde_json::json!({ "delay": 5 })),
        ttl,
        idempotency_key: key.map(str::to_owned),
    };
    // Offline: queued, and delivered with the configuration on hello.
    let (queued, created) = f
        .devices
        .send_command(&f.alice, id, reboot(Some("r1"), None))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(queued.state, "queued");
    let (again, created) = f
        .devices
        .send_command(&f.alice, id, reboot(Some("r1"), None))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.id, queued.id);
    assert!(matches!(
        f.devices.send_command(&f.bob, id, reboot(None, None)).await,
        Err(DeviceError::NotFound(_))
    ));
    assert!(matches!(
        f.devices
            .send_command(&f.alice, id, reboot(None, Some(0)))
            .await,
        Err(DeviceError::Invalid("/ttl", _, _))
    ));
    f.devices
        .set_config(
            &f.alice,
            id,
            &serde_json::json!({ "rate": 10, "led": true }),
        )
        .await
        .unwrap();
    let mut outbound = f.devices.attach(&auth);
    let frames = f.devices.on_hello(&auth).await.unwrap();
    assert_eq!(frames.len(), 2);
    assert!(
        matches!(&frames[0], DeviceServerFrame::Config { version: 1, full: true, desired } if desired.len() == 2)
    );
    assert!(matches!(&frames[1], DeviceServerFrame::Command { name, .. } if name == "reboot"));
    assert_eq!(
        f.devices.command(&f.alice, queued.id).await.unwrap().state,
        "delivered"
    );

    // Online: delivered at once through the connection's channel.
    let (live, _) = f
        .devices
        .send_command(&f.alice, id, reboot(None, None))
        .await
        .unwrap();
    assert_eq!(live.state, "delivered");
    match outbound.rx.try_recv().unwrap() {
        DeviceServerFrame::Command {
            id: sent, params, ..
        } => {
            assert_eq!(sent, live.id.to_string());
            assert_eq!(params["delay"], 5);
        }
        other => panic!("{other:?}"),
    }
    // The result ends it, once; a stranger's id is refused.
    let waiter = {
        let devices = f.devices.clone();
        let who = f.alice.clone();
        let command = live.id;
        tokio::spawn(async move {
            devices
                .wait_command(&who, command, std::time::Duration::from_secs(10))
                .await
        })
    };
    tokio::task::yield_now().await;
    f.devices
        .command_result(
            &auth,
            &live.id.to_string(),
            CommandStatus::Succeeded,
            Some(&serde_json::json!({ "up": true })),
        )
        .await
        .unwrap();
    let done = waiter.await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.output.clone()),
        ("succeeded", Some(serde_json::json!({ "up": true })))
    );
    for unknown in [
        live.id.to_string(),
        Uuid::new_v4().to_string(),
        "nope".into(),
    ] {
        assert!(matches!(
            f.devices
                .command_result(&auth, &unknown, CommandStatus::Failed, None)
                .await,
            Err(DeviceError::Invalid(_, "unknown_command", _))
        ));
    }
    // Past its time, a command is expired, and the sweep writes it.
    let (short, _) = f
        .devices
        .send_command(&f.alice, id, reboot(None, Some(5)))
        .await
        .unwrap();
    assert!(matches!(
        outbound.rx.try_recv(),
        Ok(DeviceServerFrame::Command { .. })
    ));
    f.clock.advance(Duration::seconds(6));
    assert_eq!(
        f.devices.command(&f.alice, short.id).await.unwrap().state,
        "expired"
    );
    f.devices.sweep_commands().await.unwrap();
    assert_eq!(
        db.store.command(short.id).await.unwrap().state,
        unhidra_store::devices::CommandState::Expired
    );
    assert_eq!(
        f.devices.commands(&f.alice, id, None).await.unwrap().len(),
        3
    );

    // The device reports what it applied; the difference is what is left.
    let mut state = std::collections::BTreeMap::new();
    state.insert("rate".to_owned(), serde_json::json!(10));
    state.insert("old".to_owned(), serde_json::json!(1));
    f.devices.reported(&auth, Some(1), &state).await.unwrap();
    let config = f.devices.config(&f.alice, id).await.unwrap();
    assert!(!config.in_sync);
    assert_eq!(
        serde_json::to_value(&config.difference).unwrap(),
        serde_json::json!({ "led": true, "old": null })
    );
    // A new version reaches the connected device at once, as the difference.
    f.devices
        .set_config(&f.alice, id, &serde_json::json!({ "rate": 20 }))
        .await
        .unwrap();
    match outbound.rx.try_recv().unwrap() {
        DeviceServerFrame::Config {
            version,
            desired,
            full,
        } => {
            assert_eq!((version, full), (2, false));
            assert_eq!(
                serde_json::to_value(&desired).unwrap(),
                serde_json::json!({ "rate": 20, "old": null })
            );
        }
        other => panic!("{other:?}"),
    }
    let mut applied = std::collections::BTreeMap::new();
    applied.insert("rate".to_owned(), serde_json::json!(20));
    f.devices.reported(&auth, Some(2), &applied).await.unwrap();
    assert!(f.devices.config(&f.alice, id).await.unwrap().in_sync);
    assert!(matches!(
        f.devices
            .set_config(&f.alice, id, &serde_json::json!([1]))
            .await,
        Err(DeviceError::Invalid("/desired", _, _))
    ));
    f.devices.detach(&auth, &outbound);
}
both_backends!(commands_reach_the_device_and_configuration_its_difference);

fn token_for(model: &str, tags: &[&str], max_uses: u32) -> unhidra_devices::provision::NewToken {
    unhidra_devices::provision::NewToken {
        model: model.into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        max_uses: Some(max_uses),
        ttl: Some(3600),
        ..Default::default()
    }
}

fn claim_of(
    token: &str,
    hardware_id: &str,
    model: &str,
) -> unhidra_devices::provision::ClaimRequest {
    unhidra_devices::provision::ClaimRequest {
        token: token.into(),
        hardware_id: hardware_id.into(),
        model: model.into(),
        firmware: Some("1.0.0".into()),
        name: None,
    }
}

fn refusal(result: Result<unhidra_devices::provision::Claimed, DeviceError>) -> ClaimRefusal {
    match result {
        Err(DeviceError::Claim(why)) => why,
        other => panic!("expected a refused claim, got {other:?}"),
    }
}

async fn provisioning_tokens_are_claimed_once_and_a_reset_device_keeps_its_identity(db: &TestDb) {
    let f = fleet(db, config(|c| c.device_claims_per_hour = 1000)).await;
    let mut events = f.devices.events();
    let single = f
        .devices
        .create_token(
            &f.alice,
            token_for("esp32-s3", &["Lab", "floor-2"], 1),
            None,
            &ctx(),
        )
        .await
        .unwrap();
    assert!(single.secret.starts_with("unh_pt_"));
    let payload: serde_json::Value = serde_json::from_str(&single.qr_payload).unwrap();
    assert_eq!(payload["ver"], "v1");
    assert_eq!(payload["token"], single.secret.as_str());
    assert!(single.qr_svg.contains("<svg"));
    assert_eq!(single.token.tags, ["floor-2", "lab"]);
    assert!(single.token.usable);

    // A wrong model, a malformed or unknown token: refused, and no claim is used.
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of(&single.secret, "aa:01", "esp32-c3"), None, &ctx())
                .await
        ),
        ClaimRefusal::WrongModel("esp32-s3".into())
    );
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of("unh_pt_short", "aa:01", "esp32-s3"), None, &ctx())
                .await
        ),
        ClaimRefusal::Unknown
    );
    let unknown = unhidra_devices::ClaimToken::generate();
    assert_eq!(
        refusal(
            f.devices
                .claim(
                    claim_of(unknown.expose(), "aa:01", "esp32-s3"),
                    None,
                    &ctx()
                )
                .await
        ),
        ClaimRefusal::Unknown
    );
    assert_eq!(f.devices.tokens(&f.alice).await.unwrap()[0].uses, 0);

    // Two devices claim a single-use token at once: one gets it.
    let context = ctx();
    let (first, second) = tokio::join!(
        f.devices.claim(
            claim_of(&single.secret, "aa:01", "esp32-s3"),
            None,
            &context
        ),
        f.devices.claim(
            claim_of(&single.secret, "aa:02", "esp32-s3"),
            None,
            &context
        ),
    );
    let (claimed, lost) = match (first, second) {
        (Ok(c), Err(e)) | (Err(e), Ok(c)) => (c, e),
        other => panic!("exactly one claim wins: {other:?}"),
    };
    assert!(
        matches!(lost, DeviceError::Claim(ClaimRefusal::UsedUp)),
        "{lost:?}"
    );
    assert!(!claimed.reclaimed);
    assert!(claimed.key.starts_with("unh_dk_"));
    let device = f.devices.get(&f.alice, claimed.device.id).await.unwrap();
    assert_eq!(device.tags, ["floor-2", "lab"]);
    assert_eq!(device.firmware.as_deref(), Some("1.0.0"));
    assert_eq!(device.model, "esp32-s3");
    let auth = f.devices.authenticate(&claimed.key).await.unwrap();
    assert_eq!(auth.owner, Some(f.alice.user_id));
    let listed = f.devices.tokens(&f.alice).await.unwrap();
    assert_eq!((listed[0].uses, listed[0].usable), (1, false));

    // A multi-use token: a device that still has a usable key is not taken over by a claim of
    // its hardware id (nothing used); once its owner revoked its keys (a factory reset), it
    // claims again and keeps its identity.
    let multi = f
        .devices
        .create_token(&f.alice, token_for("esp32-s3", &["field"], 5), None, &ctx())
        .await
        .unwrap();
    let hw = claimed.device.hardware_id.clone().unwrap();
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of(&multi.secret, &hw, "esp32-s3"), None, &ctx())
                .await
        ),
        ClaimRefusal::NotReclaimable
    );
    assert!(f.devices.authenticate(&claimed.key).await.is_ok());
    f.devices
        .revoke(&f.alice, claimed.device.id, &ctx())
        .await
        .unwrap();
    let again = f
        .devices
        .claim(claim_of(&multi.secret, &hw, "esp32-s3"), None, &ctx())
        .await
        .unwrap();
    assert!(again.reclaimed);
    assert_eq!(again.device.id, claimed.device.id);
    assert_eq!(
        again.device.tags,
        ["floor-2", "lab"],
        "a reclaimed device keeps its tags"
    );
    assert!(matches!(
        f.devices.authenticate(&claimed.key).await,
        Err(DeviceError::BadKey)
    ));
    assert!(f.devices.authenticate(&again.key).await.is_ok());
    let mut revoked = false;
    while let Ok(event) = events.try_recv() {
        revoked |= event
            == FleetEvent::Revoked {
                device: claimed.device.id,
            };
    }
    assert!(revoked);

    // Hardware ids are unique per owner: Alice's device with this one neither blocks Bob's
    // claim nor is touched by it; Bob gets a device of his own.
    let bobs = f
        .devices
        .create_token(&f.bob, token_for("esp32-s3", &[], 3), None, &ctx())
        .await
        .unwrap();
    let bobs_device = f
        .devices
        .claim(claim_of(&bobs.secret, &hw, "esp32-s3"), None, &ctx())
        .await
        .unwrap();
    assert!(!bobs_device.reclaimed);
    assert_ne!(bobs_device.device.id, claimed.device.id);
    assert_eq!(f.devices.tokens(&f.bob).await.unwrap()[0].uses, 1);
    assert!(f.devices.authenticate(&again.key).await.is_ok());
    assert!(f.devices.authenticate(&bobs_device.key).await.is_ok());
    // Claimed again with his token while its key works, it is not taken over.
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of(&bobs.secret, &hw, "esp32-s3"), None, &ctx())
                .await
        ),
        ClaimRefusal::NotReclaimable
    );

    // Owners see and revoke their own tokens; admins all.
    assert_eq!(f.devices.tokens(&f.bob).await.unwrap().len(), 1);
    assert_eq!(f.devices.tokens(&f.admin).await.unwrap().len(), 3);
    assert!(matches!(
        f.devices.revoke_token(&f.bob, multi.token.id, &ctx()).await,
        Err(DeviceError::NotFound(_))
    ));
    f.devices
        .revoke_token(&f.alice, multi.token.id, &ctx())
        .await
        .unwrap();
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of(&multi.secret, "aa:09", "esp32-s3"), None, &ctx())
                .await
        ),
        ClaimRefusal::Unknown
    );

    // An expired token says so.
    f.clock.advance(Duration::seconds(3601));
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of(&bobs.secret, "bb:01", "esp32-s3"), None, &ctx())
                .await
        ),
        ClaimRefusal::Expired
    );

    // An admin makes a token for Bob: its devices are Bob's. Bob deactivated: it stops working.
    let for_bob = f
        .devices
        .create_token(
            &f.admin,
            unhidra_devices::provision::NewToken {
                owner: Some(f.bob.user_id.0),
                ..token_for("esp32-s3", &[], 2)
            },
            None,
            &ctx(),
        )
        .await
        .unwrap();
    assert_eq!(for_bob.token.owner, f.bob.user_id.0);
    let bobs_device = f
        .devices
        .claim(claim_of(&for_bob.secret, "bb:02", "esp32-s3"), None, &ctx())
        .await
        .unwrap();
    assert_eq!(
        f.devices
            .get(&f.bob, bobs_device.device.id)
            .await
            .unwrap()
            .name,
        "esp32-s3 bb:02"
    );
    assert!(matches!(
        f.devices
            .create_token(
                &f.alice,
                unhidra_devices::provision::NewToken {
                    owner: Some(f.bob.user_id.0),
                    ..token_for("esp32-s3", &[], 1)
                },
                None,
                &ctx(),
            )
            .await,
        Err(DeviceError::Forbidden(_))
    ));
    db.store
        .update_user(
            f.bob.user_id,
            unhidra_store::identity::UserChange {
                active: Some(false),
                ..Default::default()
            },
            start(),
        )
        .await
        .unwrap();
    assert_eq!(
        refusal(
            f.devices
                .claim(claim_of(&for_bob.secret, "bb:03", "esp32-s3"), None, &ctx())
                .await
        ),
        ClaimRefusal::Unknown
    );

    // Bad fields are refused with their pointer.
    for (new, field) in [
        (token_for("bad model", &[], 1), "/model"),
        (token_for("m", &[], 0), "/max_uses"),
        (
            unhidra_devices::provision::NewToken {
                ttl: Some(10),
                ..token_for("m", &[], 1)
            },
            "/ttl",
        ),
    ] {
        match f.devices.create_token(&f.alice, new, None, &ctx()).await {
            Err(DeviceError::Invalid(got, ..)) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}
both_backends!(provisioning_tokens_are_claimed_once_and_a_reset_device_keeps_its_identity);

async fn claims_are_limited_per_address(db: &TestDb) {
    let f = fleet(db, config(|c| c.device_claims_per_hour = 2)).await;
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let unknown = unhidra_devices::ClaimToken::generate();
    for _ in 0..2 {
        assert_eq!(
            refusal(
                f.devices
                    .claim(claim_of(unknown.expose(), "cc:01", "m"), Some(ip), &ctx())
                    .await
            ),
            ClaimRefusal::Unknown
        );
    }
    assert!(matches!(
        f.devices
            .claim(claim_of(unknown.expose(), "cc:01", "m"), Some(ip), &ctx())
            .await,
        Err(DeviceError::RateLimited {
            scope: "claims",
            ..
        })
    ));
}
both_backends!(claims_are_limited_per_address);

async fn only_failed_key_attempts_count_against_an_address(db: &TestDb) {
    let f = fleet(db, config(|c| c.device_auth_failures_per_minute = 2)).await;
    let made = f
        .devices
        .register(&f.alice, sensor("d"), None, &ctx())
        .await
        .unwrap();
    let ip: std::net::IpAddr = "198.51.100.4".parse().unwrap();
    let elsewhere: std::net::IpAddr = "198.51.100.5".parse().unwrap();
    for _ in 0..5 {
        f.devices
            .authenticate_from(&made.key, Some(ip))
            .await
            .unwrap();
    }
    let wrong = unhidra_devices::DeviceKey::generate();
    for _ in 0..2 {
        assert!(matches!(
            f.devices.authenticate_from(wrong.expose(), Some(ip)).await,
            Err(DeviceError::BadKey)
        ));
    }
    // Past the limit a wrong key is refused as limited; a good one still passes.
    assert!(matches!(
        f.devices.authenticate_from(wrong.expose(), Some(ip)).await,
        Err(DeviceError::RateLimited { .. })
    ));
    f.devices
        .authenticate_from(&made.key, Some(ip))
        .await
        .unwrap();
    assert!(matches!(
        f.devices
            .authenticate_from(wrong.expose(), Some(elsewhere))
            .await,
        Err(DeviceError::BadKey)
    ));
    f.clock.advance(Duration::seconds(61));
    assert!(matches!(
        f.devices.authenticate_from(wrong.expose(), Some(ip)).await,
        Err(DeviceError::BadKey)
    ));
}
both_backends!(only_failed_key_attempts_count_against_an_address);

async fn device_events_are_stored_read_by_their_owner_and_told_live(db: &TestDb) {
    let f = fleet(db, config(|c| c.device_events_per_minute = 3)).await;
    let made = f
        .devices
        .register(&f.alice, sensor("d"), None, &ctx())
        .await
        .unwrap();
    let id = made.device.id;
    let auth = f.devices.authenticate(&made.key).await.unwrap();
    let mut live = f.devices.events();
    f.devices
        .hello_event(&auth, "1.2.0", Some("ota_0"), Some("brownout"))
        .await
        .unwrap();
    f.devices
        .event(&auth, "door", &serde_json::json!({ "open": true }))
        .await
        .unwrap();
    f.devices
        .event(&auth, "door", &serde_json::json!({ "open": false }))
        .await
        .unwrap();
    // Bad events are refused with their field, and store nothing.
    for (kind, data, field) in [
        ("bad kind", serde_json::Value::Null, "/kind"),
        ("blob", serde_json::json!("x".repeat(5000)), "/data"),
    ] {
        match f.devices.event(&auth, kind, &data).await {
            Err(DeviceError::Invalid(got, ..)) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    f.devices
        .event(&auth, "tick", &serde_json::Value::Null)
        .await
        .unwrap();
    assert!(matches!(
        f.devices
            .event(&auth, "tick", &serde_json::Value::Null)
            .await,
        Err(DeviceError::RateLimited {
            scope: "events",
            ..
        })
    ));

    let all = f
        .devices
        .events_of(&f.alice, id, &Default::default())
        .await
        .unwrap();
    let kinds: Vec<&str> = all.items.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["tick", "door", "door", "hello"], "newest first");
    assert_eq!(all.items[3].data["reset_reason"], "brownout");
    assert_eq!(all.items[1].data, serde_json::json!({ "open": false }));
    let doors = f
        .devices
        .events_of(
            &f.admin,
            id,
            &unhidra_devices::events::EventQuery {
                kind: Some("door".into()),
                limit: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(doors.items.len(), 1);
    let older = f
        .devices
        .events_of(
            &f.admin,
            id,
            &unhidra_devices::events::EventQuery {
                kind: Some("door".into()),
                before: doors.next_before,
                limit: Some(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(older.items[0].data, serde_json::json!({ "open": true }));
    assert!(matches!(
        f.devices.events_of(&f.bob, id, &Default::default()).await,
        Err(DeviceError::NotFound(_))
    ));
    let mut told = 0;
    while let Ok(event) = live.try_recv() {
        if let FleetEvent::Device {
            owner,
            device_event,
        } = event
        {
            assert_eq!((owner, device_event.device), (Some(f.alice.user_id), id));
            told += 1;
        }
    }
    assert_eq!(told, 4);

    // Retention takes events with old telemetry.
    let later = start() + Duration::days(2);
    assert!(db.store.prune_telemetry(later, 2).await.unwrap() >= 2);
    db.store.prune_telemetry(later, 10).await.unwrap();
    let left = f
        .devices
        .events_of(&f.alice, id, &Default::default())
        .await
        .unwrap();
    assert!(left.items.is_empty());
}
both_backends!(device_events_are_stored_read_by_their_owner_and_told_live);

async fn a_devices_telemetry_bytes_are_budgeted_per_day(db: &TestDb) {
    // Three numbers under `temp` cost 3 × (24 + 4 + 8) = 108 bytes.
    let f = fleet(db, config(|c| c.telemetry_bytes_per_day = 200)).await;
    let made = f
        .devices
        .register(&f.alice, sensor("d"), None, &ctx())
        .await
        .unwrap();
    let auth = f.devices.authenticate(&made.key).await.unwrap();
    let batch = |n: i64| {
        (0..3)
            .map(|i| {
                point(
                    "temp",
                    Some(start().timestamp_millis() - n * 10 - i),
                    Value::Number(1.0),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(f.devices.telemetry(&auth, 1, batch(1)).await.unwrap());
    // A repeated batch is acknowledged again and costs nothing.
    assert!(!f.devices.telemetry(&auth, 1, batch(1)).await.unwrap());
    match f.devices.telemetry(&auth, 2, batch(2)).await {
        Err(DeviceError::RateLimited { retry_after, .. }) => {
            assert!((1..=86_400).contains(&retry_after), "{retry_after}");
        }
        other => panic!("{other:?}"),
    }
    let stored = f
        .devices
        .read_telemetry(
            &f.alice,
            made.device.id,
            ReadQuery {
                key: "temp".into(),
                from: None,
                to: None,
                limit: None,
                cursor: None,
                bucket: None,
                agg: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        stored.points.unwrap().len(),
        3,
        "nothing of the refused batch"
    );
    // The next day the budget is whole again.
    f.clock.advance(Duration::days(1));
    let tomorrow = vec![point("temp", None, Value::Number(2.0))];
    assert!(f.devices.telemetry(&auth, 3, tomorrow).await.unwrap());
}
both_backends!(a_devices_telemetry_bytes_are_budgeted_per_day);

async fn telemetry_budgets_hold_across_nodes_and_for_an_owners_devices_together(db: &TestDb) {
    // Each batch below costs 108 bytes (three numbers under `temp`).
    let limits = |c: &mut Config| {
        c.telemetry_bytes_per_day = 200;
        c.telemetry_bytes_per_owner_per_day = 300;
    };
    let f = fleet(db, config(limits)).await;
    // A second node on the same database.
    let other = service(db, &f.clock, config(limits));
    let mut auths = Vec::new();
    for name in ["d1", "d2", "d3"] {
        let made = f
            .devices
            .register(&f.alice, sensor(name), None, &ctx())
            .await
            .unwrap();
        auths.push(f.devices.authenticate(&made.key).await.unwrap());
    }
    let batch = |n: i64| {
        (0..3)
            .map(|i| {
                point(
                    "temp",
                    Some(start().timestamp_millis() - n * 10 - i),
                    Value::Number(1.0),
                )
            })
            .collect::<Vec<_>>()
    };
    let scope = |r: Result<bool, DeviceError>| match r {
        Err(DeviceError::RateLimited { scope, .. }) => scope,
        other => panic!("{other:?}"),
    };
    // The device's budget counts what it stored through either node.
    assert!(f.devices.telemetry(&auths[0], 1, batch(1)).await.unwrap());
    assert!(
        scope(other.telemetry(&auths[0], 2, batch(2)).await).contains("telemetry_bytes_per_day")
    );
    // The owner's devices share theirs: 108 + 108 fit in 300, a third batch does not.
    assert!(other.telemetry(&auths[1], 1, batch(3)).await.unwrap());
    assert!(
        scope(f.devices.telemetry(&auths[2], 1, batch(4)).await)
            .contains("telemetry_bytes_per_owner_per_day")
    );
    // Bob's devices have a budget of their own.
    let bobs = f
        .devices
        .register(&f.bob, sensor("b1"), None, &ctx())
        .await
        .unwrap();
    let bob = f.devices.authenticate(&bobs.key).await.unwrap();
    assert!(other.telemetry(&bob, 1, batch(5)).await.unwrap());
}
both_backends!(telemetry_budgets_hold_across_nodes_and_for_an_owners_devices_together);
