//! The Markdown report of `unhidra-bench ota`: Unhidra's firmware downloads against nginx's
//! (aggregate throughput and RSS as ratios, against the targets), then every pass.

use std::fmt::{self, Write as _};

use crate::load::percentile_ms;
use crate::ota::{
    FLAT_FLOOR_KIB, FLAT_KIB_PER_DEVICE, Mode, Outcome, Pass, ServerRun, Settings,
    THROUGHPUT_RATIO_TARGET, Target,
};
use crate::report::{Machine, mib, thousands, write_machine, yes_no};

/// Everything measured in one invocation of `unhidra-bench ota`.
#[derive(Debug, Clone)]
pub struct OtaReport {
    /// The command line that produced it.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// What was asked for.
    pub settings: Settings,
    /// What was measured.
    pub outcome: Outcome,
}

/// The figures of one target and mode over every round.
#[derive(Debug, Clone)]
struct Summary {
    /// MiB/s of each round, sorted.
    mib_per_sec: Vec<f64>,
    /// Requests/s of each round, sorted.
    requests_per_sec: Vec<f64>,
    /// Every round's latencies, sorted.
    latencies_us: Vec<u32>,
    /// Every pass finished with every copy right.
    clean: bool,
}

impl Summary {
    fn median_mib(&self) -> Option<f64> {
        median(&self.mib_per_sec)
    }
}

fn median(sorted: &[f64]) -> Option<f64> {
    sorted.get(sorted.len() / 2).copied()
}

fn show(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl OtaReport {
    fn summary(&self, target: Target, mode: Mode) -> Option<Summary> {
        let passes: Vec<&Pass> = self
            .outcome
            .passes
            .iter()
            .filter(|p| p.target == target && p.mode == mode)
            .collect();
        if passes.is_empty() {
            return None;
        }
        let mut mib_per_sec: Vec<f64> = passes.iter().map(|p| p.mib_per_sec()).collect();
        mib_per_sec.sort_unstable_by(f64::total_cmp);
        let mut requests_per_sec: Vec<f64> = passes.iter().map(|p| p.requests_per_sec()).collect();
        requests_per_sec.sort_unstable_by(f64::total_cmp);
        let mut latencies_us: Vec<u32> = passes
            .iter()
            .flat_map(|p| p.latencies_us.iter().copied())
            .collect();
        latencies_us.sort_unstable();
        Some(Summary {
            mib_per_sec,
            requests_per_sec,
            latencies_us,
            clean: passes.iter().all(|p| p.clean(self.settings.devices)),
        })
    }

    fn server(&self, name: &str) -> Option<&ServerRun> {
        self.outcome.servers.iter().find(|s| s.name == name)
    }

    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let s = &self.settings;
        writeln!(out, "# Unhidra firmware download benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(
            out,
            "{} devices, each on one keep-alive HTTP/1.1 connection, download a {}-byte ESP32 \
             image (SHA-256 `{}`) at once: in {}-byte ranges ({} requests each, as ESP-IDF's \
             `partial_http_download`), then whole (one GET). {} rounds, each of one pass in \
             ranges and {} whole passes per target; the targets' order is reversed every other \
             round. Every copy's SHA-256 is checked after each pass.",
            s.devices,
            thousands(s.image_bytes as f64),
            self.outcome.sha256,
            s.range,
            s.ranges_per_image(),
            s.rounds,
            s.whole_passes
        )?;
        writeln!(out)?;
        if s.client_quickack {
            writeln!(
                out,
                "**Diagnostic run (`--client-quickack`): the devices' sockets acknowledge every \
                 segment at once (TCP_QUICKACK), which devices do not; these figures show the \
                 servers without the wait for a delayed ACK.**"
            )?;
            writeln!(out)?;
        }
        self.write_targets(&mut out)?;
        self.write_memory(&mut out)?;
        self.write_passes(&mut out)?;
        self.write_how(&mut out)?;
        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }

    fn write_targets(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## Against nginx")?;
        writeln!(out)?;
        writeln!(
            out,
            "| Measure (median of the passes) | Unhidra | nginx | Unhidra ÷ nginx | Target | Met |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|")?;
        for mode in [Mode::Ranges, Mode::Whole] {
            let nginx = self.summary(Target::Nginx, mode);
            for target in [Target::Unhidra, Target::UnhidraKey] {
                let Some(u) = self.summary(target, mode) else {
                    continue;
                };
                let n = nginx.as_ref().and_then(Summary::median_mib);
                let r = ratio(u.median_mib(), n);
                let clean = u.clean && nginx.as_ref().is_some_and(|n| n.clean);
                writeln!(
                    out,
                    "| Throughput, {}, {} | {} MiB/s | {} MiB/s | {} | ≥ {THROUGHPUT_RATIO_TARGET:.2} | {} |",
                    mode_label(mode, self.settings.range),
                    target_label(target),
                    show(u.median_mib(), 1),
                    show(n, 1),
                    show(r, 2),
                    r.map_or("–", |r| yes_no(r >= THROUGHPUT_RATIO_TARGET && clean)),
                )?;
            }
        }
        if let Some(u) = self.server("Unhidra") {
            let growth = u.peak_kib.saturating_sub(u.before.rss_kib);
            let allowed = crate::ota::flat_allowance_kib(self.settings.devices);
            let n = self.server("nginx");
            writeln!(
                out,
                "| Server RSS, idle → peak during the downloads → idle after | {:.1} → {:.1} → {:.1} MiB | {} | {} (peaks) | peak − idle ≤ {FLAT_KIB_PER_DEVICE} KiB × {} devices (at least {} MiB) = {:.1} MiB | {} |",
                mib(u.before.rss_kib),
                mib(u.peak_kib),
                mib(u.after.rss_kib),
                n.map_or_else(
                    || "–".to_owned(),
                    |n| format!(
                        "{:.1} → {:.1} → {:.1} MiB",
                        mib(n.before.rss_kib),
                        mib(n.peak_kib),
                        mib(n.after.rss_kib)
                    )
                ),
                show(
                    ratio(Some(u.peak_kib as f64), n.map(|n| n.peak_kib as f64)),
                    2
                ),
                self.settings.devices,
                FLAT_FLOOR_KIB / 1024,
                mib(allowed),
                yes_no(growth <= allowed),
            )?;
        }
        writeln!(out)?;
        for (target, why) in &self.outcome.skipped {
            writeln!(out, "{} was not measured: {why}", target.name())?;
            writeln!(out)?;
        }
        writeln!(
            out,
            "| Target | Mode | MiB/s, each pass (sorted) | Requests/s (median) | Latency p50 / p99 / max | Every copy right |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|")?;
        for target in [Target::Unhidra, Target::UnhidraKey, Target::Nginx] {
            for mode in [Mode::Ranges, Mode::Whole] {
                let Some(sum) = self.summary(target, mode) else {
                    continue;
                };
                let each: Vec<String> = sum.mib_per_sec.iter().map(|v| format!("{v:.1}")).collect();
                writeln!(
                    out,
                    "| {} | {} | {} | {} | {} / {} / {} ms | {} |",
                    target.name(),
                    mode.name(),
                    each.join(", "),
                    median(&sum.requests_per_sec).map_or_else(|| "–".to_owned(), thousands),
                    show(percentile_ms(&sum.latencies_us, 50.0), 2),
                    show(percentile_ms(&sum.latencies_us, 99.0), 2),
                    show(percentile_ms(&sum.latencies_us, 100.0), 2),
                    yes_no(sum.clean),
                )?;
            }
        }
        writeln!(out)?;
        Ok(())
    }

    fn write_memory(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## Server memory")?;
        writeln!(out)?;
        writeln!(
            out,
            "| Server | Processes | RSS idle before | Peak RSS read during the passes | RSS idle after | VmHWM at the end | Peak − idle per device |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|")?;
        for server in &self.outcome.servers {
            let growth = server.peak_kib.saturating_sub(server.before.rss_kib);
            writeln!(
                out,
                "| {} ({}) | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
                server.name,
                server.program,
                server.processes,
                mib(server.before.rss_kib),
                mib(server.peak_kib),
                mib(server.after.rss_kib),
                mib(server.after.hwm_kib),
                growth as f64 / f64::from(self.settings.devices.max(1)),
            )?;
        }
        writeln!(out)?;
        if let Some(seconds) = self.outcome.setup_seconds {
            writeln!(
                out,
                "Unhidra's idle RSS is read after its setup ({seconds:.1} s: start, login, upload, \
                 {} devices registered and a link made for each); its VmHWM also counts that setup.",
                self.settings.devices
            )?;
            writeln!(out)?;
        }
        Ok(())
    }

    fn write_passes(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## Each pass")?;
        writeln!(out)?;
        writeln!(
            out,
            "| Round | Target | Mode | Seconds | MiB/s | Requests/s | p50 / p99 ms | Copies right | Failed | Peak RSS | Peak threads | Delayed ACKs | CPU server / bench / others / steal (cores) |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        let mut busy = false;
        for p in &self.outcome.passes {
            let others = p.cpu.others();
            busy |= others.is_some_and(|o| o > 0.2);
            writeln!(
                out,
                "| {} | {} | {} | {:.3} | {:.1} | {} | {} / {} | {} / {} | {} | {:.1} MiB | {} | {} | {:.2} / {:.2} / {} / {} |",
                p.round,
                p.target.name(),
                p.mode.name(),
                p.seconds,
                p.mib_per_sec(),
                thousands(p.requests_per_sec()),
                show(percentile_ms(&p.latencies_us, 50.0), 2),
                show(percentile_ms(&p.latencies_us, 99.0), 2),
                p.verified,
                self.settings.devices,
                p.failed,
                mib(p.peak_rss_kib),
                p.peak_threads,
                p.delayed_acks
                    .map_or_else(|| "–".to_owned(), |n| thousands(n as f64)),
                p.cpu.server,
                p.cpu.bench,
                show(others, 2),
                show(p.cpu.steal, 2),
            )?;
        }
        writeln!(out)?;
        for p in &self.outcome.passes {
            if let Some(err) = &p.first_error {
                writeln!(
                    out,
                    "- Round {}, {}, {}: first failure: {err}",
                    p.round,
                    p.target.name(),
                    p.mode.name()
                )?;
            }
            if p.reconnects > 0 {
                writeln!(
                    out,
                    "- Round {}, {}, {}: the server closed {} connections, which were opened again",
                    p.round,
                    p.target.name(),
                    p.mode.name(),
                    p.reconnects
                )?;
            }
        }
        if busy {
            writeln!(
                out,
                "**Other processes used more than 0.2 of a core during a pass: the machine was not quiet, and the figures are low by an unknown amount.**"
            )?;
            writeln!(out)?;
        }
        Ok(())
    }

    fn write_how(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## How it was measured")?;
        writeln!(out)?;
        writeln!(
            out,
            "- A pass: every device opens its connection, all wait for each other, then each \
             downloads the image, one request at a time. The clock runs from that start to the \
             last device's last byte; MiB/s is every device's body bytes ÷ that time. A request's \
             latency runs from its write to its body's last byte."
        )?;
        writeln!(
            out,
            "- The client is the bench's own minimal HTTP/1.1 client, the same for both servers: \
             it sends the headers `esp_http_client` sends (`User-Agent`, `Host`, `Range`, and \
             for device keys `Authorization`), checks the status, `Content-Length` and \
             `Content-Range`, and reads the body straight into the device's copy of the image. \
             The copies' SHA-256 is checked after the clock stops, on {} threads, and each copy \
             is overwritten before the next pass.",
            self.outcome.workers
        )?;
        writeln!(
            out,
            "- Unhidra: the release server on 127.0.0.1 with a fresh data folder (SQLite), the \
             image uploaded with a manifest signed by a key made for the run, one device \
             registered per simulated device. Signed links come from \
             `POST /api/v1/firmware/{{sha256}}/links`, one per device; device keys are each \
             device's own."
        )?;
        writeln!(
            out,
            "- nginx: its own configuration in a temporary folder, `worker_processes {}` (the \
             CPUs, as many as Unhidra's runtime workers), `sendfile on`, `tcp_nopush on`, \
             `access_log off`, `keepalive_requests 10000000`, serving the same bytes from a \
             file; run as `nobody` when the bench is root. Its RSS is its master's and workers' \
             added up.",
            self.outcome.workers
        )?;
        writeln!(
            out,
            "- RSS is `VmRSS` from `/proc/<pid>/status`, read every 20 ms during each pass with \
             the threads of the server's processes. Delayed ACKs are the kernel's \
             `TcpExt: DelayedACKs` (`/proc/net/netstat`) over the pass, for the whole machine: \
             ACKs held back until the delayed-ACK timer (40 ms or more) fired. The servers, the \
             bench and its devices share the machine's {} CPUs.",
            self.machine.cpus
        )?;
        writeln!(out)?;
        Ok(())
    }
}

fn mode_label(mode: Mode, range: u64) -> String {
    match mode {
        Mode::Ranges if range.is_multiple_of(1024) => format!("{} KiB ranges", range / 1024),
        Mode::Ranges => format!("{range}-byte ranges"),
        Mode::Whole => "whole image".to_owned(),
    }
}

fn target_label(target: Target) -> &'static str {
    match target {
        Target::Unhidra => "signed links",
        Target::UnhidraKey => "device keys",
        Target::Nginx => "nginx",
    }
}
