//! WebSocket conformance over a raw socket, modelled on the Autobahn suite's case groups:
//! framing and fragmentation (1, 5), ping/pong (2), reserved bits (3), opcodes (4), UTF-8 (6),
//! the close handshake (7) and limits (9). A failed connection may end with the close code or
//! with the socket closed, as RFC 6455 allows; either way the server goes on serving.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, user};

const WAIT: Duration = Duration::from_secs(10);

/// A client frame: FIN, RSV bits, opcode, masked payload.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | (rsv << 4) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | u8::try_from(len).unwrap());
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&u64::try_from(len).unwrap().to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// What the server sent next.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Frame { opcode: u8, payload: Vec<u8> },
    Closed,
}

async fn read_frame(stream: &mut TcpStream) -> Got {
    let mut head = [0u8; 2];
    match tokio::time::timeout(WAIT, stream.read_exact(&mut head))
        .await
        .expect("in time")
    {
        Ok(_) => {}
        Err(_) => return Got::Closed,
    }
    let opcode = head[0] & 0x0f;
    let mut len = u64::from(head[1] & 0x7f);
    if len == 126 {
        let mut ext = [0u8; 2];
        stream.read_exact(&mut ext).await.unwrap();
        len = u64::from(u16::from_be_bytes(ext));
    } else if len == 127 {
        let mut ext = [0u8; 8];
        stream.read_exact(&mut ext).await.unwrap();
        len = u64::from_be_bytes(ext);
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    if stream.read_exact(&mut payload).await.is_err() {
        return Got::Closed;
    }
    Got::Frame { opcode, payload }
}

/// The next frame that is not the welcome or presence text.
async fn read_reply(stream: &mut TcpStream) -> Got {
    loop {
        let got = read_frame(stream).await;
        if let Got::Frame { opcode: 1, payload } = &got {
            let text = String::from_utf8_lossy(payload);
            if text.contains("\"welcome\"") {
                continue;
            }
        }
        return got;
    }
}

/// The close code the server sent, or `None` if it dropped the socket.
async fn close_of(stream: &mut TcpStream) -> Option<u16> {
    loop {
        match read_frame(stream).await {
            Got::Frame { opcode: 8, payload } if payload.len() >= 2 => {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            Got::Frame { opcode: 8, .. } => return Some(1005),
            Got::Frame { .. } => {}
            Got::Closed => return None,
        }
    }
}

async fn open(app: &TestApp, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: unhidra.v1.json, bearer.{token}\r\n\r\n",
        app.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        response.push(byte[0]);
    }
    let text = String::from_utf8(response).unwrap();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // RFC 6455's own example key gives this accept value.
    assert!(
        text.to_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );
    stream
}

async fn still_serving(app: &TestApp, token: &str) {
    let mut stream = open(app, token).await;
    stream
        .write_all(&frame(true, 0, 1, br#"{"type":"ping"}"#))
        .await
        .unwrap();
    let reply = read_reply(&mut stream).await;
    assert!(
        matches!(&reply, Got::Frame { opcode: 1, payload } if payload == br#"{"type":"pong"}"#),
        "{reply:?}"
    );
}

#[tokio::test]
async fn framing_fragmentation_and_ping_pong() {
    let app = TestApp::spawn().await;
    let (_, token) = user(&app, "frames@example.com").await;
    let mut stream = open(&app, &token).await;
    // Group 1: a text frame with a 16-bit length.
    let padded = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(300));
    stream
        .write_all(&frame(true, 0, 1, padded.as_bytes()))
        .await
        .unwrap();
    let reply = read_reply(&mut stream).await;
    assert!(
        matches!(&reply, Got::Frame { opcode: 1, payload } if payload == br#"{"type":"pong"}"#),
        "{reply:?}"
    );
    // Group 5: a text message in three fragments, with a ping between them.
    stream
        .write_all(&frame(false, 0, 1, br#"{"type""#))
        .await
        .unwrap();
    stream
        .write_all(&frame(true, 0, 9, b"between"))
        .await
        .unwrap();
    stream
        .write_all(&frame(false, 0, 0, br#":"pi"#))
        .await
        .unwrap();
    stream
        .write_all(&frame(true, 0, 0, br#"ng"}"#))
        .await
        .unwrap();
    // Group 2: the ping's payload comes back in a pong, and the message is whole.
    let mut got = vec![read_reply(&mut stream).await, read_reply(&mut stream).await];
    got.sort_by_key(|g| format!("{g:?}"));
    assert!(
        got.contains(&Got::Frame {
            opcode: 10,
            payload: b"between".to_vec()
        }),
        "{got:?}"
    );
    assert!(
        got.contains(&Got::Frame {
            opcode: 1,
            payload: br#"{"type":"pong"}"#.to_vec()
        }),
        "{got:?}"
    );
    // Group 7: a clean close is answered with a close.
    stream
        .write_all(&frame(true, 0, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(close_of(&mut stream).await, Some(1000));
    app.shutdown().await;
}

/// Sends `bytes` on a fresh connection and returns how it ended.
async fn failing(app: &TestApp, token: &str, bytes: &[u8]) -> Option<u16> {
    let mut stream = open(app, token).await;
    stream.write_all(bytes).await.unwrap();
    close_of(&mut stream).await
}

#[tokio::test]
async fn protocol_violations_fail_the_connection_and_nothing_else() {
    let app = TestApp::spawn_with(
        crate::helpers::default_backend(),
        |c| c.ws_max_frame_bytes = 1024,
        None,
    )
    .await;
    let (_, token) = user(&app, "violations@example.com").await;
    // Group 3: reserved bits without an extension.
    let code = failing(&app, &token, &frame(true, 0b100, 1, br#"{"type":"ping"}"#)).await;
    assert!(matches!(code, None | Some(1002)), "{code:?}");
    // Group 4: reserved opcodes, data and control.
    for opcode in [3, 11] {
        let code = failing(&app, &token, &frame(true, 0, opcode, b"")).await;
        assert!(
            matches!(code, None | Some(1002)),
            "opcode {opcode}: {code:?}"
        );
    }
    // Group 5: a fragmented control frame, and a continuation with nothing to continue.
    let code = failing(&app, &token, &frame(false, 0, 9, b"x")).await;
    assert!(matches!(code, None | Some(1002)), "{code:?}");
    let code = failing(&app, &token, &frame(true, 0, 0, b"x")).await;
    assert!(matches!(code, None | Some(1002)), "{code:?}");
    // Group 6: invalid UTF-8 in a text frame.
    let code = failing(
        &app,
        &token,
        &frame(
            true,
            0,
            1,
            &[
                0x7b, 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80, 0x7d,
            ],
        ),
    )
    .await;
    assert!(matches!(code, None | Some(1007)), "{code:?}");
    // The protocol's own rules: binary frames are not part of unhidra.v1.json.
    assert_eq!(
        failing(&app, &token, &frame(true, 0, 2, b"\x00\x01")).await,
        Some(1003)
    );
    // Group 9: a message over the limit.
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "y".repeat(4096));
    assert_eq!(
        failing(&app, &token, &frame(true, 0, 1, big.as_bytes())).await,
        Some(1009)
    );
    // After all that, the server serves as before.
    still_serving(&app, &token).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_bad_frame_read_together_with_sends_keeps_its_own_close_code() {
    let app = TestApp::spawn().await;
    let (_, token) = user(&app, "burst-utf8@example.com").await;
    let mut stream = open(&app, &token).await;
    // Two sends and a text frame with invalid UTF-8 in one write: the sends are gathered into
    // one group, and the bad frame read while gathering is still failed as invalid UTF-8.
    let send = |id: &str| {
        frame(
            true,
            0,
            1,
            format!(
                r#"{{"type":"send","room":"00000000-0000-0000-0000-000000000000","body":"b","client_msg_id":"{id}"}}"#
            )
            .as_bytes(),
        )
    };
    let mut bytes = send("one");
    bytes.extend(send("two"));
    bytes.extend(frame(true, 0, 1, &[0x7b, 0xed, 0xa0, 0x80, 0x7d]));
    stream.write_all(&bytes).await.unwrap();
    let mut refs = Vec::new();
    let code = loop {
        match read_reply(&mut stream).await {
            Got::Frame { opcode: 1, payload } => {
                let frame: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(frame["code"], "room_not_found", "{frame}");
                refs.push(frame["ref"].as_str().unwrap().to_owned());
            }
            Got::Frame { opcode: 8, payload } if payload.len() >= 2 => {
                break Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            Got::Frame { .. } => {}
            Got::Closed => break None,
        }
    };
    assert_eq!(refs.len(), 2, "every send is answered: {refs:?}");
    assert_eq!(code, Some(1007));
    still_serving(&app, &token).await;
    app.shutdown().await;
}
