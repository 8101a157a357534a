//! `Room`: one actor per active room on this node. It owns the room's local fan-out: the member
//! cache used to authorise writes, the last seq delivered here, the sessions subscribed here and
//! their presence. Sessions send it `Join`/`Leave`/`Typing`; sessions and HTTP handlers send it
//! `Submit` (a durable command); the bus (other nodes) sends it `Deliver`. Every durable event is
//! committed first and fanned out after, in seq order, serialised ONCE and shared as bytes on a
//! bounded broadcast channel (a session that falls behind it is cut off, nobody else waits).
//! It stops itself after `idle_timeout` with no session and no write in flight.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::broadcast;

use crate::agent::trigger::mentioned_agents;
use crate::agent::{finish, Agent, AiDeps, CancelJob, Enqueue, Job};
use crate::bus::{Bus, BusPayload};
use crate::commit::{answer_of, Committer};
use crate::error::{DomainError, ErrorCode};
use crate::event::{AgentInfo, AuthorKind, EventBody, Message, StoredEvent, UserRef};
use crate::ids::{MessageId, Role, RoomId, Seq, SessionId, UserId};
use crate::ports::{
    AnswerOutcome, Applied, Command, Partial, RoomLog, Telemetry, Write, WriteResult,
};
use crate::protocol::{Presence, QueuedTrigger, ServerFrame, UsageReport};
use crate::registry::{RoomRegistry, RoomStopped};
use crate::time::Timestamp;

/// How long to wait for a missing seq to arrive by itself before fetching it from the log.
const GAP_REPAIR_DELAY: Duration = Duration::from_millis(100);
/// Ended answers remembered, to ignore their late deltas.
const ENDED_REMEMBERED: usize = 256;
/// Most events fetched in one gap repair.
const GAP_REPAIR_LIMIT: u32 = 1000;

#[derive(Clone, Copy, Debug)]
pub struct RoomConfig {
    /// Frames a session may fall behind before it is cut off as a slow consumer.
    pub broadcast_capacity: usize,
    pub idle_timeout: Duration,
    /// How often a room re-announces who is online here to the other nodes.
    pub presence_interval: Duration,
    /// How long another node's presence snapshot counts without being renewed (a dead node's
    /// members go offline after at most this plus one check).
    pub presence_ttl: Duration,
    /// How often a room with subscribers checks the log for events the bus may have lost
    /// (only when other nodes exist).
    pub resync_interval: Duration,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            broadcast_capacity: 4096,
            idle_timeout: Duration::from_secs(30),
            presence_interval: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(25),
            resync_interval: Duration::from_secs(10),
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

/// An AI answer in progress as this node knows it.
#[derive(Clone, Debug, Default)]
struct LiveAnswer {
    agent: String,
    trigger_message_id: Option<MessageId>,
    trigger_author: Option<UserId>,
    text: String,
    /// Length of `text` in characters (offsets count characters).
    chars: usize,
    /// The last sign of life (start, delta, snapshot); `None` until one is seen.
    touched: Option<Instant>,
}

impl LiveAnswer {
    /// Applies `delta` at `offset`; false when there is a gap before it (text is unknown).
    fn splice(&mut self, offset: usize, delta: &str) -> bool {
        if offset > self.chars {
            return false;
        }
        let cut = self
            .text
            .char_indices()
            .nth(offset)
            .map_or(self.text.len(), |(at, _)| at);
        self.text.truncate(cut);
        self.text.push_str(delta);
        self.chars = offset + delta.chars().count();
        true
    }
}

/// Everything a Room needs from its node.
#[derive(Clone)]
pub struct RoomDeps {
    pub log: Arc<dyn RoomLog>,
    pub bus: Arc<dyn Bus>,
    /// `None`: no agents on this node (unit tests); agents then never answer.
    pub ai: Option<AiDeps>,
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
    /// Sessions per user on this node.
    online: HashMap<UserId, usize>,
    /// Other nodes' presence snapshots and when each stops counting.
    remote_online: HashMap<String, (Vec<UserRef>, Instant)>,
    fetching: bool,
    /// Personas of the room (the default `ai` included), kept current by `agent.added`.
    agents: HashMap<String, AgentInfo>,
    /// Agent actors running on this node for this room.
    agent_actors: HashMap<String, Addr<Agent>>,
    /// Answers in progress (on any node) and their text so far.
    answers: HashMap<MessageId, LiveAnswer>,
    /// Each agent's queue of waiting triggers (on any node), as last announced.
    queues: HashMap<String, Vec<QueuedTrigger>>,
    /// Answers that ended recently: a delta or snapshot still in flight on the bus must not
    /// bring them back to life.
    ended: VecDeque<MessageId>,
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
            remote_online: HashMap::new(),
            fetching: false,
            agents: HashMap::from([(
                AgentInfo::DEFAULT_NAME.to_owned(),
                AgentInfo::default_agent(),
            )]),
            agent_actors: HashMap::new(),
            answers: HashMap::new(),
            queues: HashMap::new(),
            ended: VecDeque::new(),
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
        self.apply_ai(&event.event);
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

    /// Keeps the agents and the answers in progress in step with the log.
    fn apply_ai(&mut self, event: &EventBody) {
        match event {
            EventBody::AgentAdded { agent, .. } => {
                self.agents.insert(agent.name.clone(), agent.clone());
            }
            EventBody::AiStarted {
                message_id,
                agent,
                trigger_message_id,
                trigger_author,
            } => {
                let answer = self.answers.entry(message_id.clone()).or_default();
                answer.touched = Some(Instant::now());
                answer.agent = agent.clone();
                answer.trigger_message_id = Some(trigger_message_id.clone());
                answer.trigger_author = Some(trigger_author.clone());
            }
            EventBody::AiCompleted { message, .. }
            | EventBody::AiFailed { message, .. }
            | EventBody::AiCancelled { message, .. } => {
                self.answers.remove(&message.id);
                self.ended.push_back(message.id.clone());
                if self.ended.len() > ENDED_REMEMBERED {
                    self.ended.pop_front();
                }
            }
            _ => {}
        }
    }

    /// Starts the agents a user's freshly committed message calls on. Only the node that
    /// committed the message gets here, so a trigger runs once in the whole cluster; agents'
    /// own messages never trigger (no loops between agents).
    fn start_triggered_agents(&mut self, message: &Message, ctx: &mut Context<Self>) {
        let Some(ai) = self.deps.ai.clone() else {
            return;
        };
        if message.author.kind != AuthorKind::User {
            return;
        }
        let job = Job {
            trigger_message_id: message.id.clone(),
            trigger_author: message.author.id.clone(),
            charge_to: message.author.id.clone(),
        };
        let names: Vec<String> = self.agents.keys().cloned().collect();
        let called = mentioned_agents(&message.text, &names);
        if !called.is_empty() {
            for name in called {
                self.enqueue(&name, job.clone(), ctx);
            }
            return;
        }
        // A reply to an agent's message calls that agent.
        let Some(parent) = message.reply_to_message.clone() else {
            return;
        };
        let room = self.id.clone();
        let lookup = async move { ai.store.message(&room, &parent).await };
        ctx.spawn(lookup.into_actor(self).map(move |found, room, ctx| {
            if let Ok(Some(parent)) = found {
                if let Some(name) = agent_of(&parent) {
                    room.enqueue(&name, job, ctx);
                }
            }
        }));
    }

    fn enqueue(&mut self, agent: &str, job: Job, ctx: &mut Context<Self>) {
        if let Some(addr) = self.agent_actor(agent, ctx) {
            addr.do_send(Enqueue { job });
        }
    }

    fn agent_actor(&mut self, name: &str, ctx: &mut Context<Self>) -> Option<Addr<Agent>> {
        let ai = self.deps.ai.clone()?;
        let info = self.agents.get(name)?.clone();
        if let Some(addr) = self.agent_actors.get(name).filter(|addr| addr.connected()) {
            return Some(addr.clone());
        }
        let addr = Agent::new(self.id.clone(), info, ctx.address(), ai).start();
        self.agent_actors.insert(name.to_owned(), addr.clone());
        Some(addr)
    }

    /// Applies a delta, fans it out to this node's members and, when it is this node's own
    /// agent writing, to the other nodes.
    fn apply_delta(&mut self, message_id: MessageId, offset: usize, text: String, publish: bool) {
        if self.ended.contains(&message_id) {
            return;
        }
        let answer = self.answers.entry(message_id.clone()).or_default();
        answer.touched = Some(Instant::now());
        if !answer.splice(offset, &text) {
            tracing::debug!(room = %self.id, %message_id, offset, "delta after a gap; waiting for a snapshot");
        }
        if publish {
            self.deps.bus.publish(
                &self.id,
                BusPayload::AiDelta {
                    message_id: message_id.clone(),
                    offset,
                    text: text.clone(),
                },
            );
        }
        self.broadcast_ephemeral(
            ServerFrame::AiDelta {
                room: self.id.clone(),
                message_id,
                offset,
                text,
            },
            None,
        );
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
        if !self.waiting.is_empty() {
            self.fetch_missing(ctx);
        }
    }

    /// Fetches from the log everything after the last delivered seq, page by page, and feeds it
    /// to `accept`. Used for gaps, after the bus reconnects, and as a periodic safety net.
    fn fetch_missing(&mut self, ctx: &mut Context<Self>) {
        if self.fetching {
            return;
        }
        self.fetching = true;
        let log = self.deps.log.clone();
        let room = self.id.clone();
        let after = self.delivered_seq;
        let fetch = async move { log.events_after(&room, after, GAP_REPAIR_LIMIT).await };
        ctx.spawn(fetch.into_actor(self).map(|result, room, ctx| {
            room.fetching = false;
            match result {
                Ok(events) => {
                    let full_page = events.len() == GAP_REPAIR_LIMIT as usize;
                    for event in events {
                        room.accept(event, ctx);
                    }
                    if full_page {
                        room.fetch_missing(ctx);
                    }
                }
                Err(error) => {
                    tracing::warn!(room = %room.id, %error, "fetching missed events failed; retrying");
                    if !room.repair_scheduled {
                        room.repair_scheduled = true;
                        ctx.run_later(GAP_REPAIR_DELAY * 5, |room, ctx| {
                            room.repair_scheduled = false;
                            room.fetch_missing(ctx);
                        });
                    }
                }
            }
        }));
    }

    /// Everyone online in the room on any node. Expired snapshots count until
    /// `expire_remote_presence` removes them, so that removal is seen as a change.
    fn online_users(&self) -> HashMap<UserId, UserRef> {
        let mut users: HashMap<UserId, UserRef> = self
            .online
            .keys()
            .map(|user| (user.clone(), self.user_ref(user)))
            .collect();
        for (snapshot, _) in self.remote_online.values() {
            for user in snapshot {
                users.entry(user.id.clone()).or_insert_with(|| user.clone());
            }
        }
        users
    }

    /// Whether another node's snapshot has the user online (then a change of the user's
    /// sessions here changes nothing anyone sees). A session joining or leaving changes only its
    /// own user's state, so this check replaces diffing the whole online list.
    fn online_on_other_nodes(&self, user: &UserId) -> bool {
        self.remote_online
            .values()
            .any(|(snapshot, _)| snapshot.iter().any(|who| who.id == *user))
    }

    /// Emits `presence` frames for every user whose online state differs between two views.
    fn announce_presence_changes(
        &self,
        before: &HashMap<UserId, UserRef>,
        after: &HashMap<UserId, UserRef>,
    ) {
        for (user, who) in after {
            if !before.contains_key(user) {
                self.broadcast_presence(who.clone(), Presence::Online);
            }
        }
        for (user, who) in before {
            if !after.contains_key(user) {
                self.broadcast_presence(who.clone(), Presence::Offline);
            }
        }
    }

    fn broadcast_presence(&self, user: UserRef, status: Presence) {
        self.broadcast_ephemeral(
            ServerFrame::Presence {
                room: self.id.clone(),
                user,
                status,
            },
            None,
        );
    }

    /// Tells the other nodes who is online here (full snapshot).
    fn publish_presence(&self) {
        if self.deps.bus.shared() {
            let online = self.online.keys().map(|user| self.user_ref(user)).collect();
            self.deps
                .bus
                .publish(&self.id, BusPayload::Presence { online });
        }
    }

    fn expire_remote_presence(&mut self) {
        let now = Instant::now();
        if self
            .remote_online
            .values()
            .all(|(_, expires)| *expires > now)
        {
            return;
        }
        let before = self.online_users();
        self.remote_online.retain(|_, (_, expires)| *expires > now);
        let after = self.online_users();
        self.announce_presence_changes(&before, &after);
    }

    fn broadcast_ephemeral(&self, frame: ServerFrame, skip_user: Option<UserId>) {
        let _ = self.frames.send(Arc::new(RoomFrame {
            seq: None,
            bytes: frame.to_json().into(),
            skip_user,
            revoke_user: None,
        }));
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
            Command::AddAgent { .. } if !role.is_admin() => {
                Err(DomainError::forbidden("only admins and owners add agents"))
            }
            Command::StartAnswer { .. } | Command::FinishAnswer { .. } => {
                Err(DomainError::forbidden("only agents write answers"))
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

    fn load_ai(&mut self, agents: Vec<AgentInfo>, partials: Vec<Partial>) {
        for agent in agents {
            self.agents.insert(agent.name.clone(), agent);
        }
        for partial in partials {
            let mut answer = LiveAnswer {
                agent: partial.agent,
                trigger_message_id: Some(partial.trigger_message_id),
                trigger_author: Some(partial.trigger_author),
                touched: Some(Instant::now()),
                ..LiveAnswer::default()
            };
            answer.splice(0, &partial.text);
            self.answers.insert(partial.message_id, answer);
        }
    }

    /// Ends answers whose writer has gone silent for too long (its node died): any node may, the
    /// store accepts the first finish only.
    fn end_stale_answers(&mut self, ctx: &mut Context<Self>) {
        let Some(ai) = &self.deps.ai else { return };
        let limit = ai.config.stale_answer_after;
        let stale: Vec<(MessageId, LiveAnswer)> = self
            .answers
            .iter()
            .filter(|(_, answer)| answer.touched.is_none_or(|at| at.elapsed() >= limit))
            .map(|(id, answer)| (id.clone(), answer.clone()))
            .collect();
        for (message_id, answer) in stale {
            let (Some(trigger_message_id), Some(trigger_author)) =
                (answer.trigger_message_id, answer.trigger_author)
            else {
                continue;
            };
            let info = self
                .agents
                .get(&answer.agent)
                .cloned()
                .unwrap_or_else(|| AgentInfo {
                    name: answer.agent.clone(),
                    ..AgentInfo::default_agent()
                });
            if let Some(entry) = self.answers.get_mut(&message_id) {
                entry.touched = Some(Instant::now()); // one attempt per period
            }
            let job = Job {
                trigger_message_id,
                trigger_author: trigger_author.clone(),
                charge_to: trigger_author,
            };
            let room = ctx.address();
            let outcome = AnswerOutcome::Failed {
                code: "agent_lost".into(),
                reason: "the node writing this answer stopped before it finished".into(),
            };
            let text = answer.text;
            ctx.spawn(
                async move { finish(&room, &info, &job, &message_id, text, outcome, None).await }
                    .into_actor(self),
            );
        }
    }

    /// Answers in progress with their text so far, for a session joining now.
    fn answers_in_progress(&self) -> Vec<(MessageId, String)> {
        self.answers
            .iter()
            .filter(|(_, answer)| !answer.text.is_empty())
            .map(|(id, answer)| (id.clone(), answer.text.clone()))
            .collect()
    }

    fn is_idle(&self) -> bool {
        self.sessions.is_empty()
            && self.agent_actors.is_empty()
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
        // Subscribing to the bus BEFORE reading the head leaves no window: whatever is committed
        // after the head was read arrives on the bus (or is fetched when a gap shows).
        let log = self.deps.log.clone();
        let bus = self.deps.bus.clone();
        let ai_store = self.deps.ai.as_ref().map(|ai| ai.store.clone());
        let room = self.id.clone();
        ctx.wait(
            async move {
                bus.subscribe(&room).await;
                let state = log.room_state(&room).await?;
                let (agents, partials) = match ai_store {
                    Some(store) => (store.agents(&room).await?, store.partials(&room).await?),
                    None => (Vec::new(), Vec::new()),
                };
                Ok::<_, crate::error::StoreError>(state.map(|state| (state, agents, partials)))
            }
            .into_actor(self)
            .map(|result, room, ctx| match result {
                Ok(Some((state, agents, partials))) => {
                    room.members = state.members;
                    room.delivered_seq = state.head_seq;
                    room.load_ai(agents, partials);
                    if room.deps.bus.shared() {
                        room.deps.bus.publish(&room.id, BusPayload::PresenceQuery);
                    }
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
        let config = self.deps.config;
        ctx.run_interval(config.presence_interval, |room, _ctx| {
            if !room.online.is_empty() {
                room.publish_presence();
            }
        });
        ctx.run_interval(
            (config.presence_ttl / 5).max(Duration::from_millis(100)),
            |room, _ctx| {
                room.expire_remote_presence();
            },
        );
        if let Some(ai) = &self.deps.ai {
            let every = (ai.config.stale_answer_after / 4).max(Duration::from_millis(250));
            ctx.run_interval(every, |room, ctx| room.end_stale_answers(ctx));
        }
        if self.deps.bus.shared() && !config.resync_interval.is_zero() {
            ctx.run_interval(config.resync_interval, |room, ctx| {
                if !room.sessions.is_empty() {
                    room.fetch_missing(ctx);
                }
            });
        }
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.deps.telemetry.rooms_changed(-1);
        let bus = self.deps.bus.clone();
        let room = self.id.clone();
        // At process exit the runtime may already be gone; then there is nobody to tell.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { bus.unsubscribe(&room).await });
        }
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
    /// AI answers in progress and their text so far (sent as `ai.delta` with offset 0 after the
    /// replay; the deltas that follow come through `frames`).
    pub answers: Vec<(MessageId, String)>,
    /// Each agent's queue of waiting triggers, when not empty.
    pub queues: Vec<(String, Vec<QueuedTrigger>)>,
}

impl Handler<Join> for Room {
    type Result = Result<Joined, DomainError>;

    fn handle(&mut self, msg: Join, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let Some(role) = self.role_of(&msg.user) else {
            return Err(DomainError::room_not_found());
        };
        let frames = self.frames.subscribe();
        if self
            .sessions
            .insert(msg.session, msg.user.clone())
            .is_none()
        {
            let count = self.online.entry(msg.user.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                if !self.online_on_other_nodes(&msg.user) {
                    self.broadcast_presence(self.user_ref(&msg.user), Presence::Online);
                }
                self.publish_presence();
            }
        }
        let online = self.online_users().into_values().collect();
        Ok(Joined {
            frames,
            head_seq: self.delivered_seq,
            role,
            online,
            answers: self.answers_in_progress(),
            queues: self
                .queues
                .iter()
                .filter(|(_, queue)| !queue.is_empty())
                .map(|(agent, queue)| (agent.clone(), queue.clone()))
                .collect(),
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
                if !self.online_on_other_nodes(&user) {
                    self.broadcast_presence(self.user_ref(&user), Presence::Offline);
                }
                self.publish_presence();
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
    fn start_write(
        &mut self,
        actor: &UserId,
        command: Command,
    ) -> ResponseActFuture<Self, WriteResult> {
        match self.authorise(actor, command) {
            Ok(command) => self.commit(command),
            Err(error) => Box::pin(fut::ready(Err(error))),
        }
    }

    /// Queues an authorised command for commit now; after the commit the new event is
    /// delivered here, published to the other nodes, and (a person's message) may start agents.
    fn commit(&mut self, command: Command) -> ResponseActFuture<Self, WriteResult> {
        self.last_activity = Instant::now();
        let queued = self.deps.committer.enqueue(Write {
            room: self.id.clone(),
            command,
        });
        let answer = match queued {
            Ok(answer) => answer,
            Err(error) => return Box::pin(fut::ready(Err(error))),
        };
        self.writes_in_flight += 1;
        Box::pin(answer_of(answer).into_actor(self).map(|result, room, ctx| {
            room.writes_in_flight -= 1;
            room.last_activity = Instant::now();
            if let Ok(Applied {
                event: Some(event), ..
            }) = &result
            {
                room.accept(event.clone(), ctx);
                room.deps.bus.publish(
                    &room.id,
                    BusPayload::Event {
                        event: event.clone(),
                    },
                );
                if let EventBody::MessageCreated { message } = &event.event {
                    room.start_triggered_agents(message, ctx);
                }
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
                let user = self.user_ref(&msg.user);
                self.broadcast_ephemeral(
                    ServerFrame::Typing {
                        room: self.id.clone(),
                        user: user.clone(),
                    },
                    Some(msg.user),
                );
                self.deps.bus.publish(&self.id, BusPayload::Typing { user });
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

/// A write by one of this room's agents on this node (no member authorisation: the agent
/// acts for the room).
#[derive(Message, Clone)]
#[rtype(result = "WriteResult")]
pub struct AgentWrite {
    pub command: Command,
}

impl Handler<AgentWrite> for Room {
    type Result = ResponseActFuture<Self, WriteResult>;

    fn handle(&mut self, msg: AgentWrite, _ctx: &mut Self::Context) -> Self::Result {
        self.commit(msg.command)
    }
}

/// New text from this node's agent.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct AgentDelta {
    pub message_id: MessageId,
    pub offset: usize,
    pub text: String,
}

impl Handler<AgentDelta> for Room {
    type Result = ();

    fn handle(&mut self, msg: AgentDelta, _ctx: &mut Self::Context) {
        self.apply_delta(msg.message_id, msg.offset, msg.text, true);
    }
}

/// The whole text so far of this node's agent's answer, for other nodes to repair gaps.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct AgentSnapshot {
    pub message_id: MessageId,
    pub text: String,
}

impl Handler<AgentSnapshot> for Room {
    type Result = ();

    fn handle(&mut self, msg: AgentSnapshot, _ctx: &mut Self::Context) {
        self.deps.bus.publish(
            &self.id,
            BusPayload::AiSnapshot {
                message_id: msg.message_id,
                text: msg.text,
            },
        );
    }
}

#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct AgentQueue {
    pub agent: String,
    pub queue: Vec<QueuedTrigger>,
}

impl Handler<AgentQueue> for Room {
    type Result = ();

    fn handle(&mut self, msg: AgentQueue, _ctx: &mut Self::Context) {
        self.queues.insert(msg.agent.clone(), msg.queue.clone());
        self.deps.bus.publish(
            &self.id,
            BusPayload::AiQueue {
                agent: msg.agent.clone(),
                queue: msg.queue.clone(),
            },
        );
        self.broadcast_ephemeral(
            ServerFrame::AiQueue {
                room: self.id.clone(),
                agent: msg.agent,
                queue: msg.queue,
            },
            None,
        );
    }
}

#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct AgentUsage {
    pub usage: UsageReport,
}

impl Handler<AgentUsage> for Room {
    type Result = ();

    fn handle(&mut self, msg: AgentUsage, _ctx: &mut Self::Context) {
        self.deps.bus.publish(
            &self.id,
            BusPayload::AiUsage {
                usage: msg.usage.clone(),
            },
        );
        self.broadcast_ephemeral(
            ServerFrame::AiUsage {
                room: self.id.clone(),
                usage: msg.usage,
            },
            None,
        );
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentStopped {
    pub agent: String,
    pub addr: Addr<Agent>,
}

impl Handler<AgentStopped> for Room {
    type Result = ();

    fn handle(&mut self, msg: AgentStopped, _ctx: &mut Self::Context) {
        if self.agent_actors.get(&msg.agent) == Some(&msg.addr) {
            self.agent_actors.remove(&msg.agent);
        }
        self.last_activity = Instant::now();
    }
}

/// A member asks to stop an AI answer (by the answer's id) or a queued trigger (by the
/// trigger's id): its trigger's author or an admin may. Answers with the room's head seq.
#[derive(Message, Clone)]
#[rtype(result = "Result<Seq, DomainError>")]
pub struct CancelAnswer {
    pub by: UserId,
    pub message_id: MessageId,
}

impl Handler<CancelAnswer> for Room {
    type Result = Result<Seq, DomainError>;

    fn handle(&mut self, msg: CancelAnswer, _ctx: &mut Self::Context) -> Self::Result {
        let Some(role) = self.role_of(&msg.by) else {
            return Err(DomainError::room_not_found());
        };
        let author = self
            .answers
            .iter()
            .find(|(id, answer)| {
                **id == msg.message_id
                    || answer.trigger_message_id.as_ref() == Some(&msg.message_id)
            })
            .and_then(|(_, answer)| answer.trigger_author.clone())
            .or_else(|| {
                self.queues
                    .values()
                    .flatten()
                    .find(|queued| queued.trigger_message_id == msg.message_id)
                    .map(|queued| queued.trigger_author.clone())
            });
        let Some(author) = author else {
            return Err(DomainError::new(
                ErrorCode::NotFound,
                "no AI answer in progress or queued for that message",
            ));
        };
        if author != msg.by && !role.is_admin() {
            return Err(DomainError::forbidden(
                "only the trigger's author or an admin can cancel an answer",
            ));
        }
        for agent in self.agent_actors.values() {
            agent.do_send(CancelJob {
                message_id: msg.message_id.clone(),
                by: msg.by.clone(),
            });
        }
        self.deps.bus.publish(
            &self.id,
            BusPayload::AiCancel {
                message_id: msg.message_id,
                by: msg.by,
            },
        );
        Ok(self.delivered_seq)
    }
}

/// A member asks the agent that wrote answer `message_id` to answer its trigger again (charged
/// to the asker).
#[derive(Message, Clone)]
#[rtype(result = "Result<Seq, DomainError>")]
pub struct RegenerateAnswer {
    pub by: UserId,
    pub message_id: MessageId,
}

impl Handler<RegenerateAnswer> for Room {
    type Result = ResponseActFuture<Self, Result<Seq, DomainError>>;

    fn handle(&mut self, msg: RegenerateAnswer, _ctx: &mut Self::Context) -> Self::Result {
        match self.role_of(&msg.by) {
            None => return Box::pin(fut::ready(Err(DomainError::room_not_found()))),
            Some(role) if !role.can_write() => {
                return Box::pin(fut::ready(Err(DomainError::forbidden(
                    "guests read and do not write",
                ))))
            }
            Some(_) => {}
        }
        let Some(store) = self.deps.ai.as_ref().map(|ai| ai.store.clone()) else {
            return Box::pin(fut::ready(Err(DomainError::new(
                ErrorCode::NotFound,
                "no agents here",
            ))));
        };
        let room = self.id.clone();
        let lookup = async move {
            let not_an_answer = || {
                DomainError::new(
                    ErrorCode::MessageNotFound,
                    "no AI answer with that id in this room",
                )
            };
            let answer = store
                .message(&room, &msg.message_id)
                .await
                .map_err(|e| e.to_domain())?
                .ok_or_else(not_an_answer)?;
            let agent = agent_of(&answer).ok_or_else(not_an_answer)?;
            let trigger_id = answer.reply_to_message.clone().ok_or_else(not_an_answer)?;
            let trigger = store
                .message(&room, &trigger_id)
                .await
                .map_err(|e| e.to_domain())?
                .filter(|trigger| !trigger.deleted)
                .ok_or_else(|| {
                    DomainError::new(ErrorCode::MessageNotFound, "the question was deleted")
                })?;
            Ok((agent, trigger, msg.by))
        };
        Box::pin(lookup.into_actor(self).map(|result, room, ctx| {
            let (agent, trigger, by) = result?;
            let job = Job {
                trigger_message_id: trigger.id,
                trigger_author: trigger.author.id,
                charge_to: by,
            };
            room.enqueue(&agent, job, ctx);
            Ok(room.delivered_seq)
        }))
    }
}

/// The agent that wrote `message`, if an agent did.
fn agent_of(message: &Message) -> Option<String> {
    if message.author.kind != AuthorKind::Ai {
        return None;
    }
    message
        .author
        .id
        .as_str()
        .strip_prefix("ai:")
        .map(str::to_owned)
}

/// Typing and presence from another node.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct RemoteEphemeral {
    pub origin: String,
    pub payload: BusPayload,
}

impl Handler<RemoteEphemeral> for Room {
    type Result = ();

    fn handle(&mut self, msg: RemoteEphemeral, ctx: &mut Self::Context) {
        match msg.payload {
            BusPayload::Typing { user } => {
                let skip = Some(user.id.clone());
                self.broadcast_ephemeral(
                    ServerFrame::Typing {
                        room: self.id.clone(),
                        user,
                    },
                    skip,
                );
            }
            BusPayload::Presence { online } => {
                let before = self.online_users();
                let expires = Instant::now() + self.deps.config.presence_ttl;
                if online.is_empty() {
                    self.remote_online.remove(&msg.origin);
                } else {
                    self.remote_online.insert(msg.origin, (online, expires));
                }
                self.announce_presence_changes(&before, &self.online_users());
            }
            BusPayload::PresenceQuery => {
                if !self.online.is_empty() {
                    self.publish_presence();
                }
            }
            BusPayload::Event { event } => self.accept(event, ctx),
            BusPayload::AiDelta {
                message_id,
                offset,
                text,
            } => {
                self.apply_delta(message_id, offset, text, false);
            }
            BusPayload::AiSnapshot { message_id, text } => {
                if self.ended.contains(&message_id) {
                    return;
                }
                let answer = self.answers.entry(message_id.clone()).or_default();
                answer.touched = Some(Instant::now());
                if answer.text != text {
                    answer.text.clear();
                    answer.chars = 0;
                    answer.splice(0, &text);
                    self.broadcast_ephemeral(
                        ServerFrame::AiDelta {
                            room: self.id.clone(),
                            message_id,
                            offset: 0,
                            text,
                        },
                        None,
                    );
                }
            }
            BusPayload::AiQueue { agent, queue } => {
                self.queues.insert(agent.clone(), queue.clone());
                self.broadcast_ephemeral(
                    ServerFrame::AiQueue {
                        room: self.id.clone(),
                        agent,
                        queue,
                    },
                    None,
                );
            }
            BusPayload::AiUsage { usage } => {
                self.broadcast_ephemeral(
                    ServerFrame::AiUsage {
                        room: self.id.clone(),
                        usage,
                    },
                    None,
                );
            }
            BusPayload::AiCancel { message_id, by } => {
                for agent in self.agent_actors.values() {
                    agent.do_send(CancelJob {
                        message_id: message_id.clone(),
                        by: by.clone(),
                    });
                }
            }
        }
    }
}

/// The bus may have lost envelopes (it reconnected): fetch whatever the log has beyond what was
/// delivered here.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Resync;

impl Handler<Resync> for Room {
    type Result = ();

    fn handle(&mut self, _msg: Resync, ctx: &mut Self::Context) {
        self.fetch_missing(ctx);
        self.publish_presence();
    }
}

/// Reports the error code a caller should see when a room cannot be reached at all.
pub fn unreachable_room() -> DomainError {
    DomainError::new(
        ErrorCode::StoreUnavailable,
        "the room is unavailable, try again",
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bus::LocalHub;
    use crate::commit::CommitterConfig;
    use crate::event::{Author, LeaveReason};
    use crate::fakes::MemoryLog;
    use crate::ports::NoTelemetry;
    use crate::registry::{GetRoom, RoomRegistry};

    fn body(n: i64) -> EventBody {
        EventBody::MemberLeft {
            user: UserRef {
                id: UserId(format!("gone{n}")),
                name: String::new(),
            },
            reason: LeaveReason::Left,
            by: UserId(format!("gone{n}")),
        }
    }

    /// A room with member `u` on a node with a lone in-process bus, and a session joined to it.
    async fn joined_room(log: Arc<MemoryLog>) -> (Addr<Room>, RoomFrames) {
        let room = RoomId::from("r");
        log.add_room(&room, &[("u", Role::Member)]);
        let (notices, _) = tokio::sync::mpsc::channel(16);
        let deps = RoomDeps {
            log: log.clone(),
            bus: Arc::new(LocalHub::new().join("n", notices)),
            ai: None,
            committer: Committer::start(log, CommitterConfig::default(), Arc::new(NoTelemetry)),
            telemetry: Arc::new(NoTelemetry),
            config: RoomConfig::default(),
        };
        let registry = RoomRegistry::new(deps).start();
        let addr = registry
            .send(GetRoom { room })
            .await
            .expect("the registry answers");
        let joined = addr
            .send(Join {
                session: SessionId(1),
                user: UserId::from("u"),
            })
            .await
            .expect("the room answers")
            .expect("u is a member");
        (addr, joined.frames)
    }

    /// The seqs of the durable frames that arrive within `wait`.
    async fn seqs(frames: &mut RoomFrames, wait: Duration) -> Vec<Seq> {
        let mut seqs = Vec::new();
        while let Ok(Ok(frame)) = tokio::time::timeout(wait, frames.recv()).await {
            seqs.extend(frame.seq);
        }
        seqs
    }

    #[actix::test]
    async fn events_arriving_out_of_order_go_out_in_seq_order_once() {
        let log = Arc::new(MemoryLog::default());
        let (room, mut frames) = joined_room(log.clone()).await;
        let events: Vec<StoredEvent> = (1..=3)
            .map(|n| log.append_foreign(&RoomId::from("r"), body(n)))
            .collect();
        for order in [2, 0, 0, 1, 2] {
            room.do_send(Deliver {
                events: vec![events[order].clone()],
            });
        }
        assert_eq!(
            seqs(&mut frames, Duration::from_millis(50)).await,
            [1, 2, 3]
        );
    }

    #[actix::test]
    async fn a_gap_the_bus_never_fills_is_repaired_from_the_log() {
        let log = Arc::new(MemoryLog::default());
        let (room, mut frames) = joined_room(log.clone()).await;
        let events: Vec<StoredEvent> = (1..=3)
            .map(|n| log.append_foreign(&RoomId::from("r"), body(n)))
            .collect();
        room.do_send(Deliver {
            events: vec![events[2].clone()],
        });
        // Nothing before the repair delay, then everything in order.
        assert!(seqs(&mut frames, GAP_REPAIR_DELAY / 4).await.is_empty());
        assert_eq!(seqs(&mut frames, GAP_REPAIR_DELAY * 3).await, [1, 2, 3]);
    }

    #[actix::test]
    async fn a_write_the_store_refuses_is_neither_acked_nor_delivered() {
        let log = Arc::new(MemoryLog::default());
        let (room, mut frames) = joined_room(log.clone()).await;
        log.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        let command = Command::PostMessage {
            author: Author {
                id: UserId::from("u"),
                name: "u".into(),
                kind: AuthorKind::User,
            },
            client_msg_id: "c1".into(),
            text: "hello".into(),
            reply_to: None,
        };
        let answer = room
            .send(Submit {
                actor: UserId::from("u"),
                command,
            })
            .await
            .expect("the room answers");
        assert_eq!(
            answer.expect_err("no ack without a commit").code,
            ErrorCode::StoreUnavailable
        );
        assert!(seqs(&mut frames, Duration::from_millis(100))
            .await
            .is_empty());
        assert_eq!(log.event_count(&RoomId::from("r")), 0);
    }
}
