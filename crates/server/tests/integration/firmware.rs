//! Firmware uploads over HTTP: the raw image with its signed manifest in a header, checked while
//! it streams; typed problems for every refusal, and nothing stored of one.

use base64::Engine as _;
use serde_json::Value;
use unhidra_ota::image::build_test_image;
use unhidra_ota::manifest::{self, Manifest};

use crate::helpers::{PASSWORD, TestApp, problem, user};

fn manifest_header(image: &[u8], version: &str, key: &ed25519_dalek::SigningKey) -> String {
    use sha2::Digest;
    let facts = Manifest {
        sha256: sha2::Sha256::digest(image)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        size: image.len() as u64,
        version: version.into(),
        project: "greenhouse".into(),
        target: "esp32s3".into(),
        secure_version: 1,
    };
    let json = serde_json::to_string(&manifest::sign(facts, key)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(json)
}

#[tokio::test]
async fn an_admin_uploads_a_signed_image_and_every_refusal_is_typed() {
    let keys = tempfile::tempdir().unwrap();
    let key = manifest::generate_key();
    let trusted = keys.path().join("trusted.pem");
    std::fs::write(
        &trusted,
        manifest::public_pem(&key.verifying_key()).unwrap(),
    )
    .unwrap();
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| {
            c.admin_email = Some("root@example.com".into());
            c.admin_password = Some(unhidra_config::Secret::new(PASSWORD));
            c.ota_trusted_keys = Some(trusted.clone());
            c.ota_max_image_bytes = 64 * 1024;
        },
        None,
    )
    .await;
    let admin = crate::helpers::access_token(&app, "root@example.com").await;
    let (_, someone) = user(&app, "someone@example.com").await;
    let image = build_test_image(0x0009, "2.1.0", "greenhouse", 1, true);
    let post = |token: &str, header: Option<String>, body: Vec<u8>| {
        let mut request = app
            .client
            .post(app.url("/api/v1/firmware"))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .body(body);
        if let Some(header) = header {
            request = request.header("unhidra-manifest", header);
        }
        request.send()
    };
    let good = manifest_header(&image, "2.1.0", &key);

    problem(
        post(&someone, Some(good.clone()), image.clone())
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    let missing = problem(
        post(&admin, None, image.clone()).await.unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(missing["errors"][0]["code"], "missing_manifest");
    let wrong = manifest_header(&image, "2.1.1", &key);
    let mismatch = problem(
        post(&admin, Some(wrong), image.clone()).await.unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(mismatch["errors"][0]["code"], "manifest_mismatch");
    assert_eq!(mismatch["errors"][0]["field"], "/manifest/version");
    let stranger = manifest_header(&image, "2.1.0", &manifest::generate_key());
    let unknown = problem(
        post(&admin, Some(stranger), image.clone()).await.unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(unknown["errors"][0]["code"], "unknown_signing_key");
    let elf = b"\x7fELF not an app image".to_vec();
    problem(
        post(&admin, Some(manifest_header(&elf, "2.1.0", &key)), elf)
            .await
            .unwrap(),
        422,
        "not_an_esp_image",
    )
    .await;
    let huge = vec![0xE9; 70 * 1024];
    problem(
        post(&admin, Some(manifest_header(&huge, "9", &key)), huge)
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    let listed: Value = app
        .client
        .get(app.url("/api/v1/firmware"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed,
        serde_json::json!([]),
        "nothing of a refused upload is stored"
    );

    let stored = post(&admin, Some(good.clone()), image.clone())
        .await
        .unwrap();
    assert_eq!(stored.status(), 201);
    let stored: Value = stored.json().await.unwrap();
    assert_eq!(stored["version"], "2.1.0");
    assert_eq!(stored["target"], "esp32s3");
    assert_eq!(stored["kind"], "esp32");
    let sha = stored["sha256"].as_str().unwrap().to_owned();
    problem(
        post(&admin, Some(good), image.clone()).await.unwrap(),
        409,
        "firmware_exists",
    )
    .await;
    let one: Value = app
        .client
        .get(app.url(&format!("/api/v1/firmware/{sha}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["manifest"]["manifest"]["sha256"], sha.as_str());
    let retired: Value = app
        .client
        .post(app.url(&format!("/api/v1/firmware/{sha}/retire")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(retired["retired_at"].is_string());
    let gone = app
        .client
        .get(app.url(&format!("/api/v1/firmware/{}", "0".repeat(64))))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    problem(gone, 404, "not_found").await;
}
