//! Devices, keys, presence, alerts and telemetry on both engines.

/// Expands to a module `$module` with `impl DeviceStore for $store`.
macro_rules! device_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use std::collections::{HashMap, HashSet};

            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use sqlx::QueryBuilder;
            use unhidra_core::UserId;
            use uuid::Uuid;

            use $crate::StoreError;
            use $crate::devices::{
                Aggregate, AlertFilter, AlertRecord, AlertState, Claim, ClaimOutcome, ClaimRefusal,
                CommandRecord, CommandState, ConfigRecord, DeviceChange, DeviceEventRecord,
                DeviceFilter,
                DeviceKeyRecord, DeviceRecord, DeviceStatus, DeviceStore, FleetCounts,
                NewDeviceKey, Presence, ProvisioningTokenRecord, Seen, TelemetryBatch, TelemetryBucket, TelemetryPoint,
                Appended, TelemetryBudget,
                TelemetryRange, TelemetryValue,
            };
            use $crate::dialect::{Dialect, get};
            use $crate::identity::like_pattern;

            type Store = $store;
            type Db = <Store as Dialect>::Db;
            type Row = <Db as sqlx::Database>::Row;
            type Time = <Store as Dialect>::Time;
            type Id = <Store as Dialect>::Id;

            const DEVICE_COLUMNS: &str = "d.id, d.owner_id, d.name, d.model, d.location, \
                d.metadata, d.hw_id AS hardware_id, d.firmware, d.status, d.last_seen, \
                d.inactivity_timeout, d.heartbeat, d.created_at, d.updated_at";

            const KEY_COLUMNS: &str =
                "k.id, k.device_id, k.prefix, k.created_at, k.expires_at, k.revoked_at";

            const ALERT_COLUMNS: &str = "a.id, a.device_id, a.kind, a.state, a.detail, \
                a.opened_at, a.acknowledged_at, a.acknowledged_by, a.resolved_at";

            /// A key `k` usable at `$2`: not revoked, not expired, and its device's owner (if
            /// any) active.
            const USABLE: &str = "k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2) \
                AND NOT EXISTS (SELECT 1 FROM devices d JOIN users u ON u.id = d.owner_id \
                WHERE d.id = k.device_id AND NOT u.active)";

            const POINT_COLUMNS: &str = "key, ts, kind, num, text, shape, blob";

            /// Points per INSERT: eight parameters each, well under SQLite's limit.
            const POINT_CHUNK: usize = 1000;

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("device", e)
            }

            const COMMAND_COLUMNS: &str = "id, device_id, name, params, state, idempotency_key, \
                created_by, created_at, expires_at, delivered_at, finished_at, output";

            const CONFIG_COLUMNS: &str = "device_id, desired, desired_version, desired_at, \
                reported, reported_version, reported_at";

            fn command_err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("command", e)
            }

            fn command(row: &Row) -> Result<CommandRecord, StoreError> {
                let state: String = get(row, "state")?;
                Ok(CommandRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    device_id: Store::read_id(get(row, "device_id")?)?,
                    name: get(row, "name")?,
                    params: get(row, "params")?,
                    state: stored("command state", CommandState::parse(&state), &state)?,
                    idempotency_key: get(row, "idempotency_key")?,
                    created_by: Store::read_opt_id(get(row, "created_by")?)?.map(UserId),
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    expires_at: Store::read_time(get(row, "expires_at")?)?,
                    delivered_at: Store::read_opt_time(get(row, "delivered_at")?)?,
                    finished_at: Store::read_opt_time(get(row, "finished_at")?)?,
                    output: get(row, "output")?,
                })
            }

            fn config(row: &Row) -> Result<ConfigRecord, StoreError> {
                Ok(ConfigRecord {
                    device_id: Store::read_id(get(row, "device_id")?)?,
                    desired: get(row, "desired")?,
                    desired_version: get(row, "desired_version")?,
                    desired_at: Store::read_time(get(row, "desired_at")?)?,
                    reported: get(row, "reported")?,
                    reported_version: get(row, "reported_version")?,
                    reported_at: Store::read_opt_time(get(row, "reported_at")?)?,
                })
            }

            fn alert_err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("alert", e)
            }

            fn telemetry_err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("telemetry", e)
            }

            fn stored<T>(what: &str, found: Option<T>, text: &str) -> Result<T, StoreError> {
                found.ok_or_else(|| StoreError::Other(format!("stored {what} {text:?}").into()))
            }

            fn device(row: &Row, tags: Vec<String>) -> Result<DeviceRecord, StoreError> {
                let status: String = get(row, "status")?;
                Ok(DeviceRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    owner: Store::read_opt_id(get(row, "owner_id")?)?.map(UserId),
                    name: get(row, "name")?,
                    model: get(row, "model")?,
                    location: get(row, "location")?,
                    tags,
                    metadata: get(row, "metadata")?,
                    hardware_id: get(row, "hardware_id")?,
                    firmware: get(row, "firmware")?,
                    status: stored("status", DeviceStatus::parse(&status), &status)?,
                    last_seen: Store::read_opt_time(get(row, "last_seen")?)?,
                    inactivity_timeout: get(row, "inactivity_timeout")?,
                    heartbeat: get(row, "heartbeat")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    updated_at: Store::read_time(get(row, "updated_at")?)?,
                })
            }

            fn key(row: &Row) -> Result<DeviceKeyRecord, StoreError> {
                Ok(DeviceKeyRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    device_id: Store::read_id(get(row, "device_id")?)?,
                    prefix: get(row, "prefix")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    expires_at: Store::read_opt_time(get(row, "expires_at")?)?,
                    revoked_at: Store::read_opt_time(get(row, "revoked_at")?)?,
                })
            }

            fn alert(row: &Row) -> Result<AlertRecord, StoreError> {
                let state: String = get(row, "state")?;
                Ok(AlertRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    device_id: Store::read_id(get(row, "device_id")?)?,
                    kind: get(row, "kind")?,
                    state: stored("alert state", AlertState::parse(&state), &state)?,
                    detail: get(row, "detail")?,
                    opened_at: Store::read_time(get(row, "opened_at")?)?,
                    acknowledged_at: Store::read_opt_time(get(row, "acknowledged_at")?)?,
                    acknowledged_by: Store::read_opt_id(get(row, "acknowledged_by")?)?
                        .map(UserId),
                    resolved_at: Store::read_opt_time(get(row, "resolved_at")?)?,
                })
            }

            fn point(row: &Row) -> Result<TelemetryPoint, StoreError> {
                let kind: String = get(row, "kind")?;
                let num: Option<f64> = get(row, "num")?;
                let value = match (kind.as_str(), num) {
                    ("n", Some(n)) => TelemetryValue::Number(n),
                    ("b", Some(n)) => TelemetryValue::Bool(n != 0.0),
                    ("s", _) => TelemetryValue::Text(stored("text", get(row, "text")?, &kind)?),
                    ("a", _) => TelemetryValue::Array {
                        shape: stored("shape", get(row, "shape")?, &kind)?,
                        data: stored("array", get(row, "blob")?, &kind)?,
                    },
                    _ => return stored("telemetry kind", None, &kind),
                };
                Ok(TelemetryPoint {
                    key: get(row, "key")?,
                    ts: Store::read_time(get(row, "ts")?)?,
                    value,
                })
            }

            /// The stored columns of a value: kind, num, text, shape, blob.
            fn value_columns(
                value: &TelemetryValue,
            ) -> (&'static str, Option<f64>, Option<&str>, Option<&str>, Option<&[u8]>) {
                match value {
                    TelemetryValue::Number(n) => ("n", Some(*n), None, None, None),
                    TelemetryValue::Bool(b) => ("b", Some(f64::from(u8::from(*b))), None, None, None),
                    TelemetryValue::Text(t) => ("s", None, Some(t.as_str()), None, None),
                    TelemetryValue::Array { shape, data } => {
                        ("a", None, None, Some(shape.as_str()), Some(data.as_slice()))
                    }
                }
            }

            /// The condition of a device listing, over `d`, parameters `$1`–`$6`.
            fn device_condition() -> String {
                let ilike = Store::ILIKE;
                format!(
                    "(CAST($1 AS TEXT) IS NULL OR d.owner_id = $1) \
                     AND (CAST($2 AS TEXT) IS NULL OR lower(d.name) {ilike} $2 ESCAPE '\\' \
                     OR lower(d.model) {ilike} $2 ESCAPE '\\' \
                     OR lower(d.location) {ilike} $2 ESCAPE '\\' \
                     OR lower(d.hw_id) {ilike} $2 ESCAPE '\\') \
                     AND (CAST($3 AS TEXT) IS NULL OR d.status = $3) \
                     AND (CAST($4 AS TEXT) IS NULL OR d.model = $4) \
                     AND (CAST($5 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM device_tags t \
                     WHERE t.device_id = d.id AND t.tag = $5)) \
                     AND (CAST($6 AS TEXT) IS NULL OR d.firmware = $6)"
                )
            }

            /// The tags of these devices, by device.
            async fn tags_of<'e, E>(
                executor: E,
                ids: &[Uuid],
            ) -> Result<HashMap<Uuid, Vec<String>>, StoreError>
            where
                E: sqlx::Executor<'e, Database = Db>,
            {
                let mut map: HashMap<Uuid, Vec<String>> = HashMap::new();
                if ids.is_empty() {
                    return Ok(map);
                }
                let mut query = QueryBuilder::<Db>::new(
                    "SELECT device_id, tag FROM device_tags WHERE device_id IN (",
                );
                let mut list = query.separated(", ");
                for id in ids {
                    list.push_bind(Store::id(*id));
                }
                query.push(") ORDER BY device_id, tag");
                let rows: Vec<(Id, String)> =
                    query.build_query_as().fetch_all(executor).await.map_err(err)?;
                for (id, tag) in rows {
                    map.entry(Store::read_id(id)?).or_default().push(tag);
                }
                Ok(map)
            }

            async fn devices_with_tags(
                pool: &sqlx::Pool<Db>,
                rows: &[Row],
            ) -> Result<Vec<DeviceRecord>, StoreError> {
                let ids = rows
                    .iter()
                    .map(|row| Store::read_id(get(row, "id")?))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                let mut tags = tags_of(pool, &ids).await?;
                rows.iter()
                    .zip(&ids)
                    .map(|(row, id)| device(row, tags.remove(id).unwrap_or_default()))
                    .collect()
            }

            async fn write_tags(
                conn: &mut <Db as sqlx::Database>::Connection,
                id: Uuid,
                tags: &[String],
            ) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
                    .bind(Store::id(id))
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                if tags.is_empty() {
                    return Ok(());
                }
                let mut insert =
                    QueryBuilder::<Db>::new("INSERT INTO device_tags (device_id, tag) ");
                insert.push_values(tags, |mut row, tag| {
                    row.push_bind(Store::id(id)).push_bind(tag.as_str());
                });
                insert.push(" ON CONFLICT DO NOTHING");
                insert.build().execute(&mut *conn).await.map_err(err)?;
                Ok(())
            }

            /// Writes points into `table` (`telemetry` or `telemetry_latest`, which have the same
            /// columns), [`POINT_CHUNK`] rows per statement, each ending with `on_conflict`.
            async fn write_points(
                conn: &mut <Db as sqlx::Database>::Connection,
                table: &str,
                points: &[(Uuid, &TelemetryPoint)],
                on_conflict: &str,
            ) -> Result<(), StoreError> {
                for chunk in points.chunks(POINT_CHUNK) {
                    let mut insert = QueryBuilder::<Db>::new(format!(
                        "INSERT INTO {table} (device_id, {POINT_COLUMNS}) "
                    ));
                    insert.push_values(chunk, |mut row, (device, p)| {
                        let (kind, num, text, shape, blob) = value_columns(&p.value);
                        row.push_bind(Store::id(*device))
                            .push_bind(p.key.as_str())
                            .push_bind(Store::time(p.ts))
                            .push_bind(kind)
                            .push_bind(num)
                            .push_bind(text)
                            .push_bind(shape)
                            .push_bind(blob);
                    });
                    insert.push(on_conflict);
                    insert.build().execute(&mut *conn).await.map_err(telemetry_err)?;
                }
                Ok(())
            }

            const EVENT_COLUMNS: &str = "id, device_id, kind, data, at";

            fn event_err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("device event", e)
            }

            fn event(row: &Row) -> Result<DeviceEventRecord, StoreError> {
                Ok(DeviceEventRecord {
                    id: get(row, "id")?,
                    device_id: Store::read_id(get(row, "device_id")?)?,
                    kind: get(row, "kind")?,
                    data: get(row, "data")?,
                    at: Store::read_time(get(row, "at")?)?,
                })
            }

            const TOKEN_COLUMNS: &str = "id, owner_id, created_by, prefix, model, tags, max_uses, \
                uses, created_at, expires_at, revoked_at, last_used_at";

            fn token_err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("provisioning token", e)
            }

            /// A token's tags are identifiers, kept space-separated.
            fn token(row: &Row) -> Result<ProvisioningTokenRecord, StoreError> {
                let tags: String = get(row, "tags")?;
                Ok(ProvisioningTokenRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    owner: UserId(Store::read_id(get(row, "owner_id")?)?),
                    created_by: Store::read_opt_id(get(row, "created_by")?)?.map(UserId),
                    prefix: get(row, "prefix")?,
                    model: get(row, "model")?,
                    tags: tags.split_whitespace().map(str::to_owned).collect(),
                    max_uses: get(row, "max_uses")?,
                    uses: get(row, "uses")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    expires_at: Store::read_time(get(row, "expires_at")?)?,
                    revoked_at: Store::read_opt_time(get(row, "revoked_at")?)?,
                    last_used_at: Store::read_opt_time(get(row, "last_used_at")?)?,
                })
            }

            /// Why a token could not be used for a claim (in the claim's transaction).
            async fn why_unusable(
                conn: &mut <Db as sqlx::Database>::Connection,
                claim: &Claim,
            ) -> Result<ClaimRefusal, StoreError> {
                let row = sqlx::query(&format!(
                    "SELECT {TOKEN_COLUMNS}, (SELECT u.active FROM users u \
                     WHERE u.id = owner_id) AS owner_active \
                     FROM provisioning_tokens WHERE token_hash = $1"
                ))
                .bind(&claim.token_hash)
                .fetch_optional(&mut *conn)
                .await
                .map_err(token_err)?;
                let Some(row) = row else {
                    return Ok(ClaimRefusal::Unknown);
                };
                let found = token(&row)?;
                let active: Option<bool> = get(&row, "owner_active")?;
                Ok(if found.revoked_at.is_some() || active != Some(true) {
                    ClaimRefusal::Unknown
                } else if found.expires_at <= claim.now {
                    ClaimRefusal::Expired
                } else if found.uses >= found.max_uses {
                    ClaimRefusal::UsedUp
                } else {
                    ClaimRefusal::WrongModel(found.model)
                })
            }

            /// A scope's bytes of one day: `("device:<id>" | "owner:<id>", day number)`.
            type UsageKey = (String, i64);

            /// Usage rows per statement: three parameters each.
            const USAGE_CHUNK: usize = 1000;

            /// The stored bytes of every `key` (sorted), each row created if missing and
            /// locked until the transaction ends. Rows are locked in the keys' order, the same
            /// on every node, so that two writers that share scopes wait for each other instead
            /// of deadlocking.
            async fn lock_usage(
                conn: &mut <Db as sqlx::Database>::Connection,
                keys: &[UsageKey],
            ) -> Result<HashMap<UsageKey, i64>, StoreError> {
                let mut used = HashMap::with_capacity(keys.len());
                for chunk in keys.chunks(USAGE_CHUNK) {
                    let mut query =
                        QueryBuilder::<Db>::new("INSERT INTO telemetry_usage (scope, day, bytes) ");
                    query.push_values(chunk, |mut row, (scope, day)| {
                        row.push_bind(scope.as_str()).push_bind(*day).push_bind(0_i64);
                    });
                    // An update that changes nothing, so that an existing row is locked and read.
                    query.push(
                        " ON CONFLICT (scope, day) DO UPDATE SET bytes = telemetry_usage.bytes \
                         RETURNING scope, day, bytes",
                    );
                    let rows: Vec<(String, i64, i64)> = query
                        .build_query_as()
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(telemetry_err)?;
                    used.extend(rows.into_iter().map(|(scope, day, bytes)| ((scope, day), bytes)));
                }
                Ok(used)
            }

            /// Stores the bytes of every scope in `changed`.
            async fn store_usage(
                conn: &mut <Db as sqlx::Database>::Connection,
                changed: &[(&UsageKey, i64)],
            ) -> Result<(), StoreError> {
                for chunk in changed.chunks(USAGE_CHUNK) {
                    let mut query =
                        QueryBuilder::<Db>::new("INSERT INTO telemetry_usage (scope, day, bytes) ");
                    query.push_values(chunk, |mut row, ((scope, day), bytes)| {
                        row.push_bind(scope.as_str()).push_bind(*day).push_bind(*bytes);
                    });
                    query.push(" ON CONFLICT (scope, day) DO UPDATE SET bytes = excluded.bytes");
                    query.build().execute(&mut *conn).await.map_err(telemetry_err)?;
                }
                Ok(())
            }

            /// The budgets' scopes of one batch: its device's and its owner's, when limited.
            fn usage_keys(
                b: &TelemetryBatch,
                budget: &TelemetryBudget,
            ) -> (Option<UsageKey>, Option<UsageKey>) {
                let day = b.received_at.timestamp().div_euclid(86_400);
                let device = (budget.per_device > 0).then(|| (format!("device:{}", b.device_id), day));
                let owner = b
                    .owner
                    .filter(|_| budget.per_owner > 0)
                    .map(|owner| (format!("owner:{}", owner.0), day));
                (device, owner)
            }

            async fn insert_device(
                conn: &mut <Db as sqlx::Database>::Connection,
                new: &DeviceRecord,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO devices (id, owner_id, name, model, location, metadata, \
                     hw_id, firmware, status, last_seen, inactivity_timeout, \
                     heartbeat, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .bind(Store::id(new.id))
                .bind(new.owner.map(|u| Store::id(u.0)))
                .bind(&new.name)
                .bind(&new.model)
                .bind(new.location.as_deref())
                .bind(&new.metadata)
                .bind(new.hardware_id.as_deref())
                .bind(new.firmware.as_deref())
                .bind(new.status.as_str())
                .bind(new.last_seen.map(Store::time))
                .bind(new.inactivity_timeout)
                .bind(new.heartbeat.as_deref())
                .bind(Store::time(new.created_at))
                .bind(Store::time(new.updated_at))
                .execute(&mut *conn)
                .await
                .map_err(err)?;
                write_tags(&mut *conn, new.id, &new.tags).await
            }

            /// Revokes a device's usable keys.
            async fn revoke_keys(
                conn: &mut <Db as sqlx::Database>::Connection,
                device: Uuid,
                now: DateTime<Utc>,
            ) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "UPDATE device_keys SET revoked_at = $2 WHERE device_id = $1 \
                     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
                )
                .bind(Store::id(device))
                .bind(Store::time(now))
                .execute(&mut *conn)
                .await
                .map_err(err)?;
                Ok(done.rows_affected())
            }

            async fn insert_key(
                conn: &mut <Db as sqlx::Database>::Connection,
                device: Uuid,
                key: &NewDeviceKey,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO device_keys (id, device_id, key_hash, prefix, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(Store::id(key.id))
                .bind(Store::id(device))
                .bind(&key.hash)
                .bind(&key.prefix)
                .bind(Store::time(key.created_at))
                .execute(&mut *conn)
                .await
                .map_err(err)?;
                Ok(())
            }

            /// Resolves the live `silent` alert of a device.
            async fn resolve_silence(
                conn: &mut <Db as sqlx::Database>::Connection,
                device: Uuid,
                now: DateTime<Utc>,
            ) -> Result<Vec<AlertRecord>, StoreError> {
                let rows = sqlx::query(&format!(
                    "UPDATE device_alerts SET state = 'resolved', resolved_at = $2 \
                     WHERE device_id = $1 AND kind = 'silent' AND state <> 'resolved' \
                     RETURNING {}",
                    ALERT_COLUMNS.replace("a.", "")
                ))
                .bind(Store::id(device))
                .bind(Store::time(now))
                .fetch_all(&mut *conn)
                .await
                .map_err(alert_err)?;
                rows.iter().map(alert).collect()
            }

            #[async_trait]
            impl DeviceStore for Store {
                async fn create_device(
                    &self,
                    new: &DeviceRecord,
                    key: &NewDeviceKey,
                ) -> Result<(), StoreError> {
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    insert_device(&mut tx, new).await?;
                    insert_key(&mut tx, new.id, key).await?;
                    tx.commit().await.map_err(err)
                }

                async fn device(&self, id: Uuid) -> Result<DeviceRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = $1"
                    ))
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    let mut found = devices_with_tags(&self.pool, &[row]).await?;
                    found.pop().ok_or(StoreError::NotFound { entity: "device" })
                }

                async fn list_devices(
                    &self,
                    filter: &DeviceFilter,
                ) -> Result<(Vec<DeviceRecord>, u64), StoreError> {
                    let condition = device_condition();
                    let owner = filter.owner.map(|u| Store::id(u.0));
                    let q = filter.q.as_deref().map(like_pattern);
                    let status = filter.status.map(DeviceStatus::as_str);
                    let rows = sqlx::query(&format!(
                        "SELECT {DEVICE_COLUMNS} FROM devices d WHERE {condition} \
                         ORDER BY d.name, d.id LIMIT $7 OFFSET $8"
                    ))
                    .bind(owner.clone())
                    .bind(q.as_deref())
                    .bind(status)
                    .bind(filter.model.as_deref())
                    .bind(filter.tag.as_deref())
                    .bind(filter.firmware.as_deref())
                    .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
                    .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    let total: i64 = sqlx::query_scalar(&format!(
                        "SELECT COUNT(*) FROM devices d WHERE {condition}"
                    ))
                    .bind(owner.clone())
                    .bind(q.as_deref())
                    .bind(status)
                    .bind(filter.model.as_deref())
                    .bind(filter.tag.as_deref())
                    .bind(filter.firmware.as_deref())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    let devices = devices_with_tags(&self.pool, &rows).await?;
                    Ok((devices, u64::try_from(total).unwrap_or_default()))
                }

                async fn update_device(
                    &self,
                    id: Uuid,
                    change: &DeviceChange,
                    now: DateTime<Utc>,
                ) -> Result<DeviceRecord, StoreError> {
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    let changed = sqlx::query(
                        "UPDATE devices SET name = COALESCE($2, name), \
                         model = COALESCE($3, model), \
                         location = CASE WHEN $4 THEN $5 ELSE location END, \
                         metadata = COALESCE($6, metadata), \
                         inactivity_timeout = CASE WHEN $7 THEN $8 ELSE inactivity_timeout END, \
                         updated_at = $9 WHERE id = $1",
                    )
                    .bind(Store::id(id))
                    .bind(change.name.as_deref())
                    .bind(change.model.as_deref())
                    .bind(change.location.is_some())
                    .bind(change.location.clone().flatten())
                    .bind(change.metadata.as_deref())
                    .bind(change.inactivity_timeout.is_some())
                    .bind(change.inactivity_timeout.flatten())
                    .bind(Store::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    if changed.rows_affected() == 0 {
                        return Err(StoreError::NotFound { entity: "device" });
                    }
                    if let Some(tags) = &change.tags {
                        write_tags(&mut tx, id, tags).await?;
                    }
                    tx.commit().await.map_err(err)?;
                    self.device(id).await
                }

                async fn delete_device(&self, id: Uuid) -> Result<(), StoreError> {
                    // Its telemetry first, in rounds of their own: one cascade of a device's
                    // whole history would hold SQLite's write lock for as long as it takes.
                    loop {
                        let round = sqlx::query(
                            "DELETE FROM telemetry WHERE (device_id, key, ts) IN \
                             (SELECT device_id, key, ts FROM telemetry WHERE device_id = $1 \
                             LIMIT $2)",
                        )
                        .bind(Store::id(id))
                        .bind(i64::try_from(POINT_CHUNK * 10).unwrap_or(i64::MAX))
                        .execute(&self.pool)
                        .await
                        .map_err(telemetry_err)?;
                        if round.rows_affected() < u64::try_from(POINT_CHUNK * 10).unwrap_or(0) {
                            break;
                        }
                    }
                    let done = sqlx::query("DELETE FROM devices WHERE id = $1")
                        .bind(Store::id(id))
                        .execute(&self.pool)
                        .await
                        .map_err(err)?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound { entity: "device" });
                    }
                    Ok(())
                }

                async fn device_by_key(
                    &self,
                    key_hash: &str,
                    now: DateTime<Utc>,
                ) -> Result<(DeviceRecord, DeviceKeyRecord), StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {KEY_COLUMNS} FROM device_keys k WHERE k.key_hash = $1 \
                         AND {USABLE}"
                    ))
                    .bind(key_hash)
                    .bind(Store::time(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("device key", e))?;
                    let key = key(&row)?;
                    let device = self.device(key.device_id).await?;
                    Ok((device, key))
                }

                async fn device_key_usable(
                    &self,
                    key_id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let found: Option<i64> = sqlx::query_scalar(&format!(
                        "SELECT 1 FROM device_keys k WHERE k.id = $1 AND {USABLE}"
                    ))
                    .bind(Store::id(key_id))
                    .bind(Store::time(now))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(found.is_some())
                }

                async fn device_keys(
                    &self,
                    device: Uuid,
                ) -> Result<Vec<DeviceKeyRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {KEY_COLUMNS} FROM device_keys k WHERE k.device_id = $1 \
                         ORDER BY k.created_at DESC, k.id"
                    ))
                    .bind(Store::id(device))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter().map(key).collect()
                }

                async fn rotate_device_key(
                    &self,
                    device: Uuid,
                    new: &NewDeviceKey,
                    old_until: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    sqlx::query(
                        "UPDATE device_keys SET expires_at = $2 WHERE device_id = $1 \
                         AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
                    )
                    .bind(Store::id(device))
                    .bind(Store::time(old_until))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    insert_key(&mut tx, device, new).await?;
                    tx.commit().await.map_err(err)
                }

                async fn revoke_device_keys(
                    &self,
                    device: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<u64, StoreError> {
                    let mut conn = self.pool.acquire().await.map_err(err)?;
                    revoke_keys(&mut conn, device, now).await
                }

                async fn record_seen(&self, seen: &[Seen]) -> Result<(), StoreError> {
                    if seen.is_empty() {
                        return Ok(());
                    }
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    for one in seen {
                        sqlx::query(
                            "UPDATE devices SET \
                             last_seen = CASE WHEN last_seen IS NULL OR last_seen < $2 \
                             THEN $2 ELSE last_seen END, \
                             heartbeat = COALESCE($3, heartbeat) WHERE id = $1",
                        )
                        .bind(Store::id(one.device_id))
                        .bind(Store::time(one.at))
                        .bind(one.heartbeat.as_deref())
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    }
                    tx.commit().await.map_err(err)
                }

                async fn set_device_status(
                    &self,
                    device: Uuid,
                    status: DeviceStatus,
                    at: DateTime<Utc>,
                ) -> Result<(bool, Vec<AlertRecord>), StoreError> {
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    // A write that changes nothing but takes the row's lock, so that a
                    // concurrent `mark_silent` is either seen here or waits for this one.
                    let before: Option<String> = sqlx::query_scalar(
                        "UPDATE devices SET status = status WHERE id = $1 RETURNING status",
                    )
                            .bind(Store::id(device))
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(err)?;
                    let Some(before) = before else {
                        return Err(StoreError::NotFound { entity: "device" });
                    };
                    sqlx::query(
                        "UPDATE devices SET status = $2, \
                         last_seen = CASE WHEN last_seen IS NULL OR last_seen < $3 \
                         THEN $3 ELSE last_seen END WHERE id = $1",
                    )
                    .bind(Store::id(device))
                    .bind(status.as_str())
                    .bind(Store::time(at))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    let resolved = if before == "silent" && status != DeviceStatus::Silent {
                        resolve_silence(&mut tx, device, at).await?
                    } else {
                        Vec::new()
                    };
                    tx.commit().await.map_err(err)?;
                    Ok((before != status.as_str(), resolved))
                }

                async fn mark_silent(
                    &self,
                    device: Uuid,
                    cutoff: DateTime<Utc>,
                    alert_id: Uuid,
                    detail: &str,
                    now: DateTime<Utc>,
                ) -> Result<Option<AlertRecord>, StoreError> {
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    let changed = sqlx::query(
                        "UPDATE devices SET status = 'silent' WHERE id = $1 \
                         AND status <> 'silent' AND last_seen IS NOT NULL AND last_seen <= $2",
                    )
                    .bind(Store::id(device))
                    .bind(Store::time(cutoff))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    if changed.rows_affected() == 0 {
                        return Ok(None);
                    }
                    let row = sqlx::query(&format!(
                        "INSERT INTO device_alerts (id, device_id, kind, state, detail, \
                         opened_at) VALUES ($1, $2, 'silent', 'open', $3, $4) \
                         ON CONFLICT DO NOTHING RETURNING {}",
                        ALERT_COLUMNS.replace("a.", "")
                    ))
                    .bind(Store::id(alert_id))
                    .bind(Store::id(device))
                    .bind(detail)
                    .bind(Store::time(now))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(alert_err)?;
                    tx.commit().await.map_err(err)?;
                    row.as_ref().map(alert).transpose()
                }

                async fn presences(&self) -> Result<Vec<Presence>, StoreError> {
                    let rows: Vec<(Id, String, String, Option<Time>, Option<i64>)> =
                        sqlx::query_as(
                            "SELECT id, model, status, last_seen, inactivity_timeout \
                             FROM devices WHERE last_seen IS NOT NULL",
                        )
                        .fetch_all(&self.pool)
                        .await
                        .map_err(err)?;
                    rows.into_iter()
                        .map(|(id, model, status, last_seen, timeout)| {
                            Ok(Presence {
                                device_id: Store::read_id(id)?,
                                model,
                                status: stored("status", DeviceStatus::parse(&status), &status)?,
                                last_seen: Store::read_opt_time(last_seen)?,
                                inactivity_timeout: timeout,
                            })
                        })
                        .collect()
                }

                async fn alert(&self, id: Uuid) -> Result<AlertRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {ALERT_COLUMNS} FROM device_alerts a WHERE a.id = $1"
                    ))
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(alert_err)?;
                    alert(&row)
                }

                async fn list_alerts(
                    &self,
                    filter: &AlertFilter,
                ) -> Result<(Vec<AlertRecord>, u64), StoreError> {
                    let condition = "(CAST($1 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM devices d \
                        WHERE d.id = a.device_id AND d.owner_id = $1)) \
                        AND (CAST($2 AS TEXT) IS NULL OR a.device_id = $2) \
                        AND ((CAST($3 AS TEXT) IS NULL AND a.state <> 'resolved') OR a.state = $3)";
                    let owner = filter.owner.map(|u| Store::id(u.0));
                    let device = filter.device.map(Store::id);
                    let state = filter.state.map(AlertState::as_str);
                    let rows = sqlx::query(&format!(
                        "SELECT {ALERT_COLUMNS} FROM device_alerts a WHERE {condition} \
                         ORDER BY a.opened_at DESC, a.id LIMIT $4 OFFSET $5"
                    ))
                    .bind(owner.clone())
                    .bind(device.clone())
                    .bind(state)
                    .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
                    .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(alert_err)?;
                    let total: i64 = sqlx::query_scalar(&format!(
                        "SELECT COUNT(*) FROM device_alerts a WHERE {condition}"
                    ))
                    .bind(owner.clone())
                    .bind(device.clone())
                    .bind(state)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(alert_err)?;
                    let alerts = rows.iter().map(alert).collect::<Result<_, _>>()?;
                    Ok((alerts, u64::try_from(total).unwrap_or_default()))
                }

                async fn advance_alert(
                    &self,
                    id: Uuid,
                    state: AlertState,
                    by: UserId,
                    now: DateTime<Utc>,
                ) -> Result<AlertRecord, StoreError> {
                    let (set, from) = match state {
                        AlertState::Acknowledged => (
                            "state = 'acknowledged', acknowledged_at = $2, acknowledged_by = $3",
                            "state = 'open'",
                        ),
                        AlertState::Resolved => (
                            "state = 'resolved', resolved_at = $2",
                            "state <> 'resolved'",
                        ),
                        AlertState::Open => {
                            return Err(StoreError::invalid("an alert cannot be opened again"));
                        }
                    };
                    let sql = format!(
                        "UPDATE device_alerts SET {set} WHERE id = $1 AND {from} RETURNING {}",
                        ALERT_COLUMNS.replace("a.", "")
                    );
                    let mut query = sqlx::query(&sql).bind(Store::id(id)).bind(Store::time(now));
                    if state == AlertState::Acknowledged {
                        query = query.bind(Store::id(by.0));
                    }
                    let row = query
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(alert_err)?;
                    match row {
                        Some(row) => alert(&row),
                        None => {
                            // Either there is no such alert, or it has moved on.
                            self.alert(id).await?;
                            Err(StoreError::Conflict {
                                entity: "alert",
                                source: "the alert has moved past that state".into(),
                            })
                        }
                    }
                }

                async fn append_telemetry(
                    &self,
                    batches: &[TelemetryBatch],
                    budget: &TelemetryBudget,
                ) -> Result<Vec<Appended>, StoreError> {
                    if batches.is_empty() {
                        return Ok(Vec::new());
                    }
                    // A write transaction from its start: it reads, then writes what it read.
                    let mut tx = self
                        .pool
                        .begin_with(Store::BEGIN_WRITE)
                        .await
                        .map_err(telemetry_err)?;
                    // Repeats first, whatever the budgets: a stored sequence number, or one
                    // earlier in this call.
                    let mut stored_before = HashSet::new();
                    for chunk in batches.chunks(200) {
                        let mut query = QueryBuilder::<Db>::new(
                            "SELECT device_id, seq FROM telemetry_batches WHERE (device_id, seq) IN (",
                        );
                        let mut list = query.separated(", ");
                        for b in chunk {
                            list.push("(")
                                .push_bind_unseparated(Store::id(b.device_id))
                                .push_unseparated(", ")
                                .push_bind_unseparated(b.seq)
                                .push_unseparated(")");
                        }
                        query.push(")");
                        let rows: Vec<(Id, i64)> = query
                            .build_query_as()
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(telemetry_err)?;
                        for (id, seq) in rows {
                            stored_before.insert((Store::read_id(id)?, seq));
                        }
                    }
                    let mut seen_here = HashSet::new();
                    let mut outcomes: Vec<Appended> = batches
                        .iter()
                        .map(|b| {
                            let key = (b.device_id, b.seq);
                            if stored_before.contains(&key) || !seen_here.insert(key) {
                                Appended::Repeat
                            } else {
                                Appended::Stored
                            }
                        })
                        .collect();
                    // Budgets: every scope's row locked once, in sorted order, then each new
                    // batch taken or refused in the caller's order.
                    let scopes: Vec<_> = batches.iter().map(|b| usage_keys(b, budget)).collect();
                    let keys: Vec<UsageKey> = scopes
                        .iter()
                        .zip(&outcomes)
                        .filter(|(_, o)| **o == Appended::Stored)
                        .flat_map(|((device, owner), _)| device.iter().chain(owner))
                        .cloned()
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let locked = lock_usage(&mut tx, &keys).await?;
                    let mut used = locked.clone();
                    let limit = |budget: u64| i64::try_from(budget).unwrap_or(i64::MAX);
                    for ((b, (device, owner)), outcome) in
                        batches.iter().zip(&scopes).zip(outcomes.iter_mut())
                    {
                        if *outcome != Appended::Stored {
                            continue;
                        }
                        let cost = i64::try_from(b.cost).unwrap_or(i64::MAX);
                        let fits = |key: &Option<UsageKey>, budget: u64| {
                            key.as_ref().is_none_or(|k| {
                                used[k].checked_add(cost).is_some_and(|n| n <= limit(budget))
                            })
                        };
                        if !fits(device, budget.per_device) {
                            *outcome = Appended::OverDeviceBudget;
                        } else if !fits(owner, budget.per_owner) {
                            *outcome = Appended::OverOwnerBudget;
                        } else {
                            for key in device.iter().chain(owner) {
                                *used.get_mut(key).expect("locked above") += cost;
                            }
                        }
                    }
                    let mut insert = QueryBuilder::<Db>::new(
                        "INSERT INTO telemetry_batches (device_id, seq, points, received_at) ",
                    );
                    let mut taken: Vec<&TelemetryBatch> = batches
                        .iter()
                        .zip(&outcomes)
                        .filter(|(_, o)| **o == Appended::Stored)
                        .map(|(b, _)| b)
                        .collect();
                    taken.sort_by_key(|b| (b.device_id, b.seq));
                    let mut new = HashSet::new();
                    if !taken.is_empty() {
                        insert.push_values(&taken, |mut row, batch| {
                            row.push_bind(Store::id(batch.device_id))
                                .push_bind(batch.seq)
                                .push_bind(i32::try_from(batch.points.len()).unwrap_or(i32::MAX))
                                .push_bind(Store::time(batch.received_at));
                        });
                        // Another node may have stored the same batch meanwhile: a repeat.
                        insert.push(" ON CONFLICT DO NOTHING RETURNING device_id, seq");
                        let rows: Vec<(Id, i64)> = insert
                            .build_query_as()
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(telemetry_err)?;
                        for (id, seq) in rows {
                            new.insert((Store::read_id(id)?, seq));
                        }
                    }
                    for ((b, (device, owner)), outcome) in
                        batches.iter().zip(&scopes).zip(outcomes.iter_mut())
                    {
                        if *outcome == Appended::Stored && !new.contains(&(b.device_id, b.seq)) {
                            *outcome = Appended::Repeat;
                            let cost = i64::try_from(b.cost).unwrap_or(i64::MAX);
                            for key in device.iter().chain(owner) {
                                *used.get_mut(key).expect("locked above") -= cost;
                            }
                        }
                    }
                    let changed: Vec<(&UsageKey, i64)> = keys
                        .iter()
                        .filter(|k| used[*k] != locked[*k])
                        .map(|k| (k, used[k]))
                        .collect();
                    store_usage(&mut tx, &changed).await?;
                    let stored: Vec<bool> = outcomes.iter().map(|o| *o == Appended::Stored).collect();
                    // Rows in one order on every node (device, key, time), like the budgets.
                    let mut points: Vec<(Uuid, &TelemetryPoint)> = batches
                        .iter()
                        .zip(&stored)
                        .filter(|(_, s)| **s)
                        .flat_map(|(b, _)| b.points.iter().map(move |p| (b.device_id, p)))
                        .collect();
                    points.sort_by(|(a, p), (b, q)| (a, &p.key, p.ts).cmp(&(b, &q.key, q.ts)));
                    write_points(&mut tx, "telemetry", &points, " ON CONFLICT DO NOTHING").await?;
                    // The latest value per key: one row each, the newest point.
                    let mut latest: HashMap<(Uuid, &str), &TelemetryPoint> = HashMap::new();
                    for (device, p) in &points {
                        let slot = latest.entry((*device, p.key.as_str())).or_insert(p);
                        if p.ts > slot.ts {
                            *slot = p;
                        }
                    }
                    let mut latest: Vec<(Uuid, &TelemetryPoint)> =
                        latest.into_iter().map(|((device, _), p)| (device, p)).collect();
                    latest.sort_by(|(a, p), (b, q)| (a, &p.key).cmp(&(b, &q.key)));
                    write_points(
                        &mut tx,
                        "telemetry_latest",
                        &latest,
                        " ON CONFLICT (device_id, key) DO UPDATE SET ts = excluded.ts, \
                         kind = excluded.kind, num = excluded.num, text = excluded.text, \
                         shape = excluded.shape, blob = excluded.blob \
                         WHERE excluded.ts >= telemetry_latest.ts",
                    )
                    .await?;
                    tx.commit().await.map_err(telemetry_err)?;
                    Ok(outcomes)
                }

                async fn telemetry(
                    &self,
                    range: &TelemetryRange,
                ) -> Result<Vec<TelemetryPoint>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {POINT_COLUMNS} FROM telemetry WHERE device_id = $1 AND key = $2 \
                         AND ($3 IS NULL OR ts >= $3) AND ($4 IS NULL OR ts < $4) \
                         AND ($5 IS NULL OR ts > $5) ORDER BY ts LIMIT $6"
                    ))
                    .bind(Store::id(range.device_id))
                    .bind(&range.key)
                    .bind(range.from.map(Store::time))
                    .bind(range.to.map(Store::time))
                    .bind(range.after.map(Store::time))
                    .bind(i64::from(range.limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(telemetry_err)?;
                    rows.iter().map(point).collect()
                }

                async fn telemetry_buckets(
                    &self,
                    range: &TelemetryRange,
                    bucket_secs: i64,
                    aggregate: Aggregate,
                ) -> Result<Vec<TelemetryBucket>, StoreError> {
                    let bucket = Store::TIME_BUCKET;
                    let value = aggregate.sql();
                    let numeric = if aggregate == Aggregate::Count {
                        ""
                    } else {
                        "AND kind IN ('n', 'b')"
                    };
                    let rows: Vec<(Time, Option<f64>)> = sqlx::query_as(&format!(
                        "SELECT {bucket} AS bucket, CAST({value} AS DOUBLE PRECISION) \
                         FROM telemetry WHERE device_id = $1 AND key = $2 {numeric} \
                         AND ($3 IS NULL OR ts >= $3) AND ($4 IS NULL OR ts < $4) \
                         GROUP BY bucket ORDER BY bucket LIMIT $6"
                    ))
                    .bind(Store::id(range.device_id))
                    .bind(&range.key)
                    .bind(range.from.map(Store::time))
                    .bind(range.to.map(Store::time))
                    .bind(bucket_secs)
                    .bind(i64::from(range.limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(telemetry_err)?;
                    rows.into_iter()
                        .map(|(start, value)| {
                            Ok(TelemetryBucket {
                                start: Store::read_time(start)?,
                                value: value.unwrap_or_default(),
                            })
                        })
                        .collect()
                }

                async fn telemetry_latest(
                    &self,
                    device: Uuid,
                ) -> Result<Vec<TelemetryPoint>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {POINT_COLUMNS} FROM telemetry_latest WHERE device_id = $1 \
                         ORDER BY key"
                    ))
                    .bind(Store::id(device))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(telemetry_err)?;
                    rows.iter().map(point).collect()
                }

                async fn telemetry_key_count(&self, device: Uuid) -> Result<u64, StoreError> {
                    let count: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM telemetry_latest WHERE device_id = $1",
                    )
                    .bind(Store::id(device))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(telemetry_err)?;
                    Ok(u64::try_from(count).unwrap_or_default())
                }

                async fn prune_telemetry(
                    &self,
                    before: DateTime<Utc>,
                    limit: u32,
                ) -> Result<u64, StoreError> {
                    let done = sqlx::query(
                        "DELETE FROM telemetry WHERE (device_id, key, ts) IN \
                         (SELECT device_id, key, ts FROM telemetry WHERE ts < $1 LIMIT $2)",
                    )
                    .bind(Store::time(before))
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await
                    .map_err(telemetry_err)?;
                    sqlx::query("DELETE FROM telemetry_batches WHERE received_at < $1")
                        .bind(Store::time(before))
                        .execute(&self.pool)
                        .await
                        .map_err(telemetry_err)?;
                    // Budgets of days before `before`'s are done with.
                    sqlx::query("DELETE FROM telemetry_usage WHERE day < $1")
                        .bind(before.timestamp().div_euclid(86_400))
                        .execute(&self.pool)
                        .await
                        .map_err(telemetry_err)?;
                    let events = sqlx::query(
                        "DELETE FROM device_events WHERE id IN \
                         (SELECT id FROM device_events WHERE at < $1 LIMIT $2)",
                    )
                    .bind(Store::time(before))
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await
                    .map_err(event_err)?;
                    sqlx::query(
                        "DELETE FROM device_alerts WHERE state = 'resolved' AND resolved_at < $1",
                    )
                    .bind(Store::time(before))
                    .execute(&self.pool)
                    .await
                    .map_err(alert_err)?;
                    Ok(done.rows_affected().max(events.rows_affected()))
                }

                async fn fleet_counts(
                    &self,
                    owner: Option<UserId>,
                ) -> Result<FleetCounts, StoreError> {
                    let owner = owner.map(|u| Store::id(u.0));
                    let mine = "(CAST($1 AS TEXT) IS NULL OR owner_id = $1)";
                    let by_status: Vec<(String, i64)> = sqlx::query_as(&format!(
                        "SELECT status, COUNT(*) FROM devices WHERE {mine} GROUP BY status \
                         ORDER BY status"
                    ))
                    .bind(owner.clone())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    let by_model: Vec<(String, i64)> = sqlx::query_as(&format!(
                        "SELECT model, COUNT(*) FROM devices WHERE {mine} GROUP BY model \
                         ORDER BY model"
                    ))
                    .bind(owner.clone())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    let by_firmware: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
                        "SELECT firmware, COUNT(*) FROM devices WHERE {mine} GROUP BY firmware \
                         ORDER BY firmware"
                    ))
                    .bind(owner.clone())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    let open_alerts: i64 = sqlx::query_scalar(&format!(
                        "SELECT COUNT(*) FROM device_alerts a JOIN devices d \
                         ON d.id = a.device_id WHERE a.state <> 'resolved' AND {}",
                        mine.replace("owner_id", "d.owner_id")
                    ))
                    .bind(owner.clone())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(alert_err)?;
                    let count = |n: i64| u64::try_from(n).unwrap_or_default();
                    Ok(FleetCounts {
                        by_status: by_status
                            .into_iter()
                            .map(|(s, n)| {
                                Ok((stored("status", DeviceStatus::parse(&s), &s)?, count(n)))
                            })
                            .collect::<Result<_, StoreError>>()?,
                        by_model: by_model.into_iter().map(|(m, n)| (m, count(n))).collect(),
                        by_firmware: by_firmware
                            .into_iter()
                            .map(|(f, n)| (f, count(n)))
                            .collect(),
                        open_alerts: count(open_alerts),
                    })
                }

                async fn create_command(
                    &self,
                    c: &CommandRecord,
                ) -> Result<(CommandRecord, bool), StoreError> {
                    let inserted = sqlx::query(&format!(
                        "INSERT INTO device_commands (id, device_id, name, params, state, \
                         idempotency_key, created_by, created_at, expires_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                         ON CONFLICT (device_id, idempotency_key) DO NOTHING \
                         RETURNING {COMMAND_COLUMNS}"
                    ))
                    .bind(Store::id(c.id))
                    .bind(Store::id(c.device_id))
                    .bind(&c.name)
                    .bind(&c.params)
                    .bind(c.state.as_str())
                    .bind(c.idempotency_key.as_deref())
                    .bind(c.created_by.map(|u| Store::id(u.0)))
                    .bind(Store::time(c.created_at))
                    .bind(Store::time(c.expires_at))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(command_err)?;
                    if let Some(row) = inserted {
                        return Ok((command(&row)?, true));
                    }
                    let row = sqlx::query(&format!(
                        "SELECT {COMMAND_COLUMNS} FROM device_commands \
                         WHERE device_id = $1 AND idempotency_key = $2"
                    ))
                    .bind(Store::id(c.device_id))
                    .bind(c.idempotency_key.as_deref())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(command_err)?;
                    Ok((command(&row)?, false))
                }

                async fn command(&self, id: Uuid) -> Result<CommandRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {COMMAND_COLUMNS} FROM device_commands WHERE id = $1"
                    ))
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(command_err)?;
                    command(&row)
                }

                async fn device_commands(
                    &self,
                    device: Uuid,
                    limit: u32,
                ) -> Result<Vec<CommandRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {COMMAND_COLUMNS} FROM device_commands WHERE device_id = $1 \
                         ORDER BY created_at DESC, id LIMIT $2"
                    ))
                    .bind(Store::id(device))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(command_err)?;
                    rows.iter().map(command).collect()
                }

                async fn pending_commands(
                    &self,
                    devices: &[Uuid],
                    now: DateTime<Utc>,
                ) -> Result<Vec<CommandRecord>, StoreError> {
                    let mut out = Vec::new();
                    for chunk in devices.chunks(POINT_CHUNK) {
                        let mut query = QueryBuilder::<Db>::new(format!(
                            "SELECT {COMMAND_COLUMNS} FROM device_commands \
                             WHERE state IN ('queued', 'delivered') AND expires_at > "
                        ));
                        query.push_bind(Store::time(now)).push(" AND device_id IN (");
                        let mut list = query.separated(", ");
                        for id in chunk {
                            list.push_bind(Store::id(*id));
                        }
                        query.push(") ORDER BY created_at, id");
                        let rows = query
                            .build()
                            .fetch_all(&self.pool)
                            .await
                            .map_err(command_err)?;
                        for row in &rows {
                            out.push(command(row)?);
                        }
                    }
                    Ok(out)
                }

                async fn mark_delivered(
                    &self,
                    ids: &[Uuid],
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    for chunk in ids.chunks(POINT_CHUNK) {
                        let mut query = QueryBuilder::<Db>::new(
                            "UPDATE device_commands SET state = 'delivered', delivered_at = ",
                        );
                        query
                            .push_bind(Store::time(now))
                            .push(" WHERE state IN ('queued', 'delivered') AND id IN (");
                        let mut list = query.separated(", ");
                        for id in chunk {
                            list.push_bind(Store::id(*id));
                        }
                        query.push(")");
                        query.build().execute(&self.pool).await.map_err(command_err)?;
                    }
                    Ok(())
                }

                async fn finish_command(
                    &self,
                    device: Uuid,
                    id: Uuid,
                    state: CommandState,
                    output: Option<&str>,
                    now: DateTime<Utc>,
                ) -> Result<Option<CommandRecord>, StoreError> {
                    let row = sqlx::query(&format!(
                        "UPDATE device_commands SET state = $3, output = $4, finished_at = $5 \
                         WHERE id = $1 AND device_id = $2 AND state IN ('queued', 'delivered') \
                         RETURNING {COMMAND_COLUMNS}"
                    ))
                    .bind(Store::id(id))
                    .bind(Store::id(device))
                    .bind(state.as_str())
                    .bind(output)
                    .bind(Store::time(now))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(command_err)?;
                    row.as_ref().map(command).transpose()
                }

                async fn expire_commands(
                    &self,
                    now: DateTime<Utc>,
                ) -> Result<Vec<CommandRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "UPDATE device_commands SET state = 'expired', finished_at = $1 \
                         WHERE state IN ('queued', 'delivered') AND expires_at <= $1 \
                         RETURNING {COMMAND_COLUMNS}"
                    ))
                    .bind(Store::time(now))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(command_err)?;
                    rows.iter().map(command).collect()
                }

                async fn set_desired_config(
                    &self,
                    device: Uuid,
                    desired: &str,
                    now: DateTime<Utc>,
                ) -> Result<ConfigRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "INSERT INTO device_config (device_id, desired, desired_version, \
                         desired_at) VALUES ($1, $2, 1, $3) \
                         ON CONFLICT (device_id) DO UPDATE SET desired = excluded.desired, \
                         desired_version = device_config.desired_version + 1, \
                         desired_at = excluded.desired_at RETURNING {CONFIG_COLUMNS}"
                    ))
                    .bind(Store::id(device))
                    .bind(desired)
                    .bind(Store::time(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    config(&row)
                }

                async fn set_reported_config(
                    &self,
                    device: Uuid,
                    reported: &str,
                    version: Option<i64>,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "INSERT INTO device_config (device_id, desired, desired_version, \
                         desired_at, reported, reported_version, reported_at) \
                         VALUES ($1, '{}', 0, $4, $2, $3, $4) \
                         ON CONFLICT (device_id) DO UPDATE SET reported = excluded.reported, \
                         reported_version = excluded.reported_version, \
                         reported_at = excluded.reported_at",
                    )
                    .bind(Store::id(device))
                    .bind(reported)
                    .bind(version)
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(())
                }

                async fn device_config(&self, device: Uuid) -> Result<ConfigRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {CONFIG_COLUMNS} FROM device_config WHERE device_id = $1"
                    ))
                    .bind(Store::id(device))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("device config", e))?;
                    config(&row)
                }

                async fn append_device_event(
                    &self,
                    device: Uuid,
                    kind: &str,
                    data: Option<&str>,
                    at: DateTime<Utc>,
                ) -> Result<DeviceEventRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "INSERT INTO device_events (device_id, kind, data, at) \
                         VALUES ($1, $2, $3, $4) RETURNING {EVENT_COLUMNS}"
                    ))
                    .bind(Store::id(device))
                    .bind(kind)
                    .bind(data)
                    .bind(Store::time(at))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(event_err)?;
                    event(&row)
                }

                async fn device_events(
                    &self,
                    device: Uuid,
                    kind: Option<&str>,
                    before: Option<i64>,
                    limit: u32,
                ) -> Result<Vec<DeviceEventRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {EVENT_COLUMNS} FROM device_events WHERE device_id = $1 \
                         AND (CAST($2 AS TEXT) IS NULL OR kind = $2) \
                         AND (CAST($3 AS BIGINT) IS NULL OR id < $3) \
                         ORDER BY id DESC LIMIT $4"
                    ))
                    .bind(Store::id(device))
                    .bind(kind)
                    .bind(before)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(event_err)?;
                    rows.iter().map(event).collect()
                }

                async fn create_provisioning_token(
                    &self,
                    token: &ProvisioningTokenRecord,
                    hash: &str,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "INSERT INTO provisioning_tokens (id, token_hash, prefix, owner_id, \
                         created_by, model, tags, max_uses, uses, created_at, expires_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10)",
                    )
                    .bind(Store::id(token.id))
                    .bind(hash)
                    .bind(&token.prefix)
                    .bind(Store::id(token.owner.0))
                    .bind(token.created_by.map(|u| Store::id(u.0)))
                    .bind(&token.model)
                    .bind(token.tags.join(" "))
                    .bind(token.max_uses)
                    .bind(Store::time(token.created_at))
                    .bind(Store::time(token.expires_at))
                    .execute(&self.pool)
                    .await
                    .map_err(token_err)?;
                    Ok(())
                }

                async fn provisioning_token(
                    &self,
                    id: Uuid,
                ) -> Result<ProvisioningTokenRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {TOKEN_COLUMNS} FROM provisioning_tokens WHERE id = $1"
                    ))
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(token_err)?;
                    token(&row)
                }

                async fn provisioning_tokens(
                    &self,
                    owner: Option<UserId>,
                    limit: u32,
                ) -> Result<Vec<ProvisioningTokenRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {TOKEN_COLUMNS} FROM provisioning_tokens \
                         WHERE CAST($1 AS TEXT) IS NULL OR owner_id = $1 \
                         ORDER BY created_at DESC, id LIMIT $2"
                    ))
                    .bind(owner.map(|u| Store::id(u.0)))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(token_err)?;
                    rows.iter().map(token).collect()
                }

                async fn revoke_provisioning_token(
                    &self,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE provisioning_tokens SET revoked_at = $2 \
                         WHERE id = $1 AND revoked_at IS NULL",
                    )
                    .bind(Store::id(id))
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(token_err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn claim_device(&self, claim: &Claim) -> Result<ClaimOutcome, StoreError> {
                    let Some(hardware_id) = claim.device.hardware_id.as_deref() else {
                        return Err(StoreError::Other("a claim needs a hardware id".into()));
                    };
                    // Dropped without a commit, the transaction rolls back: a refusal changes
                    // nothing, the token's use included.
                    let mut tx = self.pool.begin_with(Store::BEGIN_WRITE).await.map_err(err)?;
                    let used = sqlx::query(&format!(
                        "UPDATE provisioning_tokens SET uses = uses + 1, last_used_at = $2 \
                         WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > $2 \
                         AND uses < max_uses AND model = $3 \
                         AND EXISTS (SELECT 1 FROM users u WHERE u.id = owner_id AND u.active) \
                         RETURNING {TOKEN_COLUMNS}"
                    ))
                    .bind(&claim.token_hash)
                    .bind(Store::time(claim.now))
                    .bind(&claim.model)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(token_err)?;
                    let Some(row) = used else {
                        return Ok(ClaimOutcome::Refused(why_unusable(&mut tx, claim).await?));
                    };
                    let token = token(&row)?;
                    // The token owner's device with this hardware id keeps its identity (its
                    // id, name, tags, history) and gets the firmware it reports now — but only
                    // a device of the token's model whose keys are all revoked or expired: the
                    // owner re-provisions it, a token and a public hardware id alone do not
                    // take over a working device.
                    let again: Option<Id> = sqlx::query_scalar(
                        "UPDATE devices SET firmware = COALESCE($4, firmware), updated_at = $5 \
                         WHERE hw_id = $1 AND owner_id = $2 AND model = $3 \
                         AND NOT EXISTS (SELECT 1 FROM device_keys k \
                             WHERE k.device_id = devices.id AND k.revoked_at IS NULL \
                             AND (k.expires_at IS NULL OR k.expires_at > $5)) \
                         RETURNING id",
                    )
                    .bind(hardware_id)
                    .bind(Store::id(token.owner.0))
                    .bind(&claim.model)
                    .bind(claim.firmware.as_deref())
                    .bind(Store::time(claim.now))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(err)?;
                    let outcome = if let Some(id) = again {
                        let id = Store::read_id(id)?;
                        let revoked = revoke_keys(&mut tx, id, claim.now).await?;
                        insert_key(&mut tx, id, &claim.key).await?;
                        let row = sqlx::query(&format!(
                            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = $1"
                        ))
                        .bind(Store::id(id))
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(err)?;
                        let mut tags = tags_of(&mut *tx, &[id]).await?;
                        let device = device(&row, tags.remove(&id).unwrap_or_default())?;
                        ClaimOutcome::Reclaimed { device, revoked }
                    } else {
                        // The owner's own device with this hardware id, not to be taken
                        // over (another user's device with it does not matter).
                        let ours: Option<Id> = sqlx::query_scalar(
                            "SELECT id FROM devices WHERE hw_id = $1 AND owner_id = $2",
                        )
                        .bind(hardware_id)
                        .bind(Store::id(token.owner.0))
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(err)?;
                        if ours.is_some() {
                            return Ok(ClaimOutcome::Refused(ClaimRefusal::NotReclaimable));
                        }
                        let mut device = claim.device.clone();
                        device.owner = Some(token.owner);
                        device.model.clone_from(&claim.model);
                        device.firmware.clone_from(&claim.firmware);
                        device.tags = token.tags;
                        insert_device(&mut tx, &device).await?;
                        insert_key(&mut tx, device.id, &claim.key).await?;
                        ClaimOutcome::Claimed(device)
                    };
                    tx.commit().await.map_err(err)?;
                    Ok(outcome)
                }
            }
        }
    };
}

pub(crate) use device_queries;
