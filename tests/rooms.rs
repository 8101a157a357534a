//! Rooms over HTTP: invites, roles, listing with unread counts, history paging, the event log for
//! resuming past the replay limit, and the operational endpoints.

mod common;

use common::client::{Api, Ws};
use common::db::TestDatabase;
use common::server::{test_settings, TestServer};
use serde_json::json;

both_backends!(
    invites_respect_role_uses_and_expiry,
    roles_change_only_downwards_from_your_own,
    unread_counts_follow_read_markers,
    a_resume_older_than_the_replay_limit_says_so_and_the_rest_pages_over_http,
);

async fn invites_respect_role_uses_and_expiry(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (owner, admin, a, b, c) = (
        api.register("own").await,
        api.register("adm").await,
        api.register("usa").await,
        api.register("usb").await,
        api.register("usc").await,
    );
    let room = api.create_room(&owner, "invites").await;
    api.add_member(&room, &owner, &admin, "admin").await;

    // An admin cannot mint owner invites.
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/invites"),
            Some(&admin.token),
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, invite) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/invites"),
            Some(&admin.token),
            Some(json!({"role": "guest", "max_uses": 2})),
        )
        .await;
    assert_eq!(status, 201, "{invite}");
    let code = invite["code"].as_str().expect("code");
    for user in [&a, &b] {
        let (status, body) = api
            .call(
                "POST",
                &format!("/api/v1/invites/{code}/accept"),
                Some(&user.token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["role"].as_str(), body["room"]["id"].as_str()),
            (Some("guest"), Some(room.as_str()))
        );
    }
    // Accepting again as a member changes nothing and uses nothing; a third person finds it used up.
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/invites/{code}/accept"),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["role"].as_str()),
        (200, Some("guest"))
    );
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/invites/{code}/accept"),
            Some(&c.token),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("invite_invalid"))
    );

    let (_, expiring) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/invites"),
            Some(&owner.token),
            Some(json!({"expires_in_s": 1})),
        )
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (status, _) = api
        .call(
            "POST",
            &format!(
                "/api/v1/invites/{}/accept",
                expiring["code"].as_str().expect("code")
            ),
            Some(&c.token),
            None,
        )
        .await;
    assert_eq!(status, 404, "an expired invite is refused");

    let (_, detail) = api
        .call(
            "GET",
            &format!("/api/v1/rooms/{room}"),
            Some(&a.token),
            None,
        )
        .await;
    let roles: Vec<(String, String)> = detail["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user"]["id"].as_str().expect("id").to_owned(),
                m["role"].as_str().expect("role").to_owned(),
            )
        })
        .collect();
    assert_eq!(roles.len(), 4, "{detail}");
    assert!(
        roles.contains(&(owner.id.clone(), "owner".into()))
            && roles.contains(&(b.id.clone(), "guest".into()))
    );
}

async fn roles_change_only_downwards_from_your_own(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (owner, admin, member) = (
        api.register("own").await,
        api.register("adm").await,
        api.register("mem").await,
    );
    let room = api.create_room(&owner, "roles").await;
    api.add_member(&room, &owner, &admin, "admin").await;
    api.add_member(&room, &owner, &member, "member").await;
    let mut watcher = Ws::connect(&server.ws_url(), &member.token).await;
    watcher.subscribe(&room, None).await;
    let patch = |actor: &common::client::User, target: &common::client::User, role: &str| {
        let (api, path, token) = (
            api.clone(),
            format!("/api/v1/rooms/{room}/members/{}", target.id),
            actor.token.clone(),
        );
        let body = json!({"role": role});
        async move { api.call("PATCH", &path, Some(&token), Some(body)).await }
    };
    assert_eq!(
        patch(&admin, &member, "owner").await.0,
        403,
        "never above your own role"
    );
    assert_eq!(
        patch(&admin, &owner, "member").await.0,
        403,
        "never on someone above you"
    );
    assert_eq!(
        patch(&member, &member, "admin").await.0,
        403,
        "members change no roles"
    );
    let (status, body) = patch(&admin, &member, "guest").await;
    assert_eq!(status, 200, "{body}");
    let event = watcher
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "member.role_changed")
        .await;
    assert_eq!(
        (
            event["event"]["user"]["id"].as_str(),
            event["event"]["role"].as_str()
        ),
        (Some(member.id.as_str()), Some("guest"))
    );
    // The demotion is in force at once: the guest can no longer write.
    let refused = watcher.send_message(&room, "g", "hello?").await;
    assert_eq!(refused["code"], "forbidden");
    // The last owner can neither leave nor be demoted by themselves.
    assert_eq!(patch(&owner, &owner, "admin").await.0, 409);
}

async fn unread_counts_follow_read_markers(db: TestDatabase) {
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "unread").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    let mut last = 0;
    for i in 0..3 {
        last = ada_ws.send_message(&room, &format!("u{i}"), "news").await["seq"]
            .as_i64()
            .expect("seq");
    }
    let unread = |user: &common::client::User| {
        let (api, token, room) = (api.clone(), user.token.clone(), room.clone());
        async move {
            let (_, body) = api.call("GET", "/api/v1/rooms", Some(&token), None).await;
            let listed = body["rooms"]
                .as_array()
                .expect("rooms")
                .iter()
                .find(|r| r["id"] == json!(room))
                .expect("listed")
                .clone();
            (
                listed["unread"].as_i64().expect("unread"),
                listed["last_seq"].as_i64().expect("last_seq"),
            )
        }
    };
    assert_eq!(unread(&bob).await, (3, last));
    assert_eq!(unread(&ada).await.0, 0, "your own messages are not unread");

    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    let marker = bob_ws
        .request(json!({"type": "read", "room": room, "seq": last - 1}))
        .await;
    assert_eq!(
        (marker["type"].as_str(), marker["seq"].as_i64()),
        (Some("ack"), Some(last - 1))
    );
    assert_eq!(unread(&bob).await.0, 1);
    // Markers never move back.
    let back = bob_ws
        .request(json!({"type": "read", "room": room, "seq": 1}))
        .await;
    assert_eq!(back["seq"].as_i64(), Some(last - 1));
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/read"),
            Some(&bob.token),
            Some(json!({"seq": last})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["last_read_seq"].as_i64()),
        (200, Some(last))
    );
    assert_eq!(unread(&bob).await.0, 0);
}

async fn a_resume_older_than_the_replay_limit_says_so_and_the_rest_pages_over_http(
    db: TestDatabase,
) {
    let mut settings = test_settings(&db.url);
    settings.limits.replay_limit = 10;
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let ada = api.register("ada").await;
    let room = api.create_room(&ada, "long").await;
    let mut ws = Ws::connect(&server.ws_url(), &ada.token).await;
    for i in 0..30 {
        ws.send(json!({"type": "send", "room": room, "client_msg_id": format!("l{i}"), "text": format!("line {i}")})).await;
    }
    for _ in 0..30 {
        ws.recv_until(|f| f["type"] == "ack").await;
    }
    let head = 31; // member.joined + 30 messages
    let mut resumed = Ws::connect(&server.ws_url(), &ada.token).await;
    let answer = resumed.subscribe(&room, Some(5)).await;
    assert_eq!(answer["head_seq"], head);
    assert_eq!(answer["truncated"], true);
    assert_eq!(answer["replay_after_seq"], head - 10);
    let replayed: Vec<i64> = resumed
        .events(&room, 10)
        .await
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(replayed, ((head - 9)..=head).collect::<Vec<_>>());
    // The client pages the hole (5, 21] over HTTP, exactly.
    let (status, page) = api
        .call(
            "GET",
            &format!("/api/v1/rooms/{room}/events?after_seq=5&limit=16"),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let paged: Vec<i64> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(paged, (6..=21).collect::<Vec<_>>());
    assert_eq!(page["has_more"], true);

    // History pages back by seq as well.
    let newest = api.history(&ada, &room, "limit=5").await;
    let seqs: Vec<i64> = newest["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(
        (seqs, newest["has_more"].as_bool()),
        ((27..=31).collect::<Vec<_>>(), Some(true))
    );
    let older = api.history(&ada, &room, "before_seq=27&limit=5").await;
    assert_eq!(older["messages"][0]["seq"], 22);
    let oldest = api.history(&ada, &room, "after_seq=0&limit=100").await;
    assert_eq!(
        (
            oldest["messages"].as_array().map(Vec::len),
            oldest["has_more"].as_bool()
        ),
        (Some(30), Some(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_operational_endpoints() {
    let db = TestDatabase::sqlite();
    let server = TestServer::start(&db).await;
    let api = Api::new(&server.base);
    let ada = api.register("ada").await;
    let (status, body) = api.call("GET", "/api/v1/me", Some(&ada.token), None).await;
    assert_eq!(
        (status.as_u16(), body["user"]["id"].as_str()),
        (200, Some(ada.id.as_str()))
    );
    let username = body["user"]["username"]
        .as_str()
        .expect("username")
        .to_owned();
    let (status, login) = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": username.to_uppercase(), "password": "correct horse battery"})),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let (status, _) = api
        .call("GET", "/api/v1/me", login["token"].as_str(), None)
        .await;
    assert_eq!(status, 200, "a login token works");

    let (status, health) = api.call("GET", "/healthz", None, None).await;
    assert_eq!(
        (status.as_u16(), health["status"].as_str()),
        (200, Some("ok"))
    );
    let (status, ready) = api.call("GET", "/readyz", None, None).await;
    assert_eq!(
        (status.as_u16(), ready["checks"]["store"].as_str()),
        (200, Some("ok"))
    );

    let room = api.create_room(&ada, "metrics").await;
    let mut ws = Ws::connect(&server.ws_url(), &ada.token).await;
    ws.subscribe(&room, None).await;
    ws.send_message(&room, "m", "counted").await;
    ws.events(&room, 1).await;
    let (_, metrics) = api.call("GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().expect("text").to_owned();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
    };
    assert_eq!(value("cochat_connections"), 1.0);
    assert!(value("cochat_rooms_active") >= 1.0);
    assert!(value("cochat_frames_in_total") >= 2.0);
    assert!(value("cochat_frames_out_total") >= 3.0);
    assert!(value("cochat_messages_persisted_total") >= 1.0);
    assert!(value("cochat_store_commit_seconds_count") >= 1.0);
    assert!(value("cochat_delivery_lag_seconds_count") >= 1.0);
}
