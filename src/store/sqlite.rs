//! The embedded SQLite driver. rusqlite is synchronous, so every call runs on tokio's blocking
//! pool. SQLite has one writer at a time anyway: one writer connection (behind a mutex) takes all
//! writes, and a second read-only connection serves reads concurrently thanks to WAL.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use cochat_actors::error::{DomainError, ErrorCode, StoreError};
use cochat_actors::event::{AgentInfo, Author, EventBody, Message, Reaction, StoredEvent, UserRef};
use cochat_actors::ids::{MessageId, Role, RoomId, Seq, UserId};
use cochat_actors::ports::{
    Applied, Command, Member, MessagePage, NewInvite, Partial, RoomInfo, RoomListing, RoomLog,
    RoomState, Store, UsageTotals, User, Write, WriteResult,
};
use cochat_actors::time::Timestamp;

use super::shared;

/// Embedded migrations, applied in order, each once (recorded in `schema_migrations`).
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../sql/sqlite/V001__init.sql")),
    (2, include_str!("../../sql/sqlite/V002__ai.sql")),
];

/// Internal error: lets `?` work on rusqlite errors, domain refusals and store errors alike
/// (the orphan rule forbids `From<rusqlite::Error> for StoreError` here).
struct Fail(StoreError);

impl From<rusqlite::Error> for Fail {
    fn from(error: rusqlite::Error) -> Self {
        Fail(StoreError::backend(error))
    }
}

impl From<StoreError> for Fail {
    fn from(error: StoreError) -> Self {
        Fail(error)
    }
}

impl From<DomainError> for Fail {
    fn from(error: DomainError) -> Self {
        Fail(StoreError::Domain(error))
    }
}

type R<T> = Result<T, Fail>;

/// The extended result code of a failed constraint, if that is what the error is.
fn constraint_code(error: &rusqlite::Error) -> Option<i32> {
    match error {
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Some(failure.extended_code)
        }
        _ => None,
    }
}

pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    /// The same connection as `writer` for in-memory databases (a second connection would see a
    /// different, empty database).
    reader: Arc<Mutex<Connection>>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    // FULL: an acknowledged write survives a power loss, not only a crash of the process; group
    // commit pays that fsync once per batch.
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;")
}

fn migrate(conn: &mut Connection) -> R<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER)",
    )?;
    // IMMEDIATE: two processes opening the same file at once must not both apply a migration.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (version, sql) in MIGRATIONS {
        let done: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                [version],
                |row| row.get(0),
            )
            .optional()?;
        if done.is_none() {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, Timestamp::now().millis()],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> R<T> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::Backend(format!("sqlite task failed: {error}")))?
        .map_err(|fail| fail.0)
}

/// A panic while holding the lock cannot leave a transaction half-done (rusqlite rolls back on
/// drop), so a poisoned connection is still usable.
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) and migrates a database file.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        blocking(move || {
            if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(StoreError::backend)?;
            }
            let mut writer = Connection::open(&path)?;
            configure(&writer)?;
            let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(%mode, "sqlite did not switch to WAL; readers will wait for writers");
            }
            migrate(&mut writer)?;
            let reader = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            configure(&reader)?;
            // The reader never writes; make a mistake loud instead of a lock fight.
            reader.execute_batch("PRAGMA query_only = ON")?;
            Ok(SqliteStore {
                writer: Arc::new(Mutex::new(writer)),
                reader: Arc::new(Mutex::new(reader)),
            })
        })
        .await
    }

    /// A private in-memory database (tests, demos); gone when the store is dropped.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        blocking(|| {
            let mut conn = Connection::open_in_memory()?;
            configure(&conn)?;
            migrate(&mut conn)?;
            let conn = Arc::new(Mutex::new(conn));
            Ok(SqliteStore {
                writer: conn.clone(),
                reader: conn,
            })
        })
        .await
    }

    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> R<T> + Send + 'static,
    {
        let conn = self.reader.clone();
        blocking(move || work(&lock(&conn))).await
    }

    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> R<T> + Send + 'static,
    {
        let conn = self.writer.clone();
        blocking(move || work(&mut lock(&conn))).await
    }
}

// ---------------------------------------------------------------------------------------------
// Queries shared by reads and writes.

fn room_head(conn: &Connection, room: &RoomId) -> R<Option<Seq>> {
    Ok(conn
        .prepare_cached("SELECT last_seq FROM rooms WHERE id = ?1")?
        .query_row([room.as_str()], |row| row.get(0))
        .optional()?)
}

fn role_of(conn: &Connection, room: &RoomId, user: &UserId) -> R<Option<Role>> {
    let text: Option<String> = conn
        .prepare_cached("SELECT role FROM members WHERE room_id = ?1 AND user_id = ?2")?
        .query_row([room.as_str(), user.as_str()], |row| row.get(0))
        .optional()?;
    Ok(text.map(|text| shared::role_from_text(&text)).transpose()?)
}

fn owners_count(conn: &Connection, room: &RoomId) -> R<i64> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM members WHERE room_id = ?1 AND role = 'owner'")?
        .query_row([room.as_str()], |row| row.get(0))?)
}

/// The display name, or the id when the user row is gone (never fail an event on that).
fn display_name(conn: &Connection, user: &UserId) -> R<String> {
    let name: Option<String> = conn
        .prepare_cached("SELECT display_name FROM users WHERE id = ?1")?
        .query_row([user.as_str()], |row| row.get(0))
        .optional()?;
    Ok(name.unwrap_or_else(|| user.to_string()))
}

fn reactions_of(conn: &Connection, message: &MessageId) -> R<Vec<Reaction>> {
    let mut stmt = conn
        .prepare_cached("SELECT emoji, user_id, created_at FROM reactions WHERE message_id = ?1")?;
    let rows = stmt
        .query_map([message.as_str()], |row| {
            Ok((
                row.get::<_, String>(0)?,
                UserId(row.get(1)?),
                row.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(shared::build_reactions(rows))
}

fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: UserId(row.get(0)?),
        username: row.get(1)?,
        display_name: row.get(2)?,
        created_at: Timestamp(row.get(3)?),
    })
}

fn room_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RoomInfo> {
    Ok(RoomInfo {
        id: RoomId(row.get(0)?),
        name: row.get(1)?,
        created_by: UserId(row.get(2)?),
        created_at: Timestamp(row.get(3)?),
        last_seq: row.get(4)?,
    })
}

const MESSAGE_COLUMNS: &str = "id, room_id, seq, author_id, author_name, author_kind, text, \
     reply_to, created_at, edited_at, deleted";

/// A `messages` row before its text columns are checked (author_kind may be corrupt).
fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Message, String)> {
    let message = Message {
        id: MessageId(row.get(0)?),
        room: RoomId(row.get(1)?),
        seq: row.get(2)?,
        author: Author {
            id: UserId(row.get(3)?),
            name: row.get(4)?,
            kind: cochat_actors::event::AuthorKind::User,
        },
        text: row.get(6)?,
        reply_to_message: row.get::<_, Option<String>>(7)?.map(MessageId),
        created_at: Timestamp(row.get(8)?),
        edited_at: row.get::<_, Option<i64>>(9)?.map(Timestamp),
        deleted: row.get(10)?,
        reactions: Vec::new(),
    };
    Ok((message, row.get(5)?))
}

/// Checks the author kind of fetched rows and fills in their reactions.
fn finish_messages(conn: &Connection, rows: Vec<(Message, String)>) -> R<Vec<Message>> {
    let mut messages = Vec::with_capacity(rows.len());
    for (mut message, kind) in rows {
        message.author.kind = shared::author_kind_from_text(&kind)?;
        message.reactions = reactions_of(conn, &message.id)?;
        messages.push(message);
    }
    Ok(messages)
}

/// `SUM(prompt_tokens), SUM(completion_tokens), COUNT(*)` of `ai_usage` rows.
const USAGE_SUMS: &str =
    "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), COUNT(*)";

fn usage_from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<UsageTotals> {
    Ok(shared::usage_totals(
        row.get(first)?,
        row.get(first + 1)?,
        row.get(first + 2)?,
    ))
}

fn stored_event(room: &RoomId, seq: Seq, at: i64, payload: &str) -> R<StoredEvent> {
    Ok(StoredEvent {
        room: room.clone(),
        seq,
        at: Timestamp(at),
        event: shared::payload_from_text(payload)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Writes. Each runs inside the batch transaction (in its own savepoint); domain refusals are
// returned as `Fail(StoreError::Domain)` before anything is modified.

/// Takes the room's next seq. Callers checked that the room exists.
fn next_seq(conn: &Connection, room: &RoomId) -> R<Seq> {
    Ok(conn
        .prepare_cached(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
        )?
        .query_row([room.as_str()], |row| row.get(0))?)
}

fn insert_event(
    conn: &Connection,
    room: &RoomId,
    seq: Seq,
    at: i64,
    body: EventBody,
) -> R<StoredEvent> {
    conn.prepare_cached(
        "INSERT INTO events (room_id, seq, kind, message_id, payload, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        room.as_str(),
        seq,
        body.kind(),
        body.message_id().map(MessageId::as_str),
        shared::payload_to_text(&body)?,
        at,
    ])?;
    Ok(StoredEvent {
        room: room.clone(),
        seq,
        at: Timestamp(at),
        event: body,
    })
}

/// Appends one event with the room's next seq.
fn push_event(conn: &Connection, room: &RoomId, at: i64, body: EventBody) -> R<StoredEvent> {
    let seq = next_seq(conn, room)?;
    insert_event(conn, room, seq, at, body)
}

fn applied(event: StoredEvent) -> Applied {
    Applied {
        seq: event.seq,
        event: Some(event),
        message_id: None,
        duplicate: false,
        role: None,
    }
}

fn no_op(seq: Seq) -> Applied {
    Applied {
        event: None,
        seq,
        message_id: None,
        duplicate: true,
        role: None,
    }
}

fn message_not_found() -> DomainError {
    DomainError::new(ErrorCode::MessageNotFound, "no such message in this room")
}

/// (author_id) of a live message of `room`, or `message_not_found`.
fn live_message_author(conn: &Connection, room: &RoomId, message: &MessageId) -> R<UserId> {
    let row: Option<(String, String, bool)> = conn
        .prepare_cached("SELECT room_id, author_id, deleted FROM messages WHERE id = ?1")?
        .query_row([message.as_str()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    match row {
        Some((room_id, author, false)) if room_id == room.as_str() => Ok(UserId(author)),
        _ => Err(message_not_found().into()),
    }
}

fn apply(conn: &Connection, room: &RoomId, command: Command) -> R<Applied> {
    let head = room_head(conn, room)?.ok_or_else(DomainError::room_not_found)?;
    let now = Timestamp::now().millis();
    match command {
        Command::PostMessage {
            author,
            client_msg_id,
            text,
            reply_to,
        } => {
            let earlier: Option<(String, Seq)> = conn
                .prepare_cached(
                    "SELECT id, seq FROM messages WHERE room_id = ?1 AND author_id = ?2 AND client_msg_id = ?3",
                )?
                .query_row(params![room.as_str(), author.id.as_str(), client_msg_id], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?;
            if let Some((id, seq)) = earlier {
                return Ok(Applied {
                    message_id: Some(MessageId(id)),
                    ..no_op(seq)
                });
            }
            if let Some(reply_to) = &reply_to {
                let reply_room: Option<String> = conn
                    .prepare_cached("SELECT room_id FROM messages WHERE id = ?1")?
                    .query_row([reply_to.as_str()], |row| row.get(0))
                    .optional()?;
                if reply_room.as_deref() != Some(room.as_str()) {
                    return Err(DomainError::new(
                        ErrorCode::MessageNotFound,
                        "the message you reply to is not in this room",
                    )
                    .into());
                }
            }
            let seq = next_seq(conn, room)?;
            let message = Message {
                id: MessageId::random(),
                room: room.clone(),
                seq,
                author,
                text,
                reply_to_message: reply_to,
                created_at: Timestamp(now),
                edited_at: None,
                deleted: false,
                reactions: Vec::new(),
            };
            conn.prepare_cached(
                "INSERT INTO messages (id, room_id, seq, author_id, author_name, author_kind, \
                 client_msg_id, text, reply_to, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                message.id.as_str(),
                room.as_str(),
                seq,
                message.author.id.as_str(),
                message.author.name,
                shared::author_kind_to_text(message.author.kind),
                client_msg_id,
                message.text,
                message.reply_to_message.as_ref().map(MessageId::as_str),
                now,
            ])?;
            let message_id = message.id.clone();
            let event = insert_event(conn, room, seq, now, EventBody::MessageCreated { message })?;
            Ok(Applied {
                message_id: Some(message_id),
                ..applied(event)
            })
        }
        Command::EditMessage {
            actor,
            message_id,
            text,
        } => {
            if live_message_author(conn, room, &message_id)? != actor {
                return Err(DomainError::forbidden("only the author can edit a message").into());
            }
            conn.prepare_cached("UPDATE messages SET text = ?1, edited_at = ?2 WHERE id = ?3")?
                .execute(params![text, now, message_id.as_str()])?;
            let body = EventBody::MessageEdited {
                message_id: message_id.clone(),
                text,
                edited_at: Timestamp(now),
                by: actor,
            };
            let event = push_event(conn, room, now, body)?;
            Ok(Applied {
                message_id: Some(message_id),
                ..applied(event)
            })
        }
        Command::DeleteMessage {
            actor,
            actor_is_admin,
            message_id,
        } => {
            if live_message_author(conn, room, &message_id)? != actor && !actor_is_admin {
                return Err(DomainError::forbidden(
                    "only the author or an admin can delete a message",
                )
                .into());
            }
            conn.prepare_cached("UPDATE messages SET deleted = 1, text = '' WHERE id = ?1")?
                .execute([message_id.as_str()])?;
            conn.prepare_cached("DELETE FROM reactions WHERE message_id = ?1")?
                .execute([message_id.as_str()])?;
            redact(conn, room, &message_id)?;
            let body = EventBody::MessageDeleted {
                message_id: message_id.clone(),
                by: actor,
            };
            let event = push_event(conn, room, now, body)?;
            Ok(Applied {
                message_id: Some(message_id),
                ..applied(event)
            })
        }
        Command::React {
            actor,
            message_id,
            emoji,
            on,
        } => {
            live_message_author(conn, room, &message_id)?;
            let changed = if on {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO reactions (message_id, user_id, emoji, created_at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![message_id.as_str(), actor.as_str(), emoji, now])?
            } else {
                conn.prepare_cached(
                    "DELETE FROM reactions WHERE message_id = ?1 AND user_id = ?2 AND emoji = ?3",
                )?
                .execute(params![message_id.as_str(), actor.as_str(), emoji])?
            };
            if changed == 0 {
                return Ok(Applied {
                    message_id: Some(message_id),
                    ..no_op(head)
                });
            }
            let body = EventBody::ReactionChanged {
                message_id: message_id.clone(),
                emoji,
                user: actor,
                on,
                reactions: reactions_of(conn, &message_id)?,
            };
            let event = push_event(conn, room, now, body)?;
            Ok(Applied {
                message_id: Some(message_id),
                ..applied(event)
            })
        }
        Command::JoinByInvite { user, code } => {
            // (room_id, role, max_uses, uses, expires_at)
            type InviteRow = (String, String, Option<i64>, i64, Option<i64>);
            let invite: Option<InviteRow> = conn
                .prepare_cached(
                    "SELECT room_id, role, max_uses, uses, expires_at FROM invites WHERE code = ?1",
                )?
                .query_row([code.as_str()], |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                })
                .optional()?;
            // A member accepting their room's invite again changes nothing, even once the
            // invite is used up or expired: accepting is idempotent.
            if invite
                .as_ref()
                .is_some_and(|found| found.0 == room.as_str())
            {
                if let Some(current) = role_of(conn, room, &user.id)? {
                    return Ok(Applied {
                        role: Some(current),
                        ..no_op(head)
                    });
                }
            }
            let role = match invite {
                Some((invite_room, role, max_uses, uses, expires_at))
                    if invite_room == room.as_str()
                        && expires_at.is_none_or(|at| at > now)
                        && max_uses.is_none_or(|max| uses < max) =>
                {
                    shared::role_from_text(&role)?
                }
                _ => {
                    return Err(DomainError::new(
                        ErrorCode::InviteInvalid,
                        "this invite does not exist, has expired or is used up",
                    )
                    .into())
                }
            };
            if let Some(current) = role_of(conn, room, &user.id)? {
                return Ok(Applied {
                    role: Some(current),
                    ..no_op(head)
                });
            }
            let known: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM users WHERE id = ?1")?
                .query_row([user.id.as_str()], |row| row.get(0))
                .optional()?;
            if known.is_none() {
                return Err(DomainError::new(ErrorCode::UserNotFound, "no such user").into());
            }
            conn.prepare_cached("UPDATE invites SET uses = uses + 1 WHERE code = ?1")?
                .execute([code.as_str()])?;
            conn.prepare_cached(
                "INSERT INTO members (room_id, user_id, role, joined_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                room.as_str(),
                user.id.as_str(),
                shared::role_to_text(role),
                now
            ])?;
            let event = push_event(conn, room, now, EventBody::MemberJoined { user, role })?;
            Ok(Applied {
                role: Some(role),
                ..applied(event)
            })
        }
        Command::RemoveMember { actor, user } => {
            let reason = shared::check_remove(
                &actor,
                role_of(conn, room, &actor)?,
                &user,
                role_of(conn, room, &user)?,
                owners_count(conn, room)?,
            )?;
            conn.prepare_cached("DELETE FROM members WHERE room_id = ?1 AND user_id = ?2")?
                .execute([room.as_str(), user.as_str()])?;
            let name = display_name(conn, &user)?;
            let body = EventBody::MemberLeft {
                user: UserRef { id: user, name },
                reason,
                by: actor,
            };
            Ok(applied(push_event(conn, room, now, body)?))
        }
        Command::AddAgent { actor, agent } => {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO agents (room_id, name, model, system_prompt, provider, created_by, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (room_id, name) DO NOTHING",
                )?
                .execute(params![
                    room.as_str(),
                    agent.name,
                    agent.model,
                    agent.system_prompt,
                    agent.provider,
                    actor.as_str(),
                    now
                ])?;
            if inserted == 0 {
                return Err(shared::agent_exists().into());
            }
            let body = EventBody::AgentAdded { agent, by: actor };
            Ok(applied(push_event(conn, room, now, body)?))
        }
        Command::StartAnswer {
            agent,
            message_id,
            trigger_message_id,
            trigger_author,
        } => {
            let taken: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM messages WHERE id = ?1")?
                .query_row([message_id.as_str()], |row| row.get(0))
                .optional()?;
            if taken.is_some() {
                return Err(shared::answer_exists().into());
            }
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO ai_partials (message_id, room_id, agent, trigger_message_id, \
                     trigger_author, text, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, '', ?6) \
                     ON CONFLICT (message_id) DO NOTHING",
                )?
                .execute(params![
                    message_id.as_str(),
                    room.as_str(),
                    agent,
                    trigger_message_id.as_str(),
                    trigger_author.as_str(),
                    now
                ])?;
            if inserted == 0 {
                return Err(shared::answer_exists().into());
            }
            let body = EventBody::AiStarted {
                message_id: message_id.clone(),
                agent,
                trigger_message_id,
                trigger_author,
            };
            let event = push_event(conn, room, now, body)?;
            Ok(Applied {
                message_id: Some(message_id),
                ..applied(event)
            })
        }
        Command::FinishAnswer {
            author,
            message_id,
            trigger_message_id,
            charge_to,
            text,
            outcome,
            usage,
        } => {
            // Taking the checkpoint away is what makes finishing happen once: a retry finds
            // nothing and is refused before anything is written.
            let removed: Option<String> = conn
                .prepare_cached(
                    "DELETE FROM ai_partials WHERE message_id = ?1 AND room_id = ?2 RETURNING agent",
                )?
                .query_row([message_id.as_str(), room.as_str()], |row| row.get(0))
                .optional()?;
            if removed.is_none() {
                return Err(shared::answer_finished().into());
            }
            let seq = next_seq(conn, room)?;
            let message = shared::answer_message(
                room,
                seq,
                author,
                message_id,
                trigger_message_id,
                text,
                now,
            );
            if shared::answer_is_kept(&outcome, &message.text) {
                conn.prepare_cached(
                    "INSERT INTO messages (id, room_id, seq, author_id, author_name, author_kind, \
                     client_msg_id, text, reply_to, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    message.id.as_str(),
                    room.as_str(),
                    seq,
                    message.author.id.as_str(),
                    message.author.name,
                    shared::author_kind_to_text(message.author.kind),
                    shared::answer_client_msg_id(&message.id),
                    message.text,
                    message.reply_to_message.as_ref().map(MessageId::as_str),
                    now,
                ])?;
            }
            if let Some(usage) = usage {
                conn.prepare_cached(
                    "INSERT INTO ai_usage (room_id, user_id, agent, message_id, prompt_tokens, \
                     completion_tokens, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    room.as_str(),
                    charge_to.as_str(),
                    shared::agent_name_of(&message.author.id),
                    message.id.as_str(),
                    shared::tokens_to_db(usage.prompt_tokens),
                    shared::tokens_to_db(usage.completion_tokens),
                    now,
                ])?;
            }
            let message_id = message.id.clone();
            let body = shared::answer_event(message, outcome, usage);
            let event = insert_event(conn, room, seq, now, body)?;
            Ok(Applied {
                message_id: Some(message_id),
                ..applied(event)
            })
        }
        Command::ChangeRole { actor, user, role } => {
            let changed = shared::check_role_change(
                role_of(conn, room, &actor)?,
                role_of(conn, room, &user)?,
                role,
                owners_count(conn, room)?,
                actor == user,
            )?;
            if !changed {
                return Ok(no_op(head));
            }
            conn.prepare_cached(
                "UPDATE members SET role = ?1 WHERE room_id = ?2 AND user_id = ?3",
            )?
            .execute([shared::role_to_text(role), room.as_str(), user.as_str()])?;
            let name = display_name(conn, &user)?;
            let body = EventBody::MemberRoleChanged {
                user: UserRef { id: user, name },
                role,
                by: actor,
            };
            Ok(applied(push_event(conn, room, now, body)?))
        }
    }
}

/// Rewrites the earlier events of a deleted message so replays no longer carry its text.
fn redact(conn: &Connection, room: &RoomId, message: &MessageId) -> R<()> {
    let rows: Vec<(Seq, String)> = conn
        .prepare_cached("SELECT seq, payload FROM events WHERE room_id = ?1 AND message_id = ?2")?
        .query_map([room.as_str(), message.as_str()], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut update =
        conn.prepare_cached("UPDATE events SET payload = ?1 WHERE room_id = ?2 AND seq = ?3")?;
    for (seq, payload) in rows {
        let mut body = shared::payload_from_text(&payload)?;
        if shared::redact_event(&mut body) {
            update.execute(params![shared::payload_to_text(&body)?, room.as_str(), seq])?;
        }
    }
    Ok(())
}

fn append_batch(conn: &mut Connection, batch: Vec<Write>) -> R<Vec<WriteResult>> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        // A savepoint per write: a refusal (or a constraint hit half-way) undoes only that write.
        let savepoint = tx.savepoint()?;
        match apply(&savepoint, &write.room, write.command) {
            Ok(done) => {
                savepoint.commit()?;
                results.push(Ok(done));
            }
            Err(Fail(StoreError::Domain(refusal))) => {
                drop(savepoint); // rolls back this write only
                results.push(Err(refusal));
            }
            Err(other) => return Err(other),
        }
    }
    tx.commit()?;
    Ok(results)
}

// ---------------------------------------------------------------------------------------------

#[async_trait]
impl RoomLog for SqliteStore {
    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            let Some(head_seq) = room_head(conn, &room)? else {
                return Ok(None);
            };
            let mut stmt = conn.prepare_cached(
                "SELECT m.user_id, COALESCE(u.display_name, m.user_id), m.role \
                 FROM members m LEFT JOIN users u ON u.id = m.user_id WHERE m.room_id = ?1",
            )?;
            let rows: Vec<(String, String, String)> = stmt
                .query_map([room.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut members = std::collections::HashMap::with_capacity(rows.len());
            for (id, name, role) in rows {
                members.insert(UserId(id), (name, shared::role_from_text(&role)?));
            }
            Ok(Some(RoomState { head_seq, members }))
        })
        .await
    }

    async fn append(&self, batch: Vec<Write>) -> Result<Vec<WriteResult>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |conn| append_batch(conn, batch)).await
    }

    async fn events_after(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, created_at, payload FROM events WHERE room_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows: Vec<(Seq, i64, String)> = stmt
                .query_map(params![room.as_str(), after, limit], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            rows.iter()
                .map(|(seq, at, payload)| stored_event(&room, *seq, *at, payload))
                .collect()
        })
        .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError> {
        let user = User {
            id: UserId::random(),
            username: shared::normalize_username(username),
            display_name: display_name.to_owned(),
            created_at: Timestamp::now(),
        };
        let password_hash = password_hash.to_owned();
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO users (id, username, display_name, password_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![user.id.as_str(), user.username, user.display_name, password_hash, user.created_at.millis()],
            );
            match inserted {
                Ok(_) => Ok(user),
                Err(error) if constraint_code(&error) == Some(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE) => {
                    Err(DomainError::new(ErrorCode::UsernameTaken, "that username is taken").into())
                }
                Err(error) => Err(error.into()),
            }
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<(User, String)>, StoreError> {
        let username = shared::normalize_username(username);
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, username, display_name, created_at, password_hash FROM users WHERE username = ?1",
                )?
                .query_row([username], |row| Ok((user_from_row(row)?, row.get(4)?)))
                .optional()?)
        })
        .await
    }

    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, StoreError> {
        let id = id.clone();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, username, display_name, created_at FROM users WHERE id = ?1",
                )?
                .query_row([id.as_str()], user_from_row)
                .optional()?)
        })
        .await
    }

    async fn create_room(
        &self,
        name: &str,
        owner: &UserRef,
    ) -> Result<(RoomInfo, StoredEvent), StoreError> {
        let now = Timestamp::now();
        let info = RoomInfo {
            id: RoomId::random(),
            name: name.to_owned(),
            created_by: owner.id.clone(),
            created_at: now,
            last_seq: 1,
        };
        let owner = owner.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO rooms (id, name, created_by, created_at, last_seq) VALUES (?1, ?2, ?3, ?4, 1)",
                params![info.id.as_str(), info.name, info.created_by.as_str(), now.millis()],
            )?;
            let member = tx.execute(
                "INSERT INTO members (room_id, user_id, role, joined_at) VALUES (?1, ?2, 'owner', ?3)",
                params![info.id.as_str(), owner.id.as_str(), now.millis()],
            );
            if let Err(error) = member {
                if constraint_code(&error) == Some(rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY) {
                    return Err(DomainError::new(ErrorCode::UserNotFound, "no such user").into());
                }
                return Err(error.into());
            }
            let body = EventBody::MemberJoined { user: owner, role: Role::Owner };
            let event = insert_event(&tx, &info.id, 1, now.millis(), body)?;
            tx.commit()?;
            Ok((info, event))
        })
        .await
    }

    async fn room(&self, room: &RoomId) -> Result<Option<RoomInfo>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, name, created_by, created_at, last_seq FROM rooms WHERE id = ?1",
                )?
                .query_row([room.as_str()], room_from_row)
                .optional()?)
        })
        .await
    }

    async fn rooms_for_user(&self, user: &UserId) -> Result<Vec<RoomListing>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT r.id, r.name, r.created_by, r.created_at, r.last_seq, m.role, m.last_read_seq, \
                   (SELECT COUNT(*) FROM messages x WHERE x.room_id = r.id AND x.seq > m.last_read_seq \
                      AND x.author_id <> m.user_id AND NOT x.deleted) \
                 FROM members m JOIN rooms r ON r.id = m.room_id \
                 WHERE m.user_id = ?1 ORDER BY r.created_at, r.id",
            )?;
            let rows: Vec<(RoomInfo, String, Seq, i64)> = stmt
                .query_map([user.as_str()], |row| {
                    Ok((room_from_row(row)?, row.get(5)?, row.get(6)?, row.get(7)?))
                })?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(room, role, last_read_seq, unread)| {
                    Ok(RoomListing {
                        room,
                        role: shared::role_from_text(&role)?,
                        last_read_seq,
                        unread,
                    })
                })
                .collect()
        })
        .await
    }

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT m.user_id, COALESCE(u.display_name, m.user_id), m.role, m.joined_at \
                 FROM members m LEFT JOIN users u ON u.id = m.user_id \
                 WHERE m.room_id = ?1 ORDER BY m.joined_at, m.user_id",
            )?;
            let rows: Vec<(String, String, String, i64)> = stmt
                .query_map([room.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(id, name, role, joined_at)| {
                    Ok(Member {
                        user: UserRef {
                            id: UserId(id),
                            name,
                        },
                        role: shared::role_from_text(&role)?,
                        joined_at: Timestamp(joined_at),
                    })
                })
                .collect()
        })
        .await
    }

    async fn member_role(&self, room: &RoomId, user: &UserId) -> Result<Option<Role>, StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.read(move |conn| role_of(conn, &room, &user)).await
    }

    async fn create_invite(&self, invite: &NewInvite) -> Result<(), StoreError> {
        let invite = invite.clone();
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO invites (code, room_id, role, max_uses, expires_at, created_by, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    invite.code,
                    invite.room.as_str(),
                    shared::role_to_text(invite.role),
                    invite.max_uses,
                    invite.expires_at.map(Timestamp::millis),
                    invite.created_by.as_str(),
                    Timestamp::now().millis(),
                ],
            );
            match inserted {
                Ok(_) => Ok(()),
                Err(error) if constraint_code(&error) == Some(rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => {
                    Err(DomainError::new(ErrorCode::Conflict, "that invite code exists").into())
                }
                Err(error) => Err(error.into()),
            }
        })
        .await
    }

    async fn invite_room(&self, code: &str) -> Result<Option<RoomId>, StoreError> {
        let code = code.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT room_id FROM invites WHERE code = ?1")?
                .query_row([code], |row| Ok(RoomId(row.get(0)?)))
                .optional()?)
        })
        .await
    }

    async fn messages(
        &self,
        room: &RoomId,
        before_seq: Option<Seq>,
        after_seq: Option<Seq>,
        limit: u32,
    ) -> Result<MessagePage, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            // One extra row tells whether more exist in the paging direction. With both bounds,
            // `after` decides the direction (oldest first) and `before` is only an upper bound,
            // as in the Postgres driver.
            let newest_first = after_seq.is_none();
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND seq < ?2 AND seq > ?3 \
                 ORDER BY seq {} LIMIT ?4",
                if newest_first { "DESC" } else { "ASC" }
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows: Vec<(Message, String)> = stmt
                .query_map(
                    params![
                        room.as_str(),
                        before_seq.unwrap_or(i64::MAX),
                        after_seq.unwrap_or(i64::MIN),
                        i64::from(limit) + 1
                    ],
                    message_from_row,
                )?
                .collect::<Result<_, _>>()?;
            let has_more = rows.len() > limit as usize;
            let mut messages =
                finish_messages(conn, rows.into_iter().take(limit as usize).collect())?;
            if newest_first {
                messages.reverse();
            }
            Ok(MessagePage { messages, has_more })
        })
        .await
    }

    async fn mark_read(&self, room: &RoomId, user: &UserId, seq: Seq) -> Result<Seq, StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.write(move |conn| {
            let marker: Option<Seq> = conn
                .prepare_cached(
                    "UPDATE members SET last_read_seq = MAX(last_read_seq, \
                       MIN(?1, (SELECT last_seq FROM rooms WHERE id = ?2))) \
                     WHERE room_id = ?2 AND user_id = ?3 RETURNING last_read_seq",
                )?
                .query_row(params![seq, room.as_str(), user.as_str()], |row| row.get(0))
                .optional()?;
            Ok(marker.ok_or_else(DomainError::room_not_found)?)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }

    async fn agents(&self, room: &RoomId) -> Result<Vec<AgentInfo>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, model, system_prompt, provider FROM agents WHERE room_id = ?1 ORDER BY name",
            )?;
            let agents = stmt
                .query_map([room.as_str()], |row| {
                    Ok(AgentInfo {
                        name: row.get(0)?,
                        model: row.get(1)?,
                        system_prompt: row.get(2)?,
                        provider: row.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(agents)
        })
        .await
    }

    async fn message(&self, room: &RoomId, id: &MessageId) -> Result<Option<Message>, StoreError> {
        let (room, id) = (room.clone(), id.clone());
        self.read(move |conn| {
            let row = conn
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1 AND room_id = ?2"
                ))?
                .query_row([id.as_str(), room.as_str()], message_from_row)
                .optional()?;
            Ok(finish_messages(conn, row.into_iter().collect())?.pop())
        })
        .await
    }

    async fn search_messages(
        &self,
        room: &RoomId,
        query: &str,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let (room, query) = (room.clone(), query.to_owned());
        self.read(move |conn| {
            // instr, not LIKE: the query is a plain substring (`%` and `_` are literal).
            let rows: Vec<(Message, String)> = conn
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND NOT deleted \
                     AND instr(lower(text), lower(?2)) > 0 ORDER BY seq DESC LIMIT ?3"
                ))?
                .query_map(params![room.as_str(), query, limit], message_from_row)?
                .collect::<Result<_, _>>()?;
            finish_messages(conn, rows)
        })
        .await
    }

    async fn save_partial(
        &self,
        room: &RoomId,
        message_id: &MessageId,
        text: &str,
    ) -> Result<(), StoreError> {
        let (room, message_id, text) = (room.clone(), message_id.clone(), text.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE ai_partials SET text = ?1, updated_at = ?2 WHERE message_id = ?3 AND room_id = ?4",
            )?
            .execute(params![
                text,
                Timestamp::now().millis(),
                message_id.as_str(),
                room.as_str()
            ])?;
            Ok(())
        })
        .await
    }

    async fn partials(&self, room: &RoomId) -> Result<Vec<Partial>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT message_id, agent, trigger_message_id, trigger_author, text \
                 FROM ai_partials WHERE room_id = ?1 ORDER BY message_id",
            )?;
            let partials = stmt
                .query_map([room.as_str()], |row| {
                    Ok(Partial {
                        room: room.clone(),
                        message_id: MessageId(row.get(0)?),
                        agent: row.get(1)?,
                        trigger_message_id: MessageId(row.get(2)?),
                        trigger_author: UserId(row.get(3)?),
                        text: row.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(partials)
        })
        .await
    }

    async fn summary(
        &self,
        room: &RoomId,
        agent: &str,
    ) -> Result<Option<(String, Seq)>, StoreError> {
        let (room, agent) = (room.clone(), agent.to_owned());
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT summary, through_seq FROM ai_summaries WHERE room_id = ?1 AND agent = ?2",
                )?
                .query_row([room.as_str(), agent.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?)
        })
        .await
    }

    async fn save_summary(
        &self,
        room: &RoomId,
        agent: &str,
        summary: &str,
        through_seq: Seq,
    ) -> Result<(), StoreError> {
        let (room, agent, summary) = (room.clone(), agent.to_owned(), summary.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO ai_summaries (room_id, agent, summary, through_seq, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (room_id, agent) DO UPDATE SET \
                 summary = excluded.summary, through_seq = excluded.through_seq, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![
                room.as_str(),
                agent,
                summary,
                through_seq,
                Timestamp::now().millis()
            ])?;
            Ok(())
        })
        .await
    }

    async fn room_usage(&self, room: &RoomId, since: Timestamp) -> Result<UsageTotals, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {USAGE_SUMS} FROM ai_usage WHERE room_id = ?1 AND created_at >= ?2"
                ))?
                .query_row(params![room.as_str(), since.millis()], |row| {
                    usage_from_row(row, 0)
                })?)
        })
        .await
    }

    async fn user_usage(&self, user: &UserId, since: Timestamp) -> Result<UsageTotals, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {USAGE_SUMS} FROM ai_usage WHERE user_id = ?1 AND created_at >= ?2"
                ))?
                .query_row(params![user.as_str(), since.millis()], |row| {
                    usage_from_row(row, 0)
                })?)
        })
        .await
    }

    async fn room_usage_by_user(
        &self,
        room: &RoomId,
        since: Timestamp,
    ) -> Result<Vec<(UserId, UsageTotals)>, StoreError> {
        let room = room.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT user_id, {USAGE_SUMS} FROM ai_usage WHERE room_id = ?1 AND created_at >= ?2 \
                 GROUP BY user_id ORDER BY SUM(prompt_tokens) + SUM(completion_tokens) DESC, user_id"
            ))?;
            let rows = stmt
                .query_map(params![room.as_str(), since.millis()], |row| {
                    Ok((UserId(row.get(0)?), usage_from_row(row, 1)?))
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrations_apply_once() {
        let dir =
            std::env::temp_dir().join(format!("cochat-sqlite-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("nested").join("db.sqlite");
        SqliteStore::open(&path)
            .await
            .expect("first open creates and migrates");
        let store = SqliteStore::open(&path)
            .await
            .expect("second open finds the schema in place");
        let count = store
            .read(|conn| {
                Ok(
                    conn.query_row("SELECT COUNT(*) FROM schema_migrations", [], |row| {
                        row.get::<_, i64>(0)
                    })?,
                )
            })
            .await
            .expect("schema_migrations is readable");
        assert_eq!(count, MIGRATIONS.len() as i64);
        store.ping().await.expect("ping");
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn in_memory_store_works() {
        let store = SqliteStore::open_in_memory()
            .await
            .expect("in-memory store opens");
        let user = store.create_user("Ann", "Ann", "hash").await.expect("user");
        assert_eq!(user.username, "ann");
        let owner = UserRef {
            id: user.id.clone(),
            name: user.display_name.clone(),
        };
        let (room, event) = store.create_room("r", &owner).await.expect("room");
        assert_eq!(event.seq, 1);
        let state = store
            .room_state(&room.id)
            .await
            .expect("state")
            .expect("room exists");
        assert_eq!(state.head_seq, 1);
    }
}
