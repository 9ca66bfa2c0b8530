//! Firmware deployments on both engines.

/// Expands to a module `$module` with `impl DeploymentStore for $store`.
macro_rules! deployment_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use sqlx::QueryBuilder;
            use unhidra_core::UserId;
            use uuid::Uuid;

            use $crate::StoreError;
            use $crate::deployments::{
                DeploymentChange, DeploymentDeviceRecord, DeploymentRecord, DeploymentStore,
                DeviceBoot, DeviceTransition, StageCount,
            };
            use $crate::dialect::{Dialect, get};

            type Store = $store;
            type Db = <Store as Dialect>::Db;
            type Row = <<Store as Dialect>::Db as sqlx::Database>::Row;

            /// Ids bound in one `IN (…)` list at most.
            const CHUNK: usize = 500;

            /// The states a device's row ends in.
            const FINAL: &str = "('confirmed', 'failed', 'rolled_back', 'cancelled')";

            const COLUMNS: &str = "id, name, firmware_sha256, target, stages, policy, state, \
                stage, stage_started_at, reason, created_by, created_at, start_at, finished_at";

            const DEVICE_COLUMNS: &str = "deployment_id, device_id, stage, state, progress, \
                reason, command_id, from_version, from_partition, offered_at, deadline, \
                updated_at, joined_at";

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("deployment", e)
            }

            fn record(row: &Row) -> Result<DeploymentRecord, StoreError> {
                Ok(DeploymentRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    name: get(row, "name")?,
                    firmware_sha256: get(row, "firmware_sha256")?,
                    target: get(row, "target")?,
                    stages: get(row, "stages")?,
                    policy: get(row, "policy")?,
                    state: get(row, "state")?,
                    stage: get(row, "stage")?,
                    stage_started_at: Store::read_opt_time(get(row, "stage_started_at")?)?,
                    reason: get(row, "reason")?,
                    created_by: Store::read_opt_id(get(row, "created_by")?)?.map(UserId),
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    start_at: Store::read_time(get(row, "start_at")?)?,
                    finished_at: Store::read_opt_time(get(row, "finished_at")?)?,
                })
            }

            fn device_record(row: &Row) -> Result<DeploymentDeviceRecord, StoreError> {
                Ok(DeploymentDeviceRecord {
                    deployment_id: Store::read_id(get(row, "deployment_id")?)?,
                    device_id: Store::read_id(get(row, "device_id")?)?,
                    stage: get(row, "stage")?,
                    state: get(row, "state")?,
                    progress: get(row, "progress")?,
                    reason: get(row, "reason")?,
                    command_id: Store::read_opt_id(get(row, "command_id")?)?,
                    from_version: get(row, "from_version")?,
                    from_partition: get(row, "from_partition")?,
                    offered_at: Store::read_opt_time(get(row, "offered_at")?)?,
                    deadline: Store::read_opt_time(get(row, "deadline")?)?,
                    updated_at: Store::read_time(get(row, "updated_at")?)?,
                    joined_at: Store::read_opt_time(get(row, "joined_at")?)?,
                })
            }

            /// `( 'a', 'b' )` of bound states.
            fn push_states(query: &mut QueryBuilder<'_, Db>, states: &[&str]) {
                query.push("(");
                let mut list = query.separated(", ");
                for state in states {
                    list.push_bind(state.to_string());
                }
                query.push(")");
            }

            #[async_trait]
            impl DeploymentStore for Store {
                async fn create_deployment(
                    &self,
                    d: &DeploymentRecord,
                    devices: &[DeploymentDeviceRecord],
                ) -> Result<(), StoreError> {
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    sqlx::query(&format!(
                        "INSERT INTO deployments ({COLUMNS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                    ))
                    .bind(Store::id(d.id))
                    .bind(&d.name)
                    .bind(&d.firmware_sha256)
                    .bind(&d.target)
                    .bind(&d.stages)
                    .bind(&d.policy)
                    .bind(&d.state)
                    .bind(d.stage)
                    .bind(d.stage_started_at.map(Store::time))
                    .bind(d.reason.as_deref())
                    .bind(d.created_by.map(|u| Store::id(u.0)))
                    .bind(Store::time(d.created_at))
                    .bind(Store::time(d.start_at))
                    .bind(d.finished_at.map(Store::time))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    for chunk in devices.chunks(CHUNK / 13) {
                        let mut query = QueryBuilder::<Db>::new(format!(
                            "INSERT INTO deployment_devices ({DEVICE_COLUMNS}) "
                        ));
                        query.push_values(chunk, |mut row, r| {
                            row.push_bind(Store::id(r.deployment_id))
                                .push_bind(Store::id(r.device_id))
                                .push_bind(r.stage)
                                .push_bind(r.state.clone())
                                .push_bind(r.progress)
                                .push_bind(r.reason.clone())
                                .push_bind(r.command_id.map(Store::id))
                                .push_bind(r.from_version.clone())
                                .push_bind(r.from_partition.clone())
                                .push_bind(r.offered_at.map(Store::time))
                                .push_bind(r.deadline.map(Store::time))
                                .push_bind(Store::time(r.updated_at))
                                .push_bind(r.joined_at.map(Store::time));
                        });
                        query.build().execute(&mut *tx).await.map_err(err)?;
                    }
                    tx.commit().await.map_err(err)?;
                    Ok(())
                }

                async fn deployment(&self, id: Uuid) -> Result<DeploymentRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM deployments WHERE id = $1"
                    ))
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    record(&row)
                }

                async fn list_deployments(
                    &self,
                    limit: u32,
                ) -> Result<Vec<DeploymentRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {COLUMNS} FROM deployments ORDER BY created_at DESC, id LIMIT $1"
                    ))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(record).collect()
                }

                async fn deployments_in(
                    &self,
                    states: &[&str],
                ) -> Result<Vec<DeploymentRecord>, StoreError> {
                    let mut query = QueryBuilder::<Db>::new(format!(
                        "SELECT {COLUMNS} FROM deployments WHERE state IN "
                    ));
                    push_states(&mut query, states);
                    query.push(" ORDER BY start_at, id");
                    let rows = query.build().fetch_all(&self.pool).await.map_err(err)?;
                    rows.iter().map(record).collect()
                }

                async fn change_deployment(
                    &self,
                    c: &DeploymentChange<'_>,
                ) -> Result<bool, StoreError> {
                    let mut query = QueryBuilder::<Db>::new("UPDATE deployments SET state = ");
                    query.push_bind(c.to.to_owned());
                    if let Some(stage) = c.stage {
                        query.push(", stage = ").push_bind(stage);
                    }
                    if let Some(at) = c.stage_started_at {
                        query.push(", stage_started_at = ").push_bind(Store::time(at));
                    }
                    if let Some(reason) = c.reason {
                        query
                            .push(", reason = COALESCE(reason, ")
                            .push_bind(reason.to_owned())
                            .push(")");
                    }
                    if let Some(at) = c.finished_at {
                        query.push(", finished_at = ").push_bind(Store::time(at));
                    }
                    query
                        .push(" WHERE id = ")
                        .push_bind(Store::id(c.id))
                        .push(" AND state IN ");
                    push_states(&mut query, c.from);
                    if let Some(stage) = c.from_stage {
                        query.push(" AND stage = ").push_bind(stage);
                    }
                    let done = query.build().execute(&self.pool).await.map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn deployment_devices(
                    &self,
                    id: Uuid,
                    state: Option<&str>,
                    offset: u64,
                    limit: u64,
                ) -> Result<Vec<DeploymentDeviceRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {DEVICE_COLUMNS} FROM deployment_devices \
                         WHERE deployment_id = $1 AND (CAST($2 AS TEXT) IS NULL OR state = $2) \
                         ORDER BY stage, device_id LIMIT $3 OFFSET $4"
                    ))
                    .bind(Store::id(id))
                    .bind(state)
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(device_record).collect()
                }

                async fn deployment_counts(&self, id: Uuid) -> Result<Vec<StageCount>, StoreError> {
                    let rows = sqlx::query(
                        "SELECT stage, state, COUNT(*) AS n FROM deployment_devices \
                         WHERE deployment_id = $1 GROUP BY stage, state ORDER BY stage, state",
                    )
                    .bind(Store::id(id))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter()
                        .map(|row| {
                            let n: i64 = get(row, "n")?;
                            Ok(StageCount {
                                stage: get(row, "stage")?,
                                state: get(row, "state")?,
                                count: u64::try_from(n).unwrap_or_default(),
                            })
                        })
                        .collect()
                }

                async fn active_deployment_of(
                    &self,
                    device: Uuid,
                    states: &[&str],
                ) -> Result<Option<(DeploymentRecord, DeploymentDeviceRecord)>, StoreError>
                {
                    let mut query = QueryBuilder::<Db>::new(format!(
                        "SELECT {DEVICE_COLUMNS} FROM deployment_devices dd \
                         WHERE dd.device_id = "
                    ));
                    query
                        .push_bind(Store::id(device))
                        .push(format!(" AND dd.state NOT IN {FINAL}"))
                        .push(
                            " AND EXISTS (SELECT 1 FROM deployments d \
                             WHERE d.id = dd.deployment_id AND d.state IN ",
                        );
                    push_states(&mut query, states);
                    query.push(") ORDER BY dd.updated_at DESC LIMIT 1");
                    let Some(row) = query
                        .build()
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(err)?
                    else {
                        return Ok(None);
                    };
                    let member = device_record(&row)?;
                    let deployment = self.deployment(member.deployment_id).await?;
                    Ok(Some((deployment, member)))
                }

                async fn devices_in_deployments(
                    &self,
                    devices: &[Uuid],
                    states: &[&str],
                ) -> Result<Vec<Uuid>, StoreError> {
                    let mut out = Vec::new();
                    for chunk in devices.chunks(CHUNK) {
                        let mut query = QueryBuilder::<Db>::new(format!(
                            "SELECT DISTINCT dd.device_id FROM deployment_devices dd \
                             JOIN deployments d ON d.id = dd.deployment_id \
                             WHERE dd.state NOT IN {FINAL} AND d.state IN "
                        ));
                        push_states(&mut query, states);
                        query.push(" AND dd.device_id IN (");
                        let mut list = query.separated(", ");
                        for id in chunk {
                            list.push_bind(Store::id(*id));
                        }
                        query.push(")");
                        for row in query.build().fetch_all(&self.pool).await.map_err(err)? {
                            out.push(Store::read_id(get(&row, "device_id")?)?);
                        }
                    }
                    Ok(out)
                }

                async fn transition_device(
                    &self,
                    t: &DeviceTransition<'_>,
                ) -> Result<bool, StoreError> {
                    let mut query =
                        QueryBuilder::<Db>::new("UPDATE deployment_devices SET state = ");
                    query
                        .push_bind(t.to.to_owned())
                        .push(", progress = ")
                        .push_bind(t.progress)
                        .push(", reason = ")
                        .push_bind(t.reason.map(str::to_owned))
                        .push(", updated_at = ")
                        .push_bind(Store::time(t.now))
                        .push(" WHERE deployment_id = ")
                        .push_bind(Store::id(t.deployment))
                        .push(" AND device_id = ")
                        .push_bind(Store::id(t.device))
                        .push(" AND state IN ");
                    push_states(&mut query, t.from);
                    let done = query.build().execute(&self.pool).await.map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn join_deployment(
                    &self,
                    r: &DeploymentDeviceRecord,
                ) -> Result<bool, StoreError> {
                    // `DO NOTHING` covers both the deployment's own row and the index that
                    // allows one open update per device.
                    let done = sqlx::query(&format!(
                        "INSERT INTO deployment_devices ({DEVICE_COLUMNS}) \
                         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 \
                         WHERE EXISTS (SELECT 1 FROM deployments d \
                             WHERE d.id = $1 AND d.state IN ('running', 'paused')) \
                         ON CONFLICT DO NOTHING"
                    ))
                    .bind(Store::id(r.deployment_id))
                    .bind(Store::id(r.device_id))
                    .bind(r.stage)
                    .bind(r.state.clone())
                    .bind(r.progress)
                    .bind(r.reason.clone())
                    .bind(r.command_id.map(Store::id))
                    .bind(r.from_version.clone())
                    .bind(r.from_partition.clone())
                    .bind(r.offered_at.map(Store::time))
                    .bind(r.deadline.map(Store::time))
                    .bind(Store::time(r.updated_at))
                    .bind(r.joined_at.map(Store::time))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn joined_devices(&self, id: Uuid) -> Result<u64, StoreError> {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM deployment_devices \
                         WHERE deployment_id = $1 AND joined_at IS NOT NULL",
                    )
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(u64::try_from(n).unwrap_or_default())
                }

                async fn offer_device(
                    &self,
                    deployment: Uuid,
                    device: Uuid,
                    deadline: DateTime<Utc>,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE deployment_devices SET state = 'offered', \
                         offered_at = $3, deadline = $4, updated_at = $3, \
                         from_version = (SELECT firmware FROM devices WHERE id = $2), \
                         from_partition = (SELECT partition FROM devices WHERE id = $2) \
                         WHERE deployment_id = $1 AND device_id = $2 AND state = 'waiting' \
                         AND EXISTS (SELECT 1 FROM deployments d \
                             WHERE d.id = $1 AND d.state = 'running')",
                    )
                    .bind(Store::id(deployment))
                    .bind(Store::id(device))
                    .bind(Store::time(now))
                    .bind(Store::time(deadline))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn set_offer_command(
                    &self,
                    deployment: Uuid,
                    device: Uuid,
                    command: Uuid,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "UPDATE deployment_devices SET command_id = $3 \
                         WHERE deployment_id = $1 AND device_id = $2",
                    )
                    .bind(Store::id(deployment))
                    .bind(Store::id(device))
                    .bind(Store::id(command))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(())
                }

                async fn overdue_devices(
                    &self,
                    now: DateTime<Utc>,
                    limit: u32,
                ) -> Result<Vec<DeploymentDeviceRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {DEVICE_COLUMNS} FROM deployment_devices dd \
                         WHERE dd.deadline < $1 AND dd.state NOT IN {FINAL} \
                         ORDER BY dd.deadline LIMIT $2"
                    ))
                    .bind(Store::time(now))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(device_record).collect()
                }

                async fn device_boots(
                    &self,
                    devices: &[Uuid],
                ) -> Result<Vec<DeviceBoot>, StoreError> {
                    let mut out = Vec::new();
                    for chunk in devices.chunks(CHUNK) {
                        let mut query = QueryBuilder::<Db>::new(
                            "SELECT id, firmware, partition, secure_version FROM devices \
                             WHERE id IN (",
                        );
                        let mut list = query.separated(", ");
                        for id in chunk {
                            list.push_bind(Store::id(*id));
                        }
                        query.push(")");
                        for row in query.build().fetch_all(&self.pool).await.map_err(err)? {
                            out.push(DeviceBoot {
                                device_id: Store::read_id(get(&row, "id")?)?,
                                firmware: get(&row, "firmware")?,
                                partition: get(&row, "partition")?,
                                secure_version: get(&row, "secure_version")?,
                            });
                        }
                    }
                    Ok(out)
                }

                async fn record_boot(&self, boot: &DeviceBoot) -> Result<(), StoreError> {
                    sqlx::query(
                        "UPDATE devices SET firmware = $2, partition = $3, \
                         secure_version = CASE WHEN secure_version IS NULL OR $4 > secure_version \
                             THEN $4 ELSE secure_version END \
                         WHERE id = $1 AND (firmware IS DISTINCT FROM $2 \
                         OR partition IS DISTINCT FROM $3 \
                         OR (secure_version IS NULL AND $4 IS NOT NULL) OR $4 > secure_version)",
                    )
                    .bind(Store::id(boot.device_id))
                    .bind(boot.firmware.as_deref())
                    .bind(boot.partition.as_deref())
                    .bind(boot.secure_version)
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(())
                }
            }
        }
    };
}

pub(crate) use deployment_queries;
