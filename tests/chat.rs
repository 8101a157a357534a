//! Core chat behaviour over real sockets against the real server, on SQLite and Postgres:
//! ordering, idempotent sends, resume without gap or duplicate, membership and roles.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::client::{Api, Ws};
use common::db::TestDatabase;
use common::server::TestServer;
use serde_json::{json, Value};

both_backends!(
    two_members_see_each_others_messages_in_seq_order,
    a_resent_client_msg_id_gets_the_same_ack_and_one_message,
    a_client_that_drops_resumes_with_exactly_what_it_missed,
    non_members_and_guests_are_refused,
    edits_deletes_and_reactions_are_durable_events,
    typing_and_presence_reach_the_others,
    kicked_members_lose_the_room_at_once,
);

async fn two_members_see_each_others_messages_in_seq_order(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "general").await;
    api.add_member(&room, &ada, &bob, "member").await;

    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    let head = ada_ws.subscribe(&room, None).await["head_seq"]
        .as_i64()
        .expect("head_seq");
    bob_ws.subscribe(&room, None).await;

    // Both write at once, interleaved; each sees all 20 in one agreed seq order.
    for i in 0..10 {
        ada_ws.send(json!({"type": "send", "room": room, "client_msg_id": format!("a{i}"), "text": format!("from ada {i}")})).await;
        bob_ws.send(json!({"type": "send", "room": room, "client_msg_id": format!("b{i}"), "text": format!("from bob {i}")})).await;
    }
    let seen_by_ada = ada_ws.events(&room, 20).await;
    let seen_by_bob = bob_ws.events(&room, 20).await;
    let seqs: Vec<i64> = seen_by_ada
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        ((head + 1)..=(head + 20)).collect::<Vec<_>>(),
        "gap-free and ordered"
    );
    assert_eq!(
        seen_by_ada, seen_by_bob,
        "both members see identical frames"
    );
    let texts: BTreeSet<&str> = seen_by_ada
        .iter()
        .map(|e| e["event"]["message"]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts.len(), 20);
    let first = &seen_by_bob[0]["event"];
    assert_eq!(first["kind"], "message.created");
    assert!(["ada", "bob"]
        .iter()
        .any(|p| first["message"]["author"]["name"]
            .as_str()
            .expect("author")
            .starts_with(p)));
    assert_eq!(first["message"]["author"]["kind"], "user");

    // The same order is what history returns.
    let history = api.history(&bob, &room, "limit=50").await;
    let history_seqs: Vec<i64> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(history_seqs, seqs);
}

async fn a_resent_client_msg_id_gets_the_same_ack_and_one_message(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let ada = api.register("ada").await;
    let room = api.create_room(&ada, "dupes").await;
    let mut ws = Ws::connect(&server.ws_url(), &ada.token).await;

    let first = ws.send_message(&room, "same-id", "hello once").await;
    assert_eq!(first["type"], "ack", "{first}");
    assert_eq!(first["duplicate"], false);
    let again = ws.send_message(&room, "same-id", "hello once").await;
    assert_eq!(again["type"], "ack");
    assert_eq!(
        (&again["message_id"], &again["seq"]),
        (&first["message_id"], &first["seq"])
    );
    assert_eq!(again["duplicate"], true);

    // Over HTTP too, and from a second connection of the same user.
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&ada.token),
            Some(json!({"client_msg_id": "same-id", "text": "hello once"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message_id"], first["message_id"]);
    let history = api.history(&ada, &room, "").await;
    assert_eq!(
        history["messages"].as_array().expect("messages").len(),
        1,
        "{history}"
    );
}

async fn a_client_that_drops_resumes_with_exactly_what_it_missed(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "resume").await;
    api.add_member(&room, &ada, &bob, "member").await;

    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    let warmup = ada_ws
        .send_message(&room, "before", "before the drop")
        .await;
    let seen = bob_ws.events(&room, 1).await;
    let last_seen = seen[0]["seq"].as_i64().expect("seq");
    assert_eq!(last_seen, warmup["seq"].as_i64().expect("ack seq"));
    drop(bob_ws); // the connection drops without unsubscribing

    // 500 messages while bob is away, pipelined, then acks collected.
    for i in 0..500 {
        ada_ws.send(json!({"type": "send", "id": format!("m{i}"), "room": room, "client_msg_id": format!("m{i}"), "text": format!("missed {i}")})).await;
    }
    let mut acked = BTreeSet::new();
    while acked.len() < 500 {
        let frame = ada_ws
            .recv_until(|f| f["type"] == "ack" || f["type"] == "error")
            .await;
        assert_eq!(frame["type"], "ack", "{frame}");
        acked.insert(frame["seq"].as_i64().expect("seq"));
    }

    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    let answer = bob_ws.subscribe(&room, Some(last_seen)).await;
    assert_eq!(answer["truncated"], false);
    assert_eq!(answer["replay_after_seq"].as_i64(), Some(last_seen));
    let replayed = bob_ws.events(&room, 500).await;
    let seqs: Vec<i64> = replayed
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        acked.iter().copied().collect::<Vec<_>>(),
        "exactly the acked messages, in order"
    );
    assert_eq!(
        seqs,
        ((last_seen + 1)..=(last_seen + 500)).collect::<Vec<_>>()
    );
    for (i, event) in replayed.iter().enumerate() {
        assert_eq!(event["event"]["message"]["text"], format!("missed {i}"));
    }
    // ...and then live events, with nothing replayed twice.
    let live = ada_ws
        .send_message(&room, "after", "after the resume")
        .await;
    let next = bob_ws.events(&room, 1).await;
    assert_eq!(next[0]["seq"], live["seq"]);
    assert_eq!(next[0]["seq"].as_i64(), Some(last_seen + 501));
    bob_ws
        .assert_quiet(Duration::from_millis(200), |f| f["type"] == "event")
        .await;
}

async fn non_members_and_guests_are_refused(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (owner, guest, stranger) = (
        api.register("own").await,
        api.register("gst").await,
        api.register("str").await,
    );
    let room = api.create_room(&owner, "private").await;
    api.add_member(&room, &owner, &guest, "guest").await;
    let mut owner_ws = Ws::connect(&server.ws_url(), &owner.token).await;
    owner_ws.subscribe(&room, None).await;
    owner_ws
        .send_message(&room, "secret", "the secret plan")
        .await;

    // A stranger learns nothing: 404 on HTTP, room_not_found on the socket, same as a random id.
    for path in [
        format!("/api/v1/rooms/{room}"),
        format!("/api/v1/rooms/{room}/messages"),
        format!("/api/v1/rooms/{room}/events"),
    ] {
        let (status, body) = api.call("GET", &path, Some(&stranger.token), None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "room_not_found");
        assert!(!body.to_string().contains("secret plan"));
    }
    let mut stranger_ws = Ws::connect(&server.ws_url(), &stranger.token).await;
    let refused = stranger_ws
        .request(json!({"type": "subscribe", "room": room, "since_seq": 0}))
        .await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("room_not_found"))
    );
    let unknown = stranger_ws
        .request(json!({"type": "subscribe", "room": "no-such-room"}))
        .await;
    assert_eq!(unknown["code"], refused["code"]);
    let post = stranger_ws.send_message(&room, "x", "let me in").await;
    assert_eq!(post["code"], "room_not_found");
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&stranger.token),
            Some(json!({"client_msg_id": "x", "text": "hi"})),
        )
        .await;
    assert_eq!(status, 404);

    // A guest reads (replay included) but does not write.
    let mut guest_ws = Ws::connect(&server.ws_url(), &guest.token).await;
    guest_ws.subscribe(&room, Some(0)).await;
    let replay = guest_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "message.created")
        .await;
    assert_eq!(replay["event"]["message"]["text"], "the secret plan");
    let write = guest_ws.send_message(&room, "g1", "can I talk?").await;
    assert_eq!(
        (write["type"].as_str(), write["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    let typing = guest_ws
        .request(json!({"type": "typing", "room": room}))
        .await;
    assert_eq!(typing["code"], "forbidden");
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&guest.token),
            Some(json!({"client_msg_id": "g2", "text": "hi"})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    // Nothing the guest tried reached the log.
    let history = api.history(&owner, &room, "").await;
    assert_eq!(history["messages"].as_array().expect("messages").len(), 1);
    // Guests and members cannot invite.
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/invites"),
            Some(&guest.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 403);
}

async fn edits_deletes_and_reactions_are_durable_events(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "edits").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;

    let sent = bob_ws.send_message(&room, "b1", "typo hree").await;
    let message_id = sent["message_id"].as_str().expect("message id").to_owned();
    let reply = ada_ws.request(json!({"type": "send", "room": room, "client_msg_id": "a1", "text": "a reply", "reply_to_message": message_id})).await;
    assert_eq!(reply["type"], "ack");

    // Only the author edits.
    let not_author = ada_ws
        .request(json!({"type": "edit", "room": room, "message_id": message_id, "text": "hijack"}))
        .await;
    assert_eq!(not_author["code"], "forbidden");
    let edited = bob_ws
        .request(
            json!({"type": "edit", "room": room, "message_id": message_id, "text": "typo here"}),
        )
        .await;
    assert_eq!(edited["type"], "ack", "{edited}");
    let react = ada_ws.request(json!({"type": "react", "room": room, "message_id": message_id, "emoji": "👍", "on": true})).await;
    assert_eq!(react["type"], "ack", "{react}");
    let events = bob_ws.events(&room, 4).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "message.created",
            "message.created",
            "message.edited",
            "reaction.changed"
        ]
    );
    assert_eq!(
        events[1]["event"]["message"]["reply_to_message"],
        json!(message_id)
    );
    assert_eq!(events[2]["event"]["text"], "typo here");
    assert_eq!(
        events[3]["event"]["reactions"],
        json!([{"emoji": "👍", "count": 1, "users": [ada.id]}])
    );

    // A member cannot delete someone else's message; the owner (admin+) can.
    let member_delete = bob_ws
        .request(json!({"type": "delete", "room": room, "message_id": reply["message_id"]}))
        .await;
    assert_eq!(member_delete["code"], "forbidden");
    let deleted = ada_ws
        .request(json!({"type": "delete", "room": room, "message_id": message_id}))
        .await;
    assert_eq!(deleted["type"], "ack");
    let tombstone = bob_ws.events(&room, 1).await;
    assert_eq!(tombstone[0]["event"]["kind"], "message.deleted");

    // History shows the tombstone, and a replay from 0 no longer carries the deleted text.
    let history = api.history(&ada, &room, "").await;
    let gone = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["id"] == json!(message_id))
        .expect("tombstone kept")
        .clone();
    assert_eq!(
        (gone["deleted"].as_bool(), gone["text"].as_str()),
        (Some(true), Some(""))
    );
    let mut late = Ws::connect(&server.ws_url(), &ada.token).await;
    late.subscribe(&room, Some(0)).await;
    let head = tombstone[0]["seq"].as_i64().expect("seq");
    let replay = late.events(&room, head as usize).await;
    assert!(
        !serde_json::to_string(&replay)
            .expect("json")
            .contains("typo"),
        "deleted text replayed: {replay:?}"
    );
}

async fn typing_and_presence_reach_the_others(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "presence").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    ada_ws.subscribe(&room, None).await;

    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    let answer = bob_ws.subscribe(&room, None).await;
    let online: BTreeSet<&str> = answer["online"]
        .as_array()
        .expect("online")
        .iter()
        .map(|u| u["id"].as_str().expect("id"))
        .collect();
    assert_eq!(online, BTreeSet::from([ada.id.as_str(), bob.id.as_str()]));
    let came = ada_ws
        .recv_until(|f| f["type"] == "presence" && f["user"]["id"] == json!(bob.id))
        .await;
    assert_eq!(came["status"], "online");

    bob_ws.send(json!({"type": "typing", "room": room})).await;
    let typing = ada_ws.recv_until(|f| f["type"] == "typing").await;
    assert_eq!(typing["user"]["id"], json!(bob.id));
    bob_ws
        .assert_quiet(Duration::from_millis(200), |f| f["type"] == "typing")
        .await;

    drop(bob_ws);
    let went = ada_ws
        .recv_until(|f| f["type"] == "presence" && f["user"]["id"] == json!(bob.id))
        .await;
    assert_eq!(went["status"], "offline");
}

async fn kicked_members_lose_the_room_at_once(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "kick").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;

    // A member cannot kick the owner, nor promote themselves.
    let (status, body) = api
        .call(
            "DELETE",
            &format!("/api/v1/rooms/{room}/members/{}", ada.id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = api
        .call(
            "PATCH",
            &format!("/api/v1/rooms/{room}/members/{}", bob.id),
            Some(&bob.token),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(status, 403);

    let (status, body) = api
        .call(
            "DELETE",
            &format!("/api/v1/rooms/{room}/members/{}", bob.id),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let left = bob_ws.recv_until(|f| f["type"] == "event").await;
    assert_eq!(
        (
            left["event"]["kind"].as_str(),
            left["event"]["reason"].as_str()
        ),
        (Some("member.left"), Some("kicked"))
    );
    let gone = bob_ws.recv_until(|f| f["type"] == "unsubscribed").await;
    assert_eq!(gone["reason"], "removed");

    // Ada's next message does not reach bob, and bob can no longer write.
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    ada_ws.send_message(&room, "after", "bob is gone").await;
    bob_ws
        .assert_quiet(Duration::from_millis(300), |f: &Value| f["type"] == "event")
        .await;
    let refused = bob_ws.send_message(&room, "b", "still here?").await;
    assert_eq!(refused["code"], "room_not_found");
}
