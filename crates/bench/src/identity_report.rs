//! The Markdown report of the identity scenario: the raw hash rate, logins per second and the
//! latency of `GET /api/v1/auth/me` idle and under a login flood, against their targets.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use crate::identity::{self, Outcome, Probe, Settings, WorkersRun};
use crate::load::{Errors, mean_ms, percentile_ms};
use crate::report::{Machine, mib, ms, opt_ms, write_machine, yes_no};

/// Logins per second divided by the raw hash rate must be at least this.
pub const LOGIN_RATIO_TARGET: f64 = 0.9;
/// The p99 of `GET /api/v1/auth/me` during the flood must be under this many milliseconds.
pub const ME_P99_TARGET_MS: f64 = 10.0;

/// Everything measured in one invocation of `unhidra-bench identity`.
#[derive(Debug, Clone)]
pub struct IdentityReport {
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

impl WorkersRun {
    /// Logins per second over the raw hash rate.
    fn ratio(&self, raw_per_sec: f64) -> f64 {
        self.flood.logins_per_sec() / raw_per_sec.max(1e-9)
    }

    /// Whether the flood's prober met the p99 target.
    fn me_met(&self) -> bool {
        self.flood_probe.errors.total() == 0
            && percentile_ms(&self.flood_probe.latencies_us, 99.0)
                .is_some_and(|p99| p99 < ME_P99_TARGET_MS)
    }
}

/// "`UNHIDRA_HASH_WORKERS=0` (2 at once)".
fn workers_label(run: &WorkersRun) -> String {
    format!(
        "`UNHIDRA_HASH_WORKERS={}` ({} at once)",
        run.setting, run.permits
    )
}

fn p50_p99(latencies_us: &[u32]) -> String {
    format!(
        "{} / {} ms",
        opt_ms(percentile_ms(latencies_us, 50.0)),
        opt_ms(percentile_ms(latencies_us, 99.0))
    )
}

fn errors_line(errors: &Errors) -> String {
    format!(
        "{} non-200, {} I/O, {} timeouts, {} connections closed by the server{}",
        errors.status,
        errors.io,
        errors.timeouts,
        errors.closed_by_server,
        errors
            .first
            .as_ref()
            .map_or_else(String::new, |first| format!("; first: {first}")),
    )
}

fn probe_line(out: &mut String, what: &str, probe: &Probe) -> fmt::Result {
    let l = &probe.latencies_us;
    writeln!(
        out,
        "- `GET {}` {what}: {} answers of 200 in {:.1} s; p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, mean {} ms; errors: {}",
        identity::ME_PATH,
        l.len(),
        probe.window.as_secs_f64(),
        opt_ms(percentile_ms(l, 50.0)),
        opt_ms(percentile_ms(l, 90.0)),
        opt_ms(percentile_ms(l, 99.0)),
        opt_ms(percentile_ms(l, 100.0)),
        opt_ms(mean_ms(l)),
        errors_line(&probe.errors),
    )
}

impl IdentityReport {
    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let s = &self.settings;
        let o = &self.outcome;
        let p = o.params;
        let raw = o.raw;

        writeln!(out, "# Unhidra identity benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(out, "Server binary: `{}`", self.server.display())?;
        writeln!(out)?;
        writeln!(
            out,
            "Argon2id parameters: m = {} KiB, t = {}, p = {} (the production ones), for the raw rate and for the server. The server runs with `APP_ENV=test UNHIDRA_LOG=warn {}` (lockout and the login rate limit off, so that neither refuses the flood's correct logins).",
            p.memory_kib,
            p.iterations,
            p.parallelism,
            identity::server_env(p, 0)
                .iter()
                .filter(|(key, _)| *key != "UNHIDRA_HASH_WORKERS")
                .map(|(key, value)| format!("{key}={value}"))
                .chain(std::iter::once(
                    "UNHIDRA_HASH_WORKERS=<as in each row>".to_owned()
                ))
                .collect::<Vec<_>>()
                .join(" "),
        )?;
        writeln!(out)?;
        writeln!(out, "| Metric | Measured | Target | Met |")?;
        writeln!(out, "|---|---|---|---|")?;
        writeln!(
            out,
            "| Raw Argon2id rate: password checks in this process, {} threads, {} s | {:.1} hashes/s ({} checks, {:.1} ms per hash per thread, {} page faults per hash) | – | – |",
            raw.threads,
            raw.budget.as_secs(),
            raw.per_sec,
            raw.hashes,
            raw.ms_per_hash(),
            raw.faults_per_hash
                .map_or_else(|| "?".to_owned(), |f| format!("{f:.0}")),
        )?;
        for run in &o.runs {
            let label = workers_label(run);
            let ratio = run.ratio(raw.per_sec);
            writeln!(
                out,
                "| Logins/s, {} clients, {} s, {label} | {:.1} logins/s | – | – |",
                s.clients,
                s.duration.as_secs(),
                run.flood.logins_per_sec(),
            )?;
            writeln!(
                out,
                "| Logins/s ÷ raw hash rate, {label} | {ratio:.2} | ≥ {LOGIN_RATIO_TARGET:.2} | {} |",
                yes_no(ratio >= LOGIN_RATIO_TARGET && run.flood.errors.total() == 0),
            )?;
            writeln!(
                out,
                "| `GET {}` p50 / p99, idle server, {label} | {} | – | – |",
                identity::ME_PATH,
                p50_p99(&run.idle_probe.latencies_us),
            )?;
            writeln!(
                out,
                "| `GET {}` p50 / p99, during the login flood, {label} | {} | p99 < {ME_P99_TARGET_MS:.0} ms | {} |",
                identity::ME_PATH,
                p50_p99(&run.flood_probe.latencies_us),
                yes_no(run.me_met()),
            )?;
        }
        writeln!(out)?;

        writeln!(out, "## How")?;
        writeln!(out)?;
        writeln!(
            out,
            "- Raw rate: before any server runs, {} threads (one per CPU, as many as the server's hash pool with `UNHIDRA_HASH_WORKERS=0`) each verify the password against its Argon2id hash with the `argon2` crate 0.5, as the server does for a login, for {} s after one uncounted check; the rate is the sum of the threads' rates.",
            raw.threads,
            raw.budget.as_secs(),
        )?;
        writeln!(
            out,
            "- For each `UNHIDRA_HASH_WORKERS` value, a fresh server: `POST {}` creates `{}`, one `POST {}` gets an access token, and `GET {}` must answer 200 with it. After {} s of rest, a prober sends `GET {}` with that token every {} ms on its own keep-alive connection for {} s (idle figures).",
            identity::REGISTER_PATH,
            identity::EMAIL,
            identity::LOGIN_PATH,
            identity::ME_PATH,
            identity::SETTLE.as_secs(),
            identity::ME_PATH,
            s.probe_every.as_millis(),
            s.idle.as_secs(),
        )?;
        writeln!(
            out,
            "- Then {} clients, each on its own keep-alive connection, send `POST {}` with the correct password one after another. Logins answered in the first {} s are not counted; those answered 200 in the next {} s are (after a failed one, a client pauses 10 ms). The prober runs again over those {} s (flood figures). Latency is from writing the request to reading the whole answer, measured in this process, which shares the CPUs with the server.",
            s.clients,
            identity::LOGIN_PATH,
            s.warmup.as_secs(),
            s.duration.as_secs(),
            s.duration.as_secs(),
        )?;
        writeln!(out)?;

        for run in &o.runs {
            writeln!(out, "## {}", workers_label(run))?;
            writeln!(out)?;
            writeln!(
                out,
                "- Start to ready: {:.1} ms (it hashes one password at start)",
                ms(run.ready_after)
            )?;
            let f = &run.flood;
            writeln!(
                out,
                "- Logins: {} answered 200 in {} s = {:.1}/s ({} more in the warm-up); latency p50 {} ms, p99 {} ms, max {} ms; errors: {}",
                f.latencies_us.len(),
                f.window.as_secs(),
                f.logins_per_sec(),
                f.warmup_logins,
                opt_ms(percentile_ms(&f.latencies_us, 50.0)),
                opt_ms(percentile_ms(&f.latencies_us, 99.0)),
                opt_ms(percentile_ms(&f.latencies_us, 100.0)),
                errors_line(&f.errors),
            )?;
            probe_line(&mut out, "on the idle server", &run.idle_probe)?;
            probe_line(&mut out, "during the login flood", &run.flood_probe)?;
            if let Some(cpu) = run.cpu {
                writeln!(
                    out,
                    "- CPU during the flood: server {:.2} cores, this program {:.2} cores (of {})",
                    cpu.server_cores, cpu.client_cores, self.machine.cpus,
                )?;
                if let Some(machine) = cpu.machine_cores {
                    let others = (machine - cpu.server_cores - cpu.client_cores).max(0.0);
                    let steal = cpu.steal_cores.unwrap_or(0.0);
                    writeln!(
                        out,
                        "- CPU used meanwhile by other processes: {others:.2} cores; steal: {steal:.2} cores{}",
                        if others + steal > 0.2 {
                            "; **the machine was not quiet**"
                        } else {
                            ""
                        },
                    )?;
                }
            }
            if let Some(faults) = run.faults_per_sec {
                writeln!(
                    out,
                    "- Server page faults during the flood: {} minor faults/s, {:.0} per login (each maps a fresh 4 KiB page and zeroes it; an Argon2 block array is {} pages)",
                    crate::report::thousands(faults),
                    faults / f.logins_per_sec().max(1e-9),
                    u64::from(p.memory_kib) / 4,
                )?;
            }
            writeln!(
                out,
                "- Server RSS: {:.1} MiB before the probes, {:.1} MiB after the flood, peak (VmHWM) {:.1} MiB; {} threads after the flood",
                mib(run.memory_before.rss_kib),
                mib(run.memory_after.rss_kib),
                mib(run.memory_after.hwm_kib),
                run.threads_after
                    .map_or_else(|| "?".to_owned(), |t| t.to_string()),
            )?;
            writeln!(out)?;
        }

        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }
}
