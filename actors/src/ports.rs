//! The ports: what the actors need from the outside world, as traits. Drivers live in the
//! `cochat` package (SQLite, Postgres, Redis); in-memory fakes for unit tests live in `fakes`.

use std::collections::HashMap;

use async_trait::async_trait;

use crate::error::{DomainError, StoreError};
use crate::event::{AgentInfo, Author, Message, StoredEvent, Usage, UserRef};
use crate::ids::{MessageId, Role, RoomId, Seq, UserId};
use crate::time::Timestamp;

/// A durable change to one room. Each applied command appends one event with the room's next seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Idempotent on `(room, author, client_msg_id)`: a repeat answers with the first ack.
    PostMessage {
        author: Author,
        client_msg_id: String,
        text: String,
        reply_to: Option<MessageId>,
    },
    /// Author only.
    EditMessage {
        actor: UserId,
        message_id: MessageId,
        text: String,
    },
    /// Author, or admin+ (`actor_is_admin` is decided by the caller from the actor's role).
    DeleteMessage {
        actor: UserId,
        actor_is_admin: bool,
        message_id: MessageId,
    },
    React {
        actor: UserId,
        message_id: MessageId,
        emoji: String,
        on: bool,
    },
    /// Consumes one use of a valid invite and adds the user with the invite's role.
    /// Accepting while already a member changes nothing and applies no event.
    JoinByInvite { user: UserRef, code: String },
    /// Leave (`actor == user`) or kick (admin+, and not someone of a higher role).
    RemoveMember { actor: UserId, user: UserId },
    /// Admin+; never to a role above the actor's own, never on someone above the actor.
    ChangeRole {
        actor: UserId,
        user: UserId,
        role: Role,
    },
    /// Admin+ (checked by the caller); `conflict` when the room has an agent of that name
    /// (the default `ai` counts as existing only once stored). Event `agent.added`.
    AddAgent { actor: UserId, agent: AgentInfo },
    /// Event `ai.started`; also stores a partial checkpoint (empty text) for `message_id`.
    StartAnswer {
        agent: String,
        message_id: MessageId,
        trigger_message_id: MessageId,
        trigger_author: UserId,
    },
    /// Ends an answer: inserts the message (author kind `ai`, `id = message_id`, `seq` = this
    /// event's seq) unless the outcome is not `Completed` and the text is empty, appends the
    /// event for the outcome (`ai.completed` / `ai.failed` / `ai.cancelled`, carrying the
    /// message), writes a usage ledger row charged to `charge_to` when `usage` is given, and
    /// deletes the partial checkpoint.
    FinishAnswer {
        author: Author,
        message_id: MessageId,
        trigger_message_id: MessageId,
        charge_to: UserId,
        text: String,
        outcome: AnswerOutcome,
        usage: Option<Usage>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerOutcome {
    Completed,
    Failed { code: String, reason: String },
    Cancelled { by: UserId },
}

/// An answer in progress, as checkpointed for rooms and clients that join mid-answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    pub room: RoomId,
    pub message_id: MessageId,
    pub agent: String,
    pub trigger_message_id: MessageId,
    pub trigger_author: UserId,
    pub text: String,
}

/// Tokens used since some time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub answers: u64,
}

impl UsageTotals {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A command addressed to a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub room: RoomId,
    pub command: Command,
}

/// What an applied (or repeated) command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The new event, or `None` for a repeat (`duplicate`) or a no-op (already a member).
    pub event: Option<StoredEvent>,
    /// The seq the command is acknowledged with (the original one for a repeat).
    pub seq: Seq,
    pub message_id: Option<MessageId>,
    pub duplicate: bool,
    /// For `JoinByInvite`: the role the user holds now.
    pub role: Option<Role>,
}

pub type WriteResult = Result<Applied, DomainError>;

/// What a Room needs when it starts: where its log ends and who may do what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomState {
    pub head_seq: Seq,
    pub members: HashMap<UserId, (String, Role)>,
}

/// The part of the store the actors use: the room log.
#[async_trait]
pub trait RoomLog: Send + Sync + 'static {
    /// `None` when the room does not exist.
    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError>;

    /// Applies the writes in order, in ONE transaction (group commit). Each write gets its own
    /// result; a refused write does not affect the others. A backend failure fails them all
    /// and nothing is committed.
    async fn append(&self, batch: Vec<Write>) -> Result<Vec<WriteResult>, StoreError>;

    /// Events with `after < seq`, in seq order, at most `limit`.
    async fn events_after(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    pub id: RoomId,
    pub name: String,
    pub created_by: UserId,
    pub created_at: Timestamp,
    pub last_seq: Seq,
}

/// A room as listed for one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomListing {
    pub room: RoomInfo,
    pub role: Role,
    pub last_read_seq: Seq,
    /// Messages by others after the read marker that are not deleted.
    pub unread: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: UserRef,
    pub role: Role,
    pub joined_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewInvite {
    pub code: String,
    pub room: RoomId,
    pub role: Role,
    pub max_uses: Option<i64>,
    pub expires_at: Option<Timestamp>,
    pub created_by: UserId,
}

/// One page of history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// Everything else the server stores: accounts, rooms, invites, history, read markers.
#[async_trait]
pub trait Store: RoomLog {
    /// Fails with `username_taken` when the (lower-cased) name exists.
    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError>;
    /// The user and their password hash.
    async fn user_by_name(&self, username: &str) -> Result<Option<(User, String)>, StoreError>;
    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, StoreError>;

    /// Creates the room, makes `owner` its owner and appends `member.joined` as seq 1.
    async fn create_room(
        &self,
        name: &str,
        owner: &UserRef,
    ) -> Result<(RoomInfo, StoredEvent), StoreError>;
    async fn room(&self, room: &RoomId) -> Result<Option<RoomInfo>, StoreError>;
    async fn rooms_for_user(&self, user: &UserId) -> Result<Vec<RoomListing>, StoreError>;
    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, StoreError>;
    async fn member_role(&self, room: &RoomId, user: &UserId) -> Result<Option<Role>, StoreError>;

    async fn create_invite(&self, invite: &NewInvite) -> Result<(), StoreError>;
    /// The room an invite code belongs to, if the code exists (valid or not).
    async fn invite_room(&self, code: &str) -> Result<Option<RoomId>, StoreError>;

    /// Messages in seq order: the newest `limit` before `before_seq`, or the oldest `limit` after
    /// `after_seq`, or the newest `limit` when neither is given.
    async fn messages(
        &self,
        room: &RoomId,
        before_seq: Option<Seq>,
        after_seq: Option<Seq>,
        limit: u32,
    ) -> Result<MessagePage, StoreError>;

    /// Moves the read marker forward (never back) and returns where it is.
    async fn mark_read(&self, room: &RoomId, user: &UserId, seq: Seq) -> Result<Seq, StoreError>;

    /// Cheap round trip for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    // --- AI agents -------------------------------------------------------------------------

    /// The room's stored personas (the default `ai` is implicit unless stored), by name.
    async fn agents(&self, room: &RoomId) -> Result<Vec<AgentInfo>, StoreError>;
    /// One message of the room (deleted ones as tombstones), with reactions.
    async fn message(&self, room: &RoomId, id: &MessageId) -> Result<Option<Message>, StoreError>;
    /// Messages of the room whose text contains `query` (case-insensitive), newest first, not
    /// deleted, at most `limit`.
    async fn search_messages(
        &self,
        room: &RoomId,
        query: &str,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
    /// Replaces the checkpointed text of an answer in progress (no-op if it has finished).
    async fn save_partial(
        &self,
        room: &RoomId,
        message_id: &MessageId,
        text: &str,
    ) -> Result<(), StoreError>;
    /// Answers in progress in the room (started, not finished).
    async fn partials(&self, room: &RoomId) -> Result<Vec<Partial>, StoreError>;
    /// The rolling summary of the room's history for an agent, and the last seq it covers.
    async fn summary(
        &self,
        room: &RoomId,
        agent: &str,
    ) -> Result<Option<(String, Seq)>, StoreError>;
    async fn save_summary(
        &self,
        room: &RoomId,
        agent: &str,
        summary: &str,
        through_seq: Seq,
    ) -> Result<(), StoreError>;
    /// Tokens charged in the room since `since` (all users).
    async fn room_usage(&self, room: &RoomId, since: Timestamp) -> Result<UsageTotals, StoreError>;
    /// Tokens charged to the user since `since` (all rooms).
    async fn user_usage(&self, user: &UserId, since: Timestamp) -> Result<UsageTotals, StoreError>;
    /// Tokens charged in the room since `since`, per user.
    async fn room_usage_by_user(
        &self,
        room: &RoomId,
        since: Timestamp,
    ) -> Result<Vec<(UserId, UsageTotals)>, StoreError>;
}

/// Measurements the actors report; the server maps them onto Prometheus metrics.
/// Every method has an empty default so fakes and tests implement nothing.
pub trait Telemetry: Send + Sync + 'static {
    /// One group commit: how many writes it carried, how long the transaction took, whether it
    /// committed.
    fn commit_batch(&self, _writes: usize, _elapsed: std::time::Duration, _committed: bool) {}
    /// A durable event left a Room for its local subscribers, `lag` after it was committed.
    fn event_delivered(&self, _lag: std::time::Duration) {}
    /// A Room actor started (`+1`) or stopped (`-1`).
    fn rooms_changed(&self, _delta: i64) {}
}

/// Telemetry that records nothing.
pub struct NoTelemetry;

impl Telemetry for NoTelemetry {}
