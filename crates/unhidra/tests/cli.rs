//! The `unhidra` binary as a user runs it: exit codes, messages, logs, signals and backups.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use unhidra_store::Backend;
use unhidra_store::testing::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_unhidra");
/// Bounds every wait on the child, so that a broken server fails the test instead of hanging.
const WAIT: Duration = Duration::from_secs(30);

/// A command with a clean environment, run in `dir` so that no stray `unhidra.toml` is read.
fn unhidra(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_with_input(dir, args, env, "").await
}

async fn run_with_input(dir: &Path, args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = unhidra(dir, args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("command finishes")
        .expect("command runs");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `unhidra serve`, with its JSON log lines as they come.
struct Server {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<Value>,
    addr: String,
}

impl Server {
    async fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all_args = vec!["serve", "--bind", "127.0.0.1:0"];
        all_args.extend_from_slice(args);
        let mut env = env.to_vec();
        env.push(("APP_ENV", "test"));
        env.push(("UNHIDRA_LOG", "info"));
        let mut child = unhidra(dir, &all_args, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            lines,
            seen: Vec::new(),
            addr: String::new(),
        };
        let listening = server.wait_for("unhidra listening").await;
        server.addr = listening["address"].as_str().unwrap().to_owned();
        server
    }

    /// Reads log lines until one with this message; every line must be JSON.
    async fn wait_for(&mut self, message: &str) -> Value {
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no {message:?} in the log: {:?}", self.seen))
                .unwrap_or_else(|| panic!("log ended before {message:?}: {:?}", self.seen));
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            self.seen.push(value.clone());
            if value["message"] == message {
                return value;
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Kills the process with SIGKILL: no shutdown, no flush.
    fn kill(&mut self) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM, reads the log to its end and returns the exit code.
    async fn terminate(mut self) -> (i32, Vec<Value>) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let code = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap()
            .code()
            .unwrap_or(-1);
        while let Some(line) = self.lines.recv().await {
            self.seen
                .push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
        }
        (code, self.seen)
    }
}

/// A stored message's acknowledgement promises that it survives a crash: a client writes
/// messages over the WebSocket while the server is killed with SIGKILL; after a restart every
/// acknowledged message is in the history, exactly once.
async fn acknowledged_messages_survive_kill_9(backend: Backend) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let dir = tempfile::tempdir().unwrap();
    let db = match backend {
        Backend::Postgres => Some(TestDb::postgres().await),
        Backend::Sqlite => None,
    };
    let mut env = vec![("UNHIDRA_RATE_LIMIT_MESSAGES_PER_SEC", "0")];
    if let Some(db) = &db {
        env.push(("UNHIDRA_DATABASE_URL", db.url.as_str()));
    }
    let mut server = Server::start(dir.path(), &[], &env).await;
    let http = reqwest::Client::new();
    let password = "maple orbit candle frost 42";
    let account = serde_json::json!({ "email": "crash@example.com", "password": password });
    http.post(server.url("/api/v1/auth/register"))
        .json(&account)
        .send()
        .await
        .unwrap();
    let login: Value = http
        .post(server.url("/api/v1/auth/login"))
        .json(&account)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let room: Value = http
        .post(server.url("/api/v1/rooms"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "name": "crash", "visibility": "public" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let room = room["id"].as_str().unwrap().to_owned();

    let mut request = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("unhidra.v1.json, bearer.{token}").parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut sink, mut stream) = socket.split();
    // Writes as fast as the socket takes them, until the server is gone (at most 20,000).
    let writer = tokio::spawn({
        let room = room.clone();
        async move {
            for i in 0..20_000 {
                let frame = serde_json::json!({
                    "type": "send", "room": room, "body": format!("m{i}"), "client_msg_id": format!("c{i}"),
                });
                if sink.send(Message::text(frame.to_string())).await.is_err() {
                    break;
                }
            }
        }
    });
    // The acknowledged client_msg_id → stored id; the server is killed at the 300th.
    let mut acked = std::collections::BTreeMap::new();
    let mut killed = false;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, stream.next()).await {
        let Message::Text(text) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "ack" {
            acked.insert(
                frame["client_msg_id"].as_str().unwrap().to_owned(),
                frame["id"].as_i64().unwrap(),
            );
            if acked.len() == 300 && !killed {
                server.kill();
                killed = true;
            }
        }
    }
    assert!(killed, "the server was killed under load");
    writer.abort();

    let server = Server::start(dir.path(), &[], &env).await;
    let mut stored: Vec<(i64, String)> = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = http
            .get(server.url(&format!(
                "/api/v1/rooms/{room}/messages?after={after}&limit=200"
            )))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = page["items"].as_array().unwrap();
        if items.is_empty() {
            break;
        }
        for m in items {
            stored.push((
                m["id"].as_i64().unwrap(),
                m["body"].as_str().unwrap().to_owned(),
            ));
        }
        after = stored.last().unwrap().0;
    }
    let mut bodies: Vec<&str> = stored.iter().map(|(_, b)| b.as_str()).collect();
    bodies.sort_unstable();
    let before = bodies.len();
    bodies.dedup();
    assert_eq!(bodies.len(), before, "no message is stored twice");
    for (client_msg_id, id) in &acked {
        let body = format!("m{}", &client_msg_id[1..]);
        assert!(
            stored.contains(&(*id, body.clone())),
            "acknowledged {client_msg_id} (id {id}) is missing after the crash"
        );
    }
    assert!(acked.len() >= 300);
    server.terminate().await;
}

#[tokio::test]
async fn acknowledged_messages_survive_kill_9_on_sqlite() {
    acknowledged_messages_survive_kill_9(Backend::Sqlite).await;
}

#[tokio::test]
async fn acknowledged_messages_survive_kill_9_on_postgres() {
    acknowledged_messages_survive_kill_9(Backend::Postgres).await;
}

#[tokio::test]
async fn serve_logs_json_with_trace_ids_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]).await;
    let first = &server.seen[server.seen.len() - 1];
    assert_eq!(first["store"], "sqlite");
    assert_eq!(first["profile"], "test");
    assert!(
        dir.path().join("data/unhidra.db").is_file(),
        "default data folder"
    );

    let client = reqwest::Client::new();
    let ready = client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let missing = client
        .get(server.url("/no/such/page"))
        .header("x-request-id", "cli-trace-7")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let (code, lines) = server.terminate().await;
    assert_eq!(code, 0, "{lines:?}");
    let rejected = lines
        .iter()
        .find(|l| l["message"] == "request rejected")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(rejected["span"]["trace_id"], "cli-trace-7", "{rejected}");
    assert_eq!(rejected["code"], "not_found");
    assert_eq!(
        lines.last().unwrap()["message"],
        "unhidra stopped cleanly",
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| {
        l["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("shutdown requested")
    }));
}

#[tokio::test]
async fn spec_prints_config_features_and_build_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nsuper-secret-key\n").unwrap();
    let out = run(
        dir.path(),
        &["spec"],
        &[
            ("UNHIDRA_SIGNING_KEY_FILE", key.to_str().unwrap()),
            ("UNHIDRA_METRICS_TOKEN", "metrics-secret"),
            (
                "UNHIDRA_DATABASE_URL",
                "postgres://app:db-secret@127.0.0.1/unhidra",
            ),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    for secret in ["super-secret-key", "metrics-secret", "db-secret"] {
        assert!(
            !out.stdout.contains(secret),
            "{secret} leaked: {}",
            out.stdout
        );
    }
    let spec: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(spec["config"]["bind"], "127.0.0.1:8080");
    assert_eq!(spec["config"]["profile"], "dev");
    assert_eq!(spec["config"]["signing_key"], "[redacted]");
    assert_eq!(spec["store"]["backend"], "postgres");
    assert_eq!(spec["build"]["version"], env!("CARGO_PKG_VERSION"));
    for field in ["commit", "rustc", "target"] {
        assert!(
            spec["build"][field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}"
        );
    }
    assert!(
        spec["build"]["rustc"]
            .as_str()
            .unwrap()
            .starts_with("rustc ")
    );
    assert!(
        spec["features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "metrics")
    );
    let keys = spec["keys"].as_array().unwrap();
    assert!(
        keys.iter()
            .any(|k| k["name"] == "bind" && k["env"] == "UNHIDRA_BIND")
    );
}

#[tokio::test]
async fn a_bad_config_file_names_file_key_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("unhidra.toml"),
        "bind = \"127.0.0.1:9999\"\nbody_limt = 10\n",
    )
    .unwrap();
    let out = run(dir.path(), &["serve"], &[]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unhidra.toml"), "{}", out.stderr);
    assert!(out.stderr.contains("body_limt"), "{}", out.stderr);
    assert!(out.stderr.contains("line 2"), "{}", out.stderr);

    std::fs::write(dir.path().join("broken.toml"), "bind = [\n").unwrap();
    let out = run(dir.path(), &["--config", "broken.toml", "spec"], &[]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("broken.toml") && out.stderr.contains("line"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn prod_refuses_insecure_settings_with_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &["serve"],
        &[("APP_ENV", "prod"), ("UNHIDRA_ALLOWED_ORIGINS", "*")],
    )
    .await;
    assert_eq!(out.code, 2);
    for key in [
        "signing_key",
        "allowed_origins",
        "public_url",
        "metrics_token",
    ] {
        assert_eq!(
            out.stderr
                .lines()
                .filter(|l| l.trim_start().starts_with(key))
                .count(),
            1,
            "{key}: {}",
            out.stderr
        );
    }
    assert!(!dir.path().join("data").exists(), "nothing was written");

    let out = run(dir.path(), &["serve"], &[("UNHIDRA_BINDD", "x")]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("UNHIDRA_BINDD"), "{}", out.stderr);
}

#[tokio::test]
async fn flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &["spec", "--data-dir", "/srv/unhidra"],
        &[
            ("UNHIDRA_DATA_DIR", "/elsewhere"),
            ("UNHIDRA_BIND", "0.0.0.0:9000"),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let spec: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(spec["config"]["data_dir"], "/srv/unhidra");
    assert_eq!(spec["config"]["bind"], "0.0.0.0:9000");
}

#[tokio::test]
async fn a_backup_taken_while_serving_starts_a_new_server() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let server = Server::start(dir.path(), &["--data-dir", live.to_str().unwrap()], &[]).await;
    let instance = server.seen.last().unwrap()["instance_id"].clone();
    let copy = dir.path().join("restored");
    std::fs::create_dir(&copy).unwrap();
    let target = copy.join("unhidra.db");
    let out = run(
        dir.path(),
        &[
            "backup",
            target.to_str().unwrap(),
            "--data-dir",
            live.to_str().unwrap(),
        ],
        &[("APP_ENV", "test")],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(target.is_file());
    // Never overwrites.
    let again = run(
        dir.path(),
        &[
            "backup",
            target.to_str().unwrap(),
            "--data-dir",
            live.to_str().unwrap(),
        ],
        &[("APP_ENV", "test")],
    )
    .await;
    assert_eq!(again.code, 2, "{}", again.stderr);
    let (code, _) = server.terminate().await;
    assert_eq!(code, 0);

    let restored = Server::start(dir.path(), &["--data-dir", copy.to_str().unwrap()], &[]).await;
    assert_eq!(
        restored.seen.last().unwrap()["instance_id"],
        instance,
        "same installation"
    );
    let ready = reqwest::get(restored.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let (code, _) = restored.terminate().await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn migrate_and_serve_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::postgres().await;
    let env = [
        ("UNHIDRA_DATABASE_URL", db.url.as_str()),
        ("APP_ENV", "test"),
    ];
    let out = run(dir.path(), &["migrate"], &env).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(db.store.health().await.unwrap().is_migrated());

    let server = Server::start(dir.path(), &[], &env[..1]).await;
    assert_eq!(server.seen.last().unwrap()["store"], "postgres");
    let ready = reqwest::get(server.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let (code, _) = server.terminate().await;
    assert_eq!(code, 0);

    // Backups of PostgreSQL are pg_dump's job; the command says so and writes nothing.
    let target = dir.path().join("pg.db");
    let out = run(dir.path(), &["backup", target.to_str().unwrap()], &env).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("pg_dump"), "{}", out.stderr);
    assert!(!target.exists());
    db.drop_db().await;
}

#[tokio::test]
async fn openapi_prints_the_served_document() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["openapi"], &[]).await;
    assert_eq!(out.code, 0);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        doc == committed,
        "`unhidra openapi` differs from docs/openapi.json; see the server's snapshot test"
    );
}

async fn user_role(dir: &Path, email: &str) -> Option<String> {
    let url = format!("sqlite:{}", dir.join("data/unhidra.db").display());
    let store = unhidra_store::connect(&url, &unhidra_store::StoreOptions::default())
        .await
        .unwrap();
    let found = store
        .user_by_email(&unhidra_core::Email::parse(email).unwrap())
        .await
        .ok()
        .map(|u| u.role.as_str().to_owned());
    store.close().await;
    found
}

#[tokio::test]
async fn admin_create_reads_the_password_from_stdin_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("APP_ENV", "test")];
    let args = ["admin", "create", "--email", "Boss@Example.com"];
    let out = run_with_input(dir.path(), &args, &env, "maple orbit candle frost 42\n").await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !out.stderr.contains("maple orbit"),
        "the password is never logged"
    );
    assert_eq!(
        user_role(dir.path(), "boss@example.com").await.as_deref(),
        Some("admin")
    );

    let again = run_with_input(dir.path(), &args, &env, "another strong passphrase here\n").await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stderr.contains("exists"), "{}", again.stderr);

    let weak = run_with_input(
        dir.path(),
        &["admin", "create", "--email", "x@example.com"],
        &env,
        "password1\n",
    )
    .await;
    assert_eq!(weak.code, 2);
    assert!(
        weak.stderr.contains("too_short") && weak.stderr.contains("common_password"),
        "{}",
        weak.stderr
    );
    assert_eq!(user_role(dir.path(), "x@example.com").await, None);

    let empty = run_with_input(
        dir.path(),
        &["admin", "create", "--email", "y@example.com"],
        &env,
        "",
    )
    .await;
    assert_eq!(empty.code, 2, "{}", empty.stderr);
}

#[tokio::test]
async fn keys_rotate_list_and_retire() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("APP_ENV", "test")];
    let first = run(dir.path(), &["keys", "rotate"], &env).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = run(dir.path(), &["keys", "rotate"], &env).await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    let (old, new) = (
        first.stdout.trim().to_owned(),
        second.stdout.trim().to_owned(),
    );
    assert_ne!(old, new);
    let list = run(dir.path(), &["keys", "list"], &env).await;
    let kids: Vec<String> = list
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kid"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kids, [old.clone(), new.clone()]);

    let refused = run(dir.path(), &["keys", "retire", &new], &env).await;
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("rotate"), "{}", refused.stderr);
    let retired = run(dir.path(), &["keys", "retire", &old], &env).await;
    assert_eq!(retired.code, 0, "{}", retired.stderr);
    assert_eq!(
        run(dir.path(), &["keys", "retire", "no-such-kid"], &env)
            .await
            .code,
        2
    );
    let list = run(dir.path(), &["keys", "list"], &env).await;
    let retired: Value = serde_json::from_str(list.stdout.lines().next().unwrap()).unwrap();
    assert!(retired["retired_at"].is_string(), "{retired}");

    // With a key in the configuration, rotation is the operator's: the command says how.
    let key = dir.path().join("k.pem");
    std::fs::write(&key, "unused").unwrap();
    let out = run(
        dir.path(),
        &["keys", "rotate"],
        &[
            ("APP_ENV", "test"),
            ("UNHIDRA_SIGNING_KEY_FILE", key.to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("openssl genpkey"), "{}", out.stderr);
}

fn sha256_hex(text: &str) -> String {
    unhidra_core::secret::hash_hex(text.as_bytes())
}

async fn stored_hash(dir: &Path, email: &str) -> String {
    let url = format!("sqlite:{}", dir.join("data/unhidra.db").display());
    let store = unhidra_store::connect(&url, &unhidra_store::StoreOptions::default())
        .await
        .unwrap();
    let hash = store
        .user_by_email(&unhidra_core::Email::parse(email).unwrap())
        .await
        .unwrap()
        .password_hash;
    store.close().await;
    hash
}

#[tokio::test]
async fn imported_legacy_hashes_log_in_and_are_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.jsonl");
    let lines = [
        serde_json::json!({ "email": "plain@example.com", "sha256": sha256_hex("old plain pw") }),
        serde_json::json!({ "email": "Salty@example.com", "sha256": sha256_hex("NaClold salty pw"), "salt": "NaCl", "display_name": "Salty" }),
        serde_json::json!({ "email": "suffix@example.com", "sha256": sha256_hex("old suffix pwpepper"), "salt": "pepper", "salt_position": "suffix", "role": "admin" }),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let env = [("APP_ENV", "test")];
    let out = run(
        dir.path(),
        &["admin", "import-users", file.to_str().unwrap()],
        &env,
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        stored_hash(dir.path(), "plain@example.com")
            .await
            .starts_with("$sha256$")
    );
    // Importing again skips what exists.
    let again = run(
        dir.path(),
        &["admin", "import-users", file.to_str().unwrap()],
        &env,
    )
    .await;
    assert_eq!(again.code, 0);
    assert!(again.stderr.contains("skipped"), "{}", again.stderr);

    let server = Server::start(dir.path(), &[], &[]).await;
    let client = reqwest::Client::new();
    for (email, password) in [
        ("plain@example.com", "old plain pw"),
        ("salty@example.com", "old salty pw"),
        ("suffix@example.com", "old suffix pw"),
    ] {
        let wrong = client
            .post(server.url("/api/v1/auth/login"))
            .json(&serde_json::json!({ "email": email, "password": "nope" }))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{email}");
        let right = client
            .post(server.url("/api/v1/auth/login"))
            .json(&serde_json::json!({ "email": email, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), 200, "{email}: old passwords work, no reset");
    }
    let (code, _) = server.terminate().await;
    assert_eq!(code, 0);
    for email in [
        "plain@example.com",
        "salty@example.com",
        "suffix@example.com",
    ] {
        let hash = stored_hash(dir.path(), email).await;
        assert!(hash.starts_with("$argon2id$"), "{email} upgraded: {hash}");
    }
}

#[tokio::test]
async fn a_bad_import_file_imports_nothing_and_names_each_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.jsonl");
    let good = serde_json::json!({ "email": "good@example.com", "sha256": sha256_hex("x") });
    let text = format!(
        "{good}\n{{\"email\": \"not-an-email\", \"sha256\": \"{}\"}}\n\n{{\"email\": \"b@example.com\", \"sha256\": \"xyz\"}}\nnot json\n{{\"email\": \"c@example.com\", \"bcrypt\": \"$2b$...\"}}\n{good}\n",
        sha256_hex("y")
    );
    std::fs::write(&file, text).unwrap();
    let out = run(
        dir.path(),
        &["admin", "import-users", file.to_str().unwrap()],
        &[("APP_ENV", "test")],
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    for line in [
        "line 2: email",
        "line 4: sha256",
        "line 5:",
        "line 6:",
        "line 7: good@example.com appears twice",
    ] {
        assert!(out.stderr.contains(line), "{line} missing: {}", out.stderr);
    }
    assert!(!out.stderr.contains("line 1:"), "{}", out.stderr);
    assert_eq!(
        user_role(dir.path(), "good@example.com").await,
        None,
        "nothing imported"
    );
}

/// Failures at run time exit with 1 and say why: a port already taken, a store that cannot be
/// reached.
#[tokio::test]
async fn a_taken_port_or_an_unreachable_store_exits_with_1() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[], &[]).await;
    let other = tempfile::tempdir().unwrap();
    let out = run(
        other.path(),
        &["serve", "--bind", &first.addr],
        &[("APP_ENV", "test")],
    )
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    first.terminate().await;

    // Nothing listens on port 1.
    let out = run(
        other.path(),
        &["serve", "--bind", "127.0.0.1:0"],
        &[
            ("APP_ENV", "test"),
            (
                "UNHIDRA_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/test",
            ),
        ],
    )
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
}

/// Enqueues a job straight into the SQLite store of `dir`, scheduled a day from now.
async fn stored_job(dir: &Path, kind: &str) -> String {
    let url = format!("sqlite:{}", dir.join("data/unhidra.db").display());
    let store = unhidra_store::connect(&url, &unhidra_store::StoreOptions::default())
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let job = unhidra_store::jobs::NewJob {
        id: uuid::Uuid::now_v7(),
        kind: kind.to_owned(),
        queue: "default".to_owned(),
        payload: "{}".to_owned(),
        priority: 0,
        run_at: now + chrono::Duration::days(1),
        max_attempts: 3,
        timeout_ms: 60_000,
        unique_key: None,
        unique_states: unhidra_store::jobs::UniqueStates::DEFAULT,
        concurrency_key: None,
        concurrency_limit: 0,
        trace_id: None,
        created_at: now,
    };
    store.enqueue_job(&job).await.unwrap();
    store.close().await;
    job.id.to_string()
}

#[tokio::test]
async fn jobs_list_retry_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("APP_ENV", "test")];
    assert_eq!(run(dir.path(), &["migrate"], &env).await.code, 0);
    let first = stored_job(dir.path(), "rooms.retention").await;
    let second = stored_job(dir.path(), "mail.send").await;
    let lines = |out: &Output| -> Vec<Value> {
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    let all = run(dir.path(), &["jobs", "list"], &env).await;
    assert_eq!(all.code, 0, "{}", all.stderr);
    let listed = lines(&all);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["id"], second, "newest first");
    assert!(
        listed
            .iter()
            .all(|j| j["state"] == "scheduled" && j.get("payload").is_none())
    );
    let of_kind = run(
        dir.path(),
        &["jobs", "list", "--kind", "rooms.retention"],
        &env,
    )
    .await;
    assert_eq!(lines(&of_kind).len(), 1);
    assert_eq!(lines(&of_kind)[0]["id"], first);

    let cancelled = run(dir.path(), &["jobs", "cancel", &first], &env).await;
    assert_eq!(cancelled.code, 0, "{}", cancelled.stderr);
    assert_eq!(lines(&cancelled)[0]["state"], "cancelled");
    let by_state = run(dir.path(), &["jobs", "list", "--state", "cancelled"], &env).await;
    assert_eq!(lines(&by_state).len(), 1);
    assert_eq!(lines(&by_state)[0]["id"], first);

    let retried = run(dir.path(), &["jobs", "retry", &first], &env).await;
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    assert_eq!(lines(&retried)[0]["state"], "available");
    // A job that waits already is not retried: exit 2, and its state said.
    let again = run(dir.path(), &["jobs", "retry", &first], &env).await;
    assert_eq!(again.code, 2);
    assert!(again.stderr.contains("available"), "{}", again.stderr);

    for (args, says) in [
        (&["jobs", "list", "--state", "dead"][..], "state"),
        (&["jobs", "list", "--kind", "a b"][..], "kind"),
        (&["jobs", "cancel", "not-an-id"][..], "id"),
        (
            &["jobs", "retry", "0190a0b0-0000-7000-8000-000000000000"][..],
            "no such job",
        ),
    ] {
        let out = run(dir.path(), args, &env).await;
        assert_eq!(out.code, 2, "{args:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn device_simulate_checks_its_arguments_before_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "not-a-key\n").unwrap();
    let keys = keys.to_str().unwrap();
    let out = run(
        dir.path(),
        &[
            "device",
            "simulate",
            "--server",
            "ftp://x",
            "--key-file",
            keys,
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--server"), "{}", out.stderr);
    let args = [
        "device",
        "simulate",
        "--server",
        "http://127.0.0.1:9",
        "--key-file",
        keys,
        "--seconds",
        "1",
    ];
    let out = run(dir.path(), &args, &[]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("entry 1 is not a device key"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn firmware_is_signed_off_the_server_with_facts_read_from_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let made = run(
        dir.path(),
        &["firmware", "keygen", "--out", &path("release")],
        &[],
    )
    .await;
    assert_eq!(made.code, 0, "{}", made.stderr);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path("release.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is the owner's alone");
    }
    // A second keygen never overwrites a key.
    let again = run(
        dir.path(),
        &["firmware", "keygen", "--out", &path("release")],
        &[],
    )
    .await;
    assert_ne!(again.code, 0);

    let image = unhidra_ota::image::build_test_image(0x0009, "3.0.1", "greenhouse", 2, true);
    std::fs::write(path("app.bin"), &image).unwrap();
    let signed = run(
        dir.path(),
        &[
            "firmware",
            "sign",
            "--key",
            &path("release.pem"),
            &path("app.bin"),
        ],
        &[],
    )
    .await;
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let manifest: unhidra_ota::SignedManifest =
        serde_json::from_str(&std::fs::read_to_string(path("app.bin.manifest.json")).unwrap())
            .unwrap();
    let trusted = unhidra_ota::TrustedKeys::from_pem(
        &std::fs::read_to_string(path("release.pub.pem")).unwrap(),
    )
    .unwrap();
    let facts = trusted.verify(&manifest).unwrap();
    assert_eq!(
        (
            facts.version.as_str(),
            facts.project.as_str(),
            facts.target.as_str()
        ),
        ("3.0.1", "greenhouse", "esp32s3")
    );
    assert_eq!((facts.secure_version, facts.size), (2, image.len() as u64));
    assert!(
        !std::fs::read_to_string(path("app.bin.manifest.json"))
            .unwrap()
            .contains("PRIVATE")
    );

    // A version that is not the image's, a file that is not an ESP32 image, a generic image
    // without its facts: refused, and no manifest written.
    let wrong = run(
        dir.path(),
        &[
            "firmware",
            "sign",
            "--key",
            &path("release.pem"),
            "--version",
            "3.0.2",
            "--out",
            &path("x.json"),
            &path("app.bin"),
        ],
        &[],
    )
    .await;
    assert_ne!(wrong.code, 0);
    assert!(wrong.stderr.contains("3.0.1"), "{}", wrong.stderr);
    std::fs::write(path("blob.bin"), b"not an image at all").unwrap();
    let blob = run(
        dir.path(),
        &[
            "firmware",
            "sign",
            "--key",
            &path("release.pem"),
            &path("blob.bin"),
        ],
        &[],
    )
    .await;
    assert_ne!(blob.code, 0);
    assert!(blob.stderr.contains("--generic"), "{}", blob.stderr);
    let bare = run(
        dir.path(),
        &[
            "firmware",
            "sign",
            "--key",
            &path("release.pem"),
            "--generic",
            &path("blob.bin"),
        ],
        &[],
    )
    .await;
    assert_ne!(bare.code, 0);
    assert!(
        !Path::new(&path("x.json")).exists()
            && !Path::new(&path("blob.bin.manifest.json")).exists()
    );
    let generic = run(
        dir.path(),
        &[
            "firmware",
            "sign",
            "--key",
            &path("release.pem"),
            "--generic",
            "--version",
            "1.0",
            "--project",
            "gateway",
            "--target",
            "rp2040",
            &path("blob.bin"),
        ],
        &[],
    )
    .await;
    assert_eq!(generic.code, 0, "{}", generic.stderr);
}
