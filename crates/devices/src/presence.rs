//! Presence in memory: when each device was last heard from, how many connections it has
//! here, and a deadline per device, ordered by time, for silence detection.
//!
//! Traffic only moves a device's `last_seen` (O(1), no database write): the deadline it had
//! stays where it was, and when it comes the device's real deadline (`last_seen` + timeout) is
//! looked at again, so a device that keeps talking is rescheduled once per timeout, not once per
//! frame. Last-seen times go to the store in batches (`take_dirty`); a change of status is
//! written at once by the caller.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use unhidra_store::devices::{DeviceStatus, Seen};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Live {
    last_seen: Option<DateTime<Utc>>,
    /// The last heartbeat's figures not yet written.
    heartbeat: Option<String>,
    status: DeviceStatus,
    connections: u32,
    timeout: Duration,
    /// When the device's deadline sits in `deadlines`.
    deadline: Option<DateTime<Utc>>,
}

/// What a device's traffic changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touch {
    /// Nothing beyond `last_seen`.
    Seen,
    /// The device was silent and is back: its status must become this one.
    Returned(DeviceStatus),
    /// This node does not know the device yet: load it, then touch again.
    Unknown,
}

/// A device whose deadline has come and who has not been heard from since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Overdue {
    pub(crate) device: Uuid,
    pub(crate) last_seen: DateTime<Utc>,
    pub(crate) timeout: Duration,
}

/// Every device this node knows the presence of.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    devices: HashMap<Uuid, Live>,
    deadlines: BTreeSet<(DateTime<Utc>, Uuid)>,
    dirty: HashSet<Uuid>,
    /// Devices with a connection here, kept as connections come and go.
    connected: usize,
}

impl Presence {
    fn schedule(&mut self, device: Uuid) {
        let Some(live) = self.devices.get_mut(&device) else {
            return;
        };
        if let Some(old) = live.deadline.take() {
            self.deadlines.remove(&(old, device));
        }
        if live.status == DeviceStatus::Silent {
            return;
        }
        if let Some(seen) = live.last_seen {
            let at = seen + live.timeout;
            live.deadline = Some(at);
            self.deadlines.insert((at, device));
        }
    }

    /// Learns (or learns again) a device's stored presence, keeping any later time this node
    /// heard it at.
    pub(crate) fn load(
        &mut self,
        device: Uuid,
        status: DeviceStatus,
        last_seen: Option<DateTime<Utc>>,
        timeout: Duration,
    ) {
        let live = self.devices.entry(device).or_insert(Live {
            last_seen: None,
            heartbeat: None,
            status,
            connections: 0,
            timeout,
            deadline: None,
        });
        live.timeout = timeout;
        if live.connections == 0 {
            live.status = status;
        }
        live.last_seen = live.last_seen.max(last_seen);
        self.schedule(device);
    }

    /// Traffic from a device (a frame, a heartbeat, an HTTP batch) at `now`.
    pub(crate) fn touch(
        &mut self,
        device: Uuid,
        now: DateTime<Utc>,
        heartbeat: Option<String>,
    ) -> Touch {
        let Some(live) = self.devices.get_mut(&device) else {
            return Touch::Unknown;
        };
        live.last_seen = live.last_seen.max(Some(now));
        if heartbeat.is_some() {
            live.heartbeat = heartbeat;
        }
        self.dirty.insert(device);
        let unscheduled = live.deadline.is_none();
        let touch = if live.status == DeviceStatus::Silent {
            let back = if live.connections > 0 {
                DeviceStatus::Online
            } else {
                DeviceStatus::Offline
            };
            live.status = back;
            Touch::Returned(back)
        } else {
            Touch::Seen
        };
        if unscheduled || touch != Touch::Seen {
            self.schedule(device);
        }
        touch
    }

    /// A connection of the device opened; answers whether it is its first here.
    pub(crate) fn connect(&mut self, device: Uuid, now: DateTime<Utc>, timeout: Duration) -> bool {
        self.load(device, DeviceStatus::Offline, Some(now), timeout);
        let live = self.devices.get_mut(&device).expect("loaded above");
        live.connections += 1;
        if live.connections == 1 {
            self.connected += 1;
        }
        live.status = DeviceStatus::Online;
        self.schedule(device);
        live_first(self.devices.get(&device))
    }

    /// A connection of the device closed; answers whether it was its last here.
    pub(crate) fn disconnect(&mut self, device: Uuid, now: DateTime<Utc>) -> bool {
        let Some(live) = self.devices.get_mut(&device) else {
            return false;
        };
        live.last_seen = live.last_seen.max(Some(now));
        self.dirty.insert(device);
        if live.connections == 0 {
            return false;
        }
        live.connections -= 1;
        if live.connections > 0 {
            return false;
        }
        self.connected -= 1;
        if live.status == DeviceStatus::Online {
            live.status = DeviceStatus::Offline;
        }
        true
    }

    /// When this node last heard the device, if it knows it.
    pub(crate) fn last_seen(&self, device: Uuid) -> Option<DateTime<Utc>> {
        self.devices.get(&device).and_then(|l| l.last_seen)
    }

    /// Whether the device has a connection here.
    pub(crate) fn is_connected(&self, device: Uuid) -> bool {
        self.devices.get(&device).is_some_and(|l| l.connections > 0)
    }

    /// Sets the status the store now holds.
    pub(crate) fn set_status(&mut self, device: Uuid, status: DeviceStatus) {
        if let Some(live) = self.devices.get_mut(&device) {
            live.status = status;
            self.schedule(device);
        }
    }

    /// Looks at a device again at `at`, its `last_seen` left as it is (after a failed write).
    pub(crate) fn defer(&mut self, device: Uuid, at: DateTime<Utc>) {
        let Some(live) = self.devices.get_mut(&device) else {
            return;
        };
        if let Some(old) = live.deadline.take() {
            self.deadlines.remove(&(old, device));
        }
        live.deadline = Some(at);
        self.deadlines.insert((at, device));
    }

    /// Forgets a deleted device.
    pub(crate) fn forget(&mut self, device: Uuid) {
        if let Some(live) = self.devices.remove(&device) {
            if let Some(at) = live.deadline {
                self.deadlines.remove(&(at, device));
            }
            if live.connections > 0 {
                self.connected -= 1;
            }
        }
        self.dirty.remove(&device);
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// The devices whose deadline has come by `now` and who were not heard from since: their
    /// deadlines are taken away (a caller that finds one alive after all loads it again).
    /// Those heard from since get their real deadline.
    pub(crate) fn overdue(&mut self, now: DateTime<Utc>) -> Vec<Overdue> {
        let mut out = Vec::new();
        while let Some(&(at, device)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(live) = self.devices.get_mut(&device) else {
                continue;
            };
            live.deadline = None;
            let Some(seen) = live.last_seen else {
                continue;
            };
            if seen + live.timeout > now {
                self.schedule(device);
            } else {
                out.push(Overdue {
                    device,
                    last_seen: seen,
                    timeout: live.timeout,
                });
            }
        }
        out
    }

    /// The last-seen times (and heartbeats) heard since the last call, for the store.
    pub(crate) fn take_dirty(&mut self) -> Vec<Seen> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|device| {
                let live = self.devices.get_mut(&device)?;
                Some(Seen {
                    device_id: device,
                    at: live.last_seen?,
                    heartbeat: live.heartbeat.take(),
                })
            })
            .collect()
    }

    /// Puts back what a failed write took, unless newer traffic replaced it.
    pub(crate) fn restore_dirty(&mut self, seen: Vec<Seen>) {
        for one in seen {
            if let Some(live) = self.devices.get_mut(&one.device_id) {
                if live.heartbeat.is_none() {
                    live.heartbeat = one.heartbeat;
                }
                self.dirty.insert(one.device_id);
            }
        }
    }

    /// How many devices have a connection here.
    pub(crate) fn connected(&self) -> usize {
        self.connected
    }
}

fn live_first(live: Option<&Live>) -> bool {
    live.is_some_and(|l| l.connections == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_device_that_keeps_talking_is_never_overdue() {
        let mut p = Presence::default();
        let d = Uuid::new_v4();
        assert!(p.connect(d, t(0), Duration::seconds(60)));
        assert_eq!(p.next_deadline(), Some(t(60)));
        for s in (10..=300).step_by(10) {
            assert_eq!(p.touch(d, t(s), None), Touch::Seen);
            assert!(p.overdue(t(s)).is_empty());
        }
        // Rescheduled once per timeout, not per frame.
        assert_eq!(p.next_deadline(), Some(t(360)));
        let gone = p.overdue(t(360));
        assert_eq!(
            gone,
            [Overdue {
                device: d,
                last_seen: t(300),
                timeout: Duration::seconds(60)
            }]
        );
        assert_eq!(p.next_deadline(), None);
        p.set_status(d, DeviceStatus::Silent);
        // Traffic brings it back, online since it is connected, with a new deadline.
        assert_eq!(
            p.touch(d, t(400), None),
            Touch::Returned(DeviceStatus::Online)
        );
        assert_eq!(p.next_deadline(), Some(t(460)));
    }

    #[test]
    fn connections_are_counted_and_heartbeats_flushed_once() {
        let mut p = Presence::default();
        let d = Uuid::new_v4();
        assert!(p.connect(d, t(0), Duration::seconds(60)));
        assert!(!p.connect(d, t(1), Duration::seconds(60)));
        assert!(!p.disconnect(d, t(2)));
        assert!(p.is_connected(d));
        p.touch(d, t(3), Some("{\"uptime\":3}".into()));
        let seen = p.take_dirty();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].at, seen[0].heartbeat.as_deref()),
            (t(3), Some("{\"uptime\":3}"))
        );
        assert!(p.take_dirty().is_empty());
        p.restore_dirty(seen);
        assert_eq!(
            p.take_dirty()[0].heartbeat.as_deref(),
            Some("{\"uptime\":3}")
        );
        assert_eq!(p.connected(), 1);
        let other = Uuid::new_v4();
        p.connect(other, t(3), Duration::seconds(60));
        assert_eq!(p.connected(), 2);
        p.forget(other);
        assert_eq!(p.connected(), 1);
        assert!(p.disconnect(d, t(4)));
        assert!(!p.is_connected(d));
        assert_eq!(p.connected(), 0);
        // A close that was never opened here changes nothing.
        assert!(!p.disconnect(d, t(4)));
        assert_eq!(p.connected(), 0);
        // A silent device heard over HTTP comes back offline.
        p.set_status(d, DeviceStatus::Silent);
        assert_eq!(
            p.touch(d, t(5), None),
            Touch::Returned(DeviceStatus::Offline)
        );
    }

    #[test]
    fn loading_keeps_the_later_time_and_many_deadlines_stay_ordered() {
        let mut p = Presence::default();
        let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
        for (i, d) in ids.iter().enumerate() {
            let i = i64::try_from(i).unwrap();
            p.load(*d, DeviceStatus::Offline, Some(t(i)), Duration::seconds(30));
        }
        assert_eq!(p.next_deadline(), Some(t(30)));
        let due = p.overdue(t(529));
        assert_eq!(due.len(), 500);
        assert!(due.windows(2).all(|w| w[0].last_seen <= w[1].last_seen));
        // A stored time older than what this node heard does not move it back.
        p.touch(ids[999], t(2000), None);
        p.load(
            ids[999],
            DeviceStatus::Offline,
            Some(t(999)),
            Duration::seconds(30),
        );
        assert!(p.overdue(t(2029)).iter().all(|o| o.device != ids[999]));
        p.forget(ids[999]);
        assert!(p.overdue(t(5000)).iter().all(|o| o.device != ids[999]));
    }
}
