//! The LLM provider port: a streaming chat completion in the OpenAI wire shape (which DeepSeek,
//! OpenAI, Gemini's OpenAI endpoint, Ollama, vLLM and llama.cpp all speak). Dropping the stream
//! must abort the upstream request at once: that is how `cancel` works.

use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

/// One message of the conversation sent to the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// Assistant messages that called tools carry the calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Tool results answer one call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function the model may call (OpenAI tools format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments, as JSON text.
    pub parameters: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (JSON text, possibly invalid).
    pub arguments: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: Option<u32>,
}

/// What a streaming completion yields, in order: text deltas and/or tool calls (each complete,
/// assembled from its fragments), then usage if the provider reports it, then `Done`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamItem {
    Delta(String),
    ToolCall(ToolCall),
    Usage {
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    Done {
        finish_reason: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// No provider is configured: agents answer with a notice instead.
    #[error("AI is not configured on this server")]
    NotConfigured,
    /// The provider refused or failed (status and the provider's message).
    #[error("provider answered {status}: {message}")]
    Status { status: u16, message: String },
    /// Connection, timeout, or a stream cut mid-answer.
    #[error("provider unreachable: {0}")]
    Transport(String),
    /// The provider sent something that is not the OpenAI streaming format.
    #[error("malformed provider stream: {0}")]
    Malformed(String),
}

pub type ChatStream = Pin<Box<dyn Stream<Item = Result<StreamItem, LlmError>> + Send>>;

#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// Starts a streaming completion. Retries (429/5xx, before the first token) happen inside.
    async fn stream(&self, request: ChatRequest) -> Result<ChatStream, LlmError>;
    /// The model used when a persona names none.
    fn default_model(&self) -> &str;
}
