//! The Markdown report of `unhidra-bench jobs`: Unhidra's job queue against graphile-worker
//! (drain jobs/s and latency p50 as ratios, against the targets), then each
//! measurement's own figures and the CPU it took.

use std::fmt::{self, Write as _};

use crate::jobs::{
    GRAPHILE_WORKER_PUBLISHED_MS, Measured, PREFILL_BATCH, Run, SQLITE_TARGET, Settings, System,
    THROUGHPUT_RATIO_TARGET, ratio,
};
use crate::report::{Machine, thousands, write_machine, yes_no};

/// Everything measured in one invocation of `unhidra-bench jobs`.
#[derive(Debug, Clone)]
pub struct JobsReport {
    /// The command line that produced it.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// What was asked for.
    pub settings: Settings,
    /// The measurements, in the order they ran.
    pub runs: Vec<Run>,
    /// The machine's load averages (1, 5, 15 min) before and after.
    pub load: (Option<String>, Option<String>),
}

fn show(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn cores(value: Option<f64>) -> String {
    show(value, 2)
}

/// The machine's load averages from `/proc/loadavg`.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    (fields.len() == 3).then(|| fields.join(" "))
}

impl JobsReport {
    fn find(&self, system: System, nodes: u32) -> Option<&Measured> {
        self.runs
            .iter()
            .find(|r| r.system == system && r.nodes == nodes)
            .and_then(|r| r.result.as_ref().ok())
    }

    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let s = &self.settings;
        writeln!(out, "# Unhidra job queue benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(
            out,
            "{} no-op jobs pre-filled, then drained; {} workers (concurrent jobs) per node on \
             both sides; {} latency samples one at a time, {} ms after the previous one started. \
             Every measurement has a fresh database and fresh node processes.",
            thousands(s.jobs as f64),
            s.concurrency,
            s.samples,
            s.gap.as_millis()
        )?;
        writeln!(out)?;
        self.write_targets(&mut out)?;
        self.write_runs(&mut out)?;
        self.write_cpu(&mut out)?;
        self.write_how(&mut out)?;
        writeln!(
            out,
            "Load average (1, 5, 15 min) before: {}; after: {}.",
            self.load.0.as_deref().unwrap_or("?"),
            self.load.1.as_deref().unwrap_or("?")
        )?;
        writeln!(out)?;
        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }

    fn write_targets(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## Against graphile-worker")?;
        writeln!(out)?;
        writeln!(
            out,
            "| Measure | Unhidra | graphile-worker | Unhidra ÷ graphile-worker | Target | Met |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|")?;
        for &nodes in &self.settings.nodes {
            let u = self
                .find(System::UnhidraPostgres, nodes)
                .map(Measured::jobs_per_sec);
            let g = self
                .find(System::GraphileWorker, nodes)
                .map(Measured::jobs_per_sec);
            let r = ratio(u, g);
            writeln!(
                out,
                "| Drain, PostgreSQL, {nodes} {} × {} workers | {} jobs/s | {} jobs/s | {} | ≥ {THROUGHPUT_RATIO_TARGET:.2} | {} |",
                if nodes == 1 { "node" } else { "nodes" },
                self.settings.concurrency,
                u.map_or_else(|| "–".to_owned(), thousands),
                g.map_or_else(|| "–".to_owned(), thousands),
                show(r, 2),
                r.map_or("–", |r| yes_no(r >= THROUGHPUT_RATIO_TARGET)),
            )?;
        }
        let u = self
            .find(System::UnhidraPostgres, 1)
            .and_then(|m| m.latency_ms(0.5));
        let g = self
            .find(System::GraphileWorker, 1)
            .and_then(|m| m.latency_ms(0.5));
        let r = ratio(u, g);
        writeln!(
            out,
            "| Latency p50, enqueue → start, PostgreSQL, 1 node | {} ms | {} ms (published: {GRAPHILE_WORKER_PUBLISHED_MS} ms average) | {} | ≤ 1.00 | {} |",
            show(u, 2),
            show(g, 2),
            show(r, 2),
            r.map_or("–", |r| yes_no(r <= 1.0)),
        )?;
        let sqlite = self
            .find(System::UnhidraSqlite, 1)
            .map(Measured::jobs_per_sec);
        writeln!(
            out,
            "| Drain, SQLite embedded, 1 node × {} workers | {} jobs/s | – | – | ≥ {} jobs/s | {} |",
            self.settings.concurrency,
            sqlite.map_or_else(|| "–".to_owned(), thousands),
            thousands(SQLITE_TARGET),
            sqlite.map_or("–", |v| yes_no(v >= SQLITE_TARGET)),
        )?;
        writeln!(out)?;
        for run in &self.runs {
            if let Err(why) = &run.result {
                writeln!(
                    out,
                    "{} with {} node(s) was not measured: {why}",
                    run.system.name(),
                    run.nodes
                )?;
                writeln!(out)?;
            }
        }
        Ok(())
    }

    fn write_runs(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## Each measurement")?;
        writeln!(out)?;
        writeln!(
            out,
            "| System | Nodes | Drain | Drain jobs/s | Jobs per claim / per finish | Latency p50 / p90 / p99 / max | Pre-fill | After the drain |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|")?;
        for run in &self.runs {
            let Ok(m) = &run.result else { continue };
            let batches = m.batches.map_or_else(
                || "–".to_owned(),
                |b| {
                    format!(
                        "{:.1} / {:.1} ({} claims, {} finishes)",
                        b.per_claim(),
                        b.per_finish(),
                        thousands(b.claims as f64),
                        thousands(b.finishes as f64)
                    )
                },
            );
            writeln!(
                out,
                "| {} | {} | {:.3} s | {} | {batches} | {} / {} / {} / {} ms | {} jobs/s ({:.2} s) | {} |",
                run.system.name(),
                run.nodes,
                m.drain_seconds,
                thousands(m.jobs_per_sec()),
                show(m.latency_ms(0.5), 2),
                show(m.latency_ms(0.9), 2),
                show(m.latency_ms(0.99), 2),
                show(m.latency_ms(1.0), 2),
                thousands(m.prefill_per_sec()),
                m.prefill_seconds,
                m.after,
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "Pre-fill is not a target: both fill the queue in batches of {PREFILL_BATCH}, Unhidra \
             with `Jobs::enqueue_many` (one transaction of two multi-row INSERTs and one NOTIFY \
             on PostgreSQL), graphile-worker with `addJobs`."
        )?;
        writeln!(out)?;
        for run in &self.runs {
            let Ok(m) = &run.result else { continue };
            let by = m
                .started_by
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / ");
            writeln!(
                out,
                "- {}, {} node(s): {}. Latency jobs started per node: {by}. Go → first node running: {} ms. Runs: {}.",
                run.system.name(),
                run.nodes,
                m.latency_path,
                show(m.startup_ms, 1),
                m.program,
            )?;
        }
        writeln!(out)?;
        Ok(())
    }

    fn write_cpu(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "## CPU during the drain (cores)")?;
        writeln!(out)?;
        writeln!(
            out,
            "| System | Nodes | Nodes' processes | PostgreSQL | Bench | Everything else | Whole machine | Steal | Jobs per node CPU-second |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
        let mut busy = false;
        for run in &self.runs {
            let Ok(m) = &run.result else { continue };
            let c = &m.cpu;
            let others = c.others();
            busy |= others.is_some_and(|o| o > 0.2);
            let per_cpu = ratio(Some(m.jobs_per_sec()), Some(c.nodes));
            writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
                run.system.name(),
                run.nodes,
                c.nodes,
                c.postgres,
                c.bench,
                cores(others),
                cores(c.machine),
                cores(c.steal),
                per_cpu.map_or_else(|| "–".to_owned(), thousands),
            )?;
        }
        writeln!(out)?;
        if busy {
            writeln!(
                out,
                "**Other processes used more than 0.2 of a core during a drain: the machine was not quiet, and the figures are low by an unknown amount.**"
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
            "- Drain: from the bench's `go` to every node until every job's completion is in \
             the database. Unhidra's nodes report the completions they recorded (every 2 ms); \
             graphile-worker reports a task before its completion is written, so after its \
             tasks have all run the bench polls its jobs table until it is empty."
        )?;
        writeln!(
            out,
            "- Jobs per claim / per finish (Unhidra): read back from the store after the drain; \
             the jobs of one claim share their claim's time, the ends recorded by one transaction \
             share their end time. A worker records the ends and makes its next claim in one \
             transaction: an UPDATE of the jobs per batch of up to 500 ends (a completed \
             attempt is kept on its job's row; the others add a row each to the attempts' \
             history), then the claim's UPDATE; on PostgreSQL two such transactions of a worker \
             may be in flight at once. While attempts are short it holds up to sixteen times its \
             concurrency claimed ahead, so that a slot that frees starts a job at once."
        )?;
        writeln!(
            out,
            "- Latency: from just before the enqueue call to the start of the handler (wall \
             clock in µs, so that it compares across processes), nearest-rank percentiles."
        )?;
        writeln!(
            out,
            "- Unhidra nodes: `unhidra-bench jobs-node` child processes, each a `Jobs` with one \
             queue of {} workers, a 30 s lease and a 1 s poll (the product's defaults), a pool of \
             {} connections. graphile-worker nodes: `node node.js` child processes, concurrentJobs \
             {}, maxPoolSize {}, and {}.",
            self.settings.concurrency,
            self.settings.concurrency + 1,
            self.settings.concurrency,
            self.settings.concurrency + 1,
            self.settings.peer_config.describe(),
        )?;
        writeln!(out)?;
        Ok(())
    }
}
