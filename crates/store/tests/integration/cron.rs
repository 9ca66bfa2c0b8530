//! Cron schedules on both backends: storing and replacing (what keeps the next tick), listing,
//! deleting, and the claim of a tick — of concurrent claimers exactly one moves it and enqueues.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use unhidra_store::cron::{CatchUp, NewCronSchedule, TickClaim};
use unhidra_store::jobs::{Enqueued, JobFilter, JobState, NewJob, UniqueStates};
use unhidra_store::testing::TestDb;
use unhidra_store::{StoreError, both_backends};
use uuid::Uuid;

/// A whole minute both engines store exactly.
fn minute(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 / 60 * 60 + n * 60, 0).unwrap()
}

fn schedule(name: &str, expression: &str, next: DateTime<Utc>) -> NewCronSchedule {
    NewCronSchedule {
        name: name.to_owned(),
        expression: expression.to_owned(),
        time_zone: "UTC".to_owned(),
        kind: "report".to_owned(),
        payload: r#"{"n":1}"#.to_owned(),
        catch_up: CatchUp::Once,
        enabled: true,
        next_tick_at: next,
        now: minute(0),
    }
}

/// The job of tick `tick` of `name`, as the jobs service makes it.
fn tick_job(name: &str, tick: DateTime<Utc>) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        kind: "report".to_owned(),
        queue: "default".to_owned(),
        payload: r#"{"n":1}"#.to_owned(),
        priority: 0,
        run_at: tick,
        max_attempts: 3,
        timeout_ms: 30_000,
        unique_key: Some(format!("cron:{name}:{}", tick.to_rfc3339())),
        unique_states: UniqueStates::of(&JobState::ALL),
        concurrency_key: None,
        concurrency_limit: 0,
        trace_id: None,
        created_at: tick,
    }
}

async fn stored_jobs(db: &TestDb) -> usize {
    db.store
        .list_jobs(&JobFilter::default(), 100, 0)
        .await
        .unwrap()
        .len()
}

async fn schedules_are_stored_replaced_listed_and_deleted(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &db.store;
    let (first, created) = store
        .put_cron_schedule(&schedule("b-report", "*/5 * * * *", minute(5)))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first.next_tick_at, minute(5));
    assert_eq!(first.catch_up, CatchUp::Once);
    assert!(first.enabled);
    assert_eq!(first.last_tick_at, None);
    assert_eq!(first.created_at, minute(0));
    store
        .put_cron_schedule(&schedule("a-report", "0 * * * *", minute(60)))
        .await
        .unwrap();

    // The same schedule stored again, later and with another first tick, changes nothing: a
    // tick that is due stays due.
    let again = NewCronSchedule {
        next_tick_at: minute(10),
        now: minute(7),
        ..schedule("b-report", "*/5 * * * *", minute(10))
    };
    let (same, created) = store.put_cron_schedule(&again).await.unwrap();
    assert!(!created);
    assert_eq!(same, first);

    // Another payload keeps the ticks and says when it changed.
    let (changed, _) = store
        .put_cron_schedule(&NewCronSchedule {
            payload: r#"{"n":2}"#.to_owned(),
            ..again.clone()
        })
        .await
        .unwrap();
    assert_eq!(changed.next_tick_at, minute(5));
    assert_eq!(changed.updated_at, minute(7));
    assert_eq!(changed.created_at, minute(0));

    // Another expression, or a schedule enabled again, starts from the given tick.
    let (moved, _) = store
        .put_cron_schedule(&NewCronSchedule {
            expression: "*/10 * * * *".to_owned(),
            ..again.clone()
        })
        .await
        .unwrap();
    assert_eq!(moved.next_tick_at, minute(10));
    store
        .put_cron_schedule(&NewCronSchedule {
            enabled: false,
            ..schedule("b-report", "*/10 * * * *", minute(10))
        })
        .await
        .unwrap();
    let (enabled, _) = store
        .put_cron_schedule(&schedule("b-report", "*/10 * * * *", minute(20)))
        .await
        .unwrap();
    assert_eq!(enabled.next_tick_at, minute(20));

    let names: Vec<String> = store
        .cron_schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["a-report", "b-report"]);
    assert_eq!(store.cron_schedule("b-report").await.unwrap(), enabled);

    store.delete_cron_schedule("a-report").await.unwrap();
    assert!(matches!(
        store.delete_cron_schedule("a-report").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.cron_schedule("a-report").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.cron_schedules().await.unwrap().len(), 1);
}
both_backends!(schedules_are_stored_replaced_listed_and_deleted);

async fn a_claimed_tick_moves_on_and_enqueues_in_one_step(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &db.store;
    store
        .put_cron_schedule(&schedule("report", "* * * * *", minute(1)))
        .await
        .unwrap();
    let claim = store
        .claim_cron_tick(
            "report",
            minute(1),
            minute(2),
            Some((minute(1), &tick_job("report", minute(1)))),
        )
        .await
        .unwrap();
    let TickClaim::Enqueued(enqueued) = claim else {
        panic!("the tick's job");
    };
    let Enqueued::New(job) = *enqueued else {
        panic!("a new job");
    };
    assert_eq!(
        job.unique_key.as_deref(),
        Some(&*format!("cron:report:{}", minute(1).to_rfc3339()))
    );
    let stored = store.cron_schedule("report").await.unwrap();
    assert_eq!(stored.next_tick_at, minute(2));
    assert_eq!(stored.last_tick_at, Some(minute(1)));

    // A claim of the tick that moved already changes nothing.
    let late = store
        .claim_cron_tick(
            "report",
            minute(1),
            minute(2),
            Some((minute(1), &tick_job("report", minute(1)))),
        )
        .await
        .unwrap();
    assert_eq!(late, TickClaim::Lost);

    // A skipped catch-up moves on without a job, keeping the last tick that ran.
    let skipped = store
        .claim_cron_tick("report", minute(2), minute(9), None)
        .await
        .unwrap();
    assert_eq!(skipped, TickClaim::Moved);
    let stored = store.cron_schedule("report").await.unwrap();
    assert_eq!(stored.next_tick_at, minute(9));
    assert_eq!(stored.last_tick_at, Some(minute(1)));
    assert_eq!(stored_jobs(db).await, 1);

    // A tick whose job exists (the schedule was set back by hand) is absorbed by its key.
    store
        .put_cron_schedule(&schedule("report", "*/1 * * * *", minute(1)))
        .await
        .unwrap();
    let again = store
        .claim_cron_tick(
            "report",
            minute(1),
            minute(2),
            Some((minute(1), &tick_job("report", minute(1)))),
        )
        .await
        .unwrap();
    assert!(
        matches!(&again, TickClaim::Enqueued(e) if matches!(&**e, Enqueued::Existing(j) if j.id == job.id)),
        "{again:?}"
    );
    assert_eq!(stored_jobs(db).await, 1);

    // A disabled or deleted schedule is never claimed.
    store
        .put_cron_schedule(&NewCronSchedule {
            enabled: false,
            ..schedule("report", "*/1 * * * *", minute(2))
        })
        .await
        .unwrap();
    let disabled = store
        .claim_cron_tick("report", minute(2), minute(3), None)
        .await
        .unwrap();
    assert_eq!(disabled, TickClaim::Lost);
    store.delete_cron_schedule("report").await.unwrap();
    let gone = store
        .claim_cron_tick("report", minute(2), minute(3), None)
        .await
        .unwrap();
    assert_eq!(gone, TickClaim::Lost);
}
both_backends!(a_claimed_tick_moves_on_and_enqueues_in_one_step);

/// Nodes with pools of their own claim the same tick at once, many times over: each tick is
/// won once and has one job.
async fn concurrent_claimers_of_one_tick_enqueue_one_job(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let other = db.another_handle().await;
    db.store
        .put_cron_schedule(&schedule("report", "* * * * *", minute(1)))
        .await
        .unwrap();
    let stores = [Arc::clone(&db.store), Arc::clone(&other.store)];
    for tick in 1..=10 {
        let claims: Vec<_> = (0..4)
            .map(|i| {
                let store = Arc::clone(&stores[i % 2]);
                tokio::spawn(async move {
                    let job = tick_job("report", minute(tick));
                    store
                        .claim_cron_tick(
                            "report",
                            minute(tick),
                            minute(tick + 1),
                            Some((minute(tick), &job)),
                        )
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut won = 0;
        for claim in claims {
            match claim.await.unwrap() {
                TickClaim::Enqueued(e) if matches!(*e, Enqueued::New(_)) => won += 1,
                TickClaim::Lost => {}
                other => panic!("tick {tick}: {other:?}"),
            }
        }
        assert_eq!(won, 1, "tick {tick} is won once");
    }
    assert_eq!(stored_jobs(db).await, 10);
    other.store.close().await;
}
both_backends!(concurrent_claimers_of_one_tick_enqueue_one_job);
