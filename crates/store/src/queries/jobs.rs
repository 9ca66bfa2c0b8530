//! The job queue on both engines: enqueue, claim, leases, attempts' ends, and the admin side.

/// Expands to a module `$module` with `impl JobStore for $store`.
///
/// Every query that changes a job's state also sets `unique_live` from the job's
/// `unique_states` mask and the new state's bit (see the migration), so the partial unique
/// index on it is the whole of the unique-key rule.
macro_rules! job_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use sqlx::QueryBuilder;
            use uuid::Uuid;

            use $crate::StoreError;
            use $crate::dialect::{Dialect, get};
            use $crate::identity::like_pattern;
            use $crate::jobs::{
                AttemptRecord, Claim, Enqueued, Finish, Finished, JobCount, JobFilter, JobRecord,
                JobState, JobStore, JobWakeup, NewJob, UniqueStates, WAKEUP_CHANNEL,
                concurrency_lock_id, finish_parts, initial_state, stored_outcome, stored_state,
                within_limits,
            };

            type Store = $store;
            type Db = <Store as Dialect>::Db;
            type Row = <Db as sqlx::Database>::Row;

            const JOB_COLUMNS: &str = "id, kind, queue, payload, priority, state, run_at, \
                attempt, max_attempts, timeout_ms, unique_key, unique_states, concurrency_key, \
                concurrency_limit, leased_by, lease_until, last_error, cancel_requested, \
                trace_id, created_at, finished_at";

            /// The states a claim takes jobs from (those with a `run_at` that has come).
            const WAITING: &str = "state IN ('available', 'scheduled', 'retryable')";

            /// The states a job is never claimed from again.
            const FINAL: &str = "state IN ('completed', 'discarded', 'cancelled')";

            /// Claims a batch at most; what a rescue or a renewal changes in one statement.
            const CHUNK: usize = 500;
            /// Ended attempts recorded per statement (9 parameters each in the UPDATE).
            const FINISH_CHUNK: usize = 500;
            /// Jobs inserted per statement by a batch enqueue (16 parameters each).
            const ENQUEUE_CHUNK: usize = 500;

            /// The columns an enqueue sets, in the order it binds them.
            const INSERT_COLUMNS: &str = "id, kind, queue, payload, priority, state, run_at, \
                max_attempts, timeout_ms, unique_key, unique_states, unique_live, \
                concurrency_key, concurrency_limit, trace_id, created_at";

            /// How often a claim whose batch broke a concurrency limit is tried again before
            /// it claims jobs without a key only.
            const CLAIM_ROUNDS: usize = 4;

            /// `unique_live` for a job moving to the state whose bit `bit` (SQL) is.
            fn live(bit: &str) -> String {
                format!("CASE WHEN (unique_states & {bit}) <> 0 THEN unique_key END")
            }

            fn bit(state: JobState) -> String {
                state.bit().to_string()
            }

            /// The condition of an admin listing over `$1` state, `$2` kind, `$3` queue and
            /// `$4` a lower-case `LIKE` pattern: `lower` makes SQLite's LIKE match it, and
            /// changes nothing for PostgreSQL's ILIKE.
            fn filter_condition() -> String {
                let ilike = Store::ILIKE;
                format!(
                    "(CAST($1 AS TEXT) IS NULL OR state = $1) \
                     AND (CAST($2 AS TEXT) IS NULL OR kind = $2) \
                     AND (CAST($3 AS TEXT) IS NULL OR queue = $3) \
                     AND (CAST($4 AS TEXT) IS NULL OR lower(kind) {ilike} $4 ESCAPE '\\' \
                     OR lower(unique_key) {ilike} $4 ESCAPE '\\' \
                     OR lower(last_error) {ilike} $4 ESCAPE '\\')"
                )
            }

            /// What an operator's retry sets: `available` at `$2`, its attempts counted anew.
            fn back_to_available() -> String {
                format!(
                    "state = 'available', attempt = 0, run_at = $2, unique_live = {}, \
                     finished_at = NULL, cancel_requested = FALSE",
                    live(&bit(JobState::Available))
                )
            }

            fn job(row: &Row) -> Result<JobRecord, StoreError> {
                Ok(JobRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    kind: get(row, "kind")?,
                    queue: get(row, "queue")?,
                    payload: get(row, "payload")?,
                    priority: get(row, "priority")?,
                    state: stored_state(&get::<_, String>(row, "state")?)?,
                    run_at: Store::read_time(get(row, "run_at")?)?,
                    attempt: get(row, "attempt")?,
                    max_attempts: get(row, "max_attempts")?,
                    timeout_ms: get(row, "timeout_ms")?,
                    unique_key: get(row, "unique_key")?,
                    unique_states: UniqueStates(get(row, "unique_states")?),
                    concurrency_key: get(row, "concurrency_key")?,
                    concurrency_limit: get(row, "concurrency_limit")?,
                    leased_by: get(row, "leased_by")?,
                    lease_until: Store::read_opt_time(get(row, "lease_until")?)?,
                    last_error: get(row, "last_error")?,
                    cancel_requested: get(row, "cancel_requested")?,
                    trace_id: get(row, "trace_id")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    finished_at: Store::read_opt_time(get(row, "finished_at")?)?,
                })
            }

            fn jobs(rows: &[Row]) -> Result<Vec<JobRecord>, StoreError> {
                rows.iter().map(job).collect()
            }

            /// A running job whose lease expired: id, kind, attempt, worker, when the attempt
            /// began.
            type Expired = (
                <Store as Dialect>::Id,
                String,
                i32,
                Option<String>,
                Option<<Store as Dialect>::Time>,
            );

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("job", e)
            }

            impl Store {
                /// Tells the listeners of every node that `queue` has a job due, once the
                /// write committed. A hint only: a failure is logged, and the job waits for
                /// a worker's poll.
                pub(crate) async fn announce(&self, queue: &str) {
                    let Some(notify) = <Store as Dialect>::NOTIFY else {
                        return;
                    };
                    let sent = sqlx::query(notify)
                        .bind(WAKEUP_CHANNEL)
                        .bind(queue)
                        .execute(&self.pool)
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(%queue, error = %e, "cannot announce a new job to the other nodes");
                    }
                }

                /// Stores `new` on `conn` (a transaction's, or the pool's), unless a job with
                /// its unique key exists in a state where the key counts: what
                /// [`JobStore::enqueue_job`] does, and what the claim of a cron tick does
                /// inside its transaction. The caller announces a new job once it committed.
                pub(crate) async fn insert_job(
                    conn: &mut <Db as sqlx::Database>::Connection,
                    new: &NewJob,
                ) -> Result<Enqueued, StoreError> {
                    if new.unique_key.is_some() && !new.unique_states.is_storable() {
                        return Err(StoreError::invalid(
                            "a unique key must count in every state before its job finishes",
                        ));
                    }
                    let state = initial_state(new);
                    let unique_live = new
                        .unique_key
                        .as_deref()
                        .filter(|_| new.unique_states.contains(state));
                    // The job that holds the key may finish between the insert and the read
                    // of it; the insert then succeeds when tried again.
                    for _ in 0..3 {
                        let inserted = sqlx::query(&format!(
                            "INSERT INTO jobs (id, kind, queue, payload, priority, state, run_at, \
                             max_attempts, timeout_ms, unique_key, unique_states, unique_live, \
                             concurrency_key, concurrency_limit, trace_id, created_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                             $15, $16) \
                             ON CONFLICT (kind, unique_live) WHERE unique_live IS NOT NULL DO NOTHING \
                             RETURNING {JOB_COLUMNS}"
                        ))
                        .bind(Store::id(new.id))
                        .bind(&new.kind)
                        .bind(&new.queue)
                        .bind(&new.payload)
                        .bind(new.priority)
                        .bind(state.as_str())
                        .bind(Store::time(new.run_at))
                        .bind(new.max_attempts)
                        .bind(new.timeout_ms)
                        .bind(new.unique_key.as_deref())
                        .bind(new.unique_states.0)
                        .bind(unique_live)
                        .bind(new.concurrency_key.as_deref())
                        .bind(new.concurrency_limit)
                        .bind(new.trace_id.as_deref())
                        .bind(Store::time(new.created_at))
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err)?;
                        if let Some(row) = inserted {
                            return Ok(Enqueued::New(job(&row)?));
                        }
                        let existing = sqlx::query(&format!(
                            "SELECT {JOB_COLUMNS} FROM jobs WHERE kind = $1 AND unique_live = $2"
                        ))
                        .bind(&new.kind)
                        .bind(unique_live)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err)?;
                        if let Some(row) = existing {
                            return Ok(Enqueued::Existing(job(&row)?));
                        }
                    }
                    Err(StoreError::Conflict {
                        entity: "job",
                        source: "the job holding the unique key kept changing".into(),
                    })
                }

                /// Stores `new` on `conn` as [`Self::insert_job`] stores each, a multi-row
                /// INSERT per [`ENQUEUE_CHUNK`] jobs; a job that the INSERT skipped (its unique
                /// key is held, perhaps by a job before it in `new`) goes through
                /// [`Self::insert_job`], which answers the job holding the key.
                pub(crate) async fn insert_jobs(
                    conn: &mut <Db as sqlx::Database>::Connection,
                    new: &[NewJob],
                ) -> Result<Vec<Enqueued>, StoreError> {
                    if new
                        .iter()
                        .any(|j| j.unique_key.is_some() && !j.unique_states.is_storable())
                    {
                        return Err(StoreError::invalid(
                            "a unique key must count in every state before its job finishes",
                        ));
                    }
                    let mut done: Vec<Option<Enqueued>> = Vec::with_capacity(new.len());
                    for chunk in new.chunks(ENQUEUE_CHUNK) {
                        let mut insert = QueryBuilder::<Db>::new(format!(
                            "INSERT INTO jobs ({INSERT_COLUMNS}) "
                        ));
                        insert.push_values(chunk, |mut row, job| {
                            let state = initial_state(job);
                            let unique_live = job
                                .unique_key
                                .as_deref()
                                .filter(|_| job.unique_states.contains(state));
                            row.push_bind(Store::id(job.id))
                                .push_bind(job.kind.as_str())
                                .push_bind(job.queue.as_str())
                                .push_bind(job.payload.as_str())
                                .push_bind(job.priority)
                                .push_bind(state.as_str())
                                .push_bind(Store::time(job.run_at))
                                .push_bind(job.max_attempts)
                                .push_bind(job.timeout_ms)
                                .push_bind(job.unique_key.as_deref())
                                .push_bind(job.unique_states.0)
                                .push_bind(unique_live)
                                .push_bind(job.concurrency_key.as_deref())
                                .push_bind(job.concurrency_limit)
                                .push_bind(job.trace_id.as_deref())
                                .push_bind(Store::time(job.created_at));
                        });
                        insert.push(format!(
                            " ON CONFLICT (kind, unique_live) WHERE unique_live IS NOT NULL \
                             DO NOTHING RETURNING {JOB_COLUMNS}"
                        ));
                        let rows = insert.build().fetch_all(&mut *conn).await.map_err(err)?;
                        let mut stored: std::collections::HashMap<Uuid, JobRecord> = rows
                            .iter()
                            .map(|row| job(row).map(|j| (j.id, j)))
                            .collect::<Result<_, StoreError>>()?;
                        done.extend(chunk.iter().map(|j| stored.remove(&j.id).map(Enqueued::New)));
                    }
                    let mut enqueued = Vec::with_capacity(new.len());
                    for (job, stored) in new.iter().zip(done) {
                        enqueued.push(match stored {
                            Some(stored) => stored,
                            None => Store::insert_job(&mut *conn, job).await?,
                        });
                    }
                    Ok(enqueued)
                }

                async fn find_job(&self, id: Uuid) -> Result<JobRecord, StoreError> {
                    let row =
                        sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
                            .bind(Store::id(id))
                            .fetch_one(&self.pool)
                            .await
                            .map_err(err)?;
                    job(&row)
                }

                /// Runs `update` (`$1` the job's id, `$2` the time) on one job; a job it does
                /// not match is answered as stored.
                async fn change_job(
                    &self,
                    update: &str,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<JobRecord, StoreError> {
                    let row = sqlx::query(update)
                        .bind(Store::id(id))
                        .bind(Store::time(now))
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(err)?;
                    match row {
                        Some(row) => job(&row),
                        None => self.find_job(id).await,
                    }
                }

                /// The claim's statement on `conn` (a writing transaction's), then on an engine
                /// where two claims can run at once, the check of the concurrency limits under
                /// the keys' locks. `None` if the batch broke a limit: the caller rolls back.
                async fn claim_on(
                    conn: &mut <Db as sqlx::Database>::Connection,
                    queue: &str,
                    limit: i64,
                    worker: &str,
                    now: DateTime<Utc>,
                    lease_until: DateTime<Utc>,
                    with_keys: bool,
                ) -> Result<Option<Vec<JobRecord>>, StoreError> {
                    // A keyed job is a candidate while fewer than its limit run; the outer
                    // filter then ranks the candidates of one key, so that a batch does not
                    // take more of a key than its free slots.
                    let keyed = if with_keys {
                        "j.concurrency_limit > (SELECT COUNT(*) FROM jobs r \
                         WHERE r.state = 'running' AND r.concurrency_key = j.concurrency_key)"
                    } else {
                        "FALSE"
                    };
                    let sql = format!(
                        "UPDATE jobs SET state = 'running', attempt = attempt + 1, \
                         leased_by = $4, lease_until = $5, attempted_at = $2, unique_live = {} \
                         WHERE id IN (SELECT id FROM (SELECT c.id, c.concurrency_key, \
                         c.concurrency_limit, ROW_NUMBER() OVER (PARTITION BY c.concurrency_key \
                         ORDER BY c.priority, c.run_at, c.id) AS nth FROM (SELECT j.id, \
                         j.priority, j.run_at, j.concurrency_key, j.concurrency_limit \
                         FROM jobs j WHERE j.queue = $1 AND j.{WAITING} AND j.run_at <= $2 \
                         AND (j.concurrency_key IS NULL OR {keyed}) \
                         ORDER BY j.priority, j.run_at, j.id LIMIT $3 {}) c) ranked \
                         WHERE ranked.concurrency_key IS NULL OR ranked.nth + (SELECT COUNT(*) \
                         FROM jobs r WHERE r.state = 'running' \
                         AND r.concurrency_key = ranked.concurrency_key) \
                         <= ranked.concurrency_limit) \
                         RETURNING {JOB_COLUMNS}",
                        live(&bit(JobState::Running)),
                        Store::SKIP_LOCKED,
                    );
                    let rows = sqlx::query(&sql)
                        .bind(queue)
                        .bind(Store::time(now))
                        .bind(limit)
                        .bind(worker)
                        .bind(Store::time(lease_until))
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(err)?;
                    let mut claimed = jobs(&rows)?;
                    let mut keys: Vec<&str> = claimed
                        .iter()
                        .filter_map(|j| j.concurrency_key.as_deref())
                        .collect();
                    if let Some(lock) = Store::LOCK_KEY
                        && !keys.is_empty()
                    {
                        // Another node's claim may have counted the same free slot. Under the
                        // keys' locks, a new statement sees every claim of these keys that
                        // committed, and any other waits for this one to commit: of two
                        // claims that took the same last slot, the second to check rolls
                        // back.
                        let mut locks: Vec<i64> =
                            keys.iter().map(|k| concurrency_lock_id(k)).collect();
                        locks.sort_unstable();
                        locks.dedup();
                        for id in locks {
                            sqlx::query(lock)
                                .bind(id)
                                .execute(&mut *conn)
                                .await
                                .map_err(err)?;
                        }
                        keys.sort_unstable();
                        keys.dedup();
                        let mut count = QueryBuilder::<Db>::new(
                            "SELECT concurrency_key, COUNT(*) FROM jobs \
                             WHERE state = 'running' AND concurrency_key IN (",
                        );
                        let mut list = count.separated(", ");
                        for key in &keys {
                            list.push_bind(*key);
                        }
                        count.push(") GROUP BY concurrency_key");
                        let running: Vec<(String, i64)> = count
                            .build_query_as()
                            .fetch_all(&mut *conn)
                            .await
                            .map_err(err)?;
                        if !within_limits(&claimed, &running) {
                            return Ok(None);
                        }
                    }
                    claimed.sort_by(|a, b| {
                        (a.priority, a.run_at, a.id).cmp(&(b.priority, b.run_at, b.id))
                    });
                    Ok(Some(claimed))
                }

                /// One claim in a transaction of its own; `None` if the batch broke a limit
                /// and was rolled back.
                async fn claim_round(
                    &self,
                    queue: &str,
                    limit: i64,
                    worker: &str,
                    now: DateTime<Utc>,
                    lease_until: DateTime<Utc>,
                    with_keys: bool,
                ) -> Result<Option<Vec<JobRecord>>, StoreError> {
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    let claimed =
                        Store::claim_on(&mut tx, queue, limit, worker, now, lease_until, with_keys)
                            .await?;
                    match claimed {
                        Some(claimed) => {
                            tx.commit().await.map_err(err)?;
                            Ok(Some(claimed))
                        }
                        None => {
                            tx.rollback().await.map_err(err)?;
                            Ok(None)
                        }
                    }
                }

                /// Records the ends `finished` on `conn` (a writing transaction's): the jobs
                /// handed back one statement each, then the attempts that ended a chunk per
                /// statement — one UPDATE of the jobs (only those still running this attempt
                /// under this worker's lease; a completed attempt is kept on its job's row) and
                /// one INSERT of the history of the others. Answers the jobs as stored after
                /// it, in the order given.
                async fn finish_on(
                    conn: &mut <Db as sqlx::Database>::Connection,
                    finished: &[Finished],
                    now: DateTime<Utc>,
                ) -> Result<Vec<JobRecord>, StoreError> {
                    if finished.is_empty() {
                        return Ok(Vec::new());
                    }
                    // A release undoes its claim: the attempt is not counted, and the job waits
                    // as it did before (`available` or `scheduled` before a first attempt, else
                    // `retryable`); its last error stays its last real attempt's.
                    let release_state =
                        |cancelled: &str, available: &str, scheduled: &str, retryable: &str| {
                            format!(
                                "CASE WHEN cancel_requested THEN {cancelled} \
                                 WHEN attempt > 1 THEN {retryable} \
                                 WHEN $5 <= $6 THEN {available} ELSE {scheduled} END"
                            )
                        };
                    let release = format!(
                        "UPDATE jobs SET state = {}, unique_live = {}, attempt = attempt - 1, \
                         finished_at = CASE WHEN cancel_requested THEN $6 END, \
                         run_at = $5, last_error = COALESCE(last_error, $4), leased_by = NULL, \
                         lease_until = NULL, attempted_at = NULL \
                         WHERE id = $1 AND state = 'running' AND attempt = $2 AND leased_by = $3 \
                         RETURNING {JOB_COLUMNS}",
                        release_state("'cancelled'", "'available'", "'scheduled'", "'retryable'"),
                        live(&release_state(
                            &bit(JobState::Cancelled),
                            &bit(JobState::Available),
                            &bit(JobState::Scheduled),
                            &bit(JobState::Retryable),
                        )),
                    );
                    let mut stored = Vec::new();
                    let mut ended = Vec::new();
                    for end in finished {
                        let Finish::Release { reason, run_at } = &end.finish else {
                            ended.push(end);
                            continue;
                        };
                        let row = sqlx::query(&release)
                            .bind(Store::id(end.id))
                            .bind(end.attempt)
                            .bind(&end.worker)
                            .bind(reason.as_deref())
                            .bind(Store::time(*run_at))
                            .bind(Store::time(now))
                            .fetch_optional(&mut *conn)
                            .await
                            .map_err(err)?;
                        if let Some(row) = row {
                            stored.push(job(&row)?);
                        }
                    }
                    // `attempted_at` stays: when the job's last attempt was claimed.
                    for chunk in ended.chunks(FINISH_CHUNK) {
                        let mut update = QueryBuilder::<Db>::new(
                            "WITH v (v_id, v_attempt, v_worker, v_state, v_bit, v_final, v_error, \
                             v_retry_at, v_started) AS (",
                        );
                        update.push_values(chunk, |mut row, end| {
                            let (state, _, error, retry_at) = finish_parts(&end.finish);
                            row.push_bind(Store::id(end.id))
                                .push_bind(end.attempt)
                                .push_bind(end.worker.as_str())
                                .push_bind(state.as_str())
                                .push_bind(state.bit())
                                .push_bind(state.is_final())
                                .push_bind(error)
                                .push_bind(retry_at.map(Store::time))
                                .push_bind(Store::time(end.started_at));
                        });
                        // A retry of a job whose cancellation was asked for cancels it instead.
                        let cancels = "(cancel_requested AND v_state = 'retryable')";
                        update.push(format!(
                            ") UPDATE jobs SET \
                             state = CASE WHEN {cancels} THEN 'cancelled' ELSE v_state END, \
                             unique_live = {}, \
                             finished_at = CASE WHEN {cancels} OR v_final THEN ",
                            live(&format!(
                                "CASE WHEN {cancels} THEN {} ELSE v_bit END",
                                bit(JobState::Cancelled)
                            )),
                        ));
                        update.push_bind(Store::time(now));
                        update.push(format!(
                            " END, run_at = COALESCE(v_retry_at, run_at), last_error = v_error, \
                             leased_by = NULL, lease_until = NULL, \
                             ran_by = CASE WHEN v_state = 'completed' THEN v_worker END, \
                             ran_at = CASE WHEN v_state = 'completed' THEN v_started END \
                             FROM v WHERE id = v_id AND state = 'running' AND attempt = v_attempt \
                             AND leased_by = v_worker RETURNING {JOB_COLUMNS}"
                        ));
                        let rows = update.build().fetch_all(&mut *conn).await.map_err(err)?;
                        // A completed attempt is kept on its job's row; the others get a row of
                        // the history.
                        let mut recorded = Vec::with_capacity(rows.len());
                        for row in &rows {
                            let updated = job(row)?;
                            if let Some(end) = chunk.iter().find(|e| {
                                e.id == updated.id
                                    && e.attempt == updated.attempt
                                    && !matches!(e.finish, Finish::Completed)
                            }) {
                                recorded.push(*end);
                            }
                            stored.push(updated);
                        }
                        if recorded.is_empty() {
                            continue;
                        }
                        let mut history = QueryBuilder::<Db>::new(
                            "INSERT INTO job_attempts (job_id, attempt, worker, started_at, \
                             finished_at, outcome, error) ",
                        );
                        history.push_values(&recorded, |mut row, end| {
                            let (_, outcome, error, _) = finish_parts(&end.finish);
                            row.push_bind(Store::id(end.id))
                                .push_bind(end.attempt)
                                .push_bind(end.worker.as_str())
                                .push_bind(Store::time(end.started_at))
                                .push_bind(Store::time(now))
                                .push_bind(outcome.as_str())
                                .push_bind(error);
                        });
                        history.build().execute(&mut *conn).await.map_err(err)?;
                    }
                    // In the order given.
                    stored.sort_by_key(|j| finished.iter().position(|e| e.id == j.id));
                    Ok(stored)
                }

                /// Tells the other nodes of the queues where a job handed back is due now.
                async fn announce_released(&self, finished: &[Finished], stored: &[JobRecord]) {
                    if <Store as Dialect>::NOTIFY.is_none() {
                        return;
                    }
                    let mut queues: Vec<&str> = stored
                        .iter()
                        .filter(|j| j.state == JobState::Available)
                        .filter(|j| {
                            finished
                                .iter()
                                .any(|e| e.id == j.id && matches!(e.finish, Finish::Release { .. }))
                        })
                        .map(|j| j.queue.as_str())
                        .collect();
                    queues.sort_unstable();
                    queues.dedup();
                    for queue in queues {
                        self.announce(queue).await;
                    }
                }
            }

            #[async_trait]
            impl JobStore for Store {
                fn job_wakeups(&self) -> Option<tokio::sync::mpsc::Receiver<JobWakeup>> {
                    self.listen_for_jobs()
                }

                fn concurrent_claims(&self) -> bool {
                    // Where a writing transaction has the database to itself, there is nothing
                    // to skip.
                    !Store::SKIP_LOCKED.is_empty()
                }

                async fn enqueue_job(&self, new: &NewJob) -> Result<Enqueued, StoreError> {
                    let mut conn = self.pool.acquire().await.map_err(err)?;
                    let enqueued = Store::insert_job(&mut conn, new).await?;
                    drop(conn);
                    if let Enqueued::New(stored) = &enqueued
                        && stored.state == JobState::Available
                    {
                        self.announce(&stored.queue).await;
                    }
                    Ok(enqueued)
                }

                async fn enqueue_jobs(&self, new: &[NewJob]) -> Result<Vec<Enqueued>, StoreError> {
                    if new.is_empty() {
                        return Ok(Vec::new());
                    }
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    let enqueued = Store::insert_jobs(&mut tx, new).await?;
                    tx.commit().await.map_err(err)?;
                    let mut queues: Vec<&str> = enqueued
                        .iter()
                        .filter_map(|e| match e {
                            Enqueued::New(j) if j.state == JobState::Available => {
                                Some(j.queue.as_str())
                            }
                            _ => None,
                        })
                        .collect();
                    queues.sort_unstable();
                    queues.dedup();
                    for queue in queues {
                        self.announce(queue).await;
                    }
                    Ok(enqueued)
                }

                async fn claim_jobs(
                    &self,
                    queue: &str,
                    limit: u32,
                    worker: &str,
                    now: DateTime<Utc>,
                    lease_until: DateTime<Utc>,
                ) -> Result<Vec<JobRecord>, StoreError> {
                    if limit == 0 {
                        return Ok(Vec::new());
                    }
                    // A batch that broke a concurrency limit is rolled back and claimed again,
                    // now seeing the other claim; after a few rounds of that, this poll takes
                    // jobs without a key only, and the next one tries the keys again.
                    for round in 1..=CLAIM_ROUNDS {
                        let with_keys = round < CLAIM_ROUNDS;
                        let limit = i64::from(limit);
                        let claimed = self
                            .claim_round(queue, limit, worker, now, lease_until, with_keys)
                            .await?;
                        if let Some(claimed) = claimed {
                            return Ok(claimed);
                        }
                    }
                    Ok(Vec::new())
                }

                async fn renew_leases(
                    &self,
                    worker: &str,
                    ids: &[Uuid],
                    lease_until: DateTime<Utc>,
                ) -> Result<Vec<(Uuid, bool)>, StoreError> {
                    let mut held = Vec::new();
                    for chunk in ids.chunks(CHUNK) {
                        let mut renew = QueryBuilder::<Db>::new("UPDATE jobs SET lease_until = ");
                        renew
                            .push_bind(Store::time(lease_until))
                            .push(" WHERE state = 'running' AND leased_by = ")
                            .push_bind(worker)
                            .push(" AND id IN (");
                        let mut list = renew.separated(", ");
                        for id in chunk {
                            list.push_bind(Store::id(*id));
                        }
                        renew.push(") RETURNING id, cancel_requested");
                        let rows: Vec<(<Store as Dialect>::Id, bool)> = renew
                            .build_query_as()
                            .fetch_all(&self.pool)
                            .await
                            .map_err(err)?;
                        for (id, cancel) in rows {
                            held.push((Store::read_id(id)?, cancel));
                        }
                    }
                    Ok(held)
                }

                async fn finish_jobs(
                    &self,
                    finished: &[Finished],
                    now: DateTime<Utc>,
                ) -> Result<Vec<JobRecord>, StoreError> {
                    let (stored, _) = self.finish_and_claim(finished, None, now).await?;
                    Ok(stored)
                }

                async fn finish_and_claim(
                    &self,
                    finished: &[Finished],
                    claim: Option<Claim<'_>>,
                    now: DateTime<Utc>,
                ) -> Result<(Vec<JobRecord>, Vec<JobRecord>), StoreError> {
                    let claim = claim.filter(|c| c.limit > 0);
                    if finished.is_empty() {
                        let Some(c) = claim else {
                            return Ok((Vec::new(), Vec::new()));
                        };
                        let claimed = self
                            .claim_jobs(c.queue, c.limit, c.worker, now, c.lease_until)
                            .await?;
                        return Ok((Vec::new(), claimed));
                    }
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    let stored = Store::finish_on(&mut tx, finished, now).await?;
                    let claimed = match claim {
                        Some(c) => {
                            let limit = i64::from(c.limit);
                            let claimed = Store::claim_on(
                                &mut tx, c.queue, limit, c.worker, now, c.lease_until, true,
                            )
                            .await?;
                            let Some(claimed) = claimed else {
                                // The batch broke a concurrency limit (another node's claim
                                // took the slot): the ends alone, then the claim's rounds.
                                tx.rollback().await.map_err(err)?;
                                let (stored, _) = self.finish_and_claim(finished, None, now).await?;
                                let claimed = self
                                    .claim_jobs(c.queue, c.limit, c.worker, now, c.lease_until)
                                    .await?;
                                return Ok((stored, claimed));
                            };
                            claimed
                        }
                        None => Vec::new(),
                    };
                    tx.commit().await.map_err(err)?;
                    self.announce_released(finished, &stored).await;
                    Ok((stored, claimed))
                }

                async fn rescue_expired_leases(
                    &self,
                    now: DateTime<Utc>,
                ) -> Result<Vec<(String, u64)>, StoreError> {
                    const ERROR: &str = "the worker's lease expired";
                    // Cancelled if that was asked for, discarded if no attempt is left.
                    let next = |cancelled: &str, discarded: &str, retryable: &str| {
                        format!(
                            "CASE WHEN cancel_requested THEN {cancelled} \
                             WHEN attempt >= max_attempts THEN {discarded} ELSE {retryable} END"
                        )
                    };
                    let set = format!(
                        "UPDATE jobs SET state = {}, unique_live = {}, \
                         leased_by = NULL, lease_until = NULL, attempted_at = NULL, \
                         finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts \
                         THEN ",
                        next("'cancelled'", "'discarded'", "'retryable'"),
                        live(&next(
                            &bit(JobState::Cancelled),
                            &bit(JobState::Discarded),
                            &bit(JobState::Retryable),
                        )),
                    );
                    let mut rescued: Vec<(String, u64)> = Vec::new();
                    // Each chunk in a transaction of its own; the rows it reads are locked
                    // (and those another transaction holds skipped), so a worker's late report
                    // waits and then finds the job no longer its own.
                    loop {
                        let mut tx =
                            self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                        let expired: Vec<Expired> =
                            sqlx::query_as(&format!(
                                "SELECT id, kind, attempt, leased_by, attempted_at FROM jobs \
                                 WHERE state = 'running' AND lease_until < $1 \
                                 ORDER BY lease_until LIMIT $2 {}",
                                Store::SKIP_LOCKED
                            ))
                            .bind(Store::time(now))
                            .bind(i64::try_from(CHUNK).unwrap_or(i64::MAX))
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(err)?;
                        if expired.is_empty() {
                            break;
                        }
                        let mut ids = Vec::with_capacity(expired.len());
                        let mut attempts = Vec::with_capacity(expired.len());
                        for (id, kind, attempt, worker, started) in expired {
                            let id = Store::read_id(id)?;
                            match rescued.iter_mut().find(|(k, _)| *k == kind) {
                                Some((_, n)) => *n += 1,
                                None => rescued.push((kind, 1)),
                            }
                            let started = Store::read_opt_time(started)?.unwrap_or(now);
                            ids.push(id);
                            attempts.push((id, attempt, worker.unwrap_or_default(), started));
                        }
                        let mut move_them = QueryBuilder::<Db>::new(&set);
                        move_them
                            .push_bind(Store::time(now))
                            .push(" END, run_at = CASE WHEN attempt >= max_attempts \
                                   THEN run_at ELSE ")
                            .push_bind(Store::time(now))
                            .push(" END, last_error = ")
                            .push_bind(ERROR)
                            .push(" WHERE state = 'running' AND id IN (");
                        let mut list = move_them.separated(", ");
                        for id in &ids {
                            list.push_bind(Store::id(*id));
                        }
                        move_them.push(")");
                        move_them.build().execute(&mut *tx).await.map_err(err)?;
                        let mut history = QueryBuilder::<Db>::new(
                            "INSERT INTO job_attempts (job_id, attempt, worker, started_at, \
                             finished_at, outcome, error) ",
                        );
                        history.push_values(&attempts, |mut row, (id, attempt, worker, started)| {
                            row.push_bind(Store::id(*id))
                                .push_bind(*attempt)
                                .push_bind(worker.clone())
                                .push_bind(Store::time(*started))
                                .push_bind(Store::time(now))
                                .push_bind("lease_lost")
                                .push_bind(ERROR);
                        });
                        history.build().execute(&mut *tx).await.map_err(err)?;
                        tx.commit().await.map_err(err)?;
                        if ids.len() < CHUNK {
                            break;
                        }
                    }
                    Ok(rescued)
                }

                async fn cancel_job(
                    &self,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<JobRecord, StoreError> {
                    // A running job is only marked: its worker stops it and reports the end.
                    let update = format!(
                        "UPDATE jobs SET \
                         cancel_requested = CASE WHEN state = 'running' THEN TRUE \
                         ELSE cancel_requested END, \
                         unique_live = CASE WHEN state = 'running' THEN unique_live ELSE {} END, \
                         finished_at = CASE WHEN state = 'running' THEN finished_at ELSE $2 END, \
                         state = CASE WHEN state = 'running' THEN state ELSE 'cancelled' END \
                         WHERE id = $1 AND NOT {FINAL} RETURNING {JOB_COLUMNS}",
                        live(&bit(JobState::Cancelled)),
                    );
                    self.change_job(&update, id, now).await
                }

                async fn retry_job(
                    &self,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<JobRecord, StoreError> {
                    let update = format!(
                        "UPDATE jobs SET {} WHERE id = $1 AND state IN ('discarded', 'cancelled') \
                         RETURNING {JOB_COLUMNS}",
                        back_to_available(),
                    );
                    let job = self.change_job(&update, id, now).await?;
                    if job.state == JobState::Available {
                        self.announce(&job.queue).await;
                    }
                    Ok(job)
                }

                async fn requeue_discarded(
                    &self,
                    kind: Option<&str>,
                    now: DateTime<Utc>,
                ) -> Result<u64, StoreError> {
                    // A job whose key another job holds stays discarded, and of discarded
                    // jobs sharing a key only the one with the highest id comes back.
                    let available = bit(JobState::Available);
                    let done = sqlx::query(&format!(
                        "UPDATE jobs SET {} WHERE state = 'discarded' \
                         AND (CAST($1 AS TEXT) IS NULL OR kind = $1) \
                         AND (unique_key IS NULL OR (unique_states & {available}) = 0 OR ( \
                         NOT EXISTS (SELECT 1 FROM jobs o WHERE o.kind = jobs.kind \
                         AND o.unique_live = jobs.unique_key) \
                         AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.state = 'discarded' \
                         AND d.kind = jobs.kind AND d.unique_key = jobs.unique_key AND d.id > jobs.id \
                         AND (d.unique_states & {available}) <> 0 \
                         AND (CAST($1 AS TEXT) IS NULL OR d.kind = $1))))",
                        back_to_available(),
                    ))
                    .bind(kind)
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected())
                }

                async fn purge_discarded(&self, kind: Option<&str>) -> Result<u64, StoreError> {
                    let done = sqlx::query(
                        "DELETE FROM jobs WHERE state = 'discarded' \
                         AND (CAST($1 AS TEXT) IS NULL OR kind = $1)",
                    )
                    .bind(kind)
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected())
                }

                async fn job(
                    &self,
                    id: Uuid,
                ) -> Result<(JobRecord, Vec<AttemptRecord>), StoreError> {
                    let record = self.find_job(id).await?;
                    // The completed attempt, kept on the job's row, comes last.
                    let rows = sqlx::query(
                        "SELECT attempt, worker, started_at, finished_at, outcome, error, id AS n \
                         FROM job_attempts WHERE job_id = $1 \
                         UNION ALL SELECT attempt, ran_by, ran_at, finished_at, 'completed', \
                         NULL, 9223372036854775807 FROM jobs \
                         WHERE id = $1 AND state = 'completed' AND ran_by IS NOT NULL \
                         ORDER BY n",
                    )
                    .bind(Store::id(id))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    let attempts = rows
                        .iter()
                        .map(|row| {
                            Ok(AttemptRecord {
                                attempt: get(row, "attempt")?,
                                worker: get(row, "worker")?,
                                started_at: Store::read_time(get(row, "started_at")?)?,
                                finished_at: Store::read_time(get(row, "finished_at")?)?,
                                outcome: stored_outcome(&get::<_, String>(row, "outcome")?)?,
                                error: get(row, "error")?,
                            })
                        })
                        .collect::<Result<_, StoreError>>()?;
                    Ok((record, attempts))
                }

                async fn list_jobs(
                    &self,
                    filter: &JobFilter,
                    limit: u32,
                    offset: u64,
                ) -> Result<Vec<JobRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE {} \
                         ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6",
                        filter_condition(),
                    ))
                    .bind(filter.state.map(JobState::as_str))
                    .bind(filter.kind.as_deref())
                    .bind(filter.queue.as_deref())
                    .bind(filter.text.as_deref().map(like_pattern))
                    .bind(i64::from(limit))
                    .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    jobs(&rows)
                }

                async fn count_jobs(&self, filter: &JobFilter) -> Result<u64, StoreError> {
                    let total: i64 = sqlx::query_scalar(&format!(
                        "SELECT COUNT(*) FROM jobs WHERE {}",
                        filter_condition(),
                    ))
                    .bind(filter.state.map(JobState::as_str))
                    .bind(filter.kind.as_deref())
                    .bind(filter.queue.as_deref())
                    .bind(filter.text.as_deref().map(like_pattern))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(u64::try_from(total).unwrap_or_default())
                }

                async fn job_stats(
                    &self,
                    now: DateTime<Utc>,
                ) -> Result<(Vec<JobCount>, Option<DateTime<Utc>>), StoreError> {
                    let rows: Vec<(String, String, i64)> = sqlx::query_as(
                        "SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state \
                         ORDER BY kind, state",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    let counts = rows
                        .into_iter()
                        .map(|(kind, state, count)| {
                            Ok(JobCount {
                                kind,
                                state: stored_state(&state)?,
                                count,
                            })
                        })
                        .collect::<Result<_, StoreError>>()?;
                    let oldest: Option<<Store as Dialect>::Time> = sqlx::query_scalar(&format!(
                        "SELECT MIN(run_at) FROM jobs WHERE {WAITING} AND run_at <= $1"
                    ))
                    .bind(Store::time(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok((counts, Store::read_opt_time(oldest)?))
                }

                async fn prune_jobs(
                    &self,
                    before: DateTime<Utc>,
                    limit: u32,
                ) -> Result<u64, StoreError> {
                    if limit == 0 {
                        return Ok(0);
                    }
                    let done = sqlx::query(&format!(
                        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {FINAL} \
                         AND finished_at < $1 ORDER BY finished_at LIMIT $2)"
                    ))
                    .bind(Store::time(before))
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected())
                }
            }
        }
    };
}

pub(crate) use job_queries;
