//! `floor`: what this machine gives *any* WebSocket server for the fanout and ai shapes.
//!
//! A do-nothing server (`__floor-server`, its own process, two threads like cochat's two
//! workers) accepts N WebSockets and, on a fixed schedule, writes one pre-encoded 100-byte text
//! frame per message to every member of the message's room: one `write` per delivery and no
//! parsing, storing, routing or serialising. The readers are the generator's own (`open_ws`,
//! tungstenite, 4 KiB read buffer) in worker processes on the same cores, as in the real
//! scenarios. The frame carries its *scheduled* send time, so a server that falls behind its
//! schedule shows it as latency. A server that writes each frame as it comes cannot beat this
//! floor on this machine with this generator; one that lets a socket's frames queue and share a
//! write can, at the price of that queueing (cochat above its knee: see BENCHMARKS.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::child::{wait_for_word, Child};
use crate::net::{self, now_nanos};
use crate::stats::Hist;
use crate::{round3, source_ip, Args};

/// The schedule both sides agree on, passed to the children as arguments.
struct Shape {
    conns: usize,
    rooms: usize,
    rate: f64,
    duration_s: f64,
    text_bytes: usize,
}

impl Shape {
    fn from_args(args: &Args) -> Result<Shape> {
        let shape = Shape {
            conns: args.num("conns", 10_000)?,
            rooms: args.num("rooms", 20)?,
            rate: args.num("rate", 100.0)?,
            duration_s: args.num("duration", 10.0)?,
            text_bytes: args.num("text-bytes", 100)?,
        };
        if shape.rooms == 0 || shape.conns < shape.rooms || shape.rate <= 0.0 {
            bail!("floor needs --conns >= --rooms >= 1 and --rate > 0");
        }
        Ok(shape)
    }

    fn to_argv(&self) -> Vec<String> {
        [
            self.conns.to_string(),
            self.rooms.to_string(),
            self.rate.to_string(),
            self.duration_s.to_string(),
            self.text_bytes.to_string(),
        ]
        .into()
    }

    fn from_argv(argv: &[String]) -> Result<Shape> {
        let at = |i: usize| argv.get(i).ok_or_else(|| anyhow!("floor argument {i}"));
        Ok(Shape {
            conns: at(0)?.parse()?,
            rooms: at(1)?.parse()?,
            rate: at(2)?.parse()?,
            duration_s: at(3)?.parse()?,
            text_bytes: at(4)?.parse()?,
        })
    }

    /// Connection `i` is a member of room `i % rooms`; message `k` goes to room `k % rooms`.
    fn members_of(&self, room: usize) -> usize {
        (self.conns + self.rooms - 1 - room) / self.rooms
    }

    fn messages(&self) -> u64 {
        (self.rate * self.duration_s).round() as u64
    }
}

/// `cochat-bench floor`: runs the floor server and `--workers` reader processes, reports like
/// the fanout and ai scenarios.
pub async fn run(args: &Args) -> Result<Value> {
    let shape = Shape::from_args(args)?;
    let workers: usize = args.num("workers", 4)?;
    // Each step of the protocol is given 10 minutes (20,000 handshakes take well under one).
    let step = || Instant::now() + Duration::from_secs(600);

    let mut server = Child::spawned("__floor-server".into(), "__floor-server", shape.to_argv())?;
    let port = server.expect("PORT", step()).await?;
    let addr = format!("127.0.0.1:{}", port.trim());
    let mut readers = Vec::new();
    for index in 0..workers {
        let mut argv = shape.to_argv();
        argv.extend([addr.clone(), index.to_string(), workers.to_string()]);
        readers.push(Child::spawned(
            format!("floor reader {index}"),
            "__floor-reader",
            argv,
        )?);
    }
    let mut connected = 0;
    for reader in &mut readers {
        connected += reader.expect("READY", step()).await?.parse::<usize>()?;
    }
    server.expect("ACCEPTED", step()).await?;

    let cpu_before = net::cpu_seconds(server.pid);
    server.say("GO").await?;
    let done: Value = serde_json::from_str(&server.expect("DONE", step()).await?)?;
    let cpu_s = net::cpu_seconds(server.pid) - cpu_before;
    // Frames still in socket buffers reach the readers within the drain.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut hist = Hist::default();
    let mut per_message: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut delivered = 0;
    for reader in &mut readers {
        reader.say("STOP").await?;
        let report: Value = serde_json::from_str(&reader.expect("STATS", step()).await?)?;
        hist.merge_pairs(&report["latency"]);
        delivered += report["delivered"].as_u64().unwrap_or(0);
        for entry in report["per_message"].as_array().into_iter().flatten() {
            let (k, n, max) = (entry[0].as_u64(), entry[1].as_u64(), entry[2].as_u64());
            if let (Some(k), Some(n), Some(max)) = (k, n, max) {
                let slot = per_message.entry(k).or_default();
                slot.0 += n;
                slot.1 = slot.1.max(max);
            }
        }
    }
    // "To the last member": messages every member of their room received.
    let mut last_member = Hist::default();
    for (k, (n, max_us)) in &per_message {
        if *n as usize == shape.members_of(*k as usize % shape.rooms) {
            last_member.record_us(*max_us);
        }
    }
    let expected: u64 = (0..shape.messages())
        .map(|k| shape.members_of(k as usize % shape.rooms) as u64)
        .sum();
    Ok(json!({
        "target": "floor",
        "params": {
            "conns": shape.conns, "rooms": shape.rooms, "rate_msgs_per_s": shape.rate,
            "duration_s": shape.duration_s, "text_bytes": shape.text_bytes, "workers": workers,
            "server_threads": SERVER_THREADS,
        },
        "results": {
            "connected": connected,
            "expected_deliveries": expected,
            "deliveries": delivered,
            "deliveries_per_s": (delivered as f64 / shape.duration_s).round(),
            "latency": hist.summary_ms(),
            "to_last_member": last_member.summary_ms(),
            "server_written_after_due": done["written"],
            "server_cpu_s": round3(cpu_s),
            "server_cpu_us_per_delivery": if delivered > 0 { round3(cpu_s * 1e6 / delivered as f64) } else { 0.0 },
        },
    }))
}

/// The floor server's threads: cochat runs one actix worker per core, two here.
const SERVER_THREADS: usize = 2;

/// `__floor-server`: accept, wait for `GO`, write the schedule, report `DONE`.
pub fn server(argv: &[String]) -> Result<()> {
    let shape = Shape::from_argv(argv)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_THREADS)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("PORT {}", listener.local_addr()?.port());
        let mut sockets = Vec::with_capacity(shape.conns);
        while sockets.len() < shape.conns {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            sockets.push(tokio::spawn(tokio_tungstenite::accept_async(stream)));
        }
        let mut open: Vec<WebSocketStream<TcpStream>> = Vec::with_capacity(shape.conns);
        for socket in sockets {
            open.push(socket.await?.context("websocket handshake")?);
        }
        // The readers send their index first: it says which room each socket is in.
        let mut by_index: Vec<Option<WebSocketStream<TcpStream>>> =
            (0..shape.conns).map(|_| None).collect();
        for mut ws in open {
            let index: usize = match ws.next().await {
                Some(Ok(Message::Text(text))) => text.parse()?,
                other => bail!("expected a reader's index, got {other:?}"),
            };
            *by_index
                .get_mut(index)
                .ok_or_else(|| anyhow!("index {index}"))? = Some(ws);
        }
        println!("ACCEPTED");
        wait_for_word("GO").await?;

        // Task t writes to the sockets i with i % SERVER_THREADS == t (the runtime runs the
        // tasks on its two threads), as two actix workers would each own half of the connections.
        let shape = Arc::new(shape);
        let mut groups: Vec<Vec<Vec<TcpStream>>> = (0..SERVER_THREADS)
            .map(|_| (0..shape.rooms).map(|_| Vec::new()).collect())
            .collect();
        for (i, ws) in by_index.into_iter().enumerate() {
            let ws = ws.ok_or_else(|| anyhow!("socket {i} missing"))?;
            groups[i % SERVER_THREADS][i % shape.rooms].push(ws.into_inner());
        }
        // One frame (not counted by the readers) down every socket first: the first write to
        // a socket costs more than the rest (measured: the schedule's first messages ran
        // ~160 ms late without this). cochat's sockets are warm too, from their subscribe.
        let warm_up = text_frame("warm-up");
        for socket in groups.iter_mut().flatten().flatten() {
            socket.write_all(&warm_up).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        let tasks: Vec<_> = groups
            .into_iter()
            .map(|rooms| tokio::spawn(write_schedule(shape.clone(), start, rooms)))
            .collect();
        let mut written = Hist::default();
        for task in tasks {
            written.merge_pairs(&task.await??.to_pairs());
        }
        println!("DONE {}", json!({"written": written.summary_ms()}));
        // Keep the sockets open until the parent has read everything.
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(())
    })
}

/// Writes message k at `start + k / rate` to every socket of room `k % rooms` this task owns.
/// Returns, per message, how long after its scheduled time its last frame was written.
async fn write_schedule(
    shape: Arc<Shape>,
    start: Instant,
    mut rooms: Vec<Vec<TcpStream>>,
) -> Result<Hist> {
    let mut written = Hist::default();
    let epoch_ns = now_nanos() - start.elapsed().as_nanos() as u64;
    for k in 0..shape.messages() {
        let due = start + Duration::from_secs_f64(k as f64 / shape.rate);
        tokio::time::sleep_until(due.into()).await;
        let sent_ns = epoch_ns + (due - start).as_nanos() as u64;
        let frame = text_frame(&stamp(sent_ns, k, shape.text_bytes));
        for socket in &mut rooms[k as usize % shape.rooms] {
            socket.write_all(&frame).await?;
        }
        written.record_us(Instant::now().saturating_duration_since(due).as_micros() as u64);
    }
    Ok(written)
}

/// The text a frame carries: its scheduled send time (ns), its message number, padding.
fn stamp(sent_ns: u64, k: u64, len: usize) -> String {
    let mut text = format!("{sent_ns} {k} ");
    while text.len() < len {
        text.push('x');
    }
    text
}

/// An unmasked server-to-client WebSocket text frame (RFC 6455 section 5.2).
fn text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// What one reader process saw: latencies, and per message how many got it and the slowest.
#[derive(Default)]
struct Seen {
    latency: Hist,
    delivered: u64,
    per_message: HashMap<u64, (u64, u64)>,
}

/// `__floor-reader`: opens this worker's share of the sockets, reads until `STOP`.
pub fn reader(argv: &[String]) -> Result<()> {
    let shape = Shape::from_argv(argv)?;
    let addr = argv
        .get(5)
        .ok_or_else(|| anyhow!("server address"))?
        .clone();
    let index: usize = argv
        .get(6)
        .ok_or_else(|| anyhow!("worker index"))?
        .parse()?;
    let count: usize = argv
        .get(7)
        .ok_or_else(|| anyhow!("worker count"))?
        .parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let url = format!("ws://{addr}/");
        let mine: Vec<usize> = (0..shape.conns).filter(|i| i % count == index).collect();
        let opened = mine.len();
        // A few hundred handshakes in flight: enough to be quick, few enough for the backlog.
        let mut opening = futures_util::stream::iter(mine.into_iter().enumerate())
            .map(|(local, conn)| {
                let url = url.clone();
                async move {
                    let mut ws = net::open_ws(&url, source_ip(index, local)).await?;
                    futures_util::SinkExt::send(&mut ws, Message::text(conn.to_string())).await?;
                    anyhow::Ok(ws)
                }
            })
            .buffer_unordered(256);
        while let Some(ws) = opening.next().await {
            tokio::spawn(read_frames(ws?, seen.clone()));
        }
        println!("READY {opened}");
        wait_for_word("STOP").await?;
        let seen = seen.lock().map_err(|_| anyhow!("poisoned"))?;
        let per_message: Vec<(u64, u64, u64)> = seen
            .per_message
            .iter()
            .map(|(k, (n, max))| (*k, *n, *max))
            .collect();
        let report = json!({
            "latency": seen.latency.to_pairs(),
            "delivered": seen.delivered,
            "per_message": per_message,
        });
        println!("STATS {report}");
        std::process::exit(0)
    })
}

async fn read_frames(mut ws: net::Ws, seen: Arc<Mutex<Seen>>) {
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let now = now_nanos();
        let mut fields = text.split(' ');
        let sent: Option<u64> = fields.next().and_then(|f| f.parse().ok());
        let k: Option<u64> = fields.next().and_then(|f| f.parse().ok());
        let (Some(sent), Some(k)) = (sent, k) else {
            continue;
        };
        let us = now.saturating_sub(sent) / 1000;
        if let Ok(mut seen) = seen.lock() {
            seen.latency.record_us(us);
            seen.delivered += 1;
            let slot = seen.per_message.entry(k).or_default();
            slot.0 += 1;
            slot.1 = slot.1.max(us);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// The floor server's hand-encoded frames must be what a real WebSocket client reads, for
    /// each of the three length encodings, with the stamp the readers parse intact.
    #[tokio::test]
    async fn hand_encoded_frames_are_read_by_a_websocket_client() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let texts: Vec<String> = [10, 125, 126, 300, 70_000]
            .iter()
            .enumerate()
            .map(|(k, len)| stamp(1_795_000_000_123_456_789, k as u64, *len))
            .collect();
        for text in &texts {
            server
                .write_all(&text_frame(text))
                .await
                .expect("the duplex takes the frame");
        }
        for (k, text) in texts.iter().enumerate() {
            let Some(Ok(Message::Text(got))) = ws.next().await else {
                panic!("frame {k} not read as text");
            };
            assert_eq!(got.as_str(), text.as_str());
            let mut fields = got.split(' ');
            assert_eq!(fields.next(), Some("1795000000123456789"));
            assert_eq!(fields.next(), Some(k.to_string().as_str()));
        }
    }

    /// Connection i is in room i % rooms: the member counts must add up to the connections,
    /// or "to the last member" would wait for members that do not exist.
    #[test]
    fn members_per_room_add_up() {
        for (conns, rooms) in [(10_000, 20), (1_000, 1), (10, 3), (7, 7)] {
            let shape = Shape {
                conns,
                rooms,
                rate: 1.0,
                duration_s: 1.0,
                text_bytes: 100,
            };
            let total: usize = (0..rooms).map(|r| shape.members_of(r)).sum();
            assert_eq!(total, conns, "{conns} conns in {rooms} rooms");
            for r in 0..rooms {
                assert_eq!(
                    shape.members_of(r),
                    (0..conns).filter(|i| i % rooms == r).count()
                );
            }
        }
    }
}
