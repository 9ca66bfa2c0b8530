//! A firmware offer is checked against the keys the device trusts, its project, target and its
//! anti-rollback version, and the image against the manifest, chunk by chunk.

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use unhidra_device::ota::{DeviceImage, ImageVerifier, OtaError};
use unhidra_protocol::firmware::{Manifest, SignedManifest, key_id};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signed(image: &[u8], key: &SigningKey, secure_version: u32) -> SignedManifest {
    use sha2::Digest;
    let manifest = Manifest {
        sha256: hex(&sha2::Sha256::digest(image)),
        size: image.len() as u64,
        version: "2.0.0".into(),
        project: "greenhouse".into(),
        target: "esp32s3".into(),
        secure_version,
    };
    let signature = key.sign(&manifest.signed_bytes());
    SignedManifest {
        key_id: key_id(key.verifying_key().as_bytes()),
        signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        manifest,
    }
}

fn device() -> DeviceImage {
    DeviceImage {
        project: "greenhouse".into(),
        target: "esp32s3".into(),
        secure_version: 2,
    }
}

#[test]
fn an_offer_is_checked_before_the_download_and_the_image_before_the_switch() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let trusted = [key.verifying_key().to_bytes()];
    let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let offer = signed(&image, &key, 2);

    let mut verifier = ImageVerifier::new(&offer, &trusted, &device()).unwrap();
    for chunk in image.chunks(4096) {
        verifier.update(chunk).unwrap();
    }
    assert_eq!(verifier.received(), 10_000);
    assert_eq!(verifier.finish().unwrap().version, "2.0.0");

    // One byte changed, one missing, one too many.
    let mut tampered = image.clone();
    tampered[5000] ^= 1;
    let mut v = ImageVerifier::new(&offer, &trusted, &device()).unwrap();
    v.update(&tampered).unwrap();
    assert_eq!(v.finish().unwrap_err(), OtaError::Mismatch);
    let mut v = ImageVerifier::new(&offer, &trusted, &device()).unwrap();
    v.update(&image[..9_999]).unwrap();
    assert_eq!(v.finish().unwrap_err(), OtaError::Mismatch);
    let mut v = ImageVerifier::new(&offer, &trusted, &device()).unwrap();
    v.update(&image).unwrap();
    assert_eq!(v.update(&[0]).unwrap_err(), OtaError::TooLong(10_000));

    // An unknown key, a manifest changed after signing, another target, a downgrade.
    let stranger = SigningKey::from_bytes(&[9; 32]);
    assert!(matches!(
        ImageVerifier::new(&signed(&image, &stranger, 2), &trusted, &device()),
        Err(OtaError::Manifest(_))
    ));
    let mut changed = offer.clone();
    changed.manifest.secure_version = 3;
    assert!(matches!(
        ImageVerifier::new(&changed, &trusted, &device()),
        Err(OtaError::Manifest(_))
    ));
    let other = DeviceImage {
        target: "esp32c3".into(),
        ..device()
    };
    assert!(matches!(
        ImageVerifier::new(&offer, &trusted, &other),
        Err(OtaError::WrongTarget { .. })
    ));
    let product = DeviceImage {
        project: "weather-station".into(),
        ..device()
    };
    assert!(matches!(
        ImageVerifier::new(&offer, &trusted, &product),
        Err(OtaError::WrongProject { .. })
    ));
    assert_eq!(
        ImageVerifier::new(&signed(&image, &key, 1), &trusted, &device()).unwrap_err(),
        OtaError::Downgrade {
            image: 1,
            device: 2
        }
    );
}
