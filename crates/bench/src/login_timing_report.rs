//! The Markdown report of the login-timing scenario: the latency distribution of each case and
//! its ratio to the same request for an unknown email.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use crate::load::percentile_ms;
use crate::login_timing::{self, COSTLIER, Case, Outcome, Settings, Timings, WARMUP_ROUNDS};
use crate::report::{Machine, opt_ms, write_machine};

/// Everything measured in one invocation of `unhidra-bench login-timing`.
#[derive(Debug, Clone)]
pub struct LoginTimingReport {
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

/// `a ÷ b`, two decimals, or `–` when either is missing.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_owned(),
    }
}

impl LoginTimingReport {
    fn timings(&self, case: Case) -> &[u32] {
        self.outcome
            .timings
            .iter()
            .find(|t| t.case == case)
            .map_or(&[], |t: &Timings| t.latencies_us.as_slice())
    }

    /// The report as Markdown.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let o = &self.outcome;
        let p = o.params;
        writeln!(out, "# Unhidra login-timing benchmark")?;
        writeln!(out)?;
        writeln!(out, "Command: `{}`", self.command)?;
        writeln!(out)?;
        writeln!(out, "Server binary: `{}`", self.server.display())?;
        writeln!(out)?;
        writeln!(
            out,
            "Server: `APP_ENV=test UNHIDRA_LOG=warn {}` (Argon2id m = {} KiB, t = {}, p = {}, the production cost; accounts hidden; the per-address limits off, since every request comes from 127.0.0.1).",
            login_timing::server_env(p)
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(" "),
            p.memory_kib,
            p.iterations,
            p.parallelism,
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{} measured rounds in {:.1} s{}; {} account(s) locked for the locked case.",
            o.rounds,
            o.took.as_secs_f64(),
            if o.cut_short {
                format!(
                    " (the {} s budget ended the run before the {} asked for)",
                    self.settings.budget.as_secs(),
                    self.settings.samples
                )
            } else {
                String::new()
            },
            o.locked_accounts,
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| Case | n | median | p90 | p99 | median ÷ unknown | p90 ÷ unknown |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|")?;
        for case in Case::ALL {
            let l = self.timings(case);
            let base = self.timings(case.baseline());
            writeln!(
                out,
                "| {} | {} | {} ms | {} ms | {} ms | {} | {} |",
                case.label(),
                l.len(),
                opt_ms(percentile_ms(l, 50.0)),
                opt_ms(percentile_ms(l, 90.0)),
                opt_ms(percentile_ms(l, 99.0)),
                ratio(percentile_ms(l, 50.0), percentile_ms(base, 50.0)),
                ratio(percentile_ms(l, 90.0), percentile_ms(base, 90.0)),
            )?;
        }
        writeln!(out)?;
        writeln!(out, "## How")?;
        writeln!(out)?;
        writeln!(
            out,
            "- One fresh server. `unhidra admin import-users` (run over its data folder while it serves) imports accounts with an Argon2id hash at the server's cost, with a salted SHA-256 hash (legacy), with a cheaper Argon2id hash and with a costlier one ({} KiB, t = {}, below the `argon2_max_*` ceiling: the import warns about these). Each such account takes at most {} wrong logins, one fewer than lock it, so the run spreads them over as many accounts as it needs. For the locked case, an account is locked with {} wrong logins before the rounds, and a fresh one every 50 s (the first lock lasts a minute); the locked case sends the *correct* password, which must not tell the lock either.",
            COSTLIER.memory_kib,
            COSTLIER.iterations,
            login_timing::LOCKOUT_THRESHOLD - 1,
            login_timing::LOCKOUT_THRESHOLD,
        )?;
        writeln!(
            out,
            "- A round sends one request of each case, one after another on one keep-alive connection; each round starts one case later than the one before, so that no case always follows the same one (a reset request for an existing account leaves its work running after the answer). {WARMUP_ROUNDS} rounds are not counted. Every answer must have the status of its baseline (401 for a login, 202 for a reset request), or the run fails.",
        )?;
        writeln!(
            out,
            "- Latency is from writing the request to reading the whole answer, measured in this process. Ratios divide by the same figure for the same request with an unknown email: a login for `nobody-0@example.com`, or a reset request for it.",
        )?;
        if let (Some(machine), Some(others)) = (o.machine_cores, o.other_cores) {
            writeln!(
                out,
                "- CPU over the measured rounds: the machine was busy {machine:.2} cores of {}, {others:.2} of them by other processes{}.",
                self.machine.cpus,
                if others > 0.2 {
                    "; **the machine was not quiet**"
                } else {
                    ""
                },
            )?;
        }
        writeln!(out)?;
        write_machine(&mut out, &self.machine)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_to_the_unknown_email_of_the_same_request() {
        assert_eq!(Case::Legacy.baseline(), Case::Unknown);
        assert_eq!(Case::ResetExisting.baseline(), Case::ResetUnknown);
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50");
        assert_eq!(ratio(None, Some(2.0)), "–");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "–");
    }
}
