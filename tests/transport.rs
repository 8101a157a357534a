//! The WebSocket transport as a client sees it on the wire (raw TCP, no WebSocket library): the
//! upgrade leaves the HTTP/1 dispatcher, so its refusals, its `101` and the first bytes after it
//! are produced by our own code (src/ws/transport.rs) and are checked here byte for byte.

mod common;

use std::time::Duration;

use common::client::Api;
use common::db::TestDatabase;
use common::server::TestServer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The `Sec-WebSocket-Accept` for `KEY` (RFC 6455, section 1.3).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: cochat\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// A masked client text frame (payloads under 126 bytes).
fn client_text_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads until the end of the HTTP head; returns the head and whatever followed it.
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = bytes.split_off(end + 4);
            return (String::from_utf8_lossy(&bytes).into_owned(), rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("the server answers within 10 s")
            .expect("reading the answer");
        assert!(
            n > 0,
            "connection closed before a full HTTP head: {bytes:?}"
        );
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// Reads to end of stream (the server closes after a refusal).
async fn read_to_close(stream: &mut TcpStream, mut bytes: Vec<u8>) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection after refusing")
        .expect("reading to the end");
    bytes
}

/// The next unmasked server text frame's payload (reads more from `stream` as needed).
async fn next_server_text(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Value {
    loop {
        if buffer.len() >= 2 {
            let opcode = buffer[0] & 0x0f;
            let (len, start) = match buffer[1] & 0x7f {
                126 if buffer.len() >= 4 => {
                    (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4)
                }
                126 => (usize::MAX, 0),
                127 => panic!("no frame here is that large"),
                n => (n as usize, 2),
            };
            if len != usize::MAX && buffer.len() >= start + len {
                let payload: Vec<u8> = buffer.drain(..start + len).skip(start).collect();
                if opcode == 0x1 {
                    return serde_json::from_slice(&payload).expect("a text frame is JSON");
                }
                continue; // a ping or pong: not what we wait for
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a frame within 10 s")
            .expect("reading a frame");
        assert!(n > 0, "socket closed while waiting for a frame");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refusals_are_complete_http_responses_with_the_json_error() {
    let db = TestDatabase::sqlite();
    let server = TestServer::start(&db).await;
    let cases = [
        ("/api/v1/ws", "401", "unauthorized"),
        ("/api/v1/ws?token=not-a-token", "401", "unauthorized"),
        ("/api/v1/elsewhere", "404", "not_found"),
    ];
    for (path, status, code) in cases {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream
            .write_all(upgrade_request(path).as_bytes())
            .await
            .expect("send the upgrade");
        let (head, rest) = read_head(&mut stream).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {head}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/json"), "{head}");
        assert!(lower.contains("connection: close"), "{head}");
        let body = read_to_close(&mut stream, rest).await;
        let length: usize = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        assert_eq!(body.len(), length, "the whole body and nothing after it");
        let body: Value = serde_json::from_slice(&body).expect("the body is JSON");
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sent_right_behind_the_upgrade_request_is_answered() {
    let db = TestDatabase::sqlite();
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let ada = api.register("ada").await;

    // The request and the first frame in one write: the frame reaches the server in the same
    // read as the request, before its 101 is sent, and must not be lost in the hand-over.
    let mut bytes = upgrade_request(&format!("/api/v1/ws?token={}", ada.token)).into_bytes();
    bytes.extend(client_text_frame(r#"{"type":"ping","id":"early"}"#));
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(&bytes).await.expect("send");

    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains(ACCEPT), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-cochat-node: "),
        "{head}"
    );
    let mut buffer = rest;
    let pong = next_server_text(&mut stream, &mut buffer).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["reply_to"], "early", "{pong}");

    // And the socket goes on working after it.
    stream
        .write_all(&client_text_frame(r#"{"type":"ping","id":"later"}"#))
        .await
        .expect("send");
    let pong = next_server_text(&mut stream, &mut buffer).await;
    assert_eq!(pong["reply_to"], "later", "{pong}");
}
