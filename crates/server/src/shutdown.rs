//! Serving with a graceful stop: on the signal, stop accepting, let requests in flight finish
//! within the grace period, then return.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::AppState;

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every request in flight finished.
    Drained,
    /// The grace period ran out first.
    GraceExpired,
}

/// After the grace period, how long abandoned requests get to send their 503.
const FLUSH: Duration = Duration::from_secs(1);

pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    state: &AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<Outcome> {
    let (stopping_tx, mut stopping) = watch::channel(false);
    // Nagle off: a streamed answer's head and its first piece of body (a 4 KiB firmware range,
    // a WebSocket frame) must not wait for the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown({
        let state = state.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested; finishing requests in flight");
            // WebSocket clients are told why before the process goes.
            state
                .chat()
                .hub()
                .close_all(unhidra_protocol::close::GOING_AWAY, "server shutting down");
            let _ = stopping_tx.send(true);
        }
    });
    let grace_over = async move {
        if stopping.wait_for(|s| *s).await.is_err() {
            // The server ended on its own; let its branch win.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served.map(|()| Outcome::Drained),
        () = grace_over => {}
    }
    state.abandon_requests();
    // The server future ends once the abandoned requests have answered.
    let _ = tokio::time::timeout(FLUSH, server).await;
    Ok(Outcome::GraceExpired)
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
