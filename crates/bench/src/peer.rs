//! The servers the fan-out scenario compares Unhidra with, started as child processes on free
//! ports of 127.0.0.1: nats-server with its WebSocket listener, and a Socket.IO server under
//! node (`bench/peers/socketio`, built into this program and installed with `npm ci` once).
//! Each is killed if dropped, and its temporary folder removed. The job scenario's peer,
//! graphile-worker (`bench/peers/graphile-worker`), is installed the same way. The firmware
//! download scenario's peer is nginx, serving files from its folder (installed from Debian's
//! package when it is missing and this program runs as root).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::BoxError;
use crate::server::{self, Memory};

/// How long a peer gets to listen on its port.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How often the port is tried while a peer starts.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long `npm ci` may take.
const NPM_WITHIN: Duration = Duration::from_secs(300);
/// How long `--version` may take.
const VERSION_WITHIN: Duration = Duration::from_secs(5);
/// How long `apt-get update` and `apt-get install` may take, each.
const APT_WITHIN: Duration = Duration::from_secs(300);
/// The user and group nginx runs as when this program is root: Debian's `nobody` and
/// `nogroup`.
const NOBODY: u32 = 65_534;
/// The end of a peer's log quoted when it fails to start.
const LOG_TAIL: usize = 600;

/// The Socket.IO peer's files, so that this program needs no checkout to run it.
const SOCKETIO_FILES: [(&str, &str); 3] = [
    (
        "package.json",
        include_str!("../../../bench/peers/socketio/package.json"),
    ),
    (
        "package-lock.json",
        include_str!("../../../bench/peers/socketio/package-lock.json"),
    ),
    (
        "server.js",
        include_str!("../../../bench/peers/socketio/server.js"),
    ),
];

/// The graphile-worker peer's files.
const GRAPHILE_WORKER_FILES: [(&str, &str); 3] = [
    (
        "package.json",
        include_str!("../../../bench/peers/graphile-worker/package.json"),
    ),
    (
        "package-lock.json",
        include_str!("../../../bench/peers/graphile-worker/package-lock.json"),
    ),
    (
        "node.js",
        include_str!("../../../bench/peers/graphile-worker/node.js"),
    ),
];

/// A running peer server.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    /// Its configuration and log; removed on drop.
    dir: PathBuf,
    /// What runs, with its version, for the report.
    program: String,
    /// Its worker processes, when the peer has any (nginx).
    workers: Vec<u32>,
}

impl Peer {
    /// nats-server (from `PATH` or `/usr/sbin`) with a WebSocket listener without TLS or
    /// compression, no authentication, and its client port on another free port.
    pub async fn nats() -> Result<Self, BoxError> {
        let binary = find_program("nats-server").ok_or(
            "nats-server is not installed (Debian: apt-get install nats-server)".to_owned(),
        )?;
        let version = version_of(&binary, "--version").await;
        let [client_port, ws_port] = server::free_ports::<2>()?;
        let dir = server::fresh_data_dir()?;
        let config = format!(
            "host: 127.0.0.1\nport: {client_port}\n\
             websocket {{\n  host: 127.0.0.1\n  port: {ws_port}\n  no_tls: true\n  compression: false\n}}\n"
        );
        let config_path = dir.join("nats.conf");
        if let Err(err) = std::fs::write(&config_path, config) {
            server::remove_dir(&dir);
            return Err(format!("cannot write {}: {err}", config_path.display()).into());
        }
        let mut command = Command::new(&binary);
        command.arg("-c").arg(&config_path);
        let addr = SocketAddr::from(([127, 0, 0, 1], ws_port));
        Self::spawn(command, dir, addr, version).await
    }

    /// `node server.js PORT` in a folder where `npm ci` has installed socket.io.
    pub async fn socketio() -> Result<Self, BoxError> {
        let node = find_program("node")
            .ok_or("node is not installed (Debian: apt-get install nodejs npm)".to_owned())?;
        let npm = find_program("npm")
            .ok_or("npm is not installed (Debian: apt-get install npm)".to_owned())?;
        let folder = npm_folder(&npm, "socketio", &SOCKETIO_FILES, "socket.io").await?;
        let version = version_of(&node, "--version").await;
        let socketio = installed_version(&folder, "socket.io");
        let [port] = server::free_ports::<1>()?;
        let dir = server::fresh_data_dir()?;
        let mut command = Command::new(&node);
        command
            .arg(folder.join("server.js"))
            .arg(port.to_string())
            .current_dir(&folder);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let program = format!("node {version}, socket.io {socketio}");
        Self::spawn(command, dir, addr, program).await
    }

    /// nginx serving `files` (each a path under its root, and its bytes) on a free port of
    /// 127.0.0.1, with its own configuration in a temporary folder: `workers` worker
    /// processes, room for `connections` keep-alive connections, sendfile on and no access
    /// log. Run as root, it runs as `nobody` (through `setpriv`), so that no part of it is
    /// privileged.
    pub async fn nginx(
        files: &[(&str, &[u8])],
        workers: usize,
        connections: u32,
    ) -> Result<Self, BoxError> {
        let binary = nginx_binary().await?;
        let version = stderr_version_of(&binary, "-v").await;
        let [port] = server::free_ports::<1>()?;
        let dir = server::fresh_data_dir()?;
        let command = match nginx_command(&binary, &dir, files, workers, connections, port) {
            Ok(command) => command,
            Err(err) => {
                server::remove_dir(&dir);
                return Err(err);
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut peer = Self::spawn(command, dir, addr, version).await?;
        match peer.wait_workers(workers).await {
            Ok(()) => Ok(peer),
            Err(err) => {
                peer.stop().await;
                Err(err)
            }
        }
    }

    /// Waits until the master has `count` children, and keeps their ids.
    async fn wait_workers(&mut self, count: usize) -> Result<(), BoxError> {
        let started = Instant::now();
        loop {
            self.workers = server::children_of(self.pid);
            if self.workers.len() >= count {
                return Ok(());
            }
            if started.elapsed() >= READY_WITHIN {
                return Err(format!(
                    "{} started {} of its {count} workers within {READY_WITHIN:?}",
                    self.program,
                    self.workers.len()
                )
                .into());
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Starts `command` with its output in `dir/log` and waits until `addr` takes connections.
    async fn spawn(
        mut command: Command,
        dir: PathBuf,
        addr: SocketAddr,
        program: String,
    ) -> Result<Self, BoxError> {
        let log_path = dir.join("log");
        let log = match std::fs::File::create(&log_path).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok(files) => files,
            Err(err) => {
                server::remove_dir(&dir);
                return Err(format!("cannot create {}: {err}", log_path.display()).into());
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .kill_on_drop(true);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                server::remove_dir(&dir);
                return Err(format!("cannot start {program}: {err}").into());
            }
        };
        let Some(pid) = child.id() else {
            server::remove_dir(&dir);
            return Err(format!("{program} exited as soon as it was started").into());
        };
        let mut peer = Self {
            child,
            pid,
            addr,
            dir,
            program,
            workers: Vec::new(),
        };
        match peer.wait_listening().await {
            Ok(()) => Ok(peer),
            Err(err) => {
                let log = tail(&std::fs::read_to_string(&log_path).unwrap_or_default());
                peer.stop().await;
                Err(format!("{err}; its log ends with: {log}").into())
            }
        }
    }

    async fn wait_listening(&mut self) -> Result<(), BoxError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(
                    format!("{} exited before it listened ({status})", self.program).into(),
                );
            }
            if let Ok(Ok(_)) = tokio::time::timeout(POLL_EVERY, TcpStream::connect(self.addr)).await
            {
                return Ok(());
            }
            if started.elapsed() >= READY_WITHIN {
                return Err(format!(
                    "{} did not listen on {} within {READY_WITHIN:?}",
                    self.program, self.addr
                )
                .into());
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Where its WebSocket listener is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id (node's own, not npm's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What runs, with its version.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Current and peak resident memory.
    pub fn memory(&self) -> Result<Memory, BoxError> {
        server::memory_of(self.pid)
    }

    /// Its process and its workers' (nginx's master and workers).
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.pid)
            .chain(self.workers.iter().copied())
            .collect()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(mut self) {
        server::terminate(&mut self.child, self.pid).await;
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        server::remove_dir(&self.dir);
    }
}

/// `name` in one of the `PATH` folders, or in `/usr/sbin` (where Debian puts nats-server,
/// outside many users' `PATH`).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// nginx from `PATH` or `/usr/sbin`; when it is missing and this program runs as root, Debian's
/// package is installed first (as `scripts/test` installs Chromium). The package's own service
/// is left alone.
async fn nginx_binary() -> Result<PathBuf, BoxError> {
    if let Some(binary) = find_program("nginx") {
        return Ok(binary);
    }
    if !is_root() {
        return Err("nginx is not installed (Debian: apt-get install nginx)".into());
    }
    crate::note("nginx is not installed: apt-get install -y nginx");
    apt_get(&["update", "-qq"]).await?;
    apt_get(&["install", "-y", "-qq", "nginx"]).await?;
    find_program("nginx").ok_or_else(|| "apt-get installed nginx, but it is not on PATH".into())
}

async fn apt_get(args: &[&str]) -> Result<(), BoxError> {
    let run = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(APT_WITHIN, run)
        .await
        .map_err(|_| format!("apt-get {} took longer than {APT_WITHIN:?}", args.join(" ")))?
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "apt-get {} failed ({}): {}",
            args.join(" "),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        )
        .into())
    }
}

/// Whether this process runs with user id 0 (from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            Some(uids.split_whitespace().nth(1)? == "0")
        })
        .unwrap_or(false)
}

/// Writes nginx's folder (`nginx.conf`, `www/` with `files`, `tmp/`) into `dir` and answers
/// the command that runs it in the foreground: `nginx -p DIR -c nginx.conf -e error.log
/// -g 'daemon off;'`, under `setpriv` as `nobody` when this program is root.
fn nginx_command(
    binary: &Path,
    dir: &Path,
    files: &[(&str, &[u8])],
    workers: usize,
    connections: u32,
    port: u16,
) -> Result<Command, BoxError> {
    let at = |e: std::io::Error, path: &Path| format!("cannot write {}: {e}", path.display());
    let www = dir.join("www");
    for (name, bytes) in files {
        let path = www.join(name.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| at(e, parent))?;
        }
        std::fs::write(&path, bytes).map_err(|e| at(e, &path))?;
    }
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| at(e, &tmp))?;
    let d = dir.display();
    // Debian's nginx.conf has sendfile and tcp_nopush on too; the access log is off so that
    // no disk write is timed, and keep-alive connections are never closed for their number of
    // requests (nginx's default closes one after 1000).
    let config = format!(
        "worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
    }}
}}
"
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config).map_err(|e| at(e, &conf))?;
    let mut command = if is_root() {
        let setpriv = find_program("setpriv")
            .ok_or("setpriv (Debian: util-linux) is needed to run nginx as nobody")?;
        chown_tree(dir, NOBODY)?;
        let mut command = Command::new(setpriv);
        command
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(binary);
        command
    } else {
        Command::new(binary)
    };
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-g")
        .arg("daemon off;");
    Ok(command)
}

/// Gives `dir` and everything in it to user and group `id`.
fn chown_tree(dir: &Path, id: u32) -> Result<(), BoxError> {
    std::os::unix::fs::chown(dir, Some(id), Some(id))
        .map_err(|e| format!("cannot chown {}: {e}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            chown_tree(&path, id)?;
        } else {
            std::os::unix::fs::chown(&path, Some(id), Some(id))
                .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// The first line `binary flag` prints on standard error (where `nginx -v` prints), or
/// "unknown version".
async fn stderr_version_of(binary: &Path, flag: &str) -> String {
    let run = Command::new(binary)
        .arg(flag)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_WITHIN, run).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .map_or_else(
                || "unknown version".to_owned(),
                |l| l.trim().trim_start_matches("nginx version: ").to_owned(),
            ),
        _ => "unknown version".to_owned(),
    }
}

/// The first line `binary flag` prints, or "unknown version".
async fn version_of(binary: &Path, flag: &str) -> String {
    let run = Command::new(binary)
        .arg(flag)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_WITHIN, run).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map_or_else(|| "unknown version".to_owned(), |l| l.trim().to_owned()),
        _ => "unknown version".to_owned(),
    }
}

/// The version in `folder/node_modules/<package>/package.json`.
fn installed_version(folder: &Path, package: &str) -> String {
    let path = folder
        .join("node_modules")
        .join(package)
        .join("package.json");
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|json| json.get("version")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown version".to_owned())
}

/// The folder a node peer runs in: `$CARGO_TARGET_DIR/bench-peers/<name>` (or one under the
/// temporary folder), with this program's copy of its `files`, and `node_modules` installed by
/// `npm ci` when `package` is missing or the lock file changed.
async fn npm_folder(
    npm: &Path,
    name: &str,
    files: &[(&str, &str)],
    package: &str,
) -> Result<PathBuf, BoxError> {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| std::env::temp_dir().join("unhidra-bench"), PathBuf::from);
    let folder = base.join("bench-peers").join(name);
    std::fs::create_dir_all(&folder)
        .map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    let mut changed = false;
    for (file, text) in files {
        let path = folder.join(file);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            changed |= file.starts_with("package");
        }
    }
    if changed || !folder.join("node_modules").join(package).is_dir() {
        crate::note(&format!(
            "npm ci in {} (once; later runs reuse it)",
            folder.display()
        ));
        npm_ci(npm, &folder).await?;
    }
    Ok(folder)
}

/// graphile-worker, ready to run: node, the folder holding `node.js` with graphile-worker
/// installed, and what runs, with its versions.
pub async fn graphile_worker() -> Result<(PathBuf, PathBuf, String), BoxError> {
    let node = find_program("node")
        .ok_or("node is not installed (Debian: apt-get install nodejs npm)".to_owned())?;
    let npm = find_program("npm")
        .ok_or("npm is not installed (Debian: apt-get install npm)".to_owned())?;
    let folder = npm_folder(
        &npm,
        "graphile-worker",
        &GRAPHILE_WORKER_FILES,
        "graphile-worker",
    )
    .await?;
    let program = format!(
        "node {}, graphile-worker {}, pg {}",
        version_of(&node, "--version").await,
        installed_version(&folder, "graphile-worker"),
        installed_version(&folder, "pg")
    );
    Ok((node, folder, program))
}

async fn npm_ci(npm: &Path, folder: &Path) -> Result<(), BoxError> {
    let run = Command::new(npm)
        .args(["ci", "--no-audit", "--no-fund"].map(OsStr::new))
        .current_dir(folder)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(NPM_WITHIN, run)
        .await
        .map_err(|_| format!("npm ci took longer than {NPM_WITHIN:?}"))?
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "npm ci failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        )
        .into())
    }
}

/// The last few hundred characters of `text`, on one line.
fn tail(text: &str) -> String {
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(LOG_TAIL)
        .map_or(0, |(at, _)| at);
    text[start..].replace('\n', " | ")
}
