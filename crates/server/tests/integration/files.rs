//! Files over HTTP: uploads typed by their content and named safely, refused while they stream
//! past the size cap or the quota, with nothing kept of a refusal; downloads by access, with
//! entity tags and ranges, served so that nothing runs in Unhidra's origin.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, default_backend, problem, user, with_admin};

/// A tiny PNG (1×1, transparent).
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x00, 0x02, 0x00,
    0x00, 0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44,
    0xae, 0x42, 0x60, 0x82,
];

async fn app(tweak: impl FnOnce(&mut unhidra_config::Config)) -> TestApp {
    TestApp::spawn_with(
        default_backend(),
        |c| {
            with_admin(c);
            tweak(c);
        },
        None,
    )
    .await
}

async fn upload(app: &TestApp, token: &str, name: &str, body: Vec<u8>) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/files"))
        .query(&[("name", name)])
        .bearer_auth(token)
        // Not believed: the type comes from the content.
        .header("content-type", "image/png")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The objects in the files folder (whatever their depth).
fn objects(app: &TestApp) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&app.state.config().data_dir.join("files"), &mut out);
    out
}

async fn usage(app: &TestApp, token: &str) -> Value {
    app.client
        .get(app.url("/api/v1/me/usage"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn files_are_typed_by_their_content_and_served_with_tags_ranges_and_a_sandbox() {
    let app = app(|_| {}).await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (_, bob) = user(&app, "bob@example.com").await;
    let made = upload(&app, &alice, "../../holiday\u{202e}gnp.png", PNG.to_vec()).await;
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    assert_eq!(made["name"], "holidaygnp.png");
    assert_eq!(made["content_type"], "image/png");
    assert_eq!(made["size"], PNG.len());
    assert_eq!(made["state"], "ready");
    assert_eq!(made["access"], "private");
    let id = made["id"].as_str().unwrap().to_owned();
    // A name without an extension gets its type's; text is text.
    let notes = upload(&app, &alice, "notes", b"temp,20.5\n".to_vec()).await;
    assert_eq!(notes.status(), 201);
    let notes: Value = notes.json().await.unwrap();
    assert_eq!(
        (&notes["name"], &notes["content_type"]),
        (&json!("notes.txt"), &json!("text/plain"))
    );
    assert_eq!(
        usage(&app, &alice).await,
        json!({ "bytes": PNG.len() + 10, "files": 2, "max_bytes": 1_073_741_824_u64,
                "max_files": 10_000, "custom": false })
    );
    let listed: Value = app
        .client
        .get(app.url("/api/v1/files?limit=1"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["id"], notes["id"]);
    let cursor = listed["next_cursor"].as_str().unwrap();
    let rest: Value = app
        .client
        .get(app.url("/api/v1/files"))
        .query(&[("cursor", cursor)])
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["items"][0]["id"], id.as_str());
    assert!(rest["next_cursor"].is_null());

    // The bytes, as an attachment that cannot run here, with a strong tag.
    let path = format!("/api/v1/files/{id}/content");
    let got = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let h = got.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["content-security-policy"], "default-src 'none'; sandbox");
    assert!(
        h["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"holidaygnp.png\"")
    );
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", made["sha256"].as_str().unwrap()));
    assert_eq!(got.bytes().await.unwrap().as_ref(), PNG);
    let again = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let part = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .header("range", "bytes=1-3")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 1-3/{}", PNG.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), b"PNG");
    let past = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    problem(past, 416, "range_not_satisfiable").await;

    // Private: not Bob's, not anyone's; an admin's. Public: anyone's.
    let as_bob = app
        .client
        .get(app.url(&path))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    problem(as_bob, 404, "not_found").await;
    problem(app.get(&path).await, 404, "not_found").await;
    let admin = app.admin_token().await;
    let as_admin = app
        .client
        .get(app.url(&path))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(as_admin.status(), 200);
    let shared = app
        .client
        .patch(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&bob)
        .json(&json!({ "access": "public" }))
        .send()
        .await
        .unwrap();
    problem(shared, 404, "not_found").await;
    let shared = app
        .client
        .patch(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .json(&json!({ "access": "public" }))
        .send()
        .await
        .unwrap();
    assert_eq!(shared.status(), 200);
    let anyone = app.get(&path).await;
    assert_eq!(anyone.status(), 200);
    assert_eq!(anyone.headers()["cache-control"], "public, no-cache");

    // Deleted: gone from the folder, the usage and the API.
    assert_eq!(objects(&app).len(), 2);
    let deleted = app
        .client
        .delete(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    problem(app.get(&path).await, 404, "not_found").await;
    assert_eq!(objects(&app).len(), 1);
    assert_eq!(usage(&app, &alice).await["files"], 1);
}

#[tokio::test]
async fn refused_uploads_are_typed_and_keep_nothing() {
    let app = app(|c| {
        c.files_max_bytes = 64 * 1024;
        c.files_quota_bytes = 100 * 1024;
    })
    .await;
    let (alice_id, alice) = user(&app, "alice@example.com").await;
    // A renamed executable, an archive, a script, text named as an image, a name that runs,
    // an empty body.
    let mut exe = b"MZ\x90\0\x03\0\0\0\x04\0\0\0\xff\xff\0\0".to_vec();
    exe.resize(300, 0);
    for (name, body, status, code) in [
        ("photo.jpg", exe.clone(), 415, "unsupported_type"),
        (
            "archive.png",
            b"PK\x03\x04\x14\0\0\0\x08\0".to_vec(),
            415,
            "unsupported_type",
        ),
        (
            "notes.txt",
            b"#!/bin/sh\nrm -rf /\n".to_vec(),
            415,
            "unsupported_type",
        ),
        ("notes.png", b"just text\n".to_vec(), 415, "type_mismatch"),
        ("photo.jpg.php", PNG.to_vec(), 422, "validation_failed"),
        ("photo.svg", PNG.to_vec(), 422, "validation_failed"),
        ("empty.png", Vec::new(), 422, "empty_file"),
    ] {
        let refused = upload(&app, &alice, name, body).await;
        let body = problem(refused, status, code).await;
        if code == "validation_failed" {
            assert_eq!(body["errors"][0]["code"], "unsafe_name", "{name}: {body}");
        }
    }
    // Past the size cap while it streams (chunked: no Content-Length to warn): refused as it
    // passes, before the client has sent the rest.
    let (status, body) = chunked_upload(&app, &alice, "big.txt", 100).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    // Past the quota: 60 KiB fit, the next 60 KiB do not.
    assert_eq!(
        upload(&app, &alice, "a.txt", vec![b'a'; 60 * 1024])
            .await
            .status(),
        201
    );
    let over = upload(&app, &alice, "b.txt", vec![b'b'; 60 * 1024]).await;
    let over = problem(over, 413, "quota_exceeded").await;
    assert_eq!(over["used_bytes"], 60 * 1024);
    // Nothing of any refusal is kept: one file, one object.
    assert_eq!(usage(&app, &alice).await["files"], 1);
    assert_eq!(objects(&app).len(), 1, "{:?}", objects(&app));

    // An admin raises Alice's quota: the upload fits now.
    let admin = app.admin_token().await;
    let raised: Value = app
        .client
        .put(app.url(&format!("/api/v1/admin/users/{alice_id}/quota")))
        .bearer_auth(&admin)
        .json(&json!({ "max_bytes": 200 * 1024, "max_files": 10 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raised["custom"], true);
    assert_eq!(raised["max_bytes"], 200 * 1024);
    assert_eq!(
        upload(&app, &alice, "b.txt", vec![b'b'; 60 * 1024])
            .await
            .status(),
        201
    );
    let quota = app
        .client
        .put(app.url(&format!("/api/v1/admin/users/{alice_id}/quota")))
        .bearer_auth(&alice)
        .json(&json!({ "max_bytes": null, "max_files": null }))
        .send()
        .await
        .unwrap();
    problem(quota, 403, "forbidden").await;
}

/// Posts `chunks` KiB of text as a chunked body over a raw socket, stopping when the server
/// answers; the status and the body of the answer.
async fn chunked_upload(app: &TestApp, token: &str, name: &str, chunks: usize) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/files?name={name} HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", "a".repeat(1024));
    for _ in 0..chunks {
        // The server may answer and stop reading before the end.
        if socket.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

#[tokio::test]
async fn signed_links_share_a_file_until_they_expire_or_its_access_is_private() {
    let clock = std::sync::Arc::new(unhidra_core::ManualClock::new(chrono::Utc::now()));
    let db = unhidra_store::testing::TestDb::new(default_backend()).await;
    let app = TestApp::spawn_on(
        db,
        with_admin,
        None,
        clock.clone() as std::sync::Arc<dyn unhidra_core::Clock>,
    )
    .await;
    let (alice_id, alice) = user(&app, "alice@example.com").await;
    let (bob_id, bob) = user(&app, "bob@example.com").await;
    let made: Value = upload(&app, &alice, "map.png", PNG.to_vec())
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap();
    let link = |token: &str, body: Value| {
        app.client
            .post(app.url(&format!("/api/v1/files/{id}/links")))
            .bearer_auth(token.to_owned())
            .json(&body)
            .send()
    };
    // A private file has no links; nor does Bob make one for Alice's file.
    problem(
        link(&alice, json!({})).await.unwrap(),
        409,
        "file_not_shared",
    )
    .await;
    app.client
        .patch(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .json(&json!({ "access": "link" }))
        .send()
        .await
        .unwrap();
    problem(link(&bob, json!({})).await.unwrap(), 404, "not_found").await;
    let bad_ttl = link(&alice, json!({ "ttl": 10 })).await.unwrap();
    let bad_ttl = problem(bad_ttl, 422, "validation_failed").await;
    assert_eq!(bad_ttl["errors"][0]["field"], "/ttl");
    let made = link(&alice, json!({ "ttl": 600 })).await.unwrap();
    assert_eq!(made.status(), 201);
    let url = made.json::<Value>().await.unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    // Anyone with the link, signed in or not, gets the bytes.
    let got = app.get(&url).await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), PNG);
    // A link changed in any part is not one.
    let sig = url.rsplit_once("sig=").unwrap().1.to_owned();
    let other_sig = format!(
        "{}{}",
        &sig[..sig.len() - 2],
        if sig.ends_with("AA") { "BB" } else { "AA" }
    );
    let expires: i64 = url
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for tampered in [
        url.replace(&sig, &other_sig),
        url.replace(
            &format!("expires={expires}"),
            &format!("expires={}", expires + 3600),
        ),
        url.replace(&format!("by={alice_id}"), &format!("by={bob_id}")),
        url.split("&sig=").next().unwrap().to_owned(),
    ] {
        problem(app.get(&tampered).await, 403, "link_invalid").await;
    }
    let other_file = url.replace(id, &uuid::Uuid::new_v4().to_string());
    problem(app.get(&other_file).await, 403, "link_invalid").await;
    // Expired: 410.
    clock.advance(chrono::Duration::seconds(601));
    problem(app.get(&url).await, 410, "link_expired").await;
    clock.advance(chrono::Duration::seconds(-601));
    assert_eq!(app.get(&url).await.status(), 200);
    // Private again: every link ends.
    app.client
        .patch(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .json(&json!({ "access": "private" }))
        .send()
        .await
        .unwrap();
    problem(app.get(&url).await, 403, "link_invalid").await;
}

#[tokio::test]
async fn one_user_holds_at_most_four_uploads_at_once() {
    let app = app(|_| {}).await;
    let (_, alice) = user(&app, "alice@example.com").await;
    let (_, bob) = user(&app, "bob@example.com").await;
    // Five uploads that trickle: each sends its head and a first chunk, and waits. Four are
    // taken; the fifth is answered at once with 503, whichever it is.
    let mut open = Vec::new();
    for i in 0..5 {
        let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST /api/v1/files?name=slow{i}.txt HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer {alice}\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nslow\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        open.push(socket);
    }
    // Read at once from all five, each for at most 3 s: only the refused one is answered.
    let reads = open.iter_mut().map(|socket| async move {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(std::time::Duration::from_secs(3), socket.read(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    });
    let answered: Vec<String> = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(answered.len(), 1, "{answered:?}");
    assert!(answered[0].starts_with("HTTP/1.1 503"), "{answered:?}");
    assert!(answered[0].contains("uploads_busy"), "{answered:?}");
    // Bob's uploads are not held up by Alice's.
    assert_eq!(
        upload(&app, &bob, "bob.txt", b"bob\n".to_vec())
            .await
            .status(),
        201
    );
    // The four end (their clients went away): Alice may upload again, and nothing of them
    // was kept.
    drop(open);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let again = upload(&app, &alice, "again.txt", b"again\n".to_vec()).await;
        if again.status() == 201 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", again.status());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let names: Vec<String> = app
        .client
        .get(app.url("/api/v1/files"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with("slow")), "{names:?}");
}

/// A body of `len` bytes that is PNG to the type check (its signature and header), then a
/// known pattern.
fn big_png(len: usize) -> Vec<u8> {
    let mut body = PNG[..33].to_vec();
    body.extend((body.len()..len).map(|i| (i % 251) as u8));
    body
}

#[tokio::test]
async fn on_s3_files_are_stored_by_owner_and_day_served_with_ranges_and_tags_and_deleted() {
    let s3 = unhidra_s3::testing::new_bucket().await;
    let bucket = unhidra_s3::S3Storage::new(&s3).unwrap();
    let app = app(|c| on_s3(c, &s3)).await;
    let (alice_id, alice) = user(&app, "alice@example.com").await;
    // Past one part (8 MiB): a multipart upload of two parts.
    let body = big_png(unhidra_s3::PART_BYTES + 1_000_003);
    let made = upload(&app, &alice, "survey.png", body.clone()).await;
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["size"], body.len());

    // The object is in the bucket under `<owner>/<yyyy>/<mm>/<dd>/<id>`, and nothing else is.
    let record = app
        .state
        .store()
        .file(uuid::Uuid::parse_str(&id).unwrap())
        .await
        .unwrap();
    let today = chrono::Utc::now().format("%Y/%m/%d").to_string();
    assert_eq!(
        record.storage_key,
        format!(
            "{}/{today}/{}",
            alice_id.replace('-', ""),
            id.replace('-', "")
        )
    );
    let stored =
        unhidra_media::storage::testing::read(&bucket, &record.storage_key, 0, body.len() as u64)
            .await;
    assert!(stored == body, "the bucket holds the bytes uploaded");

    // Served through the server: whole, by tag, in ranges.
    let path = format!("/api/v1/files/{id}/content");
    let got = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let etag = got.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", made["sha256"].as_str().unwrap()));
    assert_eq!(
        got.headers()["content-security-policy"],
        "default-src 'none'; sandbox"
    );
    assert!(got.bytes().await.unwrap().as_ref() == body.as_slice());
    let again = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let start = unhidra_s3::PART_BYTES - 2;
    let part = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .header("range", format!("bytes={start}-{}", start + 4))
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes {start}-{}/{}", start + 4, body.len()).as_str()
    );
    assert_eq!(
        part.bytes().await.unwrap().as_ref(),
        &body[start..start + 5]
    );
    let tail = app
        .client
        .get(app.url(&path))
        .bearer_auth(&alice)
        .header("range", "bytes=-3")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.bytes().await.unwrap().as_ref(),
        &body[body.len() - 3..]
    );

    // A refused upload is typed as on a folder; a small one is one PUT.
    let refused = upload(&app, &alice, "notes.png", b"plain text".to_vec()).await;
    problem(refused, 415, "type_mismatch").await;
    let small = upload(&app, &alice, "dot.png", PNG.to_vec()).await;
    assert_eq!(small.status(), 201);

    // Deleted: the object leaves the bucket.
    let deleted = app
        .client
        .delete(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(
        unhidra_media::storage::testing::is_missing(&bucket, &record.storage_key).await,
        "deleting the file removes its object"
    );
    problem(app.get(&path).await, 404, "not_found").await;
    assert_eq!(usage(&app, &alice).await["files"], 1);
}

/// Points a test app's files at an S3 bucket.
fn on_s3(c: &mut unhidra_config::Config, s3: &unhidra_s3::S3Config) {
    c.storage_backend = unhidra_config::StorageBackend::S3;
    c.s3_endpoint = Some(s3.endpoint.clone());
    c.s3_bucket = Some(s3.bucket.clone());
    c.s3_region = s3.region.clone();
    c.s3_access_key_id = Some(s3.access_key_id.clone());
    c.s3_secret_access_key = Some(unhidra_config::Secret::new("unhidra-test-secret"));
}

#[tokio::test]
async fn a_bucket_that_does_not_answer_makes_the_node_unready() {
    let s3 = unhidra_s3::testing::new_bucket().await;
    let ready = app(|c| on_s3(c, &s3)).await;
    assert_eq!(ready.get("/health/ready").await.status(), 200);
    let gone = unhidra_s3::S3Config {
        bucket: format!("{}-gone", s3.bucket),
        ..s3
    };
    let unready = app(|c| on_s3(c, &gone)).await;
    let answer = problem(unready.get("/health/ready").await, 503, "not_ready").await;
    assert_eq!(answer["failing"], json!(["storage"]));
    assert_eq!(answer["detail"], "storage (s3): unreachable");
}
