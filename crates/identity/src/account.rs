//! Account flows that go through mail: email verification, password change and reset, and the
//! notices a user gets about their account (new device, password changed, lockout).

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use unhidra_core::{Email, OpaqueToken, UserId};
use unhidra_mail::{Mail, Mailer};
use unhidra_store::identity::{TokenPurpose, UserRecord};
use unhidra_store::{Store, StoreError};

use super::{Identity, IdentityError, Principal, RequestContext};

/// How long a verification link works.
const VERIFY_TTL: i64 = 24 * 3600;
/// How long a password-reset link works.
const RESET_TTL: i64 = 30 * 60;

/// The page of the web app that takes a token of `purpose`.
fn page(purpose: TokenPurpose) -> &'static str {
    match purpose {
        TokenPurpose::VerifyEmail => "verify-email",
        TokenPurpose::ResetPassword => "reset-password",
    }
}

/// A mailed token ready to store and send, owning what it needs, so that it can be issued
/// after the answer.
pub(super) struct MailedToken {
    store: Arc<dyn Store>,
    mailer: Arc<Mailer>,
    /// The token's hash; the token itself is only in `mail`.
    hash: String,
    user: UserId,
    purpose: TokenPurpose,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    mail: Mail,
}

impl MailedToken {
    /// Stores the token, then sends its mail in the background.
    async fn issue(self) -> Result<(), StoreError> {
        self.store
            .issue_one_time_token(
                &self.hash,
                self.user,
                self.purpose,
                self.now,
                self.expires_at,
            )
            .await?;
        self.mailer.send_later(self.mail);
        Ok(())
    }
}

/// An audit event recorded after the answer (see [`Identity::after_answer`]).
pub(super) struct AuditLater {
    pub(super) kind: &'static str,
    pub(super) actor: Option<UserId>,
    pub(super) subject: Option<String>,
    pub(super) detail: serde_json::Value,
}

impl Identity {
    /// Mails a notice to the user; delivery happens in the background.
    pub(super) fn notify(&self, to: &Email, subject: &str, body: String) {
        self.mailer.send_later(Mail {
            to: to.to_string(),
            subject: subject.to_owned(),
            body,
        });
    }

    /// The text that lets the user act on a token: a link when the public URL is known.
    fn token_text(&self, page: &str, token: &OpaqueToken) -> String {
        match &self.public_url {
            Some(base) => format!("{base}/{page}?token={}", token.expose()),
            None => format!("Your code: {}", token.expose()),
        }
    }

    /// A verification token for `user`, to issue and mail.
    pub(super) fn verification_token(&self, user: UserId, email: &Email) -> MailedToken {
        self.mailed_token(user, TokenPurpose::VerifyEmail, VERIFY_TTL, |text| Mail {
            to: email.to_string(),
            subject: "Verify your email address".to_owned(),
            body: format!(
                "Welcome to Unhidra.\n\nTo verify that this address is yours, use this within \
                 24 hours:\n\n{text}\n\nIf you did not create an account, ignore this message.\n"
            ),
        })
    }

    /// A password-reset token for `user`, to issue and mail.
    fn reset_token(&self, user: &UserRecord) -> MailedToken {
        self.mailed_token(user.id, TokenPurpose::ResetPassword, RESET_TTL, |text| {
            Mail {
                to: user.email.to_string(),
                subject: "Reset your password".to_owned(),
                body: format!(
                    "To choose a new password for your Unhidra account, use this within 30 \
                 minutes:\n\n{text}\n\nIf you did not ask for this, ignore this message; your \
                 password stays as it is.\n"
                ),
            }
        })
    }

    /// A new token of `purpose`, good for `ttl` seconds, with the mail that carries it (`mail`
    /// gets the text that lets the user act on it).
    fn mailed_token(
        &self,
        user: UserId,
        purpose: TokenPurpose,
        ttl: i64,
        mail: impl FnOnce(&str) -> Mail,
    ) -> MailedToken {
        let token = OpaqueToken::generate();
        let now = self.now();
        MailedToken {
            store: Arc::clone(&self.store),
            mailer: Arc::clone(&self.mailer),
            hash: token.hash(),
            user,
            purpose,
            now,
            expires_at: now + Duration::seconds(ttl),
            mail: mail(&self.token_text(page(purpose), &token)),
        }
    }

    /// Issues a verification token and mails it.
    pub(super) async fn send_verification(
        &self,
        user: UserId,
        email: &Email,
    ) -> Result<(), IdentityError> {
        Ok(self.verification_token(user, email).issue().await?)
    }

    /// Does the work that only an existing account's answer has — its audit `event`, then its
    /// mailed `token` — after the answer, so that the answer takes the same path, and so the
    /// same time, as one for an unknown or taken email. Failures are logged (never the token);
    /// [`Mailer::drain`](unhidra_mail::Mailer::drain) waits for this work too.
    pub(super) fn after_answer(&self, event: AuditLater, token: MailedToken, ctx: &RequestContext) {
        let auditor = Arc::clone(&self.auditor);
        let ctx = ctx.clone();
        self.mailer.later(async move {
            auditor
                .record(event.kind, event.actor, event.subject, &ctx, event.detail)
                .await;
            let purpose = token.purpose;
            let user = token.user;
            if let Err(e) = token.issue().await {
                tracing::error!(
                    %user,
                    purpose = purpose.as_str(),
                    error = %unhidra_core::error_chain(&e),
                    "mailed token not issued; nothing was mailed"
                );
            }
        });
    }

    /// Tells the owner of an existing account that someone tried to register with their
    /// email; the one who tried sees the same answer as for a new account.
    pub(super) fn notify_registration_attempt(&self, email: &Email) {
        self.notify(
            email,
            "Someone tried to create an account with your address",
            "Someone tried to register with this email address, which already has an account. \
             If it was you, log in or reset your password. Otherwise, ignore this message.\n"
                .to_owned(),
        );
    }

    /// Mails a new verification token to the caller, unless they are verified already.
    pub async fn request_verification(
        &self,
        who: &Principal,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        self.limited("verify", &self.limits.verify_ip, &self.ip_key(ctx), ctx)
            .await?;
        let user = self.store.user_by_id(who.user_id).await?;
        if user.email_verified_at.is_none() {
            self.send_verification(user.id, &user.email).await?;
        }
        Ok(())
    }

    /// Uses a verification token.
    pub async fn verify_email(
        &self,
        token: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        self.limited("verify", &self.limits.verify_ip, &self.ip_key(ctx), ctx)
            .await?;
        let hash = OpaqueToken::from_client(token).hash();
        let user = self.consume(&hash, TokenPurpose::VerifyEmail).await?;
        self.store.set_email_verified(user, self.now()).await?;
        self.audit_own("email.verified", user, ctx).await;
        Ok(())
    }

    async fn consume(&self, hash: &str, purpose: TokenPurpose) -> Result<UserId, IdentityError> {
        match self
            .store
            .consume_one_time_token(hash, purpose, self.now())
            .await
        {
            Ok(user) => Ok(user),
            Err(StoreError::NotFound { .. }) => Err(IdentityError::BadMailToken),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes the caller's password and ends every other session.
    pub async fn change_password(
        &self,
        who: &Principal,
        current: &str,
        new: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        // Guessing the current password through this endpoint counts like guessing at login.
        let user = self
            .check_current_password(who, current, "password", "password.change_failed", ctx)
            .await?;
        self.set_password(&user, new).await?;
        self.end_user_sessions(
            user.id,
            Some(who.session_id),
            "password changed",
            self.now(),
        )
        .await?;
        self.audit_own("password.changed", user.id, ctx).await;
        self.notify(
            &user.email,
            "Your password was changed",
            "The password of your Unhidra account was just changed, and every other session \
             was ended. If this was not you, reset your password now.\n"
                .to_owned(),
        );
        Ok(())
    }

    /// Checks a new password against the policy for this user, and stores its hash.
    async fn set_password(&self, user: &UserRecord, new: &str) -> Result<(), IdentityError> {
        let hints: Vec<&str> = user.display_name.iter().map(String::as_str).collect();
        let broken = self.policy.check(new, Some(&user.email), &hints);
        if !broken.is_empty() {
            return Err(IdentityError::WeakPassword(broken));
        }
        let hash = self.hasher.hash(new).await?;
        self.store
            .set_password_hash(user.id, &hash, self.now())
            .await?;
        Ok(())
    }

    /// Mails a reset token if the email has an active account. The answer is the same either
    /// way, and so is its timing: the mail goes out in the background.
    pub async fn request_password_reset(
        &self,
        email: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        // Parsed before any limit is touched: limits only ever see bounded, normalised keys.
        let parsed = Email::parse(email).map_err(IdentityError::InvalidEmail)?;
        self.limited(
            "password_reset",
            &self.limits.reset_ip,
            &self.ip_key(ctx),
            ctx,
        )
        .await?;
        self.limited(
            "password_reset",
            &self.limits.reset_account,
            parsed.as_str(),
            ctx,
        )
        .await?;
        let user = match self.store.user_by_email(&parsed).await {
            Ok(user) if user.active => user,
            Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // Storing the token and the audit event happen after the answer: an unknown email
        // does neither, and the answer must not take longer for a real account.
        self.after_answer(
            AuditLater {
                kind: "password.reset_requested",
                actor: None,
                subject: Some(user.id.to_string()),
                detail: serde_json::json!({}),
            },
            self.reset_token(&user),
            ctx,
        );
        Ok(())
    }

    /// Sets a new password with a reset token, and ends every session of the user. The token
    /// is used only if the new password is acceptable.
    pub async fn confirm_password_reset(
        &self,
        token: &str,
        new: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        self.limited(
            "password_reset",
            &self.limits.reset_ip,
            &self.ip_key(ctx),
            ctx,
        )
        .await?;
        let hash = OpaqueToken::from_client(token).hash();
        let owner = match self
            .store
            .peek_one_time_token(&hash, TokenPurpose::ResetPassword, self.now())
            .await
        {
            Ok(user) => user,
            Err(StoreError::NotFound { .. }) => return Err(IdentityError::BadMailToken),
            Err(e) => return Err(e.into()),
        };
        let user = self.store.user_by_id(owner).await?;
        let hints: Vec<&str> = user.display_name.iter().map(String::as_str).collect();
        let broken = self.policy.check(new, Some(&user.email), &hints);
        if !broken.is_empty() {
            return Err(IdentityError::WeakPassword(broken));
        }
        // Of two concurrent confirmations, one uses the token; the other is refused here.
        self.consume(&hash, TokenPurpose::ResetPassword).await?;
        self.set_password(&user, new).await?;
        let now = self.now();
        self.end_user_sessions(user.id, None, "password reset", now)
            .await?;
        // The link arrived by mail: that proves the address, and ends a lock.
        self.store.set_email_verified(user.id, now).await?;
        self.store.record_login_success(user.id, now).await?;
        self.clear_throttles(&user.email);
        self.audit_own("password.reset", user.id, ctx).await;
        self.notify(
            &user.email,
            "Your password was reset",
            "The password of your Unhidra account was reset, and every session was ended. If \
             this was not you, reset it again and contact your administrator.\n"
                .to_owned(),
        );
        Ok(())
    }

    /// Tells the user about a login from a device or address not seen before.
    pub(super) async fn notify_if_new_device(&self, user: &UserRecord, ctx: &RequestContext) {
        match self
            .store
            .known_device(user.id, ctx.user_agent.as_deref(), ctx.ip.as_deref())
            .await
        {
            Ok(history) if history.any_session && !history.this_device => {
                self.notify(
                    &user.email,
                    "New sign-in to your account",
                    format!(
                        "Your Unhidra account was just used from a new device or network.\n\n\
                         Address: {}\nDevice: {}\n\nIf this was not you, change your password \
                         and end that session under Sessions.\n",
                        ctx.ip.as_deref().unwrap_or("unknown"),
                        ctx.user_agent.as_deref().unwrap_or("unknown"),
                    ),
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %unhidra_core::error_chain(&e), "device history not read");
            }
        }
    }

    /// Tells the user their account is locked after failed logins.
    pub(super) fn notify_locked(&self, email: &Email, seconds: i64) {
        self.notify(
            email,
            "Your account is locked for a while",
            format!(
                "After too many failed logins, your Unhidra account is locked for {} minutes. \
                 If these attempts were not yours, someone may be guessing your password; an \
                 administrator can unlock the account, and you can reset your password.\n",
                (seconds + 59) / 60
            ),
        );
    }
}
