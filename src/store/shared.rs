//! Pure helpers both SQL drivers share, so SQLite and Postgres agree exactly on text encodings,
//! reaction summaries, redaction of deleted messages and the membership permission rules.
//! Nothing here touches a database; the drivers fetch rows and call these.

use cochat_actors::error::{DomainError, ErrorCode, StoreError};
use cochat_actors::event::{Author, AuthorKind, EventBody, LeaveReason, Message, Reaction, Usage};
use cochat_actors::ids::{MessageId, Role, RoomId, Seq, UserId};
use cochat_actors::ports::{AnswerOutcome, UsageTotals};
use cochat_actors::time::Timestamp;

/// Role as stored in `members.role` / `invites.role`.
pub fn role_to_text(role: Role) -> &'static str {
    role.as_str()
}

/// A role read back from the database; an unknown text is corrupt data, not a client error.
pub fn role_from_text(text: &str) -> Result<Role, StoreError> {
    Role::parse(text).ok_or_else(|| StoreError::Backend(format!("unknown role in store: {text:?}")))
}

/// Author kind as stored in `messages.author_kind` (and `users.kind`).
pub fn author_kind_to_text(kind: AuthorKind) -> &'static str {
    match kind {
        AuthorKind::User => "user",
        AuthorKind::Ai => "ai",
    }
}

pub fn author_kind_from_text(text: &str) -> Result<AuthorKind, StoreError> {
    match text {
        "user" => Ok(AuthorKind::User),
        "ai" => Ok(AuthorKind::Ai),
        other => Err(StoreError::Backend(format!(
            "unknown author kind in store: {other:?}"
        ))),
    }
}

/// Usernames are unique case-insensitively: stored and looked up lower-cased.
pub fn normalize_username(username: &str) -> String {
    username.trim().to_lowercase()
}

/// One row of `reactions` for a message: (emoji, user_id, created_at).
pub type ReactionRow = (String, UserId, i64);

/// Groups reaction rows by emoji. Emojis are ordered by their first reaction, users by when they
/// reacted. Ties on `created_at` (same millisecond) are broken by user id then emoji, so both
/// drivers produce the same order whatever order the rows came back in.
pub fn build_reactions(mut rows: Vec<ReactionRow>) -> Vec<Reaction> {
    rows.sort_by(|a, b| (a.2, &a.1, &a.0).cmp(&(b.2, &b.1, &b.0)));
    let mut out: Vec<Reaction> = Vec::new();
    for (emoji, user, _) in rows {
        match out.iter_mut().find(|reaction| reaction.emoji == emoji) {
            Some(reaction) => {
                reaction.users.push(user);
                reaction.count += 1;
            }
            None => out.push(Reaction {
                emoji,
                count: 1,
                users: vec![user],
            }),
        }
    }
    out
}

/// Removes a deleted message's text from one of its earlier events, so replays (`events_after`)
/// never leak it. Returns whether the payload changed (the driver rewrites the row only then).
pub fn redact_event(body: &mut EventBody) -> bool {
    match body {
        EventBody::MessageCreated { message } => {
            let changed =
                !message.text.is_empty() || !message.deleted || !message.reactions.is_empty();
            message.text.clear();
            message.deleted = true;
            message.reactions.clear();
            changed
        }
        EventBody::MessageEdited { text, .. } => {
            let changed = !text.is_empty();
            text.clear();
            changed
        }
        // An agent's answer carries its message too: same treatment as `message.created`.
        EventBody::AiCompleted { message, .. }
        | EventBody::AiFailed { message, .. }
        | EventBody::AiCancelled { message, .. } => {
            let changed =
                !message.text.is_empty() || !message.deleted || !message.reactions.is_empty();
            message.text.clear();
            message.deleted = true;
            message.reactions.clear();
            changed
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// AI agents

pub fn agent_exists() -> DomainError {
    DomainError::new(
        ErrorCode::Conflict,
        "this room already has an agent of that name",
    )
}

pub fn answer_exists() -> DomainError {
    DomainError::new(ErrorCode::Conflict, "that answer has already started")
}

pub fn answer_finished() -> DomainError {
    DomainError::new(
        ErrorCode::Conflict,
        "that answer is not in progress (finished already, or never started)",
    )
}

/// The agent name behind an agent's author id (`ai:<name>`); other ids are taken as they are.
pub fn agent_name_of(author: &UserId) -> &str {
    author
        .as_str()
        .strip_prefix("ai:")
        .unwrap_or(author.as_str())
}

/// `messages.client_msg_id` of an answer: unique per message, and apart from clients' ids.
pub fn answer_client_msg_id(message: &MessageId) -> String {
    format!("ai:{}", message.as_str())
}

/// The message an answer ends with (author kind `ai`, a reply to the trigger, seq = the event's).
pub fn answer_message(
    room: &RoomId,
    seq: Seq,
    author: Author,
    id: MessageId,
    trigger: MessageId,
    text: String,
    now: i64,
) -> Message {
    Message {
        id,
        room: room.clone(),
        seq,
        author: Author {
            kind: AuthorKind::Ai,
            ..author
        },
        text,
        reply_to_message: Some(trigger),
        created_at: Timestamp(now),
        edited_at: None,
        deleted: false,
        reactions: Vec::new(),
    }
}

/// Whether a finished answer is stored as a message: always when completed, otherwise only if
/// something was streamed before the failure or cancellation.
pub fn answer_is_kept(outcome: &AnswerOutcome, text: &str) -> bool {
    matches!(outcome, AnswerOutcome::Completed) || !text.is_empty()
}

/// The event that ends an answer.
pub fn answer_event(message: Message, outcome: AnswerOutcome, usage: Option<Usage>) -> EventBody {
    match outcome {
        AnswerOutcome::Completed => EventBody::AiCompleted { message, usage },
        AnswerOutcome::Failed { code, reason } => EventBody::AiFailed {
            message,
            code,
            reason,
        },
        AnswerOutcome::Cancelled { by } => EventBody::AiCancelled { message, by },
    }
}

/// Token counts are BIGINT columns; no provider reports anywhere near `i64::MAX`, so saturate.
pub fn tokens_to_db(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

pub fn tokens_from_db(tokens: i64) -> u64 {
    u64::try_from(tokens).unwrap_or(0)
}

/// Totals from a `SUM(prompt_tokens), SUM(completion_tokens), COUNT(*)` row.
pub fn usage_totals(prompt: i64, completion: i64, answers: i64) -> UsageTotals {
    UsageTotals {
        prompt_tokens: tokens_from_db(prompt),
        completion_tokens: tokens_from_db(completion),
        answers: tokens_from_db(answers),
    }
}

/// Serialises an event body for `events.payload` (TEXT in SQLite; Postgres may use `to_value`).
pub fn payload_to_text(body: &EventBody) -> Result<String, StoreError> {
    serde_json::to_string(body).map_err(StoreError::backend)
}

pub fn payload_from_text(text: &str) -> Result<EventBody, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Backend(format!("bad event payload: {error}")))
}

pub fn payload_to_value(body: &EventBody) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(body).map_err(StoreError::backend)
}

pub fn payload_from_value(value: serde_json::Value) -> Result<EventBody, StoreError> {
    serde_json::from_value(value)
        .map_err(|error| StoreError::Backend(format!("bad event payload: {error}")))
}

fn last_owner() -> DomainError {
    DomainError::new(
        ErrorCode::Conflict,
        "the room needs an owner: make someone else owner first",
    )
}

fn not_a_member() -> DomainError {
    DomainError::new(
        ErrorCode::UserNotFound,
        "that user is not a member of this room",
    )
}

/// Whether `actor` may remove `target` from a room, and why it counts as leaving or a kick.
/// `owners_count` is the number of owners in the room now (target included).
/// Check order matters and is part of the contract: target first, then leave, then kick rights.
pub fn check_remove(
    actor: &UserId,
    actor_role: Option<Role>,
    target: &UserId,
    target_role: Option<Role>,
    owners_count: i64,
) -> Result<LeaveReason, DomainError> {
    let target_role = target_role.ok_or_else(not_a_member)?;
    if actor == target {
        if target_role == Role::Owner && owners_count <= 1 {
            return Err(last_owner());
        }
        return Ok(LeaveReason::Left);
    }
    // A non-member must not learn anything about the room.
    let actor_role = actor_role.ok_or_else(DomainError::room_not_found)?;
    if !actor_role.is_admin() {
        return Err(DomainError::forbidden(
            "only admins and owners can remove members",
        ));
    }
    if actor_role.rank() <= target_role.rank() {
        return Err(DomainError::forbidden(
            "you can only remove members below your own role",
        ));
    }
    Ok(LeaveReason::Kicked)
}

/// Whether `actor` may give `target` the role `new_role`. `Ok(false)` means the target already
/// has it (nothing to write); `Ok(true)` means apply the change.
pub fn check_role_change(
    actor_role: Option<Role>,
    target_role: Option<Role>,
    new_role: Role,
    owners_count: i64,
    actor_is_target: bool,
) -> Result<bool, DomainError> {
    let actor_role = actor_role.ok_or_else(DomainError::room_not_found)?;
    if !actor_role.is_admin() {
        return Err(DomainError::forbidden(
            "only admins and owners can change roles",
        ));
    }
    let target_role = target_role.ok_or_else(not_a_member)?;
    if new_role == Role::Ai {
        return Err(DomainError::validation(
            "the ai role is given to agents, not assigned",
        ));
    }
    if new_role.rank() > actor_role.rank() {
        return Err(DomainError::forbidden("never above your own role"));
    }
    // Owners may re-rank anyone (including other owners); admins only those below them.
    if actor_role != Role::Owner && target_role.rank() >= actor_role.rank() {
        return Err(DomainError::forbidden(
            "you can only change the role of members below your own role",
        ));
    }
    if new_role == target_role {
        return Ok(false);
    }
    if target_role == Role::Owner && owners_count <= 1 {
        return Err(if actor_is_target {
            last_owner()
        } else {
            DomainError::new(ErrorCode::Conflict, "the room needs at least one owner")
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cochat_actors::event::{Author, Message};
    use cochat_actors::ids::{MessageId, RoomId};
    use cochat_actors::time::Timestamp;

    fn u(name: &str) -> UserId {
        UserId::from(name)
    }

    fn code<T: std::fmt::Debug>(result: Result<T, DomainError>) -> ErrorCode {
        result.expect_err("the rule refuses this").code
    }

    #[test]
    fn texts_round_trip() {
        for role in [
            Role::Guest,
            Role::Member,
            Role::Ai,
            Role::Admin,
            Role::Owner,
        ] {
            assert_eq!(
                role_from_text(role_to_text(role)).expect("known role"),
                role
            );
        }
        assert!(role_from_text("king").is_err());
        for kind in [AuthorKind::User, AuthorKind::Ai] {
            assert_eq!(
                author_kind_from_text(author_kind_to_text(kind)).expect("known kind"),
                kind
            );
        }
        assert!(author_kind_from_text("bot").is_err());
        assert_eq!(normalize_username(" Alice "), "alice");
    }

    #[test]
    fn reactions_group_by_emoji_in_first_reaction_order() {
        let rows = vec![
            ("👍".to_owned(), u("c"), 30),
            ("🎉".to_owned(), u("a"), 20),
            ("👍".to_owned(), u("b"), 10),
            ("👍".to_owned(), u("a"), 10),
        ];
        let reactions = build_reactions(rows);
        assert_eq!(reactions.len(), 2);
        assert_eq!(reactions[0].emoji, "👍");
        assert_eq!(reactions[0].count, 3);
        // Same millisecond: user id breaks the tie.
        assert_eq!(reactions[0].users, vec![u("a"), u("b"), u("c")]);
        assert_eq!(reactions[1].emoji, "🎉");
        assert_eq!(reactions[1].users, vec![u("a")]);
        assert!(build_reactions(Vec::new()).is_empty());
    }

    #[test]
    fn redaction_clears_text_of_created_and_edited_only() {
        let mut created = EventBody::MessageCreated {
            message: Message {
                id: MessageId::from("m"),
                room: RoomId::from("r"),
                seq: 2,
                author: Author {
                    id: u("a"),
                    name: "A".into(),
                    kind: AuthorKind::User,
                },
                text: "secret".into(),
                reply_to_message: None,
                created_at: Timestamp(1),
                edited_at: None,
                deleted: false,
                reactions: build_reactions(vec![("👍".into(), u("b"), 1)]),
            },
        };
        assert!(redact_event(&mut created));
        let EventBody::MessageCreated { message } = &created else {
            unreachable!()
        };
        assert!(message.text.is_empty() && message.deleted && message.reactions.is_empty());
        assert!(
            !redact_event(&mut created),
            "redacting twice changes nothing"
        );

        let mut edited = EventBody::MessageEdited {
            message_id: MessageId::from("m"),
            text: "secret 2".into(),
            edited_at: Timestamp(2),
            by: u("a"),
        };
        assert!(redact_event(&mut edited));
        assert_eq!(
            edited,
            EventBody::MessageEdited {
                message_id: MessageId::from("m"),
                text: String::new(),
                edited_at: Timestamp(2),
                by: u("a"),
            }
        );
        let mut deleted = EventBody::MessageDeleted {
            message_id: MessageId::from("m"),
            by: u("a"),
        };
        assert!(!redact_event(&mut deleted));
    }

    #[test]
    fn answers() {
        let author = Author {
            id: u("ai:helper"),
            name: "helper".into(),
            // The stored message is the agent's whatever the caller passed.
            kind: AuthorKind::User,
        };
        let message = answer_message(
            &RoomId::from("r"),
            7,
            author,
            MessageId::from("m"),
            MessageId::from("t"),
            "partial".into(),
            42,
        );
        assert_eq!(message.author.kind, AuthorKind::Ai);
        assert_eq!(
            (
                message.seq,
                message.reply_to_message.clone(),
                message.created_at
            ),
            (7, Some(MessageId::from("t")), Timestamp(42))
        );
        assert_eq!(agent_name_of(&message.author.id), "helper");
        assert_eq!(agent_name_of(&u("plain")), "plain");
        assert_eq!(answer_client_msg_id(&message.id), "ai:m");
        assert!(answer_is_kept(&AnswerOutcome::Completed, ""));
        let cancelled = AnswerOutcome::Cancelled { by: u("a") };
        assert!(!answer_is_kept(&cancelled, ""));
        assert!(answer_is_kept(&cancelled, "x"));
        assert_eq!(tokens_to_db(u64::MAX), i64::MAX);
        assert_eq!(tokens_from_db(-1), 0);
        assert_eq!(usage_totals(3, 4, 1).total(), 7);

        // Deleting an answer redacts its event like a post's.
        let mut event = answer_event(
            message,
            AnswerOutcome::Failed {
                code: "c".into(),
                reason: "r".into(),
            },
            None,
        );
        assert!(redact_event(&mut event));
        let EventBody::AiFailed { message, .. } = &event else {
            panic!("ai.failed")
        };
        assert!(message.text.is_empty() && message.deleted);
        assert!(!redact_event(&mut event));
    }

    #[test]
    fn payload_round_trips() {
        let body = EventBody::MessageDeleted {
            message_id: MessageId::from("m"),
            by: u("a"),
        };
        let text = payload_to_text(&body).expect("serialises");
        assert_eq!(payload_from_text(&text).expect("parses"), body);
        let value = payload_to_value(&body).expect("serialises");
        assert_eq!(payload_from_value(value).expect("parses"), body);
        assert!(payload_from_text("{\"kind\":\"nope\"}").is_err());
    }

    #[test]
    fn leaving() {
        let (a, b) = (u("a"), u("b"));
        assert_eq!(
            check_remove(&a, Some(Role::Member), &a, Some(Role::Member), 1),
            Ok(LeaveReason::Left)
        );
        assert_eq!(
            check_remove(&a, Some(Role::Owner), &a, Some(Role::Owner), 2),
            Ok(LeaveReason::Left)
        );
        assert_eq!(
            code(check_remove(
                &a,
                Some(Role::Owner),
                &a,
                Some(Role::Owner),
                1
            )),
            ErrorCode::Conflict
        );
        assert_eq!(
            code(check_remove(&a, None, &b, None, 1)),
            ErrorCode::UserNotFound
        );
    }

    #[test]
    fn kicking_needs_admin_and_a_strictly_higher_role() {
        let (a, b) = (u("a"), u("b"));
        let kick = |actor: Option<Role>, target: Role| check_remove(&a, actor, &b, Some(target), 1);
        assert_eq!(
            kick(Some(Role::Admin), Role::Member),
            Ok(LeaveReason::Kicked)
        );
        assert_eq!(kick(Some(Role::Admin), Role::Ai), Ok(LeaveReason::Kicked));
        assert_eq!(
            kick(Some(Role::Owner), Role::Admin),
            Ok(LeaveReason::Kicked)
        );
        assert_eq!(
            code(kick(Some(Role::Admin), Role::Admin)),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(kick(Some(Role::Admin), Role::Owner)),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(kick(Some(Role::Owner), Role::Owner)),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(kick(Some(Role::Member), Role::Guest)),
            ErrorCode::Forbidden
        );
        assert_eq!(code(kick(None, Role::Guest)), ErrorCode::RoomNotFound);
    }

    #[test]
    fn role_changes() {
        let change =
            |actor, target, new, owners, same| check_role_change(actor, target, new, owners, same);
        assert_eq!(
            change(Some(Role::Owner), Some(Role::Member), Role::Admin, 1, false),
            Ok(true)
        );
        assert_eq!(
            change(Some(Role::Owner), Some(Role::Member), Role::Owner, 1, false),
            Ok(true)
        );
        assert_eq!(
            change(Some(Role::Owner), Some(Role::Owner), Role::Admin, 2, false),
            Ok(true)
        );
        assert_eq!(
            change(Some(Role::Admin), Some(Role::Member), Role::Guest, 1, false),
            Ok(true)
        );
        assert_eq!(
            change(Some(Role::Admin), Some(Role::Guest), Role::Admin, 1, false),
            Ok(true)
        );
        assert_eq!(
            change(
                Some(Role::Admin),
                Some(Role::Member),
                Role::Member,
                1,
                false
            ),
            Ok(false)
        );
        assert_eq!(
            change(Some(Role::Owner), Some(Role::Owner), Role::Owner, 1, true),
            Ok(false)
        );
        // never above your own role
        assert_eq!(
            code(change(
                Some(Role::Admin),
                Some(Role::Member),
                Role::Owner,
                1,
                false
            )),
            ErrorCode::Forbidden
        );
        // an admin cannot touch another admin or an owner
        assert_eq!(
            code(change(
                Some(Role::Admin),
                Some(Role::Admin),
                Role::Member,
                1,
                false
            )),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(change(
                Some(Role::Admin),
                Some(Role::Owner),
                Role::Admin,
                1,
                false
            )),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(change(
                Some(Role::Member),
                Some(Role::Guest),
                Role::Member,
                1,
                false
            )),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(change(None, Some(Role::Guest), Role::Member, 1, false)),
            ErrorCode::RoomNotFound
        );
        assert_eq!(
            code(change(Some(Role::Owner), None, Role::Member, 1, false)),
            ErrorCode::UserNotFound
        );
        assert_eq!(
            code(change(
                Some(Role::Owner),
                Some(Role::Member),
                Role::Ai,
                1,
                false
            )),
            ErrorCode::Validation
        );
        // the last owner cannot be demoted, by themselves or anyone
        assert_eq!(
            code(change(
                Some(Role::Owner),
                Some(Role::Owner),
                Role::Admin,
                1,
                true
            )),
            ErrorCode::Conflict
        );
        assert_eq!(
            change(Some(Role::Owner), Some(Role::Owner), Role::Admin, 2, true),
            Ok(true)
        );
    }
}
