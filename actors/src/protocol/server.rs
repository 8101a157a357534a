//! Server -> client frames. Direct answers carry `reply_to` with the client's `id`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;
use crate::event::{StoredEvent, UserRef};
use crate::ids::{MessageId, RoomId, Seq, UserId};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// A frame is built, serialised once and dropped: boxing `Event` would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum ServerFrame {
    /// A durable event; per room, frames arrive in `seq` order with no gap and no duplicate.
    Event(StoredEvent),
    Subscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<Value>,
        room: RoomId,
        /// The last seq in the room when the subscription started; live events follow it.
        head_seq: Seq,
        /// Events with `replay_after_seq < seq <= head_seq` are replayed on the socket next.
        replay_after_seq: Seq,
        /// True when `since_seq` was older than one replay allows: the client pages
        /// `since_seq < seq <= replay_after_seq` over `GET /api/v1/rooms/{room}/events`.
        truncated: bool,
        /// Members online in the room right now.
        online: Vec<UserRef>,
    },
    Unsubscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<Value>,
        room: RoomId,
        /// Why the server ended the subscription (`removed` when the member left or was kicked).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<Value>,
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<MessageId>,
        /// The seq of the event the request produced (for `read`: the stored marker).
        seq: Seq,
        /// True when this `client_msg_id` had been sent before: nothing new was written.
        #[serde(default)]
        duplicate: bool,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<Value>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<Value>,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<RoomId>,
    },
    /// Ephemeral: someone is typing (never sent back to the typist).
    Typing { room: RoomId, user: UserRef },
    /// Ephemeral: a member came online in the room or went offline.
    Presence {
        room: RoomId,
        user: UserRef,
        status: Presence,
    },
    /// Ephemeral: new text of an AI answer in progress. `offset` counts characters (Unicode
    /// scalar values) from the start of the answer: a client keeps `text[..offset] + delta`.
    /// A frame with offset 0 carries the whole text so far (sent to clients that join or
    /// resume mid-answer, and to repair a gap).
    #[serde(rename = "ai.delta")]
    AiDelta {
        room: RoomId,
        message_id: MessageId,
        offset: usize,
        text: String,
    },
    /// Ephemeral: the agent's queue of triggers waiting for an answer, in order.
    #[serde(rename = "ai.queue")]
    AiQueue {
        room: RoomId,
        agent: String,
        queue: Vec<QueuedTrigger>,
    },
    /// Ephemeral: the room's AI usage today (UTC), pushed after each answer.
    #[serde(rename = "ai.usage")]
    AiUsage { room: RoomId, usage: UsageReport },
}

/// One trigger waiting for an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedTrigger {
    pub trigger_message_id: MessageId,
    pub trigger_author: UserId,
    /// 1 is next.
    pub position: usize,
}

/// A room's AI usage and limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The UTC day the totals cover (YYYY-MM-DD).
    pub day: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub answers: u64,
    pub tokens_per_day_limit: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Online,
    Offline,
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        // Serialising these plain data types cannot fail: no maps with non-string keys, no I/O.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from("{\"type\":\"error\",\"code\":\"internal\",\"message\":\"serialisation\"}")
        })
    }

    pub fn error(reply_to: Option<Value>, error: &crate::error::DomainError) -> Self {
        ServerFrame::Error {
            reply_to,
            code: error.code,
            message: error.message.clone(),
            room: None,
        }
    }
}
