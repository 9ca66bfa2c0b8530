//! The listener for other nodes' enqueues: `LISTEN unhidra_jobs` on a connection of the pool,
//! handing each notification's queue on, coalesced, to the node's job system.

use std::time::Duration;

use futures_util::StreamExt;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification};
use tokio::sync::mpsc;

use crate::jobs::{JobWakeup, PendingWakeups, WAKEUP_CHANNEL};

/// Wake-ups waiting in the channel to the job system; more wait coalesced in the listener.
const CHANNEL: usize = 16;
/// The first wait before connecting again after a failure; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two attempts to connect.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts the listener task; it stops when the receiver is dropped or the pool closes.
pub(super) fn start(pool: PgPool) -> mpsc::Receiver<JobWakeup> {
    let (tx, rx) = mpsc::channel(CHANNEL);
    tokio::spawn(listen(pool, tx));
    rx
}

/// How a connection's time ended.
enum Ended {
    /// The receiver is gone, or the pool closed: stop.
    Stop,
    /// The connection failed: connect again after a backoff.
    Failed,
}

async fn listen(pool: PgPool, tx: mpsc::Sender<JobWakeup>) {
    let mut pending = PendingWakeups::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect(&pool).await {
            Ok(listener) => {
                backoff = MIN_BACKOFF;
                tracing::debug!("listening for jobs enqueued on other nodes");
                // What was enqueued before the LISTEN took effect was not heard.
                pending.add(JobWakeup::All);
                if let Ended::Stop = relay(listener, &tx, &mut pending).await {
                    return;
                }
            }
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => tracing::warn!(
                error = %e,
                retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "cannot listen for jobs enqueued on other nodes; polling meanwhile"
            ),
        }
        // What was heard before the connection failed is still handed on meanwhile.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = &mut wait => break,
                permit = tx.reserve(), if !pending.is_empty() => {
                    if !hand_on(permit, &mut pending) {
                        return;
                    }
                }
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(WAKEUP_CHANNEL).await?;
    Ok(listener)
}

/// Hands the notifications on until the connection fails or the receiver goes.
async fn relay(
    listener: PgListener,
    tx: &mpsc::Sender<JobWakeup>,
    pending: &mut PendingWakeups,
) -> Ended {
    // A stream keeps a receive in progress across the select's turns (a dropped receive future
    // could lose a half-read message).
    let mut notifications = Box::pin(futures_util::stream::unfold(
        listener,
        |mut listener| async move {
            let next = listener.try_recv().await;
            Some((next, listener))
        },
    ));
    loop {
        tokio::select! {
            () = tx.closed() => return Ended::Stop,
            permit = tx.reserve(), if !pending.is_empty() => {
                if !hand_on(permit, pending) {
                    return Ended::Stop;
                }
            }
            next = notifications.next() => match next {
                Some(Ok(Some(notification))) => pending.add(wakeup(&notification)),
                Some(Err(sqlx::Error::PoolClosed)) | None => return Ended::Stop,
                // Connecting again (rather than sqlx's reconnect at the next receive) wakes
                // every queue once the LISTEN holds again, for what was missed meanwhile.
                Some(Ok(None)) => {
                    tracing::warn!("lost the connection listening for jobs enqueued on other nodes; reconnecting");
                    return Ended::Failed;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "listening for jobs enqueued on other nodes failed; reconnecting");
                    return Ended::Failed;
                }
            },
        }
    }
}

/// Sends the next pending wake-up in the place reserved; false if the receiver is gone.
fn hand_on(
    permit: Result<mpsc::Permit<'_, JobWakeup>, mpsc::error::SendError<()>>,
    pending: &mut PendingWakeups,
) -> bool {
    let Ok(permit) = permit else {
        return false;
    };
    if let Some(wakeup) = pending.take() {
        permit.send(wakeup);
    }
    true
}

fn wakeup(notification: &PgNotification) -> JobWakeup {
    JobWakeup::Queue(notification.payload().to_owned())
}
