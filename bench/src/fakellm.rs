//! `cochat-bench fake-llm`: a fake OpenAI-compatible provider for the ai scenario.
//!
//! Answers every `POST .../chat/completions` with a Server-Sent Events stream of `--tokens N`
//! tokens at `--rate R` tokens per second (token `i` is due at `start + i / R`), in the shape
//! cochat's client (`src/ai/provider.rs`) parses:
//!
//! ```text
//! HTTP/1.1 200 OK, content-type: text/event-stream, transfer-encoding: chunked
//! data: {"choices":[{"index":0,"delta":{"content":"t<unix_micros> "},"finish_reason":null}]}   x N
//! data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}
//! data: {"choices":[],"usage":{"prompt_tokens":..,"completion_tokens":N}}
//! data: [DONE]
//! ```
//!
//! one event per HTTP chunk, each token's text being the wall-clock time (CLOCK_REALTIME, in
//! microseconds) at which it was written to the socket, so a receiver on the same machine gets
//! "provider -> member" latency as `now - t`. Keep-alive is honoured; anything else is a 404.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::net::now_nanos;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    answers_done: AtomicU64,
    answers_cut: AtomicU64,
}

pub async fn serve(listen: &str, tokens: usize, rate: f64) -> Result<()> {
    if rate.is_nan() || rate <= 0.0 {
        bail!("--rate must be > 0");
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow!("bind {listen}: {e}"))?;
    let counters = Arc::new(Counters::default());
    println!(
        "fake-llm listening on {} ({tokens} tokens per answer at {rate} tokens/s)",
        listener.local_addr()?
    );
    {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut last = (0, 0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = (
                    counters.requests.load(Ordering::Relaxed),
                    counters.answers_done.load(Ordering::Relaxed),
                    counters.answers_cut.load(Ordering::Relaxed),
                );
                if now != last {
                    eprintln!("fake-llm: {} requests, {} answers streamed to the end, {} cut by the client", now.0, now.1, now.2);
                    last = now;
                }
            }
        });
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let counters = counters.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, tokens, rate, &counters).await {
                eprintln!("fake-llm: connection: {e:#}");
            }
        });
    }
}

/// One request's head: method, path, content-length.
struct Head {
    method: String,
    path: String,
    content_length: usize,
}

fn parse_head(head: &str) -> Result<Head> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let method = parts
        .next()
        .ok_or_else(|| anyhow!("empty request line"))?
        .to_owned();
    let path = parts
        .next()
        .ok_or_else(|| anyhow!("no path in {request_line:?}"))?
        .to_owned();
    let mut content_length = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-length" {
                content_length = value
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("bad content-length {value:?}"))?;
            } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked")
            {
                bail!("chunked request bodies are not supported by the fake");
            }
        }
    }
    Ok(Head {
        method,
        path,
        content_length,
    })
}

async fn connection(
    mut stream: TcpStream,
    tokens: usize,
    rate: f64,
    counters: &Counters,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        // The head, up to the blank line.
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            if buf.len() > 1 << 20 {
                bail!("request head larger than 1 MiB");
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(()); // the client closed an idle keep-alive connection
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = parse_head(&String::from_utf8_lossy(&buf[..head_end]))?;
        // The body, by content-length (the prompt: read and ignored).
        let body_start = head_end + 4;
        while buf.len() < body_start + head.content_length {
            let mut chunk =
                vec![0u8; (body_start + head.content_length - buf.len()).min(64 * 1024)];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("client closed mid-request");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..body_start + head.content_length);
        counters.requests.fetch_add(1, Ordering::Relaxed);

        if head.method != "POST" || !head.path.ends_with("/chat/completions") {
            let body = r#"{"error":{"message":"the fake provider only serves POST .../chat/completions"}}"#;
            let response = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await?;
            continue;
        }
        match answer(&mut stream, tokens, rate).await {
            Ok(()) => {
                counters.answers_done.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // cochat drops the body (and the connection) once it has what it needs, or on cancel.
                counters.answers_cut.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
    }
}

async fn chunk(stream: &mut TcpStream, event: &str) -> std::io::Result<()> {
    let framed = format!("{:x}\r\n{event}\r\n", event.len());
    stream.write_all(framed.as_bytes()).await
}

async fn answer(stream: &mut TcpStream, tokens: usize, rate: f64) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        .await?;
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    for i in 0..tokens {
        tokio::time::sleep_until(start + period * i as u32).await;
        let event = format!(
            "data: {{\"id\":\"fake\",\"object\":\"chat.completion.chunk\",\"model\":\"fake\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{} \"}},\"finish_reason\":null}}]}}\n\n",
            now_nanos() / 1000
        );
        chunk(stream, &event).await?;
    }
    tokio::time::sleep_until(start + period * tokens as u32).await;
    chunk(stream, "data: {\"id\":\"fake\",\"object\":\"chat.completion.chunk\",\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n").await?;
    chunk(
        stream,
        &format!("data: {{\"id\":\"fake\",\"object\":\"chat.completion.chunk\",\"model\":\"fake\",\"choices\":[],\"usage\":{{\"prompt_tokens\":100,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\n", tokens + 100),
    )
    .await?;
    chunk(stream, "data: [DONE]\n\n").await?;
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}

/// The send times (unix microseconds) of the tokens in a delta's text: every `t<digits>` word.
pub fn token_times(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.split_whitespace()
        .filter_map(|word| word.strip_prefix('t')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_times_parse() {
        let t: Vec<u64> = token_times("t1732240000000001 t1732240000020001 ").collect();
        assert_eq!(t, vec![1732240000000001, 1732240000020001]);
        assert_eq!(token_times("hello").count(), 0);
    }

    #[test]
    fn heads_parse() {
        let h = parse_head("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12")
            .expect("a valid head");
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.content_length),
            ("POST", "/v1/chat/completions", 12)
        );
    }
}
