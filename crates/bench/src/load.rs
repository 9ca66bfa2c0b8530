//! The load generator: N keep-alive connections, each sending one request at a time (a closed
//! loop) for a warm-up and then a measured window, recording each measured request's latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::{Connection, get_request};

/// How long one request (or connect) may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed connect, so a dead server is not hammered in a tight loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The server.
    pub addr: SocketAddr,
    /// The path requested, e.g. `/health/live`.
    pub path: &'static str,
    /// Concurrent connections.
    pub connections: u32,
    /// Requests sent before this has passed are not counted.
    pub warmup: Duration,
    /// The measured window after the warm-up.
    pub duration: Duration,
}

/// Why requests failed, counted over the measured window only.
#[derive(Debug, Clone, Default)]
pub struct Errors {
    /// Answers other than 200.
    pub status: u64,
    /// Connects or requests that failed (reset, closed, malformed answer).
    pub io: u64,
    /// Connects or requests that took longer than 5 s.
    pub timeouts: u64,
    /// Connections the server closed (`Connection: close`) after an answer.
    pub closed_by_server: u64,
    /// The first failure seen, to show what went wrong.
    pub first: Option<String>,
}

impl Errors {
    /// Requests that did not end in a 200.
    pub fn total(&self) -> u64 {
        self.status + self.io + self.timeouts
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Self) {
        self.status += other.status;
        self.io += other.io;
        self.timeouts += other.timeouts;
        self.closed_by_server += other.closed_by_server;
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    /// Keeps `what` as the first failure, unless one was kept already.
    pub fn note(&mut self, what: String) {
        if self.first.is_none() {
            self.first = Some(what);
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Latencies of the measured 200 answers, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Failures in the measured window.
    pub errors: Errors,
    /// The measured window.
    pub duration: Duration,
    /// Answers (of any status) during the warm-up.
    pub warmup_requests: u64,
}

impl Outcome {
    /// 200 answers per second over the measured window.
    pub fn requests_per_sec(&self) -> f64 {
        self.latencies_us.len() as f64 / self.duration.as_secs_f64()
    }

    /// The latency at percentile `p` (0–100), nearest rank, in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        percentile_ms(&self.latencies_us, p)
    }

    /// The mean latency in milliseconds.
    pub fn mean_ms(&self) -> Option<f64> {
        mean_ms(&self.latencies_us)
    }
}

/// The value at percentile `p` (0–100) of latencies in microseconds sorted in ascending order,
/// by nearest rank, in milliseconds; `None` if there are none.
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> Option<f64> {
    let n = sorted_us.len();
    if n == 0 {
        return None;
    }
    // p × n / 100 computed in floating point can land a hair above a whole number
    // (99.9 % of 1000 is 999.000…1); don't let that push the rank up by one.
    let rank = (p * n as f64 / 100.0 - 1e-9).ceil() as usize;
    let index = rank.clamp(1, n) - 1;
    sorted_us.get(index).map(|&us| f64::from(us) / 1000.0)
}

/// The mean of latencies in microseconds, in milliseconds; `None` if there are none.
pub fn mean_ms(latencies_us: &[u32]) -> Option<f64> {
    let n = latencies_us.len();
    (n > 0).then(|| {
        let sum: u64 = latencies_us.iter().map(|&us| u64::from(us)).sum();
        sum as f64 / n as f64 / 1000.0
    })
}

/// What one connection saw.
#[derive(Debug, Default)]
struct PerConnection {
    latencies_us: Vec<u32>,
    errors: Errors,
    warmup_requests: u64,
}

/// Runs the plan: every connection starts now, counts from `now + warmup` and stops sending at
/// `now + warmup + duration`; the call returns at most 5 s (one request timeout) after that.
pub async fn run(plan: Plan) -> Outcome {
    let request: Arc<[u8]> = get_request(plan.addr, plan.path).into();
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let until = measure_from + plan.duration;
    let tasks: Vec<_> = (0..plan.connections)
        .map(|_| {
            tokio::spawn(connection_loop(
                plan.addr,
                Arc::clone(&request),
                measure_from,
                until,
            ))
        })
        .collect();
    let mut latencies_us = Vec::new();
    let mut errors = Errors::default();
    let mut warmup_requests = 0;
    for task in tasks {
        match task.await {
            Ok(seen) => {
                latencies_us.extend_from_slice(&seen.latencies_us);
                errors.merge(seen.errors);
                warmup_requests += seen.warmup_requests;
            }
            Err(err) => {
                errors.io += 1;
                errors.note(format!("a connection task failed: {err}"));
            }
        }
    }
    latencies_us.sort_unstable();
    Outcome {
        latencies_us,
        errors,
        duration: plan.duration,
        warmup_requests,
    }
}

async fn connection_loop(
    addr: SocketAddr,
    request: Arc<[u8]>,
    measure_from: Instant,
    until: Instant,
) -> PerConnection {
    let mut seen = PerConnection {
        // Room for ~2 s at 1 ms per request; it grows if the server is faster.
        latencies_us: Vec::with_capacity(2048),
        ..PerConnection::default()
    };
    let mut connection: Option<Connection> = None;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let counted = now >= measure_from;
        let open = match connection.as_mut() {
            Some(open) => open,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, Connection::open(addr)).await {
                Ok(Ok(open)) => connection.insert(open),
                Ok(Err(err)) => {
                    if counted {
                        seen.errors.io += 1;
                        seen.errors.note(format!("connect: {err}"));
                    }
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    if counted {
                        seen.errors.timeouts += 1;
                        seen.errors.note("connect timed out".to_owned());
                    }
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let counted = sent >= measure_from;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, open.send(&request)).await;
        let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        match answer {
            Ok(Ok(answer)) => {
                if !counted {
                    seen.warmup_requests += 1;
                } else if answer.status == 200 {
                    seen.latencies_us.push(micros);
                } else {
                    seen.errors.status += 1;
                    seen.errors
                        .note(format!("status {} instead of 200", answer.status));
                }
                if !answer.keep_alive {
                    if counted {
                        seen.errors.closed_by_server += 1;
                    }
                    connection = None;
                }
            }
            Ok(Err(err)) => {
                if counted {
                    seen.errors.io += 1;
                    seen.errors.note(format!("request: {err}"));
                }
                connection = None;
            }
            Err(_) => {
                if counted {
                    seen.errors.timeouts += 1;
                    seen.errors.note("request timed out after 5 s".to_owned());
                }
                connection = None;
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(latencies_us: Vec<u32>) -> Outcome {
        Outcome {
            latencies_us,
            errors: Errors::default(),
            duration: Duration::from_secs(2),
            warmup_requests: 0,
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let run = outcome((1..=1000).map(|ms| ms * 1000).collect());
        assert_eq!(run.percentile_ms(50.0), Some(500.0));
        assert_eq!(run.percentile_ms(99.0), Some(990.0));
        assert_eq!(run.percentile_ms(99.9), Some(999.0));
        assert_eq!(run.percentile_ms(100.0), Some(1000.0));
        assert_eq!(run.percentile_ms(0.0), Some(1.0));
        assert!((run.requests_per_sec() - 500.0).abs() < 1e-9);
        assert_eq!(outcome(Vec::new()).percentile_ms(50.0), None);
    }
}
