//! The servers the fan-out scenario compares Unhidra with, started as child processes on free
//! ports of 127.0.0.1: nats-server with its WebSocket listener, and a Socket.IO server under
//! node (`bench/peers/socketio`, built into this program and installed with `npm ci` once).
//! Each is killed if dropped, and its temporary folder removed. The job scenario's peer,
//! graphile-worker (`bench/peers/graphile-worker`), is installed the same way.

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
