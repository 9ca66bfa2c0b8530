//! The storage story every backend must pass, on a real S3 API server (moto in server mode,
//! `UNHIDRA_TEST_S3_URL`) and, for comparison in the same run, on a local folder; and what only
//! S3 has: multipart uploads past one part, aborted when unfinished, and cached read URLs.

use unhidra_media::LocalStorage;
use unhidra_media::storage::Storage;
use unhidra_media::storage::testing::{is_missing, read, story};
use unhidra_s3::testing::new_storage;
use unhidra_s3::{MIN_PART_BYTES, READ_URL_TTL};

#[tokio::test]
async fn s3_keeps_objects_as_every_backend_must() {
    let (s3, _) = new_storage().await;
    s3.check().await.expect("the bucket answers");
    // Within one part: a single PUT.
    story(&s3, 100_000, 4096).await;
    story(&s3, 11, 3).await;
    // Past two parts (5 MiB each): a multipart upload of three.
    story(&s3, 2 * MIN_PART_BYTES + 12_345, 256 * 1024).await;
}

#[tokio::test]
async fn a_local_folder_passes_the_same_story() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStorage::open_dir(dir.path()).await.unwrap();
    story(&local, 2 * MIN_PART_BYTES + 12_345, 256 * 1024).await;
}

#[tokio::test]
async fn a_missing_bucket_fails_its_check_and_read_urls_are_reused() {
    let (s3, mut config) = new_storage().await;
    let key = "u1/2026/03/01/f1";
    let first = s3.read_url(key);
    assert_eq!(
        s3.read_url(key),
        first,
        "cached until shortly before it expires"
    );
    assert_ne!(s3.read_url("u1/2026/03/01/f2"), first);
    let expires = first
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-Expires")
        .map(|(_, v)| v.into_owned());
    assert_eq!(expires, Some(READ_URL_TTL.as_secs().to_string()));
    assert!(is_missing(&s3, key).await);

    config.bucket = format!("{}-gone", config.bucket);
    let gone = unhidra_s3::S3Storage::new(&config).unwrap();
    assert!(gone.check().await.is_err());
    let mut w = gone.create(key).await.unwrap();
    w.write(b"hello").await.unwrap();
    let err = w.finish().await.expect_err("no such bucket");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");
    assert!(!err.to_string().contains("X-Amz-Signature"), "{err}");
    // Objects written before stay readable in ranges.
    let mut w = s3.create(key).await.unwrap();
    w.write(b"hello world").await.unwrap();
    w.finish().await.unwrap();
    assert_eq!(read(&s3, key, 6, 5).await, b"world");
}
