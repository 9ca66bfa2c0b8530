//! The Markdown report: the figures against their targets, the command that produced them and
//! the machine they were measured on.

use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use crate::load::{Outcome, Plan};
use crate::server::{Memory, Stopped};
use crate::wrk::WrkRun;

/// Start to ready must be under this (judged on the median run).
pub const READY_TARGET: Duration = Duration::from_millis(200);
/// Idle resident memory must be under this many MiB (judged on the largest run).
pub const RSS_TARGET_MIB: f64 = 30.0;
/// `/health/live` must answer at least this many requests per second.
pub const THROUGHPUT_TARGET: f64 = 40_000.0;

/// Facts about the machine the figures come from.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical CPUs this process may use (what `nproc` prints).
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub model: String,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// `MemTotal` from `/proc/meminfo`, in MiB.
    pub memory_mib: Option<f64>,
}

impl Machine {
    /// Reads the facts; what cannot be read is reported as unknown.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map(|kib| kib / 1024.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            model,
            kernel,
            memory_mib,
        }
    }
}

/// CPU used during the measured window of the load test, in cores (1.0 = one CPU all along).
#[derive(Debug, Clone, Copy)]
pub struct CpuShare {
    /// By the server.
    pub server_cores: f64,
    /// By this program (the load generator, mostly).
    pub client_cores: f64,
    /// By everything on the machine, from `/proc/stat` (steal excluded).
    pub machine_cores: Option<f64>,
    /// Taken by the hypervisor for other guests (`steal` in `/proc/stat`).
    pub steal_cores: Option<f64>,
}

/// What became of the wrk comparison.
#[derive(Debug, Clone)]
pub enum WrkStatus {
    /// wrk ran.
    Ran(WrkRun),
    /// wrk is installed but failed.
    Failed(String),
    /// wrk is not on `PATH`.
    Missing,
}

/// Everything measured in one invocation.
#[derive(Debug, Clone)]
pub struct Report {
    /// The command line that produced it.
    pub command: String,
    /// The server binary.
    pub server: PathBuf,
    /// The machine.
    pub machine: Machine,
    /// Start to ready, one per run.
    pub ready: Vec<Duration>,
    /// Memory about 1 s after ready, one per run.
    pub idle: Vec<Memory>,
    /// How each run's server stopped.
    pub stops: Vec<Stopped>,
    /// The load test's settings.
    pub plan: Plan,
    /// Worker threads of the load generator's runtime.
    pub client_threads: usize,
    /// Memory of the loaded server before the load.
    pub load_idle: Memory,
    /// Memory of the loaded server after the load (and after wrk, if it ran).
    pub load_after: Memory,
    /// The in-process generator's results.
    pub load: Outcome,
    /// CPU used while it measured.
    pub cpu: Option<CpuShare>,
    /// The wrk comparison.
    pub wrk: WrkStatus,
}

/// KiB → MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "yes", or a bold "no".
pub fn yes_no(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

/// 12345.6 → "12,346".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Milliseconds with two decimals, or "–".
pub fn opt_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"))
}

/// The median of values already sorted.
pub fn median<T: Copy>(sorted: &[T]) -> Option<T> {
    sorted.get(sorted.len() / 2).copied()
}

impl Report {
    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let runs = self.ready.len();
        let mut ready = self.ready.clone();
        ready.sort_unstable();
        let mut rss: Vec<u64> = self.idle.iter().map(|m| m.rss_kib).collect();
        rss.sort_unstable();
        let (ready_min, ready_med, ready_max) = (
            ready.first().copied().unwrap_or_default(),
            median(&ready).unwrap_or_default(),
            ready.last().copied().unwrap_or_default(),
        );
        let (rss_min, rss_med, rss_max) = (
            rss.first().copied().unwrap_or_default(),
            median(&rss).unwrap_or_default(),
            rss.last().copied().unwrap_or_default(),
        );
        let load = &self.load;
        let rps = load.requests_per_sec();
        let errors = load.errors.total();

        writeln!(out, "# Unhidra benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(out, "Server binary: `{}`", self.server.display())?;
        writeln!(out)?;
        writeln!(out, "| Metric | Measured | Target | Met |")?;
        writeln!(out, "|---|---|---|---|")?;
        writeln!(
            out,
            "| Start to ready (spawn → first 200 of `/health/ready`), median of {runs} | {:.1} ms (min {:.1}, max {:.1}) | < {} ms | {} |",
            ms(ready_med),
            ms(ready_min),
            ms(ready_max),
            READY_TARGET.as_millis(),
            yes_no(ready_med < READY_TARGET),
        )?;
        writeln!(
            out,
            "| Idle RSS (~1 s after ready), largest of {runs} | {:.1} MiB (min {:.1}, median {:.1}) | < {RSS_TARGET_MIB:.0} MiB | {} |",
            mib(rss_max),
            mib(rss_min),
            mib(rss_med),
            yes_no(mib(rss_max) < RSS_TARGET_MIB),
        )?;
        writeln!(
            out,
            "| `GET /health/live` throughput, {} keep-alive connections, {} s (in-process generator) | {} req/s | ≥ {} req/s | {} |",
            self.plan.connections,
            self.plan.duration.as_secs(),
            thousands(rps),
            thousands(THROUGHPUT_TARGET),
            yes_no(rps >= THROUGHPUT_TARGET && errors == 0),
        )?;
        writeln!(
            out,
            "| Latency p50 / p99 / p99.9 (in-process generator) | {} / {} / {} ms | – | – |",
            opt_ms(load.percentile_ms(50.0)),
            opt_ms(load.percentile_ms(99.0)),
            opt_ms(load.percentile_ms(99.9)),
        )?;
        writeln!(
            out,
            "| Failed requests (non-200, I/O errors, timeouts) | {errors} of {} | 0 | {} |",
            load.latencies_us.len() as u64 + errors,
            yes_no(errors == 0),
        )?;
        if let WrkStatus::Ran(wrk) = &self.wrk {
            let wrk_rps = wrk.requests_per_sec.unwrap_or(0.0);
            writeln!(
                out,
                "| `GET /health/live` throughput (`{}`) | {} req/s (p50 {}, p99 {}) | ≥ {} req/s | {} |",
                wrk.command,
                thousands(wrk_rps),
                wrk.p50.as_deref().unwrap_or("–"),
                wrk.p99.as_deref().unwrap_or("–"),
                thousands(THROUGHPUT_TARGET),
                yes_no(wrk_rps >= THROUGHPUT_TARGET && wrk.errors.is_empty()),
            )?;
        }
        writeln!(out)?;

        writeln!(out, "## Details")?;
        writeln!(out)?;
        let each: Vec<String> = self
            .ready
            .iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect();
        writeln!(out, "- Start to ready, run by run: {} ms", each.join(", "))?;
        let each: Vec<String> = self
            .idle
            .iter()
            .map(|m| format!("{:.1}", mib(m.rss_kib)))
            .collect();
        writeln!(out, "- Idle RSS, run by run: {} MiB", each.join(", "))?;
        let clean = self
            .stops
            .iter()
            .filter(|s| s.status.is_some_and(|st| st.success()))
            .count();
        let mut stop_ms: Vec<f64> = self.stops.iter().map(|s| ms(s.after)).collect();
        stop_ms.sort_unstable_by(f64::total_cmp);
        writeln!(
            out,
            "- SIGTERM to exit: median {:.1} ms; {clean} of {} runs exited with status 0",
            median(&stop_ms).unwrap_or(0.0),
            self.stops.len(),
        )?;
        writeln!(
            out,
            "- Loaded server: RSS {:.1} MiB idle before the load, {:.1} MiB after it, peak (VmHWM) {:.1} MiB",
            mib(self.load_idle.rss_kib),
            mib(self.load_after.rss_kib),
            mib(self.load_after.hwm_kib),
        )?;
        writeln!(
            out,
            "- In-process generator: {} connections on a {}-thread tokio runtime in the same process as the report, {} s warm-up ({} answers, not counted), then {} s measured; {} answers of 200, mean latency {} ms, max {} ms",
            self.plan.connections,
            self.client_threads,
            self.plan.warmup.as_secs(),
            load.warmup_requests,
            self.plan.duration.as_secs(),
            load.latencies_us.len(),
            opt_ms(load.mean_ms()),
            opt_ms(load.percentile_ms(100.0)),
        )?;
        if let Some(cpu) = self.cpu {
            writeln!(
                out,
                "- CPU over the measured window: server {:.2} cores, load generator {:.2} cores (of {}); {} req/s per server core",
                cpu.server_cores,
                cpu.client_cores,
                self.machine.cpus,
                thousands(rps / cpu.server_cores.max(1e-9)),
            )?;
            if let Some(machine) = cpu.machine_cores {
                let others = (machine - cpu.server_cores - cpu.client_cores).max(0.0);
                let steal = cpu.steal_cores.unwrap_or(0.0);
                writeln!(
                    out,
                    "- CPU used meanwhile by other processes: {others:.2} cores; taken by the hypervisor (steal): {steal:.2} cores{}",
                    if others + steal > 0.2 {
                        "; **the machine was not quiet, so the throughput figures understate the server**"
                    } else {
                        ""
                    },
                )?;
            }
        }
        let e = &load.errors;
        writeln!(
            out,
            "- Errors: {} non-200, {} I/O, {} timeouts; {} connections closed by the server{}",
            e.status,
            e.io,
            e.timeouts,
            e.closed_by_server,
            e.first
                .as_ref()
                .map_or_else(String::new, |first| format!("; first: {first}")),
        )?;
        writeln!(
            out,
            "- Server and load generator share the machine's {} CPUs, so each figure is what both together manage.",
            self.machine.cpus
        )?;
        writeln!(out)?;

        writeln!(out, "## wrk")?;
        writeln!(out)?;
        match &self.wrk {
            WrkStatus::Ran(wrk) => {
                writeln!(out, "`{}` against the same server:", wrk.command)?;
                writeln!(out)?;
                writeln!(out, "```text")?;
                for line in &wrk.lines {
                    writeln!(out, "{line}")?;
                }
                writeln!(out, "```")?;
            }
            WrkStatus::Failed(why) => writeln!(out, "wrk is installed but failed: {why}")?,
            WrkStatus::Missing => writeln!(
                out,
                "wrk is not installed, so there is no second opinion; install it with `apt-get install wrk` and run again."
            )?,
        }
        writeln!(out)?;

        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }
}

/// The `## Machine` section.
pub fn write_machine(out: &mut String, m: &Machine) -> fmt::Result {
    writeln!(out, "## Machine")?;
    writeln!(out)?;
    writeln!(out, "- CPUs (nproc): {}", m.cpus)?;
    writeln!(out, "- Model: {}", m.model)?;
    writeln!(out, "- Kernel: {}", m.kernel)?;
    if let Some(mem) = m.memory_mib {
        writeln!(out, "- Memory: {:.1} GiB", mem / 1024.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(40_000.0), "40,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
