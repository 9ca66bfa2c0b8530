//! Identity: registration, login, refresh-token rotation, sessions, admin actions and the
//! audit trail. This crate knows the store's traits and the crypto but no HTTP and no SQL; the
//! server's handlers call it and map [`IdentityError`] to problems in one place (its
//! `routes::auth`).

mod account;
mod audit;
pub mod audit_file;
pub mod hasher;
pub mod import;
pub mod keys;
pub mod mail_jobs;
pub mod metrics;
pub mod mfa;
mod reauth;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use unhidra_config::Config;
pub use unhidra_core::Principal;
use unhidra_core::{
    Clock, Email, EmailError, OpaqueToken, PasswordPolicy, Reservation, Role, SlidingWindow,
    UserId, Violation,
};
use unhidra_store::identity::{
    NewRefreshToken, NewSession, NewUser, Rotation, SessionRecord, UserChange, UserPage, UserRecord,
};
use unhidra_store::{Store, StoreError};
use uuid::Uuid;

use self::hasher::{HashError, HashParams, Hasher};
use self::keys::{KeyError, Keyset, TokenError, TokenSettings};
use self::mfa::LoginOutcome;
use crate::metrics::AuthMetrics;
use unhidra_jobs::Jobs;
use unhidra_mail::Mailer;

/// The meta key of the installation's refresh-token derivation key.
const REFRESH_KEY: &str = "refresh_successor_key";

/// The longest display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 100;
/// The first lock's length; each next lock doubles it, up to a day.
const FIRST_LOCK: i64 = 60;
const LONGEST_LOCK: i64 = 24 * 3600;

/// Who is calling, from where: recorded with sessions and audit events.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// The client's address.
    pub ip: Option<String>,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// The request's trace id.
    pub trace_id: Option<String>,
}

/// A revocation that live connections must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// One session ended.
    Session(Uuid),
    /// Every session of a user but `except` ended (deactivation, password change or reset).
    User {
        /// The user.
        user: UserId,
        /// The session that goes on, if any.
        except: Option<Uuid>,
    },
}

/// What a successful login or refresh hands the client.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    /// The JWT to send as `Authorization: Bearer …`.
    pub access_token: String,
    /// The opaque token that obtains the next pair, once.
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

/// Why an identity operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The email is not an email address.
    #[error("invalid email: {0}")]
    InvalidEmail(EmailError),
    /// The password breaks the policy; one entry per rule.
    #[error("the password breaks the policy")]
    WeakPassword(Vec<Violation>),
    /// The display name is longer than allowed.
    #[error("the display name is too long")]
    DisplayNameTooLong,
    /// The display name holds a control character or a bidirectional override.
    #[error("the display name holds a control character")]
    DisplayNameInvalid,
    /// The email has an account already (only said when accounts are not hidden).
    #[error("the email has an account")]
    EmailTaken,
    /// Wrong email or password; the same answer for both.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Too many failed logins: the account is locked for a while.
    #[error("account locked")]
    Locked {
        /// Seconds until the next attempt is considered.
        retry_after: i64,
    },
    /// The account is deactivated.
    #[error("account disabled")]
    Disabled,
    /// Too many attempts from this address or for this account.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until the next attempt is allowed.
        retry_after: i64,
    },
    /// The refresh token is unknown, expired or its session is over.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// A refresh token was used twice; its session is revoked.
    #[error("refresh token reused")]
    RefreshTokenReused,
    /// No usable access token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// Authenticated, but the role does not allow it.
    #[error("forbidden")]
    Forbidden,
    /// An admin may not demote or deactivate themselves.
    #[error("an admin cannot demote or deactivate themselves")]
    SelfChange,
    /// The email is not verified and the configuration requires it.
    #[error("email not verified")]
    EmailNotVerified,
    /// A mailed token is unknown, used or expired.
    #[error("the token is unknown, used or expired")]
    BadMailToken,
    /// The current password given to change it is wrong.
    #[error("the current password is wrong")]
    WrongCurrentPassword,
    /// TOTP is enabled already.
    #[error("TOTP is enabled already")]
    TotpAlreadyEnabled,
    /// There is no TOTP secret to enable or disable.
    #[error("TOTP is not set up")]
    TotpNotSetUp,
    /// The TOTP or recovery code is wrong, or was used before.
    #[error("wrong code")]
    WrongCode,
    /// The login challenge is unknown, spent or expired.
    #[error("the login challenge is unknown, spent or expired")]
    BadMfaToken,
    /// An admin without a second factor may only enrol one.
    #[error("enrol a second factor first")]
    MfaEnrollmentRequired,
    /// The operation needs the password presented within `reauth_window`.
    #[error("re-authenticate first")]
    ReauthenticationRequired,
    /// The signing key comes from the configuration; rotate it there.
    #[error("the signing key is configured")]
    KeyFromConfig,
    /// The key signs now; rotate before retiring it.
    #[error("the key signs now")]
    KeyInUse,
    /// A TOTP secret or a signing key could not be used.
    #[error("crypto: {0}")]
    Crypto(String),
    /// No such user or session (or not the caller's).
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing failed.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(TokenError),
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UserView {
    /// Id.
    pub id: String,
    /// Normalised email.
    pub email: String,
    /// Name shown to others.
    pub display_name: Option<String>,
    /// `user` or `admin`.
    pub role: &'static str,
    /// Whether the user may log in.
    pub active: bool,
    /// Whether the email was verified.
    pub email_verified: bool,
    /// Whether logins are refused until a lock ends.
    pub locked: bool,
    /// Created, RFC 3339.
    pub created_at: DateTime<Utc>,
}

impl UserView {
    fn of(user: &UserRecord, now: DateTime<Utc>) -> Self {
        Self {
            id: user.id.to_string(),
            email: user.email.to_string(),
            display_name: user.display_name.clone(),
            role: user.role.as_str(),
            active: user.active,
            email_verified: user.email_verified_at.is_some(),
            locked: user.locked_until.is_some_and(|t| t > now),
            created_at: user.created_at,
        }
    }
}

/// What an admin's bulk action did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct BulkSummary {
    /// Users changed.
    pub updated: Vec<String>,
    /// Users already in the asked state.
    pub unchanged: Vec<String>,
    /// Ids with no user.
    pub not_found: Vec<String>,
}

/// A bulk action on users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BulkAction {
    /// Allow logins again.
    Activate,
    /// Refuse logins and end every session.
    Deactivate,
    /// Clear a lock after failed logins.
    Unlock,
}

/// The identity service.
#[derive(Debug)]
pub struct Identity {
    store: Arc<dyn Store>,
    hasher: Hasher,
    keys: Keyset,
    policy: PasswordPolicy,
    clock: Arc<dyn Clock>,
    refresh_ttl: Duration,
    refresh_grace: Duration,
    /// Keys the derivation of a refresh token's successor from the token itself, so that a
    /// retry within the grace window can be given the same successor without storing it.
    refresh_key: ring::hmac::Key,
    session_max_age: Duration,
    /// How recently a session's password must have been presented for changes to the second
    /// factor.
    reauth_window: Duration,
    hide_existing: bool,
    /// Consecutive failed logins that lock an account; each further multiple locks it again.
    /// 0 never locks.
    lock_threshold: u32,
    limits: Limits,
    metrics: AuthMetrics,
    mailer: Arc<Mailer>,
    /// Where mail is enqueued (see [`mail_jobs`]).
    jobs: Arc<Jobs>,
    revoked: tokio::sync::broadcast::Sender<Revoked>,
    /// Where security events are recorded.
    auditor: Arc<audit::Auditor>,
    /// IPv6 clients are limited per network of this many bits.
    ipv6_prefix: u8,
    /// Accounts whose throttles were cleared lately (see [`ThrottleEpochs`]).
    throttle_epochs: Mutex<ThrottleEpochs>,
    /// Password and code checks running now, per account (see [`InFlight`]).
    in_flight: InFlight,
    /// Orders, per account (16 shards), taking a place in flight with reading the account,
    /// against recording a failure with giving the place back: a failure is then counted once,
    /// in the store or in flight, never in both or neither.
    failure_order: [tokio::sync::Mutex<()>; 16],
    require_verified: bool,
}

/// When an account's throttles are cleared (an admin's unlock, a password reset), the account
/// gets a new epoch, which is part of its (address, account) limit's key: every address's count
/// for the account starts afresh at once, without finding them (the windows keep keys only as
/// hashes). Epochs come from one counter, so none is used twice. Only real accounts get one,
/// and only from an admin or a mailed token; an epoch older than the login window is dropped,
/// since every count it keyed has left the window by then.
#[derive(Debug, Default)]
struct ThrottleEpochs {
    last: u64,
    by_account: HashMap<Email, (u64, DateTime<Utc>)>,
}

/// Password and code checks running now, per account, so that guesses sent in parallel from
/// many addresses cannot overshoot the lockout: a check starts only if the account would not be
/// past its next lock were it and every check already running to fail. An entry lives while
/// its checks run (bounded by the hashing queue) and is removed when the last one ends.
#[derive(Debug, Default)]
struct InFlight(Mutex<HashMap<UserId, u32>>);

/// A check's place in [`InFlight`], given back when dropped.
struct InFlightGuard<'a> {
    map: &'a InFlight,
    user: UserId,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, u32>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a check for `user`; says how many run now, this one included.
    fn enter(&self, user: UserId) -> (InFlightGuard<'_>, u32) {
        let mut map = self.lock();
        let count = map.entry(user).or_insert(0);
        *count += 1;
        (InFlightGuard { map: self, user }, *count)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        if let Some(count) = map.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// The attempt limits of identity operations, per node. Keys are bounded: addresses (IPv6 cut
/// to its network) and parsed emails, which each window keeps only as a hash.
#[derive(Debug)]
struct Limits {
    /// Failed logins (passwords and second-factor codes) from one address for one account.
    login_pair: SlidingWindow,
    /// Failed logins from one address across every account: password spraying.
    login_ip: SlidingWindow,
    /// Wrong current passwords and codes on authenticated endpoints, per account.
    reauth_account: SlidingWindow,
    register_ip: SlidingWindow,
    refresh_ip: SlidingWindow,
    reset_ip: SlidingWindow,
    reset_account: SlidingWindow,
    verify_ip: SlidingWindow,
    /// At most one audited refusal per operation and key a minute.
    audit_refusals: SlidingWindow,
}

impl Limits {
    fn from_config(config: &Config) -> Self {
        let minute = Duration::minutes(1);
        let hour = Duration::hours(1);
        let max_keys = usize::try_from(config.rate_limit_max_keys).unwrap_or(usize::MAX);
        let window =
            |limit: u32, per: Duration| SlidingWindow::new(limit, per).with_max_keys(max_keys);
        Self {
            login_pair: window(config.rate_limit_login_per_minute, minute),
            login_ip: window(config.rate_limit_login_ip_per_minute, minute),
            reauth_account: window(config.rate_limit_login_per_minute, minute),
            register_ip: window(config.rate_limit_register_per_hour, hour),
            refresh_ip: window(config.rate_limit_refresh_per_minute, minute),
            reset_ip: window(config.rate_limit_reset_per_hour, hour),
            reset_account: window(config.rate_limit_reset_per_hour, hour),
            verify_ip: window(config.rate_limit_verify_per_hour, hour),
            audit_refusals: window(1, minute),
        }
    }
}

fn duration(d: unhidra_config::HumanDuration) -> Duration {
    Duration::from_std(d.0).unwrap_or(Duration::MAX)
}

impl Identity {
    /// Builds the service: the hasher pool and the keyset (registering or generating keys).
    pub async fn new(
        config: &Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: AuthMetrics,
        mailer: Arc<Mailer>,
        jobs: Arc<Jobs>,
    ) -> Result<Self, KeyError> {
        let hasher = Hasher::new(HashParams::from_config(config), config.hash_workers)
            .map_err(|e| KeyError::Config(format!("argon2 parameters: {e}")))?
            .with_ceiling(HashParams::ceiling_from_config(config));
        let key_hex = store
            .meta_get_or_insert(REFRESH_KEY, &OpaqueToken::generate().hash(), clock.now())
            .await?;
        let refresh_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key_hex.as_bytes());
        let issuer = config
            .jwt_issuer
            .clone()
            .or_else(|| {
                config
                    .public_url
                    .as_ref()
                    .map(|u| u.as_str().trim_end_matches('/').to_owned())
            })
            .unwrap_or_else(|| "unhidra".to_owned());
        let keys = Keyset::load(
            Arc::clone(&store),
            config
                .signing_key
                .as_ref()
                .map(unhidra_config::Secret::expose),
            TokenSettings {
                issuer,
                audience: config.jwt_audience.clone(),
                ttl: duration(config.access_token_ttl),
            },
            Arc::clone(&clock),
        )
        .await?;
        let auditor = Arc::new(audit::Auditor {
            store: Arc::clone(&store),
            clock: Arc::clone(&clock),
            file: audit_file::AuditFile::from_config(config),
            minimise: config.audit_minimise,
        });
        Ok(Self {
            store,
            hasher,
            keys,
            policy: PasswordPolicy {
                min_length: usize::try_from(config.password_min_length).unwrap_or(15),
                max_length: PasswordPolicy::default().max_length,
                min_strength: u8::try_from(config.password_min_strength).unwrap_or(3),
            },
            clock,
            refresh_ttl: duration(config.refresh_token_ttl),
            refresh_grace: duration(config.refresh_reuse_grace),
            refresh_key,
            session_max_age: duration(config.session_max_age),
            reauth_window: duration(config.reauth_window),
            hide_existing: config.hide_existing_accounts,
            lock_threshold: config.lockout_threshold,
            limits: Limits::from_config(config),
            metrics,
            mailer,
            jobs,
            revoked: tokio::sync::broadcast::Sender::new(1024),
            auditor,
            ipv6_prefix: u8::try_from(config.rate_limit_ipv6_prefix.min(128)).unwrap_or(64),
            throttle_epochs: Mutex::new(ThrottleEpochs::default()),
            in_flight: InFlight::default(),
            failure_order: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            require_verified: config.require_verified_email,
        })
    }

    /// Now, in the whole microseconds that both stores keep, so that what a call returns
    /// equals what a later read returns.
    fn now(&self) -> DateTime<Utc> {
        audit::now_of(&*self.clock)
    }

    /// The key of a client in the limits: its address (an IPv6 address cut to its network),
    /// or one shared key when it is unknown.
    fn ip_key(&self, ctx: &RequestContext) -> String {
        match ctx.ip.as_deref().map(str::parse::<std::net::IpAddr>) {
            Some(Ok(ip)) => unhidra_core::ratelimit::address_key(ip, self.ipv6_prefix),
            _ => "unknown".to_owned(),
        }
    }

    /// The key of (address, account) in the login limit, with the account's throttle epoch.
    fn pair_key(&self, ip: &str, email: &Email) -> String {
        let epoch = self
            .throttle_epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_account
            .get(email)
            .map_or(0, |(epoch, _)| *epoch);
        format!("{ip} {email} {epoch}")
    }

    /// Clears an account's throttles: every address's login count for it, and its count of
    /// re-checked passwords and codes. The lockout is the store's, cleared by the caller.
    fn clear_throttles(&self, email: &Email) {
        self.limits.reauth_account.reset(email.as_str());
        let now = self.now();
        let horizon = now - self.limits.login_pair.window();
        let mut epochs = self
            .throttle_epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        epochs.last += 1;
        let epoch = epochs.last;
        epochs.by_account.retain(|_, (_, at)| *at > horizon);
        epochs.by_account.insert(email.clone(), (epoch, now));
    }

    /// Revocations as they happen, for closing live connections at once.
    pub fn revocations(&self) -> tokio::sync::broadcast::Receiver<Revoked> {
        self.revoked.subscribe()
    }

    /// Revokes a session in the store and tells whoever listens.
    async fn end_session(
        &self,
        id: Uuid,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let revoked = self.store.revoke_session(id, reason, now).await?;
        let _ = self.revoked.send(Revoked::Session(id));
        Ok(revoked)
    }

    /// Revokes a user's sessions (all but `except`) and tells whoever listens.
    async fn end_user_sessions(
        &self,
        user: UserId,
        except: Option<Uuid>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let count = self
            .store
            .revoke_user_sessions(user, except, reason, now)
            .await?;
        let _ = self.revoked.send(Revoked::User { user, except });
        Ok(count)
    }

    /// The mailer, to drain at shutdown.
    pub fn mailer(&self) -> &Mailer {
        &self.mailer
    }

    /// The identity counters, for `/metrics`.
    pub fn metrics(&self) -> &AuthMetrics {
        &self.metrics
    }

    /// The keyset, for the JWKS endpoint and key reloads.
    pub fn keys(&self) -> &Keyset {
        &self.keys
    }

    /// The Argon2id parameters of new hashes.
    pub fn hash_params(&self) -> HashParams {
        self.hasher.params()
    }

    /// Creates an account. With `hide_existing_accounts`, a taken email is answered like a new
    /// one (with an id that exists nowhere) and nothing is stored; a new account's audit event
    /// and verification token are then stored after the answer, so that both answers take the
    /// same path.
    pub async fn register(
        &self,
        email: &str,
        password: &str,
        display_name: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<UserView, IdentityError> {
        self.limited("register", &self.limits.register_ip, &self.ip_key(ctx), ctx)
            .await?;
        self.create_user(email, password, display_name, Role::User, ctx)
            .await
    }

    /// Reserves an attempt under `window`, or refuses with the time to wait (and records why).
    async fn limited(
        &self,
        route: &'static str,
        window: &SlidingWindow,
        key: &str,
        ctx: &RequestContext,
    ) -> Result<Reservation, IdentityError> {
        match window.try_acquire(key, self.now()) {
            Ok(reservation) => Ok(reservation),
            Err(retry_after) => {
                self.metrics.limited(route);
                // One audit event per operation and key a minute: a client hammering a limit
                // must not turn into a flood of audit rows.
                let audit_key = format!("{route}:{key}");
                if self
                    .limits
                    .audit_refusals
                    .try_acquire(&audit_key, self.now())
                    .is_err()
                {
                    return Err(IdentityError::RateLimited { retry_after });
                }
                self.audit(
                    "rate_limited",
                    None,
                    None,
                    ctx,
                    serde_json::json!({ "route": route, "retry_after": retry_after }),
                )
                .await;
                Err(IdentityError::RateLimited { retry_after })
            }
        }
    }

    async fn create_user(
        &self,
        email: &str,
        password: &str,
        display_name: Option<&str>,
        role: Role,
        ctx: &RequestContext,
    ) -> Result<UserView, IdentityError> {
        let email = Email::parse(email).map_err(IdentityError::InvalidEmail)?;
        let display_name = display_name
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        if display_name
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_DISPLAY_NAME)
        {
            return Err(IdentityError::DisplayNameTooLong);
        }
        if display_name.as_deref().is_some_and(|n| {
            unhidra_core::forbidden_control(n, unhidra_core::Controls::None).is_some()
        }) {
            return Err(IdentityError::DisplayNameInvalid);
        }
        let hints: Vec<&str> = display_name.iter().map(String::as_str).collect();
        let broken = self.policy.check(password, Some(&email), &hints);
        if !broken.is_empty() {
            return Err(IdentityError::WeakPassword(broken));
        }
        // Hash before looking: a taken email then costs the same time as a new one.
        let password_hash = self.hasher.hash(password).await?;
        let now = self.now();
        let user = NewUser {
            id: UserId::new(),
            email,
            display_name,
            password_hash,
            role,
            now,
        };
        // The account and its verification mail commit together (with hidden accounts the
        // mail is enqueued after the answer instead, as a taken email's notice is).
        let hidden = self.hide_existing && role == Role::User;
        let verification = if role == Role::User && !hidden {
            Some(self.verification_mail(user.id, ctx).new_job(&self.jobs)?)
        } else {
            None
        };
        match self
            .store
            .create_user_with_jobs(&user, verification.as_slice())
            .await
        {
            Ok(()) => {
                if let Some(job) = &verification {
                    self.jobs.committed(job);
                }
            }
            Err(StoreError::Conflict { .. }) if hidden => {
                self.notify_registration_attempt(&user.email);
                return Ok(UserView::of(&record_of(&user), now));
            }
            Err(StoreError::Conflict { .. }) => return Err(IdentityError::EmailTaken),
            Err(e) => return Err(e.into()),
        }
        let event = account::AuditLater {
            kind: "user.registered",
            actor: Some(user.id),
            subject: Some(user.id.to_string()),
            detail: serde_json::json!({ "role": role.as_str() }),
        };
        if hidden {
            // A taken email stores nothing more: neither does the answer for a new one.
            let verification = self.verification_mail(user.id, ctx);
            self.after_answer(event, verification, ctx);
            return Ok(UserView::of(&record_of(&user), now));
        }
        self.audit(event.kind, event.actor, event.subject, ctx, event.detail)
            .await;
        Ok(UserView::of(&record_of(&user), now))
    }

    /// Makes sure an admin with this email exists, creating it with `password` if not.
    /// Returns whether it was created. An existing account is never changed.
    pub async fn ensure_admin(
        &self,
        email: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<bool, IdentityError> {
        let parsed = Email::parse(email).map_err(IdentityError::InvalidEmail)?;
        match self.store.user_by_email(&parsed).await {
            Ok(_) => Ok(false),
            Err(StoreError::NotFound { .. }) => {
                match self
                    .create_user(email, password, None, Role::Admin, ctx)
                    .await
                {
                    Ok(_) => Ok(true),
                    // Another node created it first.
                    Err(IdentityError::EmailTaken) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks email and password and opens a session.
    ///
    /// Throttles, in order: the address's failures across every account
    /// (`rate_limit_login_ip_per_minute`), then the failures from this address for this
    /// account (`rate_limit_login_per_minute`). Both slots are taken before the password is
    /// checked, so that parallel guesses are refused exactly as sequential ones would be; a
    /// success gives them back. The account itself is protected by the lockout, which counts
    /// failures from every address; no per-account window can be filled by someone else to
    /// refuse the owner's correct password. A password longer than any account can have is
    /// refused before the account is looked up (see `password_fits`).
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<LoginOutcome, IdentityError> {
        // Parsed before any limit is touched: limits only ever see bounded, normalised keys.
        let email = Email::parse(email).map_err(IdentityError::InvalidEmail)?;
        let (by_ip, by_pair) = self.login_slots(&self.ip_key(ctx), &email, ctx).await?;
        let result = if self.password_fits(password) {
            self.check_login(&email, password, ctx).await
        } else {
            // No account has such a password: refused before the account is looked up or
            // anything is hashed, alike for every email (and counted by the address
            // throttles, not by any account's lockout).
            self.metrics.failure("password_too_long");
            self.audit(
                "login.failed",
                None,
                None,
                ctx,
                serde_json::json!({ "reason": "password_too_long" }),
            )
            .await;
            Err(IdentityError::InvalidCredentials)
        };
        if result.is_ok() {
            self.limits.login_ip.release(&by_ip);
            self.limits.login_pair.release(&by_pair);
        }
        match &result {
            Ok(LoginOutcome::Tokens(_)) => self.metrics.login(true),
            Ok(LoginOutcome::MfaRequired(_)) => {}
            Err(_) => self.metrics.login(false),
        }
        result
    }

    /// Whether `password` is short enough to be checked: at most four bytes (the most a
    /// character takes in UTF-8) for each character the policy allows, 1024 bytes with its 256,
    /// so that every password the policy accepts fits, and imported ones of any plausible
    /// length. A longer one is wrong without being hashed.
    fn password_fits(&self, password: &str) -> bool {
        password.len() <= 4 * self.policy.max_length
    }

    /// Reserves a login attempt from `ip` for `email`: the address's slot, then the pair's.
    async fn login_slots(
        &self,
        ip: &str,
        email: &Email,
        ctx: &RequestContext,
    ) -> Result<(Reservation, Reservation), IdentityError> {
        let by_ip = self
            .limited("login", &self.limits.login_ip, ip, ctx)
            .await?;
        match self
            .limited(
                "login",
                &self.limits.login_pair,
                &self.pair_key(ip, email),
                ctx,
            )
            .await
        {
            Ok(by_pair) => Ok((by_ip, by_pair)),
            Err(e) => {
                self.limits.login_ip.release(&by_ip);
                Err(e)
            }
        }
    }

    /// Refuses a login for a locked account. With `hide_existing_accounts`, the answer is the
    /// one an unknown email gets, after the same work, so that a lock tells outsiders nothing;
    /// the owner learns of the lock by mail.
    async fn refuse_locked(
        &self,
        user: &UserRecord,
        until: DateTime<Utc>,
        password: Option<&str>,
        ctx: &RequestContext,
    ) -> IdentityError {
        self.metrics.failure("locked");
        self.audit_own("login.locked", user.id, ctx).await;
        if let Some(password) = password.filter(|_| self.hide_existing) {
            if let Err(e) = self.hasher.verify(password, None).await {
                return e.into();
            }
            return IdentityError::InvalidCredentials;
        }
        IdentityError::Locked {
            retry_after: (until - self.now()).num_seconds().max(1),
        }
    }

    /// Takes a place among the account's checks in flight, with the account as stored once the
    /// place is held, so that every failure is counted either in the store or in flight. Refuses
    /// when the account is locked by now, or when the failures counted and the checks in flight
    /// could already reach its next lock.
    async fn enter_check(
        &self,
        user: &UserRecord,
        password: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<(InFlightGuard<'_>, UserRecord), IdentityError> {
        let order = self.failure_order(user.id).lock().await;
        let (guard, in_flight) = self.in_flight.enter(user.id);
        let fresh = self.store.user_by_id(user.id).await?;
        drop(order);
        let now = self.now();
        if let Some(until) = fresh.locked_until.filter(|t| *t > now) {
            return Err(self.refuse_locked(&fresh, until, password, ctx).await);
        }
        let threshold = self.lock_threshold;
        if threshold > 0 && fresh.failed_logins % threshold + in_flight > threshold {
            self.metrics.failure("checks_in_flight");
            if let Some(password) = password.filter(|_| self.hide_existing) {
                // Answered like an unknown email, after the same work.
                self.hasher.verify(password, None).await?;
                return Err(IdentityError::InvalidCredentials);
            }
            return Err(IdentityError::RateLimited { retry_after: 1 });
        }
        Ok((guard, fresh))
    }

    /// The lock that orders an account's failure accounting.
    fn failure_order(&self, user: UserId) -> &tokio::sync::Mutex<()> {
        let shard = usize::try_from(user.0.as_u128() % 16).unwrap_or(0);
        &self.failure_order[shard]
    }

    /// Counts a failed login (a wrong password or second-factor code) towards the account's
    /// lockout, audits it as `event`, and locks the account (with its audit event and notice
    /// mail) at each multiple of the threshold. The check's place in flight is given back in
    /// the same step as the failure is stored.
    async fn count_failure(
        &self,
        checking: InFlightGuard<'_>,
        user: &UserRecord,
        event: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        let now = self.now();
        let threshold = self.lock_threshold;
        let lock_for = lock_duration(user.failed_logins + 1, threshold);
        // With locking off, the lock time is now: counted, never locked out.
        let until = if threshold == 0 { now } else { now + lock_for };
        let order = self.failure_order(user.id).lock().await;
        let count = self
            .store
            .record_login_failure(user.id, threshold.max(1), until, now)
            .await;
        drop(checking);
        drop(order);
        let count = count?;
        self.audit(
            event,
            Some(user.id),
            Some(user.id.to_string()),
            ctx,
            serde_json::json!({ "reason": reason, "consecutive": count }),
        )
        .await;
        if threshold > 0 && count % threshold == 0 {
            self.audit(
                "account.locked",
                Some(user.id),
                Some(user.id.to_string()),
                ctx,
                serde_json::json!({ "seconds": lock_for.num_seconds() }),
            )
            .await;
            self.notify_locked(&user.email, lock_for.num_seconds());
        }
        Ok(())
    }

    async fn check_login(
        &self,
        email: &Email,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<LoginOutcome, IdentityError> {
        let found = match self.store.user_by_email(email).await {
            Ok(user) => Some(user),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let Some(user) = found else {
            // The same work as for a real account, so that timing tells nothing.
            self.hasher.verify(password, None).await?;
            self.metrics.failure("unknown_email");
            self.audit(
                "login.failed",
                None,
                None,
                ctx,
                serde_json::json!({ "reason": "unknown_email" }),
            )
            .await;
            return Err(IdentityError::InvalidCredentials);
        };
        let now = self.now();
        if let Some(until) = user.locked_until.filter(|t| *t > now) {
            return Err(self.refuse_locked(&user, until, Some(password), ctx).await);
        }
        let (checking, user) = self.enter_check(&user, Some(password), ctx).await?;
        let verified = match self
            .hasher
            .verify(password, Some(&user.password_hash))
            .await
        {
            Ok(verified) => verified,
            Err(HashError::OverCeiling(why)) => {
                // Imported with a cost above `argon2_max_*`: never verified, so that one login
                // cannot take gigabytes. The user gets in again by resetting the password.
                tracing::warn!(user = %user.id, why, "login refused: the stored password hash costs more than argon2_max_* allows; the user must reset the password");
                self.hasher.verify(password, None).await?;
                self.metrics.failure("hash_over_ceiling");
                self.audit(
                    "login.refused",
                    Some(user.id),
                    Some(user.id.to_string()),
                    ctx,
                    serde_json::json!({ "reason": "hash_over_ceiling" }),
                )
                .await;
                return Err(IdentityError::InvalidCredentials);
            }
            Err(e) => return Err(e.into()),
        };
        if !verified.matches {
            self.metrics.failure("wrong_password");
            self.count_failure(checking, &user, "login.failed", "wrong_password", ctx)
                .await?;
            return Err(IdentityError::InvalidCredentials);
        }
        if !user.active {
            self.metrics.failure("disabled");
            self.audit(
                "login.refused",
                Some(user.id),
                Some(user.id.to_string()),
                ctx,
                serde_json::json!({ "reason": "disabled" }),
            )
            .await;
            return Err(IdentityError::Disabled);
        }
        if user.email_verified_at.is_none() && self.hide_existing {
            // Hidden accounts are usable once their owner proved the address: else registering
            // an email with a chosen password and logging in with it would tell whether the
            // email was free. The right password answers like a wrong one, and the address gets
            // a fresh verification link.
            self.metrics.failure("email_not_verified");
            let event = account::AuditLater {
                kind: "login.refused",
                actor: Some(user.id),
                subject: Some(user.id.to_string()),
                detail: serde_json::json!({ "reason": "email_not_verified" }),
            };
            self.after_answer(event, self.verification_mail(user.id, ctx), ctx);
            return Err(IdentityError::InvalidCredentials);
        }
        if self.require_verified && user.email_verified_at.is_none() {
            self.metrics.failure("email_not_verified");
            return Err(IdentityError::EmailNotVerified);
        }
        if verified.needs_rehash {
            let upgraded = self.hasher.hash(password).await?;
            self.store
                .set_password_hash(user.id, &upgraded, now)
                .await?;
        }
        if user.totp_enabled_at.is_some() {
            // The password was right; the session waits for the code. The failure count is
            // left as it is: wrong codes count towards the same lockout.
            return Ok(LoginOutcome::MfaRequired(
                self.mfa_challenge(user.id).await?,
            ));
        }
        self.store.record_login_success(user.id, now).await?;
        // Judged before this login's own session exists.
        self.notify_if_new_device(&user, ctx).await;
        let pair = self.open_session(&user, ctx, now, false).await?;
        self.audit_own("login.succeeded", user.id, ctx).await;
        Ok(LoginOutcome::Tokens(pair))
    }

    /// Opens a session for a login that presented the password now and, when `mfa`, a second
    /// factor.
    async fn open_session(
        &self,
        user: &UserRecord,
        ctx: &RequestContext,
        now: DateTime<Utc>,
        mfa: bool,
    ) -> Result<TokenPair, IdentityError> {
        let session_id = Uuid::new_v4();
        let refresh = OpaqueToken::generate();
        self.store
            .create_session(
                &NewSession {
                    id: session_id,
                    user_id: user.id,
                    user_agent: ctx.user_agent.clone(),
                    ip: ctx.ip.clone(),
                    now,
                    expires_at: now + self.session_max_age,
                    mfa,
                },
                &NewRefreshToken {
                    hash: refresh.hash(),
                    expires_at: now + self.refresh_ttl,
                },
            )
            .await?;
        self.pair(user.id, session_id, user.role, &refresh, now)
    }

    fn pair(
        &self,
        user: UserId,
        session: Uuid,
        role: Role,
        refresh: &OpaqueToken,
        now: DateTime<Utc>,
    ) -> Result<TokenPair, IdentityError> {
        let (access_token, expires_in) = self
            .keys
            .issue(user, session, role, now)
            .map_err(IdentityError::Signing)?;
        Ok(TokenPair {
            access_token,
            refresh_token: refresh.expose().to_owned(),
            token_type: "Bearer",
            expires_in,
        })
    }

    /// Trades a refresh token for a new pair. A token used before revokes its whole session.
    pub async fn refresh(
        &self,
        token: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, IdentityError> {
        self.limited("refresh", &self.limits.refresh_ip, &self.ip_key(ctx), ctx)
            .await?;
        let presented = OpaqueToken::from_client(token);
        let next = self.successor(&presented);
        let now = self.now();
        let rotation = self
            .store
            .rotate_refresh_token(
                &presented.hash(),
                &NewRefreshToken {
                    hash: next.hash(),
                    expires_at: now + self.refresh_ttl,
                },
                now,
            )
            .await?;
        match rotation {
            Rotation::Rotated(session) => {
                let user = self.store.user_by_id(session.user_id).await?;
                if !user.active {
                    self.end_session(session.id, "user deactivated", now)
                        .await?;
                    return Err(IdentityError::InvalidRefreshToken);
                }
                self.pair(user.id, session.id, user.role, &next, now)
            }
            Rotation::Reused { session, used_at } => {
                if self.within_grace(used_at, now, &next).await? {
                    // A concurrent retry (another tab): the same successor, no revocation.
                    let user = self.store.user_by_id(session.user_id).await?;
                    if user.active {
                        return self.pair(user.id, session.id, user.role, &next, now);
                    }
                }
                self.metrics.failure("refresh_reused");
                let revoked = self
                    .end_session(session.id, "refresh token reused", now)
                    .await?;
                self.audit(
                    "refresh.reused",
                    Some(session.user_id),
                    Some(session.id.to_string()),
                    ctx,
                    serde_json::json!({ "session_revoked": revoked }),
                )
                .await;
                Err(IdentityError::RefreshTokenReused)
            }
            Rotation::Invalid => Err(IdentityError::InvalidRefreshToken),
        }
    }

    /// The successor of a refresh token: an HMAC of it, so the same token always has the same
    /// successor.
    fn successor(&self, presented: &OpaqueToken) -> OpaqueToken {
        let tag = ring::hmac::sign(&self.refresh_key, presented.expose().as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&tag.as_ref()[..32]);
        OpaqueToken::from_bytes(&bytes)
    }

    /// Whether a reuse at `now` of a token first used at `used_at` is a retry within the grace
    /// window whose successor is still unused.
    async fn within_grace(
        &self,
        used_at: DateTime<Utc>,
        now: DateTime<Utc>,
        successor: &OpaqueToken,
    ) -> Result<bool, IdentityError> {
        if self.refresh_grace <= Duration::zero() || now - used_at > self.refresh_grace {
            return Ok(false);
        }
        Ok(self
            .store
            .refresh_token_usable(&successor.hash(), now)
            .await?)
    }

    /// Checks an access token and that its session and user are still in good standing, so that
    /// a revoked session or a deactivated user is refused at once, not only at `exp`.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, IdentityError> {
        self.authenticate_until(token).await.map(|(who, _)| who)
    }

    /// Like [`Identity::authenticate`], with the token's expiry, for connections that outlive a
    /// request.
    pub async fn authenticate_until(
        &self,
        token: &str,
    ) -> Result<(Principal, DateTime<Utc>), IdentityError> {
        let now = self.now();
        let claims = self.keys.verify(token, now).await.map_err(|e| {
            tracing::debug!(reason = %e, "access token refused");
            IdentityError::Unauthenticated(match e {
                TokenError::Expired => "expired",
                _ => "invalid",
            })
        })?;
        let session_id: Uuid = claims
            .sid
            .parse()
            .map_err(|_| IdentityError::Unauthenticated("invalid"))?;
        let (session, user) = match self.store.session_with_user(session_id).await {
            Ok(found) => found,
            Err(StoreError::NotFound { .. }) => {
                return Err(IdentityError::Unauthenticated("invalid"));
            }
            Err(e) => return Err(e.into()),
        };
        if user.id.to_string() != claims.sub {
            return Err(IdentityError::Unauthenticated("invalid"));
        }
        if !session.is_live(now) {
            return Err(IdentityError::Unauthenticated("revoked"));
        }
        if !user.active {
            return Err(IdentityError::Unauthenticated("disabled"));
        }
        let expires = DateTime::from_timestamp(claims.exp, 0).unwrap_or(now);
        Ok((
            Principal {
                user_id: user.id,
                role: user.role,
                session_id,
                // This session proved a second factor, and the account still has it: a session
                // opened before enrolment never counts, one from before a disable no longer does.
                mfa: session.mfa && user.totp_enabled_at.is_some(),
            },
            expires,
        ))
    }

    /// Ends the caller's session.
    pub async fn logout(&self, who: &Principal, ctx: &RequestContext) -> Result<(), IdentityError> {
        self.end_session(who.session_id, "logout", self.now())
            .await?;
        self.audit(
            "logout",
            Some(who.user_id),
            Some(who.session_id.to_string()),
            ctx,
            serde_json::json!({}),
        )
        .await;
        Ok(())
    }

    /// The caller's account.
    pub async fn me(&self, who: &Principal) -> Result<UserView, IdentityError> {
        let user = self.store.user_by_id(who.user_id).await?;
        Ok(UserView::of(&user, self.now()))
    }

    /// The caller's live sessions, newest first.
    pub async fn sessions(&self, who: &Principal) -> Result<Vec<SessionRecord>, IdentityError> {
        Ok(self.store.live_sessions(who.user_id, self.now()).await?)
    }

    /// Revokes one of the caller's own sessions.
    pub async fn revoke_own_session(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        let (session, _) = match self.store.session_with_user(id).await {
            Ok(found) => found,
            Err(StoreError::NotFound { .. }) => return Err(IdentityError::NotFound("session")),
            Err(e) => return Err(e.into()),
        };
        // Another user's session is as invisible as one that does not exist.
        if session.user_id != who.user_id || !session.is_live(self.now()) {
            return Err(IdentityError::NotFound("session"));
        }
        self.end_session(id, "revoked by user", self.now()).await?;
        self.audit(
            "session.revoked",
            Some(who.user_id),
            Some(id.to_string()),
            ctx,
            serde_json::json!({}),
        )
        .await;
        Ok(())
    }

    /// Rotates the signing key and starts signing with the new one on this server at once.
    pub async fn rotate_key(
        &self,
        admin: &Principal,
        ctx: &RequestContext,
    ) -> Result<String, IdentityError> {
        if self.keys.is_configured() {
            return Err(IdentityError::KeyFromConfig);
        }
        let kid = keys::rotate(&*self.store, self.now())
            .await
            .map_err(key_error)?;
        self.keys.reload().await.map_err(key_error)?;
        self.audit(
            "key.rotated",
            Some(admin.user_id),
            Some(kid.clone()),
            ctx,
            serde_json::json!({}),
        )
        .await;
        Ok(kid)
    }

    /// Retires a key that no longer signs; its tokens are refused from then on.
    pub async fn retire_key(
        &self,
        admin: &Principal,
        kid: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        if self.keys.signing_kid() == kid {
            return Err(IdentityError::KeyInUse);
        }
        keys::retire(&*self.store, kid, self.now())
            .await
            .map_err(key_error)?;
        self.keys.reload().await.map_err(key_error)?;
        self.audit(
            "key.retired",
            Some(admin.user_id),
            Some(kid.to_owned()),
            ctx,
            serde_json::json!({}),
        )
        .await;
        Ok(())
    }

    /// A page of users matching `query`.
    pub async fn list_users(
        &self,
        query: Option<&str>,
        page: u64,
        page_size: u64,
    ) -> Result<(Vec<UserView>, u64), IdentityError> {
        let UserPage { items, total } = self
            .store
            .list_users(
                query,
                (page.max(1) - 1).saturating_mul(page_size),
                page_size,
            )
            .await?;
        let now = self.now();
        Ok((items.iter().map(|u| UserView::of(u, now)).collect(), total))
    }

    /// An admin changes a user's role or activation. Deactivation ends every session at once.
    pub async fn update_user(
        &self,
        admin: &Principal,
        id: UserId,
        change: UserChange,
        ctx: &RequestContext,
    ) -> Result<UserView, IdentityError> {
        if id == admin.user_id && (change.role == Some(Role::User) || change.active == Some(false))
        {
            return Err(IdentityError::SelfChange);
        }
        let now = self.now();
        let before = match self.store.user_by_id(id).await {
            Ok(user) => user,
            Err(StoreError::NotFound { .. }) => return Err(IdentityError::NotFound("user")),
            Err(e) => return Err(e.into()),
        };
        let after = self.store.update_user(id, change, now).await?;
        if before.active && !after.active {
            self.end_user_sessions(id, None, "user deactivated", now)
                .await?;
        }
        if before.role != after.role || before.active != after.active {
            self.audit(
                "user.updated",
                Some(admin.user_id),
                Some(id.to_string()),
                ctx,
                serde_json::json!({
                    "role": { "from": before.role.as_str(), "to": after.role.as_str() },
                    "active": { "from": before.active, "to": after.active },
                }),
            )
            .await;
        }
        Ok(UserView::of(&after, now))
    }

    /// Applies one action to many users and says what happened to each.
    pub async fn bulk(
        &self,
        admin: &Principal,
        ids: &[String],
        action: BulkAction,
        ctx: &RequestContext,
    ) -> Result<BulkSummary, IdentityError> {
        let mut summary = BulkSummary::default();
        let now = self.now();
        for raw in ids {
            let Ok(id) = raw.parse::<UserId>() else {
                summary.not_found.push(raw.clone());
                continue;
            };
            let user = match self.store.user_by_id(id).await {
                Ok(user) => user,
                Err(StoreError::NotFound { .. }) => {
                    summary.not_found.push(raw.clone());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let changed = match action {
                BulkAction::Activate | BulkAction::Deactivate => {
                    let active = action == BulkAction::Activate;
                    if user.active == active || (id == admin.user_id && !active) {
                        false
                    } else {
                        self.update_user(
                            admin,
                            id,
                            UserChange {
                                role: None,
                                active: Some(active),
                            },
                            ctx,
                        )
                        .await?;
                        true
                    }
                }
                BulkAction::Unlock => {
                    // Throttles are in memory and may outlast the store's count (failures
                    // from one address, then a success from another): cleared either way.
                    self.clear_throttles(&user.email);
                    if user.failed_logins == 0 && user.locked_until.is_none() {
                        false
                    } else {
                        self.store.record_login_success(id, now).await?;
                        self.audit(
                            "user.unlocked",
                            Some(admin.user_id),
                            Some(id.to_string()),
                            ctx,
                            serde_json::json!({}),
                        )
                        .await;
                        true
                    }
                }
            };
            if changed {
                summary.updated.push(id.to_string());
            } else {
                summary.unchanged.push(id.to_string());
            }
        }
        Ok(summary)
    }

    /// Records that a user did something to their own account (actor and subject are the
    /// user), with no further detail.
    async fn audit_own(&self, kind: &str, user: UserId, ctx: &RequestContext) {
        self.audit(
            kind,
            Some(user),
            Some(user.to_string()),
            ctx,
            serde_json::json!({}),
        )
        .await;
    }

    /// Records a security event. A failure to record is logged, and never hides the outcome of
    /// the action from its caller.
    pub async fn audit(
        &self,
        kind: &str,
        actor: Option<UserId>,
        subject: Option<String>,
        ctx: &RequestContext,
        detail: serde_json::Value,
    ) {
        self.auditor.record(kind, actor, subject, ctx, detail).await;
    }

    /// Where other capabilities record their security events (a device's registration or
    /// revocation): the same store and audit file as identity's own.
    pub fn audit_log(&self) -> AuditLog {
        AuditLog(Arc::clone(&self.auditor))
    }
}

/// The audit log, shared with other capabilities; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct AuditLog(Arc<audit::Auditor>);

impl AuditLog {
    /// An audit log that records in the store only (no audit file), for tools and tests.
    pub fn store_only(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self(Arc::new(audit::Auditor {
            store,
            clock,
            file: None,
            minimise: false,
        }))
    }

    /// Records a security event. A failure to record is logged, and never hides the outcome of
    /// the action from its caller.
    pub async fn record(
        &self,
        kind: &str,
        actor: Option<UserId>,
        subject: Option<String>,
        ctx: &RequestContext,
        detail: serde_json::Value,
    ) {
        self.0.record(kind, actor, subject, ctx, detail).await;
    }
}

/// Maps a keyset failure: a missing key is a 404, anything else is internal.
fn key_error(err: KeyError) -> IdentityError {
    match err {
        KeyError::Store(StoreError::NotFound { .. }) => IdentityError::NotFound("signing key"),
        KeyError::Store(e) => IdentityError::Store(e),
        KeyError::Config(_) => IdentityError::KeyInUse,
        other => IdentityError::Crypto(other.to_string()),
    }
}

/// How long the lock after `failures` consecutive failures lasts: a minute at the first
/// threshold, doubling with each further one, at most a day.
fn lock_duration(failures: u32, threshold: u32) -> Duration {
    let level = (failures / threshold.max(1)).saturating_sub(1).min(20);
    Duration::seconds((FIRST_LOCK << level).min(LONGEST_LOCK))
}

/// The record a new user would have, for answers that must look alike.
fn record_of(user: &NewUser) -> UserRecord {
    UserRecord {
        id: user.id,
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        password_hash: String::new(),
        role: user.role,
        active: true,
        email_verified_at: None,
        failed_logins: 0,
        locked_until: None,
        totp_enabled_at: None,
        created_at: user.now,
        updated_at: user.now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_grow_and_are_capped() {
        assert_eq!(lock_duration(10, 10).num_seconds(), 60);
        assert_eq!(lock_duration(20, 10).num_seconds(), 120);
        assert_eq!(lock_duration(30, 10).num_seconds(), 240);
        assert_eq!(lock_duration(10_000, 10).num_seconds(), LONGEST_LOCK);
        assert_eq!(lock_duration(6, 3).num_seconds(), 120);
    }
}
