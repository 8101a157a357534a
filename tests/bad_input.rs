//! Bad input gets a clear error with a stable code, never a panic, and never disturbs others:
//! on the socket (error frames, close codes for abuse) and over HTTP (status + JSON body).

mod common;

use std::time::Duration;

use common::client::{Api, Ws};
use common::db::TestDatabase;
use common::server::{test_settings, TestServer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

both_backends!(every_bad_frame_gets_its_error_and_the_room_keeps_working);

async fn every_bad_frame_gets_its_error_and_the_room_keeps_working(db: TestDatabase) {
    let mut settings = test_settings(&db.url);
    settings.limits.max_frame_bytes = 4096;
    settings.limits.max_text_bytes = 1000;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "robust").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    ada_ws.subscribe(&room, None).await;

    let cases: Vec<(String, &str, Value)> = vec![
        ("{nope".into(), "bad_json", Value::Null),
        ("[1, 2]".into(), "invalid_frame", Value::Null),
        (r#"{"id": "t1", "room": "x"}"#.into(), "invalid_frame", json!("t1")),
        (r#"{"type": "dance", "id": "u1"}"#.into(), "unknown_type", json!("u1")),
        (json!({"type": "send", "id": "m1", "room": room}).to_string(), "invalid_frame", json!("m1")),
        (json!({"type": "subscribe", "id": 7, "room": 123}).to_string(), "invalid_frame", json!(7)),
        (json!({"type": "read", "id": "r1", "room": room, "seq": "ten"}).to_string(), "invalid_frame", json!("r1")),
        (format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(5000)), "frame_too_large", Value::Null),
        (json!({"type": "send", "id": "big", "room": room, "client_msg_id": "big", "text": "é".repeat(501)}).to_string(), "text_too_large", json!("big")),
        (json!({"type": "send", "id": "empty", "room": room, "client_msg_id": "e", "text": "   "}).to_string(), "validation", json!("empty")),
        (json!({"type": "send", "id": "cid", "room": room, "client_msg_id": "", "text": "hi"}).to_string(), "validation", json!("cid")),
        (json!({"type": "react", "id": "emo", "room": room, "message_id": "m", "emoji": "two words", "on": true}).to_string(), "validation", json!("emo")),
        (json!({"type": "subscribe", "id": "nr", "room": "no-such-room"}).to_string(), "room_not_found", json!("nr")),
        (json!({"type": "unsubscribe", "id": "ns", "room": "other"}).to_string(), "not_subscribed", json!("ns")),
        (json!({"type": "read", "id": "neg", "room": room, "seq": -1}).to_string(), "validation", json!("neg")),
        (json!({"type": "edit", "id": "nm", "room": room, "message_id": "nope", "text": "x"}).to_string(), "message_not_found", json!("nm")),
    ];
    for (frame, code, reply_to) in &cases {
        ada_ws.send_text(frame.clone()).await;
        let error = ada_ws.recv_until(|f| f["type"] == "error").await;
        assert_eq!(error["code"], *code, "frame {frame:.80} -> {error}");
        assert_eq!(error["reply_to"], *reply_to, "frame {frame:.80} -> {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ada_ws.send_binary(vec![0, 159, 146, 150]).await;
    let error = ada_ws.recv_until(|f| f["type"] == "error").await;
    assert_eq!(error["code"], "binary_not_supported");

    // The same socket still works, and nothing above reached the room.
    assert_eq!(
        ada_ws.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
    let ack = ada_ws.send_message(&room, "ok", "still here").await;
    assert_eq!(ack["type"], "ack");
    let events = bob_ws.events(&room, 1).await;
    assert_eq!(events[0]["event"]["message"]["text"], "still here");
    bob_ws
        .assert_quiet(Duration::from_millis(200), |f| f["type"] == "event")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_are_rate_limited_then_the_abuser_is_closed_and_others_are_served() {
    let db = TestDatabase::sqlite();
    let mut settings = test_settings(&db.url);
    settings.limits.rate_per_s = 2.0;
    settings.limits.rate_burst = 5.0;
    settings.limits.abuse_strikes = 20;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let (flooder, calm) = (api.register("fld").await, api.register("clm").await);

    let mut flood = Ws::connect(&server.ws_url(), &flooder.token).await;
    for i in 0..30 {
        flood.send(json!({"type": "ping", "id": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while pongs + limited < 20 {
        let frame = flood.recv().await;
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited");
                assert!(
                    frame["reply_to"].is_number(),
                    "rate_limited keeps reply_to: {frame}"
                );
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (5..=7).contains(&pongs),
        "the burst passes, the rest is refused: {pongs} pongs"
    );
    assert_eq!(
        flood.closed().await,
        Some(CloseCode::Policy),
        "an abuser is closed with 1008"
    );

    let mut other = Ws::connect(&server.ws_url(), &calm.token).await;
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_beyond_four_times_the_limit_close_the_socket_with_1009() {
    let db = TestDatabase::sqlite();
    let mut settings = test_settings(&db.url);
    settings.limits.max_frame_bytes = 1024;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let user = api.register("big").await;
    let mut ws = Ws::connect(&server.ws_url(), &user.token).await;
    ws.send_text(format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(20_000)
    ))
    .await;
    assert_eq!(ws.closed().await, Some(CloseCode::Size));
    let mut again = Ws::connect(&server.ws_url(), &user.token).await;
    assert_eq!(again.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_cut_off_and_the_others_get_everything() {
    let db = TestDatabase::sqlite();
    let mut settings = test_settings(&db.url);
    // A group commit delivers a whole batch at once, so the buffer must hold a batch or more.
    settings.room_buffer = 256;
    settings.store_batch = 32;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let (ada, slow, fast) = (
        api.register("ada").await,
        api.register("slw").await,
        api.register("fst").await,
    );
    let room = api.create_room(&ada, "firehose").await;
    api.add_member(&room, &ada, &slow, "member").await;
    api.add_member(&room, &ada, &fast, "member").await;
    let mut slow_ws = Ws::connect(&server.ws_url(), &slow.token).await;
    slow_ws.subscribe(&room, None).await;
    let mut fast_ws = Ws::connect(&server.ws_url(), &fast.token).await;
    fast_ws.subscribe(&room, None).await;

    // ~24 MB of events: far more than the socket buffers of a client that reads nothing.
    let mut sender = Ws::connect(&server.ws_url(), &ada.token).await;
    let text = "y".repeat(12_000);
    let total = 2000;
    let fast_room = room.clone();
    let reader = tokio::spawn(async move {
        let events = fast_ws.events(&fast_room, total).await;
        events
            .iter()
            .map(|e| e["seq"].as_i64().expect("seq"))
            .collect::<Vec<_>>()
    });
    for i in 0..total {
        sender.send(json!({"type": "send", "room": room, "client_msg_id": format!("f{i}"), "text": text})).await;
    }
    let seqs = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("the fast reader keeps up")
        .expect("reader task");
    assert_eq!(seqs.len(), total);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the fast member got every event in order"
    );

    // The slow one, reading at last, finds it was cut off with 1008.
    assert_eq!(slow_ws.closed().await, Some(CloseCode::Policy));
    let (_, metrics) = api.call("GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().expect("metrics are text").to_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cochat_slow_consumers_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_have_fitting_statuses_and_json_bodies() {
    let db = TestDatabase::sqlite();
    let mut settings = test_settings(&db.url);
    settings.limits.http_body_bytes = 2048;
    settings.limits.max_text_bytes = 500;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let ada = api.register("ada").await;
    let room = api.create_room(&ada, "errors").await;
    let username = ada.name.clone();

    let raw = |path: &str, body: &str, token: Option<&str>| {
        let mut request = api
            .http
            .post(format!("{}{path}", api.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
    };
    let check = |status: u16, code: &str, got: (reqwest::StatusCode, Value)| {
        assert_eq!(got.0.as_u16(), status, "{}", got.1);
        assert_eq!(got.1["error"]["code"], code, "{}", got.1);
        assert!(got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    };
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.expect("answers");
        let status = response.status();
        (
            status,
            response.json::<Value>().await.expect("JSON error body"),
        )
    };

    check(
        400,
        "bad_json",
        send(raw("/api/v1/rooms", "{not json", Some(&ada.token))).await,
    );
    check(
        401,
        "unauthorized",
        api.call("GET", "/api/v1/me", None, None).await,
    );
    check(
        401,
        "unauthorized",
        api.call("GET", "/api/v1/me", Some("not.a.jwt"), None).await,
    );
    check(
        401,
        "unauthorized",
        api.call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": username, "password": "wrong password"})),
        )
        .await,
    );
    check(
        401,
        "unauthorized",
        api.call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "nobody-here", "password": "whatever1"})),
        )
        .await,
    );
    check(
        404,
        "room_not_found",
        api.call("GET", "/api/v1/rooms/nope", Some(&ada.token), None)
            .await,
    );
    check(
        404,
        "not_found",
        api.call("GET", "/api/v1/nowhere", Some(&ada.token), None)
            .await,
    );
    check(
        404,
        "invite_invalid",
        api.call(
            "POST",
            "/api/v1/invites/nonexistent/accept",
            Some(&ada.token),
            None,
        )
        .await,
    );
    check(
        409,
        "username_taken",
        api.call(
            "POST",
            "/api/v1/auth/register",
            None,
            Some(json!({"username": username.to_uppercase(), "password": "long enough"})),
        )
        .await,
    );
    check(
        413,
        "payload_too_large",
        send(raw(
            "/api/v1/rooms",
            &json!({"name": "x".repeat(5000)}).to_string(),
            Some(&ada.token),
        ))
        .await,
    );
    check(
        413,
        "text_too_large",
        api.call(
            "POST",
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&ada.token),
            Some(json!({"client_msg_id": "t", "text": "x".repeat(501)})),
        )
        .await,
    );
    check(
        422,
        "validation",
        api.call(
            "POST",
            "/api/v1/auth/register",
            None,
            Some(json!({"username": "shortpw", "password": "short"})),
        )
        .await,
    );
    check(
        422,
        "validation",
        api.call(
            "POST",
            "/api/v1/rooms",
            Some(&ada.token),
            Some(json!({"name": 42})),
        )
        .await,
    );
    check(
        422,
        "validation",
        api.call(
            "GET",
            &format!("/api/v1/rooms/{room}/messages?limit=0"),
            Some(&ada.token),
            None,
        )
        .await,
    );
    check(
        422,
        "validation",
        api.call(
            "GET",
            &format!("/api/v1/rooms/{room}/messages?limit=abc"),
            Some(&ada.token),
            None,
        )
        .await,
    );
    check(
        422,
        "validation",
        api.call(
            "POST",
            &format!("/api/v1/rooms/{room}/invites"),
            Some(&ada.token),
            Some(json!({"role": "ai"})),
        )
        .await,
    );
    check(
        409,
        "conflict",
        api.call(
            "DELETE",
            &format!("/api/v1/rooms/{room}/members/{}", ada.id),
            Some(&ada.token),
            None,
        )
        .await,
    );
    let (status, _) = api.call("GET", "/api/v1/ws", None, None).await;
    assert_eq!(status, 401, "no token, no upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_writes_are_rate_limited_per_user() {
    let db = TestDatabase::sqlite();
    let mut settings = test_settings(&db.url);
    settings.limits.rate_per_s = 0.5;
    settings.limits.rate_burst = 3.0;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    // Registration itself counts against the per-address budget, so register one user only.
    let ada = api.register("ada").await;
    let room = api.create_room(&ada, "limits").await;
    let mut statuses = Vec::new();
    for i in 0..5 {
        let (status, body) = api
            .call(
                "POST",
                &format!("/api/v1/rooms/{room}/messages"),
                Some(&ada.token),
                Some(json!({"client_msg_id": format!("r{i}"), "text": "hi"})),
            )
            .await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited");
        }
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, [201, 201, 201, 429, 429]);
}
