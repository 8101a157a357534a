//! Durable room events: what the log stores, in `seq` order, and what `event` frames carry.
//! Kinds are past tense (`message.created`); the set only grows, clients skip kinds they do not know.

use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, Role, RoomId, Seq, UserId};
use crate::time::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorKind {
    User,
    Ai,
}

/// Who wrote a message, as shown to readers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Author {
    pub id: UserId,
    pub name: String,
    pub kind: AuthorKind,
}

/// A user as shown in member lists and member events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    pub id: UserId,
    pub name: String,
}

/// Everyone who reacted to a message with one emoji.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    pub emoji: String,
    pub count: u32,
    pub users: Vec<UserId>,
}

/// A chat message as readers see it (history and `message.created`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    pub room: RoomId,
    /// The seq of the `message.created` event.
    pub seq: Seq,
    pub author: Author,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to_message: Option<MessageId>,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<Timestamp>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub reactions: Vec<Reaction>,
}

/// Why someone is no longer a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaveReason {
    Left,
    Kicked,
}

/// The body of a durable event, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum EventBody {
    #[serde(rename = "message.created")]
    MessageCreated { message: Message },
    #[serde(rename = "message.edited")]
    MessageEdited {
        message_id: MessageId,
        text: String,
        edited_at: Timestamp,
        by: UserId,
    },
    /// A tombstone: the text is gone from history and from replays of the earlier events.
    #[serde(rename = "message.deleted")]
    MessageDeleted { message_id: MessageId, by: UserId },
    #[serde(rename = "reaction.changed")]
    ReactionChanged {
        message_id: MessageId,
        emoji: String,
        user: UserId,
        on: bool,
        /// The message's reactions after the change.
        reactions: Vec<Reaction>,
    },
    #[serde(rename = "member.joined")]
    MemberJoined { user: UserRef, role: Role },
    #[serde(rename = "member.left")]
    MemberLeft {
        user: UserRef,
        reason: LeaveReason,
        by: UserId,
    },
    #[serde(rename = "member.role_changed")]
    MemberRoleChanged {
        user: UserRef,
        role: Role,
        by: UserId,
    },
    /// An admin added an AI persona to the room.
    #[serde(rename = "agent.added")]
    AgentAdded { agent: AgentInfo, by: UserId },
    /// An agent began answering `trigger_message_id`; its answer will be `message_id`.
    #[serde(rename = "ai.started")]
    AiStarted {
        message_id: MessageId,
        agent: String,
        trigger_message_id: MessageId,
        trigger_author: UserId,
    },
    /// The answer, persisted as a message of the room (author kind `ai`).
    #[serde(rename = "ai.completed")]
    AiCompleted {
        message: Message,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    /// The answer failed; `message.text` keeps what was streamed before the failure.
    #[serde(rename = "ai.failed")]
    AiFailed {
        message: Message,
        code: String,
        reason: String,
    },
    /// The answer was cancelled; `message.text` keeps what was streamed before.
    #[serde(rename = "ai.cancelled")]
    AiCancelled { message: Message, by: UserId },
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
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
        }
    }

    /// The message this event is about, if any (used to redact a deleted message's earlier events).
    pub fn message_id(&self) -> Option<&MessageId> {
        match self {
            EventBody::MessageCreated { message }
            | EventBody::AiCompleted { message, .. }
            | EventBody::AiFailed { message, .. }
            | EventBody::AiCancelled { message, .. } => Some(&message.id),
            EventBody::AiStarted { message_id, .. } => Some(message_id),
            EventBody::MessageEdited { message_id, .. }
            | EventBody::MessageDeleted { message_id, .. }
            | EventBody::ReactionChanged { message_id, .. } => Some(message_id),
            _ => None,
        }
    }
}

/// An AI persona of a room. Every room has the default `ai` even when none is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Lower-case, 1-32 of `a-z 0-9 _ -`; mentioned as `@name`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

impl AgentInfo {
    pub const DEFAULT_NAME: &'static str = "ai";

    pub fn default_agent() -> Self {
        Self {
            name: Self::DEFAULT_NAME.to_owned(),
            model: None,
            system_prompt: None,
            provider: None,
        }
    }

    /// The author id of this agent's messages (agents are not users; the prefix keeps the two
    /// id spaces apart).
    pub fn author_id(&self) -> UserId {
        UserId(format!("ai:{}", self.name))
    }
}

/// Tokens one answer used (as the provider reported them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One entry of a room's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub room: RoomId,
    pub seq: Seq,
    pub at: Timestamp,
    pub event: EventBody,
}
