//! Rooms, members and messages on both engines.

/// Expands to a module `$module` with `impl RoomStore for $store`; full-text search runs the
/// store's own [`Dialect::SEARCH`](crate::dialect::Dialect::SEARCH).
macro_rules! room_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use futures_util::TryStreamExt;
            use sqlx::QueryBuilder;
            use unhidra_core::UserId;
            use uuid::Uuid;

            use $crate::StoreError;
            use $crate::dialect::{Dialect, get};
            use $crate::rooms::{
                MessageRange, MessageRecord, NewMessage, RoomChange, RoomListing, RoomRecord,
                RoomRole, RoomStore, SearchHit, Visibility, in_item_order, not_inserted,
                snippet_html,
            };

            type Store = $store;
            type Db = <Store as Dialect>::Db;
            type Row = <Db as sqlx::Database>::Row;

            const ROOM_COLUMNS: &str = "r.id, r.name, r.visibility, r.created_by, r.created_at, \
                r.retention_max_age, r.retention_max_count";

            const MESSAGE_COLUMNS: &str =
                "id, room_id, sender_id, client_msg_id, body, created_at";

            fn room(row: &Row) -> Result<RoomRecord, StoreError> {
                Ok(RoomRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    name: get(row, "name")?,
                    visibility: Visibility::parse(&get::<_, String>(row, "visibility")?)?,
                    created_by: Store::read_opt_id(get(row, "created_by")?)?.map(UserId),
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    retention_max_age: get(row, "retention_max_age")?,
                    retention_max_count: get(row, "retention_max_count")?,
                })
            }

            fn message(row: &Row) -> Result<MessageRecord, StoreError> {
                Ok(MessageRecord {
                    id: get(row, "id")?,
                    room_id: Store::read_id(get(row, "room_id")?)?,
                    sender_id: UserId(Store::read_id(get(row, "sender_id")?)?),
                    client_msg_id: get(row, "client_msg_id")?,
                    body: get(row, "body")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                })
            }

            fn role(row: &Row) -> Result<Option<RoomRole>, StoreError> {
                get::<_, Option<String>>(row, "role")?
                    .map(|r| RoomRole::parse(&r))
                    .transpose()
            }

            fn err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("room", e)
            }

            fn message_err(e: sqlx::Error) -> StoreError {
                StoreError::from_sqlx("message", e)
            }

            #[async_trait]
            impl RoomStore for Store {
                async fn create_room(
                    &self,
                    new: &RoomRecord,
                    owner: UserId,
                ) -> Result<(), StoreError> {
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    sqlx::query(
                        "INSERT INTO rooms (id, name, visibility, created_by, created_at, \
                         retention_max_age, retention_max_count) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(Store::id(new.id))
                    .bind(&new.name)
                    .bind(new.visibility.as_str())
                    .bind(new.created_by.map(|u| Store::id(u.0)))
                    .bind(Store::time(new.created_at))
                    .bind(new.retention_max_age)
                    .bind(new.retention_max_count)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    sqlx::query(
                        "INSERT INTO room_members (room_id, user_id, role, joined_at) \
                         VALUES ($1, $2, 'owner', $3)",
                    )
                    .bind(Store::id(new.id))
                    .bind(Store::id(owner.0))
                    .bind(Store::time(new.created_at))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    tx.commit().await.map_err(err)
                }

                async fn room_with_role(
                    &self,
                    id: Uuid,
                    user: UserId,
                ) -> Result<(RoomRecord, Option<RoomRole>), StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {ROOM_COLUMNS}, m.role FROM rooms r LEFT JOIN room_members m \
                         ON m.room_id = r.id AND m.user_id = $2 WHERE r.id = $1"
                    ))
                    .bind(Store::id(id))
                    .bind(Store::id(user.0))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok((room(&row)?, role(&row)?))
                }

                async fn visible_rooms(
                    &self,
                    user: UserId,
                ) -> Result<Vec<RoomListing>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {ROOM_COLUMNS}, m.role FROM rooms r LEFT JOIN room_members m \
                         ON m.room_id = r.id AND m.user_id = $1 \
                         WHERE r.visibility = 'public' OR m.user_id IS NOT NULL \
                         ORDER BY r.name, r.id"
                    ))
                    .bind(Store::id(user.0))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.iter()
                        .map(|row| {
                            Ok(RoomListing {
                                room: room(row)?,
                                role: role(row)?,
                            })
                        })
                        .collect()
                }

                async fn update_room(
                    &self,
                    id: Uuid,
                    change: &RoomChange,
                ) -> Result<RoomRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "UPDATE rooms SET name = COALESCE($2, name), \
                         visibility = COALESCE($3, visibility), \
                         retention_max_age = CASE WHEN $4 THEN $5 ELSE retention_max_age END, \
                         retention_max_count = CASE WHEN $6 THEN $7 ELSE retention_max_count END \
                         WHERE id = $1 RETURNING {}",
                        // SQLite's RETURNING takes no table alias.
                        ROOM_COLUMNS.replace("r.", "")
                    ))
                    .bind(Store::id(id))
                    .bind(change.name.as_deref())
                    .bind(change.visibility.map(Visibility::as_str))
                    .bind(change.retention_max_age.is_some())
                    .bind(change.retention_max_age.flatten())
                    .bind(change.retention_max_count.is_some())
                    .bind(change.retention_max_count.flatten())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    room(&row)
                }

                async fn delete_room(&self, id: Uuid) -> Result<(), StoreError> {
                    let done = sqlx::query("DELETE FROM rooms WHERE id = $1")
                        .bind(Store::id(id))
                        .execute(&self.pool)
                        .await
                        .map_err(err)?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound { entity: "room" });
                    }
                    Ok(())
                }

                async fn room_role(
                    &self,
                    room: Uuid,
                    user: UserId,
                ) -> Result<Option<RoomRole>, StoreError> {
                    let role: Option<String> = sqlx::query_scalar(
                        "SELECT role FROM room_members WHERE room_id = $1 AND user_id = $2",
                    )
                    .bind(Store::id(room))
                    .bind(Store::id(user.0))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err)?;
                    role.map(|r| RoomRole::parse(&r)).transpose()
                }

                async fn put_member(
                    &self,
                    room: Uuid,
                    user: UserId,
                    role: RoomRole,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "INSERT INTO room_members (room_id, user_id, role, joined_at) \
                         VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role",
                    )
                    .bind(Store::id(room))
                    .bind(Store::id(user.0))
                    .bind(role.as_str())
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("room member", e))?;
                    Ok(())
                }

                async fn remove_member(
                    &self,
                    room: Uuid,
                    user: UserId,
                ) -> Result<bool, StoreError> {
                    let done =
                        sqlx::query("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
                            .bind(Store::id(room))
                            .bind(Store::id(user.0))
                            .execute(&self.pool)
                            .await
                            .map_err(err)?;
                    Ok(done.rows_affected() > 0)
                }

                async fn members(
                    &self,
                    room: Uuid,
                ) -> Result<Vec<(UserId, RoomRole)>, StoreError> {
                    let rows: Vec<(<Store as Dialect>::Id, String)> = sqlx::query_as(
                        "SELECT user_id, role FROM room_members WHERE room_id = $1 \
                         ORDER BY CASE role WHEN 'owner' THEN 0 WHEN 'admin' THEN 1 ELSE 2 END, \
                         joined_at",
                    )
                    .bind(Store::id(room))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err)?;
                    rows.into_iter()
                        .map(|(u, r)| Ok((UserId(Store::read_id(u)?), RoomRole::parse(&r)?)))
                        .collect()
                }

                async fn append_messages(
                    &self,
                    room: Uuid,
                    sender: UserId,
                    items: &[NewMessage<'_>],
                    now: DateTime<Utc>,
                ) -> Result<Vec<(MessageRecord, bool)>, StoreError> {
                    if items.is_empty() {
                        return Ok(Vec::new());
                    }
                    // One statement: the rows get increasing ids in the order of `items`.
                    let mut insert = QueryBuilder::<Db>::new(
                        "INSERT INTO messages (room_id, sender_id, client_msg_id, body, \
                         created_at) ",
                    );
                    insert.push_values(items, |mut row, item| {
                        row.push_bind(Store::id(room))
                            .push_bind(Store::id(sender.0))
                            .push_bind(item.client_msg_id)
                            .push_bind(item.body)
                            .push_bind(Store::time(now));
                    });
                    insert.push(format!(
                        " ON CONFLICT (room_id, sender_id, client_msg_id) DO NOTHING \
                         RETURNING {MESSAGE_COLUMNS}"
                    ));
                    let inserted = insert
                        .build()
                        .fetch_all(&self.pool)
                        .await
                        .map_err(message_err)?
                        .iter()
                        .map(message)
                        .collect::<Result<Vec<_>, _>>()?;
                    let missing = not_inserted(items, &inserted);
                    let mut earlier = Vec::new();
                    if !missing.is_empty() {
                        let mut select = QueryBuilder::<Db>::new(format!(
                            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = "
                        ));
                        select
                            .push_bind(Store::id(room))
                            .push(" AND sender_id = ")
                            .push_bind(Store::id(sender.0))
                            .push(" AND client_msg_id IN (");
                        let mut ids = select.separated(", ");
                        for id in missing {
                            ids.push_bind(id);
                        }
                        select.push(")");
                        earlier = select
                            .build()
                            .fetch_all(&self.pool)
                            .await
                            .map_err(message_err)?
                            .iter()
                            .map(message)
                            .collect::<Result<Vec<_>, _>>()?;
                    }
                    in_item_order(items, inserted, earlier)
                }

                async fn messages(
                    &self,
                    room: Uuid,
                    range: MessageRange,
                ) -> Result<Vec<MessageRecord>, StoreError> {
                    // With `after`, read forward from it; otherwise read back from `before` (or
                    // the end).
                    let forward = range.after.is_some();
                    let sql = format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 \
                         AND (CAST($2 AS BIGINT) IS NULL OR id < $2) \
                         AND (CAST($3 AS BIGINT) IS NULL OR id > $3) \
                         ORDER BY id {} LIMIT $4",
                        if forward { "ASC" } else { "DESC" }
                    );
                    // Rows are read one at a time, so that a page cut short by `max_bytes` never
                    // holds the rest.
                    let mut rows = sqlx::query(&sql)
                        .bind(Store::id(room))
                        .bind(range.before)
                        .bind(range.after)
                        .bind(i64::from(range.limit))
                        .fetch(&self.pool);
                    let mut list = Vec::new();
                    let mut bytes = 0usize;
                    while let Some(row) = rows.try_next().await.map_err(message_err)? {
                        let m = message(&row)?;
                        bytes = bytes.saturating_add(m.body.len());
                        list.push(m);
                        if range.max_bytes.is_some_and(|max| bytes > max && list.len() >= 2) {
                            break;
                        }
                    }
                    if !forward {
                        list.reverse();
                    }
                    Ok(list)
                }

                async fn search_messages(
                    &self,
                    user: UserId,
                    query: &str,
                    room: Option<Uuid>,
                    limit: u32,
                ) -> Result<Vec<SearchHit>, StoreError> {
                    let Some(terms) = Store::search_terms(query) else {
                        return Ok(Vec::new());
                    };
                    let rows = sqlx::query(Store::SEARCH)
                        .bind(terms)
                        .bind(Store::id(user.0))
                        .bind(room.map(Store::id))
                        .bind(i64::from(limit))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(message_err)?;
                    rows.iter()
                        .map(|row| {
                            Ok(SearchHit {
                                message: message(row)?,
                                snippet: snippet_html(&get::<_, String>(row, "snippet")?),
                                score: get(row, "score")?,
                            })
                        })
                        .collect()
                }

                async fn apply_retention(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
                    let by_age = sqlx::query(&format!(
                        "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m \
                         JOIN rooms r ON r.id = m.room_id WHERE r.retention_max_age IS NOT NULL \
                         AND m.created_at < {})",
                        Store::AGE_CUTOFF
                    ))
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(message_err)?;
                    let by_count = sqlx::query(
                        "DELETE FROM messages WHERE id IN (SELECT id FROM (SELECT m.id, \
                         r.retention_max_count AS keep, ROW_NUMBER() OVER (PARTITION BY m.room_id \
                         ORDER BY m.id DESC) AS n FROM messages m JOIN rooms r ON r.id = m.room_id \
                         WHERE r.retention_max_count IS NOT NULL) ranked WHERE n > keep)",
                    )
                    .execute(&self.pool)
                    .await
                    .map_err(message_err)?;
                    Ok(by_age.rows_affected() + by_count.rows_affected())
                }
            }
        }
    };
}

pub(crate) use room_queries;
