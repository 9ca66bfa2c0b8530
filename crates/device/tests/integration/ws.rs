//! The tokio adapter and the simulator against an in-test WebSocket server that speaks the
//! device protocol's telemetry part: it acks batches (as duplicates when it has them) and can
//! drop a connection in the middle of a batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use unhidra_device::machine::{Backoff, BatchLimits, Encoding, Handlers, Session, StopReason};
use unhidra_device::simulate::{self, SimulateOptions};
use unhidra_device::ws::{Device, WsOptions};
use unhidra_device::{ArrayValue, Point, Value};
use unhidra_protocol::device::{
    DeviceFrame, DeviceServerFrame, parse_device_frame, parse_device_frame_msgpack,
};

use crate::common::config;

/// What the server saw, per key.
#[derive(Default)]
struct Ledger {
    /// Stored batches: (key, seq) → points.
    stored: BTreeMap<(String, u64), Vec<Point>>,
    /// Every telemetry frame received: (key, seq, connection).
    received: Vec<(String, u64, usize)>,
    /// Batches acked: (key, seq).
    acked: BTreeSet<(String, u64)>,
    /// Upgrades accepted, and refused.
    connections: usize,
    refused: usize,
    /// Frames that came before a connection's hello.
    before_hello: usize,
}

#[derive(Clone)]
struct TestServer {
    url: String,
    ledger: Arc<Mutex<Ledger>>,
}

/// Serves on port 0: keys in `keys` are accepted, others refused with 401. The first
/// connection is dropped (TCP shut down, no close frame) when its `drop_at`th batch arrives,
/// before that batch is acked.
async fn serve(keys: BTreeSet<String>, drop_at: Option<usize>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let keys = Arc::new(keys);
    let shared = ledger.clone();
    tokio::spawn(async move {
        let mut connection = 0;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            connection += 1;
            let drop_here = if connection == 1 { drop_at } else { None };
            tokio::spawn(session(
                stream,
                connection,
                keys.clone(),
                shared.clone(),
                drop_here,
            ));
        }
    });
    TestServer { url, ledger }
}

#[allow(
    clippy::result_large_err,
    reason = "the handshake callback's error type is tungstenite's"
)]
async fn session(
    stream: TcpStream,
    connection: usize,
    keys: Arc<BTreeSet<String>>,
    ledger: Arc<Mutex<Ledger>>,
    drop_at: Option<usize>,
) {
    let mut offered = None;
    let callback = |request: &Request, mut response: Response| {
        let header = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let entries: Vec<&str> = header.split(',').map(str::trim).collect();
        let key = entries.iter().find_map(|e| e.strip_prefix("key."));
        match key {
            Some(key) if keys.contains(key) => {
                offered = Some((key.to_owned(), entries[0].to_owned()));
                response.headers_mut().insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_str(entries[0]).unwrap(),
                );
                Ok(response)
            }
            _ => {
                let mut refusal = ErrorResponse::new(None);
                *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                Err(refusal)
            }
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        ledger.lock().unwrap().refused += 1;
        return;
    };
    let Some((key, subprotocol)) = offered else {
        return;
    };
    let msgpack = subprotocol == "unhidra.device.v1.msgpack";
    let encode = |frame: &DeviceServerFrame| {
        if msgpack {
            WsMessage::Binary(frame.to_msgpack().into())
        } else {
            WsMessage::Text(frame.to_json().into())
        }
    };
    ledger.lock().unwrap().connections += 1;
    let welcome = DeviceServerFrame::Welcome {
        connection: connection.to_string(),
        device: key.clone(),
    };
    if ws.send(encode(&welcome)).await.is_err() {
        return;
    }
    let mut hello = false;
    let mut batches = 0;
    while let Some(Ok(message)) = ws.next().await {
        let frame = match message {
            WsMessage::Text(text) => parse_device_frame(text.as_str()).unwrap(),
            WsMessage::Binary(bytes) => parse_device_frame_msgpack(&bytes).unwrap(),
            WsMessage::Close(_) => break,
            _ => continue,
        };
        if !hello && !matches!(frame, DeviceFrame::Hello { .. }) {
            ledger.lock().unwrap().before_hello += 1;
        }
        hello |= matches!(frame, DeviceFrame::Hello { .. });
        let DeviceFrame::Telemetry { seq, points } = frame else {
            continue;
        };
        batches += 1;
        ledger
            .lock()
            .unwrap()
            .received
            .push((key.clone(), seq, connection));
        if Some(batches) == drop_at {
            // Gone in the middle of the batch: what was acked is flushed, the rest is not.
            let _ = ws.get_mut().shutdown().await;
            while let Some(Ok(_)) = ws.next().await {}
            return;
        }
        let duplicate = {
            let mut ledger = ledger.lock().unwrap();
            let duplicate = ledger.stored.insert((key.clone(), seq), points).is_some();
            ledger.acked.insert((key.clone(), seq));
            duplicate
        };
        if ws
            .send(encode(&DeviceServerFrame::Ack { seq, duplicate }))
            .await
            .is_err()
        {
            return;
        }
    }
}

const KEY: &str = "unh_dk_test-device_1";

fn fast_config() -> unhidra_device::machine::SessionConfig {
    let mut config = config();
    config.batch = BatchLimits {
        max_points: 4,
        linger_ms: 50,
        ..BatchLimits::default()
    };
    config.backoff = Backoff {
        base_ms: 50,
        cap_ms: 200,
    };
    config
}

#[tokio::test]
async fn nothing_is_lost_or_doubled_when_the_connection_drops_mid_batch() {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let server = serve([KEY.to_owned()].into(), Some(3)).await;
        let session = Session::new(
            fast_config(),
            unhidra_device::machine::MemoryStorage::new(),
            StdRng::seed_from_u64(5),
        )
        .unwrap();
        let options = WsOptions {
            encoding,
            ..WsOptions::new(server.url.clone(), KEY)
        };
        let mut device = Device::new(session, Handlers::new(), options);
        let handle = device.handle();
        let thermal = ArrayValue::from_f32(vec![24, 32], &[22.25; 768]).unwrap();
        let app = async move {
            for i in 0..40 {
                handle
                    .record("n", Value::Number(f64::from(i)))
                    .await
                    .unwrap();
                if i % 10 == 9 {
                    handle
                        .record("thermal", Value::Array(thermal.clone()))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            handle.finish().await.unwrap();
            std::future::pending::<()>().await;
        };
        let run = async {
            tokio::select! {
                result = device.run(std::future::pending()) => result,
                () = app => unreachable!(),
            }
        };
        let stopped = tokio::time::timeout(Duration::from_secs(20), run).await;
        assert_eq!(
            stopped.unwrap().unwrap(),
            StopReason::Shutdown,
            "{encoding:?}"
        );

        let stats = device.session().stats();
        assert!(device.session().buffered().is_empty());
        assert_eq!(stats.acked, stats.batches_sealed, "{stats:?}");
        assert!(stats.retransmits >= 1, "{stats:?}");
        assert_eq!(stats.connects, 2, "{stats:?}");
        let ledger = server.ledger.lock().unwrap();
        assert_eq!(ledger.before_hello, 0);
        // Every point once, in order, the arrays as they were recorded.
        let mut numbers = Vec::new();
        let mut frames = 0;
        for points in ledger.stored.values() {
            for point in points {
                match &point.value {
                    Value::Number(n) => numbers.push(*n),
                    Value::Array(a) => {
                        assert_eq!(a.to_f32_vec(), vec![22.25; 768]);
                        frames += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(
            numbers,
            (0..40).map(f64::from).collect::<Vec<_>>(),
            "{encoding:?}"
        );
        assert_eq!(frames, 4);
        // A batch the server acked never came again; the one it dropped came once more.
        let mut times: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, seq, _) in &ledger.received {
            *times.entry(*seq).or_default() += 1;
        }
        let again: Vec<u64> = times
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        assert!(!again.is_empty());
        for seq in &again {
            let first = ledger.received.iter().find(|(_, s, _)| s == seq).unwrap();
            assert_eq!(
                first.2, 1,
                "only batches of the dropped connection come again"
            );
        }
        assert_eq!(
            stats.duplicates, 0,
            "nothing the server stored was sent again"
        );
    }
}

#[tokio::test]
async fn an_unknown_key_stops_the_device_after_one_attempt() {
    let server = serve(BTreeSet::new(), None).await;
    let session = Session::new(
        fast_config(),
        unhidra_device::machine::MemoryStorage::new(),
        StdRng::seed_from_u64(1),
    )
    .unwrap();
    let mut device = Device::new(
        session,
        Handlers::new(),
        WsOptions::new(server.url.clone(), KEY),
    );
    let stopped = tokio::time::timeout(Duration::from_secs(5), device.run(std::future::pending()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped, StopReason::Revoked);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = server.ledger.lock().unwrap();
    assert_eq!((ledger.refused, ledger.connections), (1, 0));
}

#[tokio::test]
async fn the_simulator_delivers_every_reading_once_through_drops_and_restarts() {
    let keys: Vec<String> = (0..3).map(|i| format!("unh_dk_sim-{i}")).collect();
    let server = serve(keys.iter().cloned().collect(), Some(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.json");
    std::fs::write(&key_file, serde_json::to_string(&keys).unwrap()).unwrap();
    let options = SimulateOptions {
        duration: Duration::from_millis(2_500),
        drain: Duration::from_secs(10),
        reading_interval: Duration::from_millis(50),
        thermal_every: 5,
        batch_linger: Duration::from_millis(100),
        disconnects: 2,
        restarts: 1,
        seed: 42,
        ..SimulateOptions::new(server.url.clone(), key_file, dir.path().join("buffers"))
    };
    let report = tokio::time::timeout(Duration::from_secs(30), simulate::run(options))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.devices, 3);
    assert!(report.errors.is_empty(), "{report}");
    assert_eq!(
        (report.unacked, report.dropped, report.refused),
        (0, 0, 0),
        "{report}"
    );
    assert_eq!(report.acked, report.batches_sealed, "{report}");
    assert_eq!(report.restarts, 3, "{report}");
    assert!(report.reconnects >= 1, "{report}");
    let ledger = server.ledger.lock().unwrap();
    let stored: usize = ledger.stored.values().map(Vec::len).sum();
    assert_eq!(stored as u64, report.points, "{report}");
    assert_eq!(ledger.before_hello, 0);
    for key in &keys {
        let keys_seen: BTreeSet<&str> = ledger
            .stored
            .iter()
            .filter(|((device, _), _)| device == key)
            .flat_map(|(_, points)| points)
            .map(|p| p.key.as_str())
            .collect();
        assert!(
            keys_seen.contains("thermal") && keys_seen.contains("env.temperature"),
            "{key}"
        );
    }
}

#[test]
fn key_files_are_lines_or_a_json_list() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("keys.txt");
    std::fs::write(&lines, "# fleet A\nunh_dk_a1\n\n  unh_dk_a-2  \n").unwrap();
    assert_eq!(
        simulate::read_keys(&lines).unwrap(),
        vec!["unh_dk_a1", "unh_dk_a-2"]
    );
    let json = dir.path().join("keys.json");
    std::fs::write(&json, r#"["unh_dk_b1", "unh_dk_b2"]"#).unwrap();
    assert_eq!(
        simulate::read_keys(&json).unwrap(),
        vec!["unh_dk_b1", "unh_dk_b2"]
    );
    std::fs::write(&json, "unh_dk_ok\nbearer.token\n").unwrap();
    assert!(simulate::read_keys(&json).is_err());
}
