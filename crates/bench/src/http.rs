//! A minimal HTTP/1.1 client over one keep-alive TCP connection to 127.0.0.1: it sends a
//! prepared request (a `GET`, or a `POST` of JSON) and reads back the status line and the body
//! (by `Content-Length`, or chunked), nothing more. Small on purpose: it keeps the benchmark quick to build and its own
//! cost per request low and easy to reason about.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::BoxError;

/// The largest response head accepted, so a confused server cannot make the client grow forever.
const MAX_HEAD: usize = 16 * 1024;
/// The largest response body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// The bytes of a `GET path` request to `addr`, prepared once and sent many times.
pub fn get_request(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: unhidra-bench\r\nAccept: */*\r\n\r\n"
    )
    .into_bytes()
}

/// The bytes of a `GET path` request to `addr` that carries `Authorization: Bearer token`.
pub fn get_bearer_request(addr: SocketAddr, path: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: unhidra-bench\r\nAccept: */*\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes()
}

/// The bytes of a `POST path` request to `addr` whose body is the JSON text `json`.
pub fn post_json_request(addr: SocketAddr, path: &str, json: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: unhidra-bench\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    )
    .into_bytes()
}

/// The bytes of a `POST path` request to `addr` with `body` of `content_type`, the
/// `Authorization: Bearer token` header when a token is given, and the `headers` given.
pub fn post_request(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: unhidra-bench\r\nAccept: */*\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

/// What the client keeps of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// False when the server said `Connection: close` (or the body ends at close).
    pub keep_alive: bool,
}

/// One open connection, reused request after request.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

impl Connection {
    /// Connects to `addr`, which must be a loopback address.
    pub async fn open(addr: SocketAddr) -> Result<Self, BoxError> {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "refusing to connect to {addr}: the benchmark only talks to 127.0.0.1"
            )
            .into());
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` (from [`get_request`]) and reads the whole response.
    pub async fn send(&mut self, request: &[u8]) -> Result<Answer, BoxError> {
        self.exchange(request, None).await
    }

    /// Sends `request` and reads the whole response, keeping its body (de-chunked).
    pub async fn send_for_body(&mut self, request: &[u8]) -> Result<(Answer, Vec<u8>), BoxError> {
        let mut body = Vec::new();
        let answer = self.exchange(request, Some(&mut body)).await?;
        Ok((answer, body))
    }

    /// Sends `request` and reads the response; its body goes to `sink` if one is given.
    async fn exchange(
        &mut self,
        request: &[u8],
        mut sink: Option<&mut Vec<u8>>,
    ) -> Result<Answer, BoxError> {
        self.stream.write_all(request).await?;
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err("response head too large".into());
            }
            self.fill().await?;
        };
        let head = parse_head(&self.buf[..head_end])?;
        let consumed = match head.body {
            Body::Length(len) => {
                if len > MAX_BODY {
                    return Err(format!("response body of {len} bytes is too large").into());
                }
                while self.buf.len() < head_end + len {
                    self.fill().await?;
                }
                if let Some(sink) = sink {
                    sink.extend_from_slice(&self.buf[head_end..head_end + len]);
                }
                head_end + len
            }
            Body::Chunked => self.read_chunked(head_end, sink.as_deref_mut()).await?,
            Body::None => head_end,
            Body::UntilClose => {
                // Rare and not keep-alive: the body is whatever comes until the server closes.
                if let Some(sink) = sink {
                    sink.extend_from_slice(&self.buf[head_end..]);
                    self.read_to_close(sink).await?;
                }
                self.buf.clear();
                return Ok(Answer {
                    status: head.status,
                    keep_alive: false,
                });
            }
        };
        self.buf.drain(..consumed);
        Ok(Answer {
            status: head.status,
            keep_alive: head.keep_alive,
        })
    }

    /// Reads into `sink` until the server closes the connection (at most [`MAX_BODY`] bytes).
    async fn read_to_close(&mut self, sink: &mut Vec<u8>) -> Result<(), BoxError> {
        let mut chunk = [0_u8; 4096];
        loop {
            if sink.len() > MAX_BODY {
                return Err("response body too large".into());
            }
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            sink.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads a chunked body that starts at `from`, appending its data to `sink` if given;
    /// returns where the response ends.
    async fn read_chunked(
        &mut self,
        from: usize,
        mut sink: Option<&mut Vec<u8>>,
    ) -> Result<usize, BoxError> {
        let mut at = from;
        loop {
            let line_end = loop {
                if let Some(end) = find(&self.buf[at..], b"\r\n") {
                    break at + end;
                }
                if self.buf.len() - at > MAX_HEAD {
                    return Err("chunk size line too long".into());
                }
                self.fill().await?;
            };
            let line = std::str::from_utf8(&self.buf[at..line_end])?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            if size > MAX_BODY {
                return Err(format!("chunk of {size} bytes is too large").into());
            }
            if size == 0 {
                // No trailers expected: the last chunk is followed by an empty line.
                while self.buf.len() < line_end + 4 {
                    self.fill().await?;
                }
                return Ok(line_end + 4);
            }
            let next = line_end + 2 + size + 2;
            while self.buf.len() < next {
                self.fill().await?;
            }
            if let Some(sink) = sink.as_deref_mut() {
                if sink.len() + size > MAX_BODY {
                    return Err("chunked response body too large".into());
                }
                sink.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
            }
            at = next;
        }
    }

    /// Reads whatever the server sent next; an orderly close before the response is an error.
    async fn fill(&mut self) -> Result<(), BoxError> {
        let mut chunk = [0_u8; 4096];
        let read = self.stream.read(&mut chunk).await?;
        if read == 0 {
            return Err("the server closed the connection mid-response".into());
        }
        self.buf.extend_from_slice(&chunk[..read]);
        Ok(())
    }
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(usize),
    Chunked,
    None,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    status: u16,
    keep_alive: bool,
    body: Body,
}

/// Parses a response head (status line and headers, ending with the empty line).
fn parse_head(head: &[u8]) -> Result<Head, BoxError> {
    let text = std::str::from_utf8(head)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}").into());
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut keep_alive = version != "HTTP/1.0";
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                keep_alive = false;
            } else if value.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Body::None
    } else if chunked {
        Body::Chunked
    } else if let Some(len) = length {
        Body::Length(len)
    } else {
        keep_alive = false;
        Body::UntilClose
    };
    Ok(Head {
        status,
        keep_alive,
        body,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// How long [`call`] waits for an answer.
pub const CALL_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one setup request and answers its JSON body, which must come with `status`.
pub async fn call(
    connection: &mut Connection,
    what: &str,
    request: &[u8],
    status: u16,
) -> Result<serde_json::Value, BoxError> {
    let (answer, body) = tokio::time::timeout(CALL_WITHIN, connection.send_for_body(request))
        .await
        .map_err(|_| format!("{what}: no answer within {CALL_WITHIN:?}"))??;
    if answer.status != status {
        return Err(format!(
            "{what} answered {} instead of {status}: {}",
            answer.status,
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed() {
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                keep_alive: true,
                body: Body::Length(17)
            }
        );
        let head =
            parse_head(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!(
            head,
            Head {
                status: 503,
                keep_alive: false,
                body: Body::Chunked
            }
        );
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn keep_alive_answers_are_read_one_after_another() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let answers: [&[u8]; 3] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"status\":\"live\"}",
                b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            ];
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0_u8; 1024];
                for answer in answers {
                    let mut seen = Vec::new();
                    while find(&seen, b"\r\n\r\n").is_none() {
                        let n = socket.read(&mut buf).await.unwrap();
                        seen.extend_from_slice(&buf[..n]);
                    }
                    assert!(seen.starts_with(b"GET /health/live HTTP/1.1\r\n"));
                    // Split the answer in two writes, to exercise partial reads.
                    let (a, b) = answer.split_at(answer.len() / 2);
                    socket.write_all(a).await.unwrap();
                    socket.flush().await.unwrap();
                    socket.write_all(b).await.unwrap();
                }
            });
            let request = get_request(addr, "/health/live");
            let mut connection = Connection::open(addr).await.unwrap();
            let statuses = [
                (200, true),
                (503, true),
                (200, false),
            ];
            for (status, keep_alive) in statuses {
                let answer = connection.send(&request).await.unwrap();
                assert_eq!(answer, Answer { status, keep_alive });
            }
            assert!(connection.buf.is_empty());
            server.await.unwrap();
        });
    }

    #[test]
    fn posts_carry_their_body_and_answers_their_body() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let json = r#"{"email":"a@example.com"}"#;
            let post = post_json_request(addr, "/api/v1/auth/login", json);
            let get = get_bearer_request(addr, "/api/v1/auth/me", "a.b.c");
            let expected_post = post.clone();
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut seen = vec![0_u8; expected_post.len()];
                socket.read_exact(&mut seen).await.unwrap();
                assert_eq!(seen, expected_post);
                socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"a\":\"b\"}")
                    .await
                    .unwrap();
                let mut seen = Vec::new();
                let mut buf = [0_u8; 1024];
                while find(&seen, b"\r\n\r\n").is_none() {
                    let n = socket.read(&mut buf).await.unwrap();
                    seen.extend_from_slice(&buf[..n]);
                }
                assert!(find(&seen, b"\r\nAuthorization: Bearer a.b.c\r\n").is_some());
                socket
                    .write_all(b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                    .await
                    .unwrap();
            });
            let text = String::from_utf8(post.clone()).unwrap();
            assert!(text.starts_with("POST /api/v1/auth/login HTTP/1.1\r\n"), "{text}");
            assert!(text.contains("\r\nContent-Type: application/json\r\n"), "{text}");
            assert!(text.ends_with(&format!("Content-Length: {}\r\n\r\n{json}", json.len())));
            let mut connection = Connection::open(addr).await.unwrap();
            let (answer, body) = connection.send_for_body(&post).await.unwrap();
            assert_eq!(answer.status, 200);
            assert_eq!(body, br#"{"a":"b"}"#);
            let (answer, body) = connection.send_for_body(&get).await.unwrap();
            assert_eq!(answer.status, 401);
            assert_eq!(body, b"abcde");
            assert!(connection.buf.is_empty());
            server.await.unwrap();
        });
    }

    #[test]
    fn only_loopback_is_allowed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = runtime
            .block_on(Connection::open("192.0.2.1:80".parse().unwrap()))
            .unwrap_err();
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
    }
}
