//! Storage of identity: users, sessions with rotating refresh tokens, signing keys, audit log.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use unhidra_core::{Email, Role, UserId};
use uuid::Uuid;

use crate::StoreError;

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its id.
    pub id: UserId,
    /// Its normalised email, unique.
    pub email: Email,
    /// The name shown to others.
    pub display_name: Option<String>,
    /// The password hash in PHC string format (`$argon2id$…`, or a legacy `$sha256…`).
    pub password_hash: String,
    /// What the user may do.
    pub role: Role,
    /// A deactivated user cannot log in, and their tokens stop working.
    pub active: bool,
    /// When the email was verified.
    pub email_verified_at: Option<DateTime<Utc>>,
    /// Failed logins since the last success.
    pub failed_logins: u32,
    /// Logins are refused until then.
    pub locked_until: Option<DateTime<Utc>>,
    /// When TOTP was enabled; a login then needs a code too.
    pub totp_enabled_at: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// A user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Its id.
    pub id: UserId,
    /// Its normalised email.
    pub email: Email,
    /// The name shown to others.
    pub display_name: Option<String>,
    /// The password hash.
    pub password_hash: String,
    /// Its role.
    pub role: Role,
    /// When it was created.
    pub now: DateTime<Utc>,
}

/// A change an admin makes to a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserChange {
    /// A new role.
    pub role: Option<Role>,
    /// Activate or deactivate.
    pub active: Option<bool>,
}

/// One page of users.
#[derive(Debug, Clone)]
pub struct UserPage {
    /// The users on the page, oldest first.
    pub items: Vec<UserRecord>,
    /// How many users match in all.
    pub total: u64,
}

/// Users.
#[async_trait]
pub trait UserStore {
    /// Creates a user; [`StoreError::Conflict`] if the email is taken.
    async fn create_user(&self, user: &NewUser) -> Result<(), StoreError>;

    /// Creates a user and enqueues `jobs` in one transaction: both are stored, or neither
    /// (a taken email stores no job). A job whose unique key is held is not stored again.
    async fn create_user_with_jobs(
        &self,
        user: &NewUser,
        jobs: &[crate::jobs::NewJob],
    ) -> Result<(), StoreError>;

    /// The user with this email.
    async fn user_by_email(&self, email: &Email) -> Result<UserRecord, StoreError>;

    /// The user with this id.
    async fn user_by_id(&self, id: UserId) -> Result<UserRecord, StoreError>;

    /// Replaces the password hash.
    async fn set_password_hash(
        &self,
        id: UserId,
        hash: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Counts a failed login atomically and returns the new count; `lock_until` is applied
    /// when the count reaches a multiple of `lock_at` (`lock_at` must be at least 1).
    async fn record_login_failure(
        &self,
        id: UserId,
        lock_at: u32,
        lock_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError>;

    /// Clears the failure count and any lock after a successful login.
    async fn record_login_success(&self, id: UserId, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Users whose email or display name contains `query` (case-insensitive), oldest first.
    async fn list_users(
        &self,
        query: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> Result<UserPage, StoreError>;

    /// How many users may log in.
    async fn count_active_users(&self) -> Result<u64, StoreError>;

    /// Applies an admin's change and returns the user as it now is.
    async fn update_user(
        &self,
        id: UserId,
        change: UserChange,
        now: DateTime<Utc>,
    ) -> Result<UserRecord, StoreError>;
}

/// A login session: the family of refresh tokens that descend from one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its id, carried as `sid` in access tokens.
    pub id: Uuid,
    /// Whose session it is.
    pub user_id: UserId,
    /// The client's `User-Agent` at login.
    pub user_agent: Option<String>,
    /// The client's address at login.
    pub ip: Option<String>,
    /// The login.
    pub created_at: DateTime<Utc>,
    /// The last refresh.
    pub last_used_at: DateTime<Utc>,
    /// The absolute end, whatever refreshes happen.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether its login finished with a second factor (or it enrolled one).
    pub mfa: bool,
    /// When the password was last presented for it: at login, or on re-authentication.
    pub authenticated_at: DateTime<Utc>,
}

impl SessionRecord {
    /// Whether tokens of this session may still be used at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// A session to create.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Its id.
    pub id: Uuid,
    /// Whose it is.
    pub user_id: UserId,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// The client's address.
    pub ip: Option<String>,
    /// The login.
    pub now: DateTime<Utc>,
    /// The absolute end.
    pub expires_at: DateTime<Utc>,
    /// Whether the login finished with a second factor.
    pub mfa: bool,
}

/// A refresh token to store, by its hash.
#[derive(Debug, Clone)]
pub struct NewRefreshToken {
    /// SHA-256 of the token.
    pub hash: String,
    /// When it stops working (never later than its session).
    pub expires_at: DateTime<Utc>,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was current: it is now used, and its successor is stored.
    Rotated(SessionRecord),
    /// The token had been used before: someone replays it (or a second tab retries). The
    /// caller revokes the session, unless the use was within its grace window.
    Reused {
        /// The token's session.
        session: SessionRecord,
        /// When the token was first used.
        used_at: DateTime<Utc>,
    },
    /// Unknown, expired, or its session is over. Nothing changed.
    Invalid,
}

/// Sessions and refresh tokens.
#[async_trait]
pub trait SessionStore {
    /// Creates a session with its first refresh token, together.
    async fn create_session(
        &self,
        session: &NewSession,
        token: &NewRefreshToken,
    ) -> Result<(), StoreError>;

    /// Uses the token with hash `presented` once: marks it used and stores `next`, atomically,
    /// so that of two concurrent uses exactly one rotates.
    async fn rotate_refresh_token(
        &self,
        presented: &str,
        next: &NewRefreshToken,
        now: DateTime<Utc>,
    ) -> Result<Rotation, StoreError>;

    /// The session and whether its user is active: what every authenticated request checks.
    async fn session_with_user(&self, id: Uuid) -> Result<(SessionRecord, UserRecord), StoreError>;

    /// A user's sessions that are neither revoked nor expired, newest first.
    async fn live_sessions(
        &self,
        user_id: UserId,
        now: DateTime<Utc>,
    ) -> Result<Vec<SessionRecord>, StoreError>;

    /// Whether the refresh token with this hash exists, is unused and unexpired, and its
    /// session is live.
    async fn refresh_token_usable(
        &self,
        hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Records that the session's password was presented again at `now`; false if the
    /// session is not live.
    async fn reauthenticate_session(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Marks a live session as verified with a second factor; false if it is not live.
    async fn mark_session_mfa(&self, id: Uuid, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Revokes one session; false if it was revoked already.
    async fn revoke_session(
        &self,
        id: Uuid,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Revokes every live session of a user but `except`; returns how many.
    async fn revoke_user_sessions(
        &self,
        user_id: UserId,
        except: Option<Uuid>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
}

/// A key that signs or verifies access tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// Key id: the RFC 7638 thumbprint of its public key.
    pub kid: String,
    /// JOSE algorithm, `EdDSA`.
    pub algorithm: String,
    /// The raw public key.
    pub public_key: Vec<u8>,
    /// The PKCS#8 private key, for keys Unhidra generated; keys given in config keep theirs
    /// out of the database.
    pub private_key: Option<Vec<u8>>,
    /// Created (the newest live key with a private key signs).
    pub created_at: DateTime<Utc>,
    /// From then on it neither signs nor verifies.
    pub retired_at: Option<DateTime<Utc>>,
}

/// Signing keys.
#[async_trait]
pub trait KeyStore {
    /// Adds a key; [`StoreError::Conflict`] if its kid exists.
    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<(), StoreError>;

    /// Every key, oldest first, retired ones included.
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError>;

    /// Retires a key; [`StoreError::NotFound`] if there is none with that kid.
    async fn retire_signing_key(&self, kid: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
}

/// What a single-use token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    /// Proves the user reads mail at their address.
    VerifyEmail,
    /// Lets the user set a new password.
    ResetPassword,
}

impl TokenPurpose {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
        }
    }
}

/// A user's TOTP factor.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpFactor {
    /// The shared secret, base32.
    pub secret: String,
    /// Whether it is enabled, or only set up and waiting for a first code.
    pub enabled: bool,
    /// The last time step a code was accepted for.
    pub last_step: i64,
}

impl std::fmt::Debug for TotpFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TotpFactor")
            .field("secret", &"[redacted]")
            .field("enabled", &self.enabled)
            .field("last_step", &self.last_step)
            .finish()
    }
}

/// The second factor: TOTP secrets, recovery codes and login challenges.
#[async_trait]
pub trait MfaStore {
    /// Stores a new, not yet enabled secret; false if TOTP is enabled already.
    async fn set_pending_totp(&self, user: UserId, secret: &str) -> Result<bool, StoreError>;

    /// The user's factor, if one is set up.
    async fn totp_factor(&self, user: UserId) -> Result<Option<TotpFactor>, StoreError>;

    /// Enables the pending secret, with its first step and fresh recovery codes (hashes),
    /// together; false if there is no pending secret.
    async fn enable_totp(
        &self,
        user: UserId,
        step: i64,
        recovery_hashes: &[String],
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Removes the factor and its recovery codes.
    async fn disable_totp(&self, user: UserId, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Accepts a code's time step only if it is later than the last one accepted: a code is
    /// good once. False if it was used (or an earlier step).
    async fn claim_totp_step(&self, user: UserId, step: i64) -> Result<bool, StoreError>;

    /// Uses a recovery code once; false if unknown or used.
    async fn use_recovery_code(
        &self,
        user: UserId,
        hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// How many recovery codes are left.
    async fn recovery_codes_left(&self, user: UserId) -> Result<u32, StoreError>;

    /// Opens a login challenge: the password was right, a code is due.
    async fn create_mfa_challenge(
        &self,
        hash: &str,
        user: UserId,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Counts an attempt on a live challenge and returns its user;
    /// [`StoreError::NotFound`] if it is unknown, used, expired or out of attempts.
    async fn attempt_mfa_challenge(
        &self,
        hash: &str,
        max_attempts: u32,
        now: DateTime<Utc>,
    ) -> Result<UserId, StoreError>;

    /// Closes a challenge after a right code.
    async fn close_mfa_challenge(&self, hash: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
}

/// What the sessions of a user say about a login's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceHistory {
    /// The user has logged in before.
    pub any_session: bool,
    /// …with this user agent, from this address.
    pub this_device: bool,
}

/// Single-use tokens mailed to users, stored as hashes.
#[async_trait]
pub trait OneTimeTokenStore {
    /// Stores a token for `user`; earlier unused tokens of the same purpose stop working, so
    /// only the newest mail's link does.
    async fn issue_one_time_token(
        &self,
        hash: &str,
        user: UserId,
        purpose: TokenPurpose,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Uses the token once and returns its user; [`StoreError::NotFound`] if it is unknown,
    /// used, expired or for another purpose. Of two concurrent uses, one wins.
    async fn consume_one_time_token(
        &self,
        hash: &str,
        purpose: TokenPurpose,
        now: DateTime<Utc>,
    ) -> Result<UserId, StoreError>;

    /// The user of a usable token, without using it.
    async fn peek_one_time_token(
        &self,
        hash: &str,
        purpose: TokenPurpose,
        now: DateTime<Utc>,
    ) -> Result<UserId, StoreError>;

    /// Records that the user's email is verified (the first time only).
    async fn set_email_verified(&self, user: UserId, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Whether the user ever logged in, and whether with this user agent from this address.
    async fn known_device(
        &self,
        user: UserId,
        user_agent: Option<&str>,
        ip: Option<&str>,
    ) -> Result<DeviceHistory, StoreError>;
}

/// A security event to record.
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    /// When.
    pub at: DateTime<Utc>,
    /// What, such as `login.failed`.
    pub kind: String,
    /// Who did it, if known.
    pub actor_id: Option<UserId>,
    /// What it was done to (a user id, a session id, a key id).
    pub subject_id: Option<String>,
    /// From where.
    pub ip: Option<String>,
    /// The request's trace id.
    pub trace_id: Option<String>,
    /// More, as a JSON object.
    pub detail: String,
}

/// A recorded security event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Increasing id, the cursor for paging.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// What.
    pub kind: String,
    /// Who.
    pub actor_id: Option<UserId>,
    /// To what.
    pub subject_id: Option<String>,
    /// From where.
    pub ip: Option<String>,
    /// The request's trace id.
    pub trace_id: Option<String>,
    /// More, as a JSON object.
    pub detail: String,
}

/// The audit log.
#[async_trait]
pub trait AuditStore {
    /// Appends an event and returns its id.
    async fn append_audit(&self, event: &NewAuditEvent) -> Result<i64, StoreError>;

    /// The newest events with ids below `before`, newest first.
    async fn audit_events(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Reads a stored email back; stored emails were parsed before they were written.
pub(crate) fn stored_email(text: &str) -> Result<Email, StoreError> {
    Email::parse(text)
        .map_err(|e| StoreError::Other(format!("stored email is invalid: {e}").into()))
}

/// Reads a stored role back.
pub(crate) fn stored_role(text: &str) -> Result<Role, StoreError> {
    text.parse()
        .map_err(|e: String| StoreError::Other(e.into()))
}

/// `%` and `_` in a search are literal characters, not wildcards.
pub(crate) fn like_pattern(query: &str) -> String {
    let mut out = String::with_capacity(query.len() + 2);
    out.push('%');
    for c in query.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}
