//! Helpers shared by the tests: sessions on a seeded generator, draining frames.

use rand::SeedableRng;
use rand::rngs::StdRng;
use unhidra_device::machine::{Action, Hello, Session, SessionConfig, Storage};
use unhidra_protocol::device::DeviceFrame;

pub fn config() -> SessionConfig {
    SessionConfig {
        hello: Hello {
            firmware: "1.0.0".into(),
            partition: Some("ota_0".into()),
            reset_reason: Some("power_on".into()),
            capabilities: vec!["thermal".into()],
            secure_version: Some(1),
        },
        ..SessionConfig::default()
    }
}

pub fn session<S: Storage>(config: SessionConfig, storage: S, seed: u64) -> Session<S, StdRng> {
    Session::new(config, storage, StdRng::seed_from_u64(seed)).unwrap()
}

/// Every frame the session would send now.
pub fn drain<S: Storage>(session: &mut Session<S, StdRng>, now: u64) -> Vec<DeviceFrame> {
    std::iter::from_fn(|| session.poll_transmit(now).unwrap()).collect()
}

/// Every action the session has now.
pub fn actions<S: Storage>(session: &mut Session<S, StdRng>) -> Vec<Action> {
    std::iter::from_fn(|| session.poll_action()).collect()
}

/// Takes the pending `Connect`, reports the connection up and drains its frames.
pub fn connect<S: Storage>(session: &mut Session<S, StdRng>, now: u64) -> Vec<DeviceFrame> {
    assert_eq!(actions(session), vec![Action::Connect]);
    session.handle_connected(now);
    drain(session, now)
}

/// The seqs of the telemetry frames among `frames`.
pub fn seqs(frames: &[DeviceFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            DeviceFrame::Telemetry { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}
