//! The Markdown report of the fan-out scenario: deliveries per second, delivery latency per
//! publishing rate and memory per idle connection, against the targets.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use crate::fanout::{
    self, DELIVERIES_TARGET, Outcome, P99_TARGET, P99_TARGET_RATE, Phase,
    RSS_PER_CONNECTION_TARGET_KIB, Settings,
};
use crate::report::{Machine, mib, write_machine, yes_no};

/// Everything measured in one invocation of `unhidra-bench fanout`.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    /// The command line that produced it.
    pub command: String,
    /// The server binary.
    pub server: PathBuf,
    /// The machine.
    pub machine: Machine,
    /// What was asked for.
    pub settings: Settings,
    /// What was measured.
    pub outcome: Outcome,
}

fn opt_us_as_ms(value: Option<u64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{:.2}", v as f64 / 1000.0))
}

fn cores(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"))
}

fn complete(phase: &Phase) -> bool {
    phase.sent > 0 && phase.delivered >= phase.expected()
}

impl FanoutReport {
    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let o = &self.outcome;
        writeln!(out, "# Unhidra fan-out benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(out, "Server binary: `{}`", self.server.display())?;
        writeln!(out)?;
        writeln!(
            out,
            "One public room; {} subscriber connections of one user (asked: {}), one publisher \
             connection of another user, all over `ws://127.0.0.1/ws` with `unhidra.v1.json`. \
             The server runs with `APP_ENV=test UNHIDRA_LOG=warn {}`. Each window lasts {} s; \
             latency is from the publisher's write to a subscriber's read, both in this process.",
            o.connected,
            o.asked,
            fanout::server_env()
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(" "),
            self.settings.window.as_secs(),
        )?;
        writeln!(out)?;

        let best = o
            .phases
            .iter()
            .map(Phase::deliveries_per_sec)
            .fold(0.0_f64, f64::max);
        let p99_phase = o.phases.iter().find(|p| p.rate == P99_TARGET_RATE);
        let per_conn = o.rss_per_connection_kib();
        writeln!(out, "| Metric | Measured | Target | Met |")?;
        writeln!(out, "|---|---|---|---|")?;
        writeln!(
            out,
            "| Deliveries per second (best window) | {best:.0} | ≥ {DELIVERIES_TARGET:.0} | {} |",
            yes_no(best >= DELIVERIES_TARGET)
        )?;
        match p99_phase {
            Some(phase) => writeln!(
                out,
                "| p99 latency at {P99_TARGET_RATE} messages/s | {} ms | < {} ms | {} |",
                opt_us_as_ms(phase.p99_us),
                P99_TARGET.as_millis(),
                yes_no(
                    complete(phase)
                        && phase
                            .p99_us
                            .is_some_and(|p| u128::from(p) < P99_TARGET.as_micros())
                )
            )?,
            None => writeln!(
                out,
                "| p99 latency at {P99_TARGET_RATE} messages/s | not measured (add {P99_TARGET_RATE} to --rates) | < {} ms | – |",
                P99_TARGET.as_millis()
            )?,
        }
        writeln!(
            out,
            "| RSS per idle connection | {} KiB | ≤ {RSS_PER_CONNECTION_TARGET_KIB:.0} KiB | {} |",
            per_conn.map_or_else(|| "–".to_owned(), |k| format!("{k:.1}")),
            yes_no(per_conn.is_some_and(|k| k <= RSS_PER_CONNECTION_TARGET_KIB))
        )?;
        writeln!(out)?;

        writeln!(out, "## Per rate")?;
        writeln!(out)?;
        writeln!(
            out,
            "| Rate (msg/s) | Sent (acked) | Send window | Subscribers | Delivered / expected | All arrived | Deliveries/s | p50 | p99 | max | Connections lost | CPU server / bench (cores) |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for p in &o.phases {
            writeln!(
                out,
                "| {} | {} ({}) | {:.2} s | {} | {} / {} | {} | {:.0} | {} ms | {} ms | {} ms | {} | {} / {} |",
                p.rate,
                p.sent,
                p.acked,
                p.send_window.as_secs_f64(),
                p.listeners,
                p.delivered,
                p.expected(),
                yes_no(complete(p)),
                p.deliveries_per_sec(),
                opt_us_as_ms(p.p50_us),
                opt_us_as_ms(p.p99_us),
                opt_us_as_ms(p.max_us),
                p.lost,
                cores(p.server_cores),
                cores(p.client_cores),
            )?;
        }
        for rate in &o.skipped {
            writeln!(
                out,
                "| {rate} | skipped: an earlier rate was not delivered in full | | | | | | | | | | |"
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "Deliveries/s: `message` frames received by all subscribers ÷ the time from the \
             window's first write to its last delivery (the drain after the window waits until \
             all arrived, a second passes without any, or 30 s). Latency percentiles come from \
             a log-linear histogram (within 1.6%). CPU is over the window and its drain; both \
             processes share the machine's CPUs."
        )?;
        writeln!(out)?;

        writeln!(out, "## Connections and memory")?;
        writeln!(out)?;
        writeln!(
            out,
            "- {} of {} subscribers connected and joined in {:.2} s{}",
            o.connected,
            o.asked,
            o.setup_time.as_secs_f64(),
            if o.setup_errors.is_empty() {
                String::new()
            } else {
                format!("; errors: {}", o.setup_errors.join("; "))
            }
        )?;
        writeln!(
            out,
            "- Server RSS before the subscribers: {:.1} MiB; with them idle: {:.1} MiB; after the last window: {:.1} MiB (peak {:.1} MiB)",
            mib(o.before.rss_kib),
            mib(o.connected_memory.rss_kib),
            mib(o.after.rss_kib),
            mib(o.after.hwm_kib),
        )?;
        if !o.close_codes.is_empty() {
            let codes: Vec<String> = o
                .close_codes
                .iter()
                .map(|(code, n)| {
                    if *code == 0 {
                        format!("{n} without a close frame")
                    } else {
                        format!("{n} × {code}")
                    }
                })
                .collect();
            writeln!(
                out,
                "- Subscriber connections closed by the server: {}",
                codes.join(", ")
            )?;
        }
        if let Some(error) = &o.publisher_error {
            writeln!(out, "- First error frame the publisher got: `{error}`")?;
        }
        writeln!(
            out,
            "- Open-file limit of this process (and the server): {}",
            o.open_files
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        )?;
        writeln!(out)?;
        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }
}
