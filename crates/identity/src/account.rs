//! Account flows that go through mail: email verification, password change and reset, and the
//! notices a user gets about their account (new device, password changed, lockout).

use std::sync::Arc;

use unhidra_core::{Email, OpaqueToken, UserId};
use unhidra_jobs::{EnqueueOptions, Jobs};
use unhidra_mail::{Mail, SEND_KIND};
use unhidra_store::StoreError;
use unhidra_store::identity::{TokenPurpose, UserRecord};
use unhidra_store::jobs::{NewJob, UniqueStates};

use super::{Identity, IdentityError, Principal, RequestContext};
use crate::mail_jobs::{Purpose, TOKEN_MAIL_KIND, TokenMail};

/// A job to enqueue: its kind and payload.
pub(super) struct JobLater {
    kind: &'static str,
    payload: serde_json::Value,
    trace_id: Option<String>,
    /// While a job with this key waits or runs, another is not enqueued.
    unique_key: Option<String>,
}

impl JobLater {
    /// Enqueues the job; failures are logged (never the payload, which may be a message).
    async fn enqueue(self, jobs: &Jobs) {
        let kind = self.kind;
        if let Err(e) = self.try_enqueue(jobs).await {
            tracing::error!(
                kind,
                error = %unhidra_core::error_chain(&e),
                "mail not enqueued; nothing was mailed"
            );
        }
    }

    /// Enqueues the job (or finds the one waiting with its unique key).
    async fn try_enqueue(self, jobs: &Jobs) -> Result<(), unhidra_jobs::JobsError> {
        let options = self.options();
        jobs.enqueue(self.kind, &self.payload, options).await?;
        Ok(())
    }

    /// The job as stored, checked, for a store write that enqueues it in its own transaction.
    pub(super) fn new_job(&self, jobs: &Jobs) -> Result<NewJob, IdentityError> {
        jobs.new_job(self.kind, &self.payload, self.options())
            .map_err(jobs_error)
    }

    fn options(&self) -> EnqueueOptions {
        EnqueueOptions {
            trace_id: self.trace_id.clone(),
            unique_states: self.unique_key.as_ref().map(|_| UniqueStates::UNFINISHED),
            unique_key: self.unique_key.clone(),
            ..EnqueueOptions::default()
        }
    }
}

/// A job the system refused, as identity answers it: a store failure as one, anything else (a
/// kind not registered, a payload too large) is a bug, answered like a broken store.
fn jobs_error(e: unhidra_jobs::JobsError) -> IdentityError {
    match e {
        unhidra_jobs::JobsError::Store(e) => IdentityError::Store(e),
        other => IdentityError::Store(StoreError::Other(Box::new(other))),
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
    /// Mails a notice to the user: the mail job is enqueued in the background, so that the
    /// caller's answer neither waits for nor depends on it.
    pub(super) fn notify(&self, to: &Email, subject: &str, body: String) {
        let mail = Mail {
            to: to.to_string(),
            subject: subject.to_owned(),
            body,
        };
        let job = JobLater {
            kind: SEND_KIND,
            payload: serde_json::to_value(&mail).unwrap_or_default(),
            trace_id: None,
            unique_key: None,
        };
        let jobs = Arc::clone(&self.jobs);
        self.mailer.later(async move { job.enqueue(&jobs).await });
    }

    /// The job that mails `user` a fresh token of `purpose`.
    fn token_mail(&self, user: UserId, purpose: TokenPurpose, ctx: &RequestContext) -> JobLater {
        let unique_key = format!("token_mail:{user}:{}", purpose.as_str());
        let purpose = match purpose {
            TokenPurpose::VerifyEmail => Purpose::VerifyEmail,
            TokenPurpose::ResetPassword => Purpose::ResetPassword,
        };
        JobLater {
            kind: TOKEN_MAIL_KIND,
            payload: serde_json::to_value(TokenMail { user, purpose }).unwrap_or_default(),
            trace_id: ctx.trace_id.clone(),
            // One mail of a kind per user on its way: each attempt's token replaces the one
            // before, so a second job would undo the link of a mail already sent.
            unique_key: Some(unique_key),
        }
    }

    /// The job that mails `user` a verification token.
    pub(super) fn verification_mail(&self, user: UserId, ctx: &RequestContext) -> JobLater {
        self.token_mail(user, TokenPurpose::VerifyEmail, ctx)
    }

    /// Enqueues the job that mails `user` a verification token.
    pub(super) async fn send_verification(
        &self,
        user: UserId,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        self.verification_mail(user, ctx)
            .try_enqueue(&self.jobs)
            .await
            .map_err(jobs_error)
    }

    /// Does the work that only an existing account's answer has — its audit `event`, then
    /// enqueueing its mailed token's `job` — after the answer, so that the answer takes the
    /// same path, and so the same time, as one for an unknown or taken email. Failures are
    /// logged; [`Mailer::drain`](unhidra_mail::Mailer::drain) waits for this work too.
    pub(super) fn after_answer(&self, event: AuditLater, job: JobLater, ctx: &RequestContext) {
        let auditor = Arc::clone(&self.auditor);
        let jobs = Arc::clone(&self.jobs);
        let ctx = ctx.clone();
        self.mailer.later(async move {
            auditor
                .record(event.kind, event.actor, event.subject, &ctx, event.detail)
                .await;
            job.enqueue(&jobs).await;
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
            self.send_verification(user.id, ctx).await?;
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
            self.token_mail(user.id, TokenPurpose::ResetPassword, ctx),
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
