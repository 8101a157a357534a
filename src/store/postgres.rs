//! The PostgreSQL driver: `RoomLog` and `Store` over a deadpool-postgres pool.
//!
//! `append` is the hot path (group commit): one transaction per batch that first locks the batch's
//! rooms in id order (`FOR UPDATE`; the same order on every node, so no deadlocks), reads what the
//! posts need in two queries (duplicates, reply targets), validates each write before it mutates
//! anything, and writes posts with multi-row `UNNEST` inserts. Other commands are rare; they run
//! their own statements after the pending posts are flushed so they see them.
//!
//! Text encodings, reaction summaries, redaction and the membership rules come from
//! `super::shared`, so this driver and the SQLite one agree exactly.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{NoTls, Row};

use cochat_actors::error::{DomainError, ErrorCode, StoreError};
use cochat_actors::event::{AgentInfo, Author, EventBody, Message, StoredEvent, Usage, UserRef};
use cochat_actors::ids::{MessageId, Role, RoomId, Seq, UserId};
use cochat_actors::ports::{
    AnswerOutcome, Applied, Command, Member, MessagePage, NewInvite, Partial, RoomInfo,
    RoomListing, RoomLog, RoomState, Store, UsageTotals, User, Write, WriteResult,
};
use cochat_actors::time::Timestamp;

use super::shared;

const DEFAULT_POOL_SIZE: usize = 16;

/// Key of the advisory lock that serialises migrations between replicas starting together.
/// Any constant works as long as it is the same everywhere ("cochat" in ASCII).
const MIGRATION_LOCK: i64 = 0x636f_6368_6174;

/// Embedded migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../sql/postgres/V001__init.sql")),
    (2, include_str!("../../sql/postgres/V002__ai.sql")),
];

/// A backend failure with its cause chain: tokio-postgres' own `Display` stops at the kind
/// ("db error"), and the cause is what an operator needs in the log.
fn backend(error: impl std::error::Error) -> StoreError {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    StoreError::Backend(text)
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(backend)
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn message_not_found() -> DomainError {
    DomainError::new(ErrorCode::MessageNotFound, "no such message in this room")
}

fn invite_invalid() -> DomainError {
    DomainError::new(
        ErrorCode::InviteInvalid,
        "this invite is unknown, expired or used up",
    )
}

/// Splits our own `pool_size=N` option off the URL (tokio-postgres refuses unknown options).
fn split_pool_size(url: &str) -> Result<(String, usize), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), DEFAULT_POOL_SIZE));
    };
    let mut pool_size = DEFAULT_POOL_SIZE;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("pool_size", value)) => {
                pool_size = value
                    .parse::<usize>()
                    .ok()
                    .filter(|size| *size > 0)
                    .ok_or_else(|| {
                        StoreError::Backend(format!(
                            "pool_size must be a positive integer, got {value:?}"
                        ))
                    })?;
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, pool_size))
}

/// The PostgreSQL store. Cheap to share behind an `Arc`; the pool does the connection management.
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://...`, optional `pool_size=N`, default 16) and runs the
    /// migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (url, pool_size) = split_pool_size(url)?;
        let pg_config = tokio_postgres::Config::from_str(&url)
            .map_err(|error| StoreError::Backend(format!("bad postgres url: {error}")))?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                // Fast: a connection that broke is noticed by its next query and replaced then.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            // A server that does not answer must not hang a request forever.
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(backend)?;
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(backend)
    }

    /// Applies the embedded migrations that are not recorded in `schema_migrations`, in one
    /// transaction holding an advisory lock, so concurrent starters apply each exactly once.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(backend)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied_at BIGINT)",
        )
        .await
        .map_err(backend)?;
        let applied: HashSet<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| get::<i32>(row, 0))
            .collect::<Result<_, _>>()?;
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(|error| match backend(error) {
                    StoreError::Backend(text) => {
                        StoreError::Backend(format!("migration {version}: {text}"))
                    }
                    other => other,
                })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &Timestamp::now().millis()],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }
}

fn stored_event(room: &RoomId, row: &Row) -> Result<StoredEvent, StoreError> {
    // columns: seq, payload, created_at
    Ok(StoredEvent {
        room: room.clone(),
        seq: get(row, 0)?,
        event: shared::payload_from_value(get(row, 1)?)?,
        at: Timestamp(get(row, 2)?),
    })
}

fn user_from_row(row: &Row) -> Result<User, StoreError> {
    // columns: id, username, display_name, created_at
    Ok(User {
        id: UserId(get(row, 0)?),
        username: get(row, 1)?,
        display_name: get(row, 2)?,
        created_at: Timestamp(get(row, 3)?),
    })
}

/// Rows waiting to be inserted by the current batch, as column arrays for `UNNEST`.
#[derive(Default)]
struct Pending {
    m_id: Vec<String>,
    m_room: Vec<String>,
    m_seq: Vec<i64>,
    m_author: Vec<String>,
    m_author_name: Vec<String>,
    m_author_kind: Vec<&'static str>,
    m_client_msg_id: Vec<String>,
    m_text: Vec<String>,
    m_reply_to: Vec<Option<String>>,
    m_created_at: Vec<i64>,

    e_room: Vec<String>,
    e_seq: Vec<i64>,
    e_kind: Vec<&'static str>,
    e_message: Vec<Option<String>>,
    /// JSON text, cast to jsonb by the server (cheaper than building a `serde_json::Value`).
    e_payload: Vec<String>,
    e_created_at: Vec<i64>,
}

const INSERT_MESSAGES: &str = "INSERT INTO messages \
    (id, room_id, seq, author_id, author_name, author_kind, client_msg_id, text, reply_to, created_at) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::text[], $10::int8[])";

const INSERT_EVENTS: &str =
    "INSERT INTO events (room_id, seq, kind, message_id, payload, created_at) \
    SELECT r, s, k, m, p::jsonb, c \
    FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::int8[]) AS t(r, s, k, m, p, c)";

impl Pending {
    fn push_event(&mut self, event: &StoredEvent) -> Result<(), StoreError> {
        self.e_room.push(event.room.0.clone());
        self.e_seq.push(event.seq);
        self.e_kind.push(event.event.kind());
        self.e_message
            .push(event.event.message_id().map(|id| id.0.clone()));
        self.e_payload.push(shared::payload_to_text(&event.event)?);
        self.e_created_at.push(event.at.millis());
        Ok(())
    }

    fn push_message(&mut self, message: &Message, client_msg_id: String) {
        self.m_id.push(message.id.0.clone());
        self.m_room.push(message.room.0.clone());
        self.m_seq.push(message.seq);
        self.m_author.push(message.author.id.0.clone());
        self.m_author_name.push(message.author.name.clone());
        self.m_author_kind
            .push(shared::author_kind_to_text(message.author.kind));
        self.m_client_msg_id.push(client_msg_id);
        self.m_text.push(message.text.clone());
        self.m_reply_to
            .push(message.reply_to_message.as_ref().map(|id| id.0.clone()));
        self.m_created_at.push(message.created_at.millis());
    }

    /// Inserts the pending rows. The two inserts are independent, so they are sent together
    /// (tokio-postgres pipelines concurrent queries on one connection): one round trip, not two.
    async fn flush(&mut self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
        let messages = async {
            if self.m_id.is_empty() {
                return Ok(0);
            }
            let statement = tx.prepare_cached(INSERT_MESSAGES).await?;
            tx.execute(
                &statement,
                &[
                    &self.m_id,
                    &self.m_room,
                    &self.m_seq,
                    &self.m_author,
                    &self.m_author_name,
                    &self.m_author_kind,
                    &self.m_client_msg_id,
                    &self.m_text,
                    &self.m_reply_to,
                    &self.m_created_at,
                ],
            )
            .await
        };
        let events = async {
            if self.e_room.is_empty() {
                return Ok(0);
            }
            let statement = tx.prepare_cached(INSERT_EVENTS).await?;
            tx.execute(
                &statement,
                &[
                    &self.e_room,
                    &self.e_seq,
                    &self.e_kind,
                    &self.e_message,
                    &self.e_payload,
                    &self.e_created_at,
                ],
            )
            .await
        };
        tokio::try_join!(messages, events).map_err(backend)?;
        *self = Pending::default();
        Ok(())
    }
}

/// The fields of `Command::FinishAnswer`.
struct Answer {
    author: Author,
    message_id: MessageId,
    trigger_message_id: MessageId,
    charge_to: UserId,
    text: String,
    outcome: AnswerOutcome,
    usage: Option<Usage>,
}

/// State of one `append` call.
struct Batch<'t, 'c> {
    tx: &'t deadpool_postgres::Transaction<'c>,
    /// Room id -> last seq so far in this batch (only rooms that exist).
    heads: HashMap<String, Seq>,
    /// Rooms whose `last_seq` must be written back at the end.
    moved: HashSet<String>,
    /// (room, author, client_msg_id) -> (message id, seq), from the store and from this batch.
    sent: HashMap<(String, String, String), (String, Seq)>,
    /// Message id -> room, for reply targets (messages are never hard-deleted, so it stays true).
    reply_rooms: HashMap<String, String>,
    pending: Pending,
}

impl Batch<'_, '_> {
    fn next_event(
        &mut self,
        room: &RoomId,
        body: EventBody,
        at: Timestamp,
    ) -> Result<StoredEvent, StoreError> {
        let head = self
            .heads
            .get_mut(&room.0)
            .ok_or_else(|| StoreError::Backend("room vanished from the locked set".into()))?;
        *head += 1;
        let event = StoredEvent {
            room: room.clone(),
            seq: *head,
            at,
            event: body,
        };
        self.moved.insert(room.0.clone());
        self.pending.push_event(&event)?;
        Ok(event)
    }

    fn head(&self, room: &RoomId) -> Seq {
        self.heads.get(&room.0).copied().unwrap_or(0)
    }

    fn applied(event: StoredEvent, message_id: Option<MessageId>, role: Option<Role>) -> Applied {
        Applied {
            seq: event.seq,
            event: Some(event),
            message_id,
            duplicate: false,
            role,
        }
    }

    fn unchanged(
        &self,
        room: &RoomId,
        message_id: Option<MessageId>,
        role: Option<Role>,
    ) -> Applied {
        Applied {
            event: None,
            seq: self.head(room),
            message_id,
            duplicate: true,
            role,
        }
    }

    /// Applies one write. `Ok(Err(_))` is a refusal (nothing changed); `Err(_)` fails the batch.
    async fn apply(&mut self, write: Write) -> Result<WriteResult, StoreError> {
        let Write { room, command } = write;
        if !self.heads.contains_key(&room.0) {
            return Ok(Err(DomainError::room_not_found()));
        }
        match command {
            Command::PostMessage {
                author,
                client_msg_id,
                text,
                reply_to,
            } => self.post(room, author, client_msg_id, text, reply_to),
            other => {
                // The other commands read the store: let them see this batch's earlier writes.
                self.pending.flush(self.tx).await?;
                match other {
                    Command::EditMessage {
                        actor,
                        message_id,
                        text,
                    } => self.edit(room, actor, message_id, text).await,
                    Command::DeleteMessage {
                        actor,
                        actor_is_admin,
                        message_id,
                    } => self.delete(room, actor, actor_is_admin, message_id).await,
                    Command::React {
                        actor,
                        message_id,
                        emoji,
                        on,
                    } => self.react(room, actor, message_id, emoji, on).await,
                    Command::JoinByInvite { user, code } => self.join(room, user, code).await,
                    Command::RemoveMember { actor, user } => self.remove(room, actor, user).await,
                    Command::ChangeRole { actor, user, role } => {
                        self.change_role(room, actor, user, role).await
                    }
                    Command::PostMessage { .. } => {
                        Err(StoreError::Backend("post handled above".into()))
                    }
                    Command::AddAgent { actor, agent } => self.add_agent(room, actor, agent).await,
                    Command::StartAnswer {
                        agent,
                        message_id,
                        trigger_message_id,
                        trigger_author,
                    } => {
                        self.start_answer(
                            room,
                            agent,
                            message_id,
                            trigger_message_id,
                            trigger_author,
                        )
                        .await
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
                        let answer = Answer {
                            author,
                            message_id,
                            trigger_message_id,
                            charge_to,
                            text,
                            outcome,
                            usage,
                        };
                        self.finish_answer(room, answer).await
                    }
                }
            }
        }
    }

    fn post(
        &mut self,
        room: RoomId,
        author: Author,
        client_msg_id: String,
        text: String,
        reply_to: Option<MessageId>,
    ) -> Result<WriteResult, StoreError> {
        let key = (room.0.clone(), author.id.0.clone(), client_msg_id);
        if let Some((message_id, seq)) = self.sent.get(&key) {
            return Ok(Ok(Applied {
                event: None,
                seq: *seq,
                message_id: Some(MessageId(message_id.clone())),
                duplicate: true,
                role: None,
            }));
        }
        if let Some(target) = &reply_to {
            if self.reply_rooms.get(&target.0) != Some(&room.0) {
                return Ok(Err(message_not_found()));
            }
        }
        let at = Timestamp::now();
        let message = Message {
            id: MessageId::random(),
            room: room.clone(),
            seq: self.head(&room) + 1,
            author,
            text,
            reply_to_message: reply_to,
            created_at: at,
            edited_at: None,
            deleted: false,
            reactions: Vec::new(),
        };
        let message_id = message.id.clone();
        self.pending.push_message(&message, key.2.clone());
        self.reply_rooms
            .insert(message_id.0.clone(), room.0.clone());
        let event = self.next_event(&room, EventBody::MessageCreated { message }, at)?;
        self.sent.insert(key, (message_id.0.clone(), event.seq));
        Ok(Ok(Self::applied(event, Some(message_id), None)))
    }

    /// (author id, deleted) of a message of this room.
    async fn message_row(
        &self,
        room: &RoomId,
        message_id: &MessageId,
    ) -> Result<Option<(String, bool)>, StoreError> {
        let statement = self
            .tx
            .prepare_cached(
                "SELECT author_id, deleted FROM messages WHERE id = $1 AND room_id = $2",
            )
            .await
            .map_err(backend)?;
        let row = self
            .tx
            .query_opt(&statement, &[&message_id.0, &room.0])
            .await
            .map_err(backend)?;
        row.map(|row| Ok((get(&row, 0)?, get(&row, 1)?)))
            .transpose()
    }

    async fn edit(
        &mut self,
        room: RoomId,
        actor: UserId,
        message_id: MessageId,
        text: String,
    ) -> Result<WriteResult, StoreError> {
        let Some((author, deleted)) = self.message_row(&room, &message_id).await? else {
            return Ok(Err(message_not_found()));
        };
        if deleted {
            return Ok(Err(message_not_found()));
        }
        if author != actor.0 {
            return Ok(Err(DomainError::forbidden(
                "only the author can edit a message",
            )));
        }
        let at = Timestamp::now();
        let statement = self
            .tx
            .prepare_cached("UPDATE messages SET text = $2, edited_at = $3 WHERE id = $1")
            .await
            .map_err(backend)?;
        self.tx
            .execute(&statement, &[&message_id.0, &text, &at.millis()])
            .await
            .map_err(backend)?;
        let body = EventBody::MessageEdited {
            message_id: message_id.clone(),
            text,
            edited_at: at,
            by: actor,
        };
        let event = self.next_event(&room, body, at)?;
        Ok(Ok(Self::applied(event, Some(message_id), None)))
    }

    async fn delete(
        &mut self,
        room: RoomId,
        actor: UserId,
        actor_is_admin: bool,
        message_id: MessageId,
    ) -> Result<WriteResult, StoreError> {
        let Some((author, deleted)) = self.message_row(&room, &message_id).await? else {
            return Ok(Err(message_not_found()));
        };
        if deleted {
            return Ok(Err(message_not_found()));
        }
        if author != actor.0 && !actor_is_admin {
            return Ok(Err(DomainError::forbidden(
                "only the author or an admin can delete a message",
            )));
        }
        let tx = self.tx;
        let statement = tx
            .prepare_cached("UPDATE messages SET deleted = true, text = '' WHERE id = $1")
            .await
            .map_err(backend)?;
        tx.execute(&statement, &[&message_id.0])
            .await
            .map_err(backend)?;
        let statement = tx
            .prepare_cached("DELETE FROM reactions WHERE message_id = $1")
            .await
            .map_err(backend)?;
        tx.execute(&statement, &[&message_id.0])
            .await
            .map_err(backend)?;
        // Redact the earlier events so replays never show the text again.
        let statement = tx
            .prepare_cached(
                "SELECT seq, payload FROM events WHERE room_id = $1 AND message_id = $2",
            )
            .await
            .map_err(backend)?;
        let rows = tx
            .query(&statement, &[&room.0, &message_id.0])
            .await
            .map_err(backend)?;
        let update = tx
            .prepare_cached("UPDATE events SET payload = $3 WHERE room_id = $1 AND seq = $2")
            .await
            .map_err(backend)?;
        for row in rows {
            let seq: i64 = get(&row, 0)?;
            let mut body = shared::payload_from_value(get(&row, 1)?)?;
            if shared::redact_event(&mut body) {
                let payload = shared::payload_to_value(&body)?;
                tx.execute(&update, &[&room.0, &seq, &payload])
                    .await
                    .map_err(backend)?;
            }
        }
        let at = Timestamp::now();
        let body = EventBody::MessageDeleted {
            message_id: message_id.clone(),
            by: actor,
        };
        let event = self.next_event(&room, body, at)?;
        Ok(Ok(Self::applied(event, Some(message_id), None)))
    }

    async fn react(
        &mut self,
        room: RoomId,
        actor: UserId,
        message_id: MessageId,
        emoji: String,
        on: bool,
    ) -> Result<WriteResult, StoreError> {
        match self.message_row(&room, &message_id).await? {
            Some((_, false)) => {}
            _ => return Ok(Err(message_not_found())),
        }
        let at = Timestamp::now();
        let changed = if on {
            let statement = self
                .tx
                .prepare_cached(
                    "INSERT INTO reactions (message_id, user_id, emoji, created_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(backend)?;
            self.tx
                .execute(&statement, &[&message_id.0, &actor.0, &emoji, &at.millis()])
                .await
                .map_err(backend)?
        } else {
            let statement = self
                .tx
                .prepare_cached(
                    "DELETE FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3",
                )
                .await
                .map_err(backend)?;
            self.tx
                .execute(&statement, &[&message_id.0, &actor.0, &emoji])
                .await
                .map_err(backend)?
        };
        if changed == 0 {
            return Ok(Ok(self.unchanged(&room, Some(message_id), None)));
        }
        let reactions = reactions_of(self.tx, std::slice::from_ref(&message_id.0))
            .await?
            .remove(&message_id.0)
            .unwrap_or_default();
        let body = EventBody::ReactionChanged {
            message_id: message_id.clone(),
            emoji,
            user: actor,
            on,
            reactions,
        };
        let event = self.next_event(&room, body, at)?;
        Ok(Ok(Self::applied(event, Some(message_id), None)))
    }

    async fn join(
        &mut self,
        room: RoomId,
        user: UserRef,
        code: String,
    ) -> Result<WriteResult, StoreError> {
        let tx = self.tx;
        let statement = tx
            .prepare_cached(
                "SELECT room_id, role, max_uses, uses, expires_at FROM invites WHERE code = $1 FOR UPDATE",
            )
            .await
            .map_err(backend)?;
        let Some(row) = tx.query_opt(&statement, &[&code]).await.map_err(backend)? else {
            return Ok(Err(invite_invalid()));
        };
        let invite_room: String = get(&row, 0)?;
        let role = shared::role_from_text(get(&row, 1)?)?;
        let max_uses: Option<i64> = get(&row, 2)?;
        let uses: i64 = get(&row, 3)?;
        let expires_at: Option<i64> = get(&row, 4)?;
        let now = Timestamp::now();
        let expired = expires_at.is_some_and(|at| at <= now.millis());
        let used_up = max_uses.is_some_and(|max| uses >= max);
        if invite_room != room.0 {
            return Ok(Err(invite_invalid()));
        }
        // A member accepting their room's invite again changes nothing, even once the invite
        // is used up or expired: accepting is idempotent.
        if let Some(current) = member_role_in(tx, &room, &user.id).await? {
            return Ok(Ok(self.unchanged(&room, None, Some(current))));
        }
        if expired || used_up {
            return Ok(Err(invite_invalid()));
        }
        // members.user_id references users: check here so a bad id refuses this write only
        // instead of failing the whole batch on the foreign key.
        let statement = tx
            .prepare_cached("SELECT 1 FROM users WHERE id = $1")
            .await
            .map_err(backend)?;
        if tx
            .query_opt(&statement, &[&user.id.0])
            .await
            .map_err(backend)?
            .is_none()
        {
            return Ok(Err(DomainError::new(
                ErrorCode::UserNotFound,
                "no such user",
            )));
        }
        let statement = tx
            .prepare_cached("UPDATE invites SET uses = uses + 1 WHERE code = $1")
            .await
            .map_err(backend)?;
        tx.execute(&statement, &[&code]).await.map_err(backend)?;
        let statement = tx
            .prepare_cached(
                "INSERT INTO members (room_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(backend)?;
        tx.execute(
            &statement,
            &[
                &room.0,
                &user.id.0,
                &shared::role_to_text(role),
                &now.millis(),
            ],
        )
        .await
        .map_err(backend)?;
        let event = self.next_event(&room, EventBody::MemberJoined { user, role }, now)?;
        Ok(Ok(Self::applied(event, None, Some(role))))
    }

    /// The roles of `actor` and `target`, the target's display name, and the number of owners.
    async fn roles(
        &self,
        room: &RoomId,
        actor: &UserId,
        target: &UserId,
    ) -> Result<(Option<Role>, Option<(Role, String)>, i64), StoreError> {
        let statement = self
            .tx
            .prepare_cached(
                "SELECT m.user_id, m.role, u.display_name FROM members m JOIN users u ON u.id = m.user_id \
                 WHERE m.room_id = $1 AND (m.user_id = $2 OR m.user_id = $3 OR m.role = 'owner')",
            )
            .await
            .map_err(backend)?;
        let rows = self
            .tx
            .query(&statement, &[&room.0, &actor.0, &target.0])
            .await
            .map_err(backend)?;
        let (mut actor_role, mut target_role, mut owners) = (None, None, 0);
        for row in rows {
            let user: String = get(&row, 0)?;
            let role = shared::role_from_text(get(&row, 1)?)?;
            if role == Role::Owner {
                owners += 1;
            }
            if user == actor.0 {
                actor_role = Some(role);
            }
            if user == target.0 {
                target_role = Some((role, get(&row, 2)?));
            }
        }
        Ok((actor_role, target_role, owners))
    }

    async fn remove(
        &mut self,
        room: RoomId,
        actor: UserId,
        user: UserId,
    ) -> Result<WriteResult, StoreError> {
        let (actor_role, target, owners) = self.roles(&room, &actor, &user).await?;
        let reason = match shared::check_remove(
            &actor,
            actor_role,
            &user,
            target.as_ref().map(|(role, _)| *role),
            owners,
        ) {
            Ok(reason) => reason,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let name = target.map(|(_, name)| name).unwrap_or_default();
        let statement = self
            .tx
            .prepare_cached("DELETE FROM members WHERE room_id = $1 AND user_id = $2")
            .await
            .map_err(backend)?;
        self.tx
            .execute(&statement, &[&room.0, &user.0])
            .await
            .map_err(backend)?;
        let body = EventBody::MemberLeft {
            user: UserRef { id: user, name },
            reason,
            by: actor,
        };
        let event = self.next_event(&room, body, Timestamp::now())?;
        Ok(Ok(Self::applied(event, None, None)))
    }

    async fn change_role(
        &mut self,
        room: RoomId,
        actor: UserId,
        user: UserId,
        role: Role,
    ) -> Result<WriteResult, StoreError> {
        let (actor_role, target, owners) = self.roles(&room, &actor, &user).await?;
        let change = shared::check_role_change(
            actor_role,
            target.as_ref().map(|(role, _)| *role),
            role,
            owners,
            actor == user,
        );
        match change {
            Err(refusal) => return Ok(Err(refusal)),
            Ok(false) => return Ok(Ok(self.unchanged(&room, None, Some(role)))),
            Ok(true) => {}
        }
        let name = target.map(|(_, name)| name).unwrap_or_default();
        let statement = self
            .tx
            .prepare_cached("UPDATE members SET role = $3 WHERE room_id = $1 AND user_id = $2")
            .await
            .map_err(backend)?;
        self.tx
            .execute(&statement, &[&room.0, &user.0, &shared::role_to_text(role)])
            .await
            .map_err(backend)?;
        let body = EventBody::MemberRoleChanged {
            user: UserRef { id: user, name },
            role,
            by: actor,
        };
        let event = self.next_event(&room, body, Timestamp::now())?;
        Ok(Ok(Self::applied(event, None, Some(role))))
    }

    async fn add_agent(
        &mut self,
        room: RoomId,
        actor: UserId,
        agent: AgentInfo,
    ) -> Result<WriteResult, StoreError> {
        let at = Timestamp::now();
        let statement = self
            .tx
            .prepare_cached(
                "INSERT INTO agents (room_id, name, model, system_prompt, provider, created_by, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (room_id, name) DO NOTHING",
            )
            .await
            .map_err(backend)?;
        let inserted = self
            .tx
            .execute(
                &statement,
                &[
                    &room.0,
                    &agent.name,
                    &agent.model,
                    &agent.system_prompt,
                    &agent.provider,
                    &actor.0,
                    &at.millis(),
                ],
            )
            .await
            .map_err(backend)?;
        if inserted == 0 {
            return Ok(Err(shared::agent_exists()));
        }
        let event = self.next_event(&room, EventBody::AgentAdded { agent, by: actor }, at)?;
        Ok(Ok(Self::applied(event, None, None)))
    }

    async fn start_answer(
        &mut self,
        room: RoomId,
        agent: String,
        message_id: MessageId,
        trigger_message_id: MessageId,
        trigger_author: UserId,
    ) -> Result<WriteResult, StoreError> {
        let tx = self.tx;
        let statement = tx
            .prepare_cached("SELECT 1 FROM messages WHERE id = $1")
            .await
            .map_err(backend)?;
        if tx
            .query_opt(&statement, &[&message_id.0])
            .await
            .map_err(backend)?
            .is_some()
        {
            return Ok(Err(shared::answer_exists()));
        }
        let at = Timestamp::now();
        let statement = tx
            .prepare_cached(
                "INSERT INTO ai_partials (message_id, room_id, agent, trigger_message_id, \
                 trigger_author, text, updated_at) VALUES ($1, $2, $3, $4, $5, '', $6) \
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .await
            .map_err(backend)?;
        let inserted = tx
            .execute(
                &statement,
                &[
                    &message_id.0,
                    &room.0,
                    &agent,
                    &trigger_message_id.0,
                    &trigger_author.0,
                    &at.millis(),
                ],
            )
            .await
            .map_err(backend)?;
        if inserted == 0 {
            return Ok(Err(shared::answer_exists()));
        }
        let body = EventBody::AiStarted {
            message_id: message_id.clone(),
            agent,
            trigger_message_id,
            trigger_author,
        };
        let event = self.next_event(&room, body, at)?;
        Ok(Ok(Self::applied(event, Some(message_id), None)))
    }

    async fn finish_answer(
        &mut self,
        room: RoomId,
        answer: Answer,
    ) -> Result<WriteResult, StoreError> {
        let tx = self.tx;
        // Taking the checkpoint away is what makes finishing happen once: a retry finds nothing
        // and is refused before anything is written.
        let statement = tx
            .prepare_cached(
                "DELETE FROM ai_partials WHERE message_id = $1 AND room_id = $2 RETURNING agent",
            )
            .await
            .map_err(backend)?;
        if tx
            .query_opt(&statement, &[&answer.message_id.0, &room.0])
            .await
            .map_err(backend)?
            .is_none()
        {
            return Ok(Err(shared::answer_finished()));
        }
        let at = Timestamp::now();
        let message = shared::answer_message(
            &room,
            self.head(&room) + 1,
            answer.author,
            answer.message_id,
            answer.trigger_message_id,
            answer.text,
            at.millis(),
        );
        if let Some(usage) = answer.usage {
            let statement = tx
                .prepare_cached(
                    "INSERT INTO ai_usage (room_id, user_id, agent, message_id, prompt_tokens, \
                     completion_tokens, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .await
                .map_err(backend)?;
            tx.execute(
                &statement,
                &[
                    &room.0,
                    &answer.charge_to.0,
                    &shared::agent_name_of(&message.author.id),
                    &message.id.0,
                    &shared::tokens_to_db(usage.prompt_tokens),
                    &shared::tokens_to_db(usage.completion_tokens),
                    &at.millis(),
                ],
            )
            .await
            .map_err(backend)?;
        }
        if shared::answer_is_kept(&answer.outcome, &message.text) {
            self.pending
                .push_message(&message, shared::answer_client_msg_id(&message.id));
            self.reply_rooms
                .insert(message.id.0.clone(), room.0.clone());
        }
        let message_id = message.id.clone();
        let body = shared::answer_event(message, answer.outcome, answer.usage);
        let event = self.next_event(&room, body, at)?;
        Ok(Ok(Self::applied(event, Some(message_id), None)))
    }
}

async fn member_role_in(
    client: &impl deadpool_postgres::GenericClient,
    room: &RoomId,
    user: &UserId,
) -> Result<Option<Role>, StoreError> {
    let statement = client
        .prepare_cached("SELECT role FROM members WHERE room_id = $1 AND user_id = $2")
        .await
        .map_err(backend)?;
    let row = client
        .query_opt(&statement, &[&room.0, &user.0])
        .await
        .map_err(backend)?;
    row.map(|row| shared::role_from_text(get(&row, 0)?))
        .transpose()
}

/// Reaction summaries of the given messages (messages without reactions are absent).
async fn reactions_of(
    client: &impl deadpool_postgres::GenericClient,
    message_ids: &[String],
) -> Result<HashMap<String, Vec<cochat_actors::event::Reaction>>, StoreError> {
    if message_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let statement = client
        .prepare_cached("SELECT message_id, emoji, user_id, created_at FROM reactions WHERE message_id = ANY($1)")
        .await
        .map_err(backend)?;
    let rows = client
        .query(&statement, &[&message_ids])
        .await
        .map_err(backend)?;
    let mut grouped: HashMap<String, Vec<shared::ReactionRow>> = HashMap::new();
    for row in rows {
        grouped.entry(get(&row, 0)?).or_default().push((
            get(&row, 1)?,
            UserId(get(&row, 2)?),
            get(&row, 3)?,
        ));
    }
    Ok(grouped
        .into_iter()
        .map(|(id, rows)| (id, shared::build_reactions(rows)))
        .collect())
}

#[async_trait]
impl RoomLog for PostgresStore {
    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT last_seq FROM rooms WHERE id = $1")
            .await
            .map_err(backend)?;
        let Some(row) = client
            .query_opt(&statement, &[&room.0])
            .await
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let head_seq: i64 = get(&row, 0)?;
        let statement = client
            .prepare_cached(
                "SELECT m.user_id, u.display_name, m.role FROM members m JOIN users u ON u.id = m.user_id \
                 WHERE m.room_id = $1",
            )
            .await
            .map_err(backend)?;
        let mut members = HashMap::new();
        for row in client
            .query(&statement, &[&room.0])
            .await
            .map_err(backend)?
        {
            members.insert(
                UserId(get(&row, 0)?),
                (get(&row, 1)?, shared::role_from_text(get(&row, 2)?)?),
            );
        }
        Ok(Some(RoomState { head_seq, members }))
    }

    async fn append(&self, batch: Vec<Write>) -> Result<Vec<WriteResult>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;

        // Lock the rooms in id order: two nodes locking overlapping sets cannot deadlock.
        let mut room_ids: Vec<&str> = batch.iter().map(|write| write.room.0.as_str()).collect();
        room_ids.sort_unstable();
        room_ids.dedup();

        // What the posts need, read in one query each: earlier sends with the same keys
        // (idempotency) and the rooms of the messages they reply to. They are sent in the same
        // pipeline as the lock; the server runs them in order, after the lock is granted, so
        // they see everything the previous holder of these rooms committed.
        let (mut k_room, mut k_author, mut k_client) = (Vec::new(), Vec::new(), Vec::new());
        let mut reply_ids = Vec::new();
        for write in &batch {
            if let Command::PostMessage {
                author,
                client_msg_id,
                reply_to,
                ..
            } = &write.command
            {
                k_room.push(write.room.0.as_str());
                k_author.push(author.id.0.as_str());
                k_client.push(client_msg_id.as_str());
                if let Some(target) = reply_to {
                    reply_ids.push(target.0.as_str());
                }
            }
        }
        let lock = async {
            let statement = tx
                .prepare_cached(
                    "SELECT id, last_seq FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .await?;
            tx.query(&statement, &[&room_ids]).await
        };
        let duplicates = async {
            if k_room.is_empty() {
                return Ok(Vec::new());
            }
            let statement = tx
                .prepare_cached(
                    "SELECT m.room_id, m.author_id, m.client_msg_id, m.id, m.seq \
                     FROM UNNEST($1::text[], $2::text[], $3::text[]) AS k(room_id, author_id, client_msg_id) \
                     JOIN messages m USING (room_id, author_id, client_msg_id)",
                )
                .await?;
            tx.query(&statement, &[&k_room, &k_author, &k_client]).await
        };
        let replies = async {
            if reply_ids.is_empty() {
                return Ok(Vec::new());
            }
            let statement = tx
                .prepare_cached("SELECT id, room_id FROM messages WHERE id = ANY($1)")
                .await?;
            tx.query(&statement, &[&reply_ids]).await
        };
        let (locked, duplicates, replies) =
            tokio::try_join!(lock, duplicates, replies).map_err(backend)?;
        let mut heads = HashMap::new();
        for row in &locked {
            heads.insert(get::<String>(row, 0)?, get::<i64>(row, 1)?);
        }
        let mut sent = HashMap::new();
        for row in &duplicates {
            sent.insert(
                (get(row, 0)?, get(row, 1)?, get(row, 2)?),
                (get(row, 3)?, get(row, 4)?),
            );
        }
        let mut reply_rooms = HashMap::new();
        for row in &replies {
            reply_rooms.insert(get(row, 0)?, get(row, 1)?);
        }

        let mut state = Batch {
            tx: &tx,
            heads,
            moved: HashSet::new(),
            sent,
            reply_rooms,
            pending: Pending::default(),
        };
        let mut results = Vec::with_capacity(batch.len());
        for write in batch {
            results.push(state.apply(write).await?);
        }
        // The last inserts and the heads go out together (one round trip), then the commit.
        let (ids, seqs): (Vec<String>, Vec<i64>) = state
            .moved
            .iter()
            .map(|id| (id.clone(), state.heads.get(id).copied().unwrap_or(0)))
            .unzip();
        let heads = async {
            if ids.is_empty() {
                return Ok(());
            }
            let statement = tx
                .prepare_cached(
                    "UPDATE rooms SET last_seq = k.seq FROM UNNEST($1::text[], $2::int8[]) AS k(id, seq) \
                     WHERE rooms.id = k.id",
                )
                .await
                .map_err(backend)?;
            tx.execute(&statement, &[&ids, &seqs])
                .await
                .map_err(backend)?;
            Ok(())
        };
        tokio::try_join!(state.pending.flush(&tx), heads)?;
        tx.commit().await.map_err(backend)?;
        Ok(results)
    }

    async fn events_after(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT seq, payload, created_at FROM events WHERE room_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3",
            )
            .await
            .map_err(backend)?;
        client
            .query(&statement, &[&room.0, &after, &i64::from(limit)])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| stored_event(room, row))
            .collect()
    }
}

const MESSAGE_COLUMNS: &str = "id, seq, author_id, author_name, author_kind, text, reply_to, \
    created_at, edited_at, deleted";

fn message_from_row(room: &RoomId, row: &Row) -> Result<Message, StoreError> {
    let reply_to: Option<String> = get(row, 6)?;
    let edited_at: Option<i64> = get(row, 8)?;
    Ok(Message {
        id: MessageId(get(row, 0)?),
        room: room.clone(),
        seq: get(row, 1)?,
        author: Author {
            id: UserId(get(row, 2)?),
            name: get(row, 3)?,
            kind: shared::author_kind_from_text(get(row, 4)?)?,
        },
        text: get(row, 5)?,
        reply_to_message: reply_to.map(MessageId),
        created_at: Timestamp(get(row, 7)?),
        edited_at: edited_at.map(Timestamp),
        deleted: get(row, 9)?,
        reactions: Vec::new(),
    })
}

/// Messages from rows of `MESSAGE_COLUMNS`, with their reactions.
async fn messages_with_reactions(
    client: &impl deadpool_postgres::GenericClient,
    room: &RoomId,
    rows: &[Row],
) -> Result<Vec<Message>, StoreError> {
    let mut messages = rows
        .iter()
        .map(|row| message_from_row(room, row))
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<String> = messages
        .iter()
        .map(|message| message.id.0.clone())
        .collect();
    let mut reactions = reactions_of(client, &ids).await?;
    for message in &mut messages {
        if let Some(summary) = reactions.remove(&message.id.0) {
            message.reactions = summary;
        }
    }
    Ok(messages)
}

/// `SUM(prompt_tokens), SUM(completion_tokens), COUNT(*)` of `ai_usage` rows (SUM of BIGINT is
/// NUMERIC in Postgres: cast back).
const USAGE_SUMS: &str = "COALESCE(SUM(prompt_tokens), 0)::int8, \
    COALESCE(SUM(completion_tokens), 0)::int8, COUNT(*)";

fn usage_from_row(row: &Row, first: usize) -> Result<UsageTotals, StoreError> {
    Ok(shared::usage_totals(
        get(row, first)?,
        get(row, first + 1)?,
        get(row, first + 2)?,
    ))
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError> {
        let client = self.client().await?;
        let user = User {
            id: UserId::random(),
            username: shared::normalize_username(username),
            display_name: display_name.to_owned(),
            created_at: Timestamp::now(),
        };
        let statement = client
            .prepare_cached(
                "INSERT INTO users (id, username, display_name, password_hash, kind, created_at) \
                 VALUES ($1, $2, $3, $4, 'user', $5)",
            )
            .await
            .map_err(backend)?;
        let inserted = client
            .execute(
                &statement,
                &[
                    &user.id.0,
                    &user.username,
                    &user.display_name,
                    &password_hash,
                    &user.created_at.millis(),
                ],
            )
            .await;
        match inserted {
            Ok(_) => Ok(user),
            Err(error) if is_unique_violation(&error) => {
                Err(DomainError::new(ErrorCode::UsernameTaken, "that username is taken").into())
            }
            Err(error) => Err(backend(error)),
        }
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<(User, String)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, username, display_name, created_at, password_hash FROM users WHERE username = $1",
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&statement, &[&shared::normalize_username(username)])
            .await
            .map_err(backend)?;
        row.map(|row| Ok((user_from_row(&row)?, get(&row, 4)?)))
            .transpose()
    }

    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, username, display_name, created_at FROM users WHERE id = $1",
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&statement, &[&id.0])
            .await
            .map_err(backend)?;
        row.map(|row| user_from_row(&row)).transpose()
    }

    async fn create_room(
        &self,
        name: &str,
        owner: &UserRef,
    ) -> Result<(RoomInfo, StoredEvent), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let at = Timestamp::now();
        let info = RoomInfo {
            id: RoomId::random(),
            name: name.to_owned(),
            created_by: owner.id.clone(),
            created_at: at,
            last_seq: 1,
        };
        let event = StoredEvent {
            room: info.id.clone(),
            seq: 1,
            at,
            event: EventBody::MemberJoined {
                user: owner.clone(),
                role: Role::Owner,
            },
        };
        let statement = tx
            .prepare_cached("INSERT INTO rooms (id, name, created_by, created_at, last_seq) VALUES ($1, $2, $3, $4, 1)")
            .await
            .map_err(backend)?;
        tx.execute(
            &statement,
            &[&info.id.0, &info.name, &owner.id.0, &at.millis()],
        )
        .await
        .map_err(backend)?;
        let statement = tx
            .prepare_cached(
                "INSERT INTO members (room_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(backend)?;
        let inserted = tx
            .execute(
                &statement,
                &[
                    &info.id.0,
                    &owner.id.0,
                    &shared::role_to_text(Role::Owner),
                    &at.millis(),
                ],
            )
            .await;
        if let Err(error) = inserted {
            if error.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
                return Err(DomainError::new(ErrorCode::UserNotFound, "no such user").into());
            }
            return Err(backend(error));
        }
        let mut pending = Pending::default();
        pending.push_event(&event)?;
        pending.flush(&tx).await?;
        tx.commit().await.map_err(backend)?;
        Ok((info, event))
    }

    async fn room(&self, room: &RoomId) -> Result<Option<RoomInfo>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, name, created_by, created_at, last_seq FROM rooms WHERE id = $1",
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&statement, &[&room.0])
            .await
            .map_err(backend)?;
        row.map(|row| room_from_row(&row)).transpose()
    }

    async fn rooms_for_user(&self, user: &UserId) -> Result<Vec<RoomListing>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT r.id, r.name, r.created_by, r.created_at, r.last_seq, m.role, m.last_read_seq, \
                 (SELECT count(*) FROM messages x WHERE x.room_id = r.id AND x.seq > m.last_read_seq \
                  AND x.author_id <> m.user_id AND NOT x.deleted) \
                 FROM members m JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 \
                 ORDER BY r.created_at, r.id",
            )
            .await
            .map_err(backend)?;
        client
            .query(&statement, &[&user.0])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                Ok(RoomListing {
                    room: room_from_row(row)?,
                    role: shared::role_from_text(get(row, 5)?)?,
                    last_read_seq: get(row, 6)?,
                    unread: get(row, 7)?,
                })
            })
            .collect()
    }

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT m.user_id, u.display_name, m.role, m.joined_at FROM members m \
                 JOIN users u ON u.id = m.user_id WHERE m.room_id = $1 ORDER BY m.joined_at, m.user_id",
            )
            .await
            .map_err(backend)?;
        client
            .query(&statement, &[&room.0])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                Ok(Member {
                    user: UserRef {
                        id: UserId(get(row, 0)?),
                        name: get(row, 1)?,
                    },
                    role: shared::role_from_text(get(row, 2)?)?,
                    joined_at: Timestamp(get(row, 3)?),
                })
            })
            .collect()
    }

    async fn member_role(&self, room: &RoomId, user: &UserId) -> Result<Option<Role>, StoreError> {
        let client = self.client().await?;
        member_role_in(&client, room, user).await
    }

    async fn create_invite(&self, invite: &NewInvite) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO invites (code, room_id, role, max_uses, uses, expires_at, created_by, created_at) \
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7)",
            )
            .await
            .map_err(backend)?;
        let inserted = client
            .execute(
                &statement,
                &[
                    &invite.code,
                    &invite.room.0,
                    &shared::role_to_text(invite.role),
                    &invite.max_uses,
                    &invite.expires_at.map(Timestamp::millis),
                    &invite.created_by.0,
                    &Timestamp::now().millis(),
                ],
            )
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(error) if is_unique_violation(&error) => {
                Err(DomainError::new(ErrorCode::Conflict, "that invite code exists").into())
            }
            Err(error) => Err(backend(error)),
        }
    }

    async fn invite_room(&self, code: &str) -> Result<Option<RoomId>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT room_id FROM invites WHERE code = $1")
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&statement, &[&code])
            .await
            .map_err(backend)?;
        row.map(|row| Ok(RoomId(get(&row, 0)?))).transpose()
    }

    async fn messages(
        &self,
        room: &RoomId,
        before_seq: Option<Seq>,
        after_seq: Option<Seq>,
        limit: u32,
    ) -> Result<MessagePage, StoreError> {
        let client = self.client().await?;
        // One more row than asked tells whether there is more in the paging direction.
        let fetch = i64::from(limit) + 1;
        // Paging forward from `after_seq` reads oldest first; otherwise newest first, reversed.
        let forward = after_seq.is_some();
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND seq > $2 AND seq < $3 \
             ORDER BY seq {} LIMIT $4",
            if forward { "ASC" } else { "DESC" }
        );
        let statement = client.prepare_cached(&sql).await.map_err(backend)?;
        let rows = client
            .query(
                &statement,
                &[
                    &room.0,
                    &after_seq.unwrap_or(i64::MIN),
                    &before_seq.unwrap_or(i64::MAX),
                    &fetch,
                ],
            )
            .await
            .map_err(backend)?;
        let has_more = rows.len() as i64 > i64::from(limit);
        let kept = rows.len().min(limit as usize);
        let mut messages = messages_with_reactions(&client, room, &rows[..kept]).await?;
        if !forward {
            messages.reverse();
        }
        Ok(MessagePage { messages, has_more })
    }

    async fn mark_read(&self, room: &RoomId, user: &UserId, seq: Seq) -> Result<Seq, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE members m SET last_read_seq = GREATEST(m.last_read_seq, LEAST($3, r.last_seq)) \
                 FROM rooms r WHERE r.id = m.room_id AND m.room_id = $1 AND m.user_id = $2 \
                 RETURNING m.last_read_seq",
            )
            .await
            .map_err(backend)?;
        match client
            .query_opt(&statement, &[&room.0, &user.0, &seq])
            .await
            .map_err(backend)?
        {
            Some(row) => get(&row, 0),
            None => Err(DomainError::room_not_found().into()),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(backend)?;
        Ok(())
    }

    async fn agents(&self, room: &RoomId) -> Result<Vec<AgentInfo>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT name, model, system_prompt, provider FROM agents WHERE room_id = $1 \
                 ORDER BY name COLLATE \"C\"",
            )
            .await
            .map_err(backend)?;
        client
            .query(&statement, &[&room.0])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                Ok(AgentInfo {
                    name: get(row, 0)?,
                    model: get(row, 1)?,
                    system_prompt: get(row, 2)?,
                    provider: get(row, 3)?,
                })
            })
            .collect()
    }

    async fn message(&self, room: &RoomId, id: &MessageId) -> Result<Option<Message>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND room_id = $2"
            ))
            .await
            .map_err(backend)?;
        let rows = client
            .query(&statement, &[&id.0, &room.0])
            .await
            .map_err(backend)?;
        Ok(messages_with_reactions(&client, room, &rows).await?.pop())
    }

    async fn search_messages(
        &self,
        room: &RoomId,
        query: &str,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let client = self.client().await?;
        // strpos, not LIKE: the query is a plain substring (`%` and `_` are literal).
        let statement = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND NOT deleted \
                 AND strpos(lower(text), lower($2)) > 0 ORDER BY seq DESC LIMIT $3"
            ))
            .await
            .map_err(backend)?;
        let rows = client
            .query(&statement, &[&room.0, &query, &i64::from(limit)])
            .await
            .map_err(backend)?;
        messages_with_reactions(&client, room, &rows).await
    }

    async fn save_partial(
        &self,
        room: &RoomId,
        message_id: &MessageId,
        text: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE ai_partials SET text = $3, updated_at = $4 WHERE message_id = $1 AND room_id = $2",
            )
            .await
            .map_err(backend)?;
        client
            .execute(
                &statement,
                &[&message_id.0, &room.0, &text, &Timestamp::now().millis()],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn partials(&self, room: &RoomId) -> Result<Vec<Partial>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT message_id, agent, trigger_message_id, trigger_author, text \
                 FROM ai_partials WHERE room_id = $1 ORDER BY message_id COLLATE \"C\"",
            )
            .await
            .map_err(backend)?;
        client
            .query(&statement, &[&room.0])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| {
                Ok(Partial {
                    room: room.clone(),
                    message_id: MessageId(get(row, 0)?),
                    agent: get(row, 1)?,
                    trigger_message_id: MessageId(get(row, 2)?),
                    trigger_author: UserId(get(row, 3)?),
                    text: get(row, 4)?,
                })
            })
            .collect()
    }

    async fn summary(
        &self,
        room: &RoomId,
        agent: &str,
    ) -> Result<Option<(String, Seq)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT summary, through_seq FROM ai_summaries WHERE room_id = $1 AND agent = $2",
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&statement, &[&room.0, &agent])
            .await
            .map_err(backend)?;
        row.map(|row| Ok((get(&row, 0)?, get(&row, 1)?)))
            .transpose()
    }

    async fn save_summary(
        &self,
        room: &RoomId,
        agent: &str,
        summary: &str,
        through_seq: Seq,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO ai_summaries (room_id, agent, summary, through_seq, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room_id, agent) DO UPDATE SET \
                 summary = EXCLUDED.summary, through_seq = EXCLUDED.through_seq, \
                 updated_at = EXCLUDED.updated_at",
            )
            .await
            .map_err(backend)?;
        client
            .execute(
                &statement,
                &[
                    &room.0,
                    &agent,
                    &summary,
                    &through_seq,
                    &Timestamp::now().millis(),
                ],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn room_usage(&self, room: &RoomId, since: Timestamp) -> Result<UsageTotals, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {USAGE_SUMS} FROM ai_usage WHERE room_id = $1 AND created_at >= $2"
            ))
            .await
            .map_err(backend)?;
        let row = client
            .query_one(&statement, &[&room.0, &since.millis()])
            .await
            .map_err(backend)?;
        usage_from_row(&row, 0)
    }

    async fn user_usage(&self, user: &UserId, since: Timestamp) -> Result<UsageTotals, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {USAGE_SUMS} FROM ai_usage WHERE user_id = $1 AND created_at >= $2"
            ))
            .await
            .map_err(backend)?;
        let row = client
            .query_one(&statement, &[&user.0, &since.millis()])
            .await
            .map_err(backend)?;
        usage_from_row(&row, 0)
    }

    async fn room_usage_by_user(
        &self,
        room: &RoomId,
        since: Timestamp,
    ) -> Result<Vec<(UserId, UsageTotals)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT user_id, {USAGE_SUMS} FROM ai_usage WHERE room_id = $1 AND created_at >= $2 \
                 GROUP BY user_id \
                 ORDER BY SUM(prompt_tokens) + SUM(completion_tokens) DESC, user_id COLLATE \"C\""
            ))
            .await
            .map_err(backend)?;
        client
            .query(&statement, &[&room.0, &since.millis()])
            .await
            .map_err(backend)?
            .iter()
            .map(|row| Ok((UserId(get(row, 0)?), usage_from_row(row, 1)?)))
            .collect()
    }
}

fn room_from_row(row: &Row) -> Result<RoomInfo, StoreError> {
    // columns: id, name, created_by, created_at, last_seq
    Ok(RoomInfo {
        id: RoomId(get(row, 0)?),
        name: get(row, 1)?,
        created_by: UserId(get(row, 2)?),
        created_at: Timestamp(get(row, 3)?),
        last_seq: get(row, 4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::split_pool_size;

    #[test]
    fn pool_size_is_taken_off_the_url() {
        let (url, size) = split_pool_size("postgres://h/db").expect("plain url");
        assert_eq!((url.as_str(), size), ("postgres://h/db", 16));
        let (url, size) = split_pool_size("postgres://h/db?pool_size=4").expect("pool size");
        assert_eq!((url.as_str(), size), ("postgres://h/db", 4));
        let (url, size) =
            split_pool_size("postgres://h/db?sslmode=disable&pool_size=8&application_name=x")
                .expect("mixed");
        assert_eq!(
            (url.as_str(), size),
            ("postgres://h/db?sslmode=disable&application_name=x", 8)
        );
        assert!(split_pool_size("postgres://h/db?pool_size=0").is_err());
    }
}
