//! Files' bytes in any S3-compatible object store (AWS S3, MinIO, Ceph, Garage, R2; moto in
//! tests), behind the media crate's `Storage` trait. Every request is a presigned URL — SigV4
//! by `rusty-s3`, which does no I/O — sent with the tree's reqwest. An object up to one part
//! is written with one `PUT`; a larger one as a multipart upload, one part held in memory at a
//! time; objects are read in ranges as they stream, and deleted. Knows keys and bytes only,
//! never files' records; the HTTP it speaks is to the object store, never to Unhidra's clients.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use reqwest::StatusCode;
use rusty_s3::actions::{
    AbortMultipartUpload, DeleteObject, GetObject, HeadBucket, PutObject, UploadPart,
};
use rusty_s3::{Bucket, Credentials, Method, S3Action, UrlStyle};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncReadExt;
use unhidra_media::storage::{ObjectWriter, Reader, Storage, is_key, not_a_key};
use url::Url;

#[cfg(feature = "testing")]
pub mod testing;

/// The size of a multipart upload's parts, and so the largest object written with one `PUT`:
/// each upload holds at most this much in memory.
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// S3's smallest part (all but the last).
pub const MIN_PART_BYTES: usize = 5 * 1024 * 1024;

/// S3's most parts in one upload.
const MAX_PARTS: usize = 10_000;

/// How long a presigned `GET` is signed for; reused until [`REUSE_MARGIN`] before then.
pub const READ_URL_TTL: Duration = Duration::from_secs(3600);

/// A cached `GET` URL is signed anew this long before it would expire, so that a request made
/// with it (and a clock a little off the store's) still finds it valid.
pub const REUSE_MARGIN: Duration = Duration::from_secs(300);

/// How long the URL of a one-off request (write, delete) is signed for.
const WRITE_URL_TTL: Duration = Duration::from_secs(900);

/// The most cached `GET` URLs (one per object read in the last hour, up to this).
const MAX_CACHED_URLS: usize = 4096;

/// Where and as whom.
#[derive(Clone)]
pub struct S3Config {
    /// The endpoint, `http://` or `https://`.
    pub endpoint: Url,
    /// The bucket (it must exist).
    pub bucket: String,
    /// The bucket's region.
    pub region: String,
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: SecretString,
    /// `<endpoint>/<bucket>/<key>` rather than `<bucket>.<host>/<key>`.
    pub path_style: bool,
    /// The size of a multipart upload's parts ([`PART_BYTES`]; at least [`MIN_PART_BYTES`]).
    pub part_bytes: usize,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint.as_str())
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("path_style", &self.path_style)
            .field("part_bytes", &self.part_bytes)
            .finish_non_exhaustive()
    }
}

/// An S3 bucket as a storage backend; cloning it is cheap.
#[derive(Clone)]
pub struct S3Storage(Arc<Inner>);

struct Inner {
    bucket: Bucket,
    credentials: Credentials,
    http: reqwest::Client,
    part_bytes: usize,
    /// Presigned `GET` URLs by key, with when they stop being reused.
    read_urls: Mutex<HashMap<String, (Url, Instant)>>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.0.bucket.name())
            .field("url", &self.0.bucket.base_url().as_str())
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// The bucket of `config`; nothing is asked of the store until the first request.
    pub fn new(config: &S3Config) -> io::Result<Self> {
        let style = if config.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            config.endpoint.clone(),
            style,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("s3_endpoint/s3_bucket: {e:?}"),
            )
        })?;
        if config.part_bytes < MIN_PART_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an upload's parts have at least {MIN_PART_BYTES} bytes"),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Between two reads of an answer, not for the whole of it: a large object streams
            // for as long as its reader keeps up.
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| io::Error::other(e.without_url()))?;
        Ok(Self(Arc::new(Inner {
            bucket,
            credentials: Credentials::new(
                config.access_key_id.clone(),
                config.secret_access_key.expose_secret().to_owned(),
            ),
            http,
            part_bytes: config.part_bytes,
            read_urls: Mutex::default(),
        })))
    }

    /// A presigned `GET` of `key`: signed for [`READ_URL_TTL`] and reused until
    /// [`REUSE_MARGIN`] before it expires, so that reads of a popular object sign once an hour.
    pub fn read_url(&self, key: &str) -> Url {
        let now = Instant::now();
        let mut cache = self
            .0
            .read_urls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((url, until)) = cache.get(key)
            && *until > now
        {
            return url.clone();
        }
        let url = GetObject::new(&self.0.bucket, Some(&self.0.credentials), key).sign(READ_URL_TTL);
        if cache.len() >= MAX_CACHED_URLS {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED_URLS {
                cache.clear();
            }
        }
        cache.insert(
            key.to_owned(),
            (url.clone(), now + (READ_URL_TTL - REUSE_MARGIN)),
        );
        url
    }
}

/// A transport failure, without the URL (a presigned URL is a credential for its object).
fn transport(e: reqwest::Error) -> io::Error {
    let kind = if e.is_timeout() {
        io::ErrorKind::TimedOut
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e.without_url())
}

/// An answer that is not a success, as an error naming the operation, the status and S3's
/// error code (never the URL).
async fn refused(what: &str, response: reqwest::Response) -> io::Error {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let code = s3_error_code(&body).unwrap_or("no error code");
    let kind = match status {
        StatusCode::NOT_FOUND => io::ErrorKind::NotFound,
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("S3 {what}: {status} ({code})"))
}

/// The `<Code>` of an S3 error document.
fn s3_error_code(body: &str) -> Option<&str> {
    element(body, "Code")
}

/// The text of the first `<name>` element of an S3 answer. S3's answers that Unhidra reads
/// are flat documents of a few elements without attributes or namespaces prefixes on them, so
/// this is all the XML reading they need (no parser, and none of a parser's attack surface).
fn element<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(&body[start..start + len])
}

/// XML's five predefined entities, decoded (S3 escapes nothing else in an upload id).
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Text escaped for an XML element.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `CompleteMultipartUpload` document: each part's number and entity tag, in order.
fn complete_body(etags: &[String]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (i, etag) in etags.iter().enumerate() {
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
            i + 1,
            escape(etag)
        ));
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

impl Inner {
    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> io::Result<reqwest::Response> {
        let response = request.send().await.map_err(transport)?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(refused(what, response).await)
        }
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> io::Result<()> {
        let url = PutObject::new(&self.bucket, Some(&self.credentials), key).sign(WRITE_URL_TTL);
        self.send("PUT", self.http.put(url).body(body)).await?;
        Ok(())
    }

    /// A presigned `POST` of `key` with `query` (the two multipart calls rusty-s3 gives only
    /// with its XML feature).
    fn sign_post(&self, key: &str, query: &[(&str, &str)]) -> io::Result<Url> {
        let url = self
            .bucket
            .object_url(key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(rusty_s3::signing::sign(
            &jiff::Timestamp::now(),
            Method::Post,
            url,
            self.credentials.key(),
            self.credentials.secret(),
            self.credentials.token(),
            self.bucket.region(),
            WRITE_URL_TTL.as_secs(),
            query.iter().copied(),
            std::iter::empty(),
        ))
    }

    async fn start_multipart(&self, key: &str) -> io::Result<String> {
        let url = self.sign_post(key, &[("uploads", "")])?;
        let body = self
            // Its length said: stores answer a POST without one with 411.
            .send(
                "CreateMultipartUpload",
                self.http
                    .post(url)
                    .header(reqwest::header::CONTENT_LENGTH, 0),
            )
            .await?
            .text()
            .await
            .map_err(transport)?;
        match element(&body, "UploadId").map(unescape) {
            Some(id) if !id.is_empty() => Ok(id),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "S3 CreateMultipartUpload: no UploadId in the answer",
            )),
        }
    }

    async fn upload_part(
        &self,
        key: &str,
        id: &str,
        number: u16,
        part: Vec<u8>,
    ) -> io::Result<String> {
        let url = UploadPart::new(&self.bucket, Some(&self.credentials), key, number, id)
            .sign(WRITE_URL_TTL);
        let response = self
            .send("UploadPart", self.http.put(url).body(part))
            .await?;
        response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "S3 UploadPart: no ETag"))
    }

    async fn complete_multipart(&self, key: &str, id: &str, etags: &[String]) -> io::Result<()> {
        let url = self.sign_post(key, &[("uploadId", id)])?;
        let body = complete_body(etags);
        let answer = self
            .send("CompleteMultipartUpload", self.http.post(url).body(body))
            .await?
            .text()
            .await
            .map_err(transport)?;
        // S3 may answer 200 and still fail the completion, in the body.
        if answer.contains("<Error>") {
            let code = s3_error_code(&answer).unwrap_or("no error code");
            return Err(io::Error::other(format!(
                "S3 CompleteMultipartUpload: {code}"
            )));
        }
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, id: &str) -> io::Result<()> {
        let url = AbortMultipartUpload::new(&self.bucket, Some(&self.credentials), key, id)
            .sign(WRITE_URL_TTL);
        match self
            .send("AbortMultipartUpload", self.http.delete(url))
            .await
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map(drop),
        }
    }
}

/// An object being written: one `PUT` when it ends within one part, else a multipart upload
/// that starts with the first full part. Parts are invisible until the upload completes; one
/// dropped unfinished is aborted, so the store frees its parts.
struct S3Writer {
    s3: Arc<Inner>,
    key: String,
    buf: Vec<u8>,
    /// The multipart upload's id and its parts' entity tags, once one started.
    multipart: Option<(String, Vec<String>)>,
}

impl S3Writer {
    async fn send_part(&mut self, part: Vec<u8>) -> io::Result<()> {
        let (id, etags) = match &mut self.multipart {
            Some(m) => m,
            None => {
                let id = self.s3.start_multipart(&self.key).await?;
                self.multipart.insert((id, Vec::new()))
            }
        };
        if etags.len() >= MAX_PARTS {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "an S3 upload has at most 10000 parts",
            ));
        }
        let number = u16::try_from(etags.len() + 1).unwrap_or(u16::MAX);
        let etag = self.s3.upload_part(&self.key, id, number, part).await?;
        etags.push(etag);
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(chunk);
        while self.buf.len() >= self.s3.part_bytes {
            let rest = self.buf.split_off(self.s3.part_bytes);
            let part = std::mem::replace(&mut self.buf, rest);
            self.send_part(part).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        if self.multipart.is_none() {
            return self.s3.put(&self.key, buf).await;
        }
        if !buf.is_empty() {
            self.send_part(buf).await?;
        }
        if let Some((id, etags)) = &self.multipart {
            self.s3.complete_multipart(&self.key, id, etags).await?;
        }
        // Complete: nothing for `drop` to abort.
        self.multipart = None;
        Ok(())
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        let Some((id, _)) = self.multipart.take() else {
            return;
        };
        let s3 = Arc::clone(&self.s3);
        let key = std::mem::take(&mut self.key);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = s3.abort_multipart(&key, &id).await {
                    tracing::warn!(key, error = %e, "an unfinished S3 upload was not aborted");
                }
            });
        }
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        if !is_key(key) {
            return Err(not_a_key());
        }
        Ok(Box::new(S3Writer {
            s3: Arc::clone(&self.0),
            key: key.to_owned(),
            buf: Vec::new(),
            multipart: None,
        }))
    }

    async fn open(&self, key: &str, start: u64, len: u64) -> io::Result<Reader> {
        if !is_key(key) {
            return Err(not_a_key());
        }
        let range = format!(
            "bytes={start}-{}",
            start.saturating_add(len.max(1)).saturating_sub(1)
        );
        let request = self
            .0
            .http
            .get(self.read_url(key))
            .header(reqwest::header::RANGE, range);
        let response = self.0.send("GET", request).await?;
        // A store that ignores `Range` answers the whole object: fine from the start only.
        if response.status() != StatusCode::PARTIAL_CONTENT && start > 0 {
            return Err(io::Error::other(format!(
                "S3 GET: {} to a range request",
                response.status()
            )));
        }
        let stream = response.bytes_stream().map_err(transport);
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::pin(reader.take(len)))
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        if !is_key(key) {
            return Err(not_a_key());
        }
        let url =
            DeleteObject::new(&self.0.bucket, Some(&self.0.credentials), key).sign(WRITE_URL_TTL);
        match self.0.send("DELETE", self.0.http.delete(url)).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map(drop),
        }
    }

    async fn check(&self) -> io::Result<()> {
        let url = HeadBucket::new(&self.0.bucket, Some(&self.0.credentials)).sign(WRITE_URL_TTL);
        self.0.send("HEAD bucket", self.0.http.head(url)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_read_from_s3_error_documents() {
        let body =
            "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>x</Message></Error>";
        assert_eq!(s3_error_code(body), Some("NoSuchKey"));
        assert_eq!(s3_error_code("<html>"), None);
    }

    #[test]
    fn upload_ids_are_read_and_parts_listed_escaped() {
        let answer = "<?xml version=\"1.0\"?><InitiateMultipartUploadResult \
            xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>b</Bucket><Key>k</Key>\
            <UploadId>a1&amp;b2</UploadId></InitiateMultipartUploadResult>";
        assert_eq!(
            element(answer, "UploadId").map(unescape).as_deref(),
            Some("a1&b2")
        );
        assert_eq!(element(answer, "Missing"), None);
        assert_eq!(
            complete_body(&["\"e1\"".to_owned(), "\"e2\"".to_owned()]),
            "<CompleteMultipartUpload>\
             <Part><PartNumber>1</PartNumber><ETag>&quot;e1&quot;</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>&quot;e2&quot;</ETag></Part>\
             </CompleteMultipartUpload>"
        );
    }
}
