//! Connections: a tiny HTTP/1.1 client for setup, WebSocket connects from chosen 127.0.0.x source
//! addresses, and the two wire protocols the generator speaks (cochat v1, Socket.IO v5 over
//! Engine.IO v4 with the websocket transport only).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Read buffer per client socket: frames here are a few hundred bytes (larger ones still work,
/// the buffer grows for them).
const READ_BUFFER_BYTES: usize = 4096;

pub type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Cochat,
    Socketio,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        match s {
            "cochat" => Ok(Target::Cochat),
            "socketio" => Ok(Target::Socketio),
            other => bail!("unknown target `{other}` (cochat or socketio)"),
        }
    }
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME: the same clock in every process here).
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `127.0.0.1:8080` from `http://127.0.0.1:8080` or `ws://127.0.0.1:8080/path`.
pub fn host_port(url: &str) -> Result<String> {
    let rest = url
        .split("://")
        .nth(1)
        .ok_or_else(|| anyhow!("no scheme in {url}"))?;
    Ok(rest.split('/').next().unwrap_or(rest).to_owned())
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the JSON body.
pub async fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| anyhow!("{method} {path}: no answer in 60 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} {path}: malformed answer"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{method} {path}: no status"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    Ok((status, value))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// A WebSocket to `url`, from the source address `src` (port chosen by the kernel).
pub async fn open_ws(url: &str, src: Ipv4Addr) -> Result<Ws> {
    let addr: SocketAddr = host_port(url)?
        .parse()
        .context("ws url must be ws://IP:PORT/...")?;
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(src.into(), 0))
        .with_context(|| format!("bind {src}"))?;
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr} from {src}"))?;
    stream.set_nodelay(true)?;
    // tungstenite zero-fills its whole read buffer (128 KiB by default) before every read: with
    // one small frame per read, that memset was half of this generator's CPU per delivery.
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let (ws, _response) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .with_context(|| format!("websocket handshake with {addr}"))?;
    Ok(ws)
}

pub fn cochat_ws_url(base: &str, token: &str) -> String {
    format!("ws://{}/api/v1/ws?token={token}", base)
}

pub fn socketio_ws_url(base: &str) -> String {
    format!("ws://{}/socket.io/?EIO=4&transport=websocket", base)
}

async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Err(_) => bail!("no frame in 30 s"),
            Ok(None) => bail!("socket closed"),
            Ok(Some(Err(e))) => bail!("socket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(c)))) => bail!("closed by server: {c:?}"),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// cochat: `subscribe` and wait for `subscribed`; returns its `head_seq`.
pub async fn cochat_subscribe(ws: &mut Ws, room: &str, since_seq: Option<i64>) -> Result<i64> {
    let mut frame = serde_json::json!({"type": "subscribe", "id": "sub", "room": room});
    if let Some(since) = since_seq {
        frame["since_seq"] = since.into();
    }
    ws.send(Message::text(frame.to_string())).await?;
    loop {
        let text = next_text(ws).await?;
        let v: Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("subscribed") => return Ok(v["head_seq"].as_i64().unwrap_or(0)),
            Some("error") => bail!("subscribe refused: {text}"),
            _ => continue,
        }
    }
}

/// Socket.IO: Engine.IO open packet, namespace connect, and (for a receiver) `join` with its ack.
pub async fn socketio_handshake(ws: &mut Ws, join: Option<&str>) -> Result<()> {
    let open = next_text(ws).await?;
    if !open.starts_with('0') {
        bail!("expected an Engine.IO open packet, got {open}");
    }
    ws.send(Message::text("40")).await?;
    loop {
        let t = next_text(ws).await?;
        if t == "2" {
            ws.send(Message::text("3")).await?;
        } else if t.starts_with("40") {
            break;
        } else if t.starts_with("44") {
            bail!("namespace connect refused: {t}");
        }
    }
    if let Some(room) = join {
        ws.send(Message::text(format!(
            "420[\"join\",{}]",
            serde_json::to_string(room)?
        )))
        .await?;
        loop {
            let t = next_text(ws).await?;
            if t == "2" {
                ws.send(Message::text("3")).await?;
            } else if t.starts_with("430") {
                break;
            }
        }
    }
    Ok(())
}

/// The 100-byte text of a message: send time and the sender's node, padded with `x`.
pub fn payload(len: usize, node: usize) -> String {
    let mut text = format!("t={:019} n={node} ", now_nanos());
    while text.len() < len {
        text.push('x');
    }
    text
}

/// (send time, sender node) from a frame carrying a payload, without parsing the JSON.
pub fn parse_payload(frame: &str) -> Option<(u64, usize)> {
    let at = frame.find("\"text\":\"t=")? + 10;
    let digits = frame.get(at..at + 19)?;
    let sent: u64 = digits.parse().ok()?;
    let node = frame
        .get(at + 22..)?
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0usize, |n, b| n * 10 + (b - b'0') as usize);
    Some((sent, node))
}

/// The numeric `reply_to` of a cochat `ack`, or the id of a Socket.IO ack packet (`43<id>[...]`).
pub fn parse_ack(target: Target, frame: &str) -> Option<u64> {
    match target {
        Target::Cochat => {
            if !frame.contains("\"type\":\"ack\"") {
                return None;
            }
            let at = frame.find("\"reply_to\":")? + 11;
            let n: String = frame[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            n.parse().ok()
        }
        Target::Socketio => {
            let rest = frame.strip_prefix("43")?;
            let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
            n.parse().ok()
        }
    }
}

/// The `seq` of a cochat `event` frame.
pub fn parse_event_seq(frame: &str) -> Option<i64> {
    if !frame.starts_with("{\"type\":\"event\"") && !frame.contains("\"type\":\"event\"") {
        return None;
    }
    let v: Value = serde_json::from_str(frame).ok()?;
    v["seq"].as_i64()
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of a process so far, in seconds (0 when it cannot be read).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the `(comm)` field: state is field 3, utime 14, stime 15 (clock ticks, 100 per second).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let text = payload(100, 2);
        assert_eq!(text.len(), 100);
        let frame = format!("{{\"type\":\"event\",\"message\":{{\"text\":\"{text}\"}}}}");
        let (sent, node) = parse_payload(&frame).expect("parses");
        assert!(sent > 0);
        assert_eq!(node, 2);
    }

    #[test]
    fn acks_parse() {
        assert_eq!(
            parse_ack(
                Target::Cochat,
                r#"{"type":"ack","reply_to":42,"room":"r","seq":3}"#
            ),
            Some(42)
        );
        assert_eq!(
            parse_ack(Target::Cochat, r#"{"type":"event","reply_to":42}"#),
            None
        );
        assert_eq!(
            parse_ack(Target::Socketio, r#"4317[{"ok":true}]"#),
            Some(17)
        );
        assert_eq!(parse_ack(Target::Socketio, r#"42["message",{}]"#), None);
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
    }
}
