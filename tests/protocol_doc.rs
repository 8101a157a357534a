//! Checks `docs/protocol.md` against the code and a real server.
//!
//! The doc's fenced blocks say what they are in their info string:
//! - ```` ```json client ````: a client frame `parse_client_frame` accepts;
//! - ```` ```json error-client CODE ````: a client frame it refuses with `CODE`;
//! - ```` ```json server [ID] ````: a `ServerFrame` that round-trips through serde unchanged; with an
//!   `ID`, also compared with a frame from a real server (`live_frames_have_the_documented_shapes`,
//!   which also drives AI answers from a fake provider, `common::fake_llm`);
//! - ```` ```http ID ```` + ```` ```json|text response STATUS ID ````: a request sent to a real server and
//!   the answer it must give (`http_examples_match_the_real_server`).
//!
//! Live answers are compared by structure (`same_shape`: same keys recursively, arrays by their
//! first element, same JSON value types) plus the values clients branch on (`type`, `kind`, `role`,
//! `status`, `reason`, `duplicate`, `has_more`, `draining`, `error.code`). Ids and tokens shown in
//! an earlier documented response are replaced by the live ones in later documented requests.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cochat::ai::provider::ProviderConfig;
use cochat_actors::error::ErrorCode;
use cochat_actors::event::{AgentInfo, EventBody, Message, StoredEvent};
use cochat_actors::protocol::{parse_client_frame, ServerFrame, CLIENT_FRAME_TYPES};
use common::client::{Api, Ws};
use common::db::TestDatabase;
use common::fake_llm::{FakeLlm, Script};
use common::server::{test_settings, TestServer};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The doc and its blocks

fn doc_text() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

#[derive(Clone, Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    info: Vec<String>,
    body: String,
}

/// Every fenced block (```` ``` ```` at the start of a line) with its info string split into words.
fn blocks(doc: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in doc.lines().enumerate() {
        match open.as_mut() {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    open = Some(Block {
                        line: index + 1,
                        info: info.split_whitespace().map(str::to_owned).collect(),
                        body: String::new(),
                    });
                }
            }
            Some(block) => {
                if line.trim_end() == "```" {
                    found.extend(open.take());
                } else {
                    block.body.push_str(line);
                    block.body.push('\n');
                }
            }
        }
    }
    assert!(
        open.is_none(),
        "docs/protocol.md: a fenced block is never closed"
    );
    found
}

#[derive(Clone, Debug)]
struct Response {
    line: usize,
    status: u16,
    /// `json` or `text`.
    lang: String,
    body: String,
}

/// The doc's blocks, sorted by what they are.
#[derive(Default)]
struct Doc {
    client: Vec<Block>,
    error_client: Vec<(Block, String)>,
    server: Vec<(Block, Option<String>)>,
    http: BTreeMap<String, Block>,
    responses: BTreeMap<String, Response>,
    /// Problems found while sorting (duplicate ids, malformed info strings).
    problems: Vec<String>,
}

impl Doc {
    fn load() -> Doc {
        let mut doc = Doc::default();
        for block in blocks(&doc_text()) {
            let words: Vec<&str> = block.info.iter().map(String::as_str).collect();
            let at = block.line;
            match words.as_slice() {
                ["json", "client"] => doc.client.push(block),
                ["json", "error-client", code] => {
                    let code = (*code).to_owned();
                    doc.error_client.push((block, code));
                }
                ["json", "server"] => doc.server.push((block, None)),
                ["json", "server", id] => {
                    let id = (*id).to_owned();
                    if doc
                        .server
                        .iter()
                        .any(|(_, other)| other.as_deref() == Some(id.as_str()))
                    {
                        doc.problems
                            .push(format!("line {at}: server example id `{id}` is used twice"));
                    }
                    doc.server.push((block, Some(id)));
                }
                ["http", id] => {
                    let id = (*id).to_owned();
                    if doc.http.insert(id.clone(), block).is_some() {
                        doc.problems
                            .push(format!("line {at}: http example id `{id}` is used twice"));
                    }
                }
                [lang @ ("json" | "text"), "response", status, id] => {
                    let Ok(status) = status.parse::<u16>() else {
                        doc.problems
                            .push(format!("line {at}: `{status}` is not an HTTP status"));
                        continue;
                    };
                    let response = Response {
                        line: at,
                        status,
                        lang: (*lang).to_owned(),
                        body: block.body.clone(),
                    };
                    if doc.responses.insert((*id).to_owned(), response).is_some() {
                        doc.problems
                            .push(format!("line {at}: response id `{id}` is used twice"));
                    }
                }
                // Untagged blocks (plain ```json, ```text, the planned section) are for people only.
                ["json"] | ["text"] | [] => {}
                other => doc
                    .problems
                    .push(format!("line {at}: unknown info string {other:?}")),
            }
        }
        for id in doc.http.keys() {
            if !doc.responses.contains_key(id) {
                doc.problems.push(format!(
                    "http example `{id}` has no `response STATUS {id}` block"
                ));
            }
        }
        for (id, response) in &doc.responses {
            if !doc.http.contains_key(id) {
                doc.problems.push(format!(
                    "line {}: response `{id}` has no ```http {id} request",
                    response.line
                ));
            }
        }
        doc
    }

    /// The documented JSON answer with this id (status and body).
    fn doc_example(&self, id: &str) -> (u16, Value) {
        let response = self
            .responses
            .get(id)
            .unwrap_or_else(|| panic!("no documented response `{id}`"));
        let body = parse_json(&response.body)
            .unwrap_or_else(|error| panic!("line {}: response `{id}`: {error}", response.line));
        (response.status, body)
    }

    fn server_example(&self, id: &str) -> Value {
        let (block, _) = self
            .server
            .iter()
            .find(|(_, other)| other.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no ```json server {id} example in docs/protocol.md"));
        parse_json(&block.body).unwrap_or_else(|error| panic!("line {}: {error}", block.line))
    }
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))
}

// ---------------------------------------------------------------------------------------------
// Comparing documented and live JSON

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Same keys recursively, arrays compared by their first element, same value types.
fn same_shape(doc: &Value, live: &Value) -> Result<(), String> {
    shape_at("$", doc, live)
}

fn shape_at(path: &str, doc: &Value, live: &Value) -> Result<(), String> {
    match (doc, live) {
        (Value::Object(d), Value::Object(l)) => {
            let doc_keys: BTreeSet<&String> = d.keys().collect();
            let live_keys: BTreeSet<&String> = l.keys().collect();
            if doc_keys != live_keys {
                let missing: Vec<_> = doc_keys.difference(&live_keys).collect();
                let extra: Vec<_> = live_keys.difference(&doc_keys).collect();
                return Err(format!(
                    "{path}: documented but not served: {missing:?}; served but not documented: {extra:?} (live: {live})"
                ));
            }
            for (key, value) in d {
                shape_at(&format!("{path}.{key}"), value, &l[key])?;
            }
            Ok(())
        }
        (Value::Array(d), Value::Array(l)) => match (d.first(), l.first()) {
            (Some(d), Some(l)) => shape_at(&format!("{path}[0]"), d, l),
            (None, None) => Ok(()),
            (Some(_), None) => Err(format!(
                "{path}: the doc shows elements but the live array is empty, nothing to compare"
            )),
            (None, Some(l)) => Err(format!(
                "{path}: the doc shows an empty array but the live one has elements like {l}"
            )),
        },
        _ if type_name(doc) == type_name(live) => Ok(()),
        _ => Err(format!(
            "{path}: the doc has a {} ({doc}) but the server sent a {} ({live})",
            type_name(doc),
            type_name(live)
        )),
    }
}

/// Keys whose values clients branch on: these must be equal, not just of the same type.
const EXACT_KEYS: &[&str] = &[
    "type",
    "kind",
    "role",
    "status",
    "reason",
    "duplicate",
    "has_more",
    "draining",
    "truncated",
];

fn same_key_values(doc: &Value, live: &Value) -> Result<(), String> {
    values_at("$", None, doc, live)
}

fn values_at(path: &str, key: Option<&str>, doc: &Value, live: &Value) -> Result<(), String> {
    match (doc, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (k, value) in d {
                if let Some(other) = l.get(k) {
                    values_at(&format!("{path}.{k}"), Some(k), value, other)?;
                }
            }
            Ok(())
        }
        (Value::Array(d), Value::Array(l)) => match (d.first(), l.first()) {
            (Some(d), Some(l)) => values_at(&format!("{path}[0]"), None, d, l),
            _ => Ok(()),
        },
        _ => {
            let exact = key.is_some_and(|key| EXACT_KEYS.contains(&key))
                || path.ends_with("error.code")
                || (path == "$.code"
                    && live.as_str().is_some_and(|code| {
                        serde_json::from_value::<ErrorCode>(json!(code)).is_ok()
                    }));
            if exact && doc != live {
                Err(format!(
                    "{path}: the doc says {doc} but the server sent {live}"
                ))
            } else {
                Ok(())
            }
        }
    }
}

fn check_against(doc: &Value, live: &Value) -> Result<(), String> {
    same_shape(doc, live)?;
    same_key_values(doc, live)
}

// ---------------------------------------------------------------------------------------------
// Exhaustive lists: adding a variant breaks these matches until the list (and the doc) follow.

const ALL_CODES: &[ErrorCode] = &[
    ErrorCode::BadJson,
    ErrorCode::UnknownType,
    ErrorCode::InvalidFrame,
    ErrorCode::BinaryNotSupported,
    ErrorCode::FrameTooLarge,
    ErrorCode::TextTooLarge,
    ErrorCode::RateLimited,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::RoomNotFound,
    ErrorCode::MessageNotFound,
    ErrorCode::UserNotFound,
    ErrorCode::NotSubscribed,
    ErrorCode::InviteInvalid,
    ErrorCode::UsernameTaken,
    ErrorCode::Conflict,
    ErrorCode::Validation,
    ErrorCode::NotFound,
    ErrorCode::PayloadTooLarge,
    ErrorCode::StoreUnavailable,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
];

/// Position of each code in `ALL_CODES` (a new variant fails to compile here).
fn code_index(code: ErrorCode) -> usize {
    match code {
        ErrorCode::BadJson => 0,
        ErrorCode::UnknownType => 1,
        ErrorCode::InvalidFrame => 2,
        ErrorCode::BinaryNotSupported => 3,
        ErrorCode::FrameTooLarge => 4,
        ErrorCode::TextTooLarge => 5,
        ErrorCode::RateLimited => 6,
        ErrorCode::Unauthorized => 7,
        ErrorCode::Forbidden => 8,
        ErrorCode::RoomNotFound => 9,
        ErrorCode::MessageNotFound => 10,
        ErrorCode::UserNotFound => 11,
        ErrorCode::NotSubscribed => 12,
        ErrorCode::InviteInvalid => 13,
        ErrorCode::UsernameTaken => 14,
        ErrorCode::Conflict => 15,
        ErrorCode::Validation => 16,
        ErrorCode::NotFound => 17,
        ErrorCode::PayloadTooLarge => 18,
        ErrorCode::StoreUnavailable => 19,
        ErrorCode::ShuttingDown => 20,
        ErrorCode::Internal => 21,
    }
}

fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

const SERVER_TYPES: &[&str] = &[
    "event",
    "subscribed",
    "unsubscribed",
    "ack",
    "pong",
    "error",
    "typing",
    "presence",
    "ai.delta",
    "ai.queue",
    "ai.usage",
];

fn server_type(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Event(_) => "event",
        ServerFrame::Subscribed { .. } => "subscribed",
        ServerFrame::Unsubscribed { .. } => "unsubscribed",
        ServerFrame::Ack { .. } => "ack",
        ServerFrame::Pong { .. } => "pong",
        ServerFrame::Error { .. } => "error",
        ServerFrame::Typing { .. } => "typing",
        ServerFrame::Presence { .. } => "presence",
        ServerFrame::AiDelta { .. } => "ai.delta",
        ServerFrame::AiQueue { .. } => "ai.queue",
        ServerFrame::AiUsage { .. } => "ai.usage",
    }
}

const EVENT_KINDS: &[&str] = &[
    "message.created",
    "message.edited",
    "message.deleted",
    "reaction.changed",
    "member.joined",
    "member.left",
    "member.role_changed",
    "agent.added",
    "ai.started",
    "ai.completed",
    "ai.failed",
    "ai.cancelled",
];

fn event_kind(body: &EventBody) -> &'static str {
    let kind = match body {
        EventBody::MessageCreated { .. } => "message.created",
        EventBody::MessageEdited { .. } => "message.edited",
        EventBody::MessageDeleted { .. } => "message.deleted",
        EventBody::ReactionChanged { .. } => "reaction.changed",
        EventBody::MemberJoined { .. } => "member.joined",
        EventBody::MemberLeft { .. } => "member.left",
        EventBody::MemberRoleChanged { .. } => "member.role_changed",
        EventBody::AgentAdded { .. } => "agent.added",
        EventBody::AiStarted { .. } => "ai.started",
        EventBody::AiCompleted { .. } => "ai.completed",
        EventBody::AiFailed { .. } => "ai.failed",
        EventBody::AiCancelled { .. } => "ai.cancelled",
    };
    debug_assert_eq!(kind, body.kind());
    kind
}

fn missing<'a>(wanted: impl IntoIterator<Item = &'a str>, seen: &BTreeSet<String>) -> Vec<&'a str> {
    wanted
        .into_iter()
        .filter(|name| !seen.contains(*name))
        .collect()
}

/// Round-trips `value` through `T` and reports any difference.
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: &Value,
) -> Result<T, String> {
    let parsed: T = serde_json::from_value(value.clone())
        .map_err(|error| format!("does not deserialise: {error}"))?;
    let back =
        serde_json::to_value(&parsed).map_err(|error| format!("does not serialise: {error}"))?;
    if &back != value {
        return Err(format!(
            "does not round-trip:\n  doc:    {value}\n  server: {back}"
        ));
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------------------------
// Frames against the code

#[test]
fn doc_blocks_are_well_formed() {
    let doc = Doc::load();
    assert!(
        doc.problems.is_empty(),
        "docs/protocol.md:\n{}",
        doc.problems.join("\n")
    );
    assert!(
        !doc.client.is_empty() && !doc.server.is_empty() && !doc.http.is_empty(),
        "the doc has tagged examples"
    );
}

#[test]
fn client_frame_examples_parse_and_cover_every_type() {
    let doc = Doc::load();
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    for block in &doc.client {
        match parse_client_frame(block.body.trim()) {
            Ok(_) => {
                let value: Value = serde_json::from_str(&block.body).unwrap_or(Value::Null);
                seen.extend(value["type"].as_str().map(str::to_owned));
            }
            Err((_, error)) => failures.push(format!(
                "line {}: refused ({}): {}",
                block.line,
                code_name(error.code),
                block.body.trim()
            )),
        }
    }
    for (block, code) in &doc.error_client {
        match parse_client_frame(block.body.trim()) {
            Ok(parsed) => failures.push(format!(
                "line {}: must be refused with {code}, but parses as {:?}",
                block.line, parsed.frame
            )),
            Err((_, error)) if code_name(error.code) != *code => failures.push(format!(
                "line {}: refused with {} ({}), the doc says {code}",
                block.line,
                code_name(error.code),
                error.message
            )),
            Err(_) => {}
        }
    }
    let absent = missing(CLIENT_FRAME_TYPES.iter().copied(), &seen);
    if !absent.is_empty() {
        failures.push(format!(
            "client frame types without a ```json client example: {absent:?}"
        ));
    }
    assert!(
        failures.is_empty(),
        "docs/protocol.md:\n{}",
        failures.join("\n")
    );
}

#[test]
fn server_frame_examples_round_trip_and_cover_every_type_and_kind() {
    let doc = Doc::load();
    let mut failures = Vec::new();
    let (mut types, mut kinds) = (BTreeSet::new(), BTreeSet::new());
    for (block, id) in &doc.server {
        let label = format!(
            "line {} ({})",
            block.line,
            id.as_deref().unwrap_or("untagged")
        );
        let value = match parse_json(&block.body) {
            Ok(value) => value,
            Err(error) => {
                failures.push(format!("{label}: {error}"));
                continue;
            }
        };
        match round_trips::<ServerFrame>(&value) {
            Ok(frame) => {
                types.insert(server_type(&frame).to_owned());
                if let ServerFrame::Event(event) = &frame {
                    kinds.insert(event_kind(&event.event).to_owned());
                }
            }
            Err(error) => failures.push(format!("{label}: {error}")),
        }
    }
    let absent = missing(SERVER_TYPES.iter().copied(), &types);
    if !absent.is_empty() {
        failures.push(format!(
            "server frame types without a ```json server example: {absent:?}"
        ));
    }
    let absent = missing(EVENT_KINDS.iter().copied(), &kinds);
    if !absent.is_empty() {
        failures.push(format!("event kinds without an example: {absent:?}"));
    }

    // HTTP answers that carry protocol types must round-trip through them too.
    let mut check = |id: &str, pick: &dyn Fn(&Value) -> Vec<Value>, kind: &str| {
        if !doc.responses.contains_key(id) {
            return failures.push(format!("no documented response `{id}`"));
        }
        let (_, body) = doc.doc_example(id);
        for (index, item) in pick(&body).iter().enumerate() {
            let result = match kind {
                "message" => round_trips::<Message>(item).map(drop),
                "event" => round_trips::<StoredEvent>(item).map(drop),
                "agent" => round_trips::<AgentInfo>(item).map(drop),
                _ => round_trips::<ServerFrame>(item).map(drop),
            };
            if let Err(error) = result {
                failures.push(format!("response `{id}` item {index}: {error}"));
            }
        }
    };
    let array =
        |key: &'static str| move |body: &Value| body[key].as_array().cloned().unwrap_or_default();
    check("history", &array("messages"), "message");
    check("events", &array("events"), "event");
    check("post-message", &|body: &Value| vec![body.clone()], "frame");
    check(
        "post-message-again",
        &|body: &Value| vec![body.clone()],
        "frame",
    );
    check("ask-ai", &|body: &Value| vec![body.clone()], "frame");
    check("room-detail", &array("agents"), "agent");
    check(
        "create-agent",
        &|body: &Value| vec![body["agent"].clone()],
        "agent",
    );
    assert!(
        failures.is_empty(),
        "docs/protocol.md:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_error_code_is_in_the_table_with_its_http_status() {
    for (index, code) in ALL_CODES.iter().enumerate() {
        assert_eq!(
            code_index(*code),
            index,
            "ALL_CODES is out of step with code_index"
        );
    }
    let text = doc_text();
    // Rows of the error code table: | `code` | status | meaning |
    let mut table = BTreeMap::new();
    let section = text
        .split("## Error codes")
        .nth(1)
        .expect("the doc has an `## Error codes` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 4 && cells[1].starts_with('`') {
            table.insert(cells[1].trim_matches('`').to_owned(), cells[2].to_owned());
        }
    }
    let mut failures = Vec::new();
    for code in ALL_CODES {
        let name = code_name(*code);
        match table.get(&name) {
            None => failures.push(format!("`{name}` is missing from the error code table")),
            Some(status) if *status != code.http_status().to_string() => failures.push(format!(
                "`{name}`: the table says {status}, the server uses {}",
                code.http_status()
            )),
            Some(_) => {}
        }
    }
    for name in table.keys() {
        if serde_json::from_value::<ErrorCode>(json!(name)).is_err() {
            failures.push(format!(
                "`{name}` in the error code table is not an ErrorCode"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "docs/protocol.md:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP examples against the real server

/// Sends the documented requests to a live server and checks the documented answers.
struct HttpWalk {
    doc: Doc,
    base: String,
    http: reqwest::Client,
    /// Documented value -> live value (ids, tokens, invite codes), learnt from earlier answers.
    subst: Vec<(String, String)>,
    checked: BTreeSet<String>,
    failures: Vec<String>,
}

fn is_hex_id(text: &str) -> bool {
    text.len() == 32 && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// `<<N×c>>` stands for `c` repeated N times.
fn expand_repeats(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<<") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find(">>") else { break };
        let spec = &after[..end];
        match spec.split_once('×') {
            Some((count, what)) if count.trim().parse::<usize>().is_ok() => {
                out.push_str(&what.repeat(count.trim().parse().unwrap_or(0)));
            }
            _ => {
                out.push_str("<<");
                out.push_str(spec);
                out.push_str(">>");
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

impl HttpWalk {
    fn new(base: &str) -> Self {
        Self {
            doc: Doc::load(),
            base: base.to_owned(),
            http: reqwest::Client::new(),
            subst: Vec::new(),
            checked: BTreeSet::new(),
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, id: &str, problem: impl std::fmt::Display) {
        self.failures.push(format!("`{id}`: {problem}"));
    }

    fn substitute(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (doc, live) in &self.subst {
            text = text.replace(doc.as_str(), live);
        }
        expand_repeats(&text)
    }

    /// Records which documented ids and tokens stand for which live ones.
    fn learn(
        &mut self,
        id: &str,
        key: Option<&str>,
        parent: Option<&str>,
        doc: &Value,
        live: &Value,
    ) {
        match (doc, live) {
            (Value::Object(d), Value::Object(l)) => {
                for (k, value) in d {
                    if let Some(other) = l.get(k) {
                        self.learn(id, Some(k), key, value, other);
                    }
                }
            }
            (Value::Array(d), Value::Array(l)) => {
                for (a, b) in d.iter().zip(l) {
                    self.learn(id, key, parent, a, b);
                }
            }
            (Value::String(d), Value::String(l)) if d != l => {
                let token = d.starts_with("eyJ");
                let invite = key == Some("code") && parent != Some("error");
                if !(is_hex_id(d) || token || invite) {
                    return;
                }
                if let Some((_, known)) = self.subst.iter().find(|(doc, _)| doc == d) {
                    if known != l && !token {
                        let known = known.clone();
                        self.fail(
                            id,
                            format!(
                                "the doc uses {d} for two different things (live {known} and {l})"
                            ),
                        );
                    }
                    return;
                }
                if let Some((other, _)) = self.subst.iter().find(|(_, live)| live == l) {
                    if !token {
                        let other = other.clone();
                        self.fail(id, format!("the doc calls the same thing {other} and {d}"));
                    }
                }
                self.subst.push((d.clone(), l.clone()));
            }
            _ => {}
        }
    }

    /// Sends the documented request `id` and checks the documented response `id`. Returns the
    /// live JSON body (`Null` when empty or not JSON).
    async fn step(&mut self, id: &str) -> Value {
        assert!(
            self.checked.insert(id.to_owned()),
            "the walk checks `{id}` twice"
        );
        let Some(request) = self.doc.http.get(id).cloned() else {
            self.fail(id, "no ```http example with this id in the doc");
            return Value::Null;
        };
        let Some(response) = self.doc.responses.get(id).cloned() else {
            self.fail(id, "no documented response with this id");
            return Value::Null;
        };
        let text = self.substitute(&request.body);
        let (head, body) = text.split_once("\n\n").unwrap_or((text.as_str(), ""));
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default();
        let Some((method, path)) = request_line.split_once(' ') else {
            self.fail(
                id,
                format!(
                    "line {}: the first line is not `METHOD /path`",
                    request.line
                ),
            );
            return Value::Null;
        };
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid HTTP method");
        let mut builder = self
            .http
            .request(method, format!("{}{}", self.base, path.trim()));
        for header in lines {
            let Some((name, value)) = header.split_once(':') else {
                self.fail(
                    id,
                    format!("line {}: bad header line {header:?}", request.line),
                );
                return Value::Null;
            };
            builder = builder.header(name.trim(), value.trim());
        }
        let body = body.trim();
        if !body.is_empty() {
            builder = builder.body(body.to_owned());
        }
        let answer = builder.send().await.expect("the server answers HTTP");
        let status = answer.status().as_u16();
        let live_text = answer.text().await.expect("the body is readable");
        let live: Value = serde_json::from_str(&live_text).unwrap_or(Value::Null);
        if status != response.status {
            self.fail(
                id,
                format!(
                    "status {status}, the doc says {} (body: {live_text})",
                    response.status
                ),
            );
        }
        match response.lang.as_str() {
            "json" => {
                let documented = match parse_json(&response.body) {
                    Ok(value) => value,
                    Err(error) => {
                        self.fail(id, format!("line {}: {error}", response.line));
                        return live;
                    }
                };
                if let Err(error) = check_against(&documented, &live) {
                    self.fail(id, format!("line {}: {error}", response.line));
                }
                self.learn(id, None, None, &documented, &live);
            }
            _ if response.body.trim() == "(no body)" => {
                if !live_text.is_empty() {
                    self.fail(
                        id,
                        format!("the doc says no body, the server sent {live_text:?}"),
                    );
                }
            }
            _ => {
                for line in response
                    .body
                    .lines()
                    .filter(|line| line.starts_with("# TYPE "))
                {
                    if !live_text.lines().any(|live| live == line) {
                        self.fail(id, format!("`{line}` is not in the live answer"));
                    }
                }
            }
        }
        live
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_examples_match_the_real_server() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    let mut settings = test_settings(&db.url);
    settings.ai_provider = Some(ProviderConfig::new(fake.base_url(), "fake-model"));
    // Long enough to look at a draining node before it stops.
    settings.drain_window = Duration::from_secs(3);
    let mut server = TestServer::start_with(settings).await;
    let mut walk = HttpWalk::new(&server.base);

    // Accounts.
    walk.step("register-ada").await;
    walk.step("register-bob").await;
    walk.step("register-taken").await;
    walk.step("register-short-password").await;
    let login = walk.step("login").await;
    walk.step("login-wrong-password").await;
    walk.step("me").await;
    walk.step("me-no-token").await;
    walk.step("ws-no-token").await;

    // A room, an invite, membership.
    walk.step("create-room").await;
    walk.step("create-room-bad-json").await;
    walk.step("list-rooms").await;
    walk.step("room-detail-not-member").await;
    walk.step("create-invite").await;
    walk.step("accept-invite").await;
    walk.step("accept-invite-invalid").await;
    walk.step("room-detail").await;
    walk.step("create-invite-forbidden").await;
    walk.step("change-role").await;

    // Messages and the log.
    walk.step("post-message").await;
    walk.step("post-message-again").await;
    walk.step("post-message-text-too-large").await;
    walk.step("post-message-body-too-large").await;
    walk.step("history").await;
    walk.step("history-bad-limit").await;
    walk.step("events").await;
    walk.step("mark-read").await;

    // Agents and AI usage: one answer (with the tokens the provider reports) before the usage.
    walk.step("create-agent").await;
    walk.step("create-agent-taken").await;
    walk.step("create-agent-bad-name").await;
    fake.push(
        Script::stream()
            .role()
            .deltas(&["Yes: build 4711", " passed at 09:15."])
            .finish("stop")
            .usage(412, 9)
            .done(),
    );
    let asked = walk.step("ask-ai").await;
    let room = asked["room"]
        .as_str()
        .expect("the ack names the room")
        .to_owned();
    let token = login["token"]
        .as_str()
        .expect("login gives a token")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let usage: Value = walk
            .http
            .get(format!("{}/api/v1/rooms/{room}/usage", walk.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("usage answers")
            .json()
            .await
            .expect("usage is JSON");
        if usage["answers"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the answer to `ask-ai` never ended: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    walk.step("usage").await;

    walk.step("remove-member").await;
    walk.step("no-such-endpoint").await;

    // Operations.
    walk.step("healthz").await;
    walk.step("readyz").await;
    walk.step("metrics").await;

    // Draining: readiness goes false, new sockets are refused, open ones close with 1012.
    let token = login["token"]
        .as_str()
        .expect("login gives a token")
        .to_owned();
    let mut ws = Ws::connect(&server.ws_url(), &token).await;
    assert_eq!(ws.request(json!({"type": "ping"})).await["type"], "pong");
    server.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = walk
            .http
            .get(format!("{}/readyz", walk.base))
            .send()
            .await
            .expect("readyz answers while draining");
        if answer.status() == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never turned 503 after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    walk.step("readyz-draining").await;
    walk.step("ws-draining").await;
    let close = ws.closed().await.map(u16::from);
    assert_eq!(
        close,
        Some(1012),
        "a draining node closes sockets with 1012"
    );

    let documented: BTreeSet<String> = walk.doc.http.keys().cloned().collect();
    let unchecked: Vec<_> = documented.difference(&walk.checked).collect();
    if !unchecked.is_empty() {
        walk.failures.push(format!(
            "documented HTTP examples the walk never checks: {unchecked:?}"
        ));
    }
    assert!(
        walk.failures.is_empty(),
        "docs/protocol.md vs the server:\n{}",
        walk.failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Server frames against the real server

struct FrameCheck {
    doc: Doc,
    checked: BTreeSet<String>,
    failures: Vec<String>,
}

impl FrameCheck {
    fn check(&mut self, id: &str, live: &Value) {
        assert!(
            self.checked.insert(id.to_owned()),
            "the walk checks `{id}` twice"
        );
        let documented = self.doc.server_example(id);
        if let Err(error) = check_against(&documented, live) {
            self.failures.push(format!("`{id}`: {error}"));
        }
    }

    /// The `id` the documented answer replies to, so live and documented `reply_to` have the same type.
    fn reply_id(&self, id: &str) -> Value {
        self.doc.server_example(id)["reply_to"].clone()
    }
}

fn is_event(frame: &Value, kind: &str) -> bool {
    frame["type"] == "event" && frame["event"]["kind"] == kind
}

/// `event` frames by kind, other frames by type.
fn frame_label(frame: &Value) -> String {
    let label = if frame["type"] == "event" {
        &frame["event"]["kind"]
    } else {
        &frame["type"]
    };
    label.as_str().unwrap_or_default().to_owned()
}

/// The frames one member gets about the answer to `trigger`, in order: from the trigger's
/// `message.created` to the `ai.usage` after the event that ends the answer. Other AI frames
/// (earlier answers, other agents) are skipped.
async fn follow_answer(ws: &mut Ws, trigger: &Value) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut answer: Option<Value> = None;
    let mut ended = false;
    loop {
        let frame = ws.recv().await;
        let relevant = match frame_label(&frame).as_str() {
            "message.created" => frame["event"]["message"]["id"] == *trigger,
            "ai.queue" => !seen.is_empty() && answer.is_none(),
            "ai.started" => frame["event"]["trigger_message_id"] == *trigger && answer.is_none(),
            "ai.delta" => answer.as_ref() == Some(&frame["message_id"]),
            "ai.completed" | "ai.failed" | "ai.cancelled" => {
                answer.as_ref() == Some(&frame["event"]["message"]["id"])
            }
            "ai.usage" => ended,
            _ => false,
        };
        if !relevant {
            continue;
        }
        match frame_label(&frame).as_str() {
            "ai.started" => answer = Some(frame["event"]["message_id"].clone()),
            "ai.completed" | "ai.failed" | "ai.cancelled" => ended = true,
            "ai.usage" => {
                seen.push(frame);
                return seen;
            }
            _ => {}
        }
        seen.push(frame);
    }
}

/// The text a client builds from the `ai.delta` frames among `frames` with the documented rule.
fn splice(frames: &[Value]) -> String {
    let mut text: Vec<char> = Vec::new();
    for frame in frames.iter().filter(|f| f["type"] == "ai.delta") {
        let offset = frame["offset"].as_u64().expect("offset is a number") as usize;
        if offset <= text.len() {
            text.truncate(offset);
            text.extend(frame["text"].as_str().expect("text is a string").chars());
        }
    }
    text.into_iter().collect()
}

/// Sends `frame` with `id` and returns the answer that carries it as `reply_to`.
async fn ask(ws: &mut Ws, mut frame: Value, id: Value) -> Value {
    frame["id"] = id.clone();
    ws.send(frame).await;
    ws.recv_until(|answer| answer["reply_to"] == id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_frames_have_the_documented_shapes() {
    let db = TestDatabase::sqlite();
    let fake = FakeLlm::start().await;
    let mut settings = test_settings(&db.url);
    settings.ai_provider = Some(ProviderConfig::new(fake.base_url(), "fake-model"));
    let server = TestServer::start_with(settings).await;
    let api = Api::new(&server.base);
    let (ada, bob, guest, stranger) = (
        api.register("ada").await,
        api.register("bob").await,
        api.register("gst").await,
        api.register("str").await,
    );
    let room = api.create_room(&ada, "general").await;
    api.add_member(&room, &ada, &bob, "member").await;
    api.add_member(&room, &ada, &guest, "guest").await;
    let mut frames = FrameCheck {
        doc: Doc::load(),
        checked: BTreeSet::new(),
        failures: Vec::new(),
    };

    // Subscribe with a replay of the whole log.
    let mut ada_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    let id = frames.reply_id("subscribed");
    let subscribed = ask(
        &mut ada_ws,
        json!({"type": "subscribe", "room": room, "since_seq": 0}),
        id,
    )
    .await;
    frames.check("subscribed", &subscribed);
    let replay = ada_ws.events(&room, 3).await;
    frames.check("event-member-joined", &replay[1]);

    // Presence and typing.
    let mut bob_ws = Ws::connect(&server.ws_url(), &bob.token).await;
    bob_ws.subscribe(&room, None).await;
    let online = ada_ws
        .recv_until(|f| f["type"] == "presence" && f["user"]["id"] == json!(bob.id))
        .await;
    frames.check("presence", &online);
    bob_ws.send(json!({"type": "typing", "room": room})).await;
    let typing = ada_ws.recv_until(|f| f["type"] == "typing").await;
    frames.check("typing", &typing);

    let id = frames.reply_id("pong");
    let pong = ask(&mut ada_ws, json!({"type": "ping"}), id).await;
    frames.check("pong", &pong);

    // A message, its duplicate, its edit, a reaction, its deletion.
    let id = frames.reply_id("ack-send");
    let send =
        json!({"type": "send", "room": room, "client_msg_id": "c-0001", "text": "hello everyone"});
    let ack = ask(&mut ada_ws, send.clone(), id).await;
    frames.check("ack-send", &ack);
    let message_id = ack["message_id"].clone();
    let id = frames.reply_id("ack-duplicate");
    let again = ask(&mut ada_ws, send, id).await;
    frames.check("ack-duplicate", &again);
    let created = bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "message.created")
        .await;
    frames.check("event-message-created", &created);

    let id = frames.reply_id("ack-edit");
    let edit =
        json!({"type": "edit", "room": room, "message_id": message_id, "text": "hello everyone!"});
    let edited = ask(&mut ada_ws, edit, id).await;
    frames.check("ack-edit", &edited);
    let event = bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "message.edited")
        .await;
    frames.check("event-message-edited", &event);

    let react =
        json!({"type": "react", "room": room, "message_id": message_id, "emoji": "👍", "on": true});
    let reacted = ask(&mut bob_ws, react, json!("react-1")).await;
    assert_eq!(reacted["type"], "ack", "{reacted}");
    let event = ada_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "reaction.changed")
        .await;
    frames.check("event-reaction-changed", &event);

    let deleted = ask(
        &mut ada_ws,
        json!({"type": "delete", "room": room, "message_id": message_id}),
        json!("del-1"),
    )
    .await;
    assert_eq!(deleted["type"], "ack", "{deleted}");
    let event = bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "message.deleted")
        .await;
    frames.check("event-message-deleted", &event);

    let id = frames.reply_id("ack-read");
    let read = ask(
        &mut ada_ws,
        json!({"type": "read", "room": room, "seq": 4}),
        id,
    )
    .await;
    frames.check("ack-read", &read);

    // Refusals.
    let id = frames.reply_id("error-cancel");
    let cancel = ask(
        &mut ada_ws,
        json!({"type": "cancel", "room": room, "message_id": message_id}),
        id,
    )
    .await;
    frames.check("error-cancel", &cancel);
    let id = frames.reply_id("error-unknown-type");
    let unknown = ask(&mut ada_ws, json!({"type": "dance"}), id).await;
    frames.check("error-unknown-type", &unknown);
    let mut guest_ws = Ws::connect(&server.ws_url(), &guest.token).await;
    let id = frames.reply_id("error-forbidden");
    let forbidden = ask(
        &mut guest_ws,
        json!({"type": "send", "room": room, "client_msg_id": "g1", "text": "may I?"}),
        id,
    )
    .await;
    frames.check("error-forbidden", &forbidden);
    let mut stranger_ws = Ws::connect(&server.ws_url(), &stranger.token).await;
    let id = frames.reply_id("error-room-not-found");
    let refused = ask(
        &mut stranger_ws,
        json!({"type": "subscribe", "room": room}),
        id,
    )
    .await;
    frames.check("error-room-not-found", &refused);

    // AI agents: a persona, then answers from the fake provider.
    let persona = json!({"name": "helper", "model": "deepseek-chat", "system_prompt": "You are a concise assistant."});
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/v1/rooms/{room}/agents"),
            Some(&ada.token),
            Some(persona),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let added = bob_ws.recv_until(|f| is_event(f, "agent.added")).await;
    frames.check("event-agent-added", &added);

    // The life of an answer, as another member sees it, in the documented order.
    fake.push(
        Script::stream()
            .role()
            .deltas(&["Yes: build 4711", " passed at 09:15."])
            .finish("stop")
            .usage(412, 9)
            .done()
            .pace(20),
    );
    let asked = ada_ws
        .send_message(&room, "ask-1", "/ai did build 4711 pass?")
        .await;
    assert_eq!(asked["type"], "ack", "{asked}");
    let trigger = asked["message_id"].clone();
    let life = follow_answer(&mut bob_ws, &trigger).await;
    let order: Vec<String> = life.iter().map(frame_label).collect();
    let documented_order = |labels: &[String]| -> bool {
        let mut rest = labels;
        for expected in ["message.created", "ai.queue", "ai.queue", "ai.started"] {
            match rest.split_first() {
                Some((first, tail)) if first == expected => rest = tail,
                _ => return false,
            }
        }
        let deltas = rest.iter().take_while(|label| *label == "ai.delta").count();
        deltas >= 1 && rest[deltas..] == ["ai.completed".to_owned(), "ai.usage".to_owned()]
    };
    assert!(
        documented_order(&order),
        "the frames of an answer, in order: {order:?}"
    );
    frames.check("ai-queue", &life[1]);
    assert_eq!(
        life[1]["queue"][0]["trigger_message_id"], trigger,
        "{}",
        life[1]
    );
    assert_eq!(
        life[2]["queue"],
        json!([]),
        "the trigger leaves the queue when its answer starts: {}",
        life[2]
    );
    frames.check("event-ai-started", &life[3]);
    let answer_id = life[3]["event"]["message_id"].clone();
    let later_delta = life
        .iter()
        .find(|f| f["type"] == "ai.delta" && f["offset"] != 0)
        .expect("a delta after the first");
    frames.check("ai-delta", later_delta);
    let completed = &life[life.len() - 2];
    frames.check("event-ai-completed", completed);
    assert_eq!(completed["event"]["message"]["id"], answer_id);
    assert_eq!(completed["event"]["message"]["reply_to_message"], trigger);
    // The documented splicing rule rebuilds the final text from the deltas.
    assert_eq!(
        json!(splice(&life)),
        completed["event"]["message"]["text"],
        "splicing the deltas by offset"
    );
    frames.check("ai-usage", &life[life.len() - 1]);

    // Regenerate: the same agent answers the same trigger again, as a new message.
    let id = frames.reply_id("ack-regenerate");
    let again = ask(
        &mut ada_ws,
        json!({"type": "regenerate", "room": room, "message_id": answer_id}),
        id,
    )
    .await;
    frames.check("ack-regenerate", &again);
    let second = follow_answer(&mut bob_ws, &trigger).await;
    let second_end = &second[second.len() - 2];
    assert_eq!(second_end["event"]["kind"], "ai.completed", "{second_end}");
    assert_ne!(
        second_end["event"]["message"]["id"], answer_id,
        "a regenerated answer is a new message"
    );
    assert_eq!(second_end["event"]["message"]["reply_to_message"], trigger);
    let id = frames.reply_id("error-regenerate");
    let refused = ask(
        &mut ada_ws,
        json!({"type": "regenerate", "room": room, "message_id": trigger}),
        id,
    )
    .await;
    frames.check("error-regenerate", &refused);

    // Cancel: an answer that stalls mid-way, a late subscriber, a queued trigger, then the stop.
    fake.push(
        Script::stream()
            .role()
            .delta("Once upon a time, in a")
            .stall(),
    );
    let poem = bob_ws
        .send_message(&room, "ask-2", "@AI write me a long poem")
        .await;
    let poem_trigger = poem["message_id"].clone();
    let started = bob_ws
        .recv_until(|f| {
            is_event(f, "ai.started") && f["event"]["trigger_message_id"] == poem_trigger
        })
        .await;
    let poem_answer = started["event"]["message_id"].clone();
    let first = bob_ws
        .recv_until(|f| f["type"] == "ai.delta" && f["message_id"] == poem_answer)
        .await;
    assert_eq!(first["offset"], 0, "{first}");
    let mut late_ws = Ws::connect(&server.ws_url(), &ada.token).await;
    late_ws.subscribe(&room, None).await;
    let resumed = late_ws.recv().await;
    frames.check("ai-delta-resume", &resumed);
    assert_eq!(
        (&resumed["message_id"], &resumed["text"]),
        (&poem_answer, &json!("Once upon a time, in a")),
        "{resumed}"
    );

    let waiting = ada_ws
        .send_message(&room, "ask-3", "/ai and one more thing")
        .await;
    let waiting_trigger = waiting["message_id"].clone();
    let queued = bob_ws
        .recv_until(|f| {
            f["type"] == "ai.queue" && f["queue"][0]["trigger_message_id"] == waiting_trigger
        })
        .await;
    assert_eq!(queued["queue"][0]["position"], 1, "{queued}");
    let dropped = ada_ws
        .request(json!({"type": "cancel", "room": room, "message_id": waiting_trigger}))
        .await;
    assert_eq!(
        dropped["type"], "ack",
        "cancelling a queued trigger: {dropped}"
    );
    let emptied = bob_ws
        .recv_until(|f| f["type"] == "ai.queue" && f["queue"] == json!([]))
        .await;
    assert_eq!(emptied["agent"], "ai");

    let id = frames.reply_id("ack-cancel");
    let stopped = ask(
        &mut bob_ws,
        json!({"type": "cancel", "room": room, "message_id": poem_answer}),
        id,
    )
    .await;
    frames.check("ack-cancel", &stopped);
    let cancelled = ada_ws.recv_until(|f| is_event(f, "ai.cancelled")).await;
    frames.check("event-ai-cancelled", &cancelled);
    assert_eq!(
        cancelled["event"]["message"]["text"],
        "Once upon a time, in a"
    );
    assert_eq!(cancelled["event"]["by"], json!(bob.id));

    // A failure: the provider refuses.
    fake.push(Script::fail(
        400,
        "This model's maximum context length is 8192 tokens",
    ));
    let doomed = ada_ws
        .send_message(&room, "ask-4", "/ai summarise the whole year")
        .await;
    let failed = bob_ws
        .recv_until(|f| {
            is_event(f, "ai.failed")
                && f["event"]["message"]["reply_to_message"] == doomed["message_id"]
        })
        .await;
    frames.check("event-ai-failed", &failed);
    assert_eq!(failed["event"]["code"], "provider_error", "{failed}");
    // Nothing was answered to the trigger that was taken out of the queue.
    assert_eq!(
        fake.requests().len(),
        4,
        "one provider request per answer started"
    );

    // Membership events, unsubscribing, and being removed.
    let (status, body) = api
        .call(
            "PATCH",
            &format!("/api/v1/rooms/{room}/members/{}", bob.id),
            Some(&ada.token),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let event = ada_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "member.role_changed")
        .await;
    frames.check("event-member-role-changed", &event);

    let id = frames.reply_id("unsubscribed");
    let unsubscribed = ask(
        &mut bob_ws,
        json!({"type": "unsubscribe", "room": room}),
        id,
    )
    .await;
    frames.check("unsubscribed", &unsubscribed);
    bob_ws.subscribe(&room, None).await;
    let (status, body) = api
        .call(
            "DELETE",
            &format!("/api/v1/rooms/{room}/members/{}", bob.id),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let left = bob_ws
        .recv_until(|f| f["type"] == "event" && f["event"]["kind"] == "member.left")
        .await;
    frames.check("event-member-left", &left);
    let removed = bob_ws.recv_until(|f| f["type"] == "unsubscribed").await;
    frames.check("unsubscribed-removed", &removed);

    let documented: BTreeSet<String> = frames
        .doc
        .server
        .iter()
        .filter_map(|(_, id)| id.clone())
        .collect();
    let unchecked: Vec<_> = documented.difference(&frames.checked).collect();
    if !unchecked.is_empty() {
        frames.failures.push(format!(
            "documented server frames the walk never checks: {unchecked:?}"
        ));
    }
    assert!(
        frames.failures.is_empty(),
        "docs/protocol.md vs the server's frames:\n{}",
        frames.failures.join("\n")
    );
}
