//! The tools an agent may call (OpenAI tools format): `search_history` and `get_message`, both
//! over the room's own log. Nothing here touches the host's files or shell.

use serde_json::{json, Value};

use crate::event::Message;
use crate::ids::{MessageId, RoomId};
use crate::llm::{ToolCall, ToolSpec};
use crate::ports::Store;

const SEARCH_LIMIT_MAX: u32 = 20;

pub fn specs() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "search_history".into(),
            description: "Search this chat room's messages for a word or phrase (case-insensitive). Returns the newest matches.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "text to look for"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": SEARCH_LIMIT_MAX}
                },
                "required": ["query"]
            })
            .to_string(),
        },
        ToolSpec {
            name: "get_message".into(),
            description: "Fetch one message of this chat room by its id.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"message_id": {"type": "string"}},
                "required": ["message_id"]
            })
            .to_string(),
        },
    ]
}

fn brief(message: &Message) -> Value {
    json!({
        "id": message.id,
        "seq": message.seq,
        "author": message.author.name,
        "author_kind": message.author.kind,
        "text": message.text,
        "created_at": message.created_at,
        "deleted": message.deleted,
    })
}

/// Runs one call and returns its result as JSON text for the model. Bad arguments and unknown
/// tools are answered with an error object: the model can correct itself.
pub async fn run(store: &dyn Store, room: &RoomId, call: &ToolCall) -> String {
    let args: Value = serde_json::from_str(&call.arguments).unwrap_or(Value::Null);
    let result = match call.name.as_str() {
        "search_history" => match args["query"].as_str().filter(|q| !q.trim().is_empty()) {
            None => json!({"error": "`query` (a non-empty string) is required"}),
            Some(query) => {
                let limit = args["limit"]
                    .as_u64()
                    .unwrap_or(10)
                    .clamp(1, SEARCH_LIMIT_MAX as u64) as u32;
                match store.search_messages(room, query, limit).await {
                    Ok(found) => json!({"matches": found.iter().map(brief).collect::<Vec<_>>()}),
                    Err(_) => json!({"error": "the history is unavailable right now"}),
                }
            }
        },
        "get_message" => match args["message_id"].as_str() {
            None => json!({"error": "`message_id` (a string) is required"}),
            Some(id) => match store.message(room, &MessageId::from(id)).await {
                Ok(Some(message)) => brief(&message),
                Ok(None) => json!({"error": "no such message in this room"}),
                Err(_) => json!({"error": "the history is unavailable right now"}),
            },
        },
        other => json!({"error": format!("unknown tool `{other}`")}),
    };
    result.to_string()
}
