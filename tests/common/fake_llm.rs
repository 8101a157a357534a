//! A real HTTP server on 127.0.0.1 that speaks the OpenAI streaming format, for every AI test.
//! It runs on its own thread with its own runtime, so its timing (pacing, stalls, noticing that a
//! client hung up) does not depend on what the test's runtime is busy with.
//!
//! Each `POST .../chat/completions` takes the next queued `Script` (or the default one: a short
//! answer) and is recorded: body, headers, arrival, and whether the client closed the connection
//! before the scripted end (`closed_early_at`), which is how tests see that cancel aborted the
//! upstream request. HTTP/1.1 is written by hand (chunked bodies, `Connection: close`) so a script
//! controls every byte: where the body is cut, where a stream is split, what is malformed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// With the query string, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The parsed JSON body (`Value::Null` if it was not JSON; see `raw_body`).
    pub body: Value,
    pub raw_body: String,
    pub arrived_at: Instant,
    /// The whole scripted response was written (including a scripted cut).
    pub finished_at: Option<Instant>,
    /// The client closed the connection before the scripted end.
    pub closed_early_at: Option<Instant>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The `messages` of the body, as sent.
    pub fn messages(&self) -> Vec<Value> {
        self.body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The response is over one way or the other.
    pub fn is_over(&self) -> bool {
        self.finished_at.is_some() || self.closed_early_at.is_some()
    }
}

#[derive(Clone, Debug)]
enum Part {
    /// One SSE event: `data: <payload>` and a blank line.
    Event(String),
    /// Bytes exactly as given.
    Raw(Vec<u8>),
    Pause(Duration),
    /// No more bytes; the connection stays open until the client goes away.
    Stall,
    /// Close the connection without the chunked terminator: a cut mid-answer.
    Cut,
}

#[derive(Clone, Debug)]
enum Split {
    /// Each event in one HTTP chunk, as real servers do.
    Whole,
    /// Each event in pieces of this many bytes.
    Every(usize),
    /// Each event cut inside `data:`, inside every multibyte character, between `\r` and `\n`.
    Awkward,
}

#[derive(Clone, Debug)]
enum Body {
    /// Server-Sent Events in a chunked body.
    Stream(Vec<Part>),
    /// A complete body with a `Content-Length`.
    Fixed {
        content_type: String,
        bytes: Vec<u8>,
    },
    /// Close the connection without answering at all.
    HangUp,
}

/// A scripted response. Start from `answer`, `tool_call`, `stream`, `fail`..., then chain.
#[derive(Clone, Debug)]
pub struct Script {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
    pace: Duration,
    split: Split,
    crlf: bool,
    /// Silence before the status line (`Duration::MAX`: forever).
    head_delay: Duration,
}

impl Script {
    /// A 200 event stream with nothing in it yet.
    pub fn stream() -> Script {
        Script {
            status: 200,
            headers: Vec::new(),
            body: Body::Stream(Vec::new()),
            pace: Duration::ZERO,
            split: Split::Whole,
            crlf: false,
            head_delay: Duration::ZERO,
        }
    }

    /// A plain answer: the role chunk, one chunk per delta, `finish_reason: "stop"`, `[DONE]`.
    pub fn answer(deltas: &[&str]) -> Script {
        Script::stream().role().deltas(deltas).finish("stop").done()
    }

    /// One tool call streamed as OpenAI does: id and name first, then the arguments in three
    /// fragments, `finish_reason: "tool_calls"`, `[DONE]`.
    pub fn tool_call(id: &str, name: &str, arguments: &str) -> Script {
        let chars: Vec<char> = arguments.chars().collect();
        let third = chars.len().div_ceil(3).max(1);
        let fragments: Vec<String> = chars.chunks(third).map(|c| c.iter().collect()).collect();
        let fragments: Vec<&str> = fragments.iter().map(String::as_str).collect();
        Script::stream()
            .role()
            .tool_call_fragments(0, id, name, &fragments)
            .finish("tool_calls")
            .done()
    }

    /// An error response with the OpenAI error body `{"error":{"message","type","code"}}`.
    pub fn fail(status: u16, message: &str) -> Script {
        let body = json!({"error": {"message": message, "type": "fake_error", "code": status}});
        Script::json(status, body)
    }

    /// An error response with a plain-text body.
    pub fn fail_text(status: u16, text: &str) -> Script {
        Script {
            status,
            body: Body::Fixed {
                content_type: "text/plain".into(),
                bytes: text.as_bytes().to_vec(),
            },
            ..Script::stream()
        }
    }

    /// A complete JSON response (e.g. a server that ignores `stream: true`).
    pub fn json(status: u16, body: Value) -> Script {
        Script {
            status,
            body: Body::Fixed {
                content_type: "application/json".into(),
                bytes: body.to_string().into_bytes(),
            },
            ..Script::stream()
        }
    }

    /// Reads the request, then closes the connection without a response.
    pub fn hang_up() -> Script {
        Script {
            body: Body::HangUp,
            ..Script::stream()
        }
    }

    fn part(mut self, part: Part) -> Self {
        match &mut self.body {
            Body::Stream(parts) => parts.push(part),
            _ => panic!("only a streamed script has parts (start from Script::stream or answer)"),
        }
        self
    }

    fn chunk(self, choice: Value) -> Self {
        let payload = json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake-model",
            "choices": [choice],
        });
        self.data(&payload.to_string())
    }

    /// An event with this data, verbatim (malformed JSON, provider oddities...).
    pub fn data(self, payload: &str) -> Self {
        self.part(Part::Event(payload.to_owned()))
    }

    /// The first chunk OpenAI sends: `{"role":"assistant","content":""}`.
    pub fn role(self) -> Self {
        self.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))
    }

    pub fn delta(self, text: &str) -> Self {
        self.chunk(json!({"index": 0, "delta": {"content": text}, "finish_reason": null}))
    }

    pub fn deltas(self, texts: &[&str]) -> Self {
        texts.iter().fold(self, |script, text| script.delta(text))
    }

    /// Call number `index`: the id and name in the first chunk, then one chunk per fragment.
    pub fn tool_call_fragments(self, index: u32, id: &str, name: &str, fragments: &[&str]) -> Self {
        let first = self.chunk(json!({"index": 0, "delta": {"tool_calls": [{
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }]}, "finish_reason": null}));
        fragments.iter().fold(first, |script, fragment| {
            script.chunk(json!({"index": 0, "delta": {"tool_calls": [{
                "index": index, "function": {"arguments": fragment},
            }]}, "finish_reason": null}))
        })
    }

    pub fn finish(self, reason: &str) -> Self {
        self.chunk(json!({"index": 0, "delta": {}, "finish_reason": reason}))
    }

    /// The usage-only chunk OpenAI sends last when `include_usage` is on.
    pub fn usage(self, prompt_tokens: u64, completion_tokens: u64) -> Self {
        let payload = json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        });
        self.data(&payload.to_string())
    }

    pub fn done(self) -> Self {
        self.data("[DONE]")
    }

    /// A chunk that is not JSON.
    pub fn malformed(self) -> Self {
        self.data(r#"{"choices":[{"delta":{"content":"unterminated"#)
    }

    /// Bytes as given, e.g. `: keep-alive\n\n`.
    pub fn raw(self, bytes: impl Into<Vec<u8>>) -> Self {
        self.part(Part::Raw(bytes.into()))
    }

    pub fn pause(self, ms: u64) -> Self {
        self.part(Part::Pause(Duration::from_millis(ms)))
    }

    /// Nothing more, connection held open until the client leaves.
    pub fn stall(self) -> Self {
        self.part(Part::Stall)
    }

    /// Close the connection here, without ending the chunked body.
    pub fn cut(self) -> Self {
        self.part(Part::Cut)
    }

    /// Wait this long between events.
    pub fn pace(mut self, ms: u64) -> Self {
        self.pace = Duration::from_millis(ms);
        self
    }

    /// Send every event in pieces of `bytes` bytes (each its own HTTP chunk).
    pub fn split_every(mut self, bytes: usize) -> Self {
        self.split = Split::Every(bytes.max(1));
        self
    }

    /// Cut every event inside `data:`, inside each multibyte character and inside `\r\n`.
    pub fn split_awkwardly(mut self) -> Self {
        self.split = Split::Awkward;
        self
    }

    /// End lines with `\r\n` instead of `\n`.
    pub fn crlf(mut self) -> Self {
        self.crlf = true;
        self
    }

    /// Send nothing, not even the status line, for this long.
    pub fn delay_headers(mut self, ms: u64) -> Self {
        self.head_delay = Duration::from_millis(ms);
        self
    }

    /// Send nothing at all until the client leaves.
    pub fn stall_before_headers(mut self) -> Self {
        self.head_delay = Duration::MAX;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn retry_after(self, seconds: u64) -> Self {
        self.header("retry-after", &seconds.to_string())
    }

    fn event_bytes(&self, payload: &str) -> Vec<u8> {
        let newline = if self.crlf { "\r\n" } else { "\n" };
        format!("data: {payload}{newline}{newline}").into_bytes()
    }

    /// The pieces one event or raw part is written in.
    fn pieces(&self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let cuts: Vec<usize> = match self.split {
            Split::Whole => Vec::new(),
            Split::Every(n) => (n..bytes.len()).step_by(n).collect(),
            Split::Awkward => (1..bytes.len())
                .filter(|&i| {
                    i == 2 // "da|ta:"
                        || (bytes[i] & 0xC0 == 0x80 && bytes[i - 1] >= 0xC0) // mid-character
                        || (bytes[i - 1] == b'\r' && bytes[i] == b'\n')
                })
                .collect(),
        };
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain(std::iter::once(bytes.len())) {
            if cut > start {
                pieces.push(bytes[start..cut].to_vec());
                start = cut;
            }
        }
        pieces
    }
}

#[derive(Default)]
struct Shared {
    scripts: Mutex<VecDeque<Script>>,
    default: Mutex<Option<Script>>,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// A poisoned lock only means another test thread panicked; the data is still what it was.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The running fake. Dropping it stops the server and closes every connection.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeLlm {
    pub async fn start() -> FakeLlm {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0 on loopback works");
        listener
            .set_nonblocking(true)
            .expect("a fresh listener can be made non-blocking");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-llm".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime builds");
                runtime.block_on(async move {
                    let listener =
                        TcpListener::from_std(listener).expect("the listener is non-blocking");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept(listener, state) => {}
                    }
                });
                // Dropping the runtime drops every connection task, closing its socket.
            })
            .expect("spawning the fake LLM thread works");
        FakeLlm {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>/v1`, as `AI_BASE_URL` would be.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a response; requests take them in order.
    pub fn push(&self, script: Script) -> &Self {
        lock(&self.shared.scripts).push_back(script);
        self
    }

    /// The response when the queue is empty (initially `Script::answer(&["Hello", " from", " the fake model."])`).
    pub fn set_default(&self, script: Script) {
        *lock(&self.shared.default) = Some(script);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Waits (up to 10 s, then panics) until `n` requests have arrived; returns them all.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<RecordedRequest> {
        self.wait_until(&format!("{n} requests"), |requests| requests.len() >= n)
            .await
    }

    /// Waits (up to 10 s) until request `index` is over: finished or closed early by the client.
    pub async fn wait_for_end(&self, index: usize) -> RecordedRequest {
        let requests = self
            .wait_until(&format!("request {index} to end"), |requests| {
                requests.get(index).is_some_and(RecordedRequest::is_over)
            })
            .await;
        requests[index].clone()
    }

    /// Waits (up to 10 s, then panics naming `what`) until `done(requests)` holds.
    pub async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[RecordedRequest]) -> bool,
    ) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "the fake LLM waited 10 s for {what}; it has {requests:#?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, shared.clone()));
            }
            // Out of file descriptors and the like: let the test see failures, not a spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

/// Reads one request (head, then a `Content-Length` body); `None` if the client left first.
async fn read_request(reader: &mut tokio::net::tcp::OwnedReadHalf) -> Option<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > 1024 * 1024 {
            return None;
        }
        let n = reader.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = reader.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some((
        Head {
            method,
            path,
            headers,
        },
        body,
    ))
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let Some((head, body)) = read_request(&mut reader).await else {
        return;
    };
    let index = {
        let mut requests = lock(&shared.requests);
        requests.push(RecordedRequest {
            method: head.method.clone(),
            path: head.path.clone(),
            headers: head.headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            raw_body: String::from_utf8_lossy(&body).into_owned(),
            arrived_at: Instant::now(),
            finished_at: None,
            closed_early_at: None,
        });
        requests.len() - 1
    };
    let script = if head.method == "POST" && head.path.ends_with("/chat/completions") {
        let queued = lock(&shared.scripts).pop_front();
        queued.unwrap_or_else(|| {
            lock(&shared.default)
                .clone()
                .unwrap_or_else(|| Script::answer(&["Hello", " from", " the fake model."]))
        })
    } else {
        Script::fail(404, &format!("no route for {} {}", head.method, head.path))
    };

    // The client sends nothing after its request (we answer `Connection: close`), so a read
    // that ends means it closed the connection: that is the moment cancel took effect.
    let client_left = async {
        let mut scratch = [0u8; 1024];
        loop {
            match reader.read(&mut scratch).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    let outcome = tokio::select! {
        biased;
        at = client_left => Err(at),
        written = respond(&mut writer, &script) => written,
    };
    let now = Instant::now();
    {
        let mut requests = lock(&shared.requests);
        let request = &mut requests[index];
        match outcome {
            Ok(()) => request.finished_at = Some(now),
            Err(at) => request.closed_early_at = Some(at),
        }
    }
    let _ = writer.shutdown().await;
}

/// Writes the scripted response; `Err(when)` if the client went away first.
async fn respond(writer: &mut OwnedWriteHalf, script: &Script) -> Result<(), Instant> {
    let gone = |_| Instant::now();
    if script.head_delay == Duration::MAX {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(script.head_delay).await;
    let mut head = format!("HTTP/1.1 {} {}\r\n", script.status, reason(script.status));
    for (name, value) in &script.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("connection: close\r\n");
    match &script.body {
        Body::HangUp => Ok(()),
        Body::Fixed {
            content_type,
            bytes,
        } => {
            head.push_str(&format!(
                "content-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                bytes.len()
            ));
            let mut all = head.into_bytes();
            all.extend_from_slice(bytes);
            writer.write_all(&all).await.map_err(gone)?;
            writer.flush().await.map_err(gone)?;
            Ok(())
        }
        Body::Stream(parts) => {
            head.push_str(
                "content-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
            );
            writer.write_all(head.as_bytes()).await.map_err(gone)?;
            writer.flush().await.map_err(gone)?;
            let mut sent_bytes = false;
            for part in parts {
                let bytes = match part {
                    Part::Event(payload) => script.event_bytes(payload),
                    Part::Raw(bytes) => bytes.clone(),
                    Part::Pause(pause) => {
                        tokio::time::sleep(*pause).await;
                        continue;
                    }
                    Part::Stall => std::future::pending::<Vec<u8>>().await,
                    // Ending without the `0\r\n\r\n` terminator is what makes it a cut.
                    Part::Cut => return Ok(()),
                };
                if sent_bytes && !script.pace.is_zero() {
                    tokio::time::sleep(script.pace).await;
                }
                sent_bytes = true;
                for piece in script.pieces(bytes) {
                    let mut frame = format!("{:x}\r\n", piece.len()).into_bytes();
                    frame.extend_from_slice(&piece);
                    frame.extend_from_slice(b"\r\n");
                    writer.write_all(&frame).await.map_err(gone)?;
                    writer.flush().await.map_err(gone)?;
                }
            }
            writer.write_all(b"0\r\n\r\n").await.map_err(gone)?;
            writer.flush().await.map_err(gone)?;
            Ok(())
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
