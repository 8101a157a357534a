//! `Room`: one actor per active room on this node. It owns the room's local fan-out: the member
//! cache used to authorise writes, the last seq delivered here, the sessions subscribed here and
//! their presence. Sessions send it `Join`/`Leave`/`Typing`; sessions and HTTP handlers send it
//! `Submit` (a durable command); the bus (other nodes) sends it `Deliver`. Every durable event is
//! committed first and fanned out after, in seq order, serialised ONCE and shared as bytes on a
//! bounded broadcast channel (a session that falls behind it is cut off, nobody else waits).
//! It stops itself after `idle_timeout` with no session and no write in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::broadcast;

use crate::commit::{answer_of, Committer};
use crate::error::{DomainError, ErrorCode};
use crate::event::{EventBody, StoredEvent, UserRef};
use crate::ids::{Role, RoomId, Seq, SessionId, UserId};
use crate::ports::{Applied, Command, RoomLog, Telemetry, Write, WriteResult};
use crate::protocol::{Presence, ServerFrame};
use crate::registry::{RoomRegistry, RoomStopped};
use crate::time::Timestamp;

/// How long to wait for a missing seq to arrive by itself before fetching it from the log.
const GAP_REPAIR_DELAY: Duration = Duration::from_millis(100);
/// Most events fetched in one gap repair.
const GAP_REPAIR_LIMIT: u32 = 1000;

#[derive(Clone, Copy, Debug)]
pub struct RoomConfig {
    /// Frames a session may fall behind before it is cut off as a slow consumer.
    pub broadcast_capacity: usize,
    pub idle_timeout: Duration,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            broadcast_capacity: 4096,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What a room sends its local sessions: bytes serialised once, plus what a session needs to
/// decide whether the frame is for it.
#[derive(Debug)]
pub struct RoomFrame {
    /// The durable event's seq; `None` for ephemeral frames.
    pub seq: Option<Seq>,
    pub bytes: ByteString,
    /// Not for this user's sessions (the typist does not see their own `typing`).
    pub skip_user: Option<UserId>,
    /// This user is no longer a member: their sessions drop the subscription after this frame.
    pub revoke_user: Option<UserId>,
}

pub type RoomFrames = broadcast::Receiver<Arc<RoomFrame>>;

/// Everything a Room needs from its node.
#[derive(Clone)]
pub struct RoomDeps {
    pub log: Arc<dyn RoomLog>,
    pub committer: Committer,
    pub telemetry: Arc<dyn Telemetry>,
    pub config: RoomConfig,
}

pub struct Room {
    id: RoomId,
    deps: RoomDeps,
    registry: Addr<RoomRegistry>,
    /// user -> (display name, role), kept current by the member events this room delivers.
    members: HashMap<UserId, (String, Role)>,
    delivered_seq: Seq,
    /// Events that arrived ahead of a gap, waiting for it to be filled.
    waiting: BTreeMap<Seq, StoredEvent>,
    repair_scheduled: bool,
    frames: broadcast::Sender<Arc<RoomFrame>>,
    sessions: HashMap<SessionId, UserId>,
    online: HashMap<UserId, usize>,
    writes_in_flight: usize,
    last_activity: Instant,
}

impl Room {
    pub fn new(id: RoomId, deps: RoomDeps, registry: Addr<RoomRegistry>) -> Self {
        let (frames, _) = broadcast::channel(deps.config.broadcast_capacity.max(16));
        Self {
            id,
            deps,
            registry,
            members: HashMap::new(),
            delivered_seq: 0,
            waiting: BTreeMap::new(),
            repair_scheduled: false,
            frames,
            sessions: HashMap::new(),
            online: HashMap::new(),
            writes_in_flight: 0,
            last_activity: Instant::now(),
        }
    }

    fn role_of(&self, user: &UserId) -> Option<Role> {
        self.members.get(user).map(|(_, role)| *role)
    }

    fn user_ref(&self, user: &UserId) -> UserRef {
        let name = self
            .members
            .get(user)
            .map(|(name, _)| name.clone())
            .unwrap_or_default();
        UserRef {
            id: user.clone(),
            name,
        }
    }

    /// Takes a durable event from any source (own commit, another node, gap repair) and delivers
    /// everything that is now contiguous. Old seqs are duplicates and are dropped.
    fn accept(&mut self, event: StoredEvent, ctx: &mut Context<Self>) {
        if event.seq <= self.delivered_seq {
            return;
        }
        self.waiting.insert(event.seq, event);
        while let Some(next) = self.waiting.remove(&(self.delivered_seq + 1)) {
            self.deliver(next);
        }
        if !self.waiting.is_empty() && !self.repair_scheduled {
            self.repair_scheduled = true;
            ctx.run_later(GAP_REPAIR_DELAY, |room, ctx| room.repair_gap(ctx));
        }
    }

    fn deliver(&mut self, event: StoredEvent) {
        self.delivered_seq = event.seq;
        let revoke_user = self.apply_membership(&event.event);
        let lag = Timestamp::now().millis().saturating_sub(event.at.millis());
        self.deps
            .telemetry
            .event_delivered(Duration::from_millis(lag.max(0) as u64));
        let frame = RoomFrame {
            seq: Some(event.seq),
            bytes: ServerFrame::Event(event).to_json().into(),
            skip_user: None,
            revoke_user,
        };
        // An error only means nobody on this node is listening right now.
        let _ = self.frames.send(Arc::new(frame));
    }

    /// Keeps the member cache in step with the log. Returns the user to revoke, if any.
    fn apply_membership(&mut self, event: &EventBody) -> Option<UserId> {
        match event {
            EventBody::MemberJoined { user, role } => {
                self.members
                    .insert(user.id.clone(), (user.name.clone(), *role));
                None
            }
            EventBody::MemberRoleChanged { user, role, .. } => {
                self.members
                    .insert(user.id.clone(), (user.name.clone(), *role));
                None
            }
            EventBody::MemberLeft { user, .. } => {
                self.members.remove(&user.id);
                Some(user.id.clone())
            }
            _ => None,
        }
    }

    fn repair_gap(&mut self, ctx: &mut Context<Self>) {
        self.repair_scheduled = false;
        if self.waiting.is_empty() {
            return;
        }
        let log = self.deps.log.clone();
        let room = self.id.clone();
        let after = self.delivered_seq;
        let fetch = async move { log.events_after(&room, after, GAP_REPAIR_LIMIT).await };
        ctx.spawn(fetch.into_actor(self).map(|result, room, ctx| {
            match result {
                Ok(events) => {
                    for event in events {
                        room.accept(event, ctx);
                    }
                }
                Err(error) => {
                    tracing::warn!(room = %room.id, %error, "gap repair failed; retrying");
                    if !room.repair_scheduled {
                        room.repair_scheduled = true;
                        ctx.run_later(GAP_REPAIR_DELAY * 5, |room, ctx| room.repair_gap(ctx));
                    }
                }
            }
        }));
    }

    fn broadcast_ephemeral(&self, frame: ServerFrame, skip_user: Option<UserId>) {
        let _ = self.frames.send(Arc::new(RoomFrame {
            seq: None,
            bytes: frame.to_json().into(),
            skip_user,
            revoke_user: None,
        }));
    }

    fn presence_changed(&self, user: &UserId, status: Presence) {
        self.broadcast_ephemeral(
            ServerFrame::Presence {
                room: self.id.clone(),
                user: self.user_ref(user),
                status,
            },
            None,
        );
    }

    /// Checks a command against the member cache and fills in what the caller's role decides.
    fn authorise(&self, actor: &UserId, command: Command) -> Result<Command, DomainError> {
        if let Command::JoinByInvite { .. } = command {
            // Joining is for non-members; the invite itself is checked in the store.
            return Ok(command);
        }
        let Some(role) = self.role_of(actor) else {
            return Err(DomainError::room_not_found());
        };
        match command {
            Command::PostMessage { .. } | Command::EditMessage { .. } | Command::React { .. }
                if !role.can_write() =>
            {
                Err(DomainError::forbidden("guests read and do not write"))
            }
            Command::DeleteMessage {
                actor, message_id, ..
            } => Ok(Command::DeleteMessage {
                actor,
                actor_is_admin: role.is_admin(),
                message_id,
            }),
            other => Ok(other),
        }
    }

    fn is_idle(&self) -> bool {
        self.sessions.is_empty()
            && self.writes_in_flight == 0
            && self.last_activity.elapsed() >= self.deps.config.idle_timeout
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.deps.telemetry.rooms_changed(1);
        // The room must know its members and head before it answers anyone, so the first load
        // holds the mailbox (ctx.wait) instead of racing the messages behind it.
        let log = self.deps.log.clone();
        let room = self.id.clone();
        ctx.wait(
            async move { log.room_state(&room).await }
                .into_actor(self)
                .map(|result, room, ctx| match result {
                    Ok(Some(state)) => {
                        room.members = state.members;
                        room.delivered_seq = state.head_seq;
                    }
                    // A room that does not exist has no members: every request is refused with
                    // room_not_found, exactly like a room the caller is not in.
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(room = %room.id, %error, "cannot load room; stopping it");
                        ctx.stop();
                    }
                }),
        );
        let check_every = (self.deps.config.idle_timeout / 2).max(Duration::from_millis(50));
        ctx.run_interval(check_every, |room, ctx| {
            if room.is_idle() {
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.deps.telemetry.rooms_changed(-1);
        self.registry.do_send(RoomStopped {
            room: self.id.clone(),
            addr: ctx.address(),
        });
    }
}

/// A session on this node wants the room's live frames.
#[derive(Message, Clone)]
#[rtype(result = "Result<Joined, DomainError>")]
pub struct Join {
    pub session: SessionId,
    pub user: UserId,
}

pub struct Joined {
    /// Every frame after `head_seq`, in order. Created while the room's head was `head_seq`,
    /// so replaying `since_seq < seq <= head_seq` from the log and then draining this receiver
    /// covers every event exactly once.
    pub frames: RoomFrames,
    pub head_seq: Seq,
    pub role: Role,
    pub online: Vec<UserRef>,
}

impl Handler<Join> for Room {
    type Result = Result<Joined, DomainError>;

    fn handle(&mut self, msg: Join, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let Some(role) = self.role_of(&msg.user) else {
            return Err(DomainError::room_not_found());
        };
        let frames = self.frames.subscribe();
        if self.sessions.insert(msg.session, msg.user.clone()).is_none() {
            let count = self.online.entry(msg.user.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                self.presence_changed(&msg.user, Presence::Online);
            }
        }
        let online = self.online.keys().map(|user| self.user_ref(user)).collect();
        Ok(Joined {
            frames,
            head_seq: self.delivered_seq,
            role,
            online,
        })
    }
}

/// The session is gone or unsubscribed.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: SessionId,
}

impl Handler<Leave> for Room {
    type Result = ();

    fn handle(&mut self, msg: Leave, _ctx: &mut Self::Context) {
        self.last_activity = Instant::now();
        let Some(user) = self.sessions.remove(&msg.session) else {
            return;
        };
        if let Some(count) = self.online.get_mut(&user) {
            *count -= 1;
            if *count == 0 {
                self.online.remove(&user);
                self.presence_changed(&user, Presence::Offline);
            }
        }
    }
}

/// A durable command from a member (socket or HTTP). Answers after the commit.
#[derive(Message, Clone)]
#[rtype(result = "WriteResult")]
pub struct Submit {
    pub actor: UserId,
    pub command: Command,
}

impl Room {
    /// Authorises the command and queues it for commit now, in mailbox order; the returned
    /// future answers after the commit, having fed the new event to `accept`.
    fn start_write(&mut self, actor: &UserId, command: Command) -> ResponseActFuture<Self, WriteResult> {
        self.last_activity = Instant::now();
        let queued = self.authorise(actor, command).and_then(|command| {
            self.deps.committer.enqueue(Write {
                room: self.id.clone(),
                command,
            })
        });
        let answer = match queued {
            Ok(answer) => answer,
            Err(error) => return Box::pin(fut::ready(Err(error))),
        };
        self.writes_in_flight += 1;
        Box::pin(answer_of(answer).into_actor(self).map(|result, room, ctx| {
            room.writes_in_flight -= 1;
            room.last_activity = Instant::now();
            if let Ok(Applied { event: Some(event), .. }) = &result {
                room.accept(event.clone(), ctx);
            }
            result
        }))
    }
}

impl Handler<Submit> for Room {
    type Result = ResponseActFuture<Self, WriteResult>;

    fn handle(&mut self, msg: Submit, _ctx: &mut Self::Context) -> Self::Result {
        self.start_write(&msg.actor, msg.command)
    }
}

/// A durable command whose answer goes to `reply`. Sessions send it with `do_send`, which queues
/// even when the mailbox is full, so one connection's writes reach the room, and so the log, in
/// the order the client sent them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubmitOrdered {
    pub actor: UserId,
    pub command: Command,
    pub reply: tokio::sync::oneshot::Sender<WriteResult>,
}

impl Handler<SubmitOrdered> for Room {
    type Result = ();

    fn handle(&mut self, msg: SubmitOrdered, ctx: &mut Self::Context) {
        let reply = msg.reply;
        let write = self.start_write(&msg.actor, msg.command);
        ctx.spawn(write.map(move |result, _room, _ctx| {
            let _ = reply.send(result);
        }));
    }
}

/// A member is typing (ephemeral; not sent back to them).
#[derive(Message, Clone)]
#[rtype(result = "Result<(), DomainError>")]
pub struct Typing {
    pub user: UserId,
}

impl Handler<Typing> for Room {
    type Result = Result<(), DomainError>;

    fn handle(&mut self, msg: Typing, _ctx: &mut Self::Context) -> Self::Result {
        match self.role_of(&msg.user) {
            None => Err(DomainError::room_not_found()),
            Some(role) if !role.can_write() => {
                Err(DomainError::forbidden("guests read and do not write"))
            }
            Some(_) => {
                self.broadcast_ephemeral(
                    ServerFrame::Typing {
                        room: self.id.clone(),
                        user: self.user_ref(&msg.user),
                    },
                    Some(msg.user),
                );
                Ok(())
            }
        }
    }
}

/// Durable events committed elsewhere (another node, via the bus).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Deliver {
    pub events: Vec<StoredEvent>,
}

impl Handler<Deliver> for Room {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        for event in msg.events {
            self.accept(event, ctx);
        }
    }
}

/// The caller's role in the room, from the cache (`None`: not a member).
#[derive(Message, Clone)]
#[rtype(result = "Option<Role>")]
pub struct RoleOf {
    pub user: UserId,
}

impl Handler<RoleOf> for Room {
    type Result = Option<Role>;

    fn handle(&mut self, msg: RoleOf, _ctx: &mut Self::Context) -> Self::Result {
        self.role_of(&msg.user)
    }
}

/// Reports the error code a caller should see when a room cannot be reached at all.
pub fn unreachable_room() -> DomainError {
    DomainError::new(ErrorCode::StoreUnavailable, "the room is unavailable, try again")
}
