//! ESP-IDF's A/B app slots on a host, for the simulator and for tests of an update's whole
//! life: two slot files (`ota_0.bin`, `ota_1.bin`) and an `otadata` record that says which
//! slot boots and the state of each image, with the semantics of ESP-IDF's app rollback
//! (`CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`):
//!
//! - a downloaded and verified image is written to the slot that is not running, and
//!   [`Slots::set_boot`] makes it boot next as `new`;
//! - at the next [`Slots::boot`] a `new` image starts as `pending_verify`: the firmware runs its
//!   self-test and calls [`Slots::mark_valid`] (`esp_ota_mark_app_valid_cancel_rollback`) or
//!   [`Slots::mark_invalid`] (`esp_ota_mark_app_invalid_rollback_and_reboot`);
//! - an image still `pending_verify` at a boot never confirmed itself (it crashed, hung, or
//!   lost power before its self-test ended): it becomes `aborted` and the other slot boots —
//!   the rollback that keeps a bad update from bricking a device.
//!
//! Every change of `otadata` replaces the file durably, so a power loss at any moment leaves
//! the old record or the new one. A download into the idle slot may be cut at any point and
//! resumed ([`Slots::partial`]); it never touches the running slot.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One of the two app slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// `ota_0`.
    Ota0,
    /// `ota_1`.
    Ota1,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            Self::Ota0 => Self::Ota1,
            Self::Ota1 => Self::Ota0,
        }
    }

    /// Its partition name, as a device's `hello` reports it (`ota_0`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ota0 => "ota_0",
            Self::Ota1 => "ota_1",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Ota0 => 0,
            Self::Ota1 => 1,
        }
    }
}

/// An image's state, as ESP-IDF's `esp_ota_img_states_t` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Written and chosen to boot, not started yet.
    New,
    /// Started once; waits for its self-test to confirm it.
    PendingVerify,
    /// Confirmed: it boots from now on.
    Valid,
    /// Refused (self-test failed, or it never confirmed itself): never booted again.
    Aborted,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImage {
    /// The image's version.
    pub version: String,
    /// Its state.
    pub state: ImageState,
}

/// The `otadata` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Otadata {
    /// The slot the next boot starts.
    boot: Slot,
    /// What each slot holds.
    slots: [Option<SlotImage>; 2],
}

/// What a boot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// The slot running now.
    pub running: Slot,
    /// The version running now.
    pub version: String,
    /// The image runs for the first time and must confirm itself (or roll back).
    pub pending_verify: bool,
    /// The slot chosen to boot held an image that never confirmed itself: this boot went back
    /// to the other slot, and the refused version is this.
    pub rolled_back: Option<String>,
}

/// The download into the idle slot under way, kept beside the slots so that it can resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Download {
    /// The SHA-256 of the image being downloaded (hex).
    sha256: String,
}

/// Two app slots and their `otadata`, in a folder.
#[derive(Debug)]
pub struct Slots {
    dir: PathBuf,
    data: Otadata,
    running: Slot,
}

const OTADATA: &str = "otadata.json";
const DOWNLOAD: &str = "download.json";

impl Slots {
    /// Powers on: reads `otadata` in `dir` (a device that has none was flashed at the factory
    /// with `factory_version` in `ota_0`, valid), applies the boot rules, and answers what
    /// runs.
    pub fn boot(dir: &Path, factory_version: &str) -> io::Result<(Self, Boot)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(OTADATA);
        let mut data = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Otadata {
                boot: Slot::Ota0,
                slots: [
                    Some(SlotImage {
                        version: factory_version.to_owned(),
                        state: ImageState::Valid,
                    }),
                    None,
                ],
            },
            Err(e) => return Err(e),
        };
        let mut rolled_back = None;
        let chosen = data.boot;
        let state = data.slots[chosen.index()].as_ref().map(|s| s.state);
        let running = match state {
            Some(ImageState::New) => {
                if let Some(image) = &mut data.slots[chosen.index()] {
                    image.state = ImageState::PendingVerify;
                }
                chosen
            }
            Some(ImageState::Valid) => chosen,
            Some(ImageState::PendingVerify | ImageState::Aborted) | None => {
                // It started before and never confirmed itself (or cannot start): refused for
                // good, and the other slot boots.
                if let Some(image) = &mut data.slots[chosen.index()] {
                    image.state = ImageState::Aborted;
                    rolled_back = Some(image.version.clone());
                }
                data.boot = chosen.other();
                chosen.other()
            }
        };
        let Some(image) = data.slots[running.index()].clone() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no slot holds an image that can boot",
            ));
        };
        let slots = Self {
            dir: dir.to_owned(),
            data,
            running,
        };
        slots.save()?;
        let boot = Boot {
            running,
            version: image.version,
            pending_verify: image.state == ImageState::PendingVerify,
            rolled_back,
        };
        Ok((slots, boot))
    }

    fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec(&self.data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        crate::file::replace_durably(&self.dir.join(OTADATA), |out| out.write_all(&bytes))
    }

    /// The slot running now.
    pub fn running(&self) -> Slot {
        self.running
    }

    /// What a slot holds.
    pub fn image(&self, slot: Slot) -> Option<&SlotImage> {
        self.data.slots[slot.index()].as_ref()
    }

    /// The slot the next boot starts.
    pub fn next_boot(&self) -> Slot {
        self.data.boot
    }

    /// The file of a slot.
    pub fn path(&self, slot: Slot) -> PathBuf {
        self.dir.join(format!("{}.bin", slot.name()))
    }

    /// The bytes of the image with this SHA-256 already in the idle slot from a download that
    /// was cut, to feed the verifier again and resume with `Range: bytes=N-`; empty when the
    /// idle slot holds something else (the download starts over).
    pub fn partial(&self, sha256: &str) -> io::Result<Vec<u8>> {
        let Ok(bytes) = fs::read(self.dir.join(DOWNLOAD)) else {
            return Ok(Vec::new());
        };
        match serde_json::from_slice::<Download>(&bytes) {
            Ok(d) if d.sha256 == sha256 => {}
            _ => return Ok(Vec::new()),
        }
        let mut partial = Vec::new();
        match File::open(self.path(self.running.other())) {
            Ok(mut file) => {
                file.read_to_end(&mut partial)?;
                Ok(partial)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Opens the idle slot for the download of the image with this SHA-256: appending after
    /// `resume_at` bytes already there (what [`Slots::partial`] gave), or from its start. The
    /// idle slot's old image is forgotten: it can no longer boot.
    pub fn write_idle(&mut self, sha256: &str, resume_at: u64) -> io::Result<File> {
        let idle = self.running.other();
        if self.data.slots[idle.index()].take().is_some() {
            if self.data.boot == idle {
                self.data.boot = self.running;
            }
            self.save()?;
        }
        let download = serde_json::to_vec(&Download {
            sha256: sha256.to_owned(),
        })
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        crate::file::replace_durably(&self.dir.join(DOWNLOAD), |out| out.write_all(&download))?;
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.path(idle))?;
        file.set_len(resume_at)?;
        file.seek(io::SeekFrom::Start(resume_at))?;
        Ok(file)
    }

    /// After the image in the idle slot is whole and verified (its size, SHA-256 and signed
    /// manifest: `ota::ImageVerifier`): it boots next, as `new` (`esp_ota_set_boot_partition`).
    pub fn set_boot(&mut self, version: &str) -> io::Result<()> {
        let idle = self.running.other();
        if let Ok(file) = File::open(self.path(idle)) {
            file.sync_all()?;
        }
        self.data.slots[idle.index()] = Some(SlotImage {
            version: version.to_owned(),
            state: ImageState::New,
        });
        self.data.boot = idle;
        self.save()?;
        let _ = fs::remove_file(self.dir.join(DOWNLOAD));
        Ok(())
    }

    /// The running image passed its self-test: it stays (`esp_ota_mark_app_valid_cancel_rollback`).
    pub fn mark_valid(&mut self) -> io::Result<()> {
        if let Some(image) = &mut self.data.slots[self.running.index()] {
            image.state = ImageState::Valid;
        }
        self.save()
    }

    /// The running image failed its self-test: it is refused for good and the other slot
    /// boots next (`esp_ota_mark_app_invalid_rollback_and_reboot`, before the reboot). Refused
    /// when the other slot holds no image that can boot.
    pub fn mark_invalid(&mut self) -> io::Result<()> {
        let other = self.running.other();
        match self.data.slots[other.index()].as_ref().map(|s| s.state) {
            Some(ImageState::Valid) => {}
            _ => {
                return Err(io::Error::other(
                    "the other slot holds no valid image to roll back to",
                ));
            }
        }
        if let Some(image) = &mut self.data.slots[self.running.index()] {
            image.state = ImageState::Aborted;
        }
        self.data.boot = other;
        self.save()
    }
}
