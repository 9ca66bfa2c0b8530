//! Recent re-authentication: operations that could take over an account's second factor need
//! the password presented for this session within `reauth_window`, so that a stolen access
//! token alone cannot enrol or remove TOTP.

use unhidra_store::identity::UserRecord;

use super::{Identity, IdentityError, Principal, RequestContext};

/// What a signed-in user presents again to prove it is them.
#[derive(Clone, Copy)]
pub(super) enum Presented<'a> {
    /// The current password.
    Password(&'a str),
    /// A TOTP code or a recovery code.
    Code(&'a str),
}

impl Identity {
    /// Checks the caller's current password for an operation that asks for it again (a
    /// password change, a re-authentication); see [`Identity::check_presented`].
    pub(super) async fn check_current_password(
        &self,
        who: &Principal,
        password: &str,
        route: &'static str,
        failed_event: &str,
        ctx: &RequestContext,
    ) -> Result<UserRecord, IdentityError> {
        self.check_presented(who, Presented::Password(password), route, failed_event, ctx)
            .await
    }

    /// Checks a password or second-factor code that the signed-in caller presents again:
    /// throttled per account (`route` names the throttle), refused while the account is locked
    /// or when the check could overshoot its lock, a wrong one counted like a failed login
    /// (audited as `failed_event`; a stolen access token must not buy guesses), the right one
    /// resetting the count. A password too long to be anyone's (see `password_fits`) is
    /// wrong without being hashed. Returns the account as stored.
    pub(super) async fn check_presented(
        &self,
        who: &Principal,
        presented: Presented<'_>,
        route: &'static str,
        failed_event: &str,
        ctx: &RequestContext,
    ) -> Result<UserRecord, IdentityError> {
        let user = self.store.user_by_id(who.user_id).await?;
        let reservation = self
            .limited(route, &self.limits.reauth_account, user.email.as_str(), ctx)
            .await?;
        let (checking, user) = self.enter_check(&user, None, ctx).await?;
        let (right, reason, wrong) = match presented {
            Presented::Password(password) => {
                let right = self.password_fits(password)
                    && self
                        .hasher
                        .verify(password, Some(&user.password_hash))
                        .await?
                        .matches;
                (right, "wrong_password", IdentityError::WrongCurrentPassword)
            }
            Presented::Code(code) => {
                let right = self.check_code(&user, code).await?.is_some();
                (right, "wrong_code", IdentityError::WrongCode)
            }
        };
        if !right {
            self.count_failure(checking, &user, failed_event, reason, ctx)
                .await?;
            return Err(wrong);
        }
        drop(checking);
        self.limits.reauth_account.release(&reservation);
        self.store.record_login_success(user.id, self.now()).await?;
        Ok(user)
    }

    /// Refuses unless this session's password was presented within `reauth_window` (at login
    /// or with [`Identity::reauthenticate`]). Called before anything is stored.
    pub(super) async fn require_recent_password(
        &self,
        who: &Principal,
    ) -> Result<(), IdentityError> {
        let (session, _) = self.store.session_with_user(who.session_id).await?;
        if self.now() - session.authenticated_at > self.reauth_window {
            return Err(IdentityError::ReauthenticationRequired);
        }
        Ok(())
    }

    /// Checks the caller's password again and records it for the session, which then may
    /// change its second factor for `reauth_window`. A wrong password counts like a failed
    /// login (the account's lockout, audited as `reauth.failed`), and guesses are throttled per
    /// account like those at a password change.
    pub async fn reauthenticate(
        &self,
        who: &Principal,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<(), IdentityError> {
        let user = self
            .check_current_password(who, password, "reauthenticate", "reauth.failed", ctx)
            .await?;
        let now = self.now();
        if !self
            .store
            .reauthenticate_session(who.session_id, now)
            .await?
        {
            return Err(IdentityError::Unauthenticated("revoked"));
        }
        self.audit(
            "reauthenticated",
            Some(user.id),
            Some(who.session_id.to_string()),
            ctx,
            serde_json::json!({}),
        )
        .await;
        Ok(())
    }
}
