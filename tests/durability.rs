//! Ack means durable, delivered means committed, and draining loses nothing: the real binary is
//! killed with SIGKILL mid-traffic or sent SIGTERM, then restarted on the same database.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::client::{Api, Ws};
use common::db::TestDatabase;
use common::process::CochatProcess;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

both_backends!(
    acked_and_delivered_messages_survive_a_kill_9,
    sigterm_drains_readiness_first_closes_sockets_with_1012_and_loses_nothing,
);

async fn acked_and_delivered_messages_survive_a_kill_9(db: TestDatabase) {
    let data_dir = std::env::temp_dir().join(common::unique("cochat_kill_"));
    let mut server = CochatProcess::start(&db.url, &data_dir, &[]).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "crash").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut watcher = Ws::connect(&server.ws_url(), &bob.token).await;
    watcher.subscribe(&room, None).await;
    let mut sender = Ws::connect(&server.ws_url(), &ada.token).await;

    // Pipeline 300 sends and kill the server as soon as 100 acks are in: writes are in flight.
    for i in 0..300 {
        sender.send(json!({"type": "send", "id": i, "room": room, "client_msg_id": format!("k{i}"), "text": format!("crash {i}")})).await;
    }
    let mut acked = BTreeMap::new();
    while acked.len() < 100 {
        let ack = sender.recv_until(|f| f["type"] == "ack").await;
        acked.insert(
            ack["seq"].as_i64().expect("seq"),
            ack["message_id"].as_str().expect("id").to_owned(),
        );
    }
    server.kill_hard();
    // Everything the watcher had been sent before the kill.
    let mut delivered = BTreeMap::new();
    while let Some(frame) = watcher.try_recv_buffered().await {
        if frame["type"] == "event" && frame["event"]["kind"] == "message.created" {
            delivered.insert(
                frame["seq"].as_i64().expect("seq"),
                frame["event"]["message"]["id"]
                    .as_str()
                    .expect("id")
                    .to_owned(),
            );
        }
    }

    let server = CochatProcess::start(&db.url, &data_dir, &[]).await;
    let api = Api::new(&server.base);
    let mut logged = BTreeMap::new();
    let mut after = 0;
    loop {
        let (status, page) = api
            .call(
                "GET",
                &format!("/api/v1/rooms/{room}/events?after_seq={after}&limit=500"),
                Some(&ada.token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        for event in page["events"].as_array().expect("events") {
            let seq = event["seq"].as_i64().expect("seq");
            assert_eq!(seq, after + 1, "the log has no gap");
            after = seq;
            if event["event"]["kind"] == "message.created" {
                logged.insert(
                    seq,
                    event["event"]["message"]["id"]
                        .as_str()
                        .expect("id")
                        .to_owned(),
                );
            }
        }
        if page["has_more"] != true {
            break;
        }
    }
    for (seq, id) in &acked {
        assert_eq!(
            logged.get(seq),
            Some(id),
            "acked message at seq {seq} is missing after kill -9"
        );
    }
    for (seq, id) in &delivered {
        assert_eq!(
            logged.get(seq),
            Some(id),
            "delivered message at seq {seq} was never committed"
        );
    }
    // Unacked sends may or may not have committed; each committed one is there exactly once.
    let ids: BTreeSet<&String> = logged.values().collect();
    assert_eq!(ids.len(), logged.len());
    let _ = std::fs::remove_dir_all(&data_dir);
}

async fn sigterm_drains_readiness_first_closes_sockets_with_1012_and_loses_nothing(
    db: TestDatabase,
) {
    let data_dir = std::env::temp_dir().join(common::unique("cochat_term_"));
    let mut server =
        CochatProcess::start(&db.url, &data_dir, &[("COCHAT_DRAIN_WINDOW_S", "1.5")]).await;
    let api = Api::new(&server.base);
    let ada = api.register("ada").await;
    let room = api.create_room(&ada, "drain").await;
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let mut ws = Ws::connect(&server.ws_url(), &ada.token).await;
        ws.subscribe(&room, None).await;
        sockets.push(ws);
    }
    let mut writer = Ws::connect(&server.ws_url(), &ada.token).await;
    for i in 0..50 {
        writer.send(json!({"type": "send", "room": room, "client_msg_id": format!("d{i}"), "text": format!("drain {i}")})).await;
    }
    server.terminate();

    // Readiness goes false while sockets are still being closed.
    let mut saw_unready = false;
    for _ in 0..40 {
        let (status, body) = api.call("GET", "/readyz", None, None).await;
        if status == 503 {
            assert_eq!(body["checks"]["draining"], true);
            saw_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(saw_unready, "readyz never reported the drain");
    for ws in &mut sockets {
        assert_eq!(
            ws.closed().await,
            Some(CloseCode::Restart),
            "sockets close with 1012"
        );
    }
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "a drained server exits 0, got {status}");

    // Every acked write is in the log.
    let mut acks = 0;
    while let Some(frame) = writer.try_recv_buffered().await {
        if frame["type"] == "ack" {
            acks += 1;
        }
    }
    let server = CochatProcess::start(&db.url, &data_dir, &[]).await;
    let api = Api::new(&server.base);
    let history = api.history(&ada, &room, "limit=100").await;
    let stored = history["messages"].as_array().expect("messages").len();
    assert!(stored >= acks, "{acks} acked but {stored} stored");
    let _ = std::fs::remove_dir_all(&data_dir);
}
