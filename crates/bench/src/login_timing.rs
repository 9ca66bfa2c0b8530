//! The login-timing scenario: with `hide_existing_accounts` on, whether an outsider can tell
//! from the time of the answer that an email has an account. Against a server that hashes with
//! the production Argon2id parameters, it times wrong-password logins for an unknown email, an
//! account with a current hash, imported accounts (legacy SHA-256, a cheaper and a costlier
//! Argon2id hash) and a locked account, and password-reset requests for an existing and an
//! unknown email, one of each in turn, so that drift affects every case alike.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::BoxError;
use crate::hashrate::{self, HashParams, PASSWORD};
use crate::http::{Connection, post_json_request};
use crate::server::{self, MachineTicks, Server};

/// Where logins go.
pub const LOGIN_PATH: &str = "/api/v1/auth/login";
/// Where reset requests go.
pub const RESET_PATH: &str = "/api/v1/auth/password-reset";
/// The wrong password every timed login sends.
pub const WRONG: &str = "not the password, timing only";
/// Consecutive failures that lock an account (the default); each account with a password
/// gets fewer wrong logins than this, so that only the locked case is locked.
pub const LOCKOUT_THRESHOLD: u32 = 10;
/// The first lock lasts a minute; the locked case moves to a freshly locked account before.
const RELOCK_AFTER: Duration = Duration::from_secs(50);
/// How long one request may take before the run fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds sent before the measured ones, not counted.
pub const WARMUP_ROUNDS: u32 = 3;

/// The cheaper imported Argon2id cost: the `argon2` crate's default before 0.5.
pub const CHEAPER: HashParams = HashParams {
    memory_kib: 4_096,
    iterations: 3,
    parallelism: 1,
};
/// The costlier imported Argon2id cost: OWASP's one-pass choice (m = 46 MiB, t = 1).
pub const COSTLIER: HashParams = HashParams {
    memory_kib: 47_104,
    iterations: 1,
    parallelism: 1,
};

/// One kind of request the scenario times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// A login for an email with no account.
    Unknown,
    /// A login for an account whose hash has the current parameters.
    Existing,
    /// A login for an imported account with a legacy salted SHA-256 hash.
    Legacy,
    /// A login for an imported account with a cheaper Argon2id hash.
    Cheaper,
    /// A login for an imported account with a costlier Argon2id hash.
    Costlier,
    /// A login for a locked account.
    Locked,
    /// A reset request for an existing account.
    ResetExisting,
    /// A reset request for an email with no account.
    ResetUnknown,
}

impl Case {
    /// Every case, in the order of the report.
    pub const ALL: [Self; 8] = [
        Self::Unknown,
        Self::Existing,
        Self::Legacy,
        Self::Cheaper,
        Self::Costlier,
        Self::Locked,
        Self::ResetExisting,
        Self::ResetUnknown,
    ];

    /// What the report calls it.
    pub fn label(self) -> String {
        match self {
            Self::Unknown => "login, unknown email".to_owned(),
            Self::Existing => "login, existing account, wrong password".to_owned(),
            Self::Legacy => "login, imported SHA-256 (legacy) account, wrong password".to_owned(),
            Self::Cheaper => format!(
                "login, imported cheaper Argon2id (m={}, t={}), wrong password",
                CHEAPER.memory_kib, CHEAPER.iterations
            ),
            Self::Costlier => format!(
                "login, imported costlier Argon2id (m={}, t={}), wrong password",
                COSTLIER.memory_kib, COSTLIER.iterations
            ),
            Self::Locked => "login, locked account, correct password".to_owned(),
            Self::ResetExisting => "reset request, existing account".to_owned(),
            Self::ResetUnknown => "reset request, unknown email".to_owned(),
        }
    }

    /// The case an outsider compares it with: the same request for an unknown email.
    pub fn baseline(self) -> Self {
        match self {
            Self::ResetExisting | Self::ResetUnknown => Self::ResetUnknown,
            _ => Self::Unknown,
        }
    }

    /// The status every answer must have: the same for every case of one baseline.
    fn expected_status(self) -> u16 {
        match self.baseline() {
            Self::ResetUnknown => 202,
            _ => 401,
        }
    }

    /// Imported accounts of this case needed for `logins` wrong logins (none for cases that
    /// need no account of their own).
    fn accounts_for(self, logins: u32) -> u32 {
        match self {
            Self::Existing | Self::Legacy | Self::Cheaper | Self::Costlier => {
                logins.div_ceil(LOCKOUT_THRESHOLD - 1)
            }
            _ => 0,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Measured rounds: one request of each case per round.
    pub samples: u32,
    /// The run stops after this long even if fewer rounds were measured.
    pub budget: Duration,
}

/// What one case measured.
#[derive(Debug, Clone)]
pub struct Timings {
    /// The case.
    pub case: Case,
    /// Latencies in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The server's Argon2id parameters.
    pub params: HashParams,
    /// One per case, in [`Case::ALL`] order.
    pub timings: Vec<Timings>,
    /// Measured rounds.
    pub rounds: u32,
    /// Whether the time budget ended the run before `samples` rounds.
    pub cut_short: bool,
    /// How long the measured rounds took.
    pub took: Duration,
    /// The whole machine's busy CPU over the measured rounds, in cores, and the share of it
    /// the server and this program did not use.
    pub machine_cores: Option<f64>,
    /// Busy CPU of processes other than the server and this program, in cores.
    pub other_cores: Option<f64>,
    /// Accounts locked for the locked case (one more each `RELOCK_AFTER`).
    pub locked_accounts: u32,
}

/// The environment the server runs with, on top of `APP_ENV=test UNHIDRA_LOG=warn`.
pub fn server_env(params: HashParams) -> Vec<(&'static str, String)> {
    vec![
        ("UNHIDRA_ARGON2_MEMORY_KIB", params.memory_kib.to_string()),
        ("UNHIDRA_ARGON2_ITERATIONS", params.iterations.to_string()),
        ("UNHIDRA_ARGON2_PARALLELISM", params.parallelism.to_string()),
        ("UNHIDRA_HIDE_EXISTING_ACCOUNTS", "true".to_owned()),
        ("UNHIDRA_LOCKOUT_THRESHOLD", LOCKOUT_THRESHOLD.to_string()),
        // Every request comes from 127.0.0.1: the address limits would refuse the run.
        ("UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE", "0".to_owned()),
        ("UNHIDRA_RATE_LIMIT_LOGIN_IP_PER_MINUTE", "0".to_owned()),
        ("UNHIDRA_RATE_LIMIT_RESET_PER_HOUR", "0".to_owned()),
    ]
}

/// An account of case `case`, number `n`.
fn email(case: Case, n: u32) -> String {
    let kind = match case {
        Case::Unknown | Case::ResetUnknown => "nobody",
        Case::Existing | Case::ResetExisting => "current",
        Case::Legacy => "legacy",
        Case::Cheaper => "cheaper",
        Case::Costlier => "costlier",
        Case::Locked => "locked",
    };
    format!("{kind}-{n}@example.com")
}

/// The import file: enough accounts of each case that none gets `LOCKOUT_THRESHOLD` wrong
/// logins, and `locked` accounts to lock.
fn import_lines(params: HashParams, logins: u32, locked: u32) -> Result<String, BoxError> {
    let current = hashrate::phc(params)?;
    let cheaper = hashrate::phc(CHEAPER)?;
    let costlier = hashrate::phc(COSTLIER)?;
    let salt = "NaCl";
    let legacy = sha256_hex(format!("{salt}{PASSWORD}").as_bytes());
    let mut lines = Vec::new();
    for case in Case::ALL {
        for n in 0..case.accounts_for(logins) {
            let email = email(case, n);
            let line = match case {
                Case::Legacy => serde_json::json!({
                    "email": email, "sha256": legacy, "salt": salt, "salt_position": "prefix",
                }),
                Case::Cheaper => serde_json::json!({ "email": email, "password_hash": cheaper }),
                Case::Costlier => serde_json::json!({ "email": email, "password_hash": costlier }),
                _ => serde_json::json!({ "email": email, "password_hash": current }),
            };
            lines.push(line.to_string());
        }
    }
    for n in 0..locked {
        let line = serde_json::json!({ "email": email(Case::Locked, n), "password_hash": current });
        lines.push(line.to_string());
    }
    Ok(lines.join("\n") + "\n")
}

/// SHA-256 of `bytes`, in lowercase hex (for the legacy account).
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn login_body(email: &str, password: &str) -> String {
    serde_json::json!({ "email": email, "password": password }).to_string()
}

/// Sends `request` on `connection` (reopened if the server closed it) and returns the status
/// and the time from writing the request to reading the whole answer.
async fn timed(
    addr: SocketAddr,
    connection: &mut Option<Connection>,
    request: &[u8],
) -> Result<(u16, Duration), BoxError> {
    let open = match connection {
        Some(open) => open,
        None => connection.insert(Connection::open(addr).await?),
    };
    let sent = Instant::now();
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, open.send(request))
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))??;
    let took = sent.elapsed();
    if !answer.keep_alive {
        *connection = None;
    }
    Ok((answer.status, took))
}

/// Locks account `n` of the locked case with `LOCKOUT_THRESHOLD` wrong logins (untimed).
async fn lock(
    addr: SocketAddr,
    connection: &mut Option<Connection>,
    n: u32,
) -> Result<(), BoxError> {
    let request = post_json_request(
        addr,
        LOGIN_PATH,
        &login_body(&email(Case::Locked, n), WRONG),
    );
    for _ in 0..LOCKOUT_THRESHOLD {
        let (status, _) = timed(addr, connection, &request).await?;
        if status != 401 {
            return Err(format!("locking: a wrong login answered {status}, not 401").into());
        }
    }
    Ok(())
}

/// Runs the scenario against a fresh server.
pub async fn run(binary: &Path, settings: Settings) -> Result<Outcome, BoxError> {
    let params = hashrate::PROD;
    let server = Server::start_with_env(binary, &server_env(params)).await?;
    let result = exercise(&server, params, settings).await;
    server.stop().await;
    result
}

async fn exercise(
    server: &Server,
    params: HashParams,
    settings: Settings,
) -> Result<Outcome, BoxError> {
    let addr = server.addr();
    let logins = settings.samples + WARMUP_ROUNDS;
    // One locked account per RELOCK_AFTER of the budget, and one to start with.
    let locked_pool = u32::try_from(settings.budget.as_secs() / RELOCK_AFTER.as_secs())
        .unwrap_or(u32::MAX)
        .saturating_add(2);
    let file = server::fresh_data_dir()?.join("import.jsonl");
    std::fs::write(&file, import_lines(params, logins, locked_pool)?)?;
    crate::note(&format!(
        "login-timing: importing accounts with `unhidra admin import-users` (server pid {})",
        server.pid()
    ));
    let imported = server
        .admin(&["import-users", &file.to_string_lossy()])
        .await;
    if let Some(dir) = file.parent() {
        server::remove_dir(dir);
    }
    imported?;

    let mut connection = None;
    let mut locked_n = 0;
    lock(addr, &mut connection, locked_n).await?;
    let mut locked_at = Instant::now();

    let mut used = [0u32; Case::ALL.len()];
    let mut timings: Vec<Timings> = Case::ALL
        .iter()
        .map(|&case| Timings {
            case,
            latencies_us: Vec::new(),
        })
        .collect();
    crate::note(&format!(
        "login-timing: {} + {WARMUP_ROUNDS} warm-up rounds of {} requests, at most {} s",
        settings.samples,
        Case::ALL.len(),
        settings.budget.as_secs()
    ));
    let started = Instant::now();
    let mut measured_from = None;
    let mut ticks_from: Option<(MachineTicks, Duration, Duration)> = None;
    let mut rounds = 0;
    let mut cut_short = false;
    for round in 0..logins {
        if round == WARMUP_ROUNDS {
            measured_from = Some(Instant::now());
            ticks_from = cpu_now(server.pid());
        }
        if started.elapsed() >= settings.budget {
            cut_short = true;
            break;
        }
        if locked_at.elapsed() >= RELOCK_AFTER {
            locked_n += 1;
            if locked_n >= locked_pool {
                cut_short = true;
                break;
            }
            lock(addr, &mut connection, locked_n).await?;
            locked_at = Instant::now();
        }
        // Each round starts at the next case, so that no case always follows the same one (a
        // reset for an existing account leaves work running after its answer).
        let offset = usize::try_from(round).unwrap_or(0) % Case::ALL.len();
        for i in 0..Case::ALL.len() {
            let index = (offset + i) % Case::ALL.len();
            let case = Case::ALL[index];
            let request = request_for(addr, case, used[index], locked_n);
            used[index] += 1;
            let (status, took) = timed(addr, &mut connection, &request).await?;
            if status != case.expected_status() {
                return Err(format!(
                    "{}: answered {status}, not {}",
                    case.label(),
                    case.expected_status()
                )
                .into());
            }
            if round >= WARMUP_ROUNDS {
                timings[index]
                    .latencies_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            }
        }
        if round >= WARMUP_ROUNDS {
            rounds += 1;
        }
    }
    let took = measured_from.map_or(Duration::ZERO, |from| from.elapsed());
    let (machine_cores, other_cores) = match (ticks_from, cpu_now(server.pid())) {
        (Some((t0, s0, c0)), Some((t1, s1, c1))) => match t0.cores_until(t1) {
            Some((busy, _steal)) => {
                let wall = took.as_secs_f64().max(1e-9);
                let ours = (s1.saturating_sub(s0) + c1.saturating_sub(c0)).as_secs_f64() / wall;
                (Some(busy), Some((busy - ours).max(0.0)))
            }
            None => (None, None),
        },
        _ => (None, None),
    };
    for t in &mut timings {
        t.latencies_us.sort_unstable();
    }
    crate::note(&format!(
        "login-timing: {rounds} rounds in {:.1} s",
        took.as_secs_f64()
    ));
    Ok(Outcome {
        params,
        timings,
        rounds,
        cut_short,
        took,
        machine_cores,
        other_cores,
        locked_accounts: locked_n + 1,
    })
}

/// The machine's CPU counters and the CPU time of the server and of this program, now.
fn cpu_now(server_pid: u32) -> Option<(MachineTicks, Duration, Duration)> {
    Some((
        server::machine_ticks()?,
        server::cpu_time(server_pid)?,
        server::cpu_time(std::process::id())?,
    ))
}

/// The `n`th request of `case`: each account of a case takes fewer wrong logins than lock it.
fn request_for(addr: SocketAddr, case: Case, n: u32, locked_n: u32) -> Vec<u8> {
    let account = n / (LOCKOUT_THRESHOLD - 1);
    let body = match case {
        Case::Unknown => login_body(&email(case, 0), WRONG),
        Case::Existing | Case::Legacy | Case::Cheaper | Case::Costlier => {
            login_body(&email(case, account), WRONG)
        }
        // The right password: a lock must not be told even to one who knows it.
        Case::Locked => login_body(&email(case, locked_n), PASSWORD),
        Case::ResetExisting => serde_json::json!({ "email": email(case, 0) }).to_string(),
        Case::ResetUnknown => serde_json::json!({ "email": email(case, 0) }).to_string(),
    };
    let path = match case.baseline() {
        Case::ResetUnknown => RESET_PATH,
        _ => LOGIN_PATH,
    };
    post_json_request(addr, path, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_account_with_a_password_reaches_the_lockout() {
        for n in 0..100 {
            let account = n / (LOCKOUT_THRESHOLD - 1);
            assert!(account < Case::Existing.accounts_for(100), "{n}");
        }
        assert_eq!(Case::Existing.accounts_for(9), 1);
        assert_eq!(Case::Existing.accounts_for(10), 2);
        assert_eq!(Case::Locked.accounts_for(10), 0);
    }

    #[test]
    fn the_import_file_holds_every_kind_of_account() {
        let lines = import_lines(
            HashParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            10,
            2,
        )
        .unwrap();
        let parsed: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // Two accounts each of current, legacy, cheaper, costlier; two locked.
        assert_eq!(parsed.len(), 10);
        let legacy = parsed
            .iter()
            .find(|l| l["email"] == "legacy-0@example.com")
            .unwrap();
        assert_eq!(
            legacy["sha256"],
            sha256_hex(format!("NaCl{PASSWORD}").as_bytes())
        );
        let costlier = parsed
            .iter()
            .find(|l| l["email"] == "costlier-1@example.com")
            .unwrap();
        assert!(
            costlier["password_hash"]
                .as_str()
                .unwrap()
                .starts_with("$argon2id$v=19$m=47104,t=1,p=1$")
        );
        assert!(lines.contains("locked-1@example.com"));
    }

    #[test]
    fn the_server_hides_accounts_and_limits_nothing_by_address() {
        let env = server_env(hashrate::PROD);
        let get = |key: &str| env.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("UNHIDRA_HIDE_EXISTING_ACCOUNTS"), Some("true"));
        assert_eq!(get("UNHIDRA_ARGON2_MEMORY_KIB"), Some("19456"));
        assert_eq!(get("UNHIDRA_RATE_LIMIT_LOGIN_IP_PER_MINUTE"), Some("0"));
        assert_eq!(get("UNHIDRA_LOCKOUT_THRESHOLD"), Some("10"));
    }
}
