//! `cochat-bench`: a load generator for cochat (protocol v1 over real WebSockets) and for the
//! Socket.IO peer in `bench/socketio/` (Socket.IO v5 / Engine.IO v4, websocket transport).
//!
//! Scenarios (see BENCHMARKS.md and scripts/bench.sh):
//!   idle       open N connections, subscribe, hold; server RSS per connection, handshakes/s
//!   fanout     R rooms x M members, S senders at a total rate; deliveries/s, send->deliver latency
//!              (with several `--nodes` this is the cluster scenario: cross-node deliveries/s)
//!   durable    C connections each keeping W sends in flight; acked sends/s, ack latency
//!   reconnect  N clients on one node; kill -9 (or SIGTERM) it; time until all are back and caught up
//!   ai         R rooms x M members, an agent answering `/ai go` from `fake-llm` (a fake provider
//!              streaming timestamped tokens at 50/s); latency provider -> member and -> last member
//!
//! Clients are spread over `--workers K` child processes of this binary (each a single-threaded
//! tokio runtime) and over 127.0.x.y source addresses, because one process may hold at most
//! 20,000 open files here.

mod ai;
mod child;
mod fakellm;
mod floor;
mod net;
mod stats;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{stream, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use net::{now_nanos, Target, Ws};
use stats::Hist;

const USAGE: &str = "usage:
  cochat-bench idle      --target cochat|socketio --nodes HOST:PORT[,..] --conns N [--workers K] [--users U] [--hold S] [--server-pid PID]
  cochat-bench fanout    --target cochat|socketio --nodes HOST:PORT[,..] --rooms R --members M --senders S --rate MSGS_PER_S
                         [--duration S] [--workers K] [--users U] [--server-pid PID[,..]] [--name cluster]
  cochat-bench durable   --nodes HOST:PORT --conns C --window W [--rooms R] [--duration S] [--backend sqlite|postgres]
  cochat-bench reconnect --nodes A,B[,..] --victim-pid PID [--signal KILL|TERM] --conns N [--rate MSGS_PER_S]
  cochat-bench ai        --nodes HOST:PORT --members M [--rooms R] [--answers A] [--tokens N] [--rate TOKENS_PER_S]
                         [--workers K] [--users U] [--server-pid PID] [--timeout S]
  cochat-bench floor     --conns N --rooms R --rate MSGS_PER_S [--duration S] [--workers K]
                         (a do-nothing WebSocket server writing the fanout schedule: this machine's floor)
  cochat-bench fake-llm  --listen 127.0.0.1:PORT [--tokens N] [--rate TOKENS_PER_S]   (runs until killed)
  common: --out FILE.json  --label TEXT  --text-bytes 100
  cochat-bench free-port";

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let command = argv.get(1).map(String::as_str).unwrap_or("");
    match command {
        "__worker" => {
            let plan_path = argv.get(2).ok_or_else(|| anyhow!("plan path"))?;
            let index: usize = argv.get(3).ok_or_else(|| anyhow!("index"))?.parse()?;
            let count: usize = argv.get(4).ok_or_else(|| anyhow!("count"))?.parse()?;
            let plan: Plan = serde_json::from_slice(&std::fs::read(plan_path)?)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if plan.ai_answers > 0 {
                return runtime.block_on(ai::worker(Arc::new(plan), index, count));
            }
            runtime.block_on(worker(Arc::new(plan), index, count))
        }
        "__floor-server" => floor::server(&argv[2..]),
        "__floor-reader" => floor::reader(&argv[2..]),
        "fake-llm" => {
            let args = Args::parse(&argv[2..])?;
            let listen = args.str("listen", "127.0.0.1:0");
            let tokens: usize = args.num("tokens", 100)?;
            let rate: f64 = args.num("rate", 50.0)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(fakellm::serve(&listen, tokens, rate))
        }
        "free-port" => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", listener.local_addr()?.port());
            Ok(())
        }
        "idle" | "fanout" | "durable" | "reconnect" | "ai" | "floor" => {
            let args = Args::parse(&argv[2..])?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let report = runtime.block_on(async {
                match command {
                    "idle" => idle(&args).await,
                    "fanout" => fanout(&args).await,
                    "durable" => durable(&args).await,
                    "ai" => ai::run(&args).await,
                    "floor" => floor::run(&args).await,
                    _ => reconnect(&args).await,
                }
            })?;
            let report = with_machine(report, &args, command);
            let text = serde_json::to_string_pretty(&report)?;
            println!("{text}");
            if let Some(out) = args.opt("out") {
                if let Some(dir) = std::path::Path::new(&out).parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&out, text + "\n").with_context(|| format!("writing {out}"))?;
                eprintln!("wrote {out}");
            }
            // Worker sockets and tasks are gone with the process.
            std::process::exit(0)
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args(HashMap<String, String>);

impl Args {
    fn parse(argv: &[String]) -> Result<Args> {
        let mut map = HashMap::new();
        let mut i = 0;
        while i < argv.len() {
            let key = argv[i]
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("unexpected argument {}\n{USAGE}", argv[i]))?;
            let value = argv
                .get(i + 1)
                .ok_or_else(|| anyhow!("--{key} needs a value"))?;
            map.insert(key.to_owned(), value.clone());
            i += 2;
        }
        Ok(Args(map))
    }
    fn opt(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn str(&self, key: &str, default: &str) -> String {
        self.opt(key).unwrap_or_else(|| default.to_owned())
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| anyhow!("--{key}: not a number: {v}")),
        }
    }
    fn list(&self, key: &str) -> Vec<String> {
        self.opt(key)
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
    fn pids(&self) -> Vec<u32> {
        self.list("server-pid")
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
    fn target(&self) -> Result<Target> {
        Target::parse(&self.str("target", "cochat"))
    }
    fn nodes(&self) -> Result<Vec<String>> {
        let nodes = self.list("nodes");
        if nodes.is_empty() {
            bail!("--nodes HOST:PORT[,HOST:PORT..] is required");
        }
        Ok(nodes)
    }
}

fn with_machine(mut report: Value, args: &Args, scenario: &str) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    report["scenario"] = json!(args.str("name", scenario));
    report["label"] = json!(args.str("label", ""));
    report["finished_unix_s"] = json!(now_nanos() / 1_000_000_000);
    report["machine"] = json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_total_mib": mem_kb / 1024,
    });
    report
}

// ---------------------------------------------------------------------------------------------
// Plans shared with the worker processes

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
struct ConnSpec {
    node: usize,
    user: usize,
    room: usize,
}

#[derive(Serialize, Deserialize)]
struct Plan {
    target: Target,
    nodes: Vec<String>,
    tokens: Vec<String>,
    rooms: Vec<String>,
    receivers: Vec<ConnSpec>,
    senders: Vec<ConnSpec>,
    /// Messages per second per sender; 0 = closed loop with `window` sends in flight.
    rate_per_sender: f64,
    window: usize,
    duration_s: f64,
    drain_s: f64,
    text_bytes: usize,
    connect_concurrency: usize,
    /// The ai scenario: answers asked per room (0: not the ai scenario).
    #[serde(default)]
    ai_answers: usize,
}

impl Plan {
    fn ws_url(&self, spec: &ConnSpec) -> String {
        let node = &self.nodes[spec.node];
        match self.target {
            Target::Cochat => net::cochat_ws_url(node, &self.tokens[spec.user]),
            Target::Socketio => net::socketio_ws_url(node),
        }
    }
}

/// The source address of a worker's `local`-th connection: 127.<local/25000>.<index/250>.<2+index%250>.
fn source_ip(worker: usize, local: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        (local / 25_000) as u8,
        (worker / 250) as u8,
        (2 + worker % 250) as u8,
    )
}

// ---------------------------------------------------------------------------------------------
// Worker process

#[derive(Default)]
struct Stats {
    deliveries: u64,
    cross_node: u64,
    latency: Hist,
    sends: u64,
    acks: u64,
    send_errors: u64,
    ack_latency: Hist,
    closes: u64,
    close_reasons: HashMap<String, u64>,
    first_error: Option<String>,
}

type Shared = Arc<Mutex<Stats>>;

fn lock(stats: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connect(plan: &Plan, spec: &ConnSpec, src: Ipv4Addr, join: bool) -> Result<Ws> {
    let mut ws = net::open_ws(&plan.ws_url(spec), src).await?;
    match plan.target {
        Target::Cochat => {
            if join {
                net::cochat_subscribe(&mut ws, &plan.rooms[spec.room], None).await?;
            }
        }
        Target::Socketio => {
            let room = join.then(|| plan.rooms[spec.room].as_str());
            net::socketio_handshake(&mut ws, room).await?;
        }
    }
    Ok(ws)
}

/// Opens `specs` (global index, spec) with bounded concurrency; returns the sockets `keep`
/// returned (it is given each one as soon as it is open), the handshake histogram, the errors and
/// the wall time.
///
/// Receivers are handed to their reading task as they open, not after the last one: a socket
/// nobody reads while thousands more connect misses the server's pings (Socket.IO closes it after
/// 45 s) and counts as idle when it is not.
async fn connect_all(
    plan: &Arc<Plan>,
    index: usize,
    specs: Vec<(usize, ConnSpec)>,
    join: bool,
    offset: usize,
    keep: impl Fn(ConnSpec, Ws) -> Option<(ConnSpec, Ws)>,
) -> (Vec<(ConnSpec, Ws)>, Hist, u64, Option<String>, f64) {
    let start = Instant::now();
    let keep = &keep;
    let results: Vec<_> = stream::iter(specs.into_iter().enumerate())
        .map(|(local, (_global, spec))| {
            let plan = plan.clone();
            async move {
                let t = Instant::now();
                let ws = connect(&plan, &spec, source_ip(index, local + offset), join).await;
                let took = t.elapsed();
                (ws.map(|ws| keep(spec, ws)), took)
            }
        })
        .buffer_unordered(plan.connect_concurrency.max(1))
        .collect()
        .await;
    let wall = start.elapsed().as_secs_f64();
    let mut hist = Hist::default();
    let mut sockets = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for (opened, took) in results {
        match opened {
            Ok(kept) => {
                hist.record_us(took.as_micros() as u64);
                sockets.extend(kept);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    (sockets, hist, errors, first_error, wall)
}

/// A worker process's set-up, shared by every scenario's worker: opens its share of the
/// receivers (each handed to `on_receiver` as soon as it is open) and of the senders, reports
/// `READY` to the parent and waits for `GO`. Returns the senders with their global indexes.
/// The second value is how many receivers are open.
async fn open_and_wait_for_go(
    plan: &Arc<Plan>,
    index: usize,
    count: usize,
    on_receiver: impl Fn(ConnSpec, Ws),
) -> Result<(Vec<(usize, ConnSpec, Ws)>, usize)> {
    let mine = |list: &[ConnSpec]| -> Vec<(usize, ConnSpec)> {
        list.iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| i % count == index)
            .collect()
    };
    let receivers = mine(&plan.receivers);
    let senders = mine(&plan.senders);
    let n_receivers = receivers.len();

    let spawn = |spec: ConnSpec, ws: Ws| {
        on_receiver(spec, ws);
        None
    };
    let (_, handshake, errors, first_error, wall) =
        connect_all(plan, index, receivers, true, 0, spawn).await;
    let connected = handshake.len() as usize;
    let (sender_sockets, _, sender_errors, sender_error, _) = connect_all(
        plan,
        index,
        senders.clone(),
        false,
        n_receivers,
        |spec, ws| Some((spec, ws)),
    )
    .await;
    let ready = json!({
        "receivers": connected, "receiver_errors": errors, "connect_wall_s": wall,
        "handshake": handshake.to_pairs(), "first_error": first_error.or(sender_error),
        "senders": sender_sockets.len(), "sender_errors": sender_errors,
    });
    println!("READY {ready}");

    child::wait_for_word("GO").await?;
    // Each open sender gets a distinct global index (its message ids and send phase).
    let senders = sender_sockets
        .into_iter()
        .zip(senders)
        .map(|((spec, ws), (global, _))| (global, spec, ws))
        .collect();
    Ok((senders, connected))
}

async fn worker(plan: Arc<Plan>, index: usize, count: usize) -> Result<()> {
    let stats: Shared = Arc::new(Mutex::new(Stats::default()));
    let target = plan.target;
    let (senders, _) = open_and_wait_for_go(&plan, index, count, |spec, ws| {
        tokio::spawn(receive(ws, target, spec.node, stats.clone()));
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.duration_s);
    for (global, spec, ws) in senders {
        tokio::spawn(send_loop(
            ws,
            plan.clone(),
            spec,
            global,
            stats.clone(),
            deadline,
        ));
    }
    tokio::time::sleep_until(deadline.into()).await;
    tokio::time::sleep(Duration::from_secs_f64(plan.drain_s)).await;
    let s = lock(&stats);
    let result = json!({
        "deliveries": s.deliveries, "cross_node": s.cross_node, "latency": s.latency.to_pairs(),
        "sends": s.sends, "acks": s.acks, "send_errors": s.send_errors, "ack_latency": s.ack_latency.to_pairs(),
        "closes": s.closes, "close_reasons": s.close_reasons, "first_error": s.first_error,
    });
    println!("RESULT {result}");
    std::process::exit(0)
}

async fn receive(mut ws: Ws, target: Target, node: usize, stats: Shared) {
    let mut reason = "eof".to_owned();
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let text = text.as_str();
                if let Some((sent, from)) = net::parse_payload(text) {
                    let latency = now_nanos().saturating_sub(sent) / 1000;
                    let mut s = lock(&stats);
                    s.deliveries += 1;
                    if from != node {
                        s.cross_node += 1;
                    }
                    s.latency.record_us(latency);
                } else if target == Target::Socketio && text == "2" {
                    if ws.send(Message::text("3")).await.is_err() {
                        break;
                    }
                } else if target == Target::Cochat && text.contains("\"type\":\"error\"") {
                    let mut s = lock(&stats);
                    s.first_error.get_or_insert_with(|| text.to_owned());
                }
            }
            Ok(Message::Close(frame)) => {
                reason = frame
                    .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                    .unwrap_or_else(|| "close".to_owned());
                break;
            }
            Ok(_) => {}
            Err(e) => {
                reason = format!("error: {e}");
                break;
            }
        }
    }
    let mut s = lock(&stats);
    s.closes += 1;
    *s.close_reasons.entry(reason).or_default() += 1;
}

async fn send_loop(
    ws: Ws,
    plan: Arc<Plan>,
    spec: ConnSpec,
    global: usize,
    stats: Shared,
    deadline: Instant,
) {
    let target = plan.target;
    let (mut sink, mut stream) = ws.split();
    let pending: Arc<Mutex<HashMap<u64, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<()>();
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<()>();
    {
        let pending = pending.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                let text = text.as_str();
                if let Some(id) = net::parse_ack(target, text) {
                    let sent = pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    if let Some(sent) = sent {
                        let mut s = lock(&stats);
                        s.acks += 1;
                        s.ack_latency
                            .record_us(now_nanos().saturating_sub(sent) / 1000);
                    }
                    let _ = ack_tx.send(());
                } else if target == Target::Socketio && text == "2" {
                    let _ = pong_tx.send(());
                } else if target == Target::Cochat && text.contains("\"type\":\"error\"") {
                    let mut s = lock(&stats);
                    s.send_errors += 1;
                    s.first_error.get_or_insert_with(|| text.to_owned());
                    drop(s);
                    let _ = ack_tx.send(());
                }
            }
        });
    }
    let room = plan.rooms[spec.room].clone();
    let mut n: u64 = 0;
    let mut failed = false;
    let send_one = |n: u64| {
        let text = net::payload(plan.text_bytes, spec.node);
        let frame = match target {
            Target::Cochat => format!(
                r#"{{"type":"send","id":{n},"room":"{room}","client_msg_id":"s{global}-{n}","text":"{text}"}}"#
            ),
            Target::Socketio => format!(r#"42{n}["send",{{"room":"{room}","text":"{text}"}}]"#),
        };
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(n, now_nanos());
        Message::text(frame)
    };
    let start = Instant::now();
    if plan.rate_per_sender <= 0.0 {
        for _ in 0..plan.window.max(1) {
            n += 1;
            if sink.send(send_one(n)).await.is_err() {
                failed = true;
                break;
            }
        }
        while !failed {
            tokio::select! {
                got = ack_rx.recv() => {
                    if got.is_none() || Instant::now() >= deadline { break; }
                    n += 1;
                    if sink.send(send_one(n)).await.is_err() { failed = true; }
                }
                Some(()) = pong_rx.recv() => { if sink.send(Message::text("3")).await.is_err() { failed = true; } }
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
    } else {
        // Open loop at the sender's rate, and staggered: sender `global` of S starts `global / S`
        // of an interval late, so the S senders together send evenly spaced messages at the total
        // rate. (Started in step, they sent S messages at the same instant: bursts that the
        // server and this generator queue, which measured as a latency floor of ~150 ms.)
        let interval = 1.0 / plan.rate_per_sender;
        let phase = interval * global as f64 / plan.senders.len().max(1) as f64;
        let due_by = |elapsed: f64| -> u64 {
            if elapsed < phase {
                0
            } else {
                ((elapsed - phase) / interval) as u64 + 1
            }
        };
        while !failed {
            let next_at = start + Duration::from_secs_f64(phase + n as f64 * interval);
            if next_at >= deadline {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_at.into()) => {
                    // Everything due by now: more than one only if this task was late.
                    let due = due_by(start.elapsed().as_secs_f64());
                    while n < due && Instant::now() < deadline {
                        n += 1;
                        if sink.feed(send_one(n)).await.is_err() { failed = true; break; }
                    }
                    if sink.flush().await.is_err() { failed = true; }
                }
                Some(()) = pong_rx.recv() => { if sink.send(Message::text("3")).await.is_err() { failed = true; } }
            }
        }
    }
    {
        let mut s = lock(&stats);
        s.sends += n;
        if failed {
            s.first_error
                .get_or_insert_with(|| "a sender's socket failed".to_owned());
        }
    }
    // Keep answering pings during the drain.
    while let Some(()) = pong_rx.recv().await {
        if sink.send(Message::text("3")).await.is_err() {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parent: worker processes

struct Workers {
    children: Vec<child::Child>,
    _plan_file: TempFile,
}

struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Workers {
    async fn spawn(plan: &Plan, count: usize) -> Result<Workers> {
        let path = std::env::temp_dir().join(format!(
            "cochat-bench-plan-{}-{}.json",
            std::process::id(),
            now_nanos()
        ));
        std::fs::write(&path, serde_json::to_vec(plan)?)?;
        let plan_file = TempFile(path.clone());
        let children = (0..count)
            .map(|i| {
                let argv = vec![path.display().to_string(), i.to_string(), count.to_string()];
                child::Child::spawned(format!("worker {i}"), "__worker", argv)
            })
            .collect::<Result<_>>()?;
        Ok(Workers {
            children,
            _plan_file: plan_file,
        })
    }

    /// The JSON after `TAG ` from every worker, all within `within`.
    async fn collect(&mut self, tag: &str, within: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for child in &mut self.children {
            out.push(serde_json::from_str(&child.expect(tag, deadline).await?)?);
        }
        Ok(out)
    }

    async fn go(&mut self) -> Result<()> {
        for child in &mut self.children {
            child.say("GO").await?;
        }
        Ok(())
    }
}

fn sum(values: &[Value], key: &str) -> u64 {
    values.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum()
}

fn merged(values: &[Value], key: &str) -> Hist {
    let mut hist = Hist::default();
    for v in values {
        hist.merge_pairs(&v[key]);
    }
    hist
}

fn first_error(values: &[Value]) -> Value {
    values
        .iter()
        .find_map(|v| v["first_error"].as_str().map(|s| json!(s)))
        .unwrap_or(Value::Null)
}

fn close_reasons(values: &[Value]) -> Value {
    let mut all: HashMap<String, u64> = HashMap::new();
    for v in values {
        if let Some(map) = v["close_reasons"].as_object() {
            for (k, c) in map {
                *all.entry(k.clone()).or_default() += c.as_u64().unwrap_or(0);
            }
        }
    }
    json!(all)
}

fn rss_of(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|p| net::rss_bytes(*p).unwrap_or(0))
        .collect()
}

fn ready_summary(ready: &[Value]) -> Value {
    let receivers = sum(ready, "receivers");
    let wall = ready
        .iter()
        .map(|v| v["connect_wall_s"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    json!({
        "connected": receivers,
        "connect_errors": sum(ready, "receiver_errors") + sum(ready, "sender_errors"),
        "senders_connected": sum(ready, "senders"),
        "connect_wall_s": round3(wall),
        "handshakes_per_s": if wall > 0.0 { (receivers as f64 / wall).round() } else { 0.0 },
        "handshake_plus_subscribe": merged(ready, "handshake").summary_ms(),
        "first_error": first_error(ready),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Setup on cochat (HTTP): users, rooms, memberships

struct Setup {
    tokens: Vec<String>,
    rooms: Vec<String>,
    took_s: f64,
}

async fn cochat_setup(node: &str, users: usize, rooms: usize, join_all: bool) -> Result<Setup> {
    let start = Instant::now();
    let prefix = format!("b{:x}", now_nanos() % 0xffff_ffff);
    let tokens: Vec<Result<String>> = stream::iter(0..users)
        .map(|i| {
            let prefix = prefix.clone();
            async move {
                let body =
                    json!({"username": format!("{prefix}_{i}"), "password": "bench-password-1"});
                let (status, v) =
                    net::http_json(node, "POST", "/api/v1/auth/register", None, Some(&body))
                        .await?;
                v["token"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("register answered {status}: {v}"))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let tokens: Vec<String> = tokens.into_iter().collect::<Result<_>>()?;
    let room_ids: Vec<Result<String>> = stream::iter(0..rooms)
        .map(|r| {
            let token = tokens[r % users].clone();
            async move {
                let body = json!({"name": format!("bench-{r}")});
                let (status, v) =
                    net::http_json(node, "POST", "/api/v1/rooms", Some(&token), Some(&body))
                        .await?;
                v["room"]["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("create room answered {status}: {v}"))
            }
        })
        .buffered(16)
        .collect()
        .await;
    let room_ids: Vec<String> = room_ids.into_iter().collect::<Result<_>>()?;
    if join_all && users > 1 {
        let codes: Vec<Result<String>> = stream::iter(0..rooms)
            .map(|r| {
                let token = tokens[r % users].clone();
                let room = room_ids[r].clone();
                async move {
                    let (status, v) = net::http_json(
                        node,
                        "POST",
                        &format!("/api/v1/rooms/{room}/invites"),
                        Some(&token),
                        Some(&json!({})),
                    )
                    .await?;
                    v["code"]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| anyhow!("invite answered {status}: {v}"))
                }
            })
            .buffered(16)
            .collect()
            .await;
        let codes: Vec<String> = codes.into_iter().collect::<Result<_>>()?;
        let joins: Vec<(usize, usize)> = (0..rooms)
            .flat_map(|r| {
                (0..users)
                    .filter(move |u| *u != r % users)
                    .map(move |u| (r, u))
            })
            .collect();
        let results: Vec<Result<()>> = stream::iter(joins)
            .map(|(r, u)| {
                let token = tokens[u].clone();
                let code = codes[r].clone();
                async move {
                    let (status, v) = net::http_json(
                        node,
                        "POST",
                        &format!("/api/v1/invites/{code}/accept"),
                        Some(&token),
                        None,
                    )
                    .await?;
                    if status >= 300 {
                        bail!("accept answered {status}: {v}");
                    }
                    Ok(())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
    }
    Ok(Setup {
        tokens,
        rooms: room_ids,
        took_s: round3(start.elapsed().as_secs_f64()),
    })
}

// ---------------------------------------------------------------------------------------------
// Scenarios

async fn idle(args: &Args) -> Result<Value> {
    let target = args.target()?;
    let nodes = args.nodes()?;
    let conns: usize = args.num("conns", 1000)?;
    let workers: usize = args.num("workers", 1)?;
    let users: usize = args.num("users", 100.min(conns).max(1))?;
    let hold: f64 = args.num("hold", 5.0)?;
    let pids = args.pids();
    // Each user owns one room and all of that user's connections subscribe to it.
    let (tokens, rooms, setup_s) = match target {
        Target::Cochat => {
            let s = cochat_setup(&nodes[0], users, users, false).await?;
            (s.tokens, s.rooms, s.took_s)
        }
        Target::Socketio => (
            Vec::new(),
            (0..users).map(|r| format!("room-{r}")).collect(),
            0.0,
        ),
    };
    let receivers = (0..conns)
        .map(|i| ConnSpec {
            node: i % nodes.len(),
            user: i % users,
            room: i % users,
        })
        .collect();
    let plan = Plan {
        target,
        nodes,
        tokens,
        rooms,
        receivers,
        senders: Vec::new(),
        rate_per_sender: 0.0,
        window: 0,
        duration_s: hold,
        drain_s: 0.0,
        text_bytes: 100,
        connect_concurrency: args.num("concurrency", 64)?,
        ai_answers: 0,
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_of(&pids);
    let mut w = Workers::spawn(&plan, workers).await?;
    let ready = w.collect("READY", Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_of(&pids);
    w.go().await?;
    let results = w
        .collect("RESULT", Duration::from_secs_f64(hold + 60.0))
        .await?;
    let rss_end = rss_of(&pids);
    let summary = ready_summary(&ready);
    let connected = sum(&ready, "receivers");
    let before: u64 = rss_before.iter().sum();
    let after: u64 = rss_after.iter().sum();
    let per_conn = if connected > 0 && after > before {
        (after - before) as f64 / connected as f64
    } else {
        0.0
    };
    Ok(json!({
        "target": target,
        "params": {"conns": conns, "workers": workers, "users": users, "rooms": users, "hold_s": hold, "nodes": plan.nodes.len()},
        "setup_s": setup_s,
        "results": {
            "connections": summary,
            "server_rss_before_bytes": rss_before,
            "server_rss_after_bytes": rss_after,
            "server_rss_end_of_hold_bytes": rss_end,
            "server_rss_per_connection_bytes": per_conn.round(),
            "closed_during_hold": sum(&results, "closes"),
            "close_reasons": close_reasons(&results),
        }
    }))
}

async fn fanout(args: &Args) -> Result<Value> {
    let target = args.target()?;
    let nodes = args.nodes()?;
    let rooms: usize = args.num("rooms", 10)?;
    let members: usize = args.num("members", 100)?;
    let senders: usize = args.num("senders", rooms)?;
    let rate: f64 = args.num("rate", 1000.0)?;
    let duration: f64 = args.num("duration", 10.0)?;
    let workers: usize = args.num("workers", 1)?;
    let users: usize = args.num("users", members.min(20))?.max(1);
    let pids = args.pids();
    let (tokens, room_ids, setup_s) = match target {
        Target::Cochat => {
            let s = cochat_setup(&nodes[0], users, rooms, true).await?;
            (s.tokens, s.rooms, s.took_s)
        }
        Target::Socketio => (
            Vec::new(),
            (0..rooms).map(|r| format!("room-{r}")).collect(),
            0.0,
        ),
    };
    // Receivers of room r: members j = 0..M, user j % U, node spread round-robin over all.
    let receivers: Vec<ConnSpec> = (0..rooms * members)
        .map(|i| ConnSpec {
            node: i % nodes.len(),
            user: (i / rooms) % users,
            room: i % rooms,
        })
        .collect();
    let sender_specs: Vec<ConnSpec> = (0..senders)
        .map(|s| ConnSpec {
            node: s % nodes.len(),
            user: s % users,
            room: s % rooms,
        })
        .collect();
    let plan = Plan {
        target,
        nodes,
        tokens,
        rooms: room_ids,
        receivers,
        senders: sender_specs,
        rate_per_sender: rate / senders.max(1) as f64,
        window: 0,
        duration_s: duration,
        drain_s: args.num("drain", 3.0)?,
        text_bytes: args.num("text-bytes", 100)?,
        connect_concurrency: args.num("concurrency", 64)?,
        ai_answers: 0,
    };
    let mut w = Workers::spawn(&plan, workers).await?;
    let ready = w.collect("READY", Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_ready = rss_of(&pids);
    w.go().await?;
    let results = w
        .collect(
            "RESULT",
            Duration::from_secs_f64(duration + plan.drain_s + 60.0),
        )
        .await?;
    let acks = sum(&results, "acks");
    let deliveries = sum(&results, "deliveries");
    let cross = sum(&results, "cross_node");
    let connected_per_room = sum(&ready, "receivers") as f64 / rooms as f64;
    Ok(json!({
        "target": target,
        "params": {
            "rooms": rooms, "members": members, "senders": senders, "rate_msgs_per_s": rate, "duration_s": duration,
            "workers": workers, "users": users, "text_bytes": plan.text_bytes, "nodes": plan.nodes.len(),
        },
        "setup_s": setup_s,
        "results": {
            "connections": ready_summary(&ready),
            "sends": sum(&results, "sends"),
            "acks": acks,
            "send_errors": sum(&results, "send_errors"),
            "acked_sends_per_s": (acks as f64 / duration).round(),
            "deliveries": deliveries,
            "expected_deliveries": (acks as f64 * connected_per_room).round(),
            "deliveries_per_s": (deliveries as f64 / duration).round(),
            "cross_node_deliveries": cross,
            "cross_node_deliveries_per_s": (cross as f64 / duration).round(),
            "latency_send_to_deliver": merged(&results, "latency").summary_ms(),
            "ack_latency": merged(&results, "ack_latency").summary_ms(),
            "closed_during_run": sum(&results, "closes"),
            "close_reasons": close_reasons(&results),
            "first_error": first_error(&results),
            "server_rss_ready_bytes": rss_ready,
            "server_rss_end_bytes": rss_of(&pids),
        }
    }))
}

async fn durable(args: &Args) -> Result<Value> {
    let nodes = args.nodes()?;
    let conns: usize = args.num("conns", 64)?;
    let window: usize = args.num("window", 16)?;
    let rooms: usize = args.num("rooms", conns)?;
    let duration: f64 = args.num("duration", 10.0)?;
    let workers: usize = args.num("workers", 1)?;
    let users: usize = args.num("users", conns.min(16))?.max(1);
    let setup = cochat_setup(&nodes[0], users, rooms, true).await?;
    let senders: Vec<ConnSpec> = (0..conns)
        .map(|c| ConnSpec {
            node: c % nodes.len(),
            user: c % users,
            room: c % rooms,
        })
        .collect();
    let plan = Plan {
        target: Target::Cochat,
        nodes,
        tokens: setup.tokens,
        rooms: setup.rooms,
        receivers: Vec::new(),
        senders,
        rate_per_sender: 0.0,
        window,
        duration_s: duration,
        drain_s: 2.0,
        text_bytes: args.num("text-bytes", 100)?,
        connect_concurrency: 64,
        ai_answers: 0,
    };
    let mut w = Workers::spawn(&plan, workers).await?;
    let ready = w.collect("READY", Duration::from_secs(300)).await?;
    w.go().await?;
    let results = w
        .collect("RESULT", Duration::from_secs_f64(duration + 60.0))
        .await?;
    let acks = sum(&results, "acks");
    Ok(json!({
        "target": "cochat",
        "backend": args.str("backend", "?"),
        "params": {"conns": conns, "window": window, "rooms": rooms, "users": users, "duration_s": duration, "workers": workers, "text_bytes": plan.text_bytes},
        "setup_s": setup.took_s,
        "results": {
            "connections": ready_summary(&ready),
            "sends": sum(&results, "sends"),
            "acks": acks,
            "send_errors": sum(&results, "send_errors"),
            "acked_sends_per_s": (acks as f64 / duration).round(),
            "ack_latency": merged(&results, "ack_latency").summary_ms(),
            "first_error": first_error(&results),
            "server_rss_end_bytes": rss_of(&args.pids()),
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// Reconnect: clients on a victim node; the node dies; time until every client is back elsewhere
// and has seen the marker message written after the death.

struct Client {
    reconnected_at: Option<Instant>,
    caught_up_at: Option<Instant>,
    attempts: u64,
}

async fn reconnect(args: &Args) -> Result<Value> {
    let nodes = args.nodes()?;
    if nodes.len() < 2 {
        bail!("reconnect needs at least two --nodes (the first is the victim)");
    }
    let victim_pid: u32 = args
        .opt("victim-pid")
        .ok_or_else(|| anyhow!("--victim-pid is required"))?
        .parse()?;
    let signal = args.str("signal", "KILL");
    let conns: usize = args.num("conns", 1000)?;
    let rooms: usize = args.num("rooms", 10)?.max(1);
    let users: usize = args.num("users", 20)?.max(1);
    let rate: f64 = args.num("rate", 100.0)?;
    let timeout: f64 = args.num("timeout", 60.0)?;
    let setup = cochat_setup(&nodes[1], users, rooms, true).await?;
    let tokens = Arc::new(setup.tokens);
    let room_ids = Arc::new(setup.rooms);
    let nodes = Arc::new(nodes);
    let survivors = nodes.len() - 1;
    let clients: Arc<Mutex<Vec<Client>>> = Arc::new(Mutex::new(
        (0..conns)
            .map(|_| Client {
                reconnected_at: None,
                caught_up_at: None,
                attempts: 0,
            })
            .collect(),
    ));
    // The marker seq per room, published once the writer's post-kill message is acked.
    let (marker_tx, marker_rx) = tokio::sync::watch::channel::<Option<(Instant, Vec<i64>)>>(None);
    let (up_tx, mut up_rx) = mpsc::unbounded_channel::<Result<()>>();
    // The first connections are set-up, not the measurement: 64 in flight, as in the other
    // scenarios. (The reconnections after the kill are not limited: that storm is the point.)
    let first_connects = Arc::new(tokio::sync::Semaphore::new(64));

    for c in 0..conns {
        let (tokens, room_ids, nodes, clients, mut marker_rx, up_tx, first_connects) = (
            tokens.clone(),
            room_ids.clone(),
            nodes.clone(),
            clients.clone(),
            marker_rx.clone(),
            up_tx.clone(),
            first_connects.clone(),
        );
        tokio::spawn(async move {
            let room_index = c % room_ids.len();
            let room = room_ids[room_index].clone();
            let token = tokens[c % tokens.len()].clone();
            // 127.0.1.x: addresses no other scenario uses, spread over 200 of them. Binding a
            // port on an address that still has thousands of TIME_WAIT sockets from the earlier
            // scenarios' clients is slow; in the full run it stretched this scenario's connects
            // from ~1 s to ~6-10 s.
            let src = Ipv4Addr::new(127, 0, 1, (2 + c % 200) as u8);
            let mut last_seq: Option<i64> = None;
            let mut first = true;
            let mut node = 0usize;
            let mut backoff = Duration::from_millis(20);
            loop {
                let url = net::cochat_ws_url(&nodes[node], &token);
                let permit = if first {
                    first_connects.clone().acquire_owned().await.ok()
                } else {
                    None
                };
                let connected = async {
                    let mut ws = net::open_ws(&url, src).await?;
                    let head = net::cochat_subscribe(&mut ws, &room, last_seq).await?;
                    Ok::<_, anyhow::Error>((ws, head))
                }
                .await;
                drop(permit);
                let (mut ws, head) = match connected {
                    Ok(x) => x,
                    Err(e) => {
                        if first {
                            let _ = up_tx.send(Err(e));
                            return;
                        }
                        lock_clients(&clients)[c].attempts += 1;
                        node = 1 + (c + lock_clients(&clients)[c].attempts as usize) % survivors;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                if last_seq.is_none() {
                    last_seq = Some(head);
                }
                if first {
                    first = false;
                    let _ = up_tx.send(Ok(()));
                } else {
                    let mut all = lock_clients(&clients);
                    all[c].attempts += 1;
                    all[c].reconnected_at.get_or_insert_with(Instant::now);
                }
                loop {
                    let marker = marker_rx
                        .borrow()
                        .as_ref()
                        .map(|(_, seqs)| seqs[room_index]);
                    if let (Some(m), Some(seen)) = (marker, last_seq) {
                        if seen >= m && node != 0 {
                            lock_clients(&clients)[c]
                                .caught_up_at
                                .get_or_insert_with(Instant::now);
                            // Stay connected (a real client would), but the measurement is done.
                            while ws.next().await.is_some() {}
                            return;
                        }
                    }
                    tokio::select! {
                        frame = ws.next() => match frame {
                            Some(Ok(Message::Text(text))) => {
                                if let Some(seq) = net::parse_event_seq(text.as_str()) {
                                    last_seq = Some(last_seq.map_or(seq, |s| s.max(seq)));
                                }
                            }
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                            Some(Ok(_)) => {}
                        },
                        _ = marker_rx.changed() => {}
                    }
                }
                // Disconnected: go to a survivor.
                node = 1 + c % survivors;
                backoff = Duration::from_millis(20);
            }
        });
    }
    drop(up_tx);
    let mut up = 0;
    let connect_start = Instant::now();
    while up < conns {
        match up_rx.recv().await {
            Some(Ok(())) => up += 1,
            Some(Err(e)) => return Err(e.context("a client could not connect to the victim node")),
            None => bail!("clients went away"),
        }
    }
    let connect_s = connect_start.elapsed().as_secs_f64();

    // A writer on the first survivor, sending to every room at `rate` in total.
    let writer_url = net::cochat_ws_url(&nodes[1], &tokens[0]);
    let mut writer = net::open_ws(&writer_url, Ipv4Addr::new(127, 0, 0, 1)).await?;
    let mut id: u64 = 0;
    let mut last_acked: Vec<i64> = vec![0; room_ids.len()];
    async fn write(ws: &mut Ws, id: &mut u64, room: &str) -> Result<i64> {
        *id += 1;
        let frame = format!(
            r#"{{"type":"send","id":{},"room":"{room}","client_msg_id":"w-{}","text":"{}"}}"#,
            *id,
            *id,
            net::payload(100, 1)
        );
        ws.send(Message::text(frame)).await?;
        loop {
            let Some(frame) = ws.next().await else {
                bail!("writer socket closed")
            };
            if let Message::Text(text) = frame? {
                if net::parse_ack(Target::Cochat, text.as_str()) == Some(*id) {
                    let v: Value = serde_json::from_str(text.as_str())?;
                    return v["seq"].as_i64().ok_or_else(|| anyhow!("ack without seq"));
                }
                if text.as_str().contains("\"type\":\"error\"") {
                    bail!("writer refused: {}", text.as_str());
                }
            }
        }
    }
    let pre = Instant::now() + Duration::from_secs(1);
    let period = Duration::from_secs_f64(1.0 / rate.max(1.0));
    while Instant::now() < pre {
        let r = (id as usize) % room_ids.len();
        last_acked[r] = write(&mut writer, &mut id, &room_ids[r]).await?;
        tokio::time::sleep(period).await;
    }
    let t0 = Instant::now();
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(victim_pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{signal} {victim_pid} failed");
    }
    // The marker: one more message in every room, written after the death.
    let mut marker = vec![0; room_ids.len()];
    for (r, room) in room_ids.iter().enumerate() {
        marker[r] = write(&mut writer, &mut id, room).await?;
    }
    let _ = marker_tx.send(Some((t0, marker)));
    // Keep writing while clients come back, so they catch up under traffic.
    let deadline = t0 + Duration::from_secs_f64(timeout);
    loop {
        let done = lock_clients(&clients)
            .iter()
            .filter(|c| c.caught_up_at.is_some())
            .count();
        if done == conns || Instant::now() >= deadline {
            break;
        }
        let r = (id as usize) % room_ids.len();
        let _ = write(&mut writer, &mut id, &room_ids[r]).await?;
        tokio::time::sleep(period).await;
    }
    let all = lock_clients(&clients);
    let mut back = Hist::default();
    let mut caught = Hist::default();
    let mut last_back: f64 = 0.0;
    let mut last_caught: f64 = 0.0;
    for c in all.iter() {
        if let Some(t) = c.reconnected_at {
            let s = t.saturating_duration_since(t0);
            back.record_us(s.as_micros() as u64);
            last_back = last_back.max(s.as_secs_f64());
        }
        if let Some(t) = c.caught_up_at {
            let s = t.saturating_duration_since(t0);
            caught.record_us(s.as_micros() as u64);
            last_caught = last_caught.max(s.as_secs_f64());
        }
    }
    let done = caught.len();
    Ok(json!({
        "target": "cochat",
        "params": {"conns": conns, "rooms": rooms, "users": users, "nodes": nodes.len(), "signal": signal, "writer_rate_msgs_per_s": rate, "timeout_s": timeout},
        "setup_s": setup.took_s,
        "results": {
            "initial_connect_s": round3(connect_s),
            "clients_back_and_caught_up": done,
            "clients_reconnected": back.len(),
            "all_caught_up": done as usize == conns,
            "time_all_reconnected_s": round3(last_back),
            "time_all_caught_up_s": round3(last_caught),
            "reconnect_time": back.summary_ms(),
            "caught_up_time": caught.summary_ms(),
            "reconnect_attempts": all.iter().map(|c| c.attempts).sum::<u64>(),
            "messages_written": id,
        }
    }))
}

fn lock_clients(clients: &Arc<Mutex<Vec<Client>>>) -> std::sync::MutexGuard<'_, Vec<Client>> {
    clients.lock().unwrap_or_else(|e| e.into_inner())
}
