//! The state machine on a manual clock: no socket, no runtime, every instant chosen.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use serde_json::json;
use unhidra_device::machine::{
    Action, Backoff, BatchLimits, Blocking, BufferLimits, Clock, CommandReply, ConnectFailure,
    Encoding, Handlers, LinkState, MemoryStorage, Message, Received, StopReason, Transport,
};
use unhidra_device::{CommandStatus, Value};
use unhidra_protocol::close;
use unhidra_protocol::device::{DeviceFrame, DeviceServerFrame, parse_device_frame};

use crate::common::{actions, config, connect, drain, seqs, session};

fn ack(seq: u64) -> DeviceServerFrame {
    DeviceServerFrame::Ack {
        seq,
        duplicate: false,
    }
}

/// Small batches: two points each.
fn two_point_batches() -> unhidra_device::machine::SessionConfig {
    let mut config = config();
    config.batch = BatchLimits {
        max_points: 2,
        ..BatchLimits::default()
    };
    config
}

fn record_batches(
    s: &mut unhidra_device::machine::Session<MemoryStorage, rand::rngs::StdRng>,
    now: u64,
    n: usize,
) {
    for i in 0..n * 2 {
        s.record(now, "env.temp", Value::Number(i as f64)).unwrap();
    }
}

#[test]
fn hello_goes_first_and_nothing_before_the_connection() {
    let mut s = session(config(), MemoryStorage::new(), 1);
    s.record(0, "env.temp", Value::Number(21.5)).unwrap();
    s.flush(0).unwrap();
    assert_eq!(drain(&mut s, 0), vec![], "nothing is sent while connecting");
    assert!(
        !s.send_event("button", json!(null)),
        "events are not buffered"
    );
    let frames = connect(&mut s, 5_000);
    assert!(
        matches!(&frames[0], DeviceFrame::Hello { firmware, partition: Some(p), capabilities, .. }
            if firmware == "1.0.0" && p == "ota_0" && capabilities == &["thermal"]),
        "{frames:?}"
    );
    assert!(matches!(
        frames[1],
        DeviceFrame::Heartbeat { uptime: 5, .. }
    ));
    assert_eq!(seqs(&frames), vec![1], "the buffered batch follows");
    // The heartbeat comes every 30 s after that.
    assert_eq!(s.poll_timeout(), Some(35_000));
    s.handle_timeout(35_000).unwrap();
    assert!(matches!(
        drain(&mut s, 35_000)[..],
        [DeviceFrame::Heartbeat { uptime: 35, .. }]
    ));
}

#[test]
fn backoff_is_full_jitter_within_its_ceiling() {
    let backoff = Backoff::default();
    let mut by_attempt: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for seed in 0..200 {
        let mut s = session(config(), MemoryStorage::new(), seed);
        let mut now = 0;
        for attempt in 0..10u32 {
            assert_eq!(actions(&mut s), vec![Action::Connect]);
            s.handle_connect_failed(now, ConnectFailure::Unreachable);
            let LinkState::Waiting { until } = s.state() else {
                panic!("{:?}", s.state())
            };
            let delay = until - now;
            assert!(
                delay <= backoff.ceiling_ms(attempt),
                "attempt {attempt}: {delay} ms"
            );
            by_attempt.entry(attempt).or_default().push(delay);
            now = until;
            s.handle_timeout(now).unwrap();
        }
    }
    for (attempt, delays) in by_attempt {
        let ceiling = backoff.ceiling_ms(attempt) as f64;
        let low = delays
            .iter()
            .filter(|&&d| (d as f64) < ceiling * 0.25)
            .count();
        let high = delays
            .iter()
            .filter(|&&d| (d as f64) > ceiling * 0.75)
            .count();
        // Uniform over [0, ceiling]: a quarter of 200 on each side, give or take.
        assert!(
            low > 25 && high > 25,
            "attempt {attempt}: {low} low, {high} high"
        );
    }
    // The same seed, the same waits.
    let waits = |seed| {
        let mut s = session(config(), MemoryStorage::new(), seed);
        actions(&mut s);
        s.handle_connect_failed(0, ConnectFailure::Unreachable);
        s.state()
    };
    assert_eq!(waits(7), waits(7));
}

#[test]
fn a_stable_connection_resets_the_backoff() {
    let mut s = session(config(), MemoryStorage::new(), 3);
    let mut now = 0;
    for _ in 0..8 {
        actions(&mut s);
        s.handle_connect_failed(now, ConnectFailure::Unreachable);
        let LinkState::Waiting { until } = s.state() else {
            panic!()
        };
        now = until;
        s.handle_timeout(now).unwrap();
    }
    connect(&mut s, now);
    // Up for a minute, then gone: the next wait is the first one's, at most 500 ms.
    now += 60_000;
    s.handle_closed(now, Some(close::GOING_AWAY));
    let LinkState::Waiting { until } = s.state() else {
        panic!()
    };
    assert!(until - now <= 500, "{}", until - now);
}

#[test]
fn revoked_stops_for_good() {
    let mut s = session(config(), MemoryStorage::new(), 1);
    connect(&mut s, 0);
    s.handle_closed(1_000, Some(close::REVOKED));
    assert_eq!(actions(&mut s), vec![Action::Stopped(StopReason::Revoked)]);
    assert_eq!(s.state(), LinkState::Stopped(StopReason::Revoked));
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(10_000_000).unwrap();
    assert_eq!(actions(&mut s), vec![], "no reconnect, ever");

    // A 401 at the upgrade is the same.
    let mut s = session(config(), MemoryStorage::new(), 1);
    actions(&mut s);
    s.handle_connect_failed(0, ConnectFailure::Unauthorized);
    assert_eq!(actions(&mut s), vec![Action::Stopped(StopReason::Revoked)]);
    s.handle_timeout(10_000_000).unwrap();
    assert_eq!(actions(&mut s), vec![]);

    // A 429 waits at least its Retry-After.
    let mut s = session(config(), MemoryStorage::new(), 1);
    actions(&mut s);
    s.handle_connect_failed(
        0,
        ConnectFailure::RateLimited {
            retry_after_ms: Some(7_000),
        },
    );
    assert!(matches!(s.state(), LinkState::Waiting { until } if until >= 7_000));
}

#[test]
fn replaced_waits_at_least_thirty_seconds_with_jitter() {
    let mut waits = BTreeSet::new();
    for seed in 0..50 {
        let mut s = session(config(), MemoryStorage::new(), seed);
        connect(&mut s, 0);
        s.handle_closed(1_000, Some(close::REPLACED));
        let LinkState::Waiting { until } = s.state() else {
            panic!()
        };
        let wait = until - 1_000;
        assert!((30_000..=60_000).contains(&wait), "{wait}");
        waits.insert(wait);
        s.handle_timeout(until - 1).unwrap();
        assert_eq!(actions(&mut s), vec![], "not before the wait is over");
        s.handle_timeout(until).unwrap();
        assert_eq!(actions(&mut s), vec![Action::Connect]);
    }
    assert!(waits.len() > 40, "jittered: {waits:?}");
}

#[test]
fn unacked_batches_are_sent_again_after_a_disconnect_and_acked_ones_never() {
    let mut s = session(two_point_batches(), MemoryStorage::new(), 1);
    s.set_wall_clock(0, 1_000_000);
    record_batches(&mut s, 0, 10);
    let first_seq = s.buffered()[0];
    assert_eq!(
        first_seq, 1_000_000,
        "the first seq of a new buffer is the Unix time in ms"
    );
    let frames = connect(&mut s, 0);
    let sent = seqs(&frames);
    assert_eq!(
        sent,
        (first_seq..first_seq + 8).collect::<Vec<_>>(),
        "a window of 8"
    );
    for seq in &sent[..3] {
        s.handle_frame(10, ack(*seq)).unwrap();
    }
    // Acks free the window.
    assert_eq!(seqs(&drain(&mut s, 10)), vec![first_seq + 8, first_seq + 9]);
    s.handle_closed(20, None);
    s.handle_timeout(1_000).unwrap();
    let frames = connect(&mut s, 1_000);
    assert!(matches!(frames[0], DeviceFrame::Hello { .. }));
    let again = seqs(&frames);
    assert_eq!(
        again,
        (first_seq + 3..first_seq + 10).collect::<Vec<_>>(),
        "oldest first"
    );
    for seq in &again {
        s.handle_frame(
            1_100,
            DeviceServerFrame::Ack {
                seq: *seq,
                duplicate: *seq < first_seq + 5,
            },
        )
        .unwrap();
    }
    let stats = s.stats();
    assert_eq!(
        (stats.acked, stats.duplicates, stats.retransmits),
        (10, 2, 7)
    );
    assert!(s.buffered().is_empty());
    assert!(s.storage().seqs().is_empty());
}

#[test]
fn a_full_buffer_drops_its_oldest_batches() {
    let mut config = two_point_batches();
    config.buffer = BufferLimits {
        max_bytes: usize::MAX,
        max_batches: 3,
    };
    let mut s = session(config.clone(), MemoryStorage::new(), 1);
    record_batches(&mut s, 0, 5);
    assert_eq!(s.buffered(), vec![3, 4, 5]);
    assert_eq!(s.storage().seqs(), vec![3, 4, 5]);
    assert_eq!(s.stats().dropped, 2);

    // By bytes: each point counts its key, 8 bytes of number and 16 of overhead.
    let point = "env.temp".len() + 8 + 16;
    config.buffer = BufferLimits {
        max_bytes: 2 * 2 * point,
        max_batches: usize::MAX,
    };
    let mut s = session(config, MemoryStorage::new(), 1);
    record_batches(&mut s, 0, 5);
    assert_eq!(s.buffered(), vec![4, 5]);
    assert_eq!(s.buffered_bytes(), 4 * point);
    assert_eq!(s.stats().dropped, 3);
}

#[test]
fn an_open_batch_is_sealed_after_its_linger_and_bad_readings_are_refused() {
    let mut s = session(config(), MemoryStorage::new(), 1);
    s.record(100, "a", Value::Bool(true)).unwrap();
    assert!(s.record(100, "_bad", Value::Bool(true)).is_err());
    assert!(s.record(100, "nan", Value::Number(f64::NAN)).is_err());
    assert_eq!(s.poll_timeout(), Some(1_100));
    s.handle_timeout(1_100).unwrap();
    assert_eq!((s.open_points(), s.buffered().len()), (0, 1));
}

#[test]
fn refused_batches_are_dropped_and_retryable_ones_wait() {
    let mut s = session(two_point_batches(), MemoryStorage::new(), 1);
    record_batches(&mut s, 0, 3);
    assert_eq!(seqs(&connect(&mut s, 0)), vec![1, 2, 3]);
    let error = |code: &str, retry_after, seq: u64| DeviceServerFrame::Error {
        code: code.into(),
        message: "no".into(),
        retry_after,
        reference: Some(seq.to_string()),
    };
    s.handle_frame(10, error("invalid_key", None, 1)).unwrap();
    s.handle_frame(10, error("internal", None, 2)).unwrap();
    s.handle_frame(10, error("rate_limited", Some(2), 3))
        .unwrap();
    assert_eq!(s.stats().refused, 1);
    assert_eq!(s.buffered(), vec![2, 3]);
    assert_eq!(drain(&mut s, 10), vec![]);
    s.handle_timeout(2_010).unwrap();
    assert_eq!(seqs(&drain(&mut s, 2_010)), vec![3], "after retry_after");
    s.handle_timeout(5_010).unwrap();
    assert_eq!(seqs(&drain(&mut s, 5_010)), vec![2], "after retry_ms");
}

#[test]
fn a_silent_connection_is_closed_and_opened_again() {
    let mut s = session(two_point_batches(), MemoryStorage::new(), 1);
    record_batches(&mut s, 0, 1);
    connect(&mut s, 0);
    assert_eq!(s.poll_timeout(), Some(30_000), "the heartbeat first");
    s.handle_timeout(60_000).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![Action::Close {
            code: close::GOING_AWAY
        }]
    );
    assert!(matches!(s.state(), LinkState::Waiting { .. }));
}

#[test]
fn commands_run_once_and_expired_ones_not_at_all() {
    let mut s = session(config(), MemoryStorage::new(), 1);
    connect(&mut s, 0);
    let command = |id: &str, expires_at| DeviceServerFrame::Command {
        id: id.into(),
        name: "blink".into(),
        params: json!({"times": 2}),
        expires_at,
    };
    let mut handlers = Handlers::new().on("blink", |params| {
        CommandReply::succeeded(json!({"blinked": params["times"]}))
    });
    s.handle_frame(0, command("c1", i64::MAX)).unwrap();
    let [Action::Command(c1)] = &actions(&mut s)[..] else {
        panic!()
    };
    // Delivered again while it runs: nothing happens.
    s.handle_frame(0, command("c1", i64::MAX)).unwrap();
    assert_eq!(actions(&mut s), vec![]);
    let reply = handlers.run(c1);
    s.command_done(&c1.id, reply);
    let result = DeviceFrame::CommandResult {
        id: "c1".into(),
        status: CommandStatus::Succeeded,
        output: Some(json!({"blinked": 2})),
    };
    assert_eq!(drain(&mut s, 0), vec![result.clone()]);
    // After a reconnect the server sends it again: the same answer, not a second run.
    s.handle_closed(10, None);
    s.handle_timeout(1_000).unwrap();
    connect(&mut s, 1_000);
    s.handle_frame(1_000, command("c1", i64::MAX)).unwrap();
    assert_eq!(actions(&mut s), vec![]);
    assert_eq!(drain(&mut s, 1_000), vec![result]);
    assert_eq!(
        (s.stats().commands_run, s.stats().commands_repeated),
        (1, 2)
    );

    // An unknown command fails as the protocol says.
    s.handle_frame(
        1_000,
        DeviceServerFrame::Command {
            id: "c2".into(),
            name: "dance".into(),
            params: json!(null),
            expires_at: i64::MAX,
        },
    )
    .unwrap();
    let [Action::Command(c2)] = &actions(&mut s)[..] else {
        panic!()
    };
    assert_eq!(handlers.run(c2), CommandReply::failed("unknown_command"));

    // Past its expiry by the wall clock: answered `expired`, never run.
    s.set_wall_clock(1_000, 1_767_225_600_000);
    s.handle_frame(1_000, command("c3", 1_767_225_599_999))
        .unwrap();
    assert_eq!(actions(&mut s), vec![]);
    assert_eq!(
        drain(&mut s, 1_000),
        vec![DeviceFrame::CommandResult {
            id: "c3".into(),
            status: CommandStatus::Failed,
            output: Some(json!({"error": "expired"})),
        }]
    );
    assert_eq!(s.stats().commands_expired, 1);
}

#[test]
fn a_config_is_applied_and_reported() {
    let mut s = session(config(), MemoryStorage::new(), 1);
    let mut handlers = Handlers::new().with_config(
        Some(3),
        [
            ("interval".to_owned(), json!(30)),
            ("led".to_owned(), json!("on")),
        ]
        .into(),
    );
    let (version, state) = handlers.reported();
    s.set_reported(version, state.clone());
    let frames = connect(&mut s, 0);
    assert_eq!(
        frames[2],
        DeviceFrame::Reported {
            version: Some(3),
            state
        },
        "reported right after hello and the first heartbeat"
    );
    s.handle_frame(
        0,
        DeviceServerFrame::Config {
            version: 4,
            desired: [
                ("interval".to_owned(), json!(60)),
                ("led".to_owned(), json!(null)),
            ]
            .into(),
            full: false,
        },
    )
    .unwrap();
    let [Action::Config(update)] = &actions(&mut s)[..] else {
        panic!()
    };
    let (version, state) = handlers.apply(update);
    s.config_applied(version, state);
    let expected = DeviceFrame::Reported {
        version: Some(4),
        state: [("interval".to_owned(), json!(60))].into(),
    };
    assert_eq!(drain(&mut s, 0), vec![expected.clone()]);
    // The next connection reports the new state.
    s.handle_closed(10, None);
    s.handle_timeout(1_000).unwrap();
    assert_eq!(connect(&mut s, 1_000)[2], expected);
    // A full configuration replaces everything.
    let full = unhidra_device::machine::ConfigUpdate {
        version: 5,
        desired: [("mode".to_owned(), json!("eco"))].into(),
        full: true,
    };
    assert_eq!(
        handlers.apply(&full),
        (Some(5), [("mode".to_owned(), json!("eco"))].into())
    );
}

// ---- the blocking driver over a fake transport and a manual clock ----

#[derive(Clone, Default)]
struct ManualClock(Rc<Cell<u64>>);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.get()
    }
    fn wall_ms(&self) -> Option<i64> {
        Some(1_767_225_600_000 + self.0.get() as i64)
    }
}

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    frames: Vec<(usize, DeviceFrame)>,
    connections: usize,
    acked: BTreeSet<u64>,
}

/// A server in the transport: acks telemetry, drops the first connection after its third
/// batch (before acking it), and answers `ping`.
struct FakeTransport {
    clock: ManualClock,
    seen: Rc<RefCell<Seen>>,
    inbox: VecDeque<Received>,
    connected: bool,
    dropped_once: bool,
}

impl Transport for FakeTransport {
    type Error = std::io::Error;

    fn connect(&mut self) -> Result<(), ConnectFailure> {
        self.connected = true;
        self.seen.borrow_mut().connections += 1;
        Ok(())
    }

    fn send(&mut self, message: Message) -> Result<(), std::io::Error> {
        assert!(self.connected, "sent while not connected");
        let Message::Text(text) = message else {
            panic!("JSON was agreed")
        };
        let frame = parse_device_frame(&text).unwrap();
        let mut seen = self.seen.borrow_mut();
        let connection = seen.connections;
        let first = !seen.frames.iter().any(|(c, _)| *c == connection);
        assert!(
            !first || matches!(frame, DeviceFrame::Hello { .. }),
            "hello first"
        );
        if let DeviceFrame::Telemetry { seq, .. } = frame {
            assert!(
                !seen.acked.contains(&seq),
                "batch {seq} was acked, and sent again"
            );
            let batches = seen
                .frames
                .iter()
                .filter(|(c, f)| *c == connection && matches!(f, DeviceFrame::Telemetry { .. }))
                .count();
            if !self.dropped_once && batches == 2 {
                self.dropped_once = true;
                self.inbox.push_back(Received::Closed(None));
            } else if !self.dropped_once || !self.inbox.contains(&Received::Closed(None)) {
                seen.acked.insert(seq);
                let ack = DeviceServerFrame::Ack {
                    seq,
                    duplicate: false,
                };
                self.inbox
                    .push_back(Received::Message(Message::Text(ack.to_json())));
            }
        }
        seen.frames.push((connection, frame));
        Ok(())
    }

    fn recv(&mut self, timeout_ms: u64) -> Result<Received, std::io::Error> {
        if let Some(received) = self.inbox.pop_front() {
            if received == Received::Closed(None) {
                self.connected = false;
                self.inbox.clear();
            }
            return Ok(received);
        }
        self.clock.0.set(self.clock.0.get() + timeout_ms);
        Ok(Received::Timeout)
    }

    fn close(&mut self, _code: u16) {
        self.connected = false;
        self.inbox.clear();
    }
}

#[test]
fn the_blocking_driver_loses_nothing_over_a_dropped_connection() {
    let clock = ManualClock::default();
    let seen = Rc::new(RefCell::new(Seen::default()));
    let transport = FakeTransport {
        clock: clock.clone(),
        seen: seen.clone(),
        inbox: VecDeque::new(),
        connected: false,
        dropped_once: false,
    };
    let mut driver = Blocking::new(transport, clock.clone(), Encoding::Json);
    let mut s = session(two_point_batches(), MemoryStorage::new(), 9);
    let mut handlers = Handlers::new();
    for i in 0..20 {
        s.record(clock.now_ms(), "n", Value::Number(f64::from(i)))
            .unwrap();
        assert_eq!(
            driver
                .run_until(&mut s, &mut handlers, clock.now_ms() + 100)
                .unwrap(),
            None
        );
    }
    driver
        .run_until(&mut s, &mut handlers, clock.now_ms() + 5_000)
        .unwrap();
    assert!(s.buffered().is_empty(), "{:?}", s.buffered());
    let seen = seen.borrow();
    assert_eq!(seen.connections, 2);
    let mut values: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (_, frame) in &seen.frames {
        if let DeviceFrame::Telemetry { seq, points } = frame {
            let numbers = points.iter().map(|p| match p.value {
                Value::Number(n) => n,
                _ => panic!(),
            });
            values.insert(*seq, numbers.collect());
        }
    }
    let values: Vec<f64> = values.into_values().flatten().collect();
    assert_eq!(
        values,
        (0..20).map(f64::from).collect::<Vec<_>>(),
        "each point once, in order"
    );
    assert_eq!(seen.acked.len(), 10, "every batch acked once");
    assert_eq!(s.stats().retransmits, 1);
}
