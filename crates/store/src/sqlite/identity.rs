//! Identity on SQLite. Times are stored as Unix microseconds.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use unhidra_core::{Email, UserId};
use uuid::Uuid;

use super::SqliteStore;
use crate::StoreError;
use crate::identity::{
    AuditRecord, AuditStore, DeviceHistory, KeyStore, MfaStore, NewAuditEvent, NewRefreshToken,
    NewSession, NewUser, OneTimeTokenStore, Rotation, SessionRecord, SessionStore,
    SigningKeyRecord, TokenPurpose, TotpFactor, UserChange, UserPage, UserRecord, UserStore,
    like_pattern, stored_email, stored_role,
};

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn time(m: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(m)
        .ok_or_else(|| StoreError::Other(format!("stored time {m} is out of range").into()))
}

fn opt_time(m: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    m.map(time).transpose()
}

pub(super) fn uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Other(Box::new(e)))
}

pub(super) fn get<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r SqliteRow,
    column: &str,
) -> Result<T, StoreError> {
    row.try_get(column)
        .map_err(|e| StoreError::from_sqlx("row", e))
}

const USER_COLUMNS: &str = "id, email, display_name, password_hash, role, active, \
    email_verified_at, failed_logins, locked_until, totp_enabled_at, created_at, updated_at";

fn user(row: &SqliteRow) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        id: UserId(uuid(&get::<String>(row, "id")?)?),
        email: stored_email(&get::<String>(row, "email")?)?,
        display_name: get(row, "display_name")?,
        password_hash: get(row, "password_hash")?,
        role: stored_role(&get::<String>(row, "role")?)?,
        active: get(row, "active")?,
        email_verified_at: opt_time(get(row, "email_verified_at")?)?,
        failed_logins: u32::try_from(get::<i64>(row, "failed_logins")?).unwrap_or(u32::MAX),
        locked_until: opt_time(get(row, "locked_until")?)?,
        totp_enabled_at: opt_time(get(row, "totp_enabled_at")?)?,
        created_at: time(get(row, "created_at")?)?,
        updated_at: time(get(row, "updated_at")?)?,
    })
}

const SESSION_COLUMNS: &str =
    "id, user_id, user_agent, ip, created_at, last_used_at, expires_at, revoked_at";

fn session(row: &SqliteRow) -> Result<SessionRecord, StoreError> {
    Ok(SessionRecord {
        id: uuid(&get::<String>(row, "id")?)?,
        user_id: UserId(uuid(&get::<String>(row, "user_id")?)?),
        user_agent: get(row, "user_agent")?,
        ip: get(row, "ip")?,
        created_at: time(get(row, "created_at")?)?,
        last_used_at: time(get(row, "last_used_at")?)?,
        expires_at: time(get(row, "expires_at")?)?,
        revoked_at: opt_time(get(row, "revoked_at")?)?,
    })
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(&self, user: &NewUser) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (id, email, display_name, password_hash, role, active, \
             failed_logins, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, 1, 0, ?6, ?6)",
        )
        .bind(user.id.to_string())
        .bind(user.email.as_str())
        .bind(user.display_name.as_deref())
        .bind(&user.password_hash)
        .bind(user.role.as_str())
        .bind(micros(user.now))
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("user", e))?;
        Ok(())
    }

    async fn user_by_email(&self, email: &Email) -> Result<UserRecord, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email = ?1"
        ))
        .bind(email.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("user", e))?;
        user(&row)
    }

    async fn user_by_id(&self, id: UserId) -> Result<UserRecord, StoreError> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))
            .bind(id.to_string())
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
        let done =
            sqlx::query("UPDATE users SET password_hash = ?2, updated_at = ?3 WHERE id = ?1")
                .bind(id.to_string())
                .bind(hash)
                .bind(micros(now))
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
        let count: i64 = sqlx::query_scalar(
            "UPDATE users SET failed_logins = failed_logins + 1, updated_at = ?4, \
             locked_until = CASE WHEN (failed_logins + 1) % ?2 = 0 THEN ?3 ELSE locked_until END \
             WHERE id = ?1 RETURNING failed_logins",
        )
        .bind(id.to_string())
        .bind(i64::from(lock_at))
        .bind(micros(lock_until))
        .bind(micros(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("user", e))?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    async fn record_login_success(&self, id: UserId, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET failed_logins = 0, locked_until = NULL, updated_at = ?2 \
             WHERE id = ?1 AND (failed_logins <> 0 OR locked_until IS NOT NULL)",
        )
        .bind(id.to_string())
        .bind(micros(now))
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
        let filter = "(?1 IS NULL OR email LIKE ?1 ESCAPE '\\' \
                      OR lower(display_name) LIKE ?1 ESCAPE '\\')";
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM users WHERE {filter}"))
            .bind(pattern.as_deref())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| StoreError::from_sqlx("user", e))?;
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE {filter} \
             ORDER BY created_at, id LIMIT ?2 OFFSET ?3"
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
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE active = 1")
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
            "UPDATE users SET role = COALESCE(?2, role), active = COALESCE(?3, active), \
             updated_at = ?4 WHERE id = ?1 RETURNING {USER_COLUMNS}"
        ))
        .bind(id.to_string())
        .bind(change.role.map(|r| r.as_str()))
        .bind(change.active)
        .bind(micros(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("user", e))?;
        user(&row)
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn create_session(
        &self,
        new: &NewSession,
        token: &NewRefreshToken,
    ) -> Result<(), StoreError> {
        let err = |e| StoreError::from_sqlx("session", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, user_agent, ip, created_at, last_used_at, \
             expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
        )
        .bind(new.id.to_string())
        .bind(new.user_id.to_string())
        .bind(new.user_agent.as_deref())
        .bind(new.ip.as_deref())
        .bind(micros(new.now))
        .bind(micros(new.expires_at))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&token.hash)
        .bind(new.id.to_string())
        .bind(micros(new.now))
        .bind(micros(token.expires_at.min(new.expires_at)))
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
        // The compare-and-set: only one caller can flip used_at from NULL.
        let claimed: Option<String> = sqlx::query_scalar(
            "UPDATE refresh_tokens SET used_at = ?2 \
             WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2 RETURNING session_id",
        )
        .bind(presented)
        .bind(micros(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let Some(session_id) = claimed else {
            let prior: Option<(String, Option<i64>)> = sqlx::query_as(
                "SELECT session_id, used_at FROM refresh_tokens WHERE token_hash = ?1",
            )
            .bind(presented)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
            tx.rollback().await.map_err(err)?;
            return match prior {
                Some((sid, Some(used_at))) => {
                    let row = sqlx::query(&format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"
                    ))
                    .bind(sid)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?;
                    Ok(Rotation::Reused {
                        session: session(&row)?,
                        used_at: time(used_at)?,
                    })
                }
                _ => Ok(Rotation::Invalid),
            };
        };
        let row = sqlx::query(&format!(
            "UPDATE sessions SET last_used_at = ?2 \
             WHERE id = ?1 AND revoked_at IS NULL AND expires_at > ?2 RETURNING {SESSION_COLUMNS}"
        ))
        .bind(&session_id)
        .bind(micros(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let Some(row) = row else {
            tx.rollback().await.map_err(err)?;
            return Ok(Rotation::Invalid);
        };
        let live = session(&row)?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&next.hash)
        .bind(&session_id)
        .bind(micros(now))
        .bind(micros(next.expires_at.min(live.expires_at)))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Rotation::Rotated(live))
    }

    async fn session_with_user(&self, id: Uuid) -> Result<(SessionRecord, UserRecord), StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"
        ))
        .bind(id.to_string())
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
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ?1 AND revoked_at IS NULL \
             AND expires_at > ?2 ORDER BY created_at DESC"
        ))
        .bind(user_id.to_string())
        .bind(micros(now))
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
            "SELECT EXISTS (SELECT 1 FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id \
             WHERE t.token_hash = ?1 AND t.used_at IS NULL AND t.expires_at > ?2 \
             AND s.revoked_at IS NULL AND s.expires_at > ?2)",
        )
        .bind(hash)
        .bind(micros(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("refresh token", e))
    }

    async fn revoke_session(
        &self,
        id: Uuid,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = ?2, revoked_reason = ?3 \
             WHERE id = ?1 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .bind(micros(now))
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
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = ?3, revoked_reason = ?4 \
             WHERE user_id = ?1 AND revoked_at IS NULL AND (?2 IS NULL OR id <> ?2)",
        )
        .bind(user_id.to_string())
        .bind(except.map(|u| u.to_string()))
        .bind(micros(now))
        .bind(reason)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("session", e))?;
        Ok(done.rows_affected())
    }
}

fn signing_key(row: &SqliteRow) -> Result<SigningKeyRecord, StoreError> {
    Ok(SigningKeyRecord {
        kid: get(row, "kid")?,
        algorithm: get(row, "algorithm")?,
        public_key: get(row, "public_key")?,
        private_key: get(row, "private_key")?,
        created_at: time(get(row, "created_at")?)?,
        retired_at: opt_time(get(row, "retired_at")?)?,
    })
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, public_key, private_key, created_at, \
             retired_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&key.kid)
        .bind(&key.algorithm)
        .bind(&key.public_key)
        .bind(key.private_key.as_deref())
        .bind(micros(key.created_at))
        .bind(key.retired_at.map(micros))
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

    async fn retire_signing_key(&self, kid: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE signing_keys SET retired_at = COALESCE(retired_at, ?2) WHERE kid = ?1",
        )
        .bind(kid)
        .bind(micros(now))
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
impl AuditStore for SqliteStore {
    async fn append_audit(&self, event: &NewAuditEvent) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "INSERT INTO audit_events (at, kind, actor_id, subject_id, ip, trace_id, detail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        )
        .bind(micros(event.at))
        .bind(&event.kind)
        .bind(event.actor_id.map(|u| u.to_string()))
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
            "SELECT id, at, kind, actor_id, subject_id, ip, trace_id, detail FROM audit_events \
             WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2",
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
                    at: time(get(row, "at")?)?,
                    kind: get(row, "kind")?,
                    actor_id: get::<Option<String>>(row, "actor_id")?
                        .map(|s| uuid(&s).map(UserId))
                        .transpose()?,
                    subject_id: get(row, "subject_id")?,
                    ip: get(row, "ip")?,
                    trace_id: get(row, "trace_id")?,
                    detail: get(row, "detail")?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl OneTimeTokenStore for SqliteStore {
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
        sqlx::query(
            "UPDATE one_time_tokens SET used_at = ?3 \
             WHERE user_id = ?1 AND purpose = ?2 AND used_at IS NULL",
        )
        .bind(user.to_string())
        .bind(purpose.as_str())
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query(
            "INSERT INTO one_time_tokens (token_hash, user_id, purpose, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(hash)
        .bind(user.to_string())
        .bind(purpose.as_str())
        .bind(micros(now))
        .bind(micros(expires_at))
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
        let user: String = sqlx::query_scalar(
            "UPDATE one_time_tokens SET used_at = ?3 WHERE token_hash = ?1 AND purpose = ?2 \
             AND used_at IS NULL AND expires_at > ?3 RETURNING user_id",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(micros(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("token", e))?;
        Ok(UserId(uuid(&user)?))
    }

    async fn peek_one_time_token(
        &self,
        hash: &str,
        purpose: TokenPurpose,
        now: DateTime<Utc>,
    ) -> Result<UserId, StoreError> {
        let user: String = sqlx::query_scalar(
            "SELECT user_id FROM one_time_tokens WHERE token_hash = ?1 AND purpose = ?2 \
             AND used_at IS NULL AND expires_at > ?3",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(micros(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("token", e))?;
        Ok(UserId(uuid(&user)?))
    }

    async fn set_email_verified(&self, user: UserId, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET email_verified_at = COALESCE(email_verified_at, ?2), updated_at = ?2 \
             WHERE id = ?1",
        )
        .bind(user.to_string())
        .bind(micros(now))
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
            "SELECT EXISTS (SELECT 1 FROM sessions WHERE user_id = ?1), \
             EXISTS (SELECT 1 FROM sessions WHERE user_id = ?1 \
             AND user_agent IS ?2 AND ip IS ?3)",
        )
        .bind(user.to_string())
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
impl MfaStore for SqliteStore {
    async fn set_pending_totp(&self, user: UserId, secret: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE users SET totp_secret = ?2, totp_last_step = 0 \
             WHERE id = ?1 AND totp_enabled_at IS NULL",
        )
        .bind(user.to_string())
        .bind(secret)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("user", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn totp_factor(&self, user: UserId) -> Result<Option<TotpFactor>, StoreError> {
        let row: Option<(Option<String>, Option<i64>, i64)> = sqlx::query_as(
            "SELECT totp_secret, totp_enabled_at, totp_last_step FROM users WHERE id = ?1",
        )
        .bind(user.to_string())
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
            "UPDATE users SET totp_enabled_at = ?2, totp_last_step = ?3, updated_at = ?2 \
             WHERE id = ?1 AND totp_secret IS NOT NULL AND totp_enabled_at IS NULL",
        )
        .bind(user.to_string())
        .bind(micros(now))
        .bind(step)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        if done.rows_affected() != 1 {
            tx.rollback().await.map_err(err)?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?1")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        for hash in recovery_hashes {
            sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES (?1, ?2)")
                .bind(user.to_string())
                .bind(hash)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)?;
        Ok(true)
    }

    async fn disable_totp(&self, user: UserId, now: DateTime<Utc>) -> Result<(), StoreError> {
        let err = |e| StoreError::from_sqlx("user", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        sqlx::query(
            "UPDATE users SET totp_secret = NULL, totp_enabled_at = NULL, totp_last_step = 0, \
             updated_at = ?2 WHERE id = ?1",
        )
        .bind(user.to_string())
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?1")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn claim_totp_step(&self, user: UserId, step: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = ?2 \
             WHERE id = ?1 AND totp_enabled_at IS NOT NULL AND totp_last_step < ?2",
        )
        .bind(user.to_string())
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
            "UPDATE recovery_codes SET used_at = ?3 \
             WHERE user_id = ?1 AND code_hash = ?2 AND used_at IS NULL",
        )
        .bind(user.to_string())
        .bind(hash)
        .bind(micros(now))
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("recovery code", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn recovery_codes_left(&self, user: UserId) -> Result<u32, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ?1 AND used_at IS NULL",
        )
        .bind(user.to_string())
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
            "INSERT INTO mfa_challenges (token_hash, user_id, expires_at) VALUES (?1, ?2, ?3)",
        )
        .bind(hash)
        .bind(user.to_string())
        .bind(micros(expires_at))
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
        let user: String = sqlx::query_scalar(
            "UPDATE mfa_challenges SET attempts = attempts + 1 WHERE token_hash = ?1 \
             AND used_at IS NULL AND expires_at > ?2 AND attempts < ?3 RETURNING user_id",
        )
        .bind(hash)
        .bind(micros(now))
        .bind(i64::from(max_attempts))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("challenge", e))?;
        Ok(UserId(uuid(&user)?))
    }

    async fn close_mfa_challenge(&self, hash: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE mfa_challenges SET used_at = ?2 WHERE token_hash = ?1")
            .bind(hash)
            .bind(micros(now))
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::from_sqlx("challenge", e))?;
        Ok(())
    }
}
