//! `unhidra-bench ota`: many devices downloading one firmware image at once, from Unhidra's
//! `GET /api/v1/firmware/{sha256}/image` and from nginx serving the same bytes from a file, in
//! the same run with the same client ([`crate::ota_client`]).
//!
//! - **Setup.** The release server starts with a fresh data folder, an admin, and
//!   `ota_trusted_keys` holding a key made for the run. The bench builds a valid ESP32 image of
//!   the size asked for, signs its manifest as `unhidra firmware sign` does, uploads it,
//!   registers one device per simulated device, and gets each a signed link from
//!   `POST /api/v1/firmware/{sha256}/links` (what ESP-IDF's `esp_https_ota` fetches) and its key
//!   (what the SDK sends as `Bearer`). nginx gets a folder of its own with the image in it.
//! - **A pass** is one target and one mode: every device opens its keep-alive connection, they
//!   all wait for each other, and then each downloads the whole image, either in `range`-byte
//!   ranges one after the other or with one GET. The clock runs from the start to the last
//!   device's last byte. While it runs, the server's RSS is read every 20 ms.
//! - **Check.** After the clock stops, every device's copy must have the image's SHA-256 (each
//!   copy is overwritten before every pass, so a stale copy cannot pass).
//! - **Rounds.** Each round runs every target's passes, one in ranges and then `whole_passes`
//!   whole (a whole pass lasts a fraction of a second); the order of the targets is reversed
//!   every other round, so that a drift of the machine weighs on both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clap::ValueEnum;
use sha2::{Digest, Sha256};
use tokio::sync::{Barrier, oneshot};
use tokio::time::Instant;
use unhidra_ota::manifest::{self, Manifest};

use crate::BoxError;
use crate::http::{Connection, call, post_json_request, post_request};
use crate::ota_client::{Device, Want, write_request};
use crate::peer::Peer;
use crate::server::{self, Memory, Server};

/// Unhidra's aggregate throughput ÷ nginx's must be at least this.
pub const THROUGHPUT_RATIO_TARGET: f64 = 0.8;
/// RSS counts as flat while its peak during the downloads is at most this many KiB per
/// device above the idle server's: the server reads an image in pieces of at most 64 KiB, so
/// that is one piece per download in flight, and no download holds its image.
pub const FLAT_KIB_PER_DEVICE: u64 = 64;
/// …and at least this many KiB, for the allocator's noise when there are few devices.
pub const FLAT_FLOOR_KIB: u64 = 4096;

/// The most the peak RSS may rise above the idle server's for `devices` downloads at once,
/// in KiB, with RSS still flat.
pub fn flat_allowance_kib(devices: u32) -> u64 {
    (FLAT_KIB_PER_DEVICE * u64::from(devices)).max(FLAT_FLOOR_KIB)
}
/// The most memory the devices' copies of the image may take together.
pub const MAX_COPIES_BYTES: u64 = 4 << 30;
/// The ESP32 chip the image is built for (esp32s3), and its manifest's target.
const CHIP_ID: u16 = 0x0009;
const CHIP: &str = "esp32s3";
const PROJECT: &str = "bench-ota";
const VERSION: &str = "1.0.0";
const ADMIN_EMAIL: &str = "ota-bench@example.com";
const ADMIN_PASSWORD: &str = "quartz-lantern-otter-1957-bench";
/// How long one setup request, one connect or one download request may take.
const REQUEST_WITHIN: Duration = Duration::from_secs(10);
/// How often the server's RSS is read during a pass.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// The byte every copy is overwritten with before a pass.
const POISON: u8 = 0x5A;

/// Where the devices download from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Unhidra, with each device's signed link (`?device=&expires=&sig=`), as `esp_https_ota`.
    Unhidra,
    /// Unhidra, with each device's key as `Authorization: Bearer`, as the SDK.
    UnhidraKey,
    /// nginx serving the same bytes from a file.
    Nginx,
}

impl Target {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unhidra => "Unhidra, signed links",
            Self::UnhidraKey => "Unhidra, device keys",
            Self::Nginx => "nginx",
        }
    }

    fn is_unhidra(self) -> bool {
        matches!(self, Self::Unhidra | Self::UnhidraKey)
    }
}

/// How a device downloads the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In ranges of `range` bytes, one after the other (`partial_http_download`).
    Ranges,
    /// With one GET.
    Whole,
}

impl Mode {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ranges => "ranges",
            Self::Whole => "whole",
        }
    }
}

/// What the scenario is asked to do.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Simulated devices, each with one connection.
    pub devices: u32,
    /// The image's size in bytes.
    pub image_bytes: u64,
    /// The bytes of one range request.
    pub range: u64,
    /// Rounds of passes.
    pub rounds: u32,
    /// Whole-image passes per target and round (one takes a fraction of a second, so several
    /// are timed).
    pub whole_passes: u32,
    /// The longest one pass may take.
    pub pass_within: Duration,
    /// What to measure.
    pub targets: Vec<Target>,
    /// The devices' sockets acknowledge every segment at once (TCP_QUICKACK): a diagnostic
    /// that takes the receiver's delayed ACKs out of the figures.
    pub client_quickack: bool,
}

impl Settings {
    /// Requests one device makes to download the image in ranges.
    pub fn ranges_per_image(&self) -> u64 {
        self.image_bytes.div_ceil(self.range)
    }
}

/// CPU used during a pass, in cores (1.0 = one CPU all along).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// By the server's processes.
    pub server: f64,
    /// By the bench (the devices, mostly).
    pub bench: f64,
    /// By the whole machine (steal excluded).
    pub machine: Option<f64>,
    /// Taken by the hypervisor.
    pub steal: Option<f64>,
}

impl Cpu {
    /// What neither the server nor the bench used.
    pub fn others(&self) -> Option<f64> {
        self.machine
            .map(|m| (m - self.server - self.bench).max(0.0))
    }
}

/// One pass: a target, a mode, every device once.
#[derive(Debug, Clone)]
pub struct Pass {
    /// Its round, from 1.
    pub round: u32,
    /// Where the devices downloaded from.
    pub target: Target,
    /// How.
    pub mode: Mode,
    /// From the start to the last device's last byte.
    pub seconds: f64,
    /// Body bytes received.
    pub bytes: u64,
    /// Requests answered as asked.
    pub requests: u64,
    /// Their latencies, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Devices whose copy had the image's SHA-256 afterwards.
    pub verified: u32,
    /// Devices that failed (a refused connect, a wrong answer, a timeout).
    pub failed: u32,
    /// The first failure.
    pub first_error: Option<String>,
    /// Connections the server closed that had to be opened again.
    pub reconnects: u64,
    /// CPU during the pass.
    pub cpu: Cpu,
    /// The largest RSS read during the pass, in KiB.
    pub peak_rss_kib: u64,
    /// The most threads the server's processes had together when RSS was read.
    pub peak_threads: u64,
    /// Delayed ACKs the machine's kernel sent during the pass (every connection of the
    /// machine counts, but the devices' are nearly all there are).
    pub delayed_acks: Option<u64>,
}

impl Pass {
    /// Aggregate body throughput, MiB/s.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.seconds.max(1e-9)
    }

    /// Requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    /// Whether every device finished and its copy was right.
    pub fn clean(&self, devices: u32) -> bool {
        self.failed == 0 && self.verified == devices
    }
}

/// What a server's memory did over the run.
#[derive(Debug, Clone)]
pub struct ServerRun {
    /// "Unhidra" or "nginx".
    pub name: &'static str,
    /// What ran, with its version.
    pub program: String,
    /// Its processes (nginx: the master and its workers).
    pub processes: usize,
    /// Idle, after setup, before the first download.
    pub before: Memory,
    /// The largest RSS read during its passes, in KiB.
    pub peak_kib: u64,
    /// Idle again, a second after the last pass.
    pub after: Memory,
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The image's SHA-256, hex.
    pub sha256: String,
    /// The servers, Unhidra first.
    pub servers: Vec<ServerRun>,
    /// Every pass, in the order they ran.
    pub passes: Vec<Pass>,
    /// Targets that could not be measured, and why.
    pub skipped: Vec<(Target, String)>,
    /// Seconds the Unhidra setup took (upload, devices, links).
    pub setup_seconds: Option<f64>,
    /// Worker threads of the bench's runtime, and nginx's worker processes.
    pub workers: usize,
}

/// How a device reaches the image on a server.
#[derive(Debug, Clone)]
struct Access {
    /// The path and query.
    path: String,
    /// A device key to send as `Bearer`.
    bearer: Option<String>,
}

/// A server under test, killed if dropped.
#[derive(Debug)]
enum Running {
    Unhidra(Server),
    Nginx(Peer),
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Unhidra(s) => vec![s.pid()],
            Self::Nginx(p) => p.pids(),
        }
    }

    async fn stop(self) {
        match self {
            Self::Unhidra(s) => {
                s.stop().await;
            }
            Self::Nginx(p) => p.stop().await,
        }
    }
}

/// A target ready to be downloaded from: its server's address and processes, and each
/// device's way in.
#[derive(Debug, Clone)]
struct Ready {
    target: Target,
    addr: SocketAddr,
    pids: Vec<u32>,
    accesses: Arc<[Access]>,
}

/// Builds a valid ESP32 app image of exactly `bytes` bytes if it can (the layout pads to 16
/// bytes), else the largest below.
pub fn build_image(bytes: u64) -> Vec<u8> {
    let build = |code: u32| {
        unhidra_ota::image::build_test_image_of(CHIP_ID, VERSION, PROJECT, 1, true, code)
    };
    let overhead = build(0).len() as u64;
    let base = u32::try_from(bytes.saturating_sub(overhead)).unwrap_or(u32::MAX);
    let mut best = build(0);
    for back in 0..32 {
        let image = build(base.saturating_sub(back));
        if image.len() as u64 == bytes {
            return image;
        }
        if image.len() as u64 <= bytes && image.len() > best.len() {
            best = image;
        }
    }
    best
}

/// Runs the scenario.
pub async fn run(
    server_bin: Option<&std::path::Path>,
    settings: &Settings,
) -> Result<Outcome, BoxError> {
    let image = build_image(settings.image_bytes);
    if image.len() as u64 != settings.image_bytes {
        return Err(format!(
            "no ESP32 image of exactly {} bytes could be built (the nearest has {})",
            settings.image_bytes,
            image.len()
        )
        .into());
    }
    let digest: [u8; 32] = Sha256::digest(&image).into();
    let sha256: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    crate::note(&format!(
        "ota: {} devices, a {}-byte image ({sha256}), {}-byte ranges",
        settings.devices,
        image.len(),
        settings.range
    ));
    let mut running: Vec<(&'static str, String, Running)> = Vec::new();
    let mut ready: Vec<Ready> = Vec::new();
    let mut skipped = Vec::new();
    let mut setup_seconds = None;
    let result = async {
        if settings.targets.iter().any(|t| t.is_unhidra()) {
            let binary = server_bin.ok_or("no unhidra binary to measure")?;
            let began = Instant::now();
            let (server, links, keys) =
                start_unhidra(binary, &image, &sha256, settings.devices).await?;
            setup_seconds = Some(began.elapsed().as_secs_f64());
            let (addr, pids) = (server.addr(), vec![server.pid()]);
            running.push((
                "Unhidra",
                format!("`{}`", binary.display()),
                Running::Unhidra(server),
            ));
            for (target, accesses) in [(Target::Unhidra, links), (Target::UnhidraKey, keys)] {
                if settings.targets.contains(&target) {
                    ready.push(Ready {
                        target,
                        addr,
                        pids: pids.clone(),
                        accesses: accesses.into(),
                    });
                }
            }
        }
        if settings.targets.contains(&Target::Nginx) {
            let name = format!("firmware/{sha256}.bin");
            match Peer::nginx(&[(&name, &image)], workers, settings.devices + 64).await {
                Ok(peer) => {
                    let access = Access {
                        path: format!("/{name}"),
                        bearer: None,
                    };
                    let accesses: Arc<[Access]> =
                        (0..settings.devices).map(|_| access.clone()).collect();
                    ready.push(Ready {
                        target: Target::Nginx,
                        addr: peer.addr(),
                        pids: peer.pids(),
                        accesses,
                    });
                    let program = peer.program().to_owned();
                    running.push(("nginx", program, Running::Nginx(peer)));
                }
                Err(err) => {
                    crate::note(&format!("ota: nginx skipped: {err}"));
                    skipped.push((Target::Nginx, err.to_string()));
                }
            }
        }
        tokio::time::sleep(crate::SETTLE).await;
        let mut before = Vec::new();
        for (_, _, server) in &running {
            before.push(server::memory_of_all(&server.pids())?);
        }
        let passes = rounds(&ready, &image, digest, settings).await?;
        tokio::time::sleep(crate::SETTLE).await;
        let mut servers = Vec::new();
        for ((name, program, server), before) in running.iter().zip(before) {
            let pids = server.pids();
            let peak_kib = passes
                .iter()
                .filter(|p| ready.iter().any(|r| r.target == p.target && r.pids == pids))
                .map(|p| p.peak_rss_kib)
                .max()
                .unwrap_or(0)
                .max(before.rss_kib);
            servers.push(ServerRun {
                name,
                program: program.clone(),
                processes: pids.len(),
                before,
                peak_kib,
                after: server::memory_of_all(&pids)?,
            });
        }
        Ok::<_, BoxError>((servers, passes))
    }
    .await;
    for (_, _, server) in running {
        server.stop().await;
    }
    let (servers, passes) = result?;
    Ok(Outcome {
        sha256,
        servers,
        passes,
        skipped,
        setup_seconds,
        workers,
    })
}

/// Every round's passes, the targets' order reversed every other round.
async fn rounds(
    ready: &[Ready],
    image: &[u8],
    digest: [u8; 32],
    settings: &Settings,
) -> Result<Vec<Pass>, BoxError> {
    let mut copies: Vec<Vec<u8>> = (0..settings.devices)
        .map(|_| vec![POISON; image.len()])
        .collect();
    let mut passes = Vec::new();
    for round in 1..=settings.rounds {
        let mut order: Vec<&Ready> = ready.iter().collect();
        if round.is_multiple_of(2) {
            order.reverse();
        }
        for target in order {
            let modes = std::iter::once(Mode::Ranges).chain(std::iter::repeat_n(
                Mode::Whole,
                settings.whole_passes as usize,
            ));
            for mode in modes {
                let (pass, back) = pass(
                    round,
                    target,
                    mode,
                    image.len() as u64,
                    digest,
                    settings,
                    copies,
                )
                .await;
                copies = back;
                crate::note(&format!(
                    "ota: round {round}, {}, {}: {:.1} MiB/s, {:.0} req/s, {}/{} verified{}",
                    target.target.name(),
                    mode.name(),
                    pass.mib_per_sec(),
                    pass.requests_per_sec(),
                    pass.verified,
                    settings.devices,
                    pass.first_error
                        .as_ref()
                        .map_or_else(String::new, |e| format!("; first failure: {e}")),
                ));
                passes.push(pass);
            }
        }
    }
    Ok(passes)
}

/// What one device did in a pass.
#[derive(Debug)]
struct DeviceRun {
    copy: Vec<u8>,
    latencies_us: Vec<u32>,
    bytes: u64,
    error: Option<String>,
    reconnects: u64,
    finished: Instant,
}

/// One pass; answers it and the devices' copies (poisoned again for the next pass).
async fn pass(
    round: u32,
    ready: &Ready,
    mode: Mode,
    size: u64,
    digest: [u8; 32],
    settings: &Settings,
    copies: Vec<Vec<u8>>,
) -> (Pass, Vec<Vec<u8>>) {
    let devices = copies.len();
    let barrier = Arc::new(Barrier::new(devices + 1));
    let range = settings.range;
    let quickack = settings.client_quickack;
    let handles: Vec<_> = copies
        .into_iter()
        .enumerate()
        .map(|(i, copy)| {
            let accesses = Arc::clone(&ready.accesses);
            let barrier = Arc::clone(&barrier);
            let addr = ready.addr;
            tokio::spawn(async move {
                let how = How {
                    mode,
                    size,
                    range,
                    quickack,
                };
                device(addr, &accesses[i % accesses.len()], how, copy, &barrier).await
            })
        })
        .collect();
    let aborts: Vec<_> = handles
        .iter()
        .map(tokio::task::JoinHandle::abort_handle)
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let before = CpuSample::take(&ready.pids);
    let acks_before = server::delayed_acks();
    let (stop, stopped) = oneshot::channel();
    let sampler = tokio::spawn(peaks(ready.pids.clone(), stopped));
    let joined = tokio::time::timeout(
        settings.pass_within,
        futures_util::future::join_all(handles),
    )
    .await;
    let after = CpuSample::take(&ready.pids);
    let delayed_acks = acks_before
        .zip(server::delayed_acks())
        .map(|(a, b)| b.saturating_sub(a));
    let _ = stop.send(());
    let (peak_rss_kib, peak_threads) = sampler.await.unwrap_or((0, 0));
    let mut pass = Pass {
        round,
        target: ready.target,
        mode,
        seconds: 0.0,
        bytes: 0,
        requests: 0,
        latencies_us: Vec::new(),
        verified: 0,
        failed: 0,
        first_error: None,
        reconnects: 0,
        cpu: before.until(&after),
        peak_rss_kib,
        peak_threads,
        delayed_acks,
    };
    let mut copies = Vec::with_capacity(devices);
    let mut last = start;
    match joined {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(run) => {
                        last = last.max(run.finished);
                        pass.bytes += run.bytes;
                        pass.requests += run.latencies_us.len() as u64;
                        pass.latencies_us.extend_from_slice(&run.latencies_us);
                        pass.reconnects += run.reconnects;
                        if let Some(err) = run.error {
                            pass.failed += 1;
                            pass.first_error.get_or_insert(err);
                        }
                        copies.push(run.copy);
                    }
                    Err(err) => {
                        pass.failed += 1;
                        pass.first_error
                            .get_or_insert(format!("a device task failed: {err}"));
                    }
                }
            }
        }
        Err(_) => {
            for abort in aborts {
                abort.abort();
            }
            pass.failed = u32::try_from(devices).unwrap_or(u32::MAX);
            pass.first_error = Some(format!(
                "the pass did not end within {:?}",
                settings.pass_within
            ));
            last = Instant::now();
        }
    }
    pass.seconds = last.duration_since(start).as_secs_f64();
    pass.latencies_us.sort_unstable();
    // Copies lost with a failed task are made again.
    while copies.len() < devices {
        copies.push(vec![POISON; usize::try_from(size).unwrap_or(0)]);
    }
    let (verified, copies) = verify(copies, digest).await;
    pass.verified = verified;
    (pass, copies)
}

/// The requests of one download of a `size`-byte image: ranges of `range` bytes from the
/// start (the last one shorter), or the whole image.
fn wants(mode: Mode, size: u64, range: u64) -> Vec<Want> {
    match mode {
        Mode::Ranges => (0..size.div_ceil(range.max(1)))
            .map(|i| Want::Range(i * range..=((i + 1) * range).min(size) - 1))
            .collect(),
        Mode::Whole => vec![Want::Whole(size)],
    }
}

/// How a device downloads in a pass.
#[derive(Debug, Clone, Copy)]
struct How {
    mode: Mode,
    /// The image's bytes.
    size: u64,
    /// The bytes of one range.
    range: u64,
    /// TCP_QUICKACK on its socket.
    quickack: bool,
}

/// One device: connect, wait for the others, download the image into `copy`.
async fn device(
    addr: SocketAddr,
    access: &Access,
    how: How,
    mut copy: Vec<u8>,
    barrier: &Barrier,
) -> DeviceRun {
    let connected = tokio::time::timeout(REQUEST_WITHIN, Device::connect(addr, how.quickack)).await;
    barrier.wait().await;
    let wants = wants(how.mode, how.size, how.range);
    let mut run = DeviceRun {
        copy: Vec::new(),
        latencies_us: Vec::with_capacity(wants.len()),
        bytes: 0,
        error: None,
        reconnects: 0,
        finished: Instant::now(),
    };
    let mut connection = match connected {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            run.error = Some(format!("cannot connect: {err}"));
            run.copy = copy;
            return run;
        }
        Err(_) => {
            run.error = Some(format!("no connection within {REQUEST_WITHIN:?}"));
            run.copy = copy;
            return run;
        }
    };
    let mut request = String::with_capacity(512);
    for want in &wants {
        write_request(
            &mut request,
            addr,
            &access.path,
            access.bearer.as_deref(),
            want,
        );
        let sent = Instant::now();
        match tokio::time::timeout(
            REQUEST_WITHIN,
            connection.fetch(request.as_bytes(), want, &mut copy),
        )
        .await
        {
            Ok(Ok(())) => {
                let us = sent.elapsed().as_micros();
                run.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                run.bytes += match want {
                    Want::Range(r) => r.end() - r.start() + 1,
                    Want::Whole(n) => *n,
                };
            }
            Ok(Err(err)) => {
                run.error = Some(err.to_string());
                break;
            }
            Err(_) => {
                run.error = Some(format!("no answer within {REQUEST_WITHIN:?}"));
                break;
            }
        }
    }
    run.finished = Instant::now();
    run.reconnects = connection.reconnects;
    run.copy = copy;
    run
}

/// How many copies have the image's SHA-256; each is poisoned again afterwards. Runs on
/// blocking threads, one per CPU, after the clock stopped.
async fn verify(copies: Vec<Vec<u8>>, digest: [u8; 32]) -> (u32, Vec<Vec<u8>>) {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let total = copies.len();
    let work = tokio::task::spawn_blocking(move || {
        let mut copies = copies;
        let chunk = copies.len().div_ceil(threads).max(1);
        let verified: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = copies
                .chunks_mut(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter_mut()
                            .map(|copy| {
                                let good = <[u8; 32]>::from(Sha256::digest(&*copy)) == digest;
                                copy.fill(POISON);
                                usize::from(good)
                            })
                            .sum::<usize>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        (u32::try_from(verified).unwrap_or(0), copies)
    });
    match work.await {
        Ok(done) => done,
        Err(_) => (0, Vec::with_capacity(total)),
    }
}

/// The largest RSS (KiB) and thread count of `pids` together, read every [`SAMPLE_EVERY`]
/// until `stop`.
async fn peaks(pids: Vec<u32>, mut stop: oneshot::Receiver<()>) -> (u64, u64) {
    let mut peak = (0, 0);
    let read = |peak: &mut (u64, u64)| {
        if let Ok(memory) = server::memory_of_all(&pids) {
            peak.0 = peak.0.max(memory.rss_kib);
        }
        let threads: u64 = pids.iter().filter_map(|p| server::threads(*p)).sum();
        peak.1 = peak.1.max(threads);
    };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => read(&mut peak),
        }
    }
    read(&mut peak);
    peak
}

/// CPU counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    server: Duration,
    bench: Duration,
    machine: Option<server::MachineTicks>,
}

impl CpuSample {
    pub fn take(pids: &[u32]) -> Self {
        Self {
            at: Instant::now(),
            server: pids.iter().filter_map(|p| server::cpu_time(*p)).sum(),
            bench: server::cpu_time(std::process::id()).unwrap_or_default(),
            machine: server::machine_ticks(),
        }
    }

    pub fn until(&self, later: &Self) -> Cpu {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let cores = |a: Duration, b: Duration| b.saturating_sub(a).as_secs_f64() / wall;
        let (machine, steal) = match (self.machine, later.machine) {
            (Some(a), Some(b)) => a.cores_until(b).unzip(),
            _ => (None, None),
        };
        Cpu {
            server: cores(self.server, later.server),
            bench: cores(self.bench, later.bench),
            machine,
            steal,
        }
    }
}

/// Starts the server with an admin and a trusted key, uploads the image, registers the
/// devices and answers each one's signed link and key.
async fn start_unhidra(
    binary: &std::path::Path,
    image: &[u8],
    sha256: &str,
    devices: u32,
) -> Result<(Server, Vec<Access>, Vec<Access>), BoxError> {
    let key = manifest::generate_key();
    let keys_dir = server::fresh_data_dir()?;
    let trusted = keys_dir.join("trusted.pem");
    let started = async {
        std::fs::write(&trusted, manifest::public_pem(&key.verifying_key())?)?;
        let env = [
            ("UNHIDRA_ADMIN_EMAIL", ADMIN_EMAIL.to_owned()),
            ("UNHIDRA_ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
            ("UNHIDRA_OTA_TRUSTED_KEYS", trusted.display().to_string()),
            ("UNHIDRA_OTA_MAX_IMAGE_BYTES", (32_u64 << 20).to_string()),
            ("UNHIDRA_DEVICE_REGISTRATIONS_PER_HOUR", "0".to_owned()),
            ("UNHIDRA_RATE_LIMIT_IP_PER_MINUTE", "0".to_owned()),
            ("UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE", "0".to_owned()),
        ];
        Server::start_with_env(binary, &env).await
    }
    .await;
    // The server has read the key file at start; it is not needed any more.
    server::remove_dir(&keys_dir);
    let server = started?;
    let manifest = Manifest {
        sha256: sha256.to_owned(),
        size: image.len() as u64,
        version: VERSION.into(),
        project: PROJECT.into(),
        target: CHIP.into(),
        secure_version: 1,
    };
    let signed = serde_json::to_string(&manifest::sign(manifest, &key))?;
    let header = base64::engine::general_purpose::STANDARD.encode(signed);
    match set_up(server.addr(), image, sha256, &header, devices).await {
        Ok((links, keys)) => Ok((server, links, keys)),
        Err(err) => {
            server.stop().await;
            Err(err)
        }
    }
}

async fn set_up(
    addr: SocketAddr,
    image: &[u8],
    sha256: &str,
    manifest_header: &str,
    devices: u32,
) -> Result<(Vec<Access>, Vec<Access>), BoxError> {
    let mut connection = Connection::open(addr).await?;
    let login = serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).to_string();
    let answer = call(
        &mut connection,
        "POST /api/v1/auth/login",
        &post_json_request(addr, "/api/v1/auth/login", &login),
        200,
    )
    .await?;
    let token = answer["access_token"]
        .as_str()
        .ok_or("no access_token in the login answer")?
        .to_owned();
    let upload = post_request(
        addr,
        "/api/v1/firmware",
        Some(&token),
        "application/octet-stream",
        &[("Unhidra-Manifest", manifest_header)],
        image,
    );
    let stored = call(&mut connection, "POST /api/v1/firmware", &upload, 201).await?;
    if stored["sha256"].as_str() != Some(sha256) {
        return Err(format!("the upload was stored as {}", stored["sha256"]).into());
    }
    crate::note(&format!(
        "ota: image uploaded; registering {devices} devices"
    ));
    let links_path = format!("/api/v1/firmware/{sha256}/links");
    let image_path = format!("/api/v1/firmware/{sha256}/image");
    let mut links = Vec::new();
    let mut keys = Vec::new();
    for i in 0..devices {
        let new =
            serde_json::json!({"name": format!("ota-bench-{i:04}"), "model": CHIP}).to_string();
        let made = call(
            &mut connection,
            "POST /api/v1/devices",
            &post_request(
                addr,
                "/api/v1/devices",
                Some(&token),
                "application/json",
                &[],
                new.as_bytes(),
            ),
            201,
        )
        .await?;
        let id = made["device"]["id"]
            .as_str()
            .ok_or("no device id in the registration")?;
        let device_key = made["key"].as_str().ok_or("no key in the registration")?;
        let body = serde_json::json!({"device": id}).to_string();
        let link = call(
            &mut connection,
            "POST /api/v1/firmware/{sha256}/links",
            &post_request(
                addr,
                &links_path,
                Some(&token),
                "application/json",
                &[],
                body.as_bytes(),
            ),
            201,
        )
        .await?;
        let url = link["url"].as_str().ok_or("no url in the link")?;
        links.push(Access {
            path: url.to_owned(),
            bearer: None,
        });
        keys.push(Access {
            path: image_path.clone(),
            bearer: Some(device_key.to_owned()),
        });
    }
    Ok((links, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_have_the_size_asked_for_and_are_valid() {
        for kib in [16, 1536] {
            let image = build_image(kib * 1024);
            assert_eq!(image.len() as u64, kib * 1024);
            let checked = unhidra_ota::image::check(&image).unwrap();
            assert_eq!(checked.version, VERSION);
        }
    }

    #[test]
    fn ranges_cover_the_image_once() {
        for (size, range) in [(10_000, 4096), (8192, 4096), (1, 4096), (1_572_864, 4096)] {
            let ranges = wants(Mode::Ranges, size, range);
            assert_eq!(ranges.len() as u64, size.div_ceil(range));
            let mut next = 0;
            for want in ranges {
                let Want::Range(r) = want else {
                    panic!("{want:?}")
                };
                assert_eq!(*r.start(), next);
                assert!(r.end() - r.start() < range);
                next = r.end() + 1;
            }
            assert_eq!(next, size);
        }
        assert_eq!(wants(Mode::Whole, 7, 4096), vec![Want::Whole(7)]);
        assert_eq!(flat_allowance_kib(200), 12_800);
        assert_eq!(flat_allowance_kib(3), FLAT_FLOOR_KIB);
    }
}
