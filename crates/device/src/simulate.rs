//! The fleet simulator: N devices, each a tokio task running the SDK's [`Device`] over its
//! own buffer file, with readings that look real (a slow temperature walk, humidity, a
//! draining battery, a 32×24 thermal frame) and a bounded, seeded schedule of dropped
//! connections and restarts. With [`SimulateOta`] each device also keeps A/B slots in its
//! folder and takes deployments' offers with the SDK's update client, failing a share of them
//! as told (a failed self-test, a boot loop, a power loss mid-download). Same seed, same
//! readings and schedule; it stops by itself.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use unhidra_protocol::device::DEVICE_KEY_PREFIX_TEXT;

use crate::file::{FileStorage, SyncPolicy};
use crate::machine::{
    BatchLimits, CommandReply, Encoding, Handlers, Hello, Session, SessionConfig, Stats,
    StopReason, Vitals,
};
use crate::slots::{SelfTest, Slots};
use crate::update::{OFFER_COMMAND, UpdateOptions, Updater, origin_of};
use crate::ws::{Device, DeviceHandle, WsOptions};
use crate::{ArrayValue, Value};

/// At most this many devices in one run.
pub const MAX_DEVICES: usize = 10_000;
/// At most this long a run.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// The server's WebSocket URL, `ws://host:port/ws`.
    pub url: String,
    /// The device keys: one per line (blank lines and `#` comments skipped), or a JSON list
    /// of strings. Each simulated device takes its own key.
    pub key_file: PathBuf,
    /// How many devices; `None`: one per key. Never more than the keys.
    pub devices: Option<usize>,
    /// How long the devices read and send.
    pub duration: Duration,
    /// After `duration`, how long the devices may still take to deliver their buffers.
    pub drain: Duration,
    /// Where each device keeps its buffer file (`device-0000.buf`, …); created if missing.
    /// What a run leaves unacknowledged is sent by the next run on the same folder.
    pub folder: PathBuf,
    /// The seed of every device's readings, schedule and jitter.
    pub seed: u64,
    /// JSON or MessagePack frames.
    pub encoding: Encoding,
    /// Between two readings of a device's sensors.
    pub reading_interval: Duration,
    /// A thermal frame every this many readings (0: none).
    pub thermal_every: u32,
    /// Between heartbeats.
    pub heartbeat_interval: Duration,
    /// How long a batch stays open.
    pub batch_linger: Duration,
    /// At most this many dropped connections per device, at random times.
    pub disconnects: u32,
    /// At most this many restarts per device (the device stops and boots again from its
    /// buffer file), at random times.
    pub restarts: u32,
    /// Firmware updates: `None`, the devices answer no offer (`unknown_command`).
    pub ota: Option<SimulateOta>,
}

/// How the simulated devices take firmware updates.
#[derive(Debug, Clone)]
pub struct SimulateOta {
    /// The Ed25519 public keys the firmware trusts.
    pub trusted: Vec<[u8; 32]>,
    /// The firmware's project.
    pub project: String,
    /// The chip.
    pub target: String,
    /// The version flashed at the factory, and its anti-rollback version.
    pub factory_version: String,
    /// The factory image's anti-rollback version.
    pub factory_secure_version: u32,
    /// Download in ranges of this many bytes, or whole (`None`).
    pub range_size: Option<u64>,
    /// The share (0 to 1) of installs whose new image fails its self-test and rolls back.
    pub fail_self_test: f64,
    /// The share of installs whose new image resets before its self-test ends (a boot
    /// loop): the next boot rolls it back.
    pub boot_loop: f64,
    /// The share of devices that lose power once in the middle of a download: they boot
    /// again and resume it.
    pub power_loss: f64,
}

impl SimulateOta {
    /// Updates that all work, in 4 KiB ranges, from factory version `sim-1.0.0`.
    pub fn new(trusted: Vec<[u8; 32]>, project: &str, target: &str) -> Self {
        Self {
            trusted,
            project: project.to_owned(),
            target: target.to_owned(),
            factory_version: "sim-1.0.0".into(),
            factory_secure_version: 0,
            range_size: Some(4096),
            fail_self_test: 0.0,
            boot_loop: 0.0,
            power_loss: 0.0,
        }
    }
}

impl SimulateOptions {
    /// A minute of one reading a second, a thermal frame every 10, up to 3 dropped
    /// connections and 1 restart per device.
    pub fn new(
        url: impl Into<String>,
        key_file: impl Into<PathBuf>,
        folder: impl Into<PathBuf>,
    ) -> Self {
        Self {
            url: url.into(),
            key_file: key_file.into(),
            devices: None,
            duration: Duration::from_secs(60),
            drain: Duration::from_secs(5),
            folder: folder.into(),
            seed: 0,
            encoding: Encoding::MsgPack,
            reading_interval: Duration::from_secs(1),
            thermal_every: 10,
            heartbeat_interval: Duration::from_secs(30),
            batch_linger: Duration::from_secs(2),
            disconnects: 3,
            restarts: 1,
            ota: None,
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The key file could not be read.
    #[error("{path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line or entry of the key file is not a device key.
    #[error("{path}: entry {entry} is not a device key (unh_dk_ and letters, digits, - or _)")]
    InvalidKey {
        /// The file.
        path: PathBuf,
        /// Which entry, from 1.
        entry: usize,
    },
    /// The key file is a JSON document but not a list of strings.
    #[error("{path}: not a JSON list of keys: {message}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// What serde said.
        message: String,
    },
    /// More devices than keys, or none, or more than [`MAX_DEVICES`].
    #[error(
        "{devices} devices with {keys} keys: each device needs its own key (and at most {MAX_DEVICES} devices)"
    )]
    Devices {
        /// Devices asked for.
        devices: usize,
        /// Keys in the file.
        keys: usize,
    },
    /// A duration of 0 or above [`MAX_DURATION`], or a reading interval of 0.
    #[error("the duration must be between 1 ms and 7 days, and the reading interval above 0")]
    Duration,
    /// The folder could not be created.
    #[error("{path}: {source}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a run did, summed over its devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Devices simulated.
    pub devices: usize,
    /// Readings recorded (a thermal frame is one).
    pub points: u64,
    /// Batches sealed.
    pub batches_sealed: u64,
    /// Telemetry frames sent, retransmissions included.
    pub batches_sent: u64,
    /// Of those, batches that may have been sent before (after a reconnect, a retry or a
    /// restart).
    pub retransmits: u64,
    /// Batches acknowledged.
    pub acked: u64,
    /// Of those, acknowledged as duplicates.
    pub duplicates: u64,
    /// Batches dropped because a buffer was full.
    pub dropped: u64,
    /// Batches the server refused for good.
    pub refused: u64,
    /// Connections established again after the first of a boot.
    pub reconnects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Connections the simulator dropped on purpose.
    pub disconnects_injected: u64,
    /// Restarts the simulator made.
    pub restarts: u64,
    /// Commands run.
    pub commands_run: u64,
    /// Firmware updates installed (each followed by a reboot into the new image).
    pub updates_installed: u64,
    /// Boots that went back to the old image (a failed self-test or a boot loop).
    pub rollbacks: u64,
    /// Power losses in the middle of a download.
    pub power_losses: u64,
    /// Devices whose key was refused (revoked, unknown): they stopped.
    pub revoked: usize,
    /// Batches left unacknowledged in the buffer files at the end.
    pub unacked: u64,
    /// Devices that ended on an error (their buffer file failed), one line each.
    pub errors: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "devices        {}", self.devices)?;
        writeln!(f, "points         {}", self.points)?;
        writeln!(
            f,
            "batches        {} sealed, {} sent ({} again), {} acked ({} duplicates)",
            self.batches_sealed, self.batches_sent, self.retransmits, self.acked, self.duplicates
        )?;
        writeln!(
            f,
            "lost           {} dropped (buffer full), {} refused, {} left unacked",
            self.dropped, self.refused, self.unacked
        )?;
        writeln!(
            f,
            "connections    {} reconnects, {} failed attempts, {} dropped on purpose, {} restarts",
            self.reconnects, self.connect_failures, self.disconnects_injected, self.restarts
        )?;
        writeln!(f, "commands       {} run", self.commands_run)?;
        writeln!(
            f,
            "updates        {} installed, {} rolled back, {} power losses mid-download",
            self.updates_installed, self.rollbacks, self.power_losses
        )?;
        write!(f, "revoked        {}", self.revoked)?;
        for error in &self.errors {
            write!(f, "\nerror          {error}")?;
        }
        Ok(())
    }
}

/// Reads a key file: a JSON list of strings (when the file starts with `[`), else one key per
/// line with blank lines and `#` comments skipped.
pub fn read_keys(path: &Path) -> Result<Vec<String>, SimulateError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimulateError::KeyFile {
        path: path.to_owned(),
        source,
    })?;
    let keys: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| SimulateError::InvalidJson {
            path: path.to_owned(),
            message: e.to_string(),
        })?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    for (at, key) in keys.iter().enumerate() {
        let valid = key
            .strip_prefix(DEVICE_KEY_PREFIX_TEXT)
            .is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(SimulateError::InvalidKey {
                path: path.to_owned(),
                entry: at + 1,
            });
        }
    }
    Ok(keys)
}

/// Runs the simulation and sums up what happened. Returns after `duration` plus at most
/// `drain` (and the close handshakes).
pub async fn run(options: SimulateOptions) -> Result<Report, SimulateError> {
    let keys = read_keys(&options.key_file)?;
    let devices = options.devices.unwrap_or(keys.len());
    if devices == 0 || devices > keys.len() || devices > MAX_DEVICES {
        return Err(SimulateError::Devices {
            devices,
            keys: keys.len(),
        });
    }
    if options.duration.is_zero()
        || options.duration > MAX_DURATION
        || options.reading_interval.is_zero()
    {
        return Err(SimulateError::Duration);
    }
    std::fs::create_dir_all(&options.folder).map_err(|source| SimulateError::Folder {
        path: options.folder.clone(),
        source,
    })?;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (index, key) in keys.into_iter().take(devices).enumerate() {
        let options = options.clone();
        tasks.spawn(simulate_device(index, key, options, start));
    }
    let mut report = Report {
        devices,
        ..Report::default()
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(device) => report.add(device),
            Err(e) => report.errors.push(format!("a device task failed: {e}")),
        }
    }
    Ok(report)
}

/// What one device did.
struct DeviceOutcome {
    stats: Stats,
    reconnects: u64,
    disconnects: u64,
    restarts: u64,
    revoked: bool,
    unacked: u64,
    updates_installed: u64,
    rollbacks: u64,
    power_losses: u64,
    error: Option<String>,
}

impl Report {
    fn add(&mut self, device: DeviceOutcome) {
        let s = device.stats;
        self.points += s.points;
        self.batches_sealed += s.batches_sealed;
        self.batches_sent += s.batches_sent;
        self.retransmits += s.retransmits;
        self.acked += s.acked;
        self.duplicates += s.duplicates;
        self.dropped += s.dropped;
        self.refused += s.refused;
        self.connect_failures += s.connect_failures;
        self.commands_run += s.commands_run;
        self.reconnects += device.reconnects;
        self.disconnects_injected += device.disconnects;
        self.restarts += device.restarts;
        self.revoked += usize::from(device.revoked);
        self.updates_installed += device.updates_installed;
        self.rollbacks += device.rollbacks;
        self.power_losses += device.power_losses;
        self.unacked += device.unacked;
        self.errors.extend(device.error);
    }
}

fn add_stats(total: &mut Stats, s: Stats) {
    total.points += s.points;
    total.batches_sealed += s.batches_sealed;
    total.batches_sent += s.batches_sent;
    total.retransmits += s.retransmits;
    total.acked += s.acked;
    total.duplicates += s.duplicates;
    total.dropped += s.dropped;
    total.refused += s.refused;
    total.connects += s.connects;
    total.connect_failures += s.connect_failures;
    total.disconnects += s.disconnects;
    total.commands_run += s.commands_run;
    total.commands_repeated += s.commands_repeated;
    total.commands_expired += s.commands_expired;
    total.malformed += s.malformed;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Chaos {
    Disconnect,
    Restart,
}

async fn simulate_device(
    index: usize,
    key: String,
    options: SimulateOptions,
    start: Instant,
) -> DeviceOutcome {
    let mut rng = StdRng::seed_from_u64(options.seed.wrapping_add(index as u64));
    let mut outcome = DeviceOutcome {
        stats: Stats::default(),
        reconnects: 0,
        disconnects: 0,
        restarts: 0,
        revoked: false,
        unacked: 0,
        updates_installed: 0,
        rollbacks: 0,
        power_losses: 0,
        error: None,
    };
    // The schedule, fixed up front from the seed: at random instants within the duration.
    let duration_ms = u64::try_from(options.duration.as_millis()).unwrap_or(u64::MAX);
    let mut chaos: Vec<(u64, Chaos)> = Vec::new();
    for _ in 0..options.disconnects {
        chaos.push((rng.random_range(0..duration_ms), Chaos::Disconnect));
    }
    for _ in 0..options.restarts {
        chaos.push((rng.random_range(0..duration_ms), Chaos::Restart));
    }
    chaos.sort_unstable();
    // A fleet does not boot in the same millisecond.
    let stagger = Duration::from_millis(rng.random_range(0..1_000.min(duration_ms / 10 + 1)));
    tokio::time::sleep(stagger).await;
    let deadline = start + options.duration;
    let path = options.folder.join(format!("device-{index:04}.buf"));
    let slots_dir = options.folder.join(format!("device-{index:04}.slots"));
    let mut sensors = Sensors::new(&mut rng);
    let mut boot = 0u32;
    let mut chaos = chaos.into_iter().peekable();
    // A restart of the schedule that an update's reboot came before: it still happens.
    let mut restart_pending: Option<Instant> = None;
    // Whether this device still has its power loss mid-download to come.
    let mut power_loss = options
        .ota
        .as_ref()
        .is_some_and(|ota| rng.random_bool(ota.power_loss.clamp(0.0, 1.0)));
    loop {
        let storage = match FileStorage::open_with(&path, SyncPolicy::Never) {
            Ok(storage) => storage,
            Err(e) => {
                outcome.error = Some(format!("device {index}: {e}"));
                return outcome;
            }
        };
        let reset_reason = if boot == 0 { "power_on" } else { "software" };
        let (hello, updater) = match &options.ota {
            None => (
                Hello {
                    firmware: "sim-1.0.0".into(),
                    partition: Some(
                        if boot.is_multiple_of(2) {
                            "ota_0"
                        } else {
                            "ota_1"
                        }
                        .into(),
                    ),
                    reset_reason: Some(reset_reason.into()),
                    capabilities: vec!["thermal".into(), "env".into()],
                    secure_version: Some(0),
                },
                None,
            ),
            Some(ota) => {
                let (fail, reset) = (ota.fail_self_test, ota.boot_loop);
                let started = Slots::start(
                    &slots_dir,
                    &ota.factory_version,
                    ota.factory_secure_version,
                    |_| {
                        let draw: f64 = rng.random();
                        if draw < fail {
                            SelfTest::Failed
                        } else if draw < fail + reset {
                            SelfTest::Reset
                        } else {
                            SelfTest::Passed
                        }
                    },
                );
                let started = match started {
                    Ok(started) => started,
                    Err(e) => {
                        outcome.error = Some(format!("device {index}: its slots: {e}"));
                        return outcome;
                    }
                };
                outcome.rollbacks += u64::from(started.rolled_back.is_some());
                let hello = Hello {
                    firmware: started.boot.version.clone(),
                    partition: Some(started.boot.running.name().into()),
                    reset_reason: Some(
                        if started.boots > 1 {
                            "panic"
                        } else {
                            reset_reason
                        }
                        .into(),
                    ),
                    capabilities: vec!["thermal".into(), "env".into(), "ota".into()],
                    secure_version: Some(started.slots.secure_version()),
                };
                let mut update = UpdateOptions::new(
                    origin_of(&options.url),
                    ota.trusted.clone(),
                    &ota.project,
                    &ota.target,
                );
                update.range_size = ota.range_size;
                (
                    hello,
                    Some(Updater::new(started.slots, started.rolled_back, update)),
                )
            }
        };
        let config = SessionConfig {
            hello,
            heartbeat_interval_ms: millis(options.heartbeat_interval),
            batch: BatchLimits {
                linger_ms: millis(options.batch_linger),
                ..BatchLimits::default()
            },
            ..SessionConfig::default()
        };
        let session = match Session::new(config, storage, StdRng::seed_from_u64(rng.random())) {
            Ok(session) => session,
            Err(e) => {
                outcome.error = Some(format!("device {index}: {e}"));
                return outcome;
            }
        };
        let ws = WsOptions {
            encoding: options.encoding,
            ..WsOptions::new(options.url.clone(), key.clone())
        };
        let mut device = Device::new(session, handlers(), ws);
        let handle = device.handle();
        let mut offers = updater.as_ref().map(|_| device.defer(OFFER_COMMAND));
        // This boot lasts until the next restart, an update's reboot, or the end.
        let mut disconnects_now = Vec::new();
        let mut restart_at = restart_pending.take();
        while restart_at.is_none()
            && let Some(&(at, what)) = chaos.peek()
        {
            chaos.next();
            match what {
                Chaos::Disconnect => disconnects_now.push(start + Duration::from_millis(at)),
                Chaos::Restart => restart_at = Some(start + Duration::from_millis(at)),
            }
        }
        let last = restart_at.is_none();
        let stop_at = restart_at.unwrap_or(deadline + options.drain);
        let read_until = restart_at.unwrap_or(deadline);
        let readings = read_sensors(
            &handle,
            &mut sensors,
            &options,
            &disconnects_now,
            read_until,
            last,
        );
        let mut updater = updater;
        let progress = updater.as_ref().map(Updater::progress);
        let updates = async {
            match (updater.as_mut(), offers.as_mut()) {
                (Some(updater), Some(offers)) => updater.serve(offers, &handle).await,
                _ => std::future::pending().await,
            }
        };
        let cut = async {
            match progress {
                Some(mut progress) if power_loss => {
                    // Somewhere between a fifth and four fifths of the image.
                    let share = rng.random_range(0.2..0.8);
                    let _ = progress
                        .wait_for(|p| p.size > 0 && p.received as f64 >= p.size as f64 * share)
                        .await;
                }
                _ => std::future::pending().await,
            }
        };
        enum End {
            Ran(Result<StopReason, crate::file::FileError>),
            PowerLost,
        }
        let (end, installed) = {
            let run = device.run(tokio::time::sleep_until(stop_at));
            tokio::pin!(run);
            tokio::pin!(readings);
            tokio::pin!(updates);
            tokio::pin!(cut);
            let mut injected = None;
            let mut installed = false;
            let end = loop {
                tokio::select! {
                    result = &mut run => break End::Ran(result),
                    n = &mut readings, if injected.is_none() => injected = Some(n),
                    () = &mut updates, if !installed => {
                        installed = true;
                        let _ = handle.shutdown().await;
                    }
                    () = &mut cut, if !installed => break End::PowerLost,
                }
            };
            (end, installed)
        };
        outcome.disconnects += disconnects_now
            .iter()
            .filter(|&&at| at < Instant::now().min(read_until))
            .count() as u64;
        let stats = device.session().stats();
        outcome.reconnects += stats.connects.saturating_sub(1);
        add_stats(&mut outcome.stats, stats);
        outcome.unacked = device.session().buffered().len() as u64;
        match end {
            End::Ran(Ok(StopReason::Revoked)) => {
                outcome.revoked = true;
                return outcome;
            }
            End::Ran(Ok(StopReason::Shutdown)) => {}
            End::Ran(Err(e)) => {
                outcome.error = Some(format!("device {index}: {e}"));
                return outcome;
            }
            End::PowerLost => {
                power_loss = false;
                outcome.power_losses += 1;
            }
        }
        let rebooted = installed || matches!(end, End::PowerLost);
        if rebooted {
            outcome.updates_installed += u64::from(installed);
            // The boot's scheduled restart, if it was still to come, comes in the next one.
            restart_pending = restart_at.filter(|&at| at > Instant::now());
            if Instant::now() >= deadline + options.drain {
                return outcome;
            }
        } else {
            if last {
                return outcome;
            }
            outcome.restarts += 1;
        }
        boot += 1;
    }
}

/// Reads the sensors every interval until `until`, dropping the connection at each of
/// `disconnects`; on the last boot, then asks the device to finish (deliver and stop).
async fn read_sensors(
    handle: &DeviceHandle,
    sensors: &mut Sensors,
    options: &SimulateOptions,
    disconnects: &[Instant],
    until: Instant,
    last: bool,
) {
    let mut ticker = tokio::time::interval(options.reading_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = disconnects.iter().copied().peekable();
    loop {
        let tick = tokio::select! {
            tick = ticker.tick() => tick,
            () = tokio::time::sleep_until(until) => break,
        };
        if tick >= until {
            break;
        }
        while pending.next_if(|&at| at <= tick).is_some() {
            let _ = handle.disconnect().await;
        }
        let reading = sensors.read(options.thermal_every);
        let _ = handle.set_vitals(reading.vitals).await;
        for (key, value) in reading.points {
            let _ = handle.record(key, value).await;
        }
    }
    if last {
        let _ = handle.finish().await;
    }
    std::future::pending::<()>().await;
}

fn handlers() -> Handlers {
    Handlers::new()
        .on("blink", |params| {
            CommandReply::succeeded(
                json!({ "blinked": params.get("times").cloned().unwrap_or(json!(1)) }),
            )
        })
        .on("ping", |_| CommandReply::succeeded(json!({ "pong": true })))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One device's sensors, driven by its seeded generator.
struct Sensors {
    rng: StdRng,
    readings: u32,
    temperature: f64,
    home_temperature: f64,
    humidity: f64,
    battery: f64,
    rssi: f64,
    spot: (f64, f64),
}

/// One reading of every sensor.
struct Reading {
    points: Vec<(&'static str, Value)>,
    vitals: Vitals,
}

impl Sensors {
    fn new(seed: &mut StdRng) -> Self {
        let mut rng = StdRng::seed_from_u64(seed.random());
        let home = rng.random_range(18.0..26.0);
        Self {
            temperature: home,
            home_temperature: home,
            humidity: rng.random_range(35.0..60.0),
            battery: rng.random_range(60.0..100.0),
            rssi: rng.random_range(-80.0..-50.0),
            spot: (rng.random_range(0.0..32.0), rng.random_range(0.0..24.0)),
            readings: 0,
            rng,
        }
    }

    /// A normal draw (Box–Muller).
    fn gauss(&mut self, sigma: f64) -> f64 {
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn read(&mut self, thermal_every: u32) -> Reading {
        self.readings += 1;
        // A slow walk that drifts back towards the room's temperature.
        let pull = (self.home_temperature - self.temperature) * 0.01;
        self.temperature = (self.temperature + pull + self.gauss(0.05)).clamp(-20.0, 60.0);
        self.humidity = (self.humidity + self.gauss(0.2)).clamp(5.0, 95.0);
        self.battery = (self.battery - self.rng.random_range(0.0..0.004)).max(0.0);
        self.rssi = (self.rssi + self.gauss(0.5)).clamp(-95.0, -40.0);
        let round = |v: f64, places: i32| {
            let f = 10f64.powi(places);
            (v * f).round() / f
        };
        let mut points = vec![
            ("env.temperature", Value::Number(round(self.temperature, 2))),
            ("env.humidity", Value::Number(round(self.humidity, 1))),
            ("power.battery", Value::Number(round(self.battery, 2))),
        ];
        if thermal_every > 0
            && self.readings.is_multiple_of(thermal_every)
            && let Some(frame) = self.thermal_frame()
        {
            points.push(("thermal", Value::Array(frame)));
        }
        Reading {
            points,
            vitals: Vitals {
                rssi: Some(self.rssi.round() as i32),
                free_heap: Some(self.rng.random_range(60_000..120_000)),
                battery: Some(round(self.battery, 1)),
                temperature: Some(round(self.temperature + 8.0, 1)),
            },
        }
    }

    /// 24 rows × 32 columns: the room's temperature, a warm body that wanders, sensor noise.
    fn thermal_frame(&mut self) -> Option<ArrayValue> {
        self.spot.0 = (self.spot.0 + self.gauss(1.0)).clamp(0.0, 31.0);
        self.spot.1 = (self.spot.1 + self.gauss(1.0)).clamp(0.0, 23.0);
        let mut pixels = Vec::with_capacity(768);
        for row in 0..24 {
            for column in 0..32 {
                let dx = f64::from(column) - self.spot.0;
                let dy = f64::from(row) - self.spot.1;
                let body = 12.0 * (-(dx * dx + dy * dy) / 8.0).exp();
                pixels.push((self.temperature + body + self.gauss(0.15)) as f32);
            }
        }
        // Finite values in the shape's number: always an array.
        ArrayValue::from_f32(vec![24, 32], &pixels).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_reads_the_same_sensors() {
        let readings = |seed| {
            let mut sensors = Sensors::new(&mut StdRng::seed_from_u64(seed));
            (0..20).map(|_| sensors.read(5).points).collect::<Vec<_>>()
        };
        let first = readings(7);
        assert_eq!(first, readings(7));
        assert_ne!(first, readings(8));
        let frames = first
            .iter()
            .flatten()
            .filter(|(key, _)| *key == "thermal")
            .count();
        assert_eq!(frames, 4);
        let temperatures: Vec<f64> = first
            .iter()
            .flatten()
            .filter_map(|(key, value)| match value {
                Value::Number(n) if *key == "env.temperature" => Some(*n),
                _ => None,
            })
            .collect();
        // A slow walk: no jump of more than half a degree between two readings.
        assert!(
            temperatures.windows(2).all(|w| (w[1] - w[0]).abs() < 0.5),
            "{temperatures:?}"
        );
    }
}
