//! Graceful shutdown: stop accepting, let requests in flight finish within the grace period.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::helpers::TestApp;

#[tokio::test]
async fn requests_in_flight_finish_after_the_signal() {
    let (release_tx, release_rx) = oneshot::channel();
    let mut app =
        TestApp::spawn_with(crate::helpers::default_backend(), |_| {}, Some(release_rx)).await;
    let in_flight = tokio::spawn(app.client.get(app.url("/test/slow")).send());
    // Wait until the server has the request in hand.
    while unhidra_server::metrics::in_flight(app.state.metrics()) == 0 {
        tokio::task::yield_now().await;
    }
    let stopped = app.stop();
    let stopped = tokio::spawn(stopped);
    // New connections are refused once the server stops accepting.
    let mut refused = false;
    for _ in 0..10_000 {
        if tokio::net::TcpStream::connect(app.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the listener is closed during shutdown");
    assert!(!stopped.is_finished(), "waits for the request in flight");
    release_tx.send(()).unwrap();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "finished");
    stopped.await.unwrap().unwrap();
    app.db.drop_db().await;
}

#[tokio::test]
async fn the_grace_period_bounds_the_wait() {
    let mut app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.shutdown_grace = unhidra_config::HumanDuration(Duration::from_millis(300)),
        None,
    )
    .await;
    let hung = tokio::spawn(app.client.get(app.url("/test/hang")).send());
    while unhidra_server::metrics::in_flight(app.state.metrics()) == 0 {
        tokio::task::yield_now().await;
    }
    // Returns although the request never finishes, which is answered 503 at the deadline.
    app.stop().await.unwrap();
    let response = hung.await.unwrap().unwrap();
    crate::helpers::problem(response, 503, "shutting_down").await;
    app.db.drop_db().await;
}
