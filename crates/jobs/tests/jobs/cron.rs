//! Cron schedules over a real store, with a manual clock: a tick runs once however many nodes
//! are up, ticks missed while every node was down run once or are skipped as the schedule
//! says, and bad schedules are refused with nothing stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use tokio::sync::watch;
use unhidra_core::{Clock, ManualClock};
use unhidra_jobs::{CatchUp, CronSpec, Jobs, JobsConfig, JobsError, Workers};
use unhidra_store::Backend;
use unhidra_store::jobs::{JobFilter, JobRecord};
use unhidra_store::testing::TestDb;

use super::{Flaky, Shared, options};

fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, h, m, s).unwrap()
}

/// Moves the clock forward to `to`.
fn move_to(clock: &ManualClock, to: DateTime<Utc>) {
    clock.advance(to - clock.now());
}

fn spec(name: &str, expression: &str, catch_up: CatchUp) -> CronSpec {
    CronSpec {
        name: name.to_owned(),
        expression: expression.to_owned(),
        time_zone: "Europe/Berlin".to_owned(),
        kind: "report".to_owned(),
        payload: json!({ "report": name }),
        catch_up,
        enabled: true,
    }
}

/// A node: a job system on `store` running the `report` kind, its workers polling often.
fn node(
    store: Arc<dyn unhidra_store::Store>,
    clock: &Arc<ManualClock>,
    ran: &Arc<Flaky>,
) -> Arc<Jobs> {
    Jobs::builder(
        store,
        clock.clone() as Arc<dyn Clock>,
        JobsConfig {
            queues: vec![("default".to_owned(), 2)],
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(10),
            ..JobsConfig::default()
        },
    )
    .register("report", Shared(Arc::clone(ran)), options(1))
    .build()
}

async fn stop(stop: &watch::Sender<bool>, workers: Vec<Workers>) {
    stop.send_replace(true);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(10), w.stopped())
            .await
            .unwrap();
    }
}

/// Every job, oldest first.
async fn jobs_of(db: &TestDb) -> Vec<JobRecord> {
    let mut jobs = db
        .store
        .list_jobs(&JobFilter::default(), 200, 0)
        .await
        .unwrap();
    jobs.reverse();
    jobs
}

/// Waits (at most 10 s) until `ran` counted `n` runs.
async fn until_runs(ran: &Flaky, n: u32) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while ran.calls.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("run {n} did not come"));
}

/// Waits (at most 10 s) until the schedule `name` ticks next at `next`.
async fn until_next_tick(jobs: &Jobs, name: &str, next: DateTime<Utc>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let schedules = jobs.cron_schedules().await.unwrap();
            if schedules
                .iter()
                .any(|s| s.name == name && s.next_tick_at == next)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} does not tick next at {next}"));
}

/// Three nodes on one database, each with its scheduler: every tick runs once.
async fn a_cron_tick_fires_once_with_several_nodes(backend: Backend) {
    let ran = Arc::new(Flaky::default());
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let (second, third) = (db.another_handle().await, db.another_handle().await);
    let clock = Arc::new(ManualClock::new(at(12, 0, 0)));
    let nodes = [
        node(db.store.clone(), &clock, &ran),
        node(second.store.clone(), &clock, &ran),
        node(third.store.clone(), &clock, &ran),
    ];
    let (stored, created) = nodes[0]
        .put_cron(&spec("every-minute", "* * * * *", CatchUp::Once))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(stored.next_tick_at, at(12, 1, 0));
    let (halt, shutdown) = watch::channel(false);
    let workers: Vec<Workers> = nodes.iter().map(|n| n.start(shutdown.clone())).collect();
    for round in 1..=3 {
        // Nothing before the tick.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ran.calls.load(Ordering::SeqCst), round - 1);
        clock.advance(chrono::Duration::seconds(60));
        until_runs(&ran, round).await;
        // Every node polls the clock every 10 ms and saw the tick due: still one run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ran.calls.load(Ordering::SeqCst), round, "one run per tick");
    }
    let keys: Vec<String> = jobs_of(&db)
        .await
        .into_iter()
        .map(|j| j.unique_key.unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "cron:every-minute:2026-12-01T12:01:00Z",
            "cron:every-minute:2026-12-01T12:02:00Z",
            "cron:every-minute:2026-12-01T12:03:00Z",
        ]
    );
    let schedule = nodes[2].cron_schedules().await.unwrap().remove(0);
    assert_eq!(schedule.last_tick_at, Some(at(12, 3, 0)));
    assert_eq!(schedule.next_tick_at, at(12, 4, 0));
    stop(&halt, workers).await;
}
on_both!(a_cron_tick_fires_once_with_several_nodes);

/// Every node is down over many ticks: on return, `once` runs the latest tick missed and
/// `skip` none, and both go on from the next tick; a tick run a little late is no catch-up.
async fn missed_ticks_run_once_or_are_skipped_as_the_schedule_says(backend: Backend) {
    let ran = Arc::new(Flaky::default());
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let clock = Arc::new(ManualClock::new(at(12, 0, 0)));
    let jobs = node(db.store.clone(), &clock, &ran);
    jobs.put_cron(&spec("catch-once", "*/5 * * * *", CatchUp::Once))
        .await
        .unwrap();
    jobs.put_cron(&spec("catch-skip", "*/5 * * * *", CatchUp::Skip))
        .await
        .unwrap();
    // Down from 12:00 to 13:02:30: twelve ticks of each passed.
    move_to(&clock, at(13, 2, 30));
    let (halt, shutdown) = watch::channel(false);
    let workers = vec![jobs.start(shutdown)];
    until_next_tick(&jobs, "catch-once", at(13, 5, 0)).await;
    until_next_tick(&jobs, "catch-skip", at(13, 5, 0)).await;
    until_runs(&ran, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys: Vec<String> = jobs_of(&db)
        .await
        .into_iter()
        .map(|j| j.unique_key.unwrap())
        .collect();
    // 13:00 UTC is 14:00 in Berlin; ticks are kept in UTC.
    assert_eq!(keys, ["cron:catch-once:2026-12-01T13:00:00Z"]);
    assert_eq!(ran.calls.load(Ordering::SeqCst), 1);

    // From there on both tick, even a little late.
    move_to(&clock, at(13, 6, 0));
    until_runs(&ran, 3).await;
    until_next_tick(&jobs, "catch-skip", at(13, 10, 0)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys: Vec<String> = jobs_of(&db)
        .await
        .into_iter()
        .filter_map(|j| j.unique_key)
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.contains(&"cron:catch-skip:2026-12-01T13:05:00Z".to_owned()));
    assert!(keys.contains(&"cron:catch-once:2026-12-01T13:05:00Z".to_owned()));
    stop(&halt, workers).await;

    // A schedule stored again while its tick is due keeps it (a restart loses nothing), and
    // a disabled one does not tick.
    move_to(&clock, at(13, 12, 0));
    jobs.put_cron(&spec("catch-once", "*/5 * * * *", CatchUp::Once))
        .await
        .unwrap();
    jobs.put_cron(&CronSpec {
        enabled: false,
        ..spec("catch-skip", "*/5 * * * *", CatchUp::Skip)
    })
    .await
    .unwrap();
    let (halt, shutdown) = watch::channel(false);
    let workers = vec![jobs.start(shutdown)];
    until_next_tick(&jobs, "catch-once", at(13, 15, 0)).await;
    until_runs(&ran, 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys: Vec<String> = jobs_of(&db)
        .await
        .into_iter()
        .filter_map(|j| j.unique_key)
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(keys[3], "cron:catch-once:2026-12-01T13:10:00Z");
    stop(&halt, workers).await;
}
on_both!(missed_ticks_run_once_or_are_skipped_as_the_schedule_says);

async fn bad_schedules_are_refused_and_store_nothing(backend: Backend) {
    let ran = Arc::new(Flaky::default());
    let db = TestDb::new(backend).await;
    db.store.migrate().await.unwrap();
    let clock = Arc::new(ManualClock::new(at(12, 0, 0)));
    let jobs = node(db.store.clone(), &clock, &ran);
    let good = spec("nightly", "0 3 * * *", CatchUp::Once);
    for expression in [
        "0 3 * *",
        "0 0 3 * * *",
        "@daily",
        "0 3 L * *",
        "0 25 * * *",
    ] {
        let refused = jobs
            .put_cron(&CronSpec {
                expression: expression.to_owned(),
                ..good.clone()
            })
            .await;
        assert!(
            matches!(
                refused,
                Err(JobsError::Invalid("expression", "invalid_cron", _))
            ),
            "{expression}: {refused:?}"
        );
    }
    let refused = jobs
        .put_cron(&CronSpec {
            time_zone: "Europe/Atlantis".to_owned(),
            ..good.clone()
        })
        .await;
    assert!(matches!(
        refused,
        Err(JobsError::Invalid("time_zone", "unknown_time_zone", _))
    ));
    let refused = jobs
        .put_cron(&CronSpec {
            kind: "no-such-kind".to_owned(),
            ..good.clone()
        })
        .await;
    assert!(matches!(refused, Err(JobsError::UnknownKind(k)) if k == "no-such-kind"));
    for name in ["", "with space", &"x".repeat(101)] {
        let refused = jobs
            .put_cron(&CronSpec {
                name: name.to_owned(),
                ..good.clone()
            })
            .await;
        assert!(
            matches!(refused, Err(JobsError::Invalid("name", "invalid", _))),
            "{name:?}"
        );
    }
    let refused = jobs
        .put_cron(&CronSpec {
            payload: json!({ "blob": "x".repeat(70 * 1024) }),
            ..good.clone()
        })
        .await;
    assert!(matches!(
        refused,
        Err(JobsError::Invalid("payload", "too_large", _))
    ));
    assert!(jobs.cron_schedules().await.unwrap().is_empty());

    // A schedule of the configuration is not the API's to change.
    jobs.put_configured_cron(&good).await.unwrap();
    let refused = jobs.put_cron(&good).await;
    assert!(matches!(refused, Err(JobsError::Configured(n)) if n == "nightly"));
    assert!(matches!(
        jobs.delete_cron("nightly").await,
        Err(JobsError::Configured(_))
    ));
    assert!(matches!(
        jobs.delete_cron("unknown").await,
        Err(JobsError::NotFound)
    ));
    assert_eq!(jobs.cron_schedules().await.unwrap().len(), 1);
    assert!(jobs_of(&db).await.is_empty());
}
on_both!(bad_schedules_are_refused_and_store_nothing);
