//! In-memory fakes of the ports, for unit tests of the actors. `MemoryLog` keeps one room log per
//! room in a mutex and applies posts (idempotent), joins and leaves; the other commands are the
//! real drivers' business and are tested in the store conformance suite against SQLite and Postgres.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::{DomainError, ErrorCode, StoreError};
use crate::event::{EventBody, LeaveReason, Message, StoredEvent, UserRef};
use crate::ids::{MessageId, Role, RoomId, Seq, UserId};
use crate::ports::{Applied, Command, RoomLog, RoomState, Write, WriteResult};
use crate::time::Timestamp;

#[derive(Default)]
struct FakeRoom {
    events: Vec<StoredEvent>,
    members: HashMap<UserId, (String, Role)>,
    /// (author, client_msg_id) -> (message id, seq)
    sent: HashMap<(UserId, String), (MessageId, Seq)>,
}

#[derive(Default)]
pub struct MemoryLog {
    rooms: Mutex<HashMap<RoomId, FakeRoom>>,
    /// When set, every append fails as if the backend were down.
    pub failing: std::sync::atomic::AtomicBool,
}

impl MemoryLog {
    /// A room with the given members and no events.
    pub fn add_room(&self, room: &RoomId, members: &[(&str, Role)]) {
        let mut rooms = self.rooms.lock().expect("fake log mutex is never poisoned");
        let entry = rooms.entry(room.clone()).or_default();
        for (user, role) in members {
            entry
                .members
                .insert(UserId::from(*user), ((*user).to_owned(), *role));
        }
    }

    /// Appends an event as if another node had committed it; returns it for delivery.
    pub fn append_foreign(&self, room: &RoomId, body: EventBody) -> StoredEvent {
        let mut rooms = self.rooms.lock().expect("fake log mutex is never poisoned");
        let entry = rooms.entry(room.clone()).or_default();
        push_event(room, entry, body)
    }

    pub fn event_count(&self, room: &RoomId) -> usize {
        let rooms = self.rooms.lock().expect("fake log mutex is never poisoned");
        rooms.get(room).map_or(0, |entry| entry.events.len())
    }
}

fn push_event(room: &RoomId, entry: &mut FakeRoom, body: EventBody) -> StoredEvent {
    let event = StoredEvent {
        room: room.clone(),
        seq: entry.events.len() as Seq + 1,
        at: Timestamp::now(),
        event: body,
    };
    entry.events.push(event.clone());
    event
}

fn apply(room: &RoomId, entry: &mut FakeRoom, command: Command) -> WriteResult {
    match command {
        Command::PostMessage {
            author,
            client_msg_id,
            text,
            reply_to,
        } => {
            let key = (author.id.clone(), client_msg_id);
            if let Some((message_id, seq)) = entry.sent.get(&key) {
                return Ok(Applied {
                    event: None,
                    seq: *seq,
                    message_id: Some(message_id.clone()),
                    duplicate: true,
                    role: None,
                });
            }
            let message_id = MessageId::random();
            let message = Message {
                id: message_id.clone(),
                room: room.clone(),
                seq: entry.events.len() as Seq + 1,
                author,
                text,
                reply_to_message: reply_to,
                created_at: Timestamp::now(),
                edited_at: None,
                deleted: false,
                reactions: Vec::new(),
            };
            let event = push_event(room, entry, EventBody::MessageCreated { message });
            entry.sent.insert(key, (message_id.clone(), event.seq));
            Ok(Applied {
                seq: event.seq,
                event: Some(event),
                message_id: Some(message_id),
                duplicate: false,
                role: None,
            })
        }
        Command::JoinByInvite { user, .. } => {
            entry
                .members
                .insert(user.id.clone(), (user.name.clone(), Role::Member));
            let event = push_event(
                room,
                entry,
                EventBody::MemberJoined {
                    user,
                    role: Role::Member,
                },
            );
            Ok(Applied {
                seq: event.seq,
                event: Some(event),
                message_id: None,
                duplicate: false,
                role: Some(Role::Member),
            })
        }
        Command::RemoveMember { actor, user } => {
            let Some((name, _)) = entry.members.remove(&user) else {
                return Err(DomainError::new(ErrorCode::UserNotFound, "not a member"));
            };
            let reason = if actor == user {
                LeaveReason::Left
            } else {
                LeaveReason::Kicked
            };
            let body = EventBody::MemberLeft {
                user: UserRef { id: user, name },
                reason,
                by: actor,
            };
            let event = push_event(room, entry, body);
            Ok(Applied {
                seq: event.seq,
                event: Some(event),
                message_id: None,
                duplicate: false,
                role: None,
            })
        }
        other => Err(DomainError::validation(format!(
            "the in-memory fake does not apply {other:?}"
        ))),
    }
}

#[async_trait]
impl RoomLog for MemoryLog {
    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        let rooms = self.rooms.lock().expect("fake log mutex is never poisoned");
        Ok(rooms.get(room).map(|entry| RoomState {
            head_seq: entry.events.len() as Seq,
            members: entry.members.clone(),
        }))
    }

    async fn append(&self, batch: Vec<Write>) -> Result<Vec<WriteResult>, StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("the fake is failing on purpose".into()));
        }
        let mut rooms = self.rooms.lock().expect("fake log mutex is never poisoned");
        Ok(batch
            .into_iter()
            .map(|write| match rooms.get_mut(&write.room) {
                Some(entry) => apply(&write.room, entry, write.command),
                None => Err(DomainError::room_not_found()),
            })
            .collect())
    }

    async fn events_after(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rooms = self.rooms.lock().expect("fake log mutex is never poisoned");
        Ok(rooms
            .get(room)
            .map(|entry| {
                entry
                    .events
                    .iter()
                    .filter(|event| event.seq > after)
                    .take(limit as usize)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
}
