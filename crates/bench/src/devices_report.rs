//! The Markdown report of `unhidra-bench devices`: telemetry ingest per backend against a raw
//! insert of the same rows and the targets, then the idle devices.

use std::fmt::{self, Write as _};

use crate::devices::{
    Idle, Ingest, KIB_PER_DEVICE_TARGET, Outcome, RAW_RATIO_TARGET, SILENCE_P99_TARGET_MS, Settings,
};
use crate::load::percentile_ms;
use crate::report::{Machine, opt_ms, thousands, write_machine, yes_no};

/// Everything measured in one invocation of `unhidra-bench devices`.
#[derive(Debug, Clone)]
pub struct DevicesReport {
    /// The command line that produced it.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// What was asked for.
    pub settings: Settings,
    /// What was measured.
    pub outcome: Outcome,
}

impl DevicesReport {
    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let s = &self.settings;
        writeln!(out, "# unhidra-bench devices")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        write_machine(&mut out, &self.machine)?;
        writeln!(out)?;
        writeln!(out, "## Telemetry ingest")?;
        writeln!(out)?;
        writeln!(
            out,
            "{} devices, each sending batches of {} points one after the other (the next once \
             the last is acknowledged as durable), {} s measured after a 2 s warm-up. Raw: the \
             same number of rows of the same shape written by one connection into the same \
             table with multi-row INSERTs (1,000 rows a statement, 50,000 a transaction).",
            s.devices,
            s.points,
            s.window.as_secs()
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| Backend | Points/s acknowledged | Batches/s | Ack p50 / p99 | Raw insert rows/s | Ratio | CPU server / bench / others (cores) | Failed devices |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|")?;
        for result in &self.outcome.ingest {
            match result {
                Ok(i) => write_ingest_row(&mut out, i)?,
                Err(err) => writeln!(out, "| – | failed: {err} | | | | | | |")?,
            }
        }
        writeln!(out)?;
        writeln!(out, "| Target | Measured | Met |")?;
        writeln!(out, "|---|---|---|")?;
        for i in self.outcome.ingest.iter().flatten() {
            let target = i.backend.points_target();
            writeln!(
                out,
                "| ≥ {} points/s on {} | {} | {} |",
                thousands(target),
                i.backend.name(),
                thousands(i.points_per_sec()),
                yes_no(i.failed == 0 && i.points_per_sec() >= target)
            )?;
            let ratio = i.points_per_sec() / i.raw_per_sec().max(1e-9);
            writeln!(
                out,
                "| ≥ {RAW_RATIO_TARGET} × the raw insert on {} | {ratio:.2} | {} |",
                i.backend.name(),
                yes_no(ratio >= RAW_RATIO_TARGET)
            )?;
        }
        if let Some(idle) = &self.outcome.idle {
            writeln!(out)?;
            writeln!(out, "## Idle devices")?;
            writeln!(out)?;
            match idle {
                Ok(idle) => write_idle(&mut out, idle, s)?,
                Err(err) => writeln!(out, "Failed: {err}")?,
            }
        }
        if let Some(err) = self
            .outcome
            .ingest
            .iter()
            .flatten()
            .find_map(|i| i.first_error.as_ref())
        {
            writeln!(out)?;
            writeln!(out, "First failure of a device: {err}")?;
        }
        Ok(out)
    }
}

fn write_ingest_row(out: &mut String, i: &Ingest) -> fmt::Result {
    let others = i
        .cpu
        .others()
        .map_or_else(|| "–".to_owned(), |o| format!("{o:.2}"));
    writeln!(
        out,
        "| {} | {} | {} | {} / {} ms | {} | {:.2} | {:.2} / {:.2} / {} | {} |",
        i.backend.name(),
        thousands(i.points_per_sec()),
        thousands(i.batches as f64 / i.seconds.max(1e-9)),
        opt_ms(percentile_ms(&i.ack_us, 50.0)),
        opt_ms(percentile_ms(&i.ack_us, 99.0)),
        thousands(i.raw_per_sec()),
        i.points_per_sec() / i.raw_per_sec().max(1e-9),
        i.cpu.server,
        i.cpu.bench,
        others,
        i.failed
    )
}

fn write_idle(out: &mut String, idle: &Idle, s: &Settings) -> fmt::Result {
    writeln!(
        out,
        "{} devices registered, then connected (32 at a time), each saying `hello` and then \
         nothing, on SQLite; inactivity timeout {} s; an admin watches the `fleet` topic.",
        idle.devices, s.silence_after
    )?;
    writeln!(out)?;
    let per_device = idle.kib_per_device();
    let p99 = percentile_ms(&idle.delays_us, 99.0);
    writeln!(out, "| Figure | Measured | Target | Met |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| Connected (`hello` sent) | {} of {} | all | {} |",
        idle.connected,
        idle.devices,
        yes_no(idle.connected == idle.devices)
    )?;
    writeln!(
        out,
        "| Connect rate | {} devices/s ({:.1} s) | – | – |",
        thousands(idle.connects_per_sec()),
        idle.connect_seconds
    )?;
    writeln!(
        out,
        "| Server RSS before → after | {:.1} → {:.1} MiB | – | – |",
        idle.rss_before_kib as f64 / 1024.0,
        idle.rss_after_kib as f64 / 1024.0
    )?;
    writeln!(
        out,
        "| RSS per connected device | {} | ≤ {KIB_PER_DEVICE_TARGET} KiB | {} |",
        per_device.map_or_else(|| "–".to_owned(), |k| format!("{k:.1} KiB")),
        yes_no(per_device.is_some_and(|k| k <= KIB_PER_DEVICE_TARGET))
    )?;
    writeln!(
        out,
        "| Timeout → silent status at the watcher, p50 / p99 / max | {} / {} / {} ms | p99 ≤ {SILENCE_P99_TARGET_MS} ms | {} |",
        opt_ms(percentile_ms(&idle.delays_us, 50.0)),
        opt_ms(p99),
        opt_ms(percentile_ms(&idle.delays_us, 100.0)),
        yes_no(idle.missed == 0 && p99.is_some_and(|p| p <= SILENCE_P99_TARGET_MS))
    )?;
    writeln!(
        out,
        "| Silent statuses that never arrived | {} (watcher lagged: {}) | 0 | {} |",
        idle.missed,
        yes_no(idle.lagged),
        yes_no(idle.missed == 0)
    )?;
    if let Some(err) = &idle.first_error {
        writeln!(out)?;
        writeln!(out, "First failure of a device: {err}")?;
    }
    Ok(())
}
