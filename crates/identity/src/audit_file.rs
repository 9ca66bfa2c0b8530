//! The audit log as JSON lines in a file, for shipping to a log system: rotated by size, and
//! rotated files kept by count and age. With `audit_minimise`, addresses are shortened before
//! an event is stored or written (`minimise_ip`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use unhidra_config::Config;

/// The live file's name; rotated ones are `audit-<UTC time>.jsonl` beside it.
const LIVE: &str = "audit.jsonl";

/// Where and how audit events are written.
#[derive(Debug)]
pub struct AuditFile {
    dir: PathBuf,
    max_bytes: u64,
    max_files: usize,
    max_age: Duration,
    file: Mutex<Option<(File, u64)>>,
}

impl AuditFile {
    /// The sink a config asks for; `None` when the file is turned off.
    pub fn from_config(config: &Config) -> Option<Self> {
        config.audit_file_enabled.then(|| Self {
            dir: config.data_dir.join("audit"),
            max_bytes: config.audit_file_max_bytes.max(1024),
            max_files: usize::try_from(config.audit_file_max_files).unwrap_or(usize::MAX),
            max_age: config.audit_file_max_age.0,
            file: Mutex::new(None),
        })
    }

    /// Appends one event as a line. A failure is logged; the event is in the database anyway.
    pub fn write(&self, event: &serde_json::Value) {
        if let Err(e) = self.try_write(event) {
            tracing::error!(error = %e, dir = %self.dir.display(), "audit file not written");
        }
    }

    fn try_write(&self, event: &serde_json::Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        let mut guard = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard
            .as_ref()
            .is_some_and(|(_, size)| *size >= self.max_bytes)
        {
            *guard = None;
            self.rotate()?;
        }
        if guard.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(LIVE))?;
            let size = file.metadata()?.len();
            *guard = Some((file, size));
        }
        if let Some((file, size)) = guard.as_mut() {
            file.write_all(&line)?;
            *size += u64::try_from(line.len()).unwrap_or(u64::MAX);
        }
        Ok(())
    }

    /// Renames the live file aside and drops rotated files past the count or the age.
    fn rotate(&self) -> std::io::Result<()> {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
        std::fs::rename(
            self.dir.join(LIVE),
            self.dir.join(format!("audit-{stamp}.jsonl")),
        )?;
        self.prune().map(|_| ())
    }

    /// Drops the rotated files past the count or the age; answers how many. Runs at each
    /// rotation and as the periodic job [`PRUNE_KIND`], so that files age out while nothing is
    /// written too. A missing folder has nothing to drop.
    pub fn prune(&self) -> std::io::Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut rotated: Vec<(PathBuf, SystemTime)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_rotated(p))
            .filter_map(|p| {
                let modified = p.metadata().and_then(|m| m.modified()).ok()?;
                Some((p, modified))
            })
            .collect();
        // Newest first: names sort by time.
        rotated.sort_by(|a, b| b.0.cmp(&a.0));
        let now = SystemTime::now();
        let mut dropped = 0;
        for (index, (path, modified)) in rotated.iter().enumerate() {
            let too_old = now
                .duration_since(*modified)
                .is_ok_and(|age| age > self.max_age);
            if index >= self.max_files || too_old {
                std::fs::remove_file(path)?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

/// The periodic job that drops rotated audit files past `audit_file_max_files` or
/// `audit_file_max_age` (hourly, once across every node that shares the data folder's store).
pub const PRUNE_KIND: &str = "audit.prune";

/// Runs [`PRUNE_KIND`] jobs.
#[derive(Debug)]
pub struct Prune(pub AuditFile);

#[async_trait::async_trait]
impl unhidra_jobs::Handler for Prune {
    async fn run(&self, _: &unhidra_jobs::JobContext) -> Result<(), unhidra_jobs::JobError> {
        match self.0.prune() {
            Ok(0) => Ok(()),
            Ok(dropped) => {
                tracing::info!(dropped, "old audit files dropped");
                Ok(())
            }
            Err(e) => Err(unhidra_jobs::JobError::retry(e)),
        }
    }
}

fn is_rotated(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
}

/// An address with its host part dropped: /24 for IPv4, /48 for IPv6.
pub fn minimise_ip(text: &str) -> String {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
        Err(_) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimisation_keeps_networks_and_domains() {
        assert_eq!(minimise_ip("203.0.113.77"), "203.0.113.0/24");
        assert_eq!(minimise_ip("2001:db8:abcd:12::1"), "2001:db8:abcd::/48");
        assert_eq!(minimise_ip("junk"), "unknown");
    }

    #[test]
    fn prune_drops_files_past_their_age_without_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let sink = AuditFile {
            dir: dir.path().to_owned(),
            max_bytes: 1 << 20,
            max_files: 10,
            max_age: Duration::from_secs(3600),
            file: Mutex::new(None),
        };
        let old = dir.path().join("audit-20260101T000000.000000Z.jsonl");
        let fresh = dir.path().join("audit-20261201T000000.000000Z.jsonl");
        std::fs::write(&old, "{}\n").unwrap();
        std::fs::write(&fresh, "{}\n").unwrap();
        std::fs::write(dir.path().join(LIVE), "{}\n").unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        assert_eq!(sink.prune().unwrap(), 1);
        assert!(!old.exists() && fresh.exists() && dir.path().join(LIVE).exists());
        assert_eq!(sink.prune().unwrap(), 0);
        let gone = AuditFile {
            dir: dir.path().join("never-written"),
            ..sink
        };
        assert_eq!(gone.prune().unwrap(), 0, "no folder, nothing to drop");
    }

    #[test]
    fn files_rotate_by_size_and_are_pruned_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let sink = AuditFile {
            dir: dir.path().to_owned(),
            max_bytes: 200,
            max_files: 2,
            max_age: Duration::from_secs(3600),
            file: Mutex::new(None),
        };
        for i in 0..40 {
            sink.write(&serde_json::json!({ "kind": "test", "n": i, "pad": "x".repeat(40) }));
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.contains(&LIVE.to_owned()), "{names:?}");
        assert_eq!(
            names.iter().filter(|n| n.starts_with("audit-")).count(),
            2,
            "{names:?}"
        );
        let live = std::fs::read_to_string(dir.path().join(LIVE)).unwrap();
        for line in live.lines() {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(event["kind"], "test");
        }
        assert!(u64::try_from(live.len()).unwrap() < 200 + 100);
    }
}
