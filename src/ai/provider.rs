//! The OpenAI-compatible streaming client: the one `LlmProvider` adapter, since DeepSeek, OpenAI,
//! Gemini's OpenAI endpoint, Ollama, vLLM and llama.cpp all speak `POST /chat/completions` with
//! `stream: true` and answer with Server-Sent Events.
//!
//! Failures before the first byte of the answer (429, 5xx, connection errors) are retried with
//! backoff inside `stream`; once the answer has started nothing is retried, because the caller
//! has already shown tokens to people. The returned stream owns the response body: dropping it
//! drops the body, which makes hyper close the connection at once (that is how cancel aborts the
//! upstream request and stops the billing).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cochat_actors::llm::{
    ChatMessage, ChatRequest, ChatStream, LlmError, LlmProvider, StreamItem, ToolCall, ToolSpec,
};
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

/// Retries of the initial request (429, 5xx, connection errors; never after the first token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retry).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each one after.
    pub initial_backoff: Duration,
    /// Longest wait between attempts, also the cap on a provider's `Retry-After`: a caller is
    /// waiting on the other end, so a provider asking for minutes gets our cap, then an error.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `failed + 1`, given the provider's `Retry-After` if any.
    pub fn delay(&self, failed: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(failed.saturating_sub(1)));
        retry_after.unwrap_or(backoff).min(self.max_delay)
    }
}

/// Where and how to reach one OpenAI-compatible endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// The preset it came from (`deepseek`, `ollama`, ...), for logs and the README table.
    pub provider: String,
    /// Up to and including the version, without the trailing slash: `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>` when present.
    pub api_key: Option<String>,
    /// Used when a request names no model.
    pub model: String,
    pub connect_timeout: Duration,
    /// Longest wait for the response headers, then again for the first bytes of the body (a big
    /// prompt on a local model can take a while before the first token).
    pub first_byte_timeout: Duration,
    /// Longest silence between two pieces of the body once it has started.
    pub idle_timeout: Duration,
    pub retry: RetryPolicy,
}

impl ProviderConfig {
    /// An endpoint with the default timeouts (10 s connect, 60 s first byte, 60 s idle) and retries.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            provider: "openai-compatible".into(),
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            api_key: None,
            model: model.into(),
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
        }
    }
}

// The key must never reach a log line.
impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("model", &self.model)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

/// Any endpoint speaking the OpenAI chat-completions streaming format.
pub struct OpenAiCompatible {
    client: reqwest::Client,
    config: ProviderConfig,
    endpoint: String,
}

impl fmt::Debug for OpenAiCompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiCompatible")
            .field("config", &self.config)
            .finish()
    }
}

impl OpenAiCompatible {
    /// Builds its own client (connection pool, rustls with ring, the connect timeout).
    pub fn new(config: ProviderConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("cochat/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| format!("building the HTTP client for the AI provider: {error}"))?;
        Ok(Self::with_client(client, config))
    }

    /// Shares a client built elsewhere (its own connect timeout then applies).
    pub fn with_client(client: reqwest::Client, config: ProviderConfig) -> Self {
        let endpoint = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        Self {
            client,
            config,
            endpoint,
        }
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// The JSON body of a request, in the OpenAI wire shape.
    pub fn request_body(&self, request: &ChatRequest) -> Result<Value, LlmError> {
        let model = if request.model.trim().is_empty() {
            self.config.model.as_str()
        } else {
            request.model.as_str()
        };
        let mut body = json!({
            "model": model,
            "messages": request.messages.iter().map(wire_message).collect::<Vec<_>>(),
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if !request.tools.is_empty() {
            let tools = request
                .tools
                .iter()
                .map(wire_tool)
                .collect::<Result<Vec<_>, _>>()?;
            body["tools"] = Value::Array(tools);
        }
        if let Some(max_tokens) = request.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        Ok(body)
    }

    /// Sends the request until it gets a 2xx, retrying what the policy allows.
    async fn open(&self, body: &Value) -> Result<reqwest::Response, LlmError> {
        let policy = &self.config.retry;
        let mut attempt = 1u32;
        loop {
            let (error, retryable, retry_after) = match self.send_once(body).await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = retry_after(&response);
                    let message = error_message(response, self.config.first_byte_timeout).await;
                    let retryable = status == 429 || (500..600).contains(&status);
                    (LlmError::Status { status, message }, retryable, retry_after)
                }
                Err(Attempt::Unreachable(message)) => (LlmError::Transport(message), true, None),
                Err(Attempt::Final(error)) => return Err(error),
            };
            if !retryable || attempt >= policy.max_attempts.max(1) {
                return Err(error);
            }
            let delay = policy.delay(attempt, retry_after);
            tracing::warn!(
                provider = %self.config.provider,
                attempt,
                ?delay,
                %error,
                "AI provider request failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn send_once(&self, body: &Value) -> Result<reqwest::Response, Attempt> {
        let mut request = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        match tokio::time::timeout(self.config.first_byte_timeout, request.send()).await {
            // Not retried: another full wait would leave the caller hanging for minutes.
            Err(_) => Err(Attempt::Final(LlmError::Transport(format!(
                "no response from {} within {:?}",
                self.endpoint, self.config.first_byte_timeout
            )))),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if error.is_builder() => Err(Attempt::Final(LlmError::Transport(
                format!("invalid provider URL {}: {error}", self.endpoint),
            ))),
            Ok(Err(error)) if error.is_timeout() => Err(Attempt::Unreachable(format!(
                "connecting to {}: timed out",
                self.endpoint
            ))),
            Ok(Err(error)) => Err(Attempt::Unreachable(format!(
                "{}: {}",
                self.endpoint,
                error_chain(&error)
            ))),
        }
    }
}

enum Attempt {
    /// Nothing came back (refused, reset, connect timeout): worth another try.
    Unreachable(String),
    Final(LlmError),
}

#[async_trait]
impl LlmProvider for OpenAiCompatible {
    async fn stream(&self, request: ChatRequest) -> Result<ChatStream, LlmError> {
        let body = self.request_body(&request)?;
        let response = self.open(&body).await?;
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/json"));
        let timeouts = Timeouts {
            first_byte: self.config.first_byte_timeout,
            idle: self.config.idle_timeout,
        };
        if is_json {
            // Some servers ignore `stream: true` and answer with one completion object.
            return Ok(whole_completion(response, timeouts));
        }
        Ok(sse_stream(Box::pin(response.bytes_stream()), timeouts))
    }

    fn default_model(&self) -> &str {
        &self.config.model
    }
}

fn wire_message(message: &ChatMessage) -> Value {
    let mut wire = json!({ "role": message.role, "content": message.content });
    if !message.tool_calls.is_empty() {
        // An assistant turn that only called tools has no text: the spec says null, not "".
        if message.content.is_empty() {
            wire["content"] = Value::Null;
        }
        wire["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": { "name": call.name, "arguments": call.arguments },
                })
            })
            .collect();
    }
    if let Some(id) = &message.tool_call_id {
        wire["tool_call_id"] = json!(id);
    }
    wire
}

fn wire_tool(tool: &ToolSpec) -> Result<Value, LlmError> {
    // Our own tool table is wrong if this fails; say which tool rather than send a broken schema.
    let parameters: Value = serde_json::from_str(&tool.parameters).map_err(|error| {
        LlmError::Malformed(format!(
            "the parameters of tool {:?} are not JSON: {error}",
            tool.name
        ))
    })?;
    Ok(json!({
        "type": "function",
        "function": { "name": tool.name, "description": tool.description, "parameters": parameters },
    }))
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and falls back to backoff).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// Longest error body read; providers put a sentence there, not a book.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Longest provider message passed on (it may end up in front of people).
const ERROR_MESSAGE_LIMIT: usize = 500;

/// The provider's own words from an error response: `{"error":{"message"}}` and its variants, or
/// the text itself.
async fn error_message(response: reqwest::Response, wait: Duration) -> String {
    let reason = response
        .status()
        .canonical_reason()
        .unwrap_or("error")
        .to_owned();
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    let read = tokio::time::timeout(wait, async {
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= ERROR_BODY_LIMIT {
                break;
            }
        }
    });
    let _ = read.await;
    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_LIMIT)]);
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|value| json_error_message(&value))
        .unwrap_or_else(|| text.trim().to_owned());
    if message.is_empty() {
        reason
    } else {
        truncate(&message, ERROR_MESSAGE_LIMIT)
    }
}

/// `{"error":{"message":..}}` (OpenAI, DeepSeek, vLLM), `{"error":".."}` (Ollama),
/// `[{"error":{..}}]` (Google), `{"message":..}` / `{"detail":..}` (assorted proxies).
fn json_error_message(value: &Value) -> Option<String> {
    if let Some(first) = value.as_array().and_then(|items| items.first()) {
        return json_error_message(first);
    }
    let error = value.get("error");
    let text = error
        .and_then(|e| e.get("message"))
        .or_else(|| error.filter(|e| e.is_string()))
        .or_else(|| value.get("message"))
        .or_else(|| value.get("detail"))?;
    match text {
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The error and its causes on one line: reqwest's own message is often just "error sending
/// request", with the useful part ("connection refused") in the source chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Clone, Copy, Debug)]
struct Timeouts {
    first_byte: Duration,
    idle: Duration,
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// State of one streamed answer. Owning `body` is what keeps the connection open; it is replaced
/// by an empty stream as soon as the answer is over or broken, so the connection closes then too.
struct Reader {
    body: ByteStream,
    lines: SseLines,
    chunks: ChunkDecoder,
    out: VecDeque<Result<StreamItem, LlmError>>,
    started: bool,
    over: bool,
    timeouts: Timeouts,
}

impl Reader {
    fn end(&mut self, error: Option<LlmError>) {
        if let Some(error) = error {
            self.out.push_back(Err(error));
        }
        self.over = true;
        self.body = Box::pin(futures_util::stream::empty());
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.lines.push(bytes);
        loop {
            match self.lines.next_event() {
                Ok(None) => return,
                Ok(Some(data)) => {
                    if self.process(&data) {
                        return;
                    }
                }
                Err(error) => return self.end(Some(error)),
            }
        }
    }

    /// Handles one event's data; true when the answer is over.
    fn process(&mut self, data: &str) -> bool {
        match self.chunks.data(data, &mut self.out) {
            Ok(false) => false,
            Ok(true) => {
                self.end(None);
                true
            }
            Err(error) => {
                self.end(Some(error));
                true
            }
        }
    }

    /// The body ended without an error: a last event without its blank line still counts.
    fn clean_end(&mut self) {
        match self.lines.finish() {
            Err(error) => return self.end(Some(error)),
            Ok(Some(data)) => {
                if self.process(&data) {
                    return;
                }
            }
            Ok(None) => {}
        }
        let error = self.chunks.end(&mut self.out).err();
        self.end(error);
    }
}

fn sse_stream(body: ByteStream, timeouts: Timeouts) -> ChatStream {
    let reader = Reader {
        body,
        lines: SseLines::default(),
        chunks: ChunkDecoder::default(),
        out: VecDeque::new(),
        started: false,
        over: false,
        timeouts,
    };
    Box::pin(futures_util::stream::unfold(
        reader,
        |mut reader| async move {
            loop {
                if let Some(item) = reader.out.pop_front() {
                    return Some((item, reader));
                }
                if reader.over {
                    return None;
                }
                let wait = if reader.started {
                    reader.timeouts.idle
                } else {
                    reader.timeouts.first_byte
                };
                match tokio::time::timeout(wait, reader.body.next()).await {
                    Err(_) => {
                        let what = if reader.started {
                            "silent"
                        } else {
                            "sent nothing"
                        };
                        reader.end(Some(LlmError::Transport(format!(
                            "the provider {what} for {wait:?} mid-answer"
                        ))));
                    }
                    Ok(None) => reader.clean_end(),
                    Ok(Some(Err(error))) => reader.end(Some(LlmError::Transport(format!(
                        "the answer was cut off: {}",
                        error_chain(&error)
                    )))),
                    Ok(Some(Ok(bytes))) => {
                        reader.started = true;
                        reader.feed(&bytes);
                    }
                }
            }
        },
    ))
}

/// Longest non-streamed completion read, and longest SSE line buffered without a newline.
const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// A server that ignored `stream: true`: the one completion object, turned into the same items.
fn whole_completion(response: reqwest::Response, timeouts: Timeouts) -> ChatStream {
    let items = async move {
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        let mut wait = timeouts.first_byte;
        loop {
            match tokio::time::timeout(wait, chunks.next()).await {
                Err(_) => {
                    return vec![Err(LlmError::Transport(format!(
                        "the provider was silent for {wait:?} mid-answer"
                    )))]
                }
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    return vec![Err(LlmError::Transport(format!(
                        "the answer was cut off: {}",
                        error_chain(&error)
                    )))]
                }
                Ok(Some(Ok(bytes))) => {
                    body.extend_from_slice(&bytes);
                    if body.len() > BODY_LIMIT {
                        return vec![Err(LlmError::Malformed(
                            "the completion is too large".into(),
                        ))];
                    }
                    wait = timeouts.idle;
                }
            }
        }
        completion_items(&body)
    };
    Box::pin(futures_util::stream::once(items).flat_map(futures_util::stream::iter))
}

fn completion_items(body: &[u8]) -> Vec<Result<StreamItem, LlmError>> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => {
            return vec![Err(LlmError::Malformed(format!(
                "the completion is not JSON: {error}"
            )))]
        }
    };
    let Some(choice) = value
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|choices| first_choice(choices))
    else {
        return vec![Err(LlmError::Malformed(
            "a completion without choices".into(),
        ))];
    };
    let mut items = Vec::new();
    let message = choice.get("message").unwrap_or(&Value::Null);
    if let Some(text) = message.get("content").and_then(Value::as_str) {
        if !text.is_empty() {
            items.push(Ok(StreamItem::Delta(text.to_owned())));
        }
    }
    let mut calls = ToolCalls::default();
    if let Some(fragments) = message.get("tool_calls").and_then(Value::as_array) {
        calls.merge(fragments);
    }
    calls.flush(&mut items);
    if let Some(usage) = parse_usage(value.get("usage")) {
        items.push(Ok(usage));
    }
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    items.push(Ok(StreamItem::Done { finish_reason }));
    items
}

/// Splits a byte stream into SSE events. Bytes arrive cut anywhere (mid-line, mid-character), so
/// a line is only decoded once its newline is in; `\r\n` and `\n` both end a line.
#[derive(Default)]
struct SseLines {
    buf: Vec<u8>,
    /// How far `buf` is known to hold no newline (so long lines are not rescanned per chunk).
    scanned: usize,
    /// The `data:` lines of the event being read, joined with `\n` as the spec says.
    data: Option<String>,
}

impl SseLines {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The data of the next complete event, if one is in.
    fn next_event(&mut self) -> Result<Option<String>, LlmError> {
        loop {
            let Some(offset) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > BODY_LIMIT {
                    return Err(LlmError::Malformed("an SSE line longer than 8 MiB".into()));
                }
                return Ok(None);
            };
            let end = self.scanned + offset;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            self.scanned = 0;
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(data) = self.line(line)? {
                return Ok(Some(data));
            }
        }
    }

    /// At the end of the body: the last line even without its newline, and a pending event.
    fn finish(&mut self) -> Result<Option<String>, LlmError> {
        let mut rest = std::mem::take(&mut self.buf);
        self.scanned = 0;
        if rest.last() == Some(&b'\r') {
            rest.pop();
        }
        if !rest.is_empty() {
            if let Some(data) = self.line(rest)? {
                return Ok(Some(data));
            }
        }
        Ok(self.data.take())
    }

    fn line(&mut self, line: Vec<u8>) -> Result<Option<String>, LlmError> {
        let line = String::from_utf8(line)
            .map_err(|_| LlmError::Malformed("an SSE line that is not UTF-8".into()))?;
        if line.is_empty() {
            return Ok(self.data.take());
        }
        if line.starts_with(':') {
            return Ok(None); // a comment: keep-alives look like this
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        // `event:`, `id:` and `retry:` carry nothing the OpenAI format uses.
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        Ok(None)
    }
}

/// Turns the JSON chunks of one answer into items, remembering what spans chunks.
#[derive(Default)]
struct ChunkDecoder {
    calls: ToolCalls,
    finish_reason: Option<String>,
    /// Held until the end so usage always comes after the text and the tool calls; the last one
    /// wins (servers that report usage on every chunk report running totals).
    usage: Option<StreamItem>,
}

impl ChunkDecoder {
    /// One event's data; `Ok(true)` once the answer is complete (`Done` pushed).
    fn data(
        &mut self,
        data: &str,
        out: &mut VecDeque<Result<StreamItem, LlmError>>,
    ) -> Result<bool, LlmError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.finish(out);
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false); // `data:` alone, used by some servers as a keep-alive
        }
        let chunk: Value = serde_json::from_str(data).map_err(|error| {
            LlmError::Malformed(format!(
                "a chunk that is not JSON ({error}): {}",
                truncate(data, 120)
            ))
        })?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            let message =
                json_error_message(&json!({ "error": error })).unwrap_or_else(|| error.to_string());
            return Err(LlmError::Malformed(format!(
                "the provider reported an error mid-answer: {}",
                truncate(&message, ERROR_MESSAGE_LIMIT)
            )));
        }
        let usage = parse_usage(chunk.get("usage"));
        let has_usage = usage.is_some();
        if usage.is_some() {
            self.usage = usage;
        }
        match chunk.get("choices") {
            Some(Value::Array(choices)) => {
                if let Some(choice) = first_choice(choices) {
                    self.choice(choice, out);
                }
            }
            None | Some(Value::Null) if has_usage => {}
            _ => {
                return Err(LlmError::Malformed(format!(
                    "a chunk without choices: {}",
                    truncate(data, 120)
                )))
            }
        }
        Ok(false)
    }

    fn choice(&mut self, choice: &Value, out: &mut VecDeque<Result<StreamItem, LlmError>>) {
        if let Some(delta) = choice.get("delta") {
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                if !text.is_empty() {
                    out.push_back(Ok(StreamItem::Delta(text.to_owned())));
                }
            }
            if let Some(fragments) = delta.get("tool_calls").and_then(Value::as_array) {
                self.calls.merge(fragments);
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
            // Some servers say "stop" even after tool calls: any finish completes them.
            self.calls.flush(out);
        }
    }

    fn finish(&mut self, out: &mut VecDeque<Result<StreamItem, LlmError>>) {
        self.calls.flush(out);
        if let Some(usage) = self.usage.take() {
            out.push_back(Ok(usage));
        }
        out.push_back(Ok(StreamItem::Done {
            finish_reason: self.finish_reason.take(),
        }));
    }

    /// The body ended cleanly without `[DONE]`: complete if the choice had finished, else cut.
    fn end(&mut self, out: &mut VecDeque<Result<StreamItem, LlmError>>) -> Result<(), LlmError> {
        if self.finish_reason.is_none() {
            return Err(LlmError::Transport(
                "the stream ended before the answer finished".into(),
            ));
        }
        self.finish(out);
        Ok(())
    }
}

/// Only the first choice matters (we never ask for `n > 1`); by its `index` when servers give one.
fn first_choice(choices: &[Value]) -> Option<&Value> {
    choices
        .iter()
        .find(|choice| choice.get("index").and_then(Value::as_u64) == Some(0))
        .or_else(|| choices.first())
}

fn parse_usage(usage: Option<&Value>) -> Option<StreamItem> {
    let usage = usage.filter(|u| u.is_object())?;
    let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
    Some(StreamItem::Usage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
    })
}

/// Tool calls being assembled: the first fragment of a call has its id and name, the later ones
/// append to `arguments`; fragments say which call they belong to by `index`.
#[derive(Default)]
struct ToolCalls {
    partial: BTreeMap<u64, ToolCall>,
    /// The call the last fragment without an `index` went to.
    last: Option<u64>,
}

impl ToolCalls {
    fn merge(&mut self, fragments: &[Value]) {
        for fragment in fragments {
            let id = fragment
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty());
            let index = match fragment.get("index").and_then(Value::as_u64) {
                Some(index) => index,
                // Servers that leave out `index`: a new id is a new call, no id continues the last.
                None => match id {
                    Some(id) => self
                        .partial
                        .iter()
                        .find(|(_, call)| call.id == id)
                        .map(|(index, _)| *index)
                        .unwrap_or_else(|| self.partial.keys().next_back().map_or(0, |i| i + 1)),
                    None => self.last.unwrap_or(0),
                },
            };
            self.last = Some(index);
            let call = self.partial.entry(index).or_insert_with(|| ToolCall {
                id: String::new(),
                name: String::new(),
                arguments: String::new(),
            });
            if let (Some(id), true) = (id, call.id.is_empty()) {
                call.id = id.to_owned();
            }
            let function = fragment.get("function").unwrap_or(&Value::Null);
            if let Some(name) = function.get("name").and_then(Value::as_str) {
                if call.name.is_empty() {
                    call.name = name.to_owned();
                }
            }
            match function.get("arguments") {
                Some(Value::String(part)) => call.arguments.push_str(part),
                Some(Value::Null) | None => {}
                // A few servers send the arguments as an object rather than JSON text.
                Some(other) => call.arguments.push_str(&other.to_string()),
            }
        }
    }

    fn flush(&mut self, out: &mut impl Extend<Result<StreamItem, LlmError>>) {
        self.last = None;
        let calls = std::mem::take(&mut self.partial);
        out.extend(calls.into_iter().map(|(index, mut call)| {
            if call.id.is_empty() {
                // Some local servers give no ids; the tool result still has to name its call.
                call.id = format!("call_{index}");
            }
            Ok(StreamItem::ToolCall(call))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the parser over `bytes` cut at the given offsets, as the network might deliver them.
    fn parse(bytes: &[u8], cuts: &[usize]) -> Vec<Result<StreamItem, LlmError>> {
        let mut reader = Reader {
            body: Box::pin(futures_util::stream::empty()),
            lines: SseLines::default(),
            chunks: ChunkDecoder::default(),
            out: VecDeque::new(),
            started: true,
            over: false,
            timeouts: Timeouts {
                first_byte: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
        };
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            if reader.over {
                break;
            }
            reader.feed(&bytes[start..cut]);
            start = cut;
        }
        if !reader.over {
            reader.clean_end();
        }
        reader.out.into_iter().collect()
    }

    const ANSWER: &str = concat!(
        ": keep-alive\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Grüße, \"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"世界 🌍\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Vec<Result<StreamItem, LlmError>> {
        vec![
            Ok(StreamItem::Delta("Grüße, ".into())),
            Ok(StreamItem::Delta("世界 🌍".into())),
            Ok(StreamItem::Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
            }),
            Ok(StreamItem::Done {
                finish_reason: Some("stop".into()),
            }),
        ]
    }

    #[test]
    fn an_answer_parses_the_same_whatever_byte_it_is_cut_at() {
        let bytes = ANSWER.as_bytes();
        assert_eq!(parse(bytes, &[]), expected());
        for cut in 1..bytes.len() {
            assert_eq!(parse(bytes, &[cut]), expected(), "cut at byte {cut}");
        }
        let every_byte: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(parse(bytes, &every_byte), expected());
    }

    #[test]
    fn tool_calls_are_assembled_from_fragments_in_index_order() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"b\",\"type\":\"function\",\"function\":{\"name\":\"two\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"function\":{\"name\":\"one\",\"arguments\":\"{\\\"x\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"{}\"}},{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let call = |id: &str, name: &str, arguments: &str| {
            Ok(StreamItem::ToolCall(ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: arguments.into(),
            }))
        };
        assert_eq!(
            parse(stream.as_bytes(), &[]),
            vec![
                call("a", "one", "{\"x\":1}"),
                call("b", "two", "{}"),
                Ok(StreamItem::Done {
                    finish_reason: Some("tool_calls".into())
                }),
            ]
        );
    }

    #[test]
    fn fragments_without_index_or_id_still_make_calls() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"q\\\":\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":{\"ignored\":true}}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        );
        let items = parse(stream.as_bytes(), &[]);
        assert_eq!(
            items,
            vec![
                Ok(StreamItem::ToolCall(ToolCall {
                    id: "call_0".into(),
                    name: "f".into(),
                    arguments: "{\"q\":{\"ignored\":true}".into(),
                })),
                Ok(StreamItem::Done {
                    finish_reason: Some("stop".into())
                }),
            ],
            "a clean end after a finish counts as done, even without [DONE]"
        );
    }

    #[test]
    fn bad_chunks_end_the_stream_with_malformed() {
        for bad in [
            "data: {not json\n\n",
            "data: {\"id\":\"x\"}\n\n",
            "data: {\"choices\":\"no\"}\n\n",
            "data: {\"error\":{\"message\":\"overloaded\"}}\n\n",
        ] {
            let stream = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}\n\n{bad}data: {{\"choices\":[{{\"delta\":{{\"content\":\"b\"}}}}]}}\n\n"
            );
            let items = parse(stream.as_bytes(), &[]);
            assert_eq!(items.len(), 2, "{bad}: {items:?}");
            assert_eq!(items[0], Ok(StreamItem::Delta("a".into())));
            assert!(
                matches!(items[1], Err(LlmError::Malformed(_))),
                "{bad}: {items:?}"
            );
        }
        let items = parse(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\"}}]}\n\n",
            &[],
        );
        assert!(matches!(items[0], Err(LlmError::Malformed(_))), "{items:?}");
    }

    #[test]
    fn an_end_without_a_finish_is_a_cut() {
        let items = parse(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            &[],
        );
        assert_eq!(items[0], Ok(StreamItem::Delta("a".into())));
        assert!(matches!(items[1], Err(LlmError::Transport(_))), "{items:?}");
    }

    #[test]
    fn multi_line_data_and_unknown_fields_follow_the_sse_rules() {
        let stream = concat!(
            "event: message\nid: 1\nretry: 10\n",
            "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"hi\"}}]}\n\n",
            "data:{\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            "data: [DONE]",
        );
        assert_eq!(
            parse(stream.as_bytes(), &[]),
            vec![
                Ok(StreamItem::Delta("hi".into())),
                Ok(StreamItem::Done {
                    finish_reason: Some("length".into())
                }),
            ]
        );
    }

    #[test]
    fn error_bodies_give_the_providers_message() {
        let cases = [
            (
                json!({"error": {"message": "bad key", "type": "auth"}}),
                "bad key",
            ),
            (json!({"error": "model not found"}), "model not found"),
            (
                json!([{"error": {"code": 429, "message": "quota"}}]),
                "quota",
            ),
            (json!({"detail": "nope"}), "nope"),
        ];
        for (body, message) in cases {
            assert_eq!(json_error_message(&body).as_deref(), Some(message));
        }
        assert_eq!(json_error_message(&json!({"other": 1})), None);
    }

    #[test]
    fn backoff_doubles_and_retry_after_is_capped() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(1, None), Duration::from_millis(200));
        assert_eq!(policy.delay(2, None), Duration::from_millis(400));
        assert_eq!(
            policy.delay(2, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(3600))),
            policy.max_delay
        );
        assert_eq!(policy.delay(40, None), policy.max_delay);
    }

    #[test]
    fn the_request_body_has_the_openai_shape() {
        let provider = OpenAiCompatible::new(ProviderConfig::new("http://h/v1/", "m0"))
            .expect("a plain client builds");
        assert_eq!(provider.endpoint, "http://h/v1/chat/completions");
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls.push(ToolCall {
            id: "c1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        });
        let mut result = ChatMessage::new("tool", "42");
        result.tool_call_id = Some("c1".into());
        let request = ChatRequest {
            model: String::new(),
            messages: vec![ChatMessage::new("user", "hi"), assistant, result],
            tools: vec![ToolSpec {
                name: "f".into(),
                description: "does f".into(),
                parameters: r#"{"type":"object"}"#.into(),
            }],
            max_tokens: Some(9),
        };
        let body = provider.request_body(&request).expect("valid request");
        assert_eq!(
            body,
            json!({
                "model": "m0",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ]},
                    {"role": "tool", "content": "42", "tool_call_id": "c1"},
                ],
                "stream": true,
                "stream_options": {"include_usage": true},
                "tools": [{"type": "function", "function": {
                    "name": "f", "description": "does f", "parameters": {"type": "object"}
                }}],
                "max_tokens": 9,
            })
        );
        let mut broken = request.clone();
        broken.tools[0].parameters = "{".into();
        assert!(matches!(
            provider.request_body(&broken),
            Err(LlmError::Malformed(_))
        ));
        let mut plain = request;
        plain.tools.clear();
        plain.max_tokens = None;
        let body = provider.request_body(&plain).expect("valid request");
        assert!(body.get("tools").is_none() && body.get("max_tokens").is_none());
    }

    #[test]
    fn the_key_stays_out_of_debug_output() {
        let mut config = ProviderConfig::new("http://h/v1", "m");
        config.api_key = Some("sk-secret".into());
        assert!(!format!("{config:?}").contains("sk-secret"));
    }
}
