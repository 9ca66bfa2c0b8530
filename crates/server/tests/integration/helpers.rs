//! Spawns a server on port 0 with a fresh database, and routes that misbehave on purpose.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use unhidra_config::{Config, HumanDuration, Profile};
use unhidra_core::{Clock, SystemClock};
use unhidra_server::error::{ApiError, FieldError};
use unhidra_server::http::extract::Json;
use unhidra_server::{AppState, Application};
use unhidra_store::Backend;
use unhidra_store::testing::TestDb;

/// A password the policy accepts, for test accounts.
pub const PASSWORD: &str = "maple orbit candle frost 42";

/// Logs an existing account with [`PASSWORD`] in; returns its access token.
pub async fn access_token(app: &TestApp, email: &str) -> String {
    let pair: serde_json::Value = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&serde_json::json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    pair["access_token"].as_str().unwrap().to_owned()
}

/// Registers an account and logs it in; returns its id and access token.
pub async fn user(app: &TestApp, email: &str) -> (String, String) {
    let registered = app
        .client
        .post(app.url("/api/v1/auth/register"))
        .json(&serde_json::json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201, "register {email}");
    let id = registered.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, access_token(app, email).await)
}

/// Creates a room as the owner of `token`; returns its id.
pub async fn create_room(app: &TestApp, token: &str, name: &str, visibility: &str) -> String {
    let room: serde_json::Value = app
        .client
        .post(app.url("/api/v1/rooms"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "name": name, "visibility": visibility }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    room["id"].as_str().unwrap().to_owned()
}

/// A running server and what a test needs to talk to it and stop it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _data_dir: tempfile::TempDir,
}

/// The test profile's defaults, on port 0 and a temp data folder.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config::defaults(Profile::Test);
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.data_dir = data_dir.to_owned();
    config.shutdown_grace = HumanDuration(Duration::from_secs(5));
    config
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "read by serde and by the handler's checks")]
struct Echo {
    name: String,
    count: u32,
}

/// Routes that exercise the middleware: a JSON body with a validation rule, a panic, a request
/// that never finishes, and one that finishes when the test says so.
pub fn test_routes(release: Option<oneshot::Receiver<()>>) -> Router<AppState> {
    let release = Arc::new(tokio::sync::Mutex::new(release));
    Router::new()
        .route(
            "/test/echo",
            post(|Json(echo): Json<Echo>| async move {
                if echo.name.is_empty() {
                    return Err(ApiError::validation(vec![FieldError::new(
                        "/name",
                        "required",
                        "name must not be empty",
                    )]));
                }
                Ok(axum::Json(
                    serde_json::json!({ "name": echo.name, "count": echo.count }),
                ))
            }),
        )
        .route(
            "/test/panic",
            get(|| async {
                if true {
                    panic!("boom: secret detail");
                }
                "unreachable"
            }),
        )
        .route("/test/hang", get(std::future::pending::<&'static str>))
        .route(
            "/test/slow",
            get(move || {
                let release = release.clone();
                async move {
                    let rx = release.lock().await.take();
                    if let Some(rx) = rx {
                        let _ = rx.await;
                    }
                    "finished"
                }
            }),
        )
}

/// The backend of tests that do not name one: `UNHIDRA_TEST_BACKEND` (`sqlite`, the default,
/// or `postgres`). `scripts/test` runs the suite once with each.
pub fn default_backend() -> Backend {
    match std::env::var("UNHIDRA_TEST_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        Ok("sqlite") | Err(_) => Backend::Sqlite,
        Ok(other) => panic!("UNHIDRA_TEST_BACKEND={other:?}: expected sqlite or postgres"),
    }
}

/// The admin that [`with_admin`] has a server create at start.
pub const ADMIN: &str = "root@example.com";
/// Its password.
pub const ADMIN_PASSWORD: &str = "velvet thunder quietly seven lamps";

/// Has the server create [`ADMIN`] at start.
pub fn with_admin(c: &mut Config) {
    c.admin_email = Some(ADMIN.to_owned());
    c.admin_password = Some(unhidra_config::Secret::new(ADMIN_PASSWORD));
}

impl TestApp {
    /// An access token of [`ADMIN`] (on a server started [`with_admin`]).
    pub async fn admin_token(&self) -> String {
        let pair: serde_json::Value = self
            .client
            .post(self.url("/api/v1/auth/login"))
            .json(&serde_json::json!({ "email": ADMIN, "password": ADMIN_PASSWORD }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pair["access_token"].as_str().unwrap().to_owned()
    }

    /// A server on the default backend with the test profile's defaults.
    pub async fn spawn() -> Self {
        Self::spawn_with(default_backend(), |_| {}, None).await
    }

    /// A server on `backend`, with the config changed by `tweak`; `release` ends `/test/slow`.
    pub async fn spawn_with(
        backend: Backend,
        tweak: impl FnOnce(&mut Config),
        release: Option<oneshot::Receiver<()>>,
    ) -> Self {
        let db = TestDb::new(backend).await;
        Self::spawn_on(db, tweak, release, Arc::new(SystemClock)).await
    }

    /// A server over an existing test database, with the given clock.
    pub async fn spawn_on(
        db: TestDb,
        tweak: impl FnOnce(&mut Config),
        release: Option<oneshot::Receiver<()>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = test_config(data_dir.path());
        tweak(&mut config);
        let app = Application::with_parts(config, db.store.clone(), clock, test_routes(release))
            .await
            .expect("server starts");
        let addr = app.local_addr();
        let state = app.state().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stop_rx.await;
        }));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            addr,
            client,
            db,
            state,
            stop: Some(stop_tx),
            task: Some(task),
            _data_dir: data_dir,
        }
    }

    /// A second server node over the same database (with a connection pool of its own), as in
    /// a deployment of several nodes; stopping it leaves the database to `self`.
    pub async fn spawn_beside(
        &self,
        tweak: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::spawn_on(self.db.another_handle().await, tweak, None, clock).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Asks the server to stop, and returns what serving returned.
    pub fn stop(&mut self) -> impl Future<Output = std::io::Result<()>> + use<> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("stopped once");
        async move { task.await.expect("server task") }
    }

    pub async fn shutdown(mut self) {
        self.stop().await.unwrap();
        self.db.drop_db().await;
    }

    /// The server's data folder.
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir.path()
    }

    /// Waits until the mail enqueued so far has been sent: the background work that enqueues
    /// it has ended, and no mail job is waiting or running (one retried later counts as sent
    /// or failed for this: its attempt has ended).
    pub async fn mail_sent(&self) {
        use unhidra_store::jobs::JobState;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            self.state.identity().mailer().drain().await;
            let stats = self.state.jobs().stats().await.unwrap();
            let waiting = stats.counts.iter().any(|c| {
                c.kind.starts_with("mail.") || c.kind == "identity.token_mail"
            } && matches!(c.state, JobState::Available | JobState::Running));
            if !waiting {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mail jobs still waiting: {:?}",
                stats.counts
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every message mailed so far (to the outbox), oldest first, once background sends are done.
    pub async fn mails(&self) -> Vec<Mailed> {
        self.mail_sent().await;
        let dir = self._data_dir.path().join("outbox");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| Mailed::parse(&std::fs::read_to_string(p).unwrap()))
            .collect()
    }

    /// Stops the server and hands back its database, for a restart over the same data.
    pub async fn stop_keeping_db(mut self) -> TestDb {
        self.stop().await.unwrap();
        self.db
    }
}

/// Reads a problem response, checking what every problem must have.
pub async fn problem(response: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "content type"
    );
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(
        body["type"],
        format!("urn:unhidra:problem:{code}"),
        "{body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["trace_id"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    body
}

/// A message read back from the outbox.
#[derive(Debug, Clone)]
pub struct Mailed {
    pub to: String,
    pub subject: String,
    pub body: String,
}

impl Mailed {
    /// Reads an RFC 5322 message: headers, a blank line, the body (quoted-printable decoded).
    pub fn parse(raw: &str) -> Self {
        let raw = raw.replace("\r\n", "\n");
        let (head, body) = raw
            .split_once("\n\n")
            .expect("headers end with a blank line");
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_default()
                .to_owned()
        };
        let body = if header("Content-Transfer-Encoding") == "quoted-printable" {
            quoted_printable(body)
        } else {
            body.to_owned()
        };
        Self {
            to: header("To"),
            subject: header("Subject"),
            body,
        }
    }

    /// The token the mail carries (after `Your code: `).
    pub fn code(&self) -> String {
        self.body
            .split("Your code: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no code in {:?}", self.body))
            .to_owned()
    }
}

fn quoted_printable(text: &str) -> String {
    let joined = text.replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// What a client can tell of an answer apart from its timing: the status, every header but
/// those that differ per request (`date`, `x-request-id`, `content-length`), and the body
/// without its `trace_id` and the fields named in `varying`.
#[derive(Debug, PartialEq, Eq)]
pub struct Shape {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

/// The [`Shape`] of `response`, leaving out the body fields `varying` (ids, times).
pub async fn shape(response: reqwest::Response, varying: &[&str]) -> Shape {
    let status = response.status().as_u16();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| !["date", "x-request-id", "content-length"].contains(&name.as_str()))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.to_str().unwrap_or("<binary>").to_owned(),
            )
        })
        .collect();
    headers.sort();
    let text = response.text().await.unwrap();
    let mut body = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    if let Some(object) = body.as_object_mut() {
        for field in varying.iter().chain(&["trace_id"]) {
            object.remove(*field);
        }
    }
    Shape {
        status,
        headers,
        body,
    }
}

/// Imports `lines` (one user each) through the identity service, as
/// `unhidra admin import-users` does.
pub async fn import_users(
    app: &TestApp,
    lines: &[serde_json::Value],
) -> unhidra_server::identity::import::ImportSummary {
    let text: Vec<String> = lines.iter().map(serde_json::Value::to_string).collect();
    app.state
        .identity()
        .import_users(
            &text.join("\n"),
            &unhidra_server::identity::RequestContext::default(),
        )
        .await
        .unwrap()
}
