//! Cron schedules on both engines: storing, listing, deleting, and the claim of a tick.

/// Expands to a module `$module` with `impl CronStore for $store`.
macro_rules! cron_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};

            use $crate::StoreError;
            use $crate::cron::{
                CronSchedule, CronStore, NewCronSchedule, TickClaim, stored_catch_up,
            };
            use $crate::dialect::{Dialect, get};
            use $crate::jobs::{Enqueued, JobState, NewJob};

            type Store = $store;
            type Db = <Store as Dialect>::Db;
            type Row = <Db as sqlx::Database>::Row;

            const COLUMNS: &str = "name, expression, time_zone, kind, payload, catch_up, \
                enabled, next_tick_at, last_tick_at, created_at, updated_at";

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("cron schedule", e)
            }

            fn schedule(row: &Row) -> Result<CronSchedule, StoreError> {
                Ok(CronSchedule {
                    name: get(row, "name")?,
                    expression: get(row, "expression")?,
                    time_zone: get(row, "time_zone")?,
                    kind: get(row, "kind")?,
                    payload: get(row, "payload")?,
                    catch_up: stored_catch_up(&get::<_, String>(row, "catch_up")?)?,
                    enabled: get(row, "enabled")?,
                    next_tick_at: Store::read_time(get(row, "next_tick_at")?)?,
                    last_tick_at: Store::read_opt_time(get(row, "last_tick_at")?)?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    updated_at: Store::read_time(get(row, "updated_at")?)?,
                })
            }

            #[async_trait]
            impl CronStore for Store {
                async fn put_cron_schedule(
                    &self,
                    new: &NewCronSchedule,
                ) -> Result<(CronSchedule, bool), StoreError> {
                    // What decides the ticks: while it is the same, the stored next tick
                    // stands (a tick that is due is not lost by storing the schedule again).
                    let same_ticks = "cron_schedules.enabled AND excluded.enabled \
                        AND cron_schedules.expression = excluded.expression \
                        AND cron_schedules.time_zone = excluded.time_zone";
                    let same = "cron_schedules.kind = excluded.kind \
                        AND cron_schedules.payload = excluded.payload \
                        AND cron_schedules.catch_up = excluded.catch_up \
                        AND cron_schedules.enabled = excluded.enabled \
                        AND cron_schedules.expression = excluded.expression \
                        AND cron_schedules.time_zone = excluded.time_zone";
                    let upsert = format!(
                        "INSERT INTO cron_schedules (name, expression, time_zone, kind, payload, \
                         catch_up, enabled, next_tick_at, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) \
                         ON CONFLICT (name) DO UPDATE SET expression = excluded.expression, \
                         time_zone = excluded.time_zone, kind = excluded.kind, \
                         payload = excluded.payload, catch_up = excluded.catch_up, \
                         enabled = excluded.enabled, \
                         next_tick_at = CASE WHEN {same_ticks} \
                         THEN cron_schedules.next_tick_at ELSE excluded.next_tick_at END, \
                         updated_at = CASE WHEN {same} \
                         THEN cron_schedules.updated_at ELSE excluded.updated_at END \
                         RETURNING {COLUMNS}"
                    );
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    let existed: Option<String> =
                        sqlx::query_scalar("SELECT name FROM cron_schedules WHERE name = $1")
                            .bind(&new.name)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(err)?;
                    let row = sqlx::query(&upsert)
                        .bind(&new.name)
                        .bind(&new.expression)
                        .bind(&new.time_zone)
                        .bind(&new.kind)
                        .bind(&new.payload)
                        .bind(new.catch_up.as_str())
                        .bind(new.enabled)
                        .bind(Store::time(new.next_tick_at))
                        .bind(Store::time(new.now))
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(err)?;
                    let stored = schedule(&row)?;
                    tx.commit().await.map_err(err)?;
                    Ok((stored, existed.is_none()))
                }

                async fn cron_schedules(&self) -> Result<Vec<CronSchedule>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM cron_schedules ORDER BY name"
                    ))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(schedule).collect()
                }

                async fn cron_schedule(&self, name: &str) -> Result<CronSchedule, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM cron_schedules WHERE name = $1"
                    ))
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    schedule(&row)
                }

                async fn delete_cron_schedule(&self, name: &str) -> Result<(), StoreError> {
                    let done = sqlx::query("DELETE FROM cron_schedules WHERE name = $1")
                        .bind(name)
                        .execute(&self.pool)
                        .await
                        .map_err(err)?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound {
                            entity: "cron schedule",
                        });
                    }
                    Ok(())
                }

                async fn claim_cron_tick(
                    &self,
                    name: &str,
                    due: DateTime<Utc>,
                    next: DateTime<Utc>,
                    job: Option<(DateTime<Utc>, &NewJob)>,
                ) -> Result<TickClaim, StoreError> {
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    // The compare-and-set: a second claimer's update waits for the first one's
                    // row lock (PostgreSQL) or write lock (SQLite) and then finds the tick moved.
                    let moved = sqlx::query(
                        "UPDATE cron_schedules SET next_tick_at = $3, \
                         last_tick_at = COALESCE($4, last_tick_at) \
                         WHERE name = $1 AND next_tick_at = $2 AND enabled",
                    )
                    .bind(name)
                    .bind(Store::time(due))
                    .bind(Store::time(next))
                    .bind(job.map(|(ran, _)| Store::time(ran)))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    if moved.rows_affected() == 0 {
                        return Ok(TickClaim::Lost);
                    }
                    let Some((_, job)) = job else {
                        tx.commit().await.map_err(err)?;
                        return Ok(TickClaim::Moved);
                    };
                    let enqueued = Store::insert_job(&mut tx, job).await?;
                    tx.commit().await.map_err(err)?;
                    if let Enqueued::New(stored) = &enqueued
                        && stored.state == JobState::Available
                    {
                        self.announce(&stored.queue).await;
                    }
                    Ok(TickClaim::Enqueued(Box::new(enqueued)))
                }
            }
        }
    };
}

pub(crate) use cron_queries;
