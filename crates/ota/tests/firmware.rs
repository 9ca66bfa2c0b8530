//! Firmware uploads over a real store, on both backends: checked while they stream, compared
//! with their signed manifest, stored content-addressed, and nothing kept of a refused one.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use unhidra_core::{Email, ManualClock, Principal, Role, UserId};
use unhidra_identity::{AuditLog, RequestContext};
use unhidra_ota::image::build_test_image;
use unhidra_ota::manifest::{self, Manifest};
use unhidra_ota::{Firmware, FirmwareConfig, FirmwareError, TrustedKeys};
use unhidra_store::both_backends;
use unhidra_store::identity::NewUser;
use unhidra_store::testing::TestDb;
use uuid::Uuid;

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

async fn principal(db: &TestDb, email: &str, role: Role) -> Principal {
    let id = UserId::new();
    db.store
        .create_user(&NewUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: None,
            password_hash: "x".into(),
            role,
            now: start(),
        })
        .await
        .unwrap();
    Principal {
        user_id: id,
        role,
        session_id: Uuid::new_v4(),
        mfa: true,
    }
}

fn facts(image: &[u8], version: &str, target: &str, secure_version: u32) -> Manifest {
    use sha2::Digest;
    Manifest {
        sha256: sha2::Sha256::digest(image)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        size: image.len() as u64,
        version: version.into(),
        project: "greenhouse".into(),
        target: target.into(),
        secure_version,
    }
}

async fn upload(
    firmware: &Firmware,
    who: &Principal,
    manifest: &str,
    image: &[u8],
    generic: bool,
) -> Result<unhidra_ota::FirmwareView, FirmwareError> {
    let mut up = firmware.begin(who, manifest, generic).await?;
    for chunk in image.chunks(1000) {
        firmware.write(&mut up, chunk).await?;
    }
    firmware.finish(up, &RequestContext::default()).await
}

async fn uploads_are_checked_against_their_manifest_and_leave_nothing_when_refused(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // An upload a killed server left half-way is removed at the next start.
    std::fs::create_dir_all(dir.path().join("firmware")).unwrap();
    std::fs::write(dir.path().join("firmware/.upload-cut-short"), b"\xE9").unwrap();
    // So is an image renamed into place whose record was never stored.
    std::fs::write(dir.path().join("firmware").join("ab".repeat(32)), b"\xE9").unwrap();
    let key = manifest::generate_key();
    let clock: Arc<dyn unhidra_core::Clock> = Arc::new(ManualClock::new(start()));
    let firmware = Firmware::new(
        Arc::clone(&db.store),
        Arc::clone(&clock),
        FirmwareConfig {
            dir: dir.path().join("firmware"),
            max_bytes: 4096,
            trusted: TrustedKeys::new([key.verifying_key()]),
            require_admin_mfa: false,
            link_ttl: std::time::Duration::from_secs(600),
        },
        AuditLog::store_only(Arc::clone(&db.store), clock),
        unhidra_ota::OtaMetrics::default(),
    )
    .await
    .unwrap();
    let admin = principal(db, "root@example.com", Role::Admin).await;
    let user = principal(db, "user@example.com", Role::User).await;
    let image = build_test_image(0x0009, "2.1.0", "greenhouse", 3, true);
    let signed = |m: Manifest| serde_json::to_string(&manifest::sign(m, &key)).unwrap();
    let good = signed(facts(&image, "2.1.0", "esp32s3", 3));

    // Refusals, each before or while the bytes stream.
    assert!(matches!(
        upload(&firmware, &user, &good, &image, false).await,
        Err(FirmwareError::Forbidden)
    ));
    let stranger = serde_json::to_string(&manifest::sign(
        facts(&image, "2.1.0", "esp32s3", 3),
        &manifest::generate_key(),
    ))
    .unwrap();
    assert!(matches!(
        upload(&firmware, &admin, &stranger, &image, false).await,
        Err(FirmwareError::Signature(_))
    ));
    assert!(matches!(
        upload(&firmware, &admin, "{\"manifest\":1}", &image, false).await,
        Err(FirmwareError::BadManifest(..))
    ));
    for (manifest, field) in [
        (signed(facts(&image, "2.1.1", "esp32s3", 3)), "version"),
        (signed(facts(&image, "2.1.0", "esp32c3", 3)), "target"),
        (
            signed(facts(&image, "2.1.0", "esp32s3", 4)),
            "secure_version",
        ),
    ] {
        match upload(&firmware, &admin, &manifest, &image, false).await {
            Err(FirmwareError::Mismatch(got, ..)) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    // Facts a device could not report, or names with spaces, are refused before any byte.
    for (m, field) in [
        (
            Manifest {
                version: "2.1 beta".into(),
                ..facts(&image, "2.1.0", "esp32s3", 3)
            },
            "version",
        ),
        (
            Manifest {
                project: "green\u{0}house".into(),
                ..facts(&image, "2.1.0", "esp32s3", 3)
            },
            "project",
        ),
        (
            Manifest {
                target: "x".repeat(32),
                ..facts(&image, "2.1.0", "esp32s3", 3)
            },
            "target",
        ),
    ] {
        match upload(&firmware, &admin, &signed(m), &image, true).await {
            Err(FirmwareError::InvalidFact(got, _)) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut tampered = image.clone();
    tampered[400] ^= 1;
    assert!(matches!(
        upload(&firmware, &admin, &good, &tampered, false).await,
        Err(FirmwareError::Image(_)) | Err(FirmwareError::Mismatch("sha256", ..))
    ));
    let short = &image[..image.len() - 10];
    assert!(matches!(
        upload(
            &firmware,
            &admin,
            &signed(facts(short, "2.1.0", "esp32s3", 3)),
            short,
            false
        )
        .await,
        Err(FirmwareError::Image(_))
    ));
    let big = vec![0xE9u8; 5000];
    assert!(matches!(
        upload(
            &firmware,
            &admin,
            &signed(facts(&big, "9", "esp32", 0)),
            &big,
            true
        )
        .await,
        Err(FirmwareError::TooLarge(4096))
    ));
    // Four uploads at once on a node; a fifth waits for one to end.
    let open: Vec<_> = {
        let mut open = Vec::new();
        for _ in 0..unhidra_ota::firmware::MAX_CONCURRENT_UPLOADS {
            open.push(firmware.begin(&admin, &good, false).await.unwrap());
        }
        open
    };
    assert!(matches!(
        firmware.begin(&admin, &good, false).await,
        Err(FirmwareError::Busy)
    ));
    drop(open);
    let leftovers = std::fs::read_dir(dir.path().join("firmware"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "a refused upload leaves no file");

    // The good one is stored, named by its SHA-256, listed and retired.
    let stored = upload(&firmware, &admin, &good, &image, false)
        .await
        .unwrap();
    assert_eq!(
        (stored.kind.as_str(), stored.version.as_str()),
        ("esp32", "2.1.0")
    );
    assert_eq!(stored.idf_version.as_deref(), Some("v5.3.1"));
    let on_disk = std::fs::read(firmware.path_of(&stored.sha256)).unwrap();
    assert_eq!(on_disk, image);
    assert!(matches!(
        upload(&firmware, &admin, &good, &image, false).await,
        Err(FirmwareError::Conflict(_))
    ));
    assert_eq!(
        std::fs::read(firmware.path_of(&stored.sha256)).unwrap(),
        image
    );
    let generic_bytes = b"a generic image for another board".to_vec();
    let generic = signed(Manifest {
        target: "rp2040".into(),
        ..facts(&generic_bytes, "1.0", "rp2040", 0)
    });
    let other = upload(&firmware, &admin, &generic, &generic_bytes, true)
        .await
        .unwrap();
    assert_eq!(other.kind, "generic");
    let listed = firmware
        .list(&admin, Some("greenhouse"), Some("esp32s3"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(firmware.list(&admin, None, None).await.unwrap().len(), 2);
    assert!(matches!(
        firmware.list(&user, None, None).await,
        Err(FirmwareError::Forbidden)
    ));
    let retired = firmware
        .retire(
            &admin,
            &stored.sha256.to_uppercase(),
            &RequestContext::default(),
        )
        .await
        .unwrap();
    assert!(retired.retired_at.is_some());
    assert!(matches!(
        firmware.get(&admin, "not-a-hash").await,
        Err(FirmwareError::NotFound)
    ));
    assert_eq!(
        std::fs::read_dir(dir.path().join("firmware"))
            .unwrap()
            .count(),
        2
    );
}
both_backends!(uploads_are_checked_against_their_manifest_and_leave_nothing_when_refused);

/// Two nodes over one store: a link one makes opens its image on the other, for its device and
/// until it expires; a changed image, device, expiry or signature is refused.
async fn links_open_one_image_for_one_device_until_they_expire(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = manifest::generate_key();
    let clock = Arc::new(ManualClock::new(start()));
    let node = || {
        let clock: Arc<dyn unhidra_core::Clock> = clock.clone();
        Firmware::new(
            Arc::clone(&db.store),
            Arc::clone(&clock),
            FirmwareConfig {
                dir: dir.path().join("firmware"),
                max_bytes: 1 << 20,
                trusted: TrustedKeys::new([key.verifying_key()]),
                require_admin_mfa: false,
                link_ttl: std::time::Duration::from_secs(600),
            },
            AuditLog::store_only(Arc::clone(&db.store), clock),
            unhidra_ota::OtaMetrics::default(),
        )
    };
    let (a, b) = (node().await.unwrap(), node().await.unwrap());
    let admin = principal(db, "root@example.com", Role::Admin).await;
    let user = principal(db, "user@example.com", Role::User).await;
    let image = build_test_image(0x0009, "2.2.0", "greenhouse", 3, true);
    let signed =
        serde_json::to_string(&manifest::sign(facts(&image, "2.2.0", "esp32s3", 3), &key)).unwrap();
    let stored = upload(&a, &admin, &signed, &image, false).await.unwrap();

    let device = Uuid::new_v4();
    let link = a.sign_link(&stored.sha256, device);
    assert_eq!(link.expires_at, start() + chrono::Duration::seconds(600));
    let query: std::collections::HashMap<String, String> = link
        .url
        .split_once('?')
        .unwrap()
        .1
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(
        link.url
            .starts_with(&format!("/api/v1/firmware/{}/image?", stored.sha256))
    );
    let presented = unhidra_ota::PresentedLink {
        device: query["device"].parse().unwrap(),
        expires: query["expires"].parse().unwrap(),
        sig: &query["sig"],
    };
    b.check_link(&stored.sha256, &presented).unwrap();
    b.check_link(&stored.sha256.to_uppercase(), &presented)
        .unwrap();
    let other_sha = "0".repeat(64);
    for (sha, changed) in [
        (other_sha.as_str(), presented.clone()),
        (
            stored.sha256.as_str(),
            unhidra_ota::PresentedLink {
                device: Uuid::new_v4(),
                ..presented.clone()
            },
        ),
        (
            stored.sha256.as_str(),
            unhidra_ota::PresentedLink {
                expires: presented.expires + 3600,
                ..presented.clone()
            },
        ),
        (
            stored.sha256.as_str(),
            unhidra_ota::PresentedLink {
                sig: "AAAA",
                ..presented.clone()
            },
        ),
        (
            stored.sha256.as_str(),
            unhidra_ota::PresentedLink {
                sig: "not base64!",
                ..presented.clone()
            },
        ),
    ] {
        assert!(
            matches!(b.check_link(sha, &changed), Err(FirmwareError::LinkInvalid)),
            "{changed:?}"
        );
    }
    clock.advance(chrono::Duration::seconds(600));
    assert!(matches!(
        b.check_link(&stored.sha256, &presented),
        Err(FirmwareError::LinkExpired)
    ));

    // Opening: the facts and the very bytes; an unknown or malformed hash is not found.
    use tokio::io::AsyncReadExt;
    let mut opened = b.open(&stored.sha256).await.unwrap();
    assert_eq!(opened.size, image.len() as u64);
    assert_eq!(opened.file_name, "greenhouse-2.2.0.bin");
    let mut bytes = Vec::new();
    opened.file.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes, image);
    assert!(matches!(
        b.open(&other_sha).await,
        Err(FirmwareError::NotFound)
    ));
    assert!(matches!(
        b.open("../etc/passwd").await,
        Err(FirmwareError::NotFound)
    ));

    // Links by the API: admins only, for a device that exists.
    assert!(matches!(
        a.link(&user, &stored.sha256, device, &RequestContext::default())
            .await,
        Err(FirmwareError::Forbidden)
    ));
    assert!(matches!(
        a.link(&admin, &stored.sha256, device, &RequestContext::default())
            .await,
        Err(FirmwareError::NoSuchDevice)
    ));
    assert!(matches!(
        a.link(&admin, &other_sha, device, &RequestContext::default())
            .await,
        Err(FirmwareError::NotFound)
    ));
}
both_backends!(links_open_one_image_for_one_device_until_they_expire);
