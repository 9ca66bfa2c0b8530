//! The identity scenario: against a server that hashes with the production Argon2id parameters,
//! how many logins per second get through compared with the raw hash rate of the machine, and
//! whether a login flood slows down a cheap authenticated request (`GET /api/v1/auth/me`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

use crate::BoxError;
use crate::hashrate::{self, HashParams, PASSWORD, RawRate};
use crate::http::{Connection, get_bearer_request, post_json_request};
use crate::load::Errors;
use crate::report::CpuShare;
use crate::server::{self, Memory, Server};

/// The one account every login uses.
pub const EMAIL: &str = "bench@example.com";
/// Where accounts are created.
pub const REGISTER_PATH: &str = "/api/v1/auth/register";
/// Where the flood goes.
pub const LOGIN_PATH: &str = "/api/v1/auth/login";
/// What the prober asks.
pub const ME_PATH: &str = "/api/v1/auth/me";
/// How long a login may take, queueing for a hash included, before it counts as a timeout.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe (or a connect) may take before it counts as a timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause of a login client after a failed connect or a failed login, so that a server
/// that refuses quickly (a 429, say) is not hammered in a tight loop.
const FAILURE_PAUSE: Duration = Duration::from_millis(10);
/// How long the server is left alone after the account is set up, before the idle probe.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Concurrent login clients, each on its own keep-alive connection.
    pub clients: u32,
    /// Logins answered before this has passed are not counted.
    pub warmup: Duration,
    /// The measured window of the flood, after the warm-up.
    pub duration: Duration,
    /// How long the prober runs against the idle server.
    pub idle: Duration,
    /// The prober's pace: one `GET /api/v1/auth/me` every this long.
    pub probe_every: Duration,
    /// How long each thread hashes for the raw rate.
    pub hash_budget: Duration,
    /// The `UNHIDRA_HASH_WORKERS` values to try, one server each (0: one per CPU).
    pub hash_workers: Vec<u32>,
}

/// What a prober saw.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// Latencies of the 200 answers, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Failures.
    pub errors: Errors,
    /// How long it probed.
    pub window: Duration,
}

/// What the login clients saw.
#[derive(Debug, Clone, Default)]
pub struct Flood {
    /// Latencies of the logins answered 200 within the measured window, in microseconds,
    /// sorted.
    pub latencies_us: Vec<u32>,
    /// Failures answered (or timed out) after the warm-up.
    pub errors: Errors,
    /// The measured window.
    pub window: Duration,
    /// Logins answered 200 during the warm-up.
    pub warmup_logins: u64,
}

impl Flood {
    /// Logins answered 200 per second of the measured window.
    pub fn logins_per_sec(&self) -> f64 {
        self.latencies_us.len() as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// One server, started with one `UNHIDRA_HASH_WORKERS` value, probed idle and then flooded.
#[derive(Debug, Clone)]
pub struct WorkersRun {
    /// The value of `UNHIDRA_HASH_WORKERS`.
    pub setting: u32,
    /// The hashes the server computes at once with it on this machine.
    pub permits: usize,
    /// From spawn to the first 200 of `/health/ready`.
    pub ready_after: Duration,
    /// The prober alone.
    pub idle_probe: Probe,
    /// The login clients.
    pub flood: Flood,
    /// The prober during the flood's measured window.
    pub flood_probe: Probe,
    /// CPU used during the flood's measured window.
    pub cpu: Option<CpuShare>,
    /// The server's minor page faults per second during the flood's measured window.
    pub faults_per_sec: Option<f64>,
    /// The server's threads after the flood.
    pub threads_after: Option<u64>,
    /// Memory just before the idle probe.
    pub memory_before: Memory,
    /// Memory after the flood.
    pub memory_after: Memory,
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The Argon2id parameters of the server and of the raw rate.
    pub params: HashParams,
    /// The raw hash rate, measured before any server ran.
    pub raw: RawRate,
    /// One per `UNHIDRA_HASH_WORKERS` value.
    pub runs: Vec<WorkersRun>,
}

/// The environment the server is started with (on top of `APP_ENV=test`, `UNHIDRA_LOG=warn`).
pub fn server_env(params: HashParams, hash_workers: u32) -> Vec<(&'static str, String)> {
    vec![
        ("UNHIDRA_ARGON2_MEMORY_KIB", params.memory_kib.to_string()),
        ("UNHIDRA_ARGON2_ITERATIONS", params.iterations.to_string()),
        ("UNHIDRA_ARGON2_PARALLELISM", params.parallelism.to_string()),
        ("UNHIDRA_HASH_WORKERS", hash_workers.to_string()),
        // Only wrong passwords count towards a lock, but make sure none can happen.
        ("UNHIDRA_LOCKOUT_THRESHOLD", "0".to_owned()),
        // The login limit reserves a slot per attempt before the password is checked (a success
        // gives it back), so more than its 5 logins in flight from one address or for one
        // account are refused with 429; the flood has 16 at once from 127.0.0.1. 0 turns it off.
        ("UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE", "0".to_owned()),
    ]
}

/// The hashes a server computes at once for a `hash_workers` setting (0: one per CPU).
pub fn permits(hash_workers: u32) -> usize {
    match hash_workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => usize::try_from(n).unwrap_or(1),
    }
}

/// Runs the scenario: the raw hash rate first, then one server per `hash_workers` value.
pub async fn run(binary: &Path, settings: &Settings) -> Result<Outcome, BoxError> {
    let params = hashrate::PROD;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    crate::note(&format!(
        "identity: raw Argon2id rate (m={} KiB, t={}, p={}) on {threads} threads for {} s",
        params.memory_kib,
        params.iterations,
        params.parallelism,
        settings.hash_budget.as_secs()
    ));
    let budget = settings.hash_budget;
    let raw =
        tokio::task::spawn_blocking(move || hashrate::measure(params, threads, budget)).await??;
    crate::note(&format!(
        "identity: {:.1} hashes/s ({:.1} ms per hash per thread)",
        raw.per_sec,
        raw.ms_per_hash()
    ));
    let mut runs = Vec::new();
    for &workers in &settings.hash_workers {
        let server = Server::start_with_env(binary, &server_env(params, workers)).await?;
        let result = exercise(&server, settings, workers).await;
        server.stop().await;
        runs.push(result?);
    }
    Ok(Outcome { params, raw, runs })
}

/// Sets up the account, probes the idle server, then floods it with logins while probing.
async fn exercise(
    server: &Server,
    settings: &Settings,
    workers: u32,
) -> Result<WorkersRun, BoxError> {
    let addr = server.addr();
    let token = set_up_account(addr).await?;
    let me = get_bearer_request(addr, ME_PATH, &token);
    tokio::time::sleep(SETTLE).await;
    let memory_before = server.memory()?;

    crate::note(&format!(
        "identity: UNHIDRA_HASH_WORKERS={workers}: probing {ME_PATH} every {} ms on the idle server for {} s",
        settings.probe_every.as_millis(),
        settings.idle.as_secs()
    ));
    let now = Instant::now();
    let idle_probe = probe(
        addr,
        me.clone(),
        now,
        now + settings.idle,
        settings.probe_every,
    )
    .await;

    crate::note(&format!(
        "identity: {} clients logging in for {} s warm-up + {} s, probing meanwhile (server pid {})",
        settings.clients,
        settings.warmup.as_secs(),
        settings.duration.as_secs(),
        server.pid()
    ));
    let start = Instant::now();
    let measure_from = start + settings.warmup;
    let until = measure_from + settings.duration;
    let login: Arc<[u8]> = post_json_request(addr, LOGIN_PATH, &login_json()).into();
    let clients: Vec<_> = (0..settings.clients)
        .map(|_| tokio::spawn(login_loop(addr, Arc::clone(&login), measure_from, until)))
        .collect();
    let prober = tokio::spawn(probe(addr, me, measure_from, until, settings.probe_every));
    let (cpu, faults) = tokio::join!(
        crate::cpu_share(server.pid(), settings.warmup, settings.duration),
        faults_over(server.pid(), settings.warmup, settings.duration)
    );
    let mut flood = Flood {
        window: settings.duration,
        ..Flood::default()
    };
    for client in clients {
        match client.await {
            Ok(seen) => {
                flood.latencies_us.extend_from_slice(&seen.latencies_us);
                flood.errors.merge(seen.errors);
                flood.warmup_logins += seen.warmup_logins;
            }
            Err(err) => {
                flood.errors.io += 1;
                flood.errors.note(format!("a login client failed: {err}"));
            }
        }
    }
    flood.latencies_us.sort_unstable();
    let flood_probe = prober.await?;
    let memory_after = server.memory()?;
    let threads_after = server::threads(server.pid());
    crate::note(&format!(
        "identity: {:.1} logins/s; {ME_PATH} p99 {:.2} ms idle, {:.2} ms during the flood",
        flood.logins_per_sec(),
        crate::load::percentile_ms(&idle_probe.latencies_us, 99.0).unwrap_or(f64::NAN),
        crate::load::percentile_ms(&flood_probe.latencies_us, 99.0).unwrap_or(f64::NAN),
    ));
    Ok(WorkersRun {
        setting: workers,
        permits: permits(workers),
        ready_after: server.ready_after(),
        idle_probe,
        flood,
        flood_probe,
        cpu,
        faults_per_sec: faults.map(|f| f as f64 / settings.duration.as_secs_f64().max(1e-9)),
        threads_after,
        memory_before,
        memory_after,
    })
}

/// The minor page faults of process `pid` over a window that starts `warmup` from now and lasts
/// `duration`.
async fn faults_over(pid: u32, warmup: Duration, duration: Duration) -> Option<u64> {
    tokio::time::sleep(warmup).await;
    let before = server::minor_faults(pid)?;
    tokio::time::sleep(duration).await;
    Some(server::minor_faults(pid)?.saturating_sub(before))
}

/// Registers the account, logs in once and checks that `/me` accepts the access token, which
/// it returns.
async fn set_up_account(addr: SocketAddr) -> Result<String, BoxError> {
    let register =
        format!(r#"{{"email":"{EMAIL}","password":"{PASSWORD}","display_name":"Bench"}}"#);
    let (status, body) = one_request(addr, &post_json_request(addr, REGISTER_PATH, &register))
        .await
        .map_err(|e| format!("POST {REGISTER_PATH}: {e}"))?;
    if status != 201 {
        return Err(format!(
            "POST {REGISTER_PATH} answered {status} instead of 201: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let (status, body) = one_request(addr, &post_json_request(addr, LOGIN_PATH, &login_json()))
        .await
        .map_err(|e| format!("POST {LOGIN_PATH}: {e}"))?;
    if status != 200 {
        return Err(format!(
            "POST {LOGIN_PATH} answered {status} instead of 200: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let token = access_token(&body).ok_or_else(|| {
        format!(
            "no access_token in the login answer: {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    let (status, body) = one_request(addr, &get_bearer_request(addr, ME_PATH, &token))
        .await
        .map_err(|e| format!("GET {ME_PATH}: {e}"))?;
    if status != 200 {
        return Err(format!(
            "GET {ME_PATH} answered {status} instead of 200: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    Ok(token)
}

/// One request on a new connection, with the login timeout; returns the status and the body.
async fn one_request(addr: SocketAddr, request: &[u8]) -> Result<(u16, Vec<u8>), BoxError> {
    let exchange = async {
        let mut connection = Connection::open(addr).await?;
        connection.send_for_body(request).await
    };
    let (answer, body) = tokio::time::timeout(LOGIN_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {LOGIN_TIMEOUT:?}"))??;
    Ok((answer.status, body))
}

/// The body of a correct login.
fn login_json() -> String {
    format!(r#"{{"email":"{EMAIL}","password":"{PASSWORD}"}}"#)
}

/// The `access_token` of a login answer (a JWT: base64url parts joined by dots), found with a
/// plain text search.
fn access_token(body: &[u8]) -> Option<String> {
    const KEY: &str = "\"access_token\"";
    let text = std::str::from_utf8(body).ok()?;
    let after = &text[text.find(KEY)? + KEY.len()..];
    let value = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let token = &value[..value.find('"')?];
    let plain = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    plain.then(|| token.to_owned())
}

/// What one login client saw.
#[derive(Debug, Default)]
struct PerClient {
    latencies_us: Vec<u32>,
    errors: Errors,
    warmup_logins: u64,
}

/// One login client: sends the login, one at a time on a keep-alive connection, until `until`.
/// A login counts if its answer arrives in `[measure_from, until)`; a failure counts if it
/// happens after `measure_from`, even after `until`. Returns at most one login timeout after
/// `until`.
async fn login_loop(
    addr: SocketAddr,
    request: Arc<[u8]>,
    measure_from: Instant,
    until: Instant,
) -> PerClient {
    let mut seen = PerClient::default();
    let mut connection: Option<Connection> = None;
    while Instant::now() < until {
        let open = match connection.as_mut() {
            Some(open) => open,
            None => match tokio::time::timeout(PROBE_TIMEOUT, Connection::open(addr)).await {
                Ok(Ok(open)) => connection.insert(open),
                failed => {
                    if Instant::now() >= measure_from {
                        match failed {
                            Ok(Err(err)) => {
                                seen.errors.io += 1;
                                seen.errors.note(format!("connect: {err}"));
                            }
                            _ => {
                                seen.errors.timeouts += 1;
                                seen.errors.note("connect timed out".to_owned());
                            }
                        }
                    }
                    tokio::time::sleep(FAILURE_PAUSE).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let answer = tokio::time::timeout(LOGIN_TIMEOUT, open.send(&request)).await;
        let done = Instant::now();
        let micros = u32::try_from(done.duration_since(sent).as_micros()).unwrap_or(u32::MAX);
        let counted = done >= measure_from;
        let failed = !matches!(answer, Ok(Ok(ref a)) if a.status == 200);
        match answer {
            Ok(Ok(answer)) => {
                if answer.status == 200 {
                    if !counted {
                        seen.warmup_logins += 1;
                    } else if done < until {
                        seen.latencies_us.push(micros);
                    }
                } else if counted {
                    seen.errors.status += 1;
                    seen.errors
                        .note(format!("login answered {} instead of 200", answer.status));
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
                    seen.errors.note(format!("login: {err}"));
                }
                connection = None;
            }
            Err(_) => {
                if counted {
                    seen.errors.timeouts += 1;
                    seen.errors
                        .note(format!("login timed out after {LOGIN_TIMEOUT:?}"));
                }
                connection = None;
            }
        }
        if failed {
            tokio::time::sleep(FAILURE_PAUSE).await;
        }
    }
    seen
}

/// The prober: from `from` until `until`, one `request` every `every` on its own keep-alive
/// connection (if an answer takes longer than `every`, the next request follows it at once and
/// the pace resumes from there). Returns at most one probe timeout after `until`.
async fn probe(
    addr: SocketAddr,
    request: Vec<u8>,
    from: Instant,
    until: Instant,
    every: Duration,
) -> Probe {
    let mut seen = Probe {
        latencies_us: Vec::with_capacity(4096),
        window: until.saturating_duration_since(from),
        ..Probe::default()
    };
    tokio::time::sleep_until(from.into()).await;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut connection: Option<Connection> = None;
    loop {
        ticks.tick().await;
        if Instant::now() >= until {
            break;
        }
        let open = match connection.as_mut() {
            Some(open) => open,
            None => match tokio::time::timeout(PROBE_TIMEOUT, Connection::open(addr)).await {
                Ok(Ok(open)) => connection.insert(open),
                Ok(Err(err)) => {
                    seen.errors.io += 1;
                    seen.errors.note(format!("connect: {err}"));
                    continue;
                }
                Err(_) => {
                    seen.errors.timeouts += 1;
                    seen.errors.note("connect timed out".to_owned());
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let answer = tokio::time::timeout(PROBE_TIMEOUT, open.send(&request)).await;
        let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        match answer {
            Ok(Ok(answer)) => {
                if answer.status == 200 {
                    seen.latencies_us.push(micros);
                } else {
                    seen.errors.status += 1;
                    seen.errors.note(format!(
                        "{ME_PATH} answered {} instead of 200",
                        answer.status
                    ));
                }
                if !answer.keep_alive {
                    seen.errors.closed_by_server += 1;
                    connection = None;
                }
            }
            Ok(Err(err)) => {
                seen.errors.io += 1;
                seen.errors.note(format!("probe: {err}"));
                connection = None;
            }
            Err(_) => {
                seen.errors.timeouts += 1;
                seen.errors
                    .note(format!("probe timed out after {PROBE_TIMEOUT:?}"));
                connection = None;
            }
        }
    }
    seen.latencies_us.sort_unstable();
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_token_is_found() {
        let body = br#"{"access_token":"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln-_","refresh_token":"r","token_type":"Bearer","expires_in":900}"#;
        assert_eq!(
            access_token(body).as_deref(),
            Some("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln-_")
        );
        assert_eq!(
            access_token(br#"{ "access_token" : "a.b.c" }"#).as_deref(),
            Some("a.b.c")
        );
        assert_eq!(access_token(br#"{"access_token":""}"#), None);
        assert_eq!(access_token(br#"{"access_token":"a b"}"#), None);
        assert_eq!(access_token(br#"{"refresh_token":"r"}"#), None);
    }

    #[test]
    fn the_server_gets_the_prod_parameters_and_no_lockout() {
        let env = server_env(hashrate::PROD, 1);
        let get = |key: &str| env.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("UNHIDRA_ARGON2_MEMORY_KIB"), Some("19456"));
        assert_eq!(get("UNHIDRA_ARGON2_ITERATIONS"), Some("2"));
        assert_eq!(get("UNHIDRA_ARGON2_PARALLELISM"), Some("1"));
        assert_eq!(get("UNHIDRA_HASH_WORKERS"), Some("1"));
        assert_eq!(get("UNHIDRA_LOCKOUT_THRESHOLD"), Some("0"));
        assert_eq!(get("UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE"), Some("0"));
        assert_eq!(permits(3), 3);
        assert!(permits(0) >= 1);
    }

    #[test]
    fn the_login_body_is_json_with_the_password() {
        assert_eq!(
            login_json(),
            r#"{"email":"bench@example.com","password":"maple orbit candle frost 42"}"#
        );
    }
}
