//! ESP32 images checked from their bytes, in chunks of every size, and manifests signed and
//! verified.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use sha2::{Digest, Sha256};
use unhidra_ota::image::{ImageChecker, ImageError, build_test_image, check};
use unhidra_ota::manifest::{self, Manifest, SignatureError, TrustedKeys};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_good_image_gives_its_facts_in_any_chunking() {
    for hash in [true, false] {
        let image = build_test_image(0x0009, "2.1.0", "greenhouse", 3, hash);
        let whole = check(&image).unwrap();
        assert_eq!(whole.chip, "esp32s3");
        assert_eq!(whole.version, "2.1.0");
        assert_eq!(whole.project, "greenhouse");
        assert_eq!(whole.secure_version, 3);
        assert_eq!(whole.idf_version, "v5.3.1");
        assert_eq!(whole.elf_sha256, "ab".repeat(32));
        assert_eq!(whole.size, image.len() as u64);
        assert_eq!(whole.sha256, hex(&Sha256::digest(&image)));
        for size in [1, 3, 7, 16, 24, 31, 255, 4096] {
            let mut checker = ImageChecker::new();
            for chunk in image.chunks(size) {
                checker.update(chunk).unwrap();
            }
            assert_eq!(checker.finish().unwrap(), whole, "chunks of {size}");
        }
    }
}

#[test]
fn malformed_images_are_refused_with_their_code() {
    let good = build_test_image(0x0005, "1.0.0", "p", 0, true);
    let codes = |bytes: &[u8]| check(bytes).unwrap_err().code();
    let mut not_esp = good.clone();
    not_esp[0] = 0x7F;
    assert_eq!(codes(&not_esp), "not_an_esp_image");
    assert_eq!(codes(b"\x7fELF"), "not_an_esp_image");
    let mut no_segments = good.clone();
    no_segments[1] = 0;
    assert_eq!(codes(&no_segments), "malformed_image");
    let mut chip = good.clone();
    chip[12] = 0x42;
    assert_eq!(codes(&chip), "unknown_chip");
    let mut desc = good.clone();
    desc[32] ^= 0xFF;
    assert_eq!(codes(&desc), "no_app_description");
    // Any truncation, down to one byte short.
    for cut in [1, 23, 24, 31, 300, good.len() - 33, good.len() - 1] {
        assert_eq!(codes(&good[..cut]), "truncated_image", "cut at {cut}");
    }
    assert_eq!(check(&[]).unwrap_err(), ImageError::Truncated(0));
    // A flipped byte in a segment breaks the checksum (and the hash).
    let mut flipped = good.clone();
    flipped[500] ^= 1;
    assert_eq!(codes(&flipped), "corrupt_image");
    // A changed appended hash.
    let mut hash = good.clone();
    let last = hash.len() - 1;
    hash[last] ^= 1;
    assert_eq!(check(&hash).unwrap_err(), ImageError::Hash);
    let mut longer = good.clone();
    longer.extend_from_slice(b"appended");
    assert_eq!(codes(&longer), "trailing_data");
    // A refusal is known as soon as its bytes are read.
    let mut early = ImageChecker::new();
    assert!(early.update(&not_esp[..1]).is_err());
    assert!(early.error().is_some());
}

#[test]
fn manifests_are_signed_and_verified_against_trusted_keys_only() {
    let key = manifest::generate_key();
    let pem = manifest::private_pem(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let again = manifest::read_private_pem(&pem).unwrap();
    assert_eq!(again.to_bytes(), key.to_bytes());
    let public = manifest::public_pem(&key.verifying_key()).unwrap();
    let other = manifest::generate_key();
    let trust_text = format!(
        "{}\n{}",
        manifest::public_pem(&other.verifying_key()).unwrap(),
        public
    );
    let trusted = TrustedKeys::from_pem(&trust_text).unwrap();
    assert_eq!(trusted.ids().len(), 2);

    let facts = Manifest {
        sha256: "00".repeat(32),
        size: 1234,
        version: "2.1.0".into(),
        project: "greenhouse".into(),
        target: "esp32s3".into(),
        secure_version: 3,
    };
    let signed = manifest::sign(facts.clone(), &key);
    assert_eq!(signed.key_id, manifest::key_id(&key.verifying_key()));
    assert_eq!(trusted.verify(&signed).unwrap(), &facts);
    // The signed bytes are the domain and the compact JSON in field order.
    assert_eq!(
        String::from_utf8(facts.signed_bytes()).unwrap(),
        "unhidra-firmware-manifest-v1\n{\"sha256\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"size\":1234,\"version\":\"2.1.0\",\"project\":\"greenhouse\",\"target\":\"esp32s3\",\"secure_version\":3}"
    );

    // Any field changed, a signature of another key under this key's id, an unknown key.
    let mut changed = signed.clone();
    changed.manifest.secure_version = 4;
    assert_eq!(
        trusted.verify(&changed).unwrap_err(),
        SignatureError::BadSignature
    );
    let mut forged = manifest::sign(facts.clone(), &manifest::generate_key());
    assert!(matches!(
        trusted.verify(&forged),
        Err(SignatureError::UnknownKey(_))
    ));
    forged.key_id = signed.key_id.clone();
    assert_eq!(
        trusted.verify(&forged).unwrap_err(),
        SignatureError::BadSignature
    );
    let mut garbage = signed.clone();
    garbage.signature = "not base64!".into();
    assert_eq!(
        trusted.verify(&garbage).unwrap_err(),
        SignatureError::BadSignature
    );
    assert!(TrustedKeys::default().verify(&signed).is_err());
    assert!(matches!(
        TrustedKeys::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"),
        Err(SignatureError::BadKey(_))
    ));
    // The JSON form round-trips and refuses unknown fields.
    let text = serde_json::to_string(&signed).unwrap();
    assert_eq!(
        serde_json::from_str::<unhidra_ota::SignedManifest>(&text).unwrap(),
        signed
    );
    assert!(
        serde_json::from_str::<unhidra_ota::SignedManifest>(
            &text.replace("\"key_id\"", "\"extra\":1,\"key_id\"")
        )
        .is_err()
    );
}
