//! A second opinion: if `wrk` is installed, the same endpoint is loaded with it so that the
//! in-process generator's figures can be compared with a well-known C tool's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::BoxError;

/// What wrk printed and the figures taken from it.
#[derive(Debug, Clone)]
pub struct WrkRun {
    /// The command as run.
    pub command: String,
    /// wrk's report, line by line.
    pub lines: Vec<String>,
    /// `Requests/sec:`.
    pub requests_per_sec: Option<f64>,
    /// The `50%` line of the latency distribution, as wrk wrote it.
    pub p50: Option<String>,
    /// The `99%` line of the latency distribution, as wrk wrote it.
    pub p99: Option<String>,
    /// wrk's `Non-2xx or 3xx responses` and `Socket errors` lines, if any.
    pub errors: Vec<String>,
}

/// `wrk` on `PATH`, if any.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("wrk"))
        .find(|candidate| candidate.is_file())
}

/// Runs `wrk -t2 -cN -dSs --latency http://ADDR/PATH`; gives up `duration + 30 s` after start.
pub async fn run(
    wrk: &Path,
    addr: SocketAddr,
    path: &str,
    connections: u32,
    duration: Duration,
) -> Result<WrkRun, BoxError> {
    if !addr.ip().is_loopback() {
        return Err(
            format!("refusing to load {addr}: the benchmark only talks to 127.0.0.1").into(),
        );
    }
    let url = format!("http://{addr}{path}");
    let args = [
        "-t2".to_owned(),
        format!("-c{connections}"),
        format!("-d{}s", duration.as_secs()),
        "--latency".to_owned(),
        url,
    ];
    let command = format!("wrk {}", args.join(" "));
    let run = Command::new(wrk)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(duration + Duration::from_secs(30), run)
        .await
        .map_err(|_| format!("`{command}` did not finish in time"))??;
    if !output.status.success() {
        return Err(format!(
            "`{command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(parse(command, &text))
}

fn parse(command: String, text: &str) -> WrkRun {
    let lines: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let after = |prefix: &str| {
        lines.iter().find_map(|line| {
            line.trim()
                .strip_prefix(prefix)
                .map(|v| v.trim().to_owned())
        })
    };
    WrkRun {
        requests_per_sec: after("Requests/sec:").and_then(|v| v.parse().ok()),
        p50: after("50%"),
        p99: after("99%"),
        errors: lines
            .iter()
            .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
            .map(|l| l.trim().to_owned())
            .collect(),
        lines,
        command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ http://127.0.0.1:1/health/live
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us  10.00ms   80.00%
    Req/Sec    26.00k     1.00k   28.00k    70.00%
  Latency Distribution
     50%    1.10ms
     75%    1.30ms
     90%    1.60ms
     99%    2.50ms
  520000 requests in 10.00s, 90.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  52000.12
Transfer/sec:      9.00MB
";
        let run = parse("wrk".to_owned(), text);
        assert_eq!(run.requests_per_sec, Some(52000.12));
        assert_eq!(run.p50.as_deref(), Some("1.10ms"));
        assert_eq!(run.p99.as_deref(), Some("2.50ms"));
        assert_eq!(run.errors, vec!["Non-2xx or 3xx responses: 3".to_owned()]);
        assert_eq!(run.lines.len(), 14);
    }
}
