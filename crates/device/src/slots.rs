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
    /// Its anti-rollback version (`esp_app_desc_t.secure_version`).
    #[serde(default)]
    pub secure_version: u32,
}

/// The `otadata` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Otadata {
    /// The slot the next boot starts.
    boot: Slot,
    /// What each slot holds.
    slots: [Option<SlotImage>; 2],
    /// The device's anti-rollback version: an ESP32 keeps it in eFuses, which only rise.
    #[serde(default)]
    secure_version: u32,
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

/// How a new image's self-test ended, at its first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    /// It works: the image confirms itself.
    Passed,
    /// It does not: the image marks itself invalid and the device reboots into the other slot.
    Failed,
    /// The device reset before the self-test ended (a crash, a watchdog, a power loss): the
    /// next boot refuses the image.
    Reset,
}

/// An update that did not stay, found at power-on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    /// The version refused.
    pub version: String,
    /// Why: `self_test` (it failed its self-test) or `boot_failed` (it never confirmed itself,
    /// or the bootloader refused it).
    pub reason: &'static str,
}

/// A device up and running after [`Slots::start`].
#[derive(Debug)]
pub struct Started {
    /// The slots, for the update client.
    pub slots: Slots,
    /// What runs (confirmed).
    pub boot: Boot,
    /// The update this power-on went back from, if any.
    pub rolled_back: Option<RolledBack>,
    /// How many boots it took (more than one after a rollback).
    pub boots: u32,
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
    /// with `factory_version` in `ota_0`, valid, secure version 0), applies the boot rules, and
    /// answers what runs.
    pub fn boot(dir: &Path, factory_version: &str) -> io::Result<(Self, Boot)> {
        Self::boot_factory(dir, factory_version, 0)
    }

    /// [`Slots::boot`], for a device flashed at the factory with an image of this anti-rollback
    /// version (its eFuses start there). A `new` image below the eFuses' version never starts:
    /// the bootloader refuses it as ESP-IDF's anti-rollback does.
    pub fn boot_factory(
        dir: &Path,
        factory_version: &str,
        factory_secure_version: u32,
    ) -> io::Result<(Self, Boot)> {
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
                        secure_version: factory_secure_version,
                    }),
                    None,
                ],
                secure_version: factory_secure_version,
            },
            Err(e) => return Err(e),
        };
        let mut rolled_back = None;
        let chosen = data.boot;
        let state = data.slots[chosen.index()].as_ref().map(|s| {
            if s.state == ImageState::New && s.secure_version < data.secure_version {
                ImageState::Aborted
            } else {
                s.state
            }
        });
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

    /// Powers on as firmware does: boots, and when a new image runs for the first time runs
    /// `self_test` on it (with its version) and confirms it, or rolls back to the other slot
    /// and boots again. Answers once an image that is confirmed runs.
    pub fn start(
        dir: &Path,
        factory_version: &str,
        factory_secure_version: u32,
        mut self_test: impl FnMut(&str) -> SelfTest,
    ) -> io::Result<Started> {
        let mut rolled_back = None;
        // A new image takes at most three boots: its first, a reboot after its self-test
        // failed (or a reset during it), and the boot of the old image.
        for boots in 1..=3 {
            let (mut slots, boot) =
                Self::boot_factory(dir, factory_version, factory_secure_version)?;
            if let Some(version) = boot.rolled_back.clone() {
                rolled_back.get_or_insert(RolledBack {
                    version,
                    reason: "boot_failed",
                });
            }
            if !boot.pending_verify {
                return Ok(Started {
                    slots,
                    boot,
                    rolled_back,
                    boots,
                });
            }
            match self_test(&boot.version) {
                SelfTest::Passed => {
                    slots.mark_valid()?;
                    let boot = Boot {
                        pending_verify: false,
                        ..boot
                    };
                    return Ok(Started {
                        slots,
                        boot,
                        rolled_back,
                        boots,
                    });
                }
                SelfTest::Failed => {
                    slots.mark_invalid()?;
                    rolled_back = Some(RolledBack {
                        version: boot.version,
                        reason: "self_test",
                    });
                }
                SelfTest::Reset => {}
            }
        }
        Err(io::Error::other("no image confirmed itself in three boots"))
    }

    fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec(&self.data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        crate::file::replace_durably(&self.dir.join(OTADATA), |out| out.write_all(&bytes))
    }

    /// The device's anti-rollback version: what its `hello` reports as `secure_version`.
    pub fn secure_version(&self) -> u32 {
        self.data.secure_version
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
    pub fn set_boot(&mut self, version: &str, secure_version: u32) -> io::Result<()> {
        let idle = self.running.other();
        if let Ok(file) = File::open(self.path(idle)) {
            file.sync_all()?;
        }
        self.data.slots[idle.index()] = Some(SlotImage {
            version: version.to_owned(),
            state: ImageState::New,
            secure_version,
        });
        self.data.boot = idle;
        self.save()?;
        let _ = fs::remove_file(self.dir.join(DOWNLOAD));
        Ok(())
    }

    /// The running image passed its self-test: it stays (`esp_ota_mark_app_valid_cancel_rollback`),
    /// and the device's anti-rollback version rises to the image's (as ESP-IDF burns the eFuses
    /// then), so that older images can no longer boot.
    pub fn mark_valid(&mut self) -> io::Result<()> {
        if let Some(image) = &mut self.data.slots[self.running.index()] {
            image.state = ImageState::Valid;
            self.data.secure_version = self.data.secure_version.max(image.secure_version);
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
