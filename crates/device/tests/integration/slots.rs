//! ESP-IDF's A/B slots on a host: an update boots as pending, confirms itself or rolls back,
//! a boot that never confirmed rolls back at the next power-on, and a cut download resumes.

use std::io::Write as _;

use sha2::Digest as _;
use unhidra_device::slots::{ImageState, Slot, Slots};

fn sha(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Downloads `image` into the idle slot whole and makes it boot next.
fn install(slots: &mut Slots, image: &[u8], version: &str) {
    install_secure(slots, image, version, 0);
}

fn install_secure(slots: &mut Slots, image: &[u8], version: &str, secure_version: u32) {
    let mut file = slots.write_idle(&sha(image), 0).unwrap();
    file.write_all(image).unwrap();
    drop(file);
    slots.set_boot(version, secure_version).unwrap();
}

#[test]
fn an_update_confirms_itself_after_its_first_boot_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (mut slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!(
        (boot.running, boot.version.as_str(), boot.pending_verify),
        (Slot::Ota0, "1.0.0", false)
    );
    install(&mut slots, b"image two", "2.0.0");
    assert_eq!(slots.next_boot(), Slot::Ota1);
    assert_eq!(std::fs::read(slots.path(Slot::Ota1)).unwrap(), b"image two");
    drop(slots);

    // The reboot: the new image runs, pending its self-test; confirmed, it stays.
    let (mut slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!(
        (boot.running, boot.version.as_str(), boot.pending_verify),
        (Slot::Ota1, "2.0.0", true)
    );
    assert_eq!(boot.running.name(), "ota_1");
    slots.mark_valid().unwrap();
    drop(slots);
    let (slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.pending_verify), (Slot::Ota1, false));
    assert_eq!(boot.rolled_back, None);
    assert_eq!(slots.image(Slot::Ota0).unwrap().state, ImageState::Valid);
}

#[test]
fn a_failed_self_test_or_a_boot_that_never_confirms_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut slots, _) = Slots::boot(dir.path(), "1.0.0").unwrap();
    install(&mut slots, b"bad self-test", "2.0.0");
    drop(slots);
    let (mut slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert!(boot.pending_verify);
    // The self-test fails: the image is refused and the old one boots.
    slots.mark_invalid().unwrap();
    drop(slots);
    let (mut slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.version.as_str()), (Slot::Ota0, "1.0.0"));
    assert_eq!(slots.image(Slot::Ota1).unwrap().state, ImageState::Aborted);

    // A boot loop: the new image starts and the device resets before it confirms; the next
    // power-on goes back to the old slot and says which version it refused.
    install(&mut slots, b"boot loop", "2.0.1");
    drop(slots);
    let (slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.pending_verify), (Slot::Ota1, true));
    drop(slots);
    let (slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.version.as_str()), (Slot::Ota0, "1.0.0"));
    assert_eq!(boot.rolled_back.as_deref(), Some("2.0.1"));
    assert_eq!(slots.image(Slot::Ota1).unwrap().state, ImageState::Aborted);
    drop(slots);
    // Refused for good: later boots stay on the old slot and report no new rollback.
    let (mut slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.rolled_back), (Slot::Ota0, None));
    // With nothing valid to go back to, an image cannot mark itself invalid.
    assert!(slots.mark_invalid().is_err());
}

#[test]
fn a_cut_download_resumes_and_a_power_loss_never_breaks_otadata() {
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let digest = sha(&image);
    let (mut slots, _) = Slots::boot(dir.path(), "1.0.0").unwrap();
    let mut file = slots.write_idle(&digest, 0).unwrap();
    file.write_all(&image[..20_000]).unwrap();
    drop(file);
    drop(slots);

    // Power lost mid-download, and mid-write of otadata's next version.
    std::fs::write(dir.path().join("otadata.json.tmp"), b"{\"boot\": \"ot").unwrap();
    let (mut slots, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.version.as_str()), (Slot::Ota0, "1.0.0"));
    assert!(slots.partial("another image").unwrap().is_empty());
    let partial = slots.partial(&digest).unwrap();
    assert_eq!(partial, &image[..20_000]);
    let mut file = slots.write_idle(&digest, partial.len() as u64).unwrap();
    file.write_all(&image[20_000..]).unwrap();
    drop(file);
    assert_eq!(std::fs::read(slots.path(Slot::Ota1)).unwrap(), image);
    slots.set_boot("2.0.0", 0).unwrap();
    assert!(
        slots.partial(&digest).unwrap().is_empty(),
        "a finished download is no longer partial"
    );
    drop(slots);
    let (_, boot) = Slots::boot(dir.path(), "1.0.0").unwrap();
    assert_eq!((boot.running, boot.version.as_str()), (Slot::Ota1, "2.0.0"));
}

#[test]
fn a_confirmed_image_raises_the_anti_rollback_version_and_older_images_never_boot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut slots, _) = Slots::boot_factory(dir.path(), "1.0.0", 1).unwrap();
    assert_eq!(slots.secure_version(), 1);
    install_secure(&mut slots, b"image two", "2.0.0", 3);
    drop(slots);
    let (mut slots, boot) = Slots::boot_factory(dir.path(), "1.0.0", 1).unwrap();
    assert!(boot.pending_verify);
    // Not confirmed yet: the eFuses have not moved.
    assert_eq!(slots.secure_version(), 1);
    slots.mark_valid().unwrap();
    assert_eq!(slots.secure_version(), 3);
    // An image below it is refused by the bootloader, as the eFuses would refuse it.
    install_secure(&mut slots, b"old image", "1.5.0", 2);
    drop(slots);
    let (slots, boot) = Slots::boot_factory(dir.path(), "1.0.0", 1).unwrap();
    assert_eq!(
        (boot.version.as_str(), boot.pending_verify),
        ("2.0.0", false)
    );
    assert_eq!(boot.rolled_back.as_deref(), Some("1.5.0"));
    assert_eq!(slots.secure_version(), 3);
}
