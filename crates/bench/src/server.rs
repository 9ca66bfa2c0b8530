//! The server under test: started as a child process on a free port of 127.0.0.1 with a fresh
//! data folder, watched until `/health/ready` answers 200, measured through `/proc`, and stopped
//! with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::BoxError;
use crate::http::{Connection, get_request};

/// How often readiness is polled.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// How long the server gets to become ready.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long one readiness probe may take before it counts as "not yet".
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the server gets to exit after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Numbers the data folders of this process.
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A running server, killed if dropped without [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    data_dir: PathBuf,
    /// From spawn to the first 200 of `/health/ready`.
    ready_after: Duration,
    /// The binary it runs, for [`Server::admin`].
    binary: PathBuf,
    /// The environment it was started with, on top of the defaults.
    env: Vec<(String, String)>,
}

/// What `/proc/<pid>/status` says about the server's memory.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size so far, in KiB.
    pub hwm_kib: u64,
}

/// How the server went away.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// From SIGTERM to exit.
    pub after: Duration,
    /// The exit status, or `None` if it had to be killed.
    pub status: Option<ExitStatus>,
}

impl Server {
    /// Starts `binary serve` and waits until it is ready (or fails, or 10 s pass).
    pub async fn start(binary: &Path) -> Result<Self, BoxError> {
        Self::start_with_env(binary, &[]).await
    }

    /// Like [`Server::start`], with these environment variables set on top of `APP_ENV=test`
    /// and `UNHIDRA_LOG=warn` (the caller's own `UNHIDRA_*` variables are still removed).
    pub async fn start_with_env(binary: &Path, env: &[(&str, String)]) -> Result<Self, BoxError> {
        let data_dir = fresh_data_dir()?;
        let addr = match free_port() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(err) => {
                remove_dir(&data_dir);
                return Err(err);
            }
        };
        let mut command = unhidra_command(binary, &data_dir, env);
        command
            .arg("serve")
            .arg("--bind")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);

        let spawned_at = Instant::now();
        let child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                remove_dir(&data_dir);
                return Err(format!("cannot start {}: {err}", binary.display()).into());
            }
        };
        let Some(pid) = child.id() else {
            remove_dir(&data_dir);
            return Err("the server exited as soon as it was started".into());
        };
        let mut server = Self {
            child,
            pid,
            addr,
            data_dir,
            ready_after: Duration::ZERO,
            binary: binary.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        match server.wait_ready(spawned_at).await {
            Ok(after) => {
                server.ready_after = after;
                Ok(server)
            }
            Err(err) => {
                server.stop().await;
                Err(err)
            }
        }
    }

    async fn wait_ready(&mut self, spawned_at: Instant) -> Result<Duration, BoxError> {
        let request = get_request(self.addr, "/health/ready");
        let mut last_status = None;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "the server exited before it was ready ({status}); run it by hand to see its log"
                )
                .into());
            }
            let elapsed = spawned_at.elapsed();
            if elapsed >= READY_WITHIN {
                let seen = last_status.map_or_else(
                    || "it never answered".to_owned(),
                    |s: u16| format!("its last answer was {s}"),
                );
                return Err(
                    format!("the server was not ready within {READY_WITHIN:?}; {seen}").into(),
                );
            }
            let probe = async {
                let mut connection = Connection::open(self.addr).await?;
                connection.send(&request).await
            };
            let budget = PROBE_TIMEOUT.min(READY_WITHIN.saturating_sub(elapsed));
            if let Ok(Ok(answer)) = tokio::time::timeout(budget, probe).await {
                if answer.status == 200 {
                    return Ok(spawned_at.elapsed());
                }
                last_status = Some(answer.status);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// From spawn to the first 200 of `/health/ready`.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Current and peak resident memory, from `/proc/<pid>/status`.
    pub fn memory(&self) -> Result<Memory, BoxError> {
        memory_of(self.pid)
    }

    /// Runs `unhidra admin ARGS… --data-dir DIR` over the server's data folder with the
    /// server's environment (the SQLite database takes a second process), waiting at most
    /// 60 s; fails with its standard error unless it exits 0.
    pub async fn admin(&self, args: &[&str]) -> Result<(), BoxError> {
        let env: Vec<(&str, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut command = unhidra_command(&self.binary, &self.data_dir, &env);
        command
            .arg("admin")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .map_err(|_| format!("unhidra admin {}: no exit within 60 s", args.join(" ")))??;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "unhidra admin {} exited with {}: {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into())
        }
    }

    /// Sends SIGTERM (with the `kill` command), waits for the exit (killing the server after
    /// 10 s), and removes its data folder.
    pub async fn stop(mut self) -> Stopped {
        terminate(&mut self.child, self.pid).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        remove_dir(&self.data_dir);
    }
}

/// `binary` run in `data_dir` (so no stray `./unhidra.toml` is read) with none of the caller's
/// `UNHIDRA_*` settings or `RUST_LOG`: only `APP_ENV=test`, `UNHIDRA_LOG=warn` and `env`.
fn unhidra_command(binary: &Path, data_dir: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(binary);
    command
        .current_dir(data_dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("UNHIDRA_") {
            command.env_remove(key);
        }
    }
    command.env("APP_ENV", "test").env("UNHIDRA_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Current and peak resident memory of process `pid`, from `/proc/<pid>/status`.
pub fn memory_of(pid: u32) -> Result<Memory, BoxError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| -> Result<u64, BoxError> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in {path}").into())
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// The current and peak resident memory of several processes added up (a server of a master
/// and its workers). The peak is the sum of each one's peak: at or above the true peak.
pub fn memory_of_all(pids: &[u32]) -> Result<Memory, BoxError> {
    let mut total = Memory {
        rss_kib: 0,
        hwm_kib: 0,
    };
    for &pid in pids {
        let one = memory_of(pid)?;
        total.rss_kib += one.rss_kib;
        total.hwm_kib += one.hwm_kib;
    }
    Ok(total)
}

/// The processes whose parent is `pid`, from the `ppid` field of every `/proc/<n>/stat`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| ppid_of(&stat))
                == Some(pid)
        })
        .collect();
    children.sort_unstable();
    children
}

/// The `ppid` field of a `stat` line: the 2nd after the `(comm)` that may hold spaces.
fn ppid_of(stat: &str) -> Option<u32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Sends SIGTERM (with the `kill` command) to `child`, whose id is `pid`, and waits for it to
/// exit, killing it after 10 s.
pub async fn terminate(child: &mut Child, pid: u32) -> Stopped {
    let asked_at = Instant::now();
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    let status = if sent {
        tokio::time::timeout(STOP_WITHIN, child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        None
    };
    let after = asked_at.elapsed();
    if status.is_none() {
        let _ = child.start_kill();
        let _ = tokio::time::timeout(STOP_WITHIN, child.wait()).await;
    }
    Stopped { after, status }
}

/// CPU time used so far by every live thread of process `pid`: the sum of the first field of
/// `/proc/<pid>/task/*/schedstat` (nanoseconds on a CPU). `None` if it cannot be read.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total: u64 = 0;
    for task in tasks.flatten() {
        // A thread may end between the listing and the read; it just stops counting.
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
            total = total.saturating_add(nanos);
        }
    }
    Some(Duration::from_nanos(total))
}

/// Minor page faults so far of process `pid` (all its threads, live or gone), from
/// `/proc/<pid>/stat`: each is a page the kernel had to map (and zero) on first touch.
pub fn minor_faults(pid: u32) -> Option<u64> {
    minflt_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Minor page faults so far of the calling thread, from `/proc/thread-self/stat`.
pub fn thread_minor_faults() -> Option<u64> {
    minflt_of(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)
}

/// The `minflt` field of a `stat` line: the 10th, the 8th after the `(comm)` that may hold
/// spaces.
fn minflt_of(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(7)?.parse().ok()
}

/// The number of threads of process `pid`, from `/proc/<pid>/status`.
pub fn threads(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// The machine's count of delayed ACKs so far (`TcpExt: DelayedACKs` in `/proc/net/netstat`):
/// ACKs the kernel held back, hoping to send them with data, until its delayed-ACK timer
/// fired. `None` if it cannot be read.
pub fn delayed_acks() -> Option<u64> {
    netstat_field(
        &std::fs::read_to_string("/proc/net/netstat").ok()?,
        "TcpExt:",
        "DelayedACKs",
    )
}

/// A field of `/proc/net/netstat`, which pairs a line of names with a line of values.
fn netstat_field(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some((_, value)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return value.parse().ok();
        }
    }
    None
}

/// The whole machine's CPU counters from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy)]
pub struct MachineTicks {
    /// Everything but idle, iowait and steal.
    pub busy: u64,
    /// Time the hypervisor gave our virtual CPUs to someone else.
    pub steal: u64,
    /// All of it.
    pub total: u64,
}

/// Reads [`MachineTicks`]; `None` if `/proc/stat` cannot be read.
pub fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    let steal = ticks.get(7).copied().unwrap_or(0);
    Some(MachineTicks {
        busy: total.saturating_sub(idle + steal),
        steal,
        total,
    })
}

impl MachineTicks {
    /// The whole machine's busy and stolen CPU between `self` and `later`, in cores; `None`
    /// if no tick passed.
    pub fn cores_until(self, later: Self) -> Option<(f64, f64)> {
        if later.total <= self.total {
            return None;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let share =
            |a: u64, b: u64| b.saturating_sub(a) as f64 / (later.total - self.total) as f64 * cpus;
        Some((share(self.busy, later.busy), share(self.steal, later.steal)))
    }
}

/// A port of 127.0.0.1 that was free a moment ago: bound, read back and released.
fn free_port() -> Result<u16, BoxError> {
    let [port] = free_ports::<1>()?;
    Ok(port)
}

/// `N` distinct ports of 127.0.0.1 that were free a moment ago: all bound at once, read back
/// and released.
pub fn free_ports<const N: usize>() -> Result<[u16; N], BoxError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        *port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// A new, empty folder under the system's temporary folder.
pub fn fresh_data_dir() -> Result<PathBuf, BoxError> {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("unhidra-bench-{}-{n}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_counters_are_read() {
        let stat = "123 (tokio rt) worker) S 1 123 123 0 -1 4194560 4242 0 0 0 7 3 0 0 20 0 5 0";
        assert_eq!(minflt_of(stat), Some(4242));
        assert_eq!(ppid_of(stat), Some(1));
        assert_eq!(ppid_of("garbage"), None);
        assert_eq!(minflt_of("garbage"), None);
        let me = std::process::id();
        assert!(minor_faults(me).is_some());
        assert!(thread_minor_faults().is_some());
        assert!(threads(me).is_some_and(|n| n >= 1));
        assert!(!children_of(me).contains(&me));
        let netstat =
            "TcpExt: SyncookiesSent DelayedACKs\nTcpExt: 0 42\nIpExt: InNoRoutes\nIpExt: 1\n";
        assert_eq!(netstat_field(netstat, "TcpExt:", "DelayedACKs"), Some(42));
        assert_eq!(netstat_field(netstat, "IpExt:", "DelayedACKs"), None);
        assert!(memory_of_all(&[me, me]).is_ok_and(|m| m.rss_kib > 0));
    }
}
