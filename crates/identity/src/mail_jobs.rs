//! The mail identity sends, as jobs: notices ([`unhidra_mail::SEND_KIND`], the message in the
//! payload) and mailed tokens ([`TOKEN_MAIL_KIND`]). A mailed token's job holds only the user
//! and what the token is for: the token is made, stored hashed and mailed by the attempt that
//! sends it, so that it is never stored in clear, not even in the queue. An attempt whose mail
//! is refused leaves a token nobody received; the next attempt's token replaces it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Duration as Span;
use serde::{Deserialize, Serialize};
use unhidra_config::Config;
use unhidra_core::{Clock, OpaqueToken, UserId};
use unhidra_jobs::{
    Breaker, BreakerConfig, Handler, JobContext, JobError, JobsBuilder, KindOptions,
};
use unhidra_mail::{Delivery, Mail, Mailer, SEND_KIND, job_error};
use unhidra_store::identity::TokenPurpose;
use unhidra_store::{Store, StoreError};

use crate::audit::now_of;

/// The job kind that makes, stores and mails a one-time token.
pub const TOKEN_MAIL_KIND: &str = "identity.token_mail";

/// How long a verification link works.
const VERIFY_TTL: i64 = 24 * 3600;
/// How long a password-reset link works.
const RESET_TTL: i64 = 30 * 60;

/// How mail jobs run: 12 attempts, each waiting up to twice as long as the one before (from
/// 1 s to an hour, with full jitter): a few hours of an SMTP server that is down or says "try
/// later" before a message is discarded. One attempt may take two minutes.
pub fn mail_options() -> KindOptions {
    KindOptions {
        max_attempts: 12,
        timeout: Duration::from_secs(120),
        ..KindOptions::default()
    }
}

/// Registers the mail kinds: [`SEND_KIND`] and [`TOKEN_MAIL_KIND`]. Over SMTP both share the
/// `smtp` circuit breaker (`breaker_*` in the config): while the server keeps failing, mail
/// waits instead of using up its attempts.
pub fn register(
    builder: JobsBuilder,
    config: &Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    mailer: Arc<Mailer>,
) -> JobsBuilder {
    let tokens = TokenMails {
        store,
        clock,
        mailer: Arc::clone(&mailer),
        public_url: config
            .public_url
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned()),
    };
    let options = KindOptions {
        breaker: (!mailer.is_outbox()).then(|| {
            Breaker::new(
                "smtp",
                BreakerConfig {
                    failures: config.breaker_failures,
                    window: config.breaker_window.0,
                    open_for: config.breaker_open_for.0,
                },
            )
        }),
        ..mail_options()
    };
    builder
        .register(SEND_KIND, Delivery(mailer), options.clone())
        .register(TOKEN_MAIL_KIND, tokens, options)
}

/// A [`TOKEN_MAIL_KIND`] job's payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenMail {
    pub(crate) user: UserId,
    pub(crate) purpose: Purpose,
}

/// What a mailed token is for, as a payload names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Purpose {
    VerifyEmail,
    ResetPassword,
}

impl Purpose {
    fn stored(self) -> TokenPurpose {
        match self {
            Self::VerifyEmail => TokenPurpose::VerifyEmail,
            Self::ResetPassword => TokenPurpose::ResetPassword,
        }
    }
}

/// Runs [`TOKEN_MAIL_KIND`] jobs.
#[derive(Debug)]
struct TokenMails {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    mailer: Arc<Mailer>,
    /// Where links in mail point; without it, mail carries the bare token.
    public_url: Option<String>,
}

impl TokenMails {
    /// The text that lets the user act on a token: a link when the public URL is known.
    fn token_text(&self, page: &str, token: &OpaqueToken) -> String {
        match &self.public_url {
            Some(base) => format!("{base}/{page}?token={}", token.expose()),
            None => format!("Your code: {}", token.expose()),
        }
    }
}

#[async_trait]
impl Handler for TokenMails {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        let TokenMail { user, purpose } = TokenMail::deserialize(&job.payload)
            .map_err(|e| JobError::permanent(format!("not a token mail: {e}")))?;
        // Until the mail is handed to the server, the outcome says nothing of it.
        job.dependency_used(false);
        let user = match self.store.user_by_id(user).await {
            Ok(user) => user,
            // The account is gone: there is no one to mail.
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(JobError::retry(unhidra_core::error_chain(&e))),
        };
        let (ttl, page) = match purpose {
            // Verified since the job was enqueued: no link is needed any more.
            Purpose::VerifyEmail if user.email_verified_at.is_some() => return Ok(()),
            Purpose::VerifyEmail => (VERIFY_TTL, "verify-email"),
            Purpose::ResetPassword if !user.active => return Ok(()),
            Purpose::ResetPassword => (RESET_TTL, "reset-password"),
        };
        let token = OpaqueToken::generate();
        let now = now_of(&*self.clock);
        self.store
            .issue_one_time_token(
                &token.hash(),
                user.id,
                purpose.stored(),
                now,
                now + Span::seconds(ttl),
            )
            .await
            .map_err(|e| JobError::retry(unhidra_core::error_chain(&e)))?;
        let text = self.token_text(page, &token);
        let mail = match purpose {
            Purpose::VerifyEmail => Mail {
                to: user.email.to_string(),
                subject: "Verify your email address".to_owned(),
                body: format!(
                    "Welcome to Unhidra.\n\nTo verify that this address is yours, use this \
                     within 24 hours:\n\n{text}\n\nIf you did not create an account, ignore this \
                     message.\n"
                ),
            },
            Purpose::ResetPassword => Mail {
                to: user.email.to_string(),
                subject: "Reset your password".to_owned(),
                body: format!(
                    "To choose a new password for your Unhidra account, use this within 30 \
                     minutes:\n\n{text}\n\nIf you did not ask for this, ignore this message; \
                     your password stays as it is.\n"
                ),
            },
        };
        job.dependency_used(true);
        self.mailer.send(&mail).await.map_err(job_error)
    }
}
