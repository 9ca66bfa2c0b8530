//! The download client of the `ota` scenario: one keep-alive HTTP/1.1 connection to 127.0.0.1
//! on which a simulated device fetches a firmware image the way ESP-IDF's `esp_https_ota` does,
//! one request at a time, in byte ranges (`partial_http_download`) or whole. The body is read
//! straight into the device's copy of the image at its offset: one copy per byte, and the
//! copy's SHA-256 is checked after the clock stops. The same client serves every server.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::BoxError;

/// The largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// One read of a response head; it may carry the start of the body, or a small range whole.
const READ_CHUNK: usize = 16 * 1024;

/// What a request asks for, and so what its answer must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// These bytes of the image (inclusive): `206` with this `Content-Range`.
    Range(RangeInclusive<u64>),
    /// The whole image of this many bytes: `200`.
    Whole(u64),
}

impl Want {
    /// Where the body's bytes go in the device's copy, and how many there are.
    fn span(&self) -> (u64, u64) {
        match self {
            Self::Range(r) => (*r.start(), r.end() - r.start() + 1),
            Self::Whole(size) => (0, *size),
        }
    }
}

/// Writes the request for `want` of `path` into `out` (cleared first): the headers
/// `esp_http_client` sends, and a device key when one is given.
pub fn write_request(
    out: &mut String,
    host: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    want: &Want,
) {
    out.clear();
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "GET {path} HTTP/1.1\r\nUser-Agent: ESP32 HTTP Client/1.0\r\nHost: {host}\r\n"
    );
    if let Some(token) = bearer {
        let _ = write!(out, "Authorization: Bearer {token}\r\n");
    }
    if let Want::Range(r) = want {
        let _ = write!(out, "Range: bytes={}-{}\r\n", r.start(), r.end());
    }
    out.push_str("\r\n");
}

/// What the client needs of a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// `Content-Length`.
    pub length: Option<u64>,
    /// `Content-Range: bytes a-b/size`, as (a..=b, size).
    pub content_range: Option<(RangeInclusive<u64>, u64)>,
    /// False when the server said `Connection: close` (or spoke HTTP/1.0 without keep-alive).
    pub keep_alive: bool,
    /// The body is chunked (which neither server should do for a file of known length).
    pub chunked: bool,
}

/// Parses a response head (the status line and headers, with or without the empty line).
pub fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "a response head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut parsed = Head {
        status,
        length: None,
        content_range: None,
        keep_alive: version != "HTTP/1.0",
        chunked: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            parsed.length = Some(
                value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("content-range") {
            parsed.content_range = Some(
                parse_content_range(value).ok_or_else(|| format!("bad Content-Range {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            parsed.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                parsed.keep_alive = false;
            } else if value.contains("keep-alive") {
                parsed.keep_alive = true;
            }
        }
    }
    Ok(parsed)
}

/// `bytes a-b/size` as (a..=b, size); `None` for anything else (`bytes */size` included).
pub fn parse_content_range(value: &str) -> Option<(RangeInclusive<u64>, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, size) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b, size): (u64, u64, u64) = (a.parse().ok()?, b.parse().ok()?, size.parse().ok()?);
    (a <= b && b < size).then_some((a..=b, size))
}

/// Checks a head against what was asked for; answers the body's length.
pub fn check_head(head: &Head, want: &Want) -> Result<u64, String> {
    if head.chunked {
        return Err(format!("a chunked {} answer", head.status));
    }
    let (expected_status, size) = match want {
        Want::Range(_) => (206, None),
        Want::Whole(size) => (200, Some(*size)),
    };
    if head.status != expected_status {
        return Err(format!(
            "{} instead of {expected_status} for {want:?}",
            head.status
        ));
    }
    let (_, len) = want.span();
    if head.length != Some(len) {
        return Err(format!(
            "Content-Length {:?} instead of {len} for {want:?}",
            head.length
        ));
    }
    if let Want::Range(r) = want {
        match &head.content_range {
            Some((got, _)) if got == r => {}
            other => return Err(format!("Content-Range {other:?} for {want:?}")),
        }
    } else if size.is_some_and(|s| s != len) {
        return Err(format!("{len} bytes instead of the image's {size:?}"));
    }
    Ok(len)
}

/// One device's connection.
#[derive(Debug)]
pub struct Device {
    addr: SocketAddr,
    stream: TcpStream,
    /// Bytes read past the previous response (a server may send ahead of a request).
    pending: Vec<u8>,
    /// How often the connection had to be opened again after the server closed it.
    pub reconnects: u64,
    /// Whether each request asks the kernel to acknowledge the answer's segments at once
    /// (TCP_QUICKACK) instead of delaying the ACKs: not what a device does, a diagnostic.
    quickack: bool,
}

impl Device {
    /// Connects to `addr`, which must be a loopback address; with `quickack`, every request
    /// turns TCP_QUICKACK on before its answer comes.
    pub async fn connect(addr: SocketAddr, quickack: bool) -> Result<Self, BoxError> {
        Ok(Self {
            addr,
            stream: open(addr).await?,
            pending: Vec::with_capacity(READ_CHUNK),
            reconnects: 0,
            quickack,
        })
    }

    /// Sends `request` (for `want`) and reads the answer's body into `image`, the device's copy,
    /// at the offset `want` names. Fails on any answer but the one `want` calls for.
    pub async fn fetch(
        &mut self,
        request: &[u8],
        want: &Want,
        image: &mut [u8],
    ) -> Result<(), BoxError> {
        self.stream.write_all(request).await?;
        if self.quickack {
            // The kernel leaves quick-ACK mode by itself, so it is asked again every time.
            socket2::SockRef::from(&self.stream).set_tcp_quickack(true)?;
        }
        let head_end = loop {
            if let Some(at) = find_head_end(&self.pending) {
                break at;
            }
            if self.pending.len() > MAX_HEAD {
                return Err("response head too large".into());
            }
            self.fill().await?;
        };
        let head = parse_head(&self.pending[..head_end])?;
        let len = check_head(&head, want)?;
        let (offset, _) = want.span();
        let image_len = image.len();
        let dest = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(at, n)| image.get_mut(at..at.checked_add(n)?))
            .ok_or_else(|| format!("{want:?} lies outside the {image_len}-byte image"))?;
        // The body's first bytes may have come with the head; the rest is read in place.
        let early = (self.pending.len() - head_end).min(dest.len());
        dest[..early].copy_from_slice(&self.pending[head_end..head_end + early]);
        self.pending.drain(..head_end + early);
        if early < dest.len() {
            self.stream.read_exact(&mut dest[early..]).await?;
        }
        if !head.keep_alive {
            self.stream = open(self.addr).await?;
            self.pending.clear();
            self.reconnects += 1;
        }
        Ok(())
    }

    /// Reads whatever the server sent next into `pending` (into its spare room: nothing is
    /// zeroed first).
    async fn fill(&mut self) -> Result<(), BoxError> {
        self.pending.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.pending).await? == 0 {
            return Err("the server closed the connection mid-response".into());
        }
        Ok(())
    }
}

async fn open(addr: SocketAddr) -> Result<TcpStream, BoxError> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "refusing to connect to {addr}: the benchmark only talks to 127.0.0.1"
        )
        .into());
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where the body starts: just past the first empty line.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNHIDRA_206: &[u8] =
        b"HTTP/1.1 206 Partial Content\r\netag: \"ab\"\r\naccept-ranges: bytes\r\n\
        content-range: bytes 4096-8191/1572864\r\ncontent-type: application/octet-stream\r\n\
        content-length: 4096\r\n\r\n";
    const NGINX_200: &[u8] =
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 1572864\r\n\
        Connection: keep-alive\r\nAccept-Ranges: bytes\r\n\r\n";

    #[test]
    fn heads_and_content_ranges_are_parsed() {
        let head = parse_head(UNHIDRA_206).unwrap();
        assert_eq!(head.status, 206);
        assert_eq!(head.length, Some(4096));
        assert_eq!(head.content_range, Some((4096..=8191, 1_572_864)));
        assert!(head.keep_alive && !head.chunked);
        let head = parse_head(NGINX_200).unwrap();
        assert_eq!((head.status, head.length), (200, Some(1_572_864)));
        assert_eq!(head.content_range, None);
        assert!(
            !parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().keep_alive);
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 206 x\r\nContent-Range: bytes 9-1/10\r\n\r\n").is_err());

        assert_eq!(parse_content_range("bytes 0-0/1"), Some((0..=0, 1)));
        for bad in [
            "bytes */100",
            "bytes 0-100/100",
            "items 0-1/2",
            "bytes 1-/2",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn answers_are_checked_against_the_request() {
        let range = Want::Range(4096..=8191);
        assert_eq!(
            check_head(&parse_head(UNHIDRA_206).unwrap(), &range),
            Ok(4096)
        );
        assert!(check_head(&parse_head(UNHIDRA_206).unwrap(), &Want::Range(0..=4095)).is_err());
        // A server that ignores Range and sends the whole image fails a range request.
        assert!(check_head(&parse_head(NGINX_200).unwrap(), &range).is_err());
        let whole = Want::Whole(1_572_864);
        assert_eq!(
            check_head(&parse_head(NGINX_200).unwrap(), &whole),
            Ok(1_572_864)
        );
        assert!(check_head(&parse_head(NGINX_200).unwrap(), &Want::Whole(10)).is_err());
        let chunked = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(check_head(&chunked, &whole).is_err());
    }

    #[test]
    fn requests_carry_the_range_and_the_key() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut out = String::new();
        write_request(&mut out, addr, "/f.bin", None, &Want::Range(0..=4095));
        assert_eq!(
            out,
            "GET /f.bin HTTP/1.1\r\nUser-Agent: ESP32 HTTP Client/1.0\r\nHost: 127.0.0.1:8080\r\n\
             Range: bytes=0-4095\r\n\r\n"
        );
        write_request(&mut out, addr, "/i", Some("unh_dk_x"), &Want::Whole(9));
        assert!(
            out.contains("\r\nAuthorization: Bearer unh_dk_x\r\n"),
            "{out}"
        );
        assert!(!out.contains("Range"), "{out}");
    }

    #[test]
    fn bodies_land_at_their_offset_across_reads() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let image: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
            let served = image.clone();
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0_u8; 1024];
                for (start, end) in [(0, 4095), (4096, 8191), (8192, 9999)] {
                    let mut seen = Vec::new();
                    while find_head_end(&seen).is_none() {
                        let n = socket.read(&mut buf).await.unwrap();
                        seen.extend_from_slice(&buf[..n]);
                    }
                    let text = String::from_utf8(seen).unwrap();
                    assert!(text.contains(&format!("Range: bytes={start}-{end}\r\n")), "{text}");
                    let mut answer = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/10000\r\n\
                         Content-Length: {}\r\n\r\n",
                        end - start + 1
                    )
                    .into_bytes();
                    answer.extend_from_slice(&served[start..=end]);
                    // In three writes, so that head and body arrive split at odd places.
                    let (a, rest) = answer.split_at(40);
                    let (b, c) = rest.split_at(rest.len() / 2);
                    for part in [a, b, c] {
                        socket.write_all(part).await.unwrap();
                        socket.flush().await.unwrap();
                    }
                }
            });
            let mut device = Device::connect(addr, true).await.unwrap();
            let mut copy = vec![0_u8; image.len()];
            let mut request = String::new();
            for (start, end) in [(0, 4095), (4096, 8191), (8192, 9999)] {
                let want = Want::Range(start..=end);
                write_request(&mut request, addr, "/f", None, &want);
                device
                    .fetch(request.as_bytes(), &want, &mut copy)
                    .await
                    .unwrap();
            }
            assert_eq!(copy, image);
            assert!(device.pending.is_empty());
            assert_eq!(device.reconnects, 0);
            server.await.unwrap();
        });
    }
}
