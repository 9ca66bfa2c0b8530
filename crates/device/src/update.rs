//! The update client: takes a deployment's offer (an `ota.update` command, docs/protocol.md
//! "OTA updates"), checks its signed manifest, downloads the image into the idle slot over
//! HTTP with resumption — in ranges as ESP-IDF's `partial_http_download` does, or whole and
//! resumed with `Range: bytes=N-` after a cut — verifies its size and SHA-256, makes it boot
//! next, and reports each step in `ota_status`. The reboot and the self-test that follows are
//! the application's ([`crate::slots::Slots::start`]); when the offer comes again after the
//! reboot, the client answers it from what runs.
//!
//! A download cut at any point (the connection, or power: the future may be dropped) leaves
//! what was written in the idle slot, and the next attempt — in this boot or the next —
//! resumes after it.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use unhidra_protocol::device::OtaState;
use unhidra_protocol::firmware::{InstallWindow, ManifestError, Offer};

use crate::machine::{Command, CommandReply};
use crate::ota::{DeviceImage, ImageVerifier, OtaError};
use crate::slots::{ImageState, RolledBack, Slots};
use crate::ws::DeviceHandle;

pub use unhidra_protocol::firmware::OFFER_COMMAND;

/// How a device takes updates.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    /// What relative download links are resolved against: the server's origin,
    /// `http://host:port` ([`origin_of`] derives it from the WebSocket URL).
    pub origin: String,
    /// The Ed25519 public keys the firmware trusts.
    pub trusted: Vec<[u8; 32]>,
    /// The project the firmware is (`esp_app_desc_t.project_name`).
    pub project: String,
    /// The chip or board (`esp32s3`, …).
    pub target: String,
    /// Requests of this many bytes each (`partial_http_download`'s `max_http_request_size`),
    /// or `None`: one request for the whole image, resumed after a cut.
    pub range_size: Option<u64>,
    /// Failed requests in a row before the download is given up.
    pub attempts: u32,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// The wall clock an offer's install window is read against (default: the system's).
    pub clock: WallClock,
}

/// Unix milliseconds now: the device's wall clock (SNTP on a device; a test's own clock).
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl WallClock {
    /// A clock that reads `now`.
    pub fn new(now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// Unix milliseconds now.
    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
    }
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WallClock").field(&self.now_ms()).finish()
    }
}

impl UpdateOptions {
    /// 4 KiB ranges, 5 attempts, 30 s a request.
    pub fn new(
        origin: impl Into<String>,
        trusted: Vec<[u8; 32]>,
        project: &str,
        target: &str,
    ) -> Self {
        Self {
            origin: origin.into(),
            trusted,
            project: project.to_owned(),
            target: target.to_owned(),
            range_size: Some(4096),
            attempts: 5,
            request_timeout: Duration::from_secs(30),
            clock: WallClock::default(),
        }
    }
}

/// The HTTP origin of a WebSocket URL: `ws://host:port/ws` → `http://host:port`.
pub fn origin_of(ws_url: &str) -> String {
    let (scheme, rest) = match ws_url.split_once("://") {
        Some(("wss", rest)) => ("https", rest),
        Some((_, rest)) => ("http", rest),
        None => ("http", ws_url),
    };
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}")
}

/// How far a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes of the image in the idle slot.
    pub received: u64,
    /// The image's length (0 before the first offer).
    pub size: u64,
}

/// What became of an offer.
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    /// The image is installed and boots next: restart the device now.
    Reboot,
    /// The offer is answered (it runs already, was refused, rolled back or failed).
    Answered(CommandReply),
}

/// Why a download attempt failed.
enum Attempt {
    /// Try again.
    Retry(String),
    /// The server refused the link for good (a 4xx answer).
    Refused(u16),
    /// The slot cannot be written.
    Storage(std::io::Error),
    /// More bytes than the manifest says.
    TooLong,
}

/// The update client of one device, over its slots.
#[derive(Debug)]
pub struct Updater {
    slots: Slots,
    options: UpdateOptions,
    rolled_back: Option<RolledBack>,
    client: reqwest::Client,
    progress: watch::Sender<Progress>,
}

impl Updater {
    /// A client over the slots of a started device; `rolled_back` is what its start went back
    /// from ([`crate::slots::Started::rolled_back`]), which the offer's answer reports.
    pub fn new(slots: Slots, rolled_back: Option<RolledBack>, options: UpdateOptions) -> Self {
        let client = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .build()
            .unwrap_or_default();
        Self {
            slots,
            options,
            rolled_back,
            client,
            progress: watch::channel(Progress::default()).0,
        }
    }

    /// The slots.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// How far the download is, as it goes.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Takes the offers among `commands` (what [`crate::ws::Device::defer`] gave for
    /// [`OFFER_COMMAND`]) one after another, and returns once one is installed: then shut the
    /// device down ([`DeviceHandle::shutdown`]) and start it again. Never returns otherwise.
    pub async fn serve(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        device: &DeviceHandle,
    ) {
        while let Some(command) = commands.recv().await {
            if self.take(&command, device).await == Taken::Reboot {
                return;
            }
        }
        std::future::pending::<()>().await;
    }

    /// Takes one offer: answers its command (through `device`) unless the image was
    /// installed and the device must reboot.
    pub async fn take(&mut self, command: &Command, device: &DeviceHandle) -> Taken {
        let taken = match serde_json::from_value::<Offer>(command.params.clone()) {
            Ok(offer) => self.take_offer(&offer, device).await,
            Err(_) => Taken::Answered(CommandReply::failed("invalid_offer")),
        };
        if let Taken::Answered(reply) = &taken {
            let _ = device.command_done(&command.id, reply.clone()).await;
        }
        taken
    }

    async fn take_offer(&mut self, offer: &Offer, device: &DeviceHandle) -> Taken {
        let version = &offer.manifest.manifest.version;
        let deployment = offer.deployment.as_str();
        let running = self.slots.running();
        if self
            .slots
            .image(running)
            .is_some_and(|i| &i.version == version)
        {
            // The offer again after the reboot: the image runs, confirmed.
            return Taken::Answered(CommandReply::succeeded(json!({ "version": version })));
        }
        let refused = self
            .slots
            .image(running.other())
            .is_some_and(|i| &i.version == version && i.state == ImageState::Aborted);
        if refused {
            let reason = match &self.rolled_back {
                Some(r) if &r.version == version => r.reason,
                _ => "rolled_back",
            };
            let _ = device
                .ota_status(deployment, OtaState::RolledBack, None, Some(reason))
                .await;
            return Taken::Answered(CommandReply::failed(reason));
        }
        let me = DeviceImage {
            project: self.options.project.clone(),
            target: self.options.target.clone(),
            secure_version: self.slots.secure_version(),
        };
        let verifier = match ImageVerifier::new(&offer.manifest, &self.options.trusted, &me) {
            Ok(verifier) => verifier,
            Err(e) => return fail(device, deployment, refusal_reason(&e)).await,
        };
        match self.download(offer, verifier, device).await {
            Ok(()) => {}
            Err(reason) => return fail(device, deployment, reason).await,
        }
        if let Some(window) = offer.install_window
            && let Err(reason) = self.until_window(window).await
        {
            return fail(device, deployment, reason).await;
        }
        let _ = device
            .ota_status(deployment, OtaState::Installing, None, None)
            .await;
        let manifest = &offer.manifest.manifest;
        if let Err(e) = self
            .slots
            .set_boot(&manifest.version, manifest.secure_version)
        {
            tracing::warn!(error = %e, "device: the slot cannot boot the image");
            return fail(device, deployment, "storage").await;
        }
        let _ = device
            .ota_status(deployment, OtaState::Rebooting, None, None)
            .await;
        Taken::Reboot
    }

    /// Waits, with the verified image in its slot, until the install window opens; a window
    /// that closed already is `window_missed` (the deployment's next offer may bring another).
    async fn until_window(&self, window: InstallWindow) -> Result<(), &'static str> {
        loop {
            let now = self.options.clock.now_ms();
            if now >= window.end {
                return Err("window_missed");
            }
            if now >= window.start {
                return Ok(());
            }
            // Read again at least every second: the clock may be stepped (SNTP, a test's).
            let wait = u64::try_from(window.start - now).unwrap_or(0).min(1000);
            tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
        }
    }

    /// Downloads and verifies the image into the idle slot; answers why it failed.
    async fn download(
        &mut self,
        offer: &Offer,
        mut verifier: ImageVerifier,
        device: &DeviceHandle,
    ) -> Result<(), &'static str> {
        let manifest = verifier.manifest().clone();
        let size = manifest.size;
        let storage = |e: std::io::Error| {
            tracing::warn!(error = %e, "device: the idle slot cannot be written");
            "storage"
        };
        let mut partial = self.slots.partial(&manifest.sha256).map_err(storage)?;
        if partial.len() as u64 > size {
            partial.clear();
        }
        verifier.update(&partial).map_err(|_| "storage")?;
        let mut file = self
            .slots
            .write_idle(&manifest.sha256, partial.len() as u64)
            .map_err(storage)?;
        drop(partial);
        self.progress.send_replace(Progress {
            received: verifier.received(),
            size,
        });
        let url = if offer.url.starts_with("http://") || offer.url.starts_with("https://") {
            offer.url.clone()
        } else {
            format!("{}{}", self.options.origin.trim_end_matches('/'), offer.url)
        };
        let mut failures = 0;
        let mut reported = None;
        while verifier.received() < size {
            match self
                .fetch(&url, &manifest.sha256, size, &mut verifier, &mut file)
                .await
            {
                Ok(()) => failures = 0,
                Err(Attempt::Retry(why)) => {
                    failures += 1;
                    tracing::debug!(%why, failures, "device: download attempt failed");
                    if failures >= self.options.attempts {
                        return Err("download_failed");
                    }
                    tokio::time::sleep(Duration::from_millis(200 << failures.min(5))).await;
                }
                Err(Attempt::Refused(status)) => {
                    tracing::info!(status, "device: the download link was refused");
                    return Err("download_refused");
                }
                Err(Attempt::Storage(e)) => return Err(storage(e)),
                Err(Attempt::TooLong) => return Err("too_long"),
            }
            let progress = u8::try_from(verifier.received() * 100 / size.max(1)).unwrap_or(100);
            // Every 5 %, not every range: a 1.5 MiB image in 4 KiB ranges is 384 requests.
            if reported.is_none_or(|last: u8| progress >= last.saturating_add(5) || progress == 100)
            {
                reported = Some(progress);
                let _ = device
                    .ota_status(
                        &offer.deployment,
                        OtaState::Downloading,
                        Some(progress),
                        None,
                    )
                    .await;
            }
        }
        file.sync_all().map_err(storage)?;
        drop(file);
        let status = |state| device.ota_status(&offer.deployment, state, None, None);
        let _ = status(OtaState::Downloaded).await;
        let _ = status(OtaState::Verifying).await;
        if verifier.finish().is_err() {
            // Not the manifest's image: it must not resume from these bytes.
            let _ = self.slots.write_idle(&manifest.sha256, 0);
            return Err("sha256_mismatch");
        }
        Ok(())
    }

    /// One request: the next range (or the rest), written to the slot as it arrives.
    async fn fetch(
        &self,
        url: &str,
        sha256: &str,
        size: u64,
        verifier: &mut ImageVerifier,
        file: &mut std::fs::File,
    ) -> Result<(), Attempt> {
        let start = verifier.received();
        let end = match self.options.range_size {
            Some(n) => (start + n.max(1)).min(size) - 1,
            None => size - 1,
        };
        let ranged = self.options.range_size.is_some() || start > 0;
        let mut request = self.client.get(url);
        if ranged {
            request = request
                .header("range", format!("bytes={start}-{end}"))
                // The image is content-addressed: its ETag is its SHA-256.
                .header("if-range", format!("\"{sha256}\""));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = response.status().as_u16();
        match status {
            206 if ranged => {
                let from = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if from != Some(start) {
                    return Err(Attempt::Retry(format!(
                        "a range from {from:?}, not {start}"
                    )));
                }
            }
            200 if start == 0 => {}
            400..=499 => return Err(Attempt::Refused(status)),
            _ => return Err(Attempt::Retry(format!("status {status}"))),
        }
        let mut expected = end + 1 - start;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?
        {
            if chunk.len() as u64 > expected {
                return Err(Attempt::TooLong);
            }
            verifier.update(&chunk).map_err(|_| Attempt::TooLong)?;
            file.write_all(&chunk).map_err(Attempt::Storage)?;
            expected -= chunk.len() as u64;
            self.progress.send_replace(Progress {
                received: verifier.received(),
                size,
            });
        }
        if expected > 0 {
            return Err(Attempt::Retry(format!("{expected} bytes short")));
        }
        Ok(())
    }
}

/// Reports the update failed for `reason`, which the offer's answer says too.
async fn fail(device: &DeviceHandle, deployment: &str, reason: &str) -> Taken {
    let _ = device
        .ota_status(deployment, OtaState::Failed, None, Some(reason))
        .await;
    Taken::Answered(CommandReply::failed(reason))
}

/// The `reason` of a refused offer.
pub fn refusal_reason(error: &OtaError) -> &'static str {
    match error {
        OtaError::Manifest(ManifestError::UnknownKey(_)) => "unknown_key",
        OtaError::Manifest(ManifestError::BadSignature) => "bad_signature",
        OtaError::WrongTarget { .. } => "wrong_target",
        OtaError::WrongProject { .. } => "wrong_project",
        OtaError::Downgrade { .. } => "downgrade",
        OtaError::TooLong(_) => "too_long",
        OtaError::Mismatch => "sha256_mismatch",
    }
}
