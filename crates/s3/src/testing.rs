//! A fresh bucket for each test on the S3 API server that tests use, named by
//! `UNHIDRA_TEST_S3_URL` (scripts/test starts moto in server mode and sets it). Without it the
//! S3 tests fail, saying how to start one: they are never skipped quietly.

use rusty_s3::actions::CreateBucket;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use secrecy::SecretString;
use url::Url;

use crate::{MIN_PART_BYTES, S3Config, S3Storage};

/// The variable naming the S3 API server that tests use.
pub const S3_URL_VAR: &str = "UNHIDRA_TEST_S3_URL";

/// The S3 API server's URL.
pub fn s3_url() -> Url {
    let Ok(text) = std::env::var(S3_URL_VAR) else {
        panic!(
            "{S3_URL_VAR} is not set: these tests need an S3 API server. scripts/test starts \
             one; by hand: `python3 -m venv /tmp/moto && /tmp/moto/bin/pip install \
             'moto[server]' && /tmp/moto/bin/moto_server -H 127.0.0.1 -p 5000 &` and \
             `export {S3_URL_VAR}=http://127.0.0.1:5000`"
        )
    };
    text.parse()
        .unwrap_or_else(|e| panic!("{S3_URL_VAR}={text:?} is not a URL: {e}"))
}

/// The configuration of a new, empty bucket of its own on the test server (parts of the
/// smallest size S3 allows, so that multipart uploads are cheap to test).
pub async fn new_bucket() -> S3Config {
    let config = S3Config {
        endpoint: s3_url(),
        bucket: format!("unhidra-test-{}", uuid::Uuid::new_v4().simple()),
        region: "us-east-1".to_owned(),
        access_key_id: "unhidra-test".to_owned(),
        secret_access_key: SecretString::from("unhidra-test-secret"),
        path_style: true,
        part_bytes: MIN_PART_BYTES,
    };
    let bucket = Bucket::new(
        config.endpoint.clone(),
        UrlStyle::Path,
        config.bucket.clone(),
        config.region.clone(),
    )
    .expect("a bucket URL");
    let credentials = Credentials::new(config.access_key_id.clone(), "unhidra-test-secret");
    let url = CreateBucket::new(&bucket, &credentials).sign(std::time::Duration::from_secs(60));
    let answer = reqwest::Client::new()
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, 0)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the S3 API server at {} does not answer: {e}",
                config.endpoint
            )
        });
    assert!(
        answer.status().is_success(),
        "creating a bucket: {}",
        answer.status()
    );
    config
}

/// A storage over a new, empty bucket.
pub async fn new_storage() -> (S3Storage, S3Config) {
    let config = new_bucket().await;
    (S3Storage::new(&config).expect("an S3 storage"), config)
}
