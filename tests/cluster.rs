//! Three cochat processes on Postgres + Redis behind nginx: cross-node delivery, node loss
//! (kill -9) and a rolling restart under traffic, a Redis outage, presence across nodes.
//! Clients reconnect through nginx with `since_seq` and resend unacked messages with the same
//! `client_msg_id`; every client must end with every event exactly once, in seq order, and every
//! acked message must be in the log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{Api, User, Ws};
use common::db::TestDatabase;
use common::nginx::Nginx;
use common::process::{free_port, CochatProcess};
use common::redis::RedisProcess;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

struct Cluster {
    db: TestDatabase,
    ports: Vec<u16>,
    nodes: Vec<Option<CochatProcess>>,
    data_dir: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Cluster {
    async fn start(db: TestDatabase, nodes: usize, redis_url: &str) -> Cluster {
        Self::start_with(db, nodes, redis_url, &[]).await
    }

    async fn start_with(
        db: TestDatabase,
        nodes: usize,
        redis_url: &str,
        extra: &[(&str, &str)],
    ) -> Cluster {
        let mut env = vec![
            ("REDIS_URL".to_owned(), redis_url.to_owned()),
            ("COCHAT_REDIS_PREFIX".to_owned(), common::unique("cluster:")),
            ("COCHAT_DRAIN_WINDOW_S".to_owned(), "1".to_owned()),
            ("COCHAT_RESYNC_S".to_owned(), "1".to_owned()),
            ("COCHAT_PRESENCE_INTERVAL_S".to_owned(), "1".to_owned()),
            ("COCHAT_PRESENCE_TTL_S".to_owned(), "3".to_owned()),
        ];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let mut cluster = Cluster {
            db,
            ports: (0..nodes).map(|_| free_port()).collect(),
            nodes: (0..nodes).map(|_| None).collect(),
            data_dir: std::env::temp_dir().join(common::unique("cochat_cluster_")),
            env,
        };
        for i in 0..nodes {
            cluster.start_node(i).await;
        }
        cluster
    }

    async fn start_node(&mut self, i: usize) {
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let node_id = format!("node-{}", i + 1);
        env.push(("COCHAT_NODE_ID", &node_id));
        let process =
            CochatProcess::start_on(self.ports[i], &self.db.url, &self.data_dir, &env).await;
        self.nodes[i] = Some(process);
    }

    fn node(&self, i: usize) -> &CochatProcess {
        self.nodes[i].as_ref().expect("node is running")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

async fn connect_raw(ws_url: &str, token: &str) -> Option<(common::client::RawWs, String)> {
    let url = format!("{ws_url}?token={token}");
    let (stream, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .ok()?
    .ok()?;
    let node = response
        .headers()
        .get("x-cochat-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    Some((stream, node))
}

/// What one resilient client saw.
#[derive(Default, Debug)]
struct Report {
    seen: Vec<i64>,
    acked: BTreeMap<String, (i64, String)>,
    problems: Vec<String>,
    reconnects: usize,
}

/// A member that sends `count` messages (at most `window` unacked) and reads the room, through
/// `ws_url`, reconnecting with since_seq and resending unacked sends until it has seen `done`.
async fn resilient_client(
    ws_url: String,
    user: User,
    room: String,
    start_seq: i64,
    count: usize,
    acked_total: Arc<AtomicUsize>,
    mut done: watch::Receiver<Option<i64>>,
) -> Report {
    const WINDOW: usize = 10;
    let mut report = Report::default();
    let mut last_seq = start_seq;
    let mut next = 0;
    let mut unacked: BTreeSet<usize> = BTreeSet::new();
    let send_frame = |i: usize| {
        json!({"type": "send", "id": i, "room": room, "client_msg_id": format!("{}-{i}", user.id), "text": format!("{} says {i}", user.name)}).to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    'connection: loop {
        assert!(
            Instant::now() < deadline,
            "client {} never finished: {report:?}",
            user.name
        );
        let Some((mut ws, _node)) = connect_raw(&ws_url, &user.token).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let subscribe =
            json!({"type": "subscribe", "id": "sub", "room": room, "since_seq": last_seq});
        if ws.send(Message::text(subscribe.to_string())).await.is_err() {
            continue;
        }
        for i in unacked.clone() {
            if ws.send(Message::text(send_frame(i))).await.is_err() {
                report.reconnects += 1;
                continue 'connection;
            }
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(4));
        loop {
            tokio::select! {
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            report.reconnects += 1;
                            continue 'connection;
                        }
                        Some(Ok(_)) => continue,
                    };
                    let frame: Value = serde_json::from_str(&text).expect("JSON frames");
                    match frame["type"].as_str() {
                        Some("event") => {
                            let seq = frame["seq"].as_i64().expect("seq");
                            if seq <= last_seq {
                                report.problems.push(format!("duplicate seq {seq} after {last_seq}"));
                            } else if seq != last_seq + 1 {
                                report.problems.push(format!("gap: seq {seq} after {last_seq}"));
                            }
                            last_seq = last_seq.max(seq);
                            report.seen.push(seq);
                        }
                        Some("ack") => {
                            let i = frame["reply_to"].as_u64().expect("numeric reply_to") as usize;
                            if unacked.remove(&i) {
                                acked_total.fetch_add(1, Ordering::SeqCst);
                                let id = frame["message_id"].as_str().expect("message id").to_owned();
                                report.acked.insert(format!("{}-{i}", user.id), (frame["seq"].as_i64().expect("seq"), id));
                            }
                        }
                        Some("subscribed") if frame["truncated"] == true => report.problems.push(format!("truncated replay: {frame}")),
                        // A send refused while a node shut down stays unacked and is resent.
                        Some("error") if frame["reply_to"].is_number() => {}
                        Some("error") => report.problems.push(format!("error frame: {frame}")),
                        _ => {}
                    }
                }
                _ = ticker.tick() => {
                    if next < count && unacked.len() < WINDOW {
                        if ws.send(Message::text(send_frame(next))).await.is_err() {
                            unacked.insert(next);
                            next += 1;
                            report.reconnects += 1;
                            continue 'connection;
                        }
                        unacked.insert(next);
                        next += 1;
                    }
                    if next == count && unacked.is_empty() {
                        if let Some(head) = *done.borrow_and_update() {
                            if last_seq >= head {
                                return report;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(500)), if next == count && !unacked.is_empty() => {
                    // Sends refused with an error (node draining) are retried on the same socket.
                    for i in unacked.clone() {
                        let _ = ws.send(Message::text(send_frame(i))).await;
                    }
                }
            }
        }
    }
}

/// The room's head, asked through the balancer until a node answers (nodes may be restarting).
async fn head_of(api: &Api, user: &User, room: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api
            .call("GET", "/api/v1/rooms", Some(&user.token), None)
            .await;
        if status == 200 {
            let listed = body["rooms"]
                .as_array()
                .expect("rooms")
                .iter()
                .find(|r| r["id"] == json!(room))
                .expect("listed")
                .clone();
            return listed["last_seq"].as_i64().expect("last_seq");
        }
        assert!(
            Instant::now() < deadline,
            "no node answered: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything in the room's log after `after`, by seq.
async fn log_after(api: &Api, user: &User, room: &str, mut after: i64) -> BTreeMap<i64, Value> {
    let mut events = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, page) = api
            .call(
                "GET",
                &format!("/api/v1/rooms/{room}/events?after_seq={after}&limit=500"),
                Some(&user.token),
                None,
            )
            .await;
        if status != 200 {
            assert!(Instant::now() < deadline, "{status}: {page}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for event in page["events"].as_array().expect("events") {
            after = event["seq"].as_i64().expect("seq");
            events.insert(after, event.clone());
        }
        if page["has_more"] != true {
            return events;
        }
    }
}

/// Runs `clients` resilient members through `ws_url`, calls `disrupt` once `disrupt_after` acks
/// are in, and checks the outcome against the log.
async fn traffic_with_disruption<F, Fut>(
    api: &Api,
    ws_url: &str,
    clients: usize,
    per_client: usize,
    disrupt_after: usize,
    disrupt: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let owner = api.register("own").await;
    let room = api.create_room(&owner, "cluster").await;
    let mut users = Vec::new();
    for i in 0..clients {
        let user = api.register(&format!("c{i}")).await;
        api.add_member(&room, &owner, &user, "member").await;
        users.push(user);
    }
    let start = head_of(api, &owner, &room).await;
    let acked_total = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = watch::channel(None);
    let tasks: Vec<_> = users
        .iter()
        .map(|user| {
            tokio::spawn(resilient_client(
                ws_url.to_owned(),
                user.clone(),
                room.clone(),
                start,
                per_client,
                acked_total.clone(),
                done_rx.clone(),
            ))
        })
        .collect();
    let total = clients * per_client;
    let wait_for = |n: usize| {
        let acked_total = acked_total.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while acked_total.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} acks",
                    acked_total.load(Ordering::SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(disrupt_after).await;
    disrupt().await;
    wait_for(total).await;
    let head = head_of(api, &owner, &room).await;
    done_tx.send_replace(Some(head));
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("clients finish")
                .expect("client task"),
        );
    }

    let log = log_after(api, &owner, &room, start).await;
    assert_eq!(
        log.keys().copied().collect::<Vec<_>>(),
        ((start + 1)..=head).collect::<Vec<_>>(),
        "the log is gap-free"
    );
    let created: Vec<&Value> = log
        .values()
        .filter(|e| e["event"]["kind"] == "message.created")
        .collect();
    assert_eq!(
        created.len(),
        total,
        "every send committed exactly once (resends were idempotent)"
    );
    for report in &reports {
        assert!(
            report.problems.is_empty(),
            "client problems: {:?}",
            report.problems
        );
        assert_eq!(
            report.seen,
            ((start + 1)..=head).collect::<Vec<_>>(),
            "every client saw every event once, in order"
        );
        for (seq, id) in report.acked.values() {
            assert_eq!(
                log[seq]["event"]["message"]["id"].as_str(),
                Some(id.as_str()),
                "acked message at {seq} is in the log"
            );
        }
    }
    let reconnects: usize = reports.iter().map(|r| r.reconnects).sum();
    eprintln!("cluster traffic: {total} messages, head {head}, {reconnects} reconnects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_on_different_nodes_talk_through_nginx() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let Some(shared_redis) = common::redis::shared() else {
        return;
    };
    let cluster = Cluster::start(db, 3, shared_redis).await;
    let nginx = Nginx::start(&cluster.ports).await;
    let api = Api::new(&nginx.base());
    let (ada, cy) = (api.register("ada").await, api.register("cyd").await);
    let room = api.create_room(&ada, "across").await;
    api.add_member(&room, &ada, &cy, "member").await;

    // Open sockets through nginx until ada is on node-1 and cy on node-3.
    let mut on_node = BTreeMap::new();
    for _ in 0..30 {
        for user in [&ada, &cy] {
            let (_, node) = connect_raw(&nginx.ws_url(), &user.token)
                .await
                .expect("connects");
            on_node.entry((user.id.clone(), node)).or_insert(());
        }
        if on_node.contains_key(&(ada.id.clone(), "node-1".into()))
            && on_node.contains_key(&(cy.id.clone(), "node-3".into()))
        {
            break;
        }
    }
    assert!(
        on_node
            .keys()
            .map(|(_, n)| n.clone())
            .collect::<BTreeSet<_>>()
            .len()
            >= 2,
        "nginx spreads sockets: {on_node:?}"
    );
    let mut ada_ws = connect_until(&nginx, &ada, "node-1").await;
    let mut cy_ws = connect_until(&nginx, &cy, "node-3").await;
    ada_ws.subscribe(&room, None).await;
    cy_ws.subscribe(&room, None).await;
    let sent = ada_ws.send_message(&room, "x1", "hello from node 1").await;
    let heard = cy_ws.events(&room, 1).await;
    assert_eq!(
        (
            heard[0]["seq"].clone(),
            heard[0]["event"]["message"]["text"].clone()
        ),
        (sent["seq"].clone(), json!("hello from node 1"))
    );
    let reply = cy_ws.send_message(&room, "y1", "hello from node 3").await;
    let heard = ada_ws
        .recv_until(|f| {
            f["type"] == "event"
                && f["event"]["kind"] == "message.created"
                && f["seq"] == reply["seq"]
        })
        .await;
    assert_eq!(heard["event"]["message"]["text"], "hello from node 3");

    // Typing and presence cross nodes too.
    cy_ws.send(json!({"type": "typing", "room": room})).await;
    let typing = ada_ws.recv_until(|f| f["type"] == "typing").await;
    assert_eq!(typing["user"]["id"], json!(cy.id));
}

async fn connect_until(nginx: &Nginx, user: &User, node: &str) -> Ws {
    for _ in 0..60 {
        let ws = Ws::connect_with_node(&nginx.ws_url(), &user.token).await;
        if ws.1 == node {
            return ws.0;
        }
    }
    panic!("never landed on {node}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_node_mid_traffic_loses_nothing() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let Some(shared_redis) = common::redis::shared() else {
        return;
    };
    let mut cluster = Cluster::start(db, 3, shared_redis).await;
    let nginx = Nginx::start(&cluster.ports).await;
    let api = Api::new(&nginx.base());
    let victim = cluster.nodes[1].take();
    traffic_with_disruption(&api, &nginx.ws_url(), 6, 120, 200, || async move {
        let mut victim = victim.expect("node-2 runs");
        victim.kill_hard();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_traffic_loses_nothing() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let Some(shared_redis) = common::redis::shared() else {
        return;
    };
    let cluster = Cluster::start(db, 3, shared_redis).await;
    let nginx = Nginx::start(&cluster.ports).await;
    let api = Api::new(&nginx.base());
    let cluster = tokio::sync::Mutex::new(cluster);
    traffic_with_disruption(&api, &nginx.ws_url(), 6, 150, 60, || async {
        let mut cluster = cluster.lock().await;
        for i in 0..3 {
            let mut node = cluster.nodes[i].take().expect("running");
            node.terminate();
            let status = node.wait_exit(Duration::from_secs(20)).await;
            assert!(
                status.success(),
                "node-{} drained and exited 0: {status}",
                i + 1
            );
            cluster.start_node(i).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_mid_traffic_loses_nothing_and_delivery_resumes() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let mut redis = RedisProcess::start().await;
    let cluster = Cluster::start(db, 2, &redis.url()).await;
    // Members talk to the two nodes directly, half on each: only Redis joins them.
    let api = Api::new(&cluster.node(0).base);
    let urls = [cluster.node(0).ws_url(), cluster.node(1).ws_url()];
    let owner = api.register("own").await;
    let room = api.create_room(&owner, "outage").await;
    let mut users = Vec::new();
    for i in 0..4 {
        let user = api.register(&format!("r{i}")).await;
        api.add_member(&room, &owner, &user, "member").await;
        users.push(user);
    }
    let (_, rooms) = api
        .call("GET", "/api/v1/rooms", Some(&owner.token), None)
        .await;
    let start = rooms["rooms"][0]["last_seq"].as_i64().expect("last_seq");
    let acked = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = watch::channel(None);
    let per_client = 100;
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            tokio::spawn(resilient_client(
                urls[i % 2].clone(),
                user.clone(),
                room.clone(),
                start,
                per_client,
                acked.clone(),
                done_rx.clone(),
            ))
        })
        .collect();
    while acked.load(Ordering::SeqCst) < 80 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill();
    let during = acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        acked.load(Ordering::SeqCst) > during,
        "nodes keep accepting and persisting while Redis is down"
    );
    let (status, ready) = api.call("GET", "/readyz", None, None).await;
    assert_eq!(
        (status.as_u16(), ready["checks"]["bus"].as_str()),
        (200, Some("disconnected")),
        "still ready without Redis"
    );
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < 4 * per_client {
        assert!(Instant::now() < deadline, "acks stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, rooms) = api
        .call("GET", "/api/v1/rooms", Some(&owner.token), None)
        .await;
    let head = rooms["rooms"][0]["last_seq"].as_i64().expect("last_seq");
    done_tx.send_replace(Some(head));
    for task in tasks {
        let report = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("clients finish")
            .expect("task");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            report.seen,
            ((start + 1)..=head).collect::<Vec<_>>(),
            "every member ends with every message, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_of_a_dead_node_drop_out_of_presence() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let Some(shared_redis) = common::redis::shared() else {
        return;
    };
    let mut cluster = Cluster::start(db, 2, shared_redis).await;
    let api = Api::new(&cluster.node(0).base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "presence").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut bob_ws = Ws::connect(&cluster.node(1).ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;
    let mut ada_ws = Ws::connect(&cluster.node(0).ws_url(), &ada.token).await;
    ada_ws.subscribe(&room, None).await;
    let online = bob_ws
        .recv_until(|f| f["type"] == "presence" && f["user"]["id"] == json!(ada.id))
        .await;
    assert_eq!(online["status"], "online");

    let killed_at = Instant::now();
    let mut node = cluster.nodes[0].take().expect("node-1 runs");
    node.kill_hard();
    let offline = bob_ws
        .recv_until(|f| f["type"] == "presence" && f["user"]["id"] == json!(ada.id))
        .await;
    assert_eq!(offline["status"], "offline");
    // TTL 3 s here (COCHAT_PRESENCE_TTL_S); the bound is the TTL plus one expiry check.
    assert!(
        killed_at.elapsed() < Duration::from_secs(6),
        "took {:?}",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ai_answer_runs_once_and_streams_to_members_on_every_node() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let Some(shared_redis) = common::redis::shared() else {
        return;
    };
    let fake = common::fake_llm::FakeLlm::start().await;
    let parts: Vec<String> = (0..40).map(|i| format!("token{i} ")).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    fake.push(common::fake_llm::Script::answer(&parts).pace(40));
    let mut cluster = Cluster::start_with(
        db,
        3,
        shared_redis,
        &[
            ("AI_BASE_URL", &fake.base_url()),
            ("AI_MODEL", "fake-model"),
        ],
    )
    .await;
    let api = Api::new(&cluster.node(0).base);
    let owner = api.register("own").await;
    let room = api.create_room(&owner, "ai everywhere").await;
    let mut members = Vec::new();
    for i in 0..3 {
        let user = api.register(&format!("m{i}")).await;
        api.add_member(&room, &owner, &user, "member").await;
        members.push(user);
    }
    // Members 0 and 1 on nodes 1 and 2 from the start; member 2 comes to node 3 mid-answer.
    let mut ws0 = Ws::connect(&cluster.node(0).ws_url(), &members[0].token).await;
    let mut ws1 = Ws::connect(&cluster.node(1).ws_url(), &members[1].token).await;
    ws0.subscribe(&room, None).await;
    ws1.subscribe(&room, None).await;
    let trigger = ws0.send_message(&room, "t", "/ai tell me everything").await;
    assert_eq!(trigger["type"], "ack");
    ws1.peek_until(|f| f["type"] == "ai.delta" && f["offset"].as_u64() > Some(40))
        .await;
    let mut ws2 = Ws::connect(&cluster.node(2).ws_url(), &members[2].token).await;
    ws2.subscribe(&room, Some(0)).await;

    let expected: String = parts.concat();
    let mut seen = Vec::new();
    for ws in [&mut ws0, &mut ws1, &mut ws2] {
        let mut text: Vec<char> = Vec::new();
        let mut deltas = Vec::new();
        let end = loop {
            let frame = ws
                .recv_until(|f| {
                    f["type"] == "ai.delta"
                        || (f["type"] == "event" && f["event"]["kind"] == "ai.completed")
                })
                .await;
            if frame["type"] == "event" {
                break frame;
            }
            let offset = frame["offset"].as_u64().expect("offset") as usize;
            let delta = frame["text"].as_str().expect("text").to_owned();
            if offset <= text.len() {
                text.truncate(offset);
                text.extend(delta.chars());
            }
            deltas.push((offset, delta));
        };
        assert_eq!(end["event"]["message"]["text"], expected.as_str());
        assert_eq!(
            text.into_iter().collect::<String>(),
            expected,
            "spliced deltas give the final text for member {}: {deltas:?}",
            seen.len()
        );
        seen.push(deltas);
    }
    assert_eq!(
        seen[0], seen[1],
        "members on two nodes see the same deltas in the same order"
    );
    assert_eq!(seen[0].len(), parts.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.requests().len(),
        1,
        "three nodes saw the trigger; one answer ran"
    );
    cluster.nodes.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_whose_node_dies_is_ended_as_agent_lost_by_another_node() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let Some(shared_redis) = common::redis::shared() else {
        return;
    };
    let fake = common::fake_llm::FakeLlm::start().await;
    fake.push(
        common::fake_llm::Script::stream()
            .role()
            .deltas(&["never ", "finished"])
            .stall(),
    );
    let mut cluster = Cluster::start_with(
        db,
        2,
        shared_redis,
        &[
            ("AI_BASE_URL", &fake.base_url()),
            ("AI_MODEL", "fake-model"),
            ("COCHAT_AI_STALE_S", "2"),
        ],
    )
    .await;
    let api = Api::new(&cluster.node(1).base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "lost").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut bob_ws = Ws::connect(&cluster.node(1).ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;
    let mut ada_ws = Ws::connect(&cluster.node(0).ws_url(), &ada.token).await;
    ada_ws.send_message(&room, "q", "/ai start and die").await;
    bob_ws
        .peek_until(|f| f["type"] == "ai.delta" && f["text"] == "finished")
        .await;
    let mut node = cluster.nodes[0].take().expect("node-1 runs");
    node.kill_hard();
    let killed = Instant::now();
    let end = bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "ai.failed")
        .await;
    assert_eq!(end["event"]["code"], "agent_lost");
    assert_eq!(
        end["event"]["message"]["text"], "never finished",
        "the partial text is kept"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "ended after {:?}",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_moving_to_a_node_that_is_behind_gets_nothing_twice() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let mut redis = RedisProcess::start().await;
    // A long resync period: while Redis is down, node 2's room stays behind node 1's.
    let cluster = Cluster::start_with(db, 2, &redis.url(), &[("COCHAT_RESYNC_S", "60")]).await;
    let api = Api::new(&cluster.node(0).base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "behind").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut watcher = Ws::connect(&cluster.node(1).ws_url(), &bob.token).await;
    watcher.subscribe(&room, None).await;
    let mut ada_ws = Ws::connect(&cluster.node(0).ws_url(), &ada.token).await;
    ada_ws.subscribe(&room, None).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut last = 0;
    for i in 0..5 {
        last = ada_ws
            .send_message(&room, &format!("a{i}"), "while node 2 cannot hear")
            .await["seq"]
            .as_i64()
            .expect("seq");
    }
    ada_ws.events(&room, 5).await;

    // Ada moves to node 2, which has not delivered those five yet.
    let mut moved = Ws::connect(&cluster.node(1).ws_url(), &ada.token).await;
    let answer = moved.subscribe(&room, Some(last)).await;
    assert!(
        answer["head_seq"].as_i64() < Some(last),
        "node 2 is behind: {answer}"
    );
    // A write on node 2 makes its room repair the gap from the log and deliver everything.
    let next = watcher.send_message(&room, "b", "from node 2").await["seq"]
        .as_i64()
        .expect("seq");
    let events = moved.events(&room, 1).await;
    assert_eq!(
        events[0]["seq"].as_i64(),
        Some(next),
        "only what ada had not seen"
    );
    assert_eq!(next, last + 1);
    moved
        .assert_quiet(Duration::from_millis(300), |f| f["type"] == "event")
        .await;
    // The watcher on node 2 did get all five, in order, after the repair.
    let seen: Vec<i64> = watcher
        .events(&room, 6)
        .await
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seen, ((last - 4)..=next).collect::<Vec<_>>());
}
