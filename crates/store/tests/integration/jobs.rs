//! The job queue on both backends: unique keys, claims (order, batches, concurrency, keys),
//! attempts' ends, rescue, leases, the dead-letter actions, the admin listing and pruning, and
//! the wake-up listener on PostgreSQL.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use unhidra_store::jobs::{
    AttemptOutcome, AttemptRecord, Claim, Enqueued, Finish, Finished, JobCount, JobFilter,
    JobRecord, JobState, NewJob, UniqueStates,
};
use unhidra_store::testing::TestDb;
use unhidra_store::{Backend, Store, StoreError, both_backends};
use uuid::Uuid;

/// A time both engines store exactly (microseconds).
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

fn new_job(kind: &str, at: DateTime<Utc>) -> NewJob {
    NewJob {
        id: Uuid::new_v4(),
        kind: kind.to_owned(),
        queue: "default".to_owned(),
        payload: "{}".to_owned(),
        priority: 1,
        run_at: at,
        max_attempts: 3,
        timeout_ms: 30_000,
        unique_key: None,
        unique_states: UniqueStates::DEFAULT,
        concurrency_key: None,
        concurrency_limit: 1,
        trace_id: None,
        created_at: at,
    }
}

async fn enqueue(store: &dyn Store, job: &NewJob) -> JobRecord {
    match store.enqueue_job(job).await.unwrap() {
        Enqueued::New(stored) => stored,
        Enqueued::Existing(other) => panic!("{} is held by {other:?}", job.id),
    }
}

async fn claim(store: &dyn Store, limit: u32, worker: &str, now: DateTime<Utc>) -> Vec<JobRecord> {
    store
        .claim_jobs("default", limit, worker, now, now + secs(30))
        .await
        .unwrap()
}

fn ended(job: &JobRecord, finish: Finish) -> Finished {
    Finished {
        id: job.id,
        attempt: job.attempt,
        worker: job.leased_by.clone().unwrap(),
        started_at: job.run_at,
        finish,
    }
}

async fn finish(
    store: &dyn Store,
    job: &JobRecord,
    finish: Finish,
    now: DateTime<Utc>,
) -> JobRecord {
    let mut stored = store.finish_jobs(&[ended(job, finish)], now).await.unwrap();
    assert_eq!(stored.len(), 1, "the end of {job:?} was recorded");
    stored.remove(0)
}

fn discard(error: &str) -> Finish {
    Finish::Discard {
        error: error.to_owned(),
        outcome: AttemptOutcome::Discarded,
    }
}

fn ids(jobs: &[JobRecord]) -> Vec<Uuid> {
    jobs.iter().map(|j| j.id).collect()
}

async fn unique_keys_return_the_job_holding_them(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let keyed = |key: &str, states: UniqueStates| NewJob {
        unique_key: Some(key.to_owned()),
        unique_states: states,
        ..new_job("mail", t)
    };

    // The default: the key counts until the job is discarded or cancelled.
    let first = enqueue(store, &keyed("k", UniqueStates::DEFAULT)).await;
    let again = store
        .enqueue_job(&keyed("k", UniqueStates::DEFAULT))
        .await
        .unwrap();
    assert_eq!(again, Enqueued::Existing(first.clone()));
    let running = claim(store, 1, "w", t).await.remove(0);
    let done = finish(store, &running, Finish::Completed, t).await;
    assert!(matches!(
        store.enqueue_job(&keyed("k", UniqueStates::DEFAULT)).await.unwrap(),
        Enqueued::Existing(held) if held.id == first.id && held.state == JobState::Completed
    ));
    assert_eq!(done.state, JobState::Completed);

    // A discarded job frees the key under the default mask.
    let dead = enqueue(store, &keyed("d", UniqueStates::DEFAULT)).await;
    let running = claim(store, 1, "w", t).await.remove(0);
    assert_eq!(running.id, dead.id);
    finish(store, &running, discard("broken"), t).await;
    let successor = enqueue(store, &keyed("d", UniqueStates::DEFAULT)).await;
    // Retrying the dead one would hold the key twice.
    assert!(matches!(
        store.retry_job(dead.id, t).await,
        Err(StoreError::Conflict { entity: "job", .. })
    ));
    // A cancelled one frees it too.
    store.cancel_job(successor.id, t).await.unwrap();
    enqueue(store, &keyed("d", UniqueStates::DEFAULT)).await;

    // UNFINISHED frees the key once the job completed.
    let once = enqueue(store, &keyed("u", UniqueStates::UNFINISHED)).await;
    let running = claim(store, 10, "w", t).await;
    let running = running.iter().find(|j| j.id == once.id).unwrap();
    finish(store, running, Finish::Completed, t).await;
    enqueue(store, &keyed("u", UniqueStates::UNFINISHED)).await;

    // A mask that lets a waiting job lose its key and find it taken later is refused.
    assert!(matches!(
        store
            .enqueue_job(&keyed("x", UniqueStates::of(&[JobState::Running])))
            .await,
        Err(StoreError::Invalid(_))
    ));
    // Without a unique key the mask does not matter, and the same id is a conflict.
    let plain = NewJob {
        unique_states: UniqueStates(0),
        ..new_job("mail", t)
    };
    enqueue(store, &plain).await;
    assert!(matches!(
        store.enqueue_job(&plain).await,
        Err(StoreError::Conflict { entity: "job", .. })
    ));
}
both_backends!(unique_keys_return_the_job_holding_them);

async fn a_batch_enqueue_stores_each_job_as_a_single_one_would(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let keyed = |key: &str| NewJob {
        unique_key: Some(key.to_owned()),
        ..new_job("k", t)
    };
    let held = enqueue(store, &keyed("held")).await;
    let later = NewJob {
        run_at: t + secs(60),
        ..new_job("k", t)
    };
    let batch = [
        new_job("k", t),
        keyed("held"),
        keyed("new"),
        keyed("new"),
        later.clone(),
    ];
    let enqueued = store.enqueue_jobs(&batch).await.unwrap();
    assert_eq!(enqueued.len(), 5);
    let Enqueued::New(first) = &enqueued[0] else {
        panic!("{:?}", enqueued[0]);
    };
    assert_eq!((first.id, first.state), (batch[0].id, JobState::Available));
    // A key held before the batch, or by a job before it in the batch, answers that job.
    assert_eq!(
        enqueued[1],
        Enqueued::Existing(store.job(held.id).await.unwrap().0)
    );
    let Enqueued::New(new) = &enqueued[2] else {
        panic!("{:?}", enqueued[2]);
    };
    assert_eq!(new.id, batch[2].id);
    assert_eq!(enqueued[3], Enqueued::Existing(new.clone()));
    let Enqueued::New(scheduled) = &enqueued[4] else {
        panic!("{:?}", enqueued[4]);
    };
    assert_eq!(
        (scheduled.id, scheduled.state),
        (later.id, JobState::Scheduled)
    );
    assert_eq!(store.count_jobs(&JobFilter::default()).await.unwrap(), 4);
    // One job refused: nothing of the batch is stored.
    let refused = [
        new_job("k", t),
        NewJob {
            unique_key: Some("x".into()),
            unique_states: UniqueStates::of(&[JobState::Running]),
            ..new_job("k", t)
        },
    ];
    assert!(matches!(
        store.enqueue_jobs(&refused).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.count_jobs(&JobFilter::default()).await.unwrap(), 4);
    assert!(store.enqueue_jobs(&[]).await.unwrap().is_empty());
    // More than one statement's worth.
    let many: Vec<NewJob> = (0..1200).map(|_| new_job("many", t)).collect();
    let enqueued = store.enqueue_jobs(&many).await.unwrap();
    assert!(
        enqueued
            .iter()
            .zip(&many)
            .all(|(e, j)| matches!(e, Enqueued::New(s) if s.id == j.id))
    );
    // Every job due: the held one, two of the batch and the 1200.
    assert_eq!(claim(store, 2000, "w", t).await.len(), 1203);
}
both_backends!(a_batch_enqueue_stores_each_job_as_a_single_one_would);

async fn scheduled_jobs_wait_for_their_time(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let later = enqueue(
        store,
        &NewJob {
            run_at: t + secs(60),
            ..new_job("report", t)
        },
    )
    .await;
    assert_eq!(later.state, JobState::Scheduled);
    assert!(claim(store, 10, "w", t).await.is_empty());
    assert!(claim(store, 10, "w", t + secs(59)).await.is_empty());
    let due = claim(store, 10, "w", t + secs(60)).await;
    assert_eq!(ids(&due), [later.id]);
    assert_eq!(due[0].state, JobState::Running);
    assert_eq!(due[0].attempt, 1);
}
both_backends!(scheduled_jobs_wait_for_their_time);

async fn claims_take_the_best_priority_then_the_oldest_and_at_most_the_limit(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let mut made = Vec::new();
    for (priority, age) in [(3, 5), (1, 1), (2, 9), (1, 4), (0, 0)] {
        made.push(
            enqueue(
                store,
                &NewJob {
                    priority,
                    ..new_job("p", t - secs(age))
                },
            )
            .await,
        );
    }
    let elsewhere = enqueue(
        store,
        &NewJob {
            queue: "other".into(),
            priority: -5,
            ..new_job("p", t - secs(100))
        },
    )
    .await;
    assert!(claim(store, 0, "w", t).await.is_empty());
    let first = claim(store, 2, "w1", t).await;
    assert_eq!(ids(&first), [made[4].id, made[3].id]);
    for job in &first {
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.leased_by.as_deref(), Some("w1"));
        assert_eq!(job.lease_until, Some(t + secs(30)));
        assert_eq!(job.attempt, 1);
    }
    let rest = claim(store, 10, "w2", t).await;
    assert_eq!(ids(&rest), [made[1].id, made[2].id, made[0].id]);
    assert!(claim(store, 10, "w3", t).await.is_empty());
    let other = store
        .claim_jobs("other", u32::MAX, "w", t, t + secs(30))
        .await
        .unwrap();
    assert_eq!(ids(&other), [elsewhere.id]);
}
both_backends!(claims_take_the_best_priority_then_the_oldest_and_at_most_the_limit);

async fn concurrent_claims_never_take_a_job_twice(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let t = t0();
    let mut made = HashSet::new();
    for i in 0..200 {
        let job = enqueue(
            &*db.store,
            &NewJob {
                priority: i % 3,
                ..new_job("bulk", t)
            },
        )
        .await;
        made.insert(job.id);
    }
    // Two nodes, two claimers on each.
    let other = db.another_handle().await;
    let stores = [
        Arc::clone(&db.store),
        Arc::clone(&db.store),
        Arc::clone(&other.store),
        Arc::clone(&other.store),
    ];
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(n, store)| {
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = claim(&*store, 7, &format!("w{n}"), t).await;
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(ids(&batch));
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    assert_eq!(claimed.len(), 200, "each job once");
    assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), made);
    other.drop_db().await;
}
both_backends!(concurrent_claims_never_take_a_job_twice);

async fn a_batch_takes_no_more_of_a_key_than_its_free_slots(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let keyed = |key: &str, limit: i32| NewJob {
        concurrency_key: Some(key.to_owned()),
        concurrency_limit: limit,
        priority: 0,
        ..new_job("keyed", t)
    };
    for _ in 0..5 {
        enqueue(store, &keyed("a", 2)).await;
        enqueue(store, &keyed("b", 1)).await;
    }
    let free = enqueue(store, &new_job("free", t)).await;
    let batch = claim(store, 10, "w", t).await;
    let of = |key: &str| {
        batch
            .iter()
            .filter(|j| j.concurrency_key.as_deref() == Some(key))
            .count()
    };
    // The batch is short of the limit by the keyed jobs it ranked out: the free job was not
    // among its first ten candidates. The next claim skips the keys that are full.
    assert_eq!((of("a"), of("b"), batch.len()), (2, 1, 3));
    assert_eq!(ids(&claim(store, 10, "w", t).await), [free.id]);
    // Every slot is taken now.
    assert!(claim(store, 10, "w", t).await.is_empty());
    let one_of_a = batch
        .iter()
        .find(|j| j.concurrency_key.as_deref() == Some("a"))
        .unwrap();
    finish(store, one_of_a, Finish::Completed, t).await;
    let next = claim(store, 10, "w", t).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].concurrency_key.as_deref(), Some("a"));
}
both_backends!(a_batch_takes_no_more_of_a_key_than_its_free_slots);

async fn a_concurrency_key_runs_at_most_its_limit_across_nodes(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let t = t0();
    const KEYED: usize = 60;
    const FREE: usize = 30;
    for i in 0..KEYED {
        let job = NewJob {
            concurrency_key: Some("one-at-a-time".into()),
            concurrency_limit: 1,
            priority: i16::try_from(i % 2).unwrap(),
            ..new_job("keyed", t)
        };
        enqueue(&*db.store, &job).await;
    }
    for _ in 0..FREE {
        enqueue(&*db.store, &new_job("free", t)).await;
    }
    // Two nodes (on PostgreSQL two pools, as two servers have), claiming at once. Between a
    // claim's answer and the start of its job's end, the job runs for sure.
    let other = db.another_handle().await;
    let running = Arc::new(Mutex::new(0_usize));
    let done = Arc::new(Mutex::new(0_usize));
    let tasks: Vec<_> = [Arc::clone(&db.store), Arc::clone(&other.store)]
        .into_iter()
        .enumerate()
        .map(|(n, store)| {
            let running = Arc::clone(&running);
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                for _ in 0..20_000 {
                    if *done.lock().unwrap() == KEYED + FREE {
                        return;
                    }
                    let batch = claim(&*store, 3, &format!("node{n}"), t).await;
                    let keyed = batch.iter().filter(|j| j.concurrency_key.is_some()).count();
                    {
                        let mut now_running = running.lock().unwrap();
                        *now_running += keyed;
                        assert!(*now_running <= 1, "{now_running} keyed jobs run at once");
                    }
                    tokio::task::yield_now().await;
                    *running.lock().unwrap() -= keyed;
                    let ends: Vec<_> = batch.iter().map(|j| ended(j, Finish::Completed)).collect();
                    let stored = store.finish_jobs(&ends, t).await.unwrap();
                    assert_eq!(stored.len(), batch.len());
                    *done.lock().unwrap() += batch.len();
                }
                panic!("the claimers made no progress");
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (counts, oldest) = db.store.job_stats(t).await.unwrap();
    assert_eq!(oldest, None);
    assert!(
        counts.iter().all(|c| c.state == JobState::Completed),
        "{counts:?}"
    );
    other.drop_db().await;
}
both_backends!(a_concurrency_key_runs_at_most_its_limit_across_nodes);

async fn attempts_end_completed_retried_discarded_or_cancelled(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    for _ in 0..5 {
        enqueue(store, &new_job("work", t)).await;
    }
    let batch = claim(store, 5, "w", t).await;
    let now = t + secs(1);
    let ends = [
        ended(&batch[0], Finish::Completed),
        ended(
            &batch[1],
            Finish::Retry {
                error: "timeout talking to smtp".into(),
                retry_at: t + secs(60),
                outcome: AttemptOutcome::TimedOut,
            },
        ),
        ended(&batch[2], discard("bad payload")),
        ended(&batch[3], Finish::Cancelled),
        // A report for an attempt the job is not in changes nothing.
        Finished {
            attempt: 7,
            ..ended(&batch[4], Finish::Completed)
        },
        // Nor one from a worker that does not hold it.
        Finished {
            worker: "intruder".into(),
            ..ended(&batch[4], Finish::Completed)
        },
    ];
    let stored = store.finish_jobs(&ends, now).await.unwrap();
    let states: Vec<_> = stored.iter().map(|j| (j.id, j.state)).collect();
    assert_eq!(
        states,
        [
            (batch[0].id, JobState::Completed),
            (batch[1].id, JobState::Retryable),
            (batch[2].id, JobState::Discarded),
            (batch[3].id, JobState::Cancelled),
        ]
    );
    for job in &stored {
        assert_eq!((job.leased_by.as_deref(), job.lease_until), (None, None));
        assert_eq!(job.finished_at, job.state.is_final().then_some(now));
    }
    assert_eq!(stored[1].run_at, t + secs(60));
    assert_eq!(
        stored[1].last_error.as_deref(),
        Some("timeout talking to smtp")
    );
    assert_eq!(stored[2].last_error.as_deref(), Some("bad payload"));
    // The completed attempt is kept on the job's row, and its history shows it.
    let (_, attempts) = store.job(batch[0].id).await.unwrap();
    assert_eq!(
        attempts,
        [AttemptRecord {
            attempt: 1,
            worker: "w".into(),
            started_at: t,
            finished_at: now,
            outcome: AttemptOutcome::Completed,
            error: None,
        }]
    );
    let (_, attempts) = store.job(batch[1].id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (
            attempts[0].attempt,
            attempts[0].worker.as_str(),
            attempts[0].outcome
        ),
        (1, "w", AttemptOutcome::TimedOut)
    );
    assert_eq!((attempts[0].started_at, attempts[0].finished_at), (t, now));
    assert_eq!(
        store.job(batch[4].id).await.unwrap().0.state,
        JobState::Running
    );
    assert!(store.job(batch[4].id).await.unwrap().1.is_empty());

    // The retryable job is claimed again once its time has come, as attempt 2.
    assert!(claim(store, 5, "w", t + secs(59)).await.is_empty());
    let again = claim(store, 5, "w2", t + secs(60)).await;
    assert_eq!(ids(&again), [batch[1].id]);
    assert_eq!(again[0].attempt, 2);

    // A retry asked for a job whose cancellation was asked for cancels it.
    store.cancel_job(again[0].id, now).await.unwrap();
    let retry = Finish::Retry {
        error: "stopped".into(),
        retry_at: t + secs(120),
        outcome: AttemptOutcome::Retried,
    };
    let cancelled = finish(store, &again[0], retry, t + secs(61)).await;
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.finished_at, Some(t + secs(61)));
    assert!(store.finish_jobs(&[], now).await.unwrap().is_empty());
}
both_backends!(attempts_end_completed_retried_discarded_or_cancelled);

async fn a_hand_back_undoes_the_claim_and_keeps_the_last_real_error(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let failed = enqueue(store, &new_job("work", t)).await;
    let fresh = enqueue(store, &new_job("work", t + secs(1))).await;
    let first = claim(store, 1, "w", t).await;
    assert_eq!(ids(&first), [failed.id]);
    let retry = Finish::Retry {
        error: "connection refused".into(),
        retry_at: t + secs(10),
        outcome: AttemptOutcome::Retried,
    };
    finish(store, &first[0], retry, t).await;
    let second = claim(store, 2, "w", t + secs(10)).await;
    assert_eq!(ids(&second), [fresh.id, failed.id]);
    let release = |reason: Option<&str>, run_at| Finish::Release {
        reason: reason.map(str::to_owned),
        run_at,
    };
    let now = t + secs(11);
    let back = store
        .finish_jobs(
            &[
                ended(
                    &second[1],
                    release(Some("waiting: the circuit of smtp is open"), t + secs(40)),
                ),
                // Handed back due now (claimed ahead by a worker that stops).
                ended(&second[0], release(None, second[0].run_at)),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(ids(&back), [failed.id, fresh.id]);
    // Its attempt is not counted, and its last error stays its real attempt's.
    assert_eq!(
        (back[0].state, back[0].attempt, back[0].run_at),
        (JobState::Retryable, 1, t + secs(40))
    );
    assert_eq!(back[0].last_error.as_deref(), Some("connection refused"));
    // Never attempted and due: available again, without an error.
    assert_eq!(
        (back[1].state, back[1].attempt, back[1].run_at),
        (JobState::Available, 0, t + secs(1))
    );
    assert_eq!(back[1].last_error, None);
    for job in &back {
        assert_eq!((job.leased_by.as_deref(), job.lease_until), (None, None));
        assert!(store.job(job.id).await.unwrap().1.len() <= 1);
    }
    // Never attempted, handed back for later: scheduled, with the reason for operators.
    let again = claim(store, 1, "w", now).await;
    assert_eq!(ids(&again), [fresh.id]);
    let reason = "waiting: the circuit of smtp is open";
    let later = finish(store, &again[0], release(Some(reason), t + secs(60)), now).await;
    assert_eq!((later.state, later.attempt), (JobState::Scheduled, 0));
    assert_eq!(later.last_error.as_deref(), Some(reason));
    assert!(store.job(fresh.id).await.unwrap().1.is_empty());
}
both_backends!(a_hand_back_undoes_the_claim_and_keeps_the_last_real_error);

async fn a_finish_and_claim_records_the_ends_and_claims_in_one_call(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let mut plain = Vec::new();
    for _ in 0..4 {
        plain.push(enqueue(store, &new_job("work", t)).await.id);
    }
    // One job of the key may run at once.
    let keyed = |n: i64| NewJob {
        concurrency_key: Some("tenant".into()),
        concurrency_limit: 1,
        priority: 2,
        ..new_job("keyed", t - Duration::microseconds(n))
    };
    let k1 = enqueue(store, &keyed(2)).await;
    let k2 = enqueue(store, &keyed(1)).await;
    let claim_of = |limit| Claim {
        queue: "default",
        limit,
        worker: "w",
        lease_until: t + secs(30),
    };
    let (recorded, first) = store
        .finish_and_claim(&[], Some(claim_of(3)), t)
        .await
        .unwrap();
    assert!(recorded.is_empty());
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|j| j.state == JobState::Running));
    let (_, second) = store
        .finish_and_claim(&[], Some(claim_of(10)), t)
        .await
        .unwrap();
    let last_plain: Vec<Uuid> = plain
        .iter()
        .copied()
        .filter(|id| !ids(&first).contains(id))
        .collect();
    assert_eq!(ids(&second), [last_plain[0], k1.id], "k2 waits for k1");
    // The ends and the next claim in one call: the claim sees the slot of the key that k1's
    // end freed.
    let ends: Vec<Finished> = first
        .iter()
        .chain(&second)
        .map(|j| ended(j, Finish::Completed))
        .collect();
    let now = t + secs(1);
    let (recorded, claimed) = store
        .finish_and_claim(&ends, Some(claim_of(10)), now)
        .await
        .unwrap();
    assert_eq!(
        ids(&recorded),
        ends.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert!(recorded.iter().all(|j| j.state == JobState::Completed));
    assert_eq!(ids(&claimed), [k2.id]);
    assert_eq!(claimed[0].lease_until, Some(t + secs(30)));
    let (_, attempts) = store.job(k1.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    // Only ends: nothing claimed; nothing at all: nothing done.
    let (recorded, claimed) = store
        .finish_and_claim(&[ended(&claimed[0], Finish::Completed)], None, now)
        .await
        .unwrap();
    assert_eq!((ids(&recorded), claimed.len()), (vec![k2.id], 0));
    let (recorded, claimed) = store
        .finish_and_claim(&[], Some(claim_of(0)), now)
        .await
        .unwrap();
    assert!(recorded.is_empty() && claimed.is_empty());
}
both_backends!(a_finish_and_claim_records_the_ends_and_claims_in_one_call);

async fn an_expired_lease_counts_the_attempt_and_the_last_one_discards(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let job = enqueue(
        store,
        &NewJob {
            max_attempts: 2,
            ..new_job("fragile", t)
        },
    )
    .await;
    let first = claim(store, 1, "dead-node", t).await.remove(0);
    assert!(
        store
            .rescue_expired_leases(t + secs(29))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.rescue_expired_leases(t + secs(31)).await.unwrap(),
        [("fragile".to_owned(), 1)]
    );
    let (rescued, attempts) = store.job(job.id).await.unwrap();
    assert_eq!(rescued.state, JobState::Retryable);
    assert_eq!(rescued.run_at, t + secs(31));
    assert_eq!(rescued.leased_by, None);
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::LeaseLost);
    assert_eq!(attempts[0].worker, "dead-node");

    // Another worker takes it; the first one's late report is ignored.
    let second = claim(store, 1, "w2", t + secs(31)).await.remove(0);
    assert_eq!((second.id, second.attempt), (job.id, 2));
    assert!(
        store
            .finish_jobs(&[ended(&first, Finish::Completed)], t + secs(32))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.job(job.id).await.unwrap().0.leased_by.as_deref(),
        Some("w2")
    );

    // The last attempt's lease expires too: discarded.
    assert_eq!(
        store.rescue_expired_leases(t + secs(62)).await.unwrap(),
        [("fragile".to_owned(), 1)]
    );
    let (dead, attempts) = store.job(job.id).await.unwrap();
    assert_eq!(dead.state, JobState::Discarded);
    assert_eq!(dead.finished_at, Some(t + secs(62)));
    assert!(dead.last_error.is_some());
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.attempt, a.outcome))
            .collect::<Vec<_>>(),
        [
            (1, AttemptOutcome::LeaseLost),
            (2, AttemptOutcome::LeaseLost)
        ]
    );
    assert!(
        store
            .rescue_expired_leases(t + secs(999))
            .await
            .unwrap()
            .is_empty()
    );
}
both_backends!(an_expired_lease_counts_the_attempt_and_the_last_one_discards);

async fn renewals_extend_held_leases_and_carry_cancellation(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    for _ in 0..2 {
        enqueue(store, &new_job("long", t)).await;
    }
    let batch = claim(store, 2, "w", t).await;
    let (a, b) = (batch[0].id, batch[1].id);
    assert!(store.renew_leases("w", &[], t).await.unwrap().is_empty());
    let mut held = store
        .renew_leases("w", &[a, b, Uuid::new_v4()], t + secs(90))
        .await
        .unwrap();
    held.sort();
    let mut expected = vec![(a, false), (b, false)];
    expected.sort();
    assert_eq!(held, expected);
    assert!(
        store
            .renew_leases("other", &[a], t + secs(90))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.job(a).await.unwrap().0.lease_until,
        Some(t + secs(90))
    );
    // The old lease's end passes: nothing to rescue.
    assert!(
        store
            .rescue_expired_leases(t + secs(60))
            .await
            .unwrap()
            .is_empty()
    );

    let marked = store.cancel_job(a, t).await.unwrap();
    assert_eq!(
        (marked.state, marked.cancel_requested),
        (JobState::Running, true)
    );
    assert_eq!(
        store.renew_leases("w", &[a], t + secs(120)).await.unwrap(),
        [(a, true)]
    );
    let stopped = finish(store, &batch[0], Finish::Cancelled, t + secs(1)).await;
    assert_eq!(stopped.state, JobState::Cancelled);
    assert!(
        store
            .renew_leases("w", &[a], t + secs(120))
            .await
            .unwrap()
            .is_empty()
    );
}
both_backends!(renewals_extend_held_leases_and_carry_cancellation);

async fn cancel_retry_requeue_and_purge(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let waiting = enqueue(store, &new_job("a", t)).await;
    let cancelled = store.cancel_job(waiting.id, t + secs(1)).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.finished_at, Some(t + secs(1)));
    // A finished job is answered unchanged.
    assert_eq!(
        store.cancel_job(waiting.id, t + secs(2)).await.unwrap(),
        cancelled
    );
    assert!(matches!(
        store.cancel_job(Uuid::new_v4(), t).await,
        Err(StoreError::NotFound { entity: "job" })
    ));
    let back = store.retry_job(waiting.id, t + secs(3)).await.unwrap();
    assert_eq!(
        (back.state, back.attempt, back.run_at, back.finished_at),
        (JobState::Available, 0, t + secs(3), None)
    );
    // Not dead, not cancelled: unchanged.
    assert_eq!(store.retry_job(waiting.id, t).await.unwrap(), back);
    assert!(matches!(
        store.retry_job(Uuid::new_v4(), t).await,
        Err(StoreError::NotFound { entity: "job" })
    ));

    // Dead letters: three of kind `a`, one of `b`; two of `a` share a unique key, and a live
    // job holds the key of a third.
    store.cancel_job(waiting.id, t).await.unwrap();
    let dead_letter = |kind: &str, key: Option<&str>| NewJob {
        unique_key: key.map(str::to_owned),
        max_attempts: 1,
        ..new_job(kind, t)
    };
    let mut dead = Vec::new();
    for (kind, key) in [("a", Some("s")), ("a", None), ("b", None), ("a", Some("h"))] {
        let job = enqueue(store, &dead_letter(kind, key)).await;
        let running = claim(store, 1, "w", t).await.remove(0);
        assert_eq!(running.id, job.id);
        finish(store, &running, discard("nope"), t).await;
        dead.push(job);
    }
    // The same key again, discarded too; and a live holder of `h`.
    let job = enqueue(store, &dead_letter("a", Some("s"))).await;
    let running = claim(store, 1, "w", t).await.remove(0);
    finish(store, &running, discard("nope"), t).await;
    dead.push(job);
    // Keys are per kind: another kind's job with key `h` holds nothing of `a`'s.
    enqueue(store, &dead_letter("c", Some("h"))).await;
    let holder = enqueue(
        store,
        &NewJob {
            run_at: t + secs(3600),
            ..dead_letter("a", Some("h"))
        },
    )
    .await;

    // `a`: one of the two with key `s`, and the one without a key; not `h`.
    assert_eq!(
        store
            .requeue_discarded(Some("a"), t + secs(5))
            .await
            .unwrap(),
        2
    );
    let requeued = store
        .list_jobs(
            &JobFilter {
                state: Some(JobState::Available),
                kind: Some("a".into()),
                ..JobFilter::default()
            },
            10,
            0,
        )
        .await
        .unwrap();
    assert_eq!(requeued.len(), 2);
    assert!(
        requeued
            .iter()
            .all(|j| j.attempt == 0 && j.run_at == t + secs(5))
    );
    assert!(requeued.iter().any(|j| j.id == dead[1].id));
    assert_eq!(
        store.job(holder.id).await.unwrap().0.state,
        JobState::Scheduled
    );
    assert_eq!(
        store.job(dead[3].id).await.unwrap().0.state,
        JobState::Discarded
    );

    // Purge: `b` alone, then every dead job.
    assert_eq!(store.purge_discarded(Some("b")).await.unwrap(), 1);
    assert!(matches!(
        store.job(dead[2].id).await,
        Err(StoreError::NotFound { entity: "job" })
    ));
    assert_eq!(store.purge_discarded(None).await.unwrap(), 2);
    assert_eq!(store.purge_discarded(None).await.unwrap(), 0);
    assert_eq!(store.requeue_discarded(None, t).await.unwrap(), 0);
}
both_backends!(cancel_retry_requeue_and_purge);

async fn the_admin_listing_filters_and_counts(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let mut made = Vec::new();
    for (i, (kind, queue)) in [("mail", "default"), ("mail", "bulk"), ("thumb", "default")]
        .into_iter()
        .enumerate()
    {
        let job = NewJob {
            queue: queue.to_owned(),
            unique_key: Some(format!("Key_{i}%")),
            ..new_job(kind, t + secs(i64::try_from(i).unwrap()))
        };
        made.push(enqueue(store, &job).await);
    }
    let later = enqueue(
        store,
        &NewJob {
            run_at: t + secs(3600),
            ..new_job("thumb", t + secs(3))
        },
    )
    .await;
    let running = claim(store, 1, "w", t + secs(10)).await.remove(0);
    assert_eq!(running.id, made[0].id);
    finish(store, &running, discard("SMTP said NO"), t + secs(10)).await;

    let list = |filter: JobFilter, limit: u32, offset: u64| async move {
        ids(&store.list_jobs(&filter, limit, offset).await.unwrap())
    };
    let all = list(JobFilter::default(), 100, 0).await;
    assert_eq!(
        all,
        [later.id, made[2].id, made[1].id, made[0].id],
        "newest first"
    );
    assert_eq!(
        list(JobFilter::default(), 2, 1).await,
        [made[2].id, made[1].id]
    );
    assert!(list(JobFilter::default(), 10, u64::MAX).await.is_empty());
    assert!(list(JobFilter::default(), 0, 0).await.is_empty());
    let by =
        |state: Option<JobState>, kind: Option<&str>, queue: Option<&str>, text: Option<&str>| {
            JobFilter {
                state,
                kind: kind.map(str::to_owned),
                queue: queue.map(str::to_owned),
                text: text.map(str::to_owned),
            }
        };
    assert_eq!(
        list(by(Some(JobState::Scheduled), None, None, None), 10, 0).await,
        [later.id]
    );
    assert_eq!(
        list(by(None, Some("mail"), None, None), 10, 0).await,
        [made[1].id, made[0].id]
    );
    assert_eq!(
        list(by(None, None, Some("bulk"), None), 10, 0).await,
        [made[1].id]
    );
    // Text: the kind, the unique key or the last error, in any case; `%` is literal.
    assert_eq!(
        list(by(None, None, None, Some("smtp said")), 10, 0).await,
        [made[0].id]
    );
    assert_eq!(
        list(by(None, None, None, Some("key_2%")), 10, 0).await,
        [made[2].id]
    );
    assert!(
        list(by(None, None, None, Some("key%2")), 10, 0)
            .await
            .is_empty()
    );
    assert_eq!(
        list(by(None, None, None, Some("THUMB")), 10, 0).await,
        [later.id, made[2].id]
    );
    assert!(
        list(by(Some(JobState::Running), Some("mail"), None, None), 10, 0)
            .await
            .is_empty()
    );

    assert_eq!(store.count_jobs(&JobFilter::default()).await.unwrap(), 4);
    assert_eq!(
        store
            .count_jobs(&by(None, None, None, Some("THUMB")))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .count_jobs(&by(Some(JobState::Running), None, None, None))
            .await
            .unwrap(),
        0
    );

    let (counts, oldest) = store.job_stats(t + secs(10)).await.unwrap();
    let count = |kind: &str, state: JobState, count: i64| JobCount {
        kind: kind.to_owned(),
        state,
        count,
    };
    let mut counts = counts;
    counts.sort_by(|a, b| (&a.kind, a.state).cmp(&(&b.kind, b.state)));
    assert_eq!(
        counts,
        [
            count("mail", JobState::Available, 1),
            count("mail", JobState::Discarded, 1),
            count("thumb", JobState::Scheduled, 1),
            count("thumb", JobState::Available, 1),
        ]
    );
    assert_eq!(oldest, Some(made[1].run_at));
    assert_eq!(store.job_stats(t - secs(10)).await.unwrap().1, None);
}
both_backends!(the_admin_listing_filters_and_counts);

async fn pruning_removes_old_finished_jobs_with_their_attempts(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    let mut finished = Vec::new();
    for i in 0..3 {
        enqueue(store, &new_job("old", t)).await;
        let job = claim(store, 1, "w", t).await.remove(0);
        finished.push(finish(store, &job, Finish::Completed, t + secs(i)).await);
    }
    let waiting = enqueue(store, &new_job("new", t)).await;
    assert_eq!(store.prune_jobs(t + secs(100), 0).await.unwrap(), 0);
    // Finished before t + 2s: the first two, one at a time, oldest first.
    assert_eq!(store.prune_jobs(t + secs(2), 1).await.unwrap(), 1);
    assert!(store.job(finished[0].id).await.is_err());
    assert!(store.job(finished[1].id).await.is_ok());
    assert_eq!(store.prune_jobs(t + secs(2), 10).await.unwrap(), 1);
    assert_eq!(store.prune_jobs(t + secs(2), 10).await.unwrap(), 0);
    assert_eq!(store.prune_jobs(t + secs(100), u32::MAX).await.unwrap(), 1);
    assert_eq!(
        store.job(waiting.id).await.unwrap().0.state,
        JobState::Available
    );
}
both_backends!(pruning_removes_old_finished_jobs_with_their_attempts);

async fn odd_inputs_are_stored_or_refused_without_a_panic(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &*db.store;
    let t = t0();
    // The service validates these; the store keeps them and never panics on them.
    let never = enqueue(
        store,
        &NewJob {
            concurrency_key: Some("k".into()),
            concurrency_limit: -1,
            priority: i16::MIN,
            ..new_job("odd", t)
        },
    )
    .await;
    let no_attempts = enqueue(
        store,
        &NewJob {
            max_attempts: 0,
            timeout_ms: -5,
            payload: "é".into(),
            ..new_job("odd", t)
        },
    )
    .await;
    let batch = claim(store, u32::MAX, "w", t).await;
    assert_eq!(
        ids(&batch),
        [no_attempts.id],
        "a limit below one never runs"
    );
    assert_eq!(batch[0].payload, "é");
    // Its lease expires: with no attempt left, it is discarded.
    assert_eq!(
        store.rescue_expired_leases(t + secs(31)).await.unwrap(),
        [("odd".to_owned(), 1)]
    );
    assert_eq!(
        store.job(no_attempts.id).await.unwrap().0.state,
        JobState::Discarded
    );
    assert_eq!(
        store.job(never.id).await.unwrap().0.state,
        JobState::Available
    );
    assert!(
        store
            .claim_jobs("", 10, "", t, t - secs(1))
            .await
            .unwrap()
            .is_empty()
    );
    // PostgreSQL text holds no NUL character: an error, not a panic.
    let nul = NewJob {
        payload: "a\u{0}b".into(),
        ..new_job("odd", t)
    };
    match db.store.backend() {
        Backend::Sqlite => assert!(store.enqueue_job(&nul).await.is_ok()),
        Backend::Postgres => assert!(store.enqueue_job(&nul).await.is_err()),
    }
    // More ids than one statement binds.
    let many: Vec<Uuid> = (0..1200).map(|_| Uuid::new_v4()).collect();
    assert!(store.renew_leases("w", &many, t).await.unwrap().is_empty());
    let filter = JobFilter {
        text: Some("%_\\".into()),
        ..JobFilter::default()
    };
    assert!(
        store
            .list_jobs(&filter, u32::MAX, 0)
            .await
            .unwrap()
            .is_empty()
    );
}
both_backends!(odd_inputs_are_stored_or_refused_without_a_panic);

/// The next wake-up, within 10 s.
async fn next_wakeup(
    wakeups: &mut tokio::sync::mpsc::Receiver<unhidra_store::jobs::JobWakeup>,
) -> unhidra_store::jobs::JobWakeup {
    tokio::time::timeout(std::time::Duration::from_secs(10), wakeups.recv())
        .await
        .expect("a wake-up within 10 s")
        .expect("the listener runs")
}

/// On PostgreSQL an enqueue of a job due now is heard by every listener; one scheduled for
/// later is not. A listener whose connection is killed connects again and, since it may have
/// missed some, wakes every queue.
#[tokio::test]
async fn listeners_hear_enqueues_and_survive_a_lost_connection_on_postgres() {
    use unhidra_store::jobs::JobWakeup;
    let db = TestDb::postgres_database().await;
    db.store.migrate().await.unwrap();
    let mut wakeups = db.store.job_wakeups().expect("PostgreSQL listens");
    assert_eq!(next_wakeup(&mut wakeups).await, JobWakeup::All, "listening");
    let t = t0();
    enqueue(
        &*db.store,
        &NewJob {
            run_at: t + secs(3600),
            queue: "later".into(),
            ..new_job("k", t)
        },
    )
    .await;
    enqueue(
        &*db.store,
        &NewJob {
            queue: "mail".into(),
            ..new_job("k", t)
        },
    )
    .await;
    assert_eq!(
        next_wakeup(&mut wakeups).await,
        JobWakeup::Queue("mail".into())
    );

    assert_eq!(db.end_listeners().await, 1);
    assert_eq!(
        next_wakeup(&mut wakeups).await,
        JobWakeup::All,
        "listening again"
    );
    enqueue(&*db.store, &new_job("k", t)).await;
    assert_eq!(
        next_wakeup(&mut wakeups).await,
        JobWakeup::Queue("default".into())
    );
    drop(wakeups);
    db.drop_db().await;
}

#[tokio::test]
async fn sqlite_has_no_listener() {
    let db = TestDb::sqlite().await;
    assert!(db.store.job_wakeups().is_none());
    db.drop_db().await;
}

/// A user and the jobs its creation triggers commit together: a taken email stores neither.
async fn a_user_and_its_jobs_commit_together(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let at = t0();
    let account = |email: &str| unhidra_store::identity::NewUser {
        id: unhidra_core::UserId::new(),
        email: unhidra_core::Email::parse(email).unwrap(),
        display_name: None,
        password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA".into(),
        role: unhidra_core::Role::User,
        now: at,
    };
    let first = new_job("mail", at);
    db.store
        .create_user_with_jobs(&account("ann@example.com"), std::slice::from_ref(&first))
        .await
        .unwrap();
    let (stored, _) = db.store.job(first.id).await.unwrap();
    assert_eq!(stored.state, JobState::Available);

    let second = new_job("mail", at);
    let taken = db
        .store
        .create_user_with_jobs(&account("ann@example.com"), std::slice::from_ref(&second))
        .await;
    assert!(
        matches!(taken, Err(StoreError::Conflict { .. })),
        "{taken:?}"
    );
    assert!(
        matches!(
            db.store.job(second.id).await,
            Err(StoreError::NotFound { .. })
        ),
        "the job of a user that was not created is not stored"
    );
    // A job that cannot be stored takes the user with it.
    let mut bad = new_job("mail", at);
    bad.unique_key = Some("k".to_owned());
    bad.unique_states = UniqueStates::of(&[JobState::Completed]);
    let refused = db
        .store
        .create_user_with_jobs(&account("bo@example.com"), &[bad])
        .await;
    assert!(refused.is_err());
    assert!(matches!(
        db.store
            .user_by_email(&unhidra_core::Email::parse("bo@example.com").unwrap())
            .await,
        Err(StoreError::NotFound { .. })
    ));
}
both_backends!(a_user_and_its_jobs_commit_together);
