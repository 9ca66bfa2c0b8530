//! Users, sessions, signing keys, the audit log, one-time tokens and TOTP on both engines.

/// Expands to a module `$module` with every identity trait implemented for `$store`.
macro_rules! identity_queries {
    ($module:ident, $store:ty) => {
        mod $module {
            use async_trait::async_trait;
            use chrono::{DateTime, Utc};
            use unhidra_core::{Email, UserId};
            use uuid::Uuid;

            use $crate::StoreError;
            use $crate::dialect::{Dialect, get};
            use $crate::jobs::NewJob;
            use $crate::identity::{
                AuditRecord, AuditStore, DeviceHistory, KeyStore, MfaStore, NewAuditEvent,
                NewRefreshToken, NewSession, NewUser, OneTimeTokenStore, Rotation, SessionRecord,
                SessionStore, SigningKeyRecord, TokenPurpose, TotpFactor, UserChange, UserPage,
                UserRecord, UserStore, like_pattern, stored_email, stored_role,
            };

            type Store = $store;
            type Row = <<Store as Dialect>::Db as sqlx::Database>::Row;

            const USER_COLUMNS: &str = "id, email, display_name, password_hash, role, active, \
                email_verified_at, failed_logins, locked_until, totp_enabled_at, created_at, \
                updated_at";

            fn user(row: &Row) -> Result<UserRecord, StoreError> {
                Ok(UserRecord {
                    id: UserId(Store::read_id(get(row, "id")?)?),
                    email: stored_email(&get::<_, String>(row, "email")?)?,
                    display_name: get(row, "display_name")?,
                    password_hash: get(row, "password_hash")?,
                    role: stored_role(&get::<_, String>(row, "role")?)?,
                    active: get(row, "active")?,
                    email_verified_at: Store::read_opt_time(get(row, "email_verified_at")?)?,
                    failed_logins: u32::try_from(get::<_, i32>(row, "failed_logins")?).unwrap_or(0),
                    locked_until: Store::read_opt_time(get(row, "locked_until")?)?,
                    totp_enabled_at: Store::read_opt_time(get(row, "totp_enabled_at")?)?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    updated_at: Store::read_time(get(row, "updated_at")?)?,
                })
            }

            const SESSION_COLUMNS: &str = "id, user_id, user_agent, ip, created_at, last_used_at, \
                expires_at, revoked_at, mfa, authenticated_at";

            fn session(row: &Row) -> Result<SessionRecord, StoreError> {
                Ok(SessionRecord {
                    id: Store::read_id(get(row, "id")?)?,
                    user_id: UserId(Store::read_id(get(row, "user_id")?)?),
                    user_agent: get(row, "user_agent")?,
                    ip: get(row, "ip")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    last_used_at: Store::read_time(get(row, "last_used_at")?)?,
                    expires_at: Store::read_time(get(row, "expires_at")?)?,
                    revoked_at: Store::read_opt_time(get(row, "revoked_at")?)?,
                    mfa: get(row, "mfa")?,
                    authenticated_at: Store::read_time(get(row, "authenticated_at")?)?,
                })
            }

            #[async_trait]
            impl UserStore for Store {
                async fn create_user(&self, user: &NewUser) -> Result<(), StoreError> {
                    self.create_user_with_jobs(user, &[]).await
                }

                async fn create_user_with_jobs(
                    &self,
                    user: &NewUser,
                    jobs: &[NewJob],
                ) -> Result<(), StoreError> {
                    let store_err = |e| StoreError::from_sqlx("user", e);
                    let mut tx = self
                        .pool
                        .begin_with(Store::BEGIN_WRITE)
                        .await
                        .map_err(store_err)?;
                    sqlx::query(
                        "INSERT INTO users (id, email, display_name, password_hash, role, active, \
                         failed_logins, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, TRUE, \
                         0, $6, $6)",
                    )
                    .bind(Store::id(user.id.0))
                    .bind(user.email.as_str())
                    .bind(user.display_name.as_deref())
                    .bind(&user.password_hash)
                    .bind(user.role.as_str())
                    .bind(Store::time(user.now))
                    .execute(&mut *tx)
                    .await
                    .map_err(store_err)?;
                    for job in jobs {
                        Store::insert_job(&mut tx, job).await?;
                    }
                    tx.commit().await.map_err(store_err)?;
                    for job in jobs {
                        self.announce(&job.queue).await;
                    }
                    Ok(())
                }

                async fn user_by_email(&self, email: &Email) -> Result<UserRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {USER_COLUMNS} FROM users WHERE email = $1"
                    ))
                    .bind(email.as_str())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    user(&row)
                }

                async fn user_by_id(&self, id: UserId) -> Result<UserRecord, StoreError> {
                    let row =
                        sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                            .bind(Store::id(id.0))
                            .fetch_one(&self.pool)
                            .await
                            .map_err(|e| StoreError::from_sqlx("user", e))?;
                    user(&row)
                }

                async fn set_password_hash(
                    &self,
                    id: UserId,
                    hash: &str,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    let done = sqlx::query(
                        "UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1",
                    )
                    .bind(Store::id(id.0))
                    .bind(hash)
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound { entity: "user" });
                    }
                    Ok(())
                }

                async fn record_login_failure(
                    &self,
                    id: UserId,
                    lock_at: u32,
                    lock_until: DateTime<Utc>,
                    now: DateTime<Utc>,
                ) -> Result<u32, StoreError> {
                    let count: i32 = sqlx::query_scalar(
                        "UPDATE users SET failed_logins = failed_logins + 1, updated_at = $4, \
                         locked_until = CASE WHEN (failed_logins + 1) % $2 = 0 THEN $3 ELSE \
                         locked_until END WHERE id = $1 RETURNING failed_logins",
                    )
                    .bind(Store::id(id.0))
                    .bind(i32::try_from(lock_at).unwrap_or(i32::MAX))
                    .bind(Store::time(lock_until))
                    .bind(Store::time(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(u32::try_from(count).unwrap_or(0))
                }

                async fn record_login_success(
                    &self,
                    id: UserId,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "UPDATE users SET failed_logins = 0, locked_until = NULL, updated_at = $2 \
                         WHERE id = $1 AND (failed_logins <> 0 OR locked_until IS NOT NULL)",
                    )
                    .bind(Store::id(id.0))
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(())
                }

                async fn list_users(
                    &self,
                    query: Option<&str>,
                    offset: u64,
                    limit: u64,
                ) -> Result<UserPage, StoreError> {
                    let pattern = query.map(like_pattern);
                    let ilike = Store::ILIKE;
                    // The pattern is lower case: `lower` makes SQLite's LIKE match it, and changes
                    // nothing for PostgreSQL's ILIKE.
                    let filter = format!(
                        "(CAST($1 AS TEXT) IS NULL OR email {ilike} $1 ESCAPE '\\' \
                         OR lower(display_name) {ilike} $1 ESCAPE '\\')"
                    );
                    let total: i64 =
                        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM users WHERE {filter}"))
                            .bind(pattern.as_deref())
                            .fetch_one(&self.pool)
                            .await
                            .map_err(|e| StoreError::from_sqlx("user", e))?;
                    let rows = sqlx::query(&format!(
                        "SELECT {USER_COLUMNS} FROM users WHERE {filter} \
                         ORDER BY created_at, id LIMIT $2 OFFSET $3"
                    ))
                    .bind(pattern.as_deref())
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(UserPage {
                        items: rows.iter().map(user).collect::<Result<_, _>>()?,
                        total: u64::try_from(total).unwrap_or(0),
                    })
                }

                async fn count_active_users(&self) -> Result<u64, StoreError> {
                    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE active")
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(u64::try_from(n).unwrap_or(0))
                }

                async fn update_user(
                    &self,
                    id: UserId,
                    change: UserChange,
                    now: DateTime<Utc>,
                ) -> Result<UserRecord, StoreError> {
                    let row = sqlx::query(&format!(
                        "UPDATE users SET role = COALESCE($2, role), active = COALESCE($3, \
                         active), updated_at = $4 WHERE id = $1 RETURNING {USER_COLUMNS}"
                    ))
                    .bind(Store::id(id.0))
                    .bind(change.role.map(|r| r.as_str()))
                    .bind(change.active)
                    .bind(Store::time(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    user(&row)
                }
            }

            #[async_trait]
            impl SessionStore for Store {
                async fn create_session(
                    &self,
                    new: &NewSession,
                    token: &NewRefreshToken,
                ) -> Result<(), StoreError> {
                    let err = |e| StoreError::from_sqlx("session", e);
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    sqlx::query(
                        "INSERT INTO sessions (id, user_id, user_agent, ip, created_at, \
                         last_used_at, expires_at, mfa, authenticated_at) VALUES ($1, $2, $3, $4, \
                         $5, $5, $6, $7, $5)",
                    )
                    .bind(Store::id(new.id))
                    .bind(Store::id(new.user_id.0))
                    .bind(new.user_agent.as_deref())
                    .bind(new.ip.as_deref())
                    .bind(Store::time(new.now))
                    .bind(Store::time(new.expires_at))
                    .bind(new.mfa)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    sqlx::query(
                        "INSERT INTO refresh_tokens (token_hash, session_id, created_at, \
                         expires_at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&token.hash)
                    .bind(Store::id(new.id))
                    .bind(Store::time(new.now))
                    .bind(Store::time(token.expires_at.min(new.expires_at)))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    tx.commit().await.map_err(err)
                }

                async fn rotate_refresh_token(
                    &self,
                    presented: &str,
                    next: &NewRefreshToken,
                    now: DateTime<Utc>,
                ) -> Result<Rotation, StoreError> {
                    let err = |e| StoreError::from_sqlx("refresh token", e);
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    // The compare-and-set: only one caller can flip used_at from NULL; on
                    // PostgreSQL the row lock makes a concurrent second use wait, then see
                    // used_at set, and match nothing.
                    let claimed: Option<<Store as Dialect>::Id> = sqlx::query_scalar(
                        "UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at \
                         IS NULL AND expires_at > $2 RETURNING session_id",
                    )
                    .bind(presented)
                    .bind(Store::time(now))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(err)?;
                    let Some(session_id) = claimed else {
                        let prior: Option<(
                            <Store as Dialect>::Id,
                            Option<<Store as Dialect>::Time>,
                        )> = sqlx::query_as(
                            "SELECT session_id, used_at FROM refresh_tokens WHERE token_hash = $1",
                        )
                        .bind(presented)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(err)?;
                        tx.rollback().await.map_err(err)?;
                        return match prior {
                            Some((sid, Some(used_at))) => {
                                let row = sqlx::query(&format!(
                                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
                                ))
                                .bind(sid)
                                .fetch_one(&self.pool)
                                .await
                                .map_err(err)?;
                                Ok(Rotation::Reused {
                                    session: session(&row)?,
                                    used_at: Store::read_time(used_at)?,
                                })
                            }
                            _ => Ok(Rotation::Invalid),
                        };
                    };
                    let row = sqlx::query(&format!(
                        "UPDATE sessions SET last_used_at = $2 WHERE id = $1 AND revoked_at IS \
                         NULL AND expires_at > $2 RETURNING {SESSION_COLUMNS}"
                    ))
                    .bind(&session_id)
                    .bind(Store::time(now))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(err)?;
                    let Some(row) = row else {
                        tx.rollback().await.map_err(err)?;
                        return Ok(Rotation::Invalid);
                    };
                    let live = session(&row)?;
                    sqlx::query(
                        "INSERT INTO refresh_tokens (token_hash, session_id, created_at, \
                         expires_at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&next.hash)
                    .bind(&session_id)
                    .bind(Store::time(now))
                    .bind(Store::time(next.expires_at.min(live.expires_at)))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    tx.commit().await.map_err(err)?;
                    Ok(Rotation::Rotated(live))
                }

                async fn session_with_user(
                    &self,
                    id: Uuid,
                ) -> Result<(SessionRecord, UserRecord), StoreError> {
                    let row = sqlx::query(&format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
                    ))
                    .bind(Store::id(id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("session", e))?;
                    let found = session(&row)?;
                    let owner = self.user_by_id(found.user_id).await?;
                    Ok((found, owner))
                }

                async fn live_sessions(
                    &self,
                    user_id: UserId,
                    now: DateTime<Utc>,
                ) -> Result<Vec<SessionRecord>, StoreError> {
                    let rows = sqlx::query(&format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND revoked_at \
                         IS NULL AND expires_at > $2 ORDER BY created_at DESC"
                    ))
                    .bind(Store::id(user_id.0))
                    .bind(Store::time(now))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("session", e))?;
                    rows.iter().map(session).collect()
                }

                async fn refresh_token_usable(
                    &self,
                    hash: &str,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM refresh_tokens t JOIN sessions s ON s.id = \
                         t.session_id WHERE t.token_hash = $1 AND t.used_at IS NULL AND \
                         t.expires_at > $2 AND s.revoked_at IS NULL AND s.expires_at > $2)",
                    )
                    .bind(hash)
                    .bind(Store::time(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("refresh token", e))
                }

                async fn reauthenticate_session(
                    &self,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE sessions SET authenticated_at = $2 \
                         WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2",
                    )
                    .bind(Store::id(id))
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("session", e))?;
                    Ok(done.rows_affected() > 0)
                }

                async fn mark_session_mfa(
                    &self,
                    id: Uuid,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE sessions SET mfa = TRUE \
                         WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2",
                    )
                    .bind(Store::id(id))
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("session", e))?;
                    Ok(done.rows_affected() > 0)
                }

                async fn revoke_session(
                    &self,
                    id: Uuid,
                    reason: &str,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE sessions SET revoked_at = $2, revoked_reason = $3 \
                         WHERE id = $1 AND revoked_at IS NULL",
                    )
                    .bind(Store::id(id))
                    .bind(Store::time(now))
                    .bind(reason)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("session", e))?;
                    Ok(done.rows_affected() > 0)
                }

                async fn revoke_user_sessions(
                    &self,
                    user_id: UserId,
                    except: Option<Uuid>,
                    reason: &str,
                    now: DateTime<Utc>,
                ) -> Result<u64, StoreError> {
                    // Every id is distinct from a NULL `except`, so then no session is spared;
                    // both engines (SQLite since 3.39) know `IS DISTINCT FROM`.
                    let done = sqlx::query(
                        "UPDATE sessions SET revoked_at = $3, revoked_reason = $4 \
                         WHERE user_id = $1 AND revoked_at IS NULL AND id IS DISTINCT FROM $2",
                    )
                    .bind(Store::id(user_id.0))
                    .bind(except.map(Store::id))
                    .bind(Store::time(now))
                    .bind(reason)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("session", e))?;
                    Ok(done.rows_affected())
                }
            }

            fn signing_key(row: &Row) -> Result<SigningKeyRecord, StoreError> {
                Ok(SigningKeyRecord {
                    kid: get(row, "kid")?,
                    algorithm: get(row, "algorithm")?,
                    public_key: get(row, "public_key")?,
                    private_key: get(row, "private_key")?,
                    created_at: Store::read_time(get(row, "created_at")?)?,
                    retired_at: Store::read_opt_time(get(row, "retired_at")?)?,
                })
            }

            #[async_trait]
            impl KeyStore for Store {
                async fn insert_signing_key(
                    &self,
                    key: &SigningKeyRecord,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "INSERT INTO signing_keys (kid, algorithm, public_key, private_key, \
                         created_at, retired_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&key.kid)
                    .bind(&key.algorithm)
                    .bind(&key.public_key)
                    .bind(key.private_key.as_deref())
                    .bind(Store::time(key.created_at))
                    .bind(key.retired_at.map(Store::time))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("signing key", e))?;
                    Ok(())
                }

                async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
                    let rows = sqlx::query(
                        "SELECT kid, algorithm, public_key, private_key, created_at, retired_at \
                         FROM signing_keys ORDER BY created_at, kid",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("signing key", e))?;
                    rows.iter().map(signing_key).collect()
                }

                async fn retire_signing_key(
                    &self,
                    kid: &str,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    let done = sqlx::query(
                        "UPDATE signing_keys SET retired_at = COALESCE(retired_at, $2) WHERE kid = \
                         $1",
                    )
                    .bind(kid)
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("signing key", e))?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound {
                            entity: "signing key",
                        });
                    }
                    Ok(())
                }
            }

            #[async_trait]
            impl AuditStore for Store {
                async fn append_audit(&self, event: &NewAuditEvent) -> Result<i64, StoreError> {
                    sqlx::query_scalar(&format!(
                        "INSERT INTO audit_events (at, kind, actor_id, subject_id, ip, trace_id, \
                         detail) VALUES ($1, $2, $3, $4, $5, $6, $7{}) RETURNING id",
                        Store::AS_JSON
                    ))
                    .bind(Store::time(event.at))
                    .bind(&event.kind)
                    .bind(event.actor_id.map(|u| Store::id(u.0)))
                    .bind(event.subject_id.as_deref())
                    .bind(event.ip.as_deref())
                    .bind(event.trace_id.as_deref())
                    .bind(&event.detail)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("audit event", e))
                }

                async fn audit_events(
                    &self,
                    before: Option<i64>,
                    limit: u32,
                ) -> Result<Vec<AuditRecord>, StoreError> {
                    let rows = sqlx::query(
                        "SELECT id, at, kind, actor_id, subject_id, ip, trace_id, CAST(detail AS \
                         TEXT) AS detail FROM audit_events WHERE CAST($1 AS BIGINT) IS NULL OR id \
                         < $1 ORDER BY id DESC LIMIT $2",
                    )
                    .bind(before)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("audit event", e))?;
                    rows.iter()
                        .map(|row| {
                            Ok(AuditRecord {
                                id: get(row, "id")?,
                                at: Store::read_time(get(row, "at")?)?,
                                kind: get(row, "kind")?,
                                actor_id: Store::read_opt_id(get(row, "actor_id")?)?.map(UserId),
                                subject_id: get(row, "subject_id")?,
                                ip: get(row, "ip")?,
                                trace_id: get(row, "trace_id")?,
                                detail: get(row, "detail")?,
                            })
                        })
                        .collect()
                }
            }

            /// The user of a live (unused, unexpired) one-time token that `sql` selects by
            /// `$1` hash, `$2` purpose and `$3` now.
            async fn live_token_user(
                pool: &sqlx::Pool<<Store as Dialect>::Db>,
                sql: &'static str,
                hash: &str,
                purpose: TokenPurpose,
                now: DateTime<Utc>,
            ) -> Result<UserId, StoreError> {
                let user: <Store as Dialect>::Id = sqlx::query_scalar(sql)
                    .bind(hash)
                    .bind(purpose.as_str())
                    .bind(Store::time(now))
                    .fetch_one(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("token", e))?;
                Ok(UserId(Store::read_id(user)?))
            }

            #[async_trait]
            impl OneTimeTokenStore for Store {
                async fn issue_one_time_token(
                    &self,
                    hash: &str,
                    user: UserId,
                    purpose: TokenPurpose,
                    now: DateTime<Utc>,
                    expires_at: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    let err = |e| StoreError::from_sqlx("token", e);
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    // The user's row is locked first (a write that changes nothing), so that two
                    // issues for one user run one after the other and each sees the other's
                    // token: under PostgreSQL's READ COMMITTED both would otherwise stay valid.
                    sqlx::query("UPDATE users SET id = id WHERE id = $1")
                        .bind(Store::id(user.0))
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    sqlx::query(
                        "UPDATE one_time_tokens SET used_at = $3 \
                         WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL",
                    )
                    .bind(Store::id(user.0))
                    .bind(purpose.as_str())
                    .bind(Store::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    sqlx::query(
                        "INSERT INTO one_time_tokens (token_hash, user_id, purpose, created_at, \
                         expires_at) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(hash)
                    .bind(Store::id(user.0))
                    .bind(purpose.as_str())
                    .bind(Store::time(now))
                    .bind(Store::time(expires_at))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    tx.commit().await.map_err(err)
                }

                async fn consume_one_time_token(
                    &self,
                    hash: &str,
                    purpose: TokenPurpose,
                    now: DateTime<Utc>,
                ) -> Result<UserId, StoreError> {
                    let sql = "UPDATE one_time_tokens SET used_at = $3 WHERE token_hash = $1 AND \
                               purpose = $2 AND used_at IS NULL AND expires_at > $3 RETURNING \
                               user_id";
                    live_token_user(&self.pool, sql, hash, purpose, now).await
                }

                async fn peek_one_time_token(
                    &self,
                    hash: &str,
                    purpose: TokenPurpose,
                    now: DateTime<Utc>,
                ) -> Result<UserId, StoreError> {
                    let sql = "SELECT user_id FROM one_time_tokens WHERE token_hash = $1 AND \
                               purpose = $2 AND used_at IS NULL AND expires_at > $3";
                    live_token_user(&self.pool, sql, hash, purpose, now).await
                }

                async fn set_email_verified(
                    &self,
                    user: UserId,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "UPDATE users SET email_verified_at = COALESCE(email_verified_at, $2), \
                         updated_at = $2 WHERE id = $1",
                    )
                    .bind(Store::id(user.0))
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(())
                }

                async fn known_device(
                    &self,
                    user: UserId,
                    user_agent: Option<&str>,
                    ip: Option<&str>,
                ) -> Result<DeviceHistory, StoreError> {
                    sqlx::query_as(
                        "SELECT EXISTS (SELECT 1 FROM sessions WHERE user_id = $1), \
                         EXISTS (SELECT 1 FROM sessions WHERE user_id = $1 \
                         AND user_agent IS NOT DISTINCT FROM $2 AND ip IS NOT DISTINCT FROM $3)",
                    )
                    .bind(Store::id(user.0))
                    .bind(user_agent)
                    .bind(ip)
                    .fetch_one(&self.pool)
                    .await
                    .map(|(any_session, this_device)| DeviceHistory {
                        any_session,
                        this_device,
                    })
                    .map_err(|e| StoreError::from_sqlx("session", e))
                }
            }

            #[async_trait]
            impl MfaStore for Store {
                async fn set_pending_totp(
                    &self,
                    user: UserId,
                    secret: &str,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE users SET totp_secret = $2, totp_last_step = 0 \
                         WHERE id = $1 AND totp_enabled_at IS NULL",
                    )
                    .bind(Store::id(user.0))
                    .bind(secret)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(done.rows_affected() == 1)
                }

                async fn totp_factor(
                    &self,
                    user: UserId,
                ) -> Result<Option<TotpFactor>, StoreError> {
                    let row: Option<(Option<String>, Option<<Store as Dialect>::Time>, i64)> =
                        sqlx::query_as(
                            "SELECT totp_secret, totp_enabled_at, totp_last_step FROM users \
                             WHERE id = $1",
                        )
                        .bind(Store::id(user.0))
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(row.and_then(|(secret, enabled, last_step)| {
                        secret.map(|secret| TotpFactor {
                            secret,
                            enabled: enabled.is_some(),
                            last_step,
                        })
                    }))
                }

                async fn enable_totp(
                    &self,
                    user: UserId,
                    step: i64,
                    recovery_hashes: &[String],
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let err = |e| StoreError::from_sqlx("user", e);
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    let done = sqlx::query(
                        "UPDATE users SET totp_enabled_at = $2, totp_last_step = $3, updated_at = \
                         $2 WHERE id = $1 AND totp_secret IS NOT NULL AND totp_enabled_at IS NULL",
                    )
                    .bind(Store::id(user.0))
                    .bind(Store::time(now))
                    .bind(step)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    if done.rows_affected() != 1 {
                        tx.rollback().await.map_err(err)?;
                        return Ok(false);
                    }
                    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                        .bind(Store::id(user.0))
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    for hash in recovery_hashes {
                        sqlx::query(
                            "INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)",
                        )
                        .bind(Store::id(user.0))
                        .bind(hash)
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    }
                    tx.commit().await.map_err(err)?;
                    Ok(true)
                }

                async fn disable_totp(
                    &self,
                    user: UserId,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    let err = |e| StoreError::from_sqlx("user", e);
                    let mut tx = self.pool.begin().await.map_err(err)?;
                    sqlx::query(
                        "UPDATE users SET totp_secret = NULL, totp_enabled_at = NULL, \
                         totp_last_step = 0, updated_at = $2 WHERE id = $1",
                    )
                    .bind(Store::id(user.0))
                    .bind(Store::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                        .bind(Store::id(user.0))
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    tx.commit().await.map_err(err)
                }

                async fn claim_totp_step(
                    &self,
                    user: UserId,
                    step: i64,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE users SET totp_last_step = $2 \
                         WHERE id = $1 AND totp_enabled_at IS NOT NULL AND totp_last_step < $2",
                    )
                    .bind(Store::id(user.0))
                    .bind(step)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("user", e))?;
                    Ok(done.rows_affected() == 1)
                }

                async fn use_recovery_code(
                    &self,
                    user: UserId,
                    hash: &str,
                    now: DateTime<Utc>,
                ) -> Result<bool, StoreError> {
                    let done = sqlx::query(
                        "UPDATE recovery_codes SET used_at = $3 \
                         WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
                    )
                    .bind(Store::id(user.0))
                    .bind(hash)
                    .bind(Store::time(now))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("recovery code", e))?;
                    Ok(done.rows_affected() == 1)
                }

                async fn recovery_codes_left(&self, user: UserId) -> Result<u32, StoreError> {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS \
                         NULL",
                    )
                    .bind(Store::id(user.0))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("recovery code", e))?;
                    Ok(u32::try_from(n).unwrap_or(0))
                }

                async fn create_mfa_challenge(
                    &self,
                    hash: &str,
                    user: UserId,
                    expires_at: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query(
                        "INSERT INTO mfa_challenges (token_hash, user_id, expires_at) VALUES ($1, \
                         $2, $3)",
                    )
                    .bind(hash)
                    .bind(Store::id(user.0))
                    .bind(Store::time(expires_at))
                    .execute(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("challenge", e))?;
                    Ok(())
                }

                async fn attempt_mfa_challenge(
                    &self,
                    hash: &str,
                    max_attempts: u32,
                    now: DateTime<Utc>,
                ) -> Result<UserId, StoreError> {
                    let user: <Store as Dialect>::Id = sqlx::query_scalar(
                        "UPDATE mfa_challenges SET attempts = attempts + 1 WHERE token_hash = $1 \
                         AND used_at IS NULL AND expires_at > $2 AND attempts < $3 RETURNING \
                         user_id",
                    )
                    .bind(hash)
                    .bind(Store::time(now))
                    .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx("challenge", e))?;
                    Ok(UserId(Store::read_id(user)?))
                }

                async fn close_mfa_challenge(
                    &self,
                    hash: &str,
                    now: DateTime<Utc>,
                ) -> Result<(), StoreError> {
                    sqlx::query("UPDATE mfa_challenges SET used_at = $2 WHERE token_hash = $1")
                        .bind(hash)
                        .bind(Store::time(now))
                        .execute(&self.pool)
                        .await
                        .map_err(|e| StoreError::from_sqlx("challenge", e))?;
                    Ok(())
                }
            }
        }
    };
}

pub(crate) use identity_queries;
