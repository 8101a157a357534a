//! The OpenAI-compatible client against a real HTTP server (the scripted fake): streaming, tool
//! calls, errors, retries, timeouts and cancel, over real sockets.

mod common;

use std::time::{Duration, Instant};

use cochat::ai::provider::{OpenAiCompatible, ProviderConfig, RetryPolicy};
use cochat_actors::llm::{
    ChatMessage, ChatRequest, ChatStream, LlmError, LlmProvider, StreamItem, ToolCall, ToolSpec,
};
use common::fake_llm::{FakeLlm, Script};
use futures_util::StreamExt;
use serde_json::json;

/// Short waits so failures show in seconds, not minutes.
fn config(fake: &FakeLlm) -> ProviderConfig {
    let mut config = ProviderConfig::new(fake.base_url(), "fake-model");
    config.connect_timeout = Duration::from_secs(2);
    config.first_byte_timeout = Duration::from_secs(5);
    config.idle_timeout = Duration::from_secs(5);
    config.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_delay: Duration::from_secs(3),
    };
    config
}

fn provider(config: ProviderConfig) -> OpenAiCompatible {
    OpenAiCompatible::new(config).expect("the HTTP client builds")
}

fn request(text: &str) -> ChatRequest {
    ChatRequest {
        model: String::new(),
        messages: vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", text),
        ],
        tools: Vec::new(),
        max_tokens: None,
    }
}

/// Every item until the stream ends (bounded, so a hang fails the test instead of blocking it).
async fn collect(stream: ChatStream) -> Vec<Result<StreamItem, LlmError>> {
    tokio::time::timeout(Duration::from_secs(15), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ends")
}

async fn answer(provider: &OpenAiCompatible, text: &str) -> Vec<Result<StreamItem, LlmError>> {
    let stream = provider
        .stream(request(text))
        .await
        .expect("the request is accepted");
    collect(stream).await
}

fn text_of(items: &[Result<StreamItem, LlmError>]) -> String {
    items
        .iter()
        .filter_map(|item| match item {
            Ok(StreamItem::Delta(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn done(reason: &str) -> Result<StreamItem, LlmError> {
    Ok(StreamItem::Done {
        finish_reason: Some(reason.into()),
    })
}

#[tokio::test]
async fn deltas_arrive_in_order_then_usage_then_done() {
    let fake = FakeLlm::start().await;
    fake.push(
        Script::stream()
            .role()
            .deltas(&["The", " answer", " is", " 42."])
            .finish("stop")
            .usage(31, 4)
            .done(),
    );
    let items = answer(&provider(config(&fake)), "question").await;
    assert_eq!(
        items,
        vec![
            Ok(StreamItem::Delta("The".into())),
            Ok(StreamItem::Delta(" answer".into())),
            Ok(StreamItem::Delta(" is".into())),
            Ok(StreamItem::Delta(" 42.".into())),
            Ok(StreamItem::Usage {
                prompt_tokens: 31,
                completion_tokens: 4
            }),
            done("stop"),
        ]
    );
}

#[tokio::test]
async fn multibyte_text_split_anywhere_is_reassembled_exactly() {
    let deltas = [
        "Grüße aus Köln, ",
        "日本語のテキスト",
        " and emoji 👩‍👩‍👧 🌍",
        "!",
    ];
    let expected: String = deltas.concat();
    let scripts = [
        Script::answer(&deltas).split_awkwardly(),
        Script::answer(&deltas).split_awkwardly().crlf(),
        Script::answer(&deltas).split_every(1),
        Script::answer(&deltas).split_every(5).crlf(),
        Script::stream()
            .raw(": keep-alive\n\n")
            .role()
            .raw(":\n\n")
            .deltas(&deltas)
            .raw("\n\n")
            .finish("stop")
            .done()
            .split_every(3),
    ];
    let fake = FakeLlm::start().await;
    let provider = provider(config(&fake));
    for (n, script) in scripts.into_iter().enumerate() {
        fake.push(script);
        let items = answer(&provider, "hi").await;
        assert_eq!(text_of(&items), expected, "script {n}: {items:?}");
        assert_eq!(items.last(), Some(&done("stop")), "script {n}");
        assert!(items.iter().all(Result::is_ok), "script {n}: {items:?}");
    }
}

#[tokio::test]
async fn a_tool_call_is_assembled_from_its_fragments() {
    let fake = FakeLlm::start().await;
    let arguments = r#"{"city":"Zürich","days":3}"#;
    fake.push(Script::tool_call("call_abc", "get_weather", arguments).split_every(7));
    let items = answer(&provider(config(&fake)), "weather?").await;
    assert_eq!(
        items,
        vec![
            Ok(StreamItem::ToolCall(ToolCall {
                id: "call_abc".into(),
                name: "get_weather".into(),
                arguments: arguments.into(),
            })),
            done("tool_calls"),
        ]
    );
}

#[tokio::test]
async fn two_tool_calls_and_text_come_out_in_order() {
    let fake = FakeLlm::start().await;
    fake.push(
        Script::stream()
            .role()
            .delta("Let me check.")
            .tool_call_fragments(0, "c0", "search", &["{\"q\":", "\"rust\"}"])
            .tool_call_fragments(1, "c1", "time", &["{}"])
            .finish("tool_calls")
            .usage(10, 20)
            .done(),
    );
    let items = answer(&provider(config(&fake)), "go").await;
    let call = |id: &str, name: &str, arguments: &str| {
        Ok(StreamItem::ToolCall(ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }))
    };
    assert_eq!(
        items,
        vec![
            Ok(StreamItem::Delta("Let me check.".into())),
            call("c0", "search", "{\"q\":\"rust\"}"),
            call("c1", "time", "{}"),
            Ok(StreamItem::Usage {
                prompt_tokens: 10,
                completion_tokens: 20
            }),
            done("tool_calls"),
        ]
    );
}

#[tokio::test]
async fn done_ends_the_answer_and_what_follows_is_ignored() {
    let fake = FakeLlm::start().await;
    fake.push(Script::answer(&["ok"]).malformed().stall());
    let started = Instant::now();
    let items = answer(&provider(config(&fake)), "hi").await;
    assert_eq!(
        items,
        vec![Ok(StreamItem::Delta("ok".into())), done("stop")]
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "did not wait for more after [DONE]"
    );
    let request = fake.wait_for_end(0).await;
    assert!(
        request.closed_early_at.is_some(),
        "the connection was let go at [DONE]"
    );
}

#[tokio::test]
async fn a_clean_end_after_the_finish_counts_as_done_without_the_marker() {
    let fake = FakeLlm::start().await;
    fake.push(Script::stream().delta("fine").finish("length"));
    let items = answer(&provider(config(&fake)), "hi").await;
    assert_eq!(
        items,
        vec![Ok(StreamItem::Delta("fine".into())), done("length")]
    );
}

#[tokio::test]
async fn a_malformed_chunk_ends_the_stream_with_malformed() {
    let fake = FakeLlm::start().await;
    fake.push(
        Script::stream()
            .delta("a")
            .malformed()
            .delta("b")
            .finish("stop")
            .done(),
    );
    fake.push(
        Script::stream()
            .delta("a")
            .data(r#"{"object":"chat.completion.chunk"}"#)
            .done(),
    );
    let provider = provider(config(&fake));
    for _ in 0..2 {
        let items = answer(&provider, "hi").await;
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0], Ok(StreamItem::Delta("a".into())));
        assert!(
            matches!(&items[1], Err(LlmError::Malformed(_))),
            "{items:?}"
        );
    }
}

#[tokio::test]
async fn a_cut_mid_answer_is_a_transport_error_and_is_not_retried() {
    let fake = FakeLlm::start().await;
    fake.push(Script::stream().role().deltas(&["par", "tial"]).cut());
    let items = answer(&provider(config(&fake)), "hi").await;
    assert_eq!(text_of(&items), "partial");
    assert!(
        matches!(items.last(), Some(Err(LlmError::Transport(_)))),
        "{items:?}"
    );
    // Let any (wrong) retry arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.requests().len(),
        1,
        "nothing is retried after the first token"
    );
}

#[tokio::test]
async fn a_500_is_retried_then_the_answer_streams() {
    let fake = FakeLlm::start().await;
    fake.push(Script::fail(500, "upstream exploded"));
    fake.push(Script::answer(&["second", " time"]));
    let items = answer(&provider(config(&fake)), "hi").await;
    assert_eq!(text_of(&items), "second time");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].body, requests[1].body,
        "the same request is sent again"
    );
}

#[tokio::test]
async fn a_refused_connection_and_a_hang_up_are_retried() {
    let fake = FakeLlm::start().await;
    fake.push(Script::hang_up());
    fake.push(Script::answer(&["back"]));
    assert_eq!(
        text_of(&answer(&provider(config(&fake)), "hi").await),
        "back"
    );
    assert_eq!(fake.requests().len(), 2);

    // A port nobody listens on: every attempt is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0 works");
    let address = closed
        .local_addr()
        .expect("a bound listener has an address");
    drop(closed);
    let mut config = config(&fake);
    config.base_url = format!("http://{address}/v1");
    let started = Instant::now();
    let error = provider(config).stream(request("hi")).await.err();
    assert!(matches!(error, Some(LlmError::Transport(_))), "{error:?}");
    // Two backoffs (20 ms, 40 ms) mean three attempts.
    assert!(
        started.elapsed() >= Duration::from_millis(60),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn retries_stop_after_the_last_attempt_with_the_providers_status() {
    let fake = FakeLlm::start().await;
    for _ in 0..3 {
        fake.push(Script::fail(503, "overloaded"));
    }
    fake.push(Script::answer(&["too late"]));
    let error = provider(config(&fake)).stream(request("hi")).await.err();
    assert_eq!(
        error,
        Some(LlmError::Status {
            status: 503,
            message: "overloaded".into()
        })
    );
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn a_429_waits_as_long_as_retry_after_says() {
    let fake = FakeLlm::start().await;
    fake.push(Script::fail(429, "slow down").retry_after(1));
    fake.push(Script::answer(&["ok"]));
    let items = answer(&provider(config(&fake)), "hi").await;
    assert_eq!(text_of(&items), "ok");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].arrived_at - requests[0].arrived_at;
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_millis(2500),
        "Retry-After: 1 means about a second, not the 20 ms backoff: {waited:?}"
    );
}

#[tokio::test]
async fn a_retry_after_longer_than_the_cap_is_capped() {
    let fake = FakeLlm::start().await;
    fake.push(Script::fail(429, "come back in an hour").retry_after(3600));
    fake.push(Script::answer(&["ok"]));
    let mut config = config(&fake);
    config.retry.max_delay = Duration::from_millis(200);
    let started = Instant::now();
    assert_eq!(text_of(&answer(&provider(config), "hi").await), "ok");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_400_is_not_retried_and_carries_the_providers_message() {
    let fake = FakeLlm::start().await;
    fake.push(Script::fail(
        400,
        "This model's maximum context length is 8192 tokens",
    ));
    fake.push(Script::fail_text(401, "invalid api key\n"));
    let provider = provider(config(&fake));
    let error = provider.stream(request("hi")).await.err();
    assert_eq!(
        error,
        Some(LlmError::Status {
            status: 400,
            message: "This model's maximum context length is 8192 tokens".into()
        })
    );
    assert_eq!(fake.requests().len(), 1, "a 400 is not retried");

    let error = provider.stream(request("hi")).await.err();
    assert_eq!(
        error,
        Some(LlmError::Status {
            status: 401,
            message: "invalid api key".into()
        })
    );
    assert_eq!(fake.requests().len(), 2, "a 401 is not retried either");
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection_at_once() {
    let fake = FakeLlm::start().await;
    // One stalled mid-answer, one busy streaming at a steady pace.
    fake.push(Script::stream().role().delta("thinking").stall());
    fake.push(Script::answer(&["a"; 200]).pace(20));
    let provider = provider(config(&fake));
    for index in 0..2 {
        let mut stream = provider.stream(request("long")).await.expect("accepted");
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert!(
            matches!(first, Ok(Some(Ok(StreamItem::Delta(_))))),
            "request {index}: {first:?}"
        );
        let dropped_at = Instant::now();
        drop(stream);
        let recorded = fake.wait_for_end(index).await;
        let closed_at = recorded
            .closed_early_at
            .unwrap_or_else(|| panic!("request {index} was not cancelled: {recorded:?}"));
        let after = closed_at.saturating_duration_since(dropped_at);
        assert!(
            after < Duration::from_millis(100),
            "request {index}: the server saw the close {after:?} after the drop"
        );
    }
}

#[tokio::test]
async fn silence_mid_answer_is_an_idle_timeout() {
    let fake = FakeLlm::start().await;
    fake.push(Script::stream().role().delta("hm").stall());
    let mut config = config(&fake);
    config.idle_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let items = answer(&provider(config), "hi").await;
    let took = started.elapsed();
    assert_eq!(text_of(&items), "hm");
    assert!(
        matches!(items.last(), Some(Err(LlmError::Transport(_)))),
        "{items:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let recorded = fake.wait_for_end(0).await;
    assert!(
        recorded.closed_early_at.is_some(),
        "the timed-out request was abandoned"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn no_response_at_all_is_a_first_byte_timeout_without_retry() {
    let fake = FakeLlm::start().await;
    fake.push(Script::answer(&["never"]).stall_before_headers());
    let mut config = config(&fake);
    config.first_byte_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let error = provider(config).stream(request("hi")).await.err();
    assert!(matches!(error, Some(LlmError::Transport(_))), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn headers_then_silence_is_a_first_byte_timeout() {
    let fake = FakeLlm::start().await;
    fake.push(Script::stream().stall());
    let mut config = config(&fake);
    config.first_byte_timeout = Duration::from_millis(300);
    config.idle_timeout = Duration::from_secs(30);
    let started = Instant::now();
    let items = answer(&provider(config), "hi").await;
    assert!(
        matches!(items.as_slice(), [Err(LlmError::Transport(_))]),
        "{items:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_request_body_and_headers_follow_the_openai_format() {
    let fake = FakeLlm::start().await;
    let mut config = config(&fake);
    config.api_key = Some("sk-test-123".into());
    let provider = provider(config);
    let mut assistant = ChatMessage::new("assistant", "");
    assistant.tool_calls.push(ToolCall {
        id: "call_1".into(),
        name: "lookup".into(),
        arguments: r#"{"q":"x"}"#.into(),
    });
    let mut result = ChatMessage::new("tool", "found x");
    result.tool_call_id = Some("call_1".into());
    let request = ChatRequest {
        model: "other-model".into(),
        messages: vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "find x"),
            assistant,
            result,
        ],
        tools: vec![ToolSpec {
            name: "lookup".into(),
            description: "Looks things up".into(),
            parameters:
                r#"{"type":"object","properties":{"q":{"type":"string"}},"required":["q"]}"#.into(),
        }],
        max_tokens: Some(256),
    };
    collect(provider.stream(request).await.expect("accepted")).await;
    let recorded = &fake.wait_for_requests(1).await[0];
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.header("authorization"), Some("Bearer sk-test-123"));
    assert!(
        recorded
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        recorded.headers
    );
    assert_eq!(
        recorded.body,
        json!({
            "model": "other-model",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "find x"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}
                ]},
                {"role": "tool", "content": "found x", "tool_call_id": "call_1"},
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "tools": [{"type": "function", "function": {
                "name": "lookup",
                "description": "Looks things up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            }}],
            "max_tokens": 256,
        })
    );
}

#[tokio::test]
async fn without_a_key_there_is_no_authorization_and_tools_are_omitted() {
    let fake = FakeLlm::start().await;
    let provider = provider(config(&fake));
    assert_eq!(provider.default_model(), "fake-model");
    let items = answer(&provider, "hi").await;
    assert_eq!(
        text_of(&items),
        "Hello from the fake model.",
        "the fake's default answer"
    );
    let recorded = &fake.wait_for_requests(1).await[0];
    assert_eq!(recorded.header("authorization"), None);
    assert_eq!(
        recorded.body["model"], "fake-model",
        "the default model fills an empty one"
    );
    assert!(recorded.body.get("tools").is_none(), "{}", recorded.body);
    assert!(
        recorded.body.get("max_tokens").is_none(),
        "{}",
        recorded.body
    );
    assert_eq!(recorded.messages().len(), 2);
}

#[tokio::test]
async fn a_server_that_ignores_stream_true_still_answers() {
    let fake = FakeLlm::start().await;
    fake.push(Script::json(
        200,
        json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "whole answer"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        }),
    ));
    let items = answer(&provider(config(&fake)), "hi").await;
    assert_eq!(
        items,
        vec![
            Ok(StreamItem::Delta("whole answer".into())),
            Ok(StreamItem::Usage {
                prompt_tokens: 5,
                completion_tokens: 2
            }),
            done("stop"),
        ]
    );
}

#[tokio::test]
async fn parallel_requests_each_get_their_own_script() {
    let fake = FakeLlm::start().await;
    let provider = std::sync::Arc::new(provider(config(&fake)));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { answer(&provider, "hi").await })
        })
        .collect();
    for task in tasks {
        let items = task.await.expect("the task completes");
        assert_eq!(text_of(&items), "Hello from the fake model.");
    }
    assert_eq!(fake.requests().len(), 8);
}
