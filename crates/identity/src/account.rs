//! Account flows that go through mail: email verification, password change and reset, and the
//! notices a user gets about their account (new device, password changed, lockout).

use chrono::Duration;
use unhidra_core::{Email, OpaqueToken, UserId};
use unhidra_store::StoreError;
use unhidra_store::identity::{TokenPurpose, UserRecord};

use super::{Identity, IdentityError, Principal, RequestContext};
use unhidra_mail::Mail;

/// How long a verification link works.
const VERIFY_TTL: i64 = 24 * 3600;
/// How long a password-reset link works.
const RESET_TTL: i64 = 30 * 60;

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

    /// Issues a verification token and mails it.
    pub(super) async fn send_verification(
        &self,
        user: UserId,
        email: &Email,
    ) -> Result<(), IdentityError> {
        let token = OpaqueToken::generate();
        let now = self.now();
        self.store
            .issue_one_time_token(
                &token.hash(),
                user,
                TokenPurpose::VerifyEmail,
                now,
                now + Duration::seconds(VERIFY_TTL),
            )
            .await?;
        self.notify(
            email,
            "Verify your email address",
            format!(
                "Welcome to Unhidra.\n\nTo verify that this address is yours, use this within \
                 24 hours:\n\n{}\n\nIf you did not create an account, ignore this message.\n",
                self.token_text("verify-email", &token)
            ),
        );
        Ok(())
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
        let token = OpaqueToken::generate();
        let now = self.now();
        self.store
            .issue_one_time_token(
                &token.hash(),
                user.id,
                TokenPurpose::ResetPassword,
                now,
                now + Duration::seconds(RESET_TTL),
            )
            .await?;
        self.audit(
            "password.reset_requested",
            None,
            Some(user.id.to_string()),
            ctx,
            serde_json::json!({}),
        )
        .await;
        self.notify(
            &user.email,
            "Reset your password",
            format!(
                "To choose a new password for your Unhidra account, use this within 30 \
                 minutes:\n\n{}\n\nIf you did not ask for this, ignore this message; your \
                 password stays as it is.\n",
                self.token_text("reset-password", &token)
            ),
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
