//! Outgoing mail: one mailer for every message Unhidra sends. With `smtp_url` it delivers over
//! SMTP; without, it writes each message as an RFC 5322 `.eml` file to `<data_dir>/outbox/`
//! and logs a line, so that development and tests can read what a user would receive.
//!
//! Mail goes out as jobs ([`SEND_KIND`], run by [`Delivery`]): a refused or unreachable SMTP
//! server is retried with backoff, and a message enqueued is not lost at shutdown or in a
//! crash. [`job_error`] says which failures another attempt could fix.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use unhidra_config::Config;
use unhidra_jobs::{Handler, JobContext, JobError};

/// The job kind that sends one [`Mail`] (its payload).
pub const SEND_KIND: &str = "mail.send";

/// A message to one recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mail {
    /// The recipient's address.
    pub to: String,
    /// The subject line.
    pub subject: String,
    /// The plain-text body.
    pub body: String,
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// An address or the message could not be built.
    #[error("mail: {0}")]
    Message(String),
    /// The SMTP server could not be reached, or answered "try later" (4xx) or refused the
    /// session (a 5xx about the server, such as a login it refused).
    #[error("smtp: {0}")]
    Smtp(String),
    /// The SMTP server refused this message for good (550–553): another attempt would not help.
    #[error("smtp refused: {0}")]
    Refused(String),
    /// The outbox could not be written.
    #[error("outbox: {0}")]
    Outbox(#[from] std::io::Error),
}

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Outbox(PathBuf),
}

/// Sends Unhidra's mail.
pub struct Mailer {
    from: Mailbox,
    transport: Transport,
    /// Work handed to [`Mailer::later`] that has not ended.
    pending: AtomicUsize,
    idle: Notify,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.transport {
            Transport::Smtp(_) => "smtp".to_owned(),
            Transport::Outbox(dir) => format!("outbox {}", dir.display()),
        };
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .field("transport", &kind)
            .finish()
    }
}

/// The most background work (messages and [`Mailer::later`] work) waiting at once; past it new
/// work is dropped and logged, so that a flood of requests that each start some cannot grow
/// memory without bound while the SMTP server or the store is slow.
pub const MAX_PENDING: usize = 1000;

/// The folder under the data folder that holds mail when no SMTP server is configured.
pub const OUTBOX: &str = "outbox";

impl Mailer {
    /// The mailer a config asks for.
    pub fn from_config(config: &Config) -> Result<Self, MailError> {
        let from: Mailbox = config
            .mail_from
            .parse()
            .map_err(|e| MailError::Message(format!("mail_from: {e}")))?;
        let transport = match &config.smtp_url {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    // The URL may hold a password: say what is wrong, not what it is.
                    .map_err(|e| MailError::Smtp(format!("smtp_url is not usable ({e})")))?
                    .build(),
            ),
            None => Transport::Outbox(config.data_dir.join(OUTBOX)),
        };
        Ok(Self {
            from,
            transport,
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Whether mail goes to the outbox folder rather than an SMTP server.
    pub fn is_outbox(&self) -> bool {
        matches!(self.transport, Transport::Outbox(_))
    }

    /// Sends one message.
    pub async fn send(&self, mail: &Mail) -> Result<(), MailError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|e| MailError::Message(format!("recipient: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
            .map_err(|e| MailError::Message(e.to_string()))?;
        match &self.transport {
            Transport::Smtp(smtp) => {
                smtp.send(message).await.map_err(|e| smtp_error(&e))?;
                tracing::info!(subject = %mail.subject, "mail sent");
            }
            Transport::Outbox(dir) => {
                let path = write_outbox(dir, &message.formatted()).await?;
                tracing::info!(subject = %mail.subject, file = %path.display(), "mail written to the outbox");
            }
        }
        Ok(())
    }

    /// Runs `work` in the background, so that the caller's answer neither waits for nor
    /// depends on it (work that ends in a message: an audit event, then the job that mails a
    /// token). [`Mailer::drain`] waits for it. `work` logs its own failures. With
    /// [`MAX_PENDING`] already waiting, `work` is dropped (and logged) instead: the caller's
    /// answer does not change.
    pub fn later(self: &Arc<Self>, work: impl std::future::Future<Output = ()> + Send + 'static) {
        /// Counts the work as pending until it ends, by a panic too.
        struct Pending(Arc<Mailer>);
        impl Drop for Pending {
            fn drop(&mut self) {
                if self.0.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                    self.0.idle.notify_waiters();
                }
            }
        }
        if self.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            drop(Pending(Arc::clone(self)));
            tracing::error!(
                limit = MAX_PENDING,
                "background mail work dropped: too much is waiting already"
            );
            return;
        }
        let pending = Pending(Arc::clone(self));
        // In the caller's span, so that a failure is logged with the request's trace id.
        let work = tracing::Instrument::in_current_span(work);
        tokio::spawn(async move {
            let _pending = pending;
            work.await;
        });
    }

    /// Waits until all work handed to [`Mailer::later`] has ended (its mail is enqueued): at
    /// shutdown, so that no notice is lost, and in tests.
    pub async fn drain(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so that a wake-up in between is not missed.
            idle.as_mut().enable();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// What an SMTP failure is, kept without the server's own words: a reply may quote the
/// message (a content filter quoting a link, and the link holds a token), so only its code is
/// kept. Only the replies about this message's recipient or content are final (550 mailbox
/// unavailable, 551 not local, 552 storage exceeded, 553 mailbox name not allowed); every other
/// reply — a 4xx, and 5xx replies about the server or the session such as a refused login
/// (535), a required STARTTLS (530) or a refused greeting (554) — is worth another attempt, and
/// counts against the server's circuit.
fn smtp_error(e: &lettre::transport::smtp::Error) -> MailError {
    match e.status().map(|code| code.to_string()) {
        Some(code) if matches!(code.as_str(), "550" | "551" | "552" | "553") => {
            MailError::Refused(format!("the SMTP server refused the message ({code})"))
        }
        Some(code) => MailError::Smtp(format!("the SMTP server answered {code}")),
        // Not a reply: the connection, TLS or a timeout; no server text in it.
        None => MailError::Smtp(e.to_string()),
    }
}

/// How a failed send ends its job's attempt: a message that cannot be built or a refusal of
/// this message (see [`smtp_error`]) is not retried; an unreachable server, any other reply
/// or an outbox that cannot be written is.
pub fn job_error(e: MailError) -> JobError {
    match e {
        MailError::Message(_) | MailError::Refused(_) => JobError::permanent(e),
        MailError::Smtp(_) | MailError::Outbox(_) => JobError::retry(e),
    }
}

/// Runs [`SEND_KIND`] jobs: sends the [`Mail`] a job carries.
#[derive(Debug)]
pub struct Delivery(pub Arc<Mailer>);

#[async_trait]
impl Handler for Delivery {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        let mail = Mail::deserialize(&job.payload)
            .map_err(|e| JobError::permanent(format!("not a mail: {e}")))?;
        self.0.send(&mail).await.map_err(job_error)
    }
}

/// Writes a message atomically (a temp file renamed into place), named so that files sort by
/// time.
async fn write_outbox(dir: &std::path::Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    tokio::fs::create_dir_all(dir).await?;
    let name = format!(
        "{}-{}.eml",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
        uuid::Uuid::new_v4().simple()
    );
    let path = dir.join(&name);
    let temp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&temp, bytes).await?;
    tokio::fs::rename(&temp, &path).await?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox_mailer(dir: &std::path::Path) -> Arc<Mailer> {
        let mut config = Config::defaults(unhidra_config::Profile::Test);
        config.data_dir = dir.to_owned();
        Arc::new(Mailer::from_config(&config).unwrap())
    }

    #[tokio::test]
    async fn drain_waits_for_work_that_ends_in_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = outbox_mailer(dir.path());
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let inner = Arc::clone(&mailer);
        mailer.later(async move {
            // Stands for storing a token: the mail is handed over only after it.
            let _ = wait.await;
            inner
                .send(&Mail {
                    to: "ada@example.com".to_owned(),
                    subject: "Reset your password".to_owned(),
                    body: "Your code: x".to_owned(),
                })
                .await
                .unwrap();
        });
        go.send(()).unwrap();
        mailer.drain().await;
        let written = std::fs::read_dir(dir.path().join(OUTBOX)).unwrap().count();
        assert_eq!(
            written, 1,
            "the message of the later work is sent before drain returns"
        );
    }

    #[tokio::test]
    async fn work_past_the_limit_is_dropped_and_the_rest_still_drains() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = outbox_mailer(dir.path());
        let (go, wait) = tokio::sync::watch::channel(false);
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..MAX_PENDING + 5 {
            let mut wait = wait.clone();
            let ran = Arc::clone(&ran);
            mailer.later(async move {
                let _ = wait.wait_for(|go| *go).await;
                ran.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(mailer.pending.load(Ordering::SeqCst), MAX_PENDING);
        go.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(10), mailer.drain())
            .await
            .expect("drained");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            MAX_PENDING,
            "the 5 past the limit never ran"
        );
    }

    #[tokio::test]
    async fn work_that_panics_does_not_hold_drain_forever() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = outbox_mailer(dir.path());
        mailer.later(async { panic!("background work failed") });
        mailer.drain().await;
    }
}
