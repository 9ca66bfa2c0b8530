//! Firmware uploads over HTTP: the raw image with its signed manifest in a header, checked while
//! it streams; typed problems for every refusal, and nothing stored of one.

use base64::Engine as _;
use serde_json::Value;
use unhidra_ota::image::build_test_image;
use unhidra_ota::manifest::{self, Manifest};

use crate::helpers::{PASSWORD, TestApp, problem, user};

fn manifest_header(image: &[u8], version: &str, key: &ed25519_dalek::SigningKey) -> String {
    signed_header(image, version, 1, key)
}

/// The `Unhidra-Manifest` header of a `greenhouse` image for `esp32s3`, signed with `key`.
pub(crate) fn signed_header(
    image: &[u8],
    version: &str,
    secure_version: u32,
    key: &ed25519_dalek::SigningKey,
) -> String {
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
        secure_version,
    };
    let json = serde_json::to_string(&manifest::sign(facts, key)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(json)
}

/// A folder with a PEM file of `key`'s public half, for `ota_trusted_keys`; and the file.
pub(crate) fn trusted_keys(
    key: &ed25519_dalek::SigningKey,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let keys = tempfile::tempdir().unwrap();
    let trusted = keys.path().join("trusted.pem");
    std::fs::write(
        &trusted,
        manifest::public_pem(&key.verifying_key()).unwrap(),
    )
    .unwrap();
    (keys, trusted)
}

/// A server that trusts `key`'s manifests, with `root@example.com` its admin; the folder holds
/// the trusted key's file.
async fn app_trusting(key: &ed25519_dalek::SigningKey) -> (tempfile::TempDir, TestApp) {
    let (keys, trusted) = trusted_keys(key);
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
    (keys, app)
}

#[tokio::test]
async fn an_admin_uploads_a_signed_image_and_every_refusal_is_typed() {
    let key = manifest::generate_key();
    let (_keys, app) = app_trusting(&key).await;
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

/// Downloads as `esp_https_ota` and a resuming client make them: with the device's key or a
/// signed link, `HEAD` for the length, ranges with 206 and `Content-Range`, a cut download
/// resumed with `If-Range`, 416 past the end, 304 for a copy already held; every refusal typed.
#[tokio::test]
async fn devices_download_images_in_ranges_with_their_key_or_a_signed_link() {
    use sha2::Digest;
    let key = manifest::generate_key();
    let (_keys, app) = app_trusting(&key).await;
    let admin = crate::helpers::access_token(&app, "root@example.com").await;
    let (_, someone) = user(&app, "someone@example.com").await;
    let image = build_test_image(0x0009, "3.0.0", "greenhouse", 1, true);
    let stored = app
        .client
        .post(app.url("/api/v1/firmware"))
        .bearer_auth(&admin)
        .header("unhidra-manifest", manifest_header(&image, "3.0.0", &key))
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 201);
    let sha = sha2::Sha256::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let made: Value = app
        .client
        .post(app.url("/api/v1/devices"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "name": "bench-1", "model": "esp32-s3" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let device_key = made["key"].as_str().unwrap().to_owned();
    let device_id = made["device"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/firmware/{sha}/image");
    let size = image.len();
    let etag = format!("\"{sha}\"");
    let get = |headers: &[(&str, &str)]| {
        let mut request = app.client.get(app.url(&path)).bearer_auth(&device_key);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    // The whole image, and its headers; HEAD gives the length alone. A client that accepts
    // gzip still gets the bytes as they are, with their length and ranges.
    let whole = get(&[("accept-encoding", "gzip")]).await.unwrap();
    assert_eq!(whole.status(), 200);
    let h = whole.headers().clone();
    assert_eq!(h["etag"], etag.as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["content-length"], size.to_string().as_str());
    assert!(h.get("content-encoding").is_none());
    assert_eq!(whole.bytes().await.unwrap(), image.as_slice());
    let head = app
        .client
        .head(app.url(&path))
        .bearer_auth(&device_key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], size.to_string().as_str());
    assert_eq!(head.headers()["etag"], etag.as_str());
    assert!(head.bytes().await.unwrap().is_empty());

    // 4 KiB ranges, as partial_http_download asks, put the image back together.
    let mut joined = Vec::new();
    let mut start = 0;
    while start < size {
        let end = (start + 4096).min(size) - 1;
        let part = get(&[("range", &format!("bytes={start}-{end}"))])
            .await
            .unwrap();
        assert_eq!(part.status(), 206);
        assert_eq!(
            part.headers()["content-range"],
            format!("bytes {start}-{end}/{size}").as_str()
        );
        joined.extend_from_slice(&part.bytes().await.unwrap());
        start = end + 1;
    }
    assert_eq!(joined, image);

    // A download cut in the middle resumes where it stopped, while the image is the same one.
    let mut cut = Vec::new();
    let mut stream = get(&[]).await.unwrap();
    while cut.len() < size / 2 {
        cut.extend_from_slice(&stream.chunk().await.unwrap().unwrap());
    }
    drop(stream);
    // The connection broke half-way (what arrived past it is lost).
    cut.truncate(size / 2);
    let rest = get(&[
        ("range", &format!("bytes={}-", cut.len())),
        ("if-range", &etag),
    ])
    .await
    .unwrap();
    assert_eq!(rest.status(), 206);
    cut.extend_from_slice(&rest.bytes().await.unwrap());
    assert_eq!(
        sha2::Sha256::digest(&cut).as_slice(),
        sha2::Sha256::digest(&image).as_slice()
    );
    let changed = get(&[("range", "bytes=10-"), ("if-range", "\"another\"")])
        .await
        .unwrap();
    assert_eq!(changed.status(), 200, "another copy gets the whole image");
    assert_eq!(changed.bytes().await.unwrap().len(), size);
    let tail = get(&[("range", "bytes=-100")]).await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap(), &image[size - 100..]);
    let past = get(&[("range", &format!("bytes={size}-"))]).await.unwrap();
    assert_eq!(
        past.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    let past = problem(past, 416, "range_not_satisfiable").await;
    assert_eq!(past["size"], size);
    let held = get(&[("if-none-match", &etag)]).await.unwrap();
    assert_eq!(held.status(), 304);

    // Who may download: a device's key, an admin; not a user, nor no one.
    for (token, status) in [
        (None, 401),
        (Some(someone.as_str()), 403),
        (Some(admin.as_str()), 200),
        (
            Some("unh_dk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            401,
        ),
    ] {
        let mut request = app.client.get(app.url(&path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), status, "{token:?}");
    }
    let unknown = app
        .client
        .get(app.url(&format!("/api/v1/firmware/{}/image", "0".repeat(64))))
        .bearer_auth(&device_key)
        .send()
        .await
        .unwrap();
    problem(unknown, 404, "not_found").await;

    // A signed link: made by an admin for one device, it needs no header and nothing else.
    let link = |token: &str, device: &str| {
        app.client
            .post(app.url(&format!("/api/v1/firmware/{sha}/links")))
            .bearer_auth(token)
            .json(&serde_json::json!({ "device": device }))
            .send()
    };
    problem(link(&someone, &device_id).await.unwrap(), 403, "forbidden").await;
    let nobody = problem(
        link(&admin, &uuid::Uuid::new_v4().to_string())
            .await
            .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(nobody["errors"][0]["field"], "/device");
    let made = link(&admin, &device_id).await.unwrap();
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    let url = made["url"].as_str().unwrap().to_owned();
    assert!(made["expires_at"].is_string());
    let by_link = app
        .client
        .get(app.url(&url))
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(by_link.status(), 206);
    assert_eq!(by_link.bytes().await.unwrap(), &image[..100]);
    let tampered = url.replace(&device_id, &uuid::Uuid::new_v4().to_string());
    problem(app.get(&tampered).await, 403, "link_invalid").await;
    let stretched = {
        let (head, expires) = url.split_once("expires=").unwrap();
        let (value, tail) = expires.split_once('&').unwrap();
        format!("{head}expires={}&{tail}", value.parse::<i64>().unwrap() + 1)
    };
    problem(app.get(&stretched).await, 403, "link_invalid").await;
    let unsigned = url.split_once("&sig=").unwrap().0.to_owned();
    problem(app.get(&unsigned).await, 403, "link_invalid").await;
    let expired = url.replace(&url.split_once("expires=").unwrap().1[..10], "1000000000");
    problem(app.get(&expired).await, 403, "link_invalid").await;
}
