//! The buffer file: restarts keep batches and seqs, a torn tail is ignored.

use std::fs::OpenOptions;
use std::io::Write;

use unhidra_device::file::{FileStorage, SyncPolicy};
use unhidra_device::machine::{BatchLimits, Storage};
use unhidra_device::{ArrayValue, Point, Value};
use unhidra_protocol::device::{DeviceFrame, DeviceServerFrame};

use crate::common::{config, connect, seqs, session};

fn small_batches() -> unhidra_device::machine::SessionConfig {
    let mut config = config();
    config.batch = BatchLimits {
        max_points: 2,
        ..BatchLimits::default()
    };
    config
}

fn point(i: u32) -> Point {
    Point {
        ts: Some(1_767_225_600_000 + i64::from(i)),
        key: "env.temp".into(),
        value: Value::Number(f64::from(i)),
    }
}

#[test]
fn seqs_and_unacked_batches_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.buf");
    let first;
    {
        let mut s = session(small_batches(), FileStorage::open(&path).unwrap(), 1);
        for i in 0..6 {
            s.record_point(0, point(i)).unwrap();
        }
        first = s.buffered()[0];
        assert_eq!(first, 1, "no wall clock: seqs start at 1");
        let frames = connect(&mut s, 0);
        assert_eq!(seqs(&frames), vec![1, 2, 3]);
        s.handle_frame(
            0,
            DeviceServerFrame::Ack {
                seq: 1,
                duplicate: false,
            },
        )
        .unwrap();
        s.handle_frame(
            0,
            DeviceServerFrame::Ack {
                seq: 3,
                duplicate: false,
            },
        )
        .unwrap();
        // The process dies here: batch 2 was sent and not acknowledged.
    }
    let mut s = session(small_batches(), FileStorage::open(&path).unwrap(), 1);
    assert_eq!(s.buffered(), vec![2]);
    assert_eq!(s.next_seq(), 4, "never 1, 2 or 3 again");
    s.record_point(0, point(6)).unwrap();
    s.record_point(0, point(7)).unwrap();
    let frames = connect(&mut s, 0);
    let Some(DeviceFrame::Telemetry { seq: 2, points }) = frames.get(2) else {
        panic!("{frames:?}")
    };
    assert_eq!(points, &vec![point(2), point(3)], "the batch as it was");
    assert_eq!(seqs(&frames), vec![2, 4]);
    for seq in [2, 4] {
        s.handle_frame(
            0,
            DeviceServerFrame::Ack {
                seq,
                duplicate: false,
            },
        )
        .unwrap();
    }
    drop(s);
    // All acknowledged: the file still remembers the next seq.
    let mut storage = FileStorage::open(&path).unwrap();
    let loaded = storage.load().unwrap();
    assert_eq!((loaded.next_seq, loaded.batches), (5, vec![]));
}

#[test]
fn a_torn_last_record_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.buf");
    let thermal = ArrayValue::from_f32(vec![24, 32], &[21.5; 768]).unwrap();
    {
        let mut storage = FileStorage::open(&path).unwrap();
        storage.push(10, &[point(0)]).unwrap();
        let frame = Point {
            ts: None,
            key: "thermal".into(),
            value: Value::Array(thermal.clone()),
        };
        storage.push(11, &[frame]).unwrap();
        storage.push(12, &[point(2)]).unwrap();
    }
    // A crash in the middle of the last append: its last 5 bytes never reached the disk.
    let len = std::fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let mut storage = FileStorage::open(&path).unwrap();
    assert!(storage.torn_bytes() > 0);
    let loaded = storage.load().unwrap();
    assert_eq!(
        loaded.batches.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![10, 11]
    );
    assert_eq!(
        loaded.next_seq, 12,
        "the torn batch's seq was never confirmed: reusing it is safe"
    );
    let Some(points) = storage.read(11).unwrap() else {
        panic!()
    };
    assert_eq!(
        points[0].value,
        Value::Array(thermal),
        "arrays keep their packed data"
    );
    // The tail is gone and appends land after the good records.
    storage.push(12, &[point(3)]).unwrap();
    drop(storage);
    let mut storage = FileStorage::open(&path).unwrap();
    assert_eq!(storage.torn_bytes(), 0);
    assert_eq!(storage.read(12).unwrap(), Some(vec![point(3)]));

    // Garbage after the records (a torn length field) is ignored the same way.
    drop(storage);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&[0xff; 11])
        .unwrap();
    let mut storage = FileStorage::open(&path).unwrap();
    assert_eq!(storage.torn_bytes(), 11);
    assert_eq!(storage.load().unwrap().batches.len(), 3);
}

#[test]
fn the_file_is_compacted_and_foreign_files_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.buf");
    let mut storage = FileStorage::open_with(&path, SyncPolicy::Never).unwrap();
    let big: Vec<Point> = (0..200).map(point).collect();
    for seq in 1..=200 {
        storage.push(seq, &big).unwrap();
        if seq > 2 {
            storage.remove(seq - 2).unwrap();
        }
    }
    // 200 records of about 5 KiB were written; compaction keeps the file near the live two.
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len < 256 << 10, "compacted: {len} bytes");
    drop(storage);
    let mut storage = FileStorage::open(&path).unwrap();
    assert_eq!(
        storage
            .load()
            .unwrap()
            .batches
            .iter()
            .map(|b| b.0)
            .collect::<Vec<_>>(),
        vec![199, 200]
    );
    assert_eq!(storage.load().unwrap().next_seq, 201);

    let other = dir.path().join("other");
    std::fs::write(&other, b"not a buffer").unwrap();
    assert!(FileStorage::open(&other).is_err());
}
