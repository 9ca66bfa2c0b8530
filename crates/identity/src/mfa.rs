//! The second factor: TOTP (RFC 6238: SHA-1, 6 digits, 30 s, ±1 step, as Google Authenticator
//! and every common app expect), single-use recovery codes, and the login step between a right
//! password and a right code.

use chrono::Duration;
use rand::RngCore;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, TOTP};
use unhidra_core::secret::hash_hex;
use unhidra_core::{OpaqueToken, UserId};
use unhidra_store::StoreError;
use unhidra_store::identity::UserRecord;

use super::reauth::Presented;
use super::{Identity, IdentityError, Principal, RequestContext, TokenPair};

/// The issuer shown in authenticator apps.
const ISSUER: &str = "Unhidra";
/// Seconds per TOTP step.
const STEP: i64 = 30;
/// How long the window between password and code lasts.
const CHALLENGE_TTL: i64 = 5 * 60;
/// Codes tried against one challenge before it is spent.
const CHALLENGE_ATTEMPTS: u32 = 5;
/// Recovery codes issued when TOTP is enabled.
const RECOVERY_CODES: usize = 10;

/// What `setup` hands the user to scan or type.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TotpSetup {
    /// The shared secret, base32 (for typing into an app).
    pub secret: String,
    /// The `otpauth://` URI an app reads from the QR code.
    pub otpauth_uri: String,
    /// The QR code of the URI, as an SVG document.
    pub qr_svg: String,
}

/// What a login answers when a code is due.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct MfaChallenge {
    /// Always `true`.
    pub mfa_required: bool,
    /// Send with the code to `/api/v1/auth/login/mfa`.
    pub mfa_token: String,
    /// Seconds the token stays usable.
    pub expires_in: i64,
}

/// The outcome of a login: tokens, or a request for the second factor.
#[derive(Debug, Clone)]
pub enum LoginOutcome {
    /// Logged in.
    Tokens(TokenPair),
    /// The password was right; a code is due.
    MfaRequired(MfaChallenge),
}

fn totp(secret_b32: &str, account: &str) -> Result<TOTP, IdentityError> {
    let bytes = Secret::Encoded(secret_b32.to_owned())
        .to_bytes()
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    TOTP::new(
        Algorithm::SHA1,
        6,
        1,
        u64::try_from(STEP).unwrap_or(30),
        bytes,
        Some(ISSUER.to_owned()),
        account.to_owned(),
    )
    .map_err(|e| IdentityError::Crypto(e.to_string()))
}

/// The time step whose code is `code`, among the current one and its neighbours.
fn matching_step(totp: &TOTP, code: &str, now_secs: i64) -> Option<i64> {
    let current = now_secs.div_euclid(STEP);
    (current - 1..=current + 1).find(|step| {
        let expected = totp.generate(u64::try_from(step * STEP).unwrap_or(0));
        bool::from(expected.as_bytes().ct_eq(code.as_bytes()))
    })
}

/// A recovery code as the user types it: case, spaces and dashes do not matter.
fn normalise_recovery(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Twelve random characters (60 bits), shown as `xxxxxx-xxxxxx`.
fn new_recovery_code() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut bytes = [0u8; 12];
    rand::rng().fill_bytes(&mut bytes);
    let text: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    format!("{}-{}", &text[..6], &text[6..])
}

impl Identity {
    /// Starts TOTP enrolment: a new secret, not yet enabled.
    pub async fn totp_setup(&self, who: &Principal) -> Result<TotpSetup, IdentityError> {
        self.require_recent_password(who).await?;
        let user = self.store.user_by_id(who.user_id).await?;
        let mut raw = [0u8; 20];
        rand::rng().fill_bytes(&mut raw);
        let secret = Secret::Raw(raw.to_vec()).to_encoded().to_string();
        if !self.store.set_pending_totp(user.id, &secret).await? {
            return Err(IdentityError::TotpAlreadyEnabled);
        }
        let totp = totp(&secret, user.email.as_str())?;
        let uri = totp.get_url();
        let qr_svg = unhidra_core::qr::svg(&uri)
            .ok_or_else(|| IdentityError::Crypto("the URI is too long for a QR code".into()))?;
        Ok(TotpSetup {
            secret,
            otpauth_uri: uri,
            qr_svg,
        })
    }

    /// Enables TOTP with a first code from the app; returns the recovery codes, shown once.
    pub async fn totp_enable(
        &self,
        who: &Principal,
        code: &str,
        ctx: &RequestContext,
    ) -> Result<Vec<String>, IdentityError> {
        self.require_recent_password(who).await?;
        let user = self.store.user_by_id(who.user_id).await?;
        let factor = match self.store.totp_factor(user.id).await? {
            Some(f) if !f.enabled => f,
            Some(_) => return Err(IdentityError::TotpAlreadyEnabled),
            None => return Err(IdentityError::TotpNotSetUp),
        };
        let totp = totp(&factor.secret, user.email.as_str())?;
        let Some(step) = matching_step(&totp, code.trim(), self.now().timestamp()) else {
            return Err(IdentityError::WrongCode);
        };
        let codes: Vec<String> = (0..RECOVERY_CODES).map(|_| new_recovery_code()).collect();
        let hashes: Vec<String> = codes
            .iter()
            .map(|c| hash_hex(normalise_recovery(c).as_bytes()))
            .collect();
        if !self
            .store
            .enable_totp(user.id, step, &hashes, self.now())
            .await?
        {
            return Err(IdentityError::TotpNotSetUp);
        }
        // This session just proved the password (recently) and a code: it counts as verified.
        // Every other session was opened without the second factor, and a stolen one must not
        // gain what enrolment grants, so they end: they log in again, with a code.
        let now = self.now();
        self.store.mark_session_mfa(who.session_id, now).await?;
        self.end_user_sessions(user.id, Some(who.session_id), "second factor enabled", now)
            .await?;
        self.audit_own("mfa.enabled", user.id, ctx).await;
        self.notify(
            &user.email,
            "Two-factor authentication is on",
            "Two-factor authentication was turned on for your Unhidra account. Keep your \
             recovery codes somewhere safe. If this was not you, reset your password and \
             contact your administrator.\n"
                .to_owned(),
        );
        Ok(codes)
    }

    /// Turns TOTP off; needs a current code or a recovery code. A wrong one counts towards the
    /// account's lockout like a wrong code at login (audited as `mfa.failed`).
    pub async fn totp_disable(
        &self,
        who: &Principal,
        code: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        self.require_recent_password(who).await?;
        let user = self.store.user_by_id(who.user_id).await?;
        if user.totp_enabled_at.is_none() {
            return Err(IdentityError::TotpNotSetUp);
        }
        // Guessing codes here counts like guessing them at login.
        let user = self
            .check_presented(who, Presented::Code(code), "mfa", "mfa.failed", ctx)
            .await?;
        self.store.disable_totp(user.id, self.now()).await?;
        self.audit_own("mfa.disabled", user.id, ctx).await;
        self.notify(
            &user.email,
            "Two-factor authentication is off",
            "Two-factor authentication was turned off for your Unhidra account. If this was \
             not you, reset your password and contact your administrator.\n"
                .to_owned(),
        );
        Ok(())
    }

    /// Checks a TOTP code (each good once) or a recovery code (each good once); says which.
    pub(super) async fn check_code(
        &self,
        user: &UserRecord,
        code: &str,
    ) -> Result<Option<&'static str>, IdentityError> {
        let code = code.trim();
        if code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()) {
            let Some(factor) = self.store.totp_factor(user.id).await? else {
                return Ok(None);
            };
            let totp = totp(&factor.secret, user.email.as_str())?;
            return match matching_step(&totp, code, self.now().timestamp()) {
                // A code seen before in its window is refused: no replay.
                Some(step) if self.store.claim_totp_step(user.id, step).await? => Ok(Some("totp")),
                _ => Ok(None),
            };
        }
        let hash = hash_hex(normalise_recovery(code).as_bytes());
        if self
            .store
            .use_recovery_code(user.id, &hash, self.now())
            .await?
        {
            let left = self.store.recovery_codes_left(user.id).await?;
            self.notify(
                &user.email,
                "A recovery code was used",
                format!(
                    "A recovery code of your Unhidra account was just used; {left} are left. \
                     If this was not you, reset your password now.\n"
                ),
            );
            return Ok(Some("recovery_code"));
        }
        Ok(None)
    }

    /// Opens the window between a right password and a code.
    pub(super) async fn mfa_challenge(&self, user: UserId) -> Result<MfaChallenge, IdentityError> {
        let token = OpaqueToken::generate();
        self.store
            .create_mfa_challenge(
                &token.hash(),
                user,
                self.now() + Duration::seconds(CHALLENGE_TTL),
            )
            .await?;
        Ok(MfaChallenge {
            mfa_required: true,
            mfa_token: token.expose().to_owned(),
            expires_in: CHALLENGE_TTL,
        })
    }

    /// Finishes a login with the second factor. Wrong codes are throttled like wrong
    /// passwords (per address, and per address and account) and count towards the same
    /// lockout, so that a right password does not buy endless guesses at the code.
    pub async fn login_mfa(
        &self,
        mfa_token: &str,
        code: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, IdentityError> {
        let ip = self.ip_key(ctx);
        let by_ip = self
            .limited("login", &self.limits.login_ip, &ip, ctx)
            .await?;
        let hash = OpaqueToken::from_client(mfa_token).hash();
        let user_id = match self
            .store
            .attempt_mfa_challenge(&hash, CHALLENGE_ATTEMPTS, self.now())
            .await
        {
            Ok(user) => user,
            Err(StoreError::NotFound { .. }) => return Err(IdentityError::BadMfaToken),
            Err(e) => return Err(e.into()),
        };
        let user = self.store.user_by_id(user_id).await?;
        let by_pair = match self
            .limited(
                "login",
                &self.limits.login_pair,
                &self.pair_key(&ip, &user.email),
                ctx,
            )
            .await
        {
            Ok(reservation) => reservation,
            Err(e) => {
                self.limits.login_ip.release(&by_ip);
                return Err(e);
            }
        };
        let now = self.now();
        if let Some(until) = user.locked_until.filter(|t| *t > now) {
            // Whoever holds the challenge knows the password: the lock may be said.
            return Err(self.refuse_locked(&user, until, None, ctx).await);
        }
        let (checking, user) = self.enter_check(&user, None, ctx).await?;
        let Some(method) = self.check_code(&user, code).await? else {
            self.metrics.failure("wrong_code");
            self.count_failure(checking, &user, "login.mfa_failed", "wrong_code", ctx)
                .await?;
            return Err(IdentityError::WrongCode);
        };
        self.limits.login_ip.release(&by_ip);
        self.limits.login_pair.release(&by_pair);
        if !user.active {
            return Err(IdentityError::Disabled);
        }
        self.store.close_mfa_challenge(&hash, now).await?;
        self.store.record_login_success(user.id, now).await?;
        self.notify_if_new_device(&user, ctx).await;
        let pair = self.open_session(&user, ctx, now, true).await?;
        self.metrics.login(true);
        self.audit(
            "login.succeeded",
            Some(user.id),
            Some(user.id.to_string()),
            ctx,
            serde_json::json!({ "mfa": method }),
        )
        .await;
        Ok(pair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_their_step_and_neighbours_only() {
        // RFC 6238's SHA-1 test secret, "12345678901234567890".
        let secret = Secret::Raw(b"12345678901234567890".to_vec())
            .to_encoded()
            .to_string();
        let totp = totp(&secret, "a@example.com").unwrap();
        // RFC 6238 appendix B: T = 59 s gives 94287082 with 8 digits; with 6, the last six.
        assert_eq!(totp.generate(59), "287082");
        assert_eq!(matching_step(&totp, "287082", 59), Some(1));
        assert_eq!(
            matching_step(&totp, "287082", 59 + 30),
            Some(1),
            "one step late"
        );
        assert_eq!(
            matching_step(&totp, "287082", 59 + 60),
            None,
            "two steps late"
        );
        assert_eq!(matching_step(&totp, "000000", 59), None);
    }

    #[test]
    fn recovery_codes_are_forgiving_to_type() {
        let code = new_recovery_code();
        assert_eq!(code.len(), 13);
        assert_eq!(
            normalise_recovery(&code.to_uppercase().replace('-', " ")),
            normalise_recovery(&code)
        );
    }
}
