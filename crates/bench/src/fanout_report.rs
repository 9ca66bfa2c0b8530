//! The Markdown report of the fan-out scenario: Unhidra against nats-server and Socket.IO
//! (deliveries per second, p99 latency and memory per idle connection as ratios, against the
//! issue's targets), then each server's own figures per publishing rate.

use std::fmt::{self, Write as _};

use crate::fanout::{
    self, DELIVERIES_TARGET, NATS_RATIO_TARGET, Outcome, P99_TARGET, P99_TARGET_RATE, Phase,
    RSS_PER_CONNECTION_TARGET_KIB, SOCKETIO_RATIO_TARGET, Settings,
};
use crate::fanout_target::Target;
use crate::report::{Machine, mib, thousands, write_machine, yes_no};

/// Everything measured in one invocation of `unhidra-bench fanout`.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    /// The command line that produced it.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// What was asked for.
    pub settings: Settings,
    /// The soft limit on open files of this process (the servers inherit it).
    pub open_files: Option<u64>,
    /// One per target, in the order they ran.
    pub runs: Vec<TargetRun>,
}

/// One target's measurement, or why there is none.
#[derive(Debug, Clone)]
pub struct TargetRun {
    /// The server.
    pub target: Target,
    /// What it measured, or why it was skipped.
    pub result: Result<Outcome, String>,
}

fn opt_us_as_ms(value: Option<u64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{:.2}", v as f64 / 1000.0))
}

fn cores(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"))
}

/// `a ÷ b` with two decimals, or "–".
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn show_ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"))
}

/// Deliveries per second of a window, marked when not every delivery arrived.
fn show_rate(phase: Option<&Phase>) -> String {
    phase.map_or_else(
        || "–".to_owned(),
        |p| {
            let mark = if p.complete() { "" } else { " †" };
            format!("{}{mark}", thousands(p.deliveries_per_sec()))
        },
    )
}

/// One row of a comparison table: `label`, each server's value (Unhidra's first), then
/// Unhidra's ÷ each other's.
fn ratio_row(out: &mut String, label: &str, values: &[Option<f64>]) -> fmt::Result {
    let show = |v: Option<f64>| match v {
        None => "–".to_owned(),
        Some(v) if v >= 10_000.0 => thousands(v),
        Some(v) => format!("{v:.2}"),
    };
    let unhidra = values.first().copied().flatten();
    writeln!(
        out,
        "| {label} | {} | {} |",
        values
            .iter()
            .map(|v| show(*v))
            .collect::<Vec<_>>()
            .join(" | "),
        values
            .iter()
            .skip(1)
            .map(|v| show_ratio(ratio(unhidra, *v)))
            .collect::<Vec<_>>()
            .join(" | ")
    )
}

/// Whether `ratio` (Unhidra's best deliveries/s ÷ a peer's) meets `goal`, as far as the run
/// can tell: a server that kept pace with the publisher in every window was not measured at
/// its capacity, so its best is only a lower bound.
fn verdict(
    ratio: Option<f64>,
    goal: f64,
    unhidra_saturated: bool,
    peer_saturated: bool,
) -> &'static str {
    let Some(ratio) = ratio else { return "–" };
    match (ratio >= goal, unhidra_saturated, peer_saturated) {
        (_, true, true) | (true, false, true) | (false, true, false) => yes_no(ratio >= goal),
        _ => "not judged: a server kept pace at every rate (add a higher rate)",
    }
}

/// How a target ran, for the list of servers.
fn how_it_ran(target: Target, synchronous: fanout::Synchronous) -> String {
    match target {
        Target::Unhidra => format!(
            "`unhidra.v1.jsonl` on `/ws` (a batch of frames per WebSocket message, one per \
             line); every message is stored (SQLite, `synchronous = {}`) and acknowledged to \
             the publisher before it is broadcast; started with `APP_ENV=test UNHIDRA_LOG=warn \
             {}`",
            synchronous.name(),
            fanout::server_env(synchronous)
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Target::Nats => "core publish/subscribe (nothing stored, no acknowledgement) on the \
                         WebSocket listener, without TLS or compression, no authentication; \
                         binary frames"
            .to_owned(),
        Target::SocketIo => "`bench/peers/socketio/server.js`: one node process, WebSocket \
                             transport only, `perMessageDeflate` off, `bufferutil`; the server \
                             acknowledges each `send` after `io.to(room).emit` (nothing stored)"
            .to_owned(),
    }
}

impl FanoutReport {
    fn measured(&self) -> impl Iterator<Item = &Outcome> {
        self.runs.iter().filter_map(|run| run.result.as_ref().ok())
    }

    fn outcome(&self, target: Target) -> Option<&Outcome> {
        self.measured().find(|o| o.target == target)
    }

    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        writeln!(out, "# Fan-out benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(
            out,
            "One room (a NATS subject, a Socket.IO room), {} subscriber connections, one \
             publisher connection, all WebSocket over 127.0.0.1. Every server is driven by the \
             same load generator in this process (tokio-tungstenite; only the frames differ), \
             one server after the other, each fresh. Each window lasts {} s; latency is from the \
             publisher's write to a subscriber's read, both in this process.",
            self.settings.subscribers,
            self.settings.window.as_secs(),
        )?;
        writeln!(out)?;
        for run in &self.runs {
            match &run.result {
                Ok(o) => writeln!(
                    out,
                    "- **{}** ({}): {}.",
                    run.target.name(),
                    o.program,
                    how_it_ran(run.target, self.settings.synchronous)
                )?,
                Err(reason) => {
                    writeln!(out, "- **{}**: not measured: {reason}", run.target.name())?;
                }
            }
        }
        writeln!(out)?;
        writeln!(
            out,
            "Deliveries/s: messages received by all subscribers ÷ the time from the window's \
             first write to its last delivery (the drain after the window waits until all \
             arrived, a second passes without any, or 30 s). Latency percentiles come from a \
             log-linear histogram (within 1.6%). Per frame: deliveries ÷ the WebSocket frames \
             that carried them. CPU is over the window and its drain; the \
             server and this program share the machine's CPUs. RSS per idle connection is \
             (RSS with the subscribers subscribed and idle − RSS before them) ÷ subscribers, \
             from `/proc/<pid>/status` of the server process (node's own for Socket.IO)."
        )?;
        writeln!(out)?;
        self.write_comparison(&mut out)?;
        for outcome in self.measured() {
            write_target(&mut out, outcome)?;
        }
        writeln!(
            out,
            "Open-file limit of this process (and the servers): {}",
            self.open_files
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        )?;
        writeln!(out)?;
        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }

    fn write_comparison(&self, out: &mut String) -> fmt::Result {
        let Some(unhidra) = self.outcome(Target::Unhidra) else {
            return Ok(());
        };
        let peers: Vec<&Outcome> = self
            .measured()
            .filter(|o| o.target != Target::Unhidra)
            .collect();
        if peers.is_empty() {
            return Ok(());
        }
        let all: Vec<&Outcome> = std::iter::once(unhidra)
            .chain(peers.iter().copied())
            .collect();
        let names: Vec<&str> = all.iter().map(|o| o.target.name()).collect();
        let ratio_heads: Vec<String> = peers
            .iter()
            .map(|p| format!("Unhidra ÷ {}", p.target.name()))
            .collect();
        let header = |first: &str| {
            format!(
                "| {first} | {} | {} |\n|---|{}{}",
                names.join(" | "),
                ratio_heads.join(" | "),
                "---|".repeat(names.len()),
                "---|".repeat(ratio_heads.len())
            )
        };

        writeln!(out, "## Unhidra against the others")?;
        writeln!(out)?;
        writeln!(out, "### Targets")?;
        writeln!(out)?;
        writeln!(out, "| Target (from the issue) | Measured | Met |")?;
        writeln!(out, "|---|---|---|")?;
        let best = unhidra.best_deliveries_per_sec();
        for (target, goal) in [
            (Target::Nats, NATS_RATIO_TARGET),
            (Target::SocketIo, SOCKETIO_RATIO_TARGET),
        ] {
            let Some(peer) = self.outcome(target) else {
                writeln!(
                    out,
                    "| ≥ {goal} × {}'s deliveries/s | not measured | – |",
                    target.name()
                )?;
                continue;
            };
            let r = ratio(best, peer.best_deliveries_per_sec());
            writeln!(
                out,
                "| ≥ {goal} × {}'s deliveries/s (best window of each) | {} ({} ÷ {}) | {} |",
                target.name(),
                show_ratio(r),
                best.map_or_else(|| "–".to_owned(), thousands),
                peer.best_deliveries_per_sec()
                    .map_or_else(|| "–".to_owned(), thousands),
                verdict(r, goal, unhidra.saturated(), peer.saturated()),
            )?;
        }
        writeln!(out)?;

        writeln!(out, "### Deliveries per second")?;
        writeln!(out)?;
        writeln!(out, "{}", header("Rate (msg/s)"))?;
        for &rate in &self.settings.rates {
            let cells: Vec<String> = all.iter().map(|o| show_rate(o.phase(rate))).collect();
            let ratios: Vec<String> = peers
                .iter()
                .map(|p| {
                    let of = |o: &Outcome| o.phase(rate).map(Phase::deliveries_per_sec);
                    show_ratio(ratio(of(unhidra), of(p)))
                })
                .collect();
            writeln!(
                out,
                "| {rate} | {} | {} |",
                cells.join(" | "),
                ratios.join(" | ")
            )?;
        }
        let bests: Vec<String> = all
            .iter()
            .map(|o| {
                o.best_deliveries_per_sec()
                    .map_or_else(|| "–".to_owned(), thousands)
            })
            .collect();
        let best_ratios: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "**{}**",
                    show_ratio(ratio(best, p.best_deliveries_per_sec()))
                )
            })
            .collect();
        writeln!(
            out,
            "| best window | {} | {} |",
            bests.join(" | "),
            best_ratios.join(" | ")
        )?;
        writeln!(out)?;
        let anything_missing = all.iter().any(|o| o.phases.iter().any(|p| !p.complete()));
        if anything_missing {
            writeln!(
                out,
                "† not every delivery arrived within the drain (the run of that server stops \
                 there)."
            )?;
            writeln!(out)?;
        }
        writeln!(
            out,
            "While a server keeps up with the publisher, deliveries/s is the publisher's pace and \
             the ratio about 1; the best window is where the servers differ."
        )?;
        writeln!(out)?;

        writeln!(
            out,
            "### p99 latency (ms; a ratio above 1: Unhidra is slower)"
        )?;
        writeln!(out)?;
        writeln!(out, "{}", header("Rate (msg/s)"))?;
        for &rate in &self.settings.rates {
            let p99_ms = all
                .iter()
                .map(|o| o.phase(rate)?.p99_us.map(|us| us as f64 / 1000.0))
                .collect::<Vec<_>>();
            ratio_row(out, &rate.to_string(), &p99_ms)?;
        }
        writeln!(out)?;

        writeln!(out, "### Memory and CPU")?;
        writeln!(out)?;
        writeln!(out, "{}", header("Measure"))?;
        let row = |out: &mut String, label: &str, value: &dyn Fn(&Outcome) -> Option<f64>| {
            ratio_row(
                out,
                label,
                &all.iter().map(|o| value(o)).collect::<Vec<_>>(),
            )
        };
        row(out, "RSS per idle connection (KiB)", &|o| {
            o.rss_per_connection_kib()
        })?;
        row(out, "RSS before the subscribers (MiB)", &|o| {
            Some(mib(o.before.rss_kib))
        })?;
        row(
            out,
            "Deliveries per server CPU-second (best window)",
            &|o| o.best_per_server_core(),
        )?;
        row(out, "Deliveries per WebSocket frame (best window)", &|o| {
            o.best_phase().and_then(Phase::per_frame)
        })?;
        for &rate in &self.settings.rates {
            let server_cores = |o: &Outcome| o.phase(rate).and_then(|p| p.server_cores);
            let client_cores = |o: &Outcome| o.phase(rate).and_then(|p| p.client_cores);
            writeln!(
                out,
                "| CPU server / bench at {rate} msg/s (cores) | {} | {} |",
                all.iter()
                    .map(|o| format!("{} / {}", cores(server_cores(o)), cores(client_cores(o))))
                    .collect::<Vec<_>>()
                    .join(" | "),
                peers
                    .iter()
                    .map(|p| show_ratio(ratio(server_cores(unhidra), server_cores(p))))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "Not like for like: Unhidra stores every message (an SQLite write) and acknowledges \
             it to the publisher before it broadcasts it, and checks room membership; \
             nats-server core keeps nothing and sends no acknowledgement; the Socket.IO server \
             keeps nothing and acknowledges after handing the message to its sockets. The CPU \
             ratios are of the server process alone, over each window and its drain."
        )?;
        writeln!(out)?;
        Ok(())
    }
}

/// One server's own section: (for Unhidra) the absolute targets, every window, and
/// its connections and memory.
fn write_target(out: &mut String, o: &Outcome) -> fmt::Result {
    writeln!(out, "## {}", o.target.name())?;
    writeln!(out)?;
    if o.target == Target::Unhidra {
        write_unhidra_targets(out, o)?;
    }
    writeln!(
        out,
        "| Rate (msg/s) | Sent (acked) | Send window | Subscribers | Delivered / expected | All arrived | Deliveries/s | Per frame | p50 | p99 | max | Connections lost | CPU server / bench / machine (steal), cores |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for p in &o.phases {
        writeln!(
            out,
            "| {} | {} ({}) | {:.2} s | {} | {} / {} | {} | {:.0} | {} | {} ms | {} ms | {} ms | {} | {} / {} / {} ({}) |",
            p.rate,
            p.sent,
            p.acked
                .map_or_else(|| "no acks".to_owned(), |a| a.to_string()),
            p.send_window.as_secs_f64(),
            p.listeners,
            p.delivered,
            p.expected(),
            yes_no(p.complete()),
            p.deliveries_per_sec(),
            p.per_frame()
                .map_or_else(|| "–".to_owned(), |f| format!("{f:.2}")),
            opt_us_as_ms(p.p50_us),
            opt_us_as_ms(p.p99_us),
            opt_us_as_ms(p.max_us),
            p.lost,
            cores(p.server_cores),
            cores(p.client_cores),
            cores(p.machine_cores),
            cores(p.steal_cores),
        )?;
    }
    for rate in &o.skipped {
        writeln!(
            out,
            "| {rate} | skipped: an earlier rate was not delivered in full | | | | | | | | | | | |"
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "- {} of {} subscribers connected and subscribed in {:.2} s{}",
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
        "- Server RSS before the subscribers: {:.1} MiB; with them idle: {:.1} MiB ({} KiB per \
         connection); after the last window: {:.1} MiB (peak {:.1} MiB)",
        mib(o.before.rss_kib),
        mib(o.connected_memory.rss_kib),
        o.rss_per_connection_kib()
            .map_or_else(|| "–".to_owned(), |k| format!("{k:.1}")),
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
            "- Subscriber connections that ended: {}",
            codes.join(", ")
        )?;
    }
    if let Some(error) = &o.publisher_error {
        writeln!(out, "- First error the publisher got: `{error}`")?;
    }
    writeln!(out)?;
    Ok(())
}

/// The absolute targets for Unhidra.
fn write_unhidra_targets(out: &mut String, o: &Outcome) -> fmt::Result {
    let best = o.best_deliveries_per_sec().unwrap_or(0.0);
    let per_conn = o.rss_per_connection_kib();
    writeln!(out, "| Metric | Measured | Target | Met |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| Deliveries per second (best window) | {best:.0} | ≥ {DELIVERIES_TARGET:.0} | {} |",
        yes_no(best >= DELIVERIES_TARGET)
    )?;
    match o.phase(P99_TARGET_RATE) {
        Some(phase) => writeln!(
            out,
            "| p99 latency at {P99_TARGET_RATE} messages/s | {} ms | < {} ms | {} |",
            opt_us_as_ms(phase.p99_us),
            P99_TARGET.as_millis(),
            yes_no(
                phase.complete()
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
    Ok(())
}
