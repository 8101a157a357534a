//! AI agents against a real local HTTP server speaking the OpenAI streaming format (the fake
//! provider records every request): triggers, streaming to every member, cancel, context,
//! summaries, budgets, tools, queueing, resume mid-answer.

mod common;

use std::time::{Duration, Instant};

use cochat::ai::provider::ProviderConfig;
use cochat::settings::Settings;
use common::client::{Api, User, Ws};
use common::db::TestDatabase;
use common::fake_llm::{FakeLlm, Script};
use common::server::{test_settings, TestServer};
use serde_json::{json, Value};

async fn ai_server(
    db: &TestDatabase,
    fake: Option<&FakeLlm>,
    tweak: impl FnOnce(&mut Settings),
) -> TestServer {
    let mut settings = test_settings(&db.url);
    if let Some(fake) = fake {
        let mut provider = ProviderConfig::new(fake.base_url(), "fake-model");
        provider.idle_timeout = Duration::from_secs(5);
        settings.ai_provider = Some(provider);
    }
    tweak(&mut settings);
    TestServer::start_with(settings).await
}

/// A room with two members, both subscribed.
async fn room_of_two(server: &TestServer) -> (Api, String, (User, Ws), (User, Ws)) {
    let api = Api::new(&server.base);
    let (ada, bob) = (api.register("ada").await, api.register("bob").await);
    let room = api.create_room(&ada, "with ai").await;
    api.add_member(&room, &ada, &bob, "member").await;
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    ada_ws.subscribe(&room, None).await;
    bob_ws.subscribe(&room, None).await;
    (api, room, (ada, ada_ws), (bob, bob_ws))
}

fn is_terminal(frame: &Value) -> bool {
    frame["type"] == "event"
        && ["ai.completed", "ai.failed", "ai.cancelled"]
            .contains(&frame["event"]["kind"].as_str().unwrap_or(""))
}

/// Everything one member sees of one answer: `ai.started`, the deltas, the terminal event.
struct Seen {
    started: Value,
    deltas: Vec<(usize, String)>,
    end: Value,
}

impl Seen {
    /// The text a client builds by splicing the deltas at their offsets.
    fn spliced(&self) -> String {
        let mut text: Vec<char> = Vec::new();
        for (offset, delta) in &self.deltas {
            if *offset <= text.len() {
                text.truncate(*offset);
                text.extend(delta.chars());
            }
        }
        text.into_iter().collect()
    }
}

async fn watch_answer(ws: &mut Ws) -> Seen {
    watch_answer_to(ws, None).await
}

/// Like `watch_answer`, for the answer to one trigger (`None`: the first answer seen).
async fn watch_answer_to(ws: &mut Ws, trigger: Option<&Value>) -> Seen {
    let started = ws
        .recv_until(|f| {
            f["type"] == "event"
                && f["event"]["kind"] == "ai.started"
                && trigger.is_none_or(|t| f["event"]["trigger_message_id"] == *t)
        })
        .await;
    let id = started["event"]["message_id"].clone();
    let mut deltas = Vec::new();
    loop {
        let frame = ws
            .recv_until(|f| {
                (f["type"] == "ai.delta" && f["message_id"] == id)
                    || (is_terminal(f) && f["event"]["message"]["id"] == id)
            })
            .await;
        if frame["type"] == "ai.delta" {
            deltas.push((
                frame["offset"].as_u64().expect("offset") as usize,
                frame["text"].as_str().expect("text").to_owned(),
            ));
        } else {
            return Seen {
                started,
                deltas,
                end: frame,
            };
        }
    }
}

both_backends!(a_mention_streams_the_answer_to_every_member_and_persists_it);

async fn a_mention_streams_the_answer_to_every_member_and_persists_it(db: TestDatabase) {
    let fake = FakeLlm::start().await;
    fake.push(
        Script::stream()
            .role()
            .deltas(&["Hel", "lo, ", "Ada ✨"])
            .finish("stop")
            .usage(42, 7)
            .done()
            .pace(20),
    );
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (api, room, (ada, mut ada_ws), (_bob, mut bob_ws)) = room_of_two(&server).await;
    let trigger = ada_ws.send_message(&room, "q1", "@ai say hello").await;

    let (for_ada, for_bob) = (
        watch_answer(&mut ada_ws).await,
        watch_answer(&mut bob_ws).await,
    );
    for seen in [&for_ada, &for_bob] {
        assert_eq!(seen.started["event"]["agent"], "ai");
        assert_eq!(
            seen.started["event"]["trigger_message_id"],
            trigger["message_id"]
        );
        assert_eq!(seen.started["event"]["trigger_author"], json!(ada.id));
        assert_eq!(
            seen.deltas,
            vec![
                (0, "Hel".to_owned()),
                (3, "lo, ".to_owned()),
                (7, "Ada ✨".to_owned())
            ]
        );
        assert_eq!(seen.end["event"]["kind"], "ai.completed");
        assert_eq!(seen.end["event"]["message"]["text"], "Hello, Ada ✨");
        assert_eq!(
            seen.end["event"]["message"]["author"],
            json!({"id": "ai:ai", "name": "ai", "kind": "ai"})
        );
        assert_eq!(
            seen.end["event"]["usage"],
            json!({"prompt_tokens": 42, "completion_tokens": 7})
        );
        assert_eq!(seen.spliced(), "Hello, Ada ✨");
    }
    assert!(for_ada.end["seq"].as_i64() > for_ada.started["seq"].as_i64());

    // The answer is a message of the room, replying to its trigger.
    let history = api.history(&ada, &room, "").await;
    let answer = history["messages"]
        .as_array()
        .expect("messages")
        .last()
        .expect("answer")
        .clone();
    assert_eq!(
        (answer["text"].as_str(), answer["author"]["kind"].as_str()),
        (Some("Hello, Ada ✨"), Some("ai"))
    );
    assert_eq!(answer["reply_to_message"], trigger["message_id"]);

    // What the provider was asked.
    let request = &fake.requests()[0];
    assert_eq!(request.body["model"], "fake-model");
    assert_eq!(request.body["stream"], true);
    let messages = request.messages();
    assert_eq!(messages[0]["role"], "system");
    let last = messages.last().expect("the trigger is last");
    assert_eq!(last["role"], "user");
    assert!(
        last["content"]
            .as_str()
            .expect("content")
            .ends_with(": @ai say hello"),
        "{last}"
    );
    assert!(request.body["tools"]
        .as_array()
        .is_some_and(|tools| tools.len() == 2));

    // Usage is in the ledger, readable over HTTP.
    let (status, usage) = api
        .call(
            "GET",
            &format!("/api/v1/rooms/{room}/usage"),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64(),
            usage["answers"].as_u64()
        ),
        (Some(42), Some(7), Some(1))
    );
    assert_eq!(usage["by_user"][0]["user"], json!(ada.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_triggered_only_by_people_and_only_as_written() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    // The default agent answers by mentioning the other agent and using /ai: neither triggers.
    fake.set_default(Script::answer(&["/ai loop? ask @poet"]));
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (api, room, (ada, mut ada_ws), _) = room_of_two(&server).await;
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/agents"),
            Some(&ada.token),
            Some(json!({"name": "poet", "system_prompt": "You rhyme."})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    ada_ws
        .send_message(
            &room,
            "p0",
            "no mention here, just @someone and mail@ai.org",
        )
        .await;
    ada_ws.send_message(&room, "p1", "/ai start").await;
    let seen = watch_answer(&mut ada_ws).await;
    assert_eq!(seen.end["event"]["message"]["text"], "/ai loop? ask @poet");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.requests().len(),
        1,
        "an agent's message triggers no agent"
    );

    // A reply to an agent's message calls that agent, with the persona's prompt.
    let answer_id = seen.end["event"]["message"]["id"].clone();
    fake.push(Script::answer(&["roses"]));
    ada_ws.request(json!({"type": "send", "room": room, "client_msg_id": "p2", "text": "and then?", "reply_to_message": answer_id})).await;
    watch_answer(&mut ada_ws).await;
    ada_ws
        .send_message(&room, "p3", "@poet a verse please")
        .await;
    let poem = watch_answer(&mut ada_ws).await;
    assert_eq!(poem.started["event"]["agent"], "poet");
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].messages()[0]["content"], "You rhyme.");
    // The reply's thread is in the context of the second request.
    let context = serde_json::to_string(&requests[1].messages()).expect("json");
    assert!(
        context.contains("replies to this thread") && context.contains("/ai loop? ask @poet"),
        "{context}"
    );

    let (_, detail) = api
        .call(
            "GET",
            &format!("/api/v1/rooms/{room}"),
            Some(&ada.token),
            None,
        )
        .await;
    let names: Vec<&str> = detail["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["ai", "poet"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_provider_agents_say_ai_is_not_configured() {
    let db = TestDatabase::sqlite();
    let server = ai_server(&db, None, |_| {}).await;
    let (_, room, (_, mut ada_ws), _) = room_of_two(&server).await;
    ada_ws.send_message(&room, "n1", "/ai are you there?").await;
    let seen = watch_answer(&mut ada_ws).await;
    assert_eq!(seen.end["event"]["kind"], "ai.completed");
    assert!(seen.end["event"]["message"]["text"]
        .as_str()
        .expect("text")
        .starts_with("AI is not configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_aborts_the_upstream_request_at_once_and_keeps_the_partial_text() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    fake.push(Script::answer(&words).pace(50));
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (_, room, (_ada, mut ada_ws), (_bob, mut bob_ws)) = room_of_two(&server).await;
    let question = ada_ws.send_message(&room, "c1", "@ai talk a lot").await;
    let started = bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "ai.started")
        .await;
    let answer_id = started["event"]["message_id"].clone();
    bob_ws
        .recv_until(|f| f["type"] == "ai.delta" && f["offset"].as_u64() > Some(10))
        .await;

    // Someone else's answer: a member may not cancel it.
    let refused = bob_ws
        .request(json!({"type": "cancel", "room": room, "message_id": answer_id}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    // The author cancels by the id of the question (the answer's id works the same).
    let asked_at = Instant::now();
    let ack = ada_ws
        .request(json!({"type": "cancel", "room": room, "message_id": question["message_id"]}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let request = fake.wait_for_end(0).await;
    let closed = request
        .closed_early_at
        .expect("the provider saw the connection closed before the end");
    assert!(
        closed.saturating_duration_since(asked_at) < Duration::from_millis(100),
        "closed {:?} after the cancel",
        closed.saturating_duration_since(asked_at)
    );

    let end = bob_ws.recv_until(is_terminal).await;
    assert_eq!(end["event"]["kind"], "ai.cancelled");
    let partial = end["event"]["message"]["text"].as_str().expect("text");
    assert!(
        partial.starts_with("w0 w1 ") && partial.len() < 200 * 3,
        "partial text kept: {partial:?}"
    );
    let again = ada_ws
        .request(json!({"type": "cancel", "room": room, "message_id": answer_id}))
        .await;
    assert_eq!(again["code"], "not_found", "nothing left to cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_answer_at_a_time_the_queue_is_visible_and_edits_before_the_start_count() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    fake.push(Script::answer(&["first ", "answer ", "slowly"]).pace(300));
    fake.push(Script::answer(&["second"]));
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (_, room, (_ada, mut ada_ws), (_bob, mut bob_ws)) = room_of_two(&server).await;
    ada_ws.send_message(&room, "t1", "/ai one").await;
    bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "ai.started")
        .await;
    let second = bob_ws.send_message(&room, "t2", "/ai two").await;
    let second_id = second["message_id"].clone();
    let queue = ada_ws
        .recv_until(|f| {
            f["type"] == "ai.queue"
                && f["queue"]
                    .as_array()
                    .is_some_and(|q| q.iter().any(|t| t["trigger_message_id"] == second_id))
        })
        .await;
    assert_eq!(queue["agent"], "ai");
    assert_eq!(
        queue["queue"][0]["trigger_message_id"],
        second["message_id"]
    );
    assert_eq!(queue["queue"][0]["position"], 1);
    // A client subscribing now is told the queue right away.
    let (mut fresh, _) = Ws::connect_with_node(&server.ws_url(), &_bob.token).await;
    fresh.subscribe(&room, None).await;
    let told = fresh.recv_until(|f| f["type"] == "ai.queue").await;
    assert_eq!(told["queue"][0]["trigger_message_id"], second_id);
    // Edited while queued: the answer will be to the edited text.
    let edit = bob_ws.request(json!({"type": "edit", "room": room, "message_id": second["message_id"], "text": "/ai two, edited"})).await;
    assert_eq!(edit["type"], "ack");

    let first = watch_answer(&mut ada_ws).await;
    let next = watch_answer(&mut ada_ws).await;
    assert_eq!(first.end["event"]["message"]["text"], "first answer slowly");
    assert_eq!(next.end["event"]["message"]["text"], "second");
    assert!(
        next.started["seq"].as_i64() > first.end["seq"].as_i64(),
        "the second starts after the first ends"
    );
    let requests = fake.requests();
    let last = requests[1].messages().last().expect("trigger").clone();
    assert!(
        last["content"]
            .as_str()
            .expect("content")
            .ends_with("/ai two, edited"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joining_mid_answer_ends_with_exactly_the_final_text() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    let parts: Vec<String> = (0..30).map(|i| format!("part{i}-é ")).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    fake.push(Script::answer(&parts).pace(30));
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (api, room, (ada, mut ada_ws), _) = room_of_two(&server).await;
    ada_ws.send_message(&room, "r1", "/ai stream").await;
    ada_ws
        .recv_until(|f| f["type"] == "ai.delta" && f["offset"].as_u64() >= Some(60))
        .await;

    // A third member arrives mid-answer, with a resume from 0.
    let late = api.register("late").await;
    api.add_member(&room, &ada, &late, "member").await;
    let mut late_ws = Ws::connect(&server.ws_url(), &late.token).await;
    late_ws.subscribe(&room, Some(0)).await;
    let seen = watch_answer(&mut late_ws).await;
    assert_eq!(seen.deltas[0].0, 0, "first the text so far, whole");
    assert!(seen.deltas[0].1.len() >= 60);
    let expected: String = parts.concat();
    assert_eq!(seen.spliced(), expected, "no duplicated or missing text");
    assert_eq!(seen.end["event"]["message"]["text"], expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_history_is_folded_into_a_persisted_summary_and_the_request_fits_the_budget() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    fake.set_default(Script::answer(&["They talked about boats."]));
    let server = ai_server(&db, Some(&fake), |s| {
        s.ai.context_tokens = 1200;
        s.ai.answer_tokens = 200;
    })
    .await;
    let (_, room, (_, mut ada_ws), _) = room_of_two(&server).await;
    for i in 0..40 {
        ada_ws.send(json!({"type": "send", "room": room, "client_msg_id": format!("h{i}"), "text": format!("message {i} about boats {}", "and more ".repeat(20))})).await;
    }
    for _ in 0..40 {
        ada_ws.recv_until(|f| f["type"] == "ack").await;
    }
    ada_ws
        .send_message(&room, "s1", "/ai what was this about?")
        .await;
    watch_answer(&mut ada_ws).await;
    let requests = fake.requests();
    assert!(requests.len() >= 2, "summary requests, then the answer");
    let (answer, summaries) = requests.split_last().expect("requests");
    let mut folded = String::new();
    for request in summaries {
        let text = serde_json::to_string(&request.messages()).expect("json");
        assert!(text.contains("Summarise"), "{text}");
        assert!(
            estimated(&request.messages()) + 400 <= 1200,
            "each summary request fits the budget"
        );
        folded.push_str(&text);
    }
    for i in [0, 1, 10] {
        assert!(
            folded.contains(&format!("message {i} about boats")),
            "message {i} went into a summary"
        );
    }
    let answer_messages = answer.messages();
    let text = serde_json::to_string(&answer_messages).expect("json");
    assert!(
        text.contains(
            "Summary of the earlier conversation in this room:\\nThey talked about boats."
        ),
        "{text}"
    );
    assert!(
        text.contains("message 39 about boats"),
        "the newest history is kept verbatim"
    );
    assert!(
        !text.contains("message 0 about boats"),
        "the oldest is only in the summary"
    );
    assert!(
        estimated(&answer_messages) + 200 <= 1200,
        "the request fits the budget"
    );

    // The summary is persisted: the next answer starts from it.
    let before = fake.requests().len();
    ada_ws.send_message(&room, "s2", "/ai and now?").await;
    watch_answer(&mut ada_ws).await;
    let requests = fake.requests();
    assert!(
        requests.len() - before <= 2,
        "no refold of the whole history"
    );
    assert!(
        serde_json::to_string(&requests.last().expect("answer").messages())
            .expect("json")
            .contains("They talked about boats.")
    );
}

/// The same pessimistic estimate the server uses: four characters a token, plus four a message.
fn estimated(messages: &[Value]) -> usize {
    messages
        .iter()
        .map(|m| {
            m["content"]
                .as_str()
                .map_or(0, |c| c.chars().count().div_ceil(4))
                + 4
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_refuse_triggers_with_a_clear_error_event_and_usage_is_pushed() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    fake.set_default(
        Script::stream()
            .role()
            .delta("ok")
            .finish("stop")
            .usage(30, 5)
            .done(),
    );
    let server = ai_server(&db, Some(&fake), |s| {
        s.ai.tokens_per_day_user = 20;
        s.ai.triggers_per_min_room = 3;
    })
    .await;
    let (_, room, (_ada, mut ada_ws), (_bob, mut bob_ws)) = room_of_two(&server).await;
    ada_ws.send_message(&room, "b1", "/ai first").await;
    let first = watch_answer(&mut ada_ws).await;
    assert_eq!(first.end["event"]["kind"], "ai.completed");
    let usage = ada_ws.recv_until(|f| f["type"] == "ai.usage").await;
    assert_eq!(
        (
            usage["usage"]["prompt_tokens"].as_u64(),
            usage["usage"]["completion_tokens"].as_u64()
        ),
        (Some(30), Some(5))
    );

    // Ada has used 35 of her 20 tokens today.
    let b2 = ada_ws.send_message(&room, "b2", "/ai again").await;
    let refused = watch_answer_to(&mut ada_ws, Some(&b2["message_id"])).await;
    assert_eq!(refused.end["event"]["kind"], "ai.failed");
    assert_eq!(refused.end["event"]["code"], "budget_exceeded");
    assert!(refused.end["event"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("tokens per day")));
    assert!(refused.deltas.is_empty());
    // Bob still may, until the room's 3 triggers a minute are spent.
    let b3 = bob_ws.send_message(&room, "b3", "/ai mine").await;
    assert_eq!(
        watch_answer_to(&mut bob_ws, Some(&b3["message_id"]))
            .await
            .end["event"]["kind"],
        "ai.completed"
    );
    let b4 = bob_ws.send_message(&room, "b4", "/ai more").await;
    let limited = watch_answer_to(&mut bob_ws, Some(&b4["message_id"])).await;
    assert_eq!(limited.end["event"]["code"], "rate_limited");
    assert_eq!(
        fake.requests().len(),
        2,
        "refused triggers never reach the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_can_search_the_rooms_history_with_tools() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    fake.push(Script::tool_call(
        "call_1",
        "search_history",
        r#"{"query":"PINEAPPLE"}"#,
    ));
    fake.push(Script::answer(&["It was on the pizza."]));
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (_, room, (_, mut ada_ws), _) = room_of_two(&server).await;
    let needle = ada_ws
        .send_message(&room, "x1", "pineapple goes on the pizza")
        .await;
    ada_ws
        .send_message(&room, "x2", "/ai where did the pineapple go?")
        .await;
    let seen = watch_answer(&mut ada_ws).await;
    assert_eq!(seen.end["event"]["message"]["text"], "It was on the pizza.");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let follow_up = requests[1].messages();
    let call = follow_up
        .iter()
        .find(|m| m["role"] == "assistant")
        .expect("the call is sent back");
    assert_eq!(call["tool_calls"][0]["id"], "call_1");
    let result = follow_up
        .iter()
        .find(|m| m["role"] == "tool")
        .expect("the tool result");
    assert_eq!(result["tool_call_id"], "call_1");
    let found: Value =
        serde_json::from_str(result["content"].as_str().expect("content")).expect("JSON result");
    assert!(
        found["matches"]
            .as_array()
            .expect("matches")
            .iter()
            .any(|m| m["id"] == needle["message_id"]),
        "{found}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_answer_ends_in_ai_failed_with_the_partial_text_and_regenerate_retries() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    fake.push(Script::stream().role().deltas(&["half ", "an "]).cut());
    fake.push(Script::answer(&["a whole answer"]));
    let server = ai_server(&db, Some(&fake), |_| {}).await;
    let (api, room, (ada, mut ada_ws), _) = room_of_two(&server).await;
    ada_ws.send_message(&room, "f1", "/ai go").await;
    let failed = watch_answer(&mut ada_ws).await;
    assert_eq!(failed.end["event"]["kind"], "ai.failed");
    assert_eq!(failed.end["event"]["code"], "provider_unreachable");
    assert_eq!(failed.end["event"]["message"]["text"], "half an ");

    let ack = ada_ws.request(json!({"type": "regenerate", "room": room, "message_id": failed.end["event"]["message"]["id"]})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let again = watch_answer(&mut ada_ws).await;
    assert_eq!(again.end["event"]["message"]["text"], "a whole answer");
    assert_eq!(
        again.started["event"]["trigger_message_id"],
        failed.started["event"]["trigger_message_id"]
    );
    let history = api.history(&ada, &room, "").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, ["/ai go", "half an ", "a whole answer"]);
}
