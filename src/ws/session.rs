//! `Session`: one actor per WebSocket. It parses and authorises client frames, forwards durable
//! commands to the room's actor (answering with `ack` after the commit), and streams each
//! subscribed room's frames: first the replay from the log (`since_seq < seq <= head_seq`), then
//! the room's live broadcast, dropping anything at or below the last seq it sent, so the client
//! sees every durable event once, in order. It stops on close, heartbeat timeout, abuse, falling
//! behind its room (slow consumer), or drain; cleanup (leaving rooms) happens once, in `stopping()`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web_actors::ws::{self, CloseCode, CloseReason};
use cochat_actors::commit::answer_of;
use cochat_actors::error::{DomainError, ErrorCode};
use cochat_actors::event::{Author, AuthorKind};
use cochat_actors::ids::{MessageId, RoomId, Seq, SessionId};
use cochat_actors::ports::Command;
use cochat_actors::protocol::{parse_client_frame, ClientFrame, ParsedFrame, ServerFrame};
use cochat_actors::registry::{ask_room_at, GetRoom};
use cochat_actors::room::{
    unreachable_room, CancelAnswer, Join, Joined, Leave, RegenerateAnswer, Room, RoomFrame,
    SubmitOrdered, Typing,
};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use crate::auth::AuthUser;
use crate::rate::TokenBucket;
use crate::state::AppState;

const MAX_CLIENT_MSG_ID: usize = 64;
const MAX_EMOJI_BYTES: usize = 32;

/// A command waiting for its room's address.
struct PendingWrite {
    reply_to: Option<Value>,
    command: Command,
}

/// How this connection reaches a room's actor. While the address is being looked up, commands
/// queue here so that none overtakes another.
enum RoomLink {
    Resolving(Vec<PendingWrite>),
    Ready(Addr<Room>),
}

struct Subscription {
    room: Addr<Room>,
    /// Distinguishes this subscription's stream from an earlier one to the same room.
    generation: u64,
    /// The last durable seq sent to the client for this room.
    last_seq: Seq,
    stream: Option<SpawnHandle>,
}

pub struct Session {
    id: SessionId,
    user: AuthUser,
    state: Arc<AppState>,
    subs: HashMap<RoomId, Subscription>,
    links: HashMap<RoomId, RoomLink>,
    generations: u64,
    last_heard: Instant,
    bucket: TokenBucket,
    /// Refused frames in a row; at `abuse_strikes` the socket is closed.
    strikes: u32,
    /// A fragmented text frame being assembled.
    fragments: Option<Vec<u8>>,
}

/// One item of a room's live stream, tagged with its subscription's generation (unique within
/// the session), which is all the session needs to find it: nothing is allocated or hashed per
/// delivered frame.
struct RoomItem {
    generation: u64,
    /// `None`: the room's stream ended (the Room actor stopped).
    frame: Option<Result<Arc<RoomFrame>, BroadcastStreamRecvError>>,
}

impl Message for RoomItem {
    type Result = ();
}

impl Session {
    pub fn new(user: AuthUser, state: Arc<AppState>) -> Self {
        let limits = &state.settings.limits;
        Self {
            id: state.new_session_id(),
            bucket: TokenBucket::new(limits.rate_per_s, limits.rate_burst),
            user,
            state,
            subs: HashMap::new(),
            links: HashMap::new(),
            generations: 0,
            last_heard: Instant::now(),
            strikes: 0,
            fragments: None,
        }
    }

    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, frame: &ServerFrame) {
        self.state.metrics.frames_out.inc();
        ctx.text(frame.to_json());
    }

    fn send_error(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        error: &DomainError,
        room: Option<RoomId>,
    ) {
        self.state.metrics.ws_error(error.code);
        self.send(
            ctx,
            &ServerFrame::Error {
                reply_to,
                code: error.code,
                message: error.message.clone(),
                room,
            },
        );
    }

    /// A protocol-level refusal (bad frame, flood): answered, and counted towards abuse.
    fn refuse(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        error: DomainError,
    ) {
        self.send_error(ctx, reply_to, &error, None);
        self.strikes += 1;
        if self.strikes >= self.state.settings.limits.abuse_strikes.max(1) {
            tracing::info!(user = %self.user.id, "closing an abusive connection");
            self.close(ctx, CloseCode::Policy, "abusive: too many refused frames");
        }
    }

    fn close(&self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, why: &str) {
        ctx.close(Some(CloseReason {
            code,
            description: Some(why.to_owned()),
        }));
        ctx.stop();
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        self.state.metrics.frames_in.inc();
        let limits = &self.state.settings.limits;
        if text.len() > limits.max_frame_bytes {
            let error = DomainError::new(
                ErrorCode::FrameTooLarge,
                format!("frames are limited to {} bytes", limits.max_frame_bytes),
            );
            return self.refuse(ctx, None, error);
        }
        let parsed = match parse_client_frame(text) {
            Ok(parsed) => parsed,
            Err((reply_to, error)) => return self.refuse(ctx, reply_to, error),
        };
        if !self.bucket.try_take() {
            let error = DomainError::new(ErrorCode::RateLimited, "slow down: too many frames");
            return self.refuse(ctx, parsed.id, error);
        }
        self.strikes = 0;
        self.dispatch(parsed, ctx);
    }

    fn dispatch(&mut self, parsed: ParsedFrame, ctx: &mut ws::WebsocketContext<Self>) {
        let reply_to = parsed.id;
        match parsed.frame {
            ClientFrame::Ping => self.send(ctx, &ServerFrame::Pong { reply_to }),
            ClientFrame::Subscribe { room, since_seq } => {
                self.subscribe(ctx, reply_to, room, since_seq)
            }
            ClientFrame::Unsubscribe { room } => self.unsubscribe(ctx, reply_to, room),
            ClientFrame::Send {
                room,
                client_msg_id,
                text,
                reply_to_message,
            } => {
                if let Err(error) = self
                    .check_text(&text)
                    .and_then(|()| check_client_msg_id(&client_msg_id))
                {
                    return self.send_error(ctx, reply_to, &error, Some(room));
                }
                let author = Author {
                    id: self.user.id.clone(),
                    name: self.user.name.clone(),
                    kind: AuthorKind::User,
                };
                let command = Command::PostMessage {
                    author,
                    client_msg_id,
                    text,
                    reply_to: reply_to_message,
                };
                self.submit(ctx, reply_to, room, command);
            }
            ClientFrame::Edit {
                room,
                message_id,
                text,
            } => {
                if let Err(error) = self.check_text(&text) {
                    return self.send_error(ctx, reply_to, &error, Some(room));
                }
                let actor = self.user.id.clone();
                self.submit(
                    ctx,
                    reply_to,
                    room,
                    Command::EditMessage {
                        actor,
                        message_id,
                        text,
                    },
                );
            }
            ClientFrame::Delete { room, message_id } => {
                let actor = self.user.id.clone();
                // The room fills in whether the actor is an admin.
                let command = Command::DeleteMessage {
                    actor,
                    actor_is_admin: false,
                    message_id,
                };
                self.submit(ctx, reply_to, room, command);
            }
            ClientFrame::React {
                room,
                message_id,
                emoji,
                on,
            } => {
                if let Err(error) = check_emoji(&emoji) {
                    return self.send_error(ctx, reply_to, &error, Some(room));
                }
                let actor = self.user.id.clone();
                self.submit(
                    ctx,
                    reply_to,
                    room,
                    Command::React {
                        actor,
                        message_id,
                        emoji,
                        on,
                    },
                );
            }
            ClientFrame::Typing { room } => self.typing(ctx, reply_to, room),
            ClientFrame::Read { room, seq } => self.mark_read(ctx, reply_to, room, seq),
            ClientFrame::Cancel { room, message_id } => {
                let msg = CancelAnswer {
                    by: self.user.id.clone(),
                    message_id: message_id.clone(),
                };
                self.ask_ai(ctx, reply_to, room, message_id, msg);
            }
            ClientFrame::Regenerate { room, message_id } => {
                let msg = RegenerateAnswer {
                    by: self.user.id.clone(),
                    message_id: message_id.clone(),
                };
                self.ask_ai(ctx, reply_to, room, message_id, msg);
            }
        }
    }

    fn check_text(&self, text: &str) -> Result<(), DomainError> {
        let max = self.state.settings.limits.max_text_bytes;
        if text.len() > max {
            return Err(DomainError::new(
                ErrorCode::TextTooLarge,
                format!("texts are limited to {max} bytes"),
            ));
        }
        if text.trim().is_empty() {
            return Err(DomainError::validation("text is empty"));
        }
        Ok(())
    }

    /// Sends a durable command to the room so that this connection's commands reach the room,
    /// and so the log, in the order the client sent them (see `RoomLink`).
    fn submit(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
        command: Command,
    ) {
        let pending = PendingWrite { reply_to, command };
        match self.links.get_mut(&room) {
            Some(RoomLink::Ready(addr)) if addr.connected() => {
                let addr = addr.clone();
                self.forward(ctx, &addr, room, pending);
            }
            Some(RoomLink::Resolving(queue)) => queue.push(pending),
            _ => {
                self.links
                    .insert(room.clone(), RoomLink::Resolving(vec![pending]));
                self.resolve_room(ctx, room);
            }
        }
    }

    fn resolve_room(&mut self, ctx: &mut ws::WebsocketContext<Self>, room: RoomId) {
        let lookup = self.state.registry.send(GetRoom { room: room.clone() });
        ctx.spawn(lookup.into_actor(self).map(move |result, session, ctx| {
            let queued = match session.links.remove(&room) {
                Some(RoomLink::Resolving(queued)) => queued,
                Some(ready) => {
                    session.links.insert(room.clone(), ready);
                    Vec::new()
                }
                None => Vec::new(),
            };
            match result {
                Ok(addr) => {
                    session
                        .links
                        .insert(room.clone(), RoomLink::Ready(addr.clone()));
                    for pending in queued {
                        session.forward(ctx, &addr, room.clone(), pending);
                    }
                }
                Err(_) => {
                    for pending in queued {
                        session.send_error(
                            ctx,
                            pending.reply_to,
                            &unreachable_room(),
                            Some(room.clone()),
                        );
                    }
                }
            }
        }));
    }

    fn forward(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        addr: &Addr<Room>,
        room: RoomId,
        pending: PendingWrite,
    ) {
        let (reply, answer) = oneshot::channel();
        addr.do_send(SubmitOrdered {
            actor: self.user.id.clone(),
            command: pending.command,
            reply,
        });
        let reply_to = pending.reply_to;
        ctx.spawn(answer_of(answer).into_actor(self).map(
            move |result, session, ctx| match result {
                Ok(applied) => session.send(
                    ctx,
                    &ServerFrame::Ack {
                        reply_to,
                        room,
                        message_id: applied.message_id,
                        seq: applied.seq,
                        duplicate: applied.duplicate,
                    },
                ),
                // A room that stopped under us drops the reply: the client retries with the same
                // client_msg_id, which is idempotent.
                Err(error) => session.send_error(ctx, reply_to, &error, Some(room)),
            },
        ));
    }

    fn subscribe(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
        since_seq: Option<Seq>,
    ) {
        let registry = self.state.registry.clone();
        let join = Join {
            session: self.id,
            user: self.user.id.clone(),
        };
        let target = room.clone();
        let request = async move {
            let (addr, joined) = ask_room_at(&registry, &target, join).await?;
            joined.map(|joined| (addr, joined))
        };
        ctx.spawn(
            request
                .into_actor(self)
                .map(move |result, session, ctx| match result {
                    Ok((addr, joined)) => {
                        session.start_subscription(ctx, reply_to, room, since_seq, addr, joined)
                    }
                    Err(error) => session.send_error(ctx, reply_to, &error, Some(room)),
                }),
        );
    }

    /// Answers `subscribed`, replays what the client missed from the log, then attaches the live
    /// stream. The room created `joined.frames` when its head was `joined.head_seq`, so the
    /// replay ends exactly where the live stream starts.
    fn start_subscription(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
        since_seq: Option<Seq>,
        addr: Addr<Room>,
        joined: Joined,
    ) {
        let head = joined.head_seq;
        let oldest_replayable = (head - self.state.settings.limits.replay_limit).max(0);
        let (replay_after, truncated) = match since_seq {
            None => (head, false),
            Some(since) => {
                let since = since.clamp(0, head);
                (since.max(oldest_replayable), since < oldest_replayable)
            }
        };
        self.generations += 1;
        let generation = self.generations;
        if let Some(previous) = self.subs.remove(&room) {
            // Re-subscribing: the room keeps this session; only the old stream goes.
            if let Some(handle) = previous.stream {
                ctx.cancel_future(handle);
            }
        }
        if !matches!(self.links.get(&room), Some(RoomLink::Resolving(_))) {
            self.links
                .insert(room.clone(), RoomLink::Ready(addr.clone()));
        }
        self.subs.insert(
            room.clone(),
            Subscription {
                room: addr,
                generation,
                last_seq: replay_after,
                stream: None,
            },
        );
        self.send(
            ctx,
            &ServerFrame::Subscribed {
                reply_to,
                room: room.clone(),
                head_seq: head,
                replay_after_seq: replay_after,
                truncated,
                online: joined.online,
            },
        );
        let frames = joined.frames;
        let answers = joined.answers;
        for (agent, queue) in joined.queues {
            self.send(
                ctx,
                &ServerFrame::AiQueue {
                    room: room.clone(),
                    agent,
                    queue,
                },
            );
        }
        if let Some(since) = since_seq.filter(|since| *since > head) {
            // The client saw more than this node's room has delivered yet (it comes from a node
            // that was ahead). What it has must not come again when this room catches up: start
            // the stream after `since`, as far as the log confirms it (a made-up `since` is
            // capped at the log's head).
            let store = self.state.store.clone();
            let target = room.clone();
            let lookup = async move { store.room(&target).await };
            ctx.spawn(lookup.into_actor(self).map(move |found, session, ctx| {
                if session.subs.get(&room).map(|sub| sub.generation) != Some(generation) {
                    return;
                }
                let logged = found.ok().flatten().map_or(head, |info| info.last_seq);
                if let Some(sub) = session.subs.get_mut(&room) {
                    sub.last_seq = since.min(logged).max(head);
                }
                session.send_answers_in_progress(ctx, &room, answers);
                session.attach(ctx, room, generation, frames);
            }));
            return;
        }
        if replay_after >= head {
            self.send_answers_in_progress(ctx, &room, answers);
            return self.attach(ctx, room, generation, frames);
        }
        let store = self.state.store.clone();
        let target = room.clone();
        let count = (head - replay_after) as u32;
        let fetch = async move { store.events_after(&target, replay_after, count).await };
        ctx.spawn(fetch.into_actor(self).map(move |result, session, ctx| {
            let current = session.subs.get(&room).map(|sub| sub.generation);
            if current != Some(generation) {
                return; // unsubscribed or re-subscribed meanwhile
            }
            match result {
                Ok(events) => {
                    for event in events.into_iter().filter(|event| event.seq <= head) {
                        session.forward_replayed(ctx, &room, ServerFrame::Event(event));
                    }
                    let sent = session.subs.get(&room).map_or(head, |sub| sub.last_seq);
                    if sent != head {
                        tracing::error!(room = %room, sent, head, "replay ended short of the head");
                    }
                    session.send_answers_in_progress(ctx, &room, answers);
                    session.attach(ctx, room, generation, frames);
                }
                Err(error) => {
                    tracing::warn!(room = %room, %error, "replay failed");
                    session.drop_subscription(ctx, &room, true);
                    let error = error.to_domain();
                    session.send_error(ctx, None, &error, Some(room));
                }
            }
        }));
    }

    /// AI answers being written right now: their whole text so far (offset 0); the deltas that
    /// follow arrive on the room's stream, which starts exactly after this snapshot.
    fn send_answers_in_progress(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        room: &RoomId,
        answers: Vec<(MessageId, String)>,
    ) {
        for (message_id, text) in answers {
            self.send(
                ctx,
                &ServerFrame::AiDelta {
                    room: room.clone(),
                    message_id,
                    offset: 0,
                    text,
                },
            );
        }
    }

    fn forward_replayed(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        room: &RoomId,
        frame: ServerFrame,
    ) {
        let ServerFrame::Event(event) = &frame else {
            return;
        };
        let Some(sub) = self.subs.get_mut(room) else {
            return;
        };
        if event.seq <= sub.last_seq {
            return;
        }
        sub.last_seq = event.seq;
        self.send(ctx, &frame);
    }

    fn attach(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        room: RoomId,
        generation: u64,
        frames: cochat_actors::room::RoomFrames,
    ) {
        let live = BroadcastStream::new(frames).map(move |frame| RoomItem {
            generation,
            frame: Some(frame),
        });
        let end = futures_util::stream::once(std::future::ready(RoomItem {
            generation,
            frame: None,
        }));
        let handle = ctx.add_stream(live.chain(end));
        if let Some(sub) = self.subs.get_mut(&room) {
            sub.stream = Some(handle);
        }
    }

    /// Forgets a subscription and stops its stream; `leave` tells the room (presence).
    fn drop_subscription(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        room: &RoomId,
        leave: bool,
    ) -> bool {
        match self.subs.remove(room) {
            Some(sub) => {
                if let Some(handle) = sub.stream {
                    ctx.cancel_future(handle);
                }
                if leave {
                    sub.room.do_send(Leave { session: self.id });
                }
                true
            }
            None => false,
        }
    }

    fn unsubscribe(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
    ) {
        if self.drop_subscription(ctx, &room, true) {
            self.send(
                ctx,
                &ServerFrame::Unsubscribed {
                    reply_to,
                    room,
                    reason: None,
                },
            );
        } else {
            let error = DomainError::new(ErrorCode::NotSubscribed, "not subscribed to that room");
            self.send_error(ctx, reply_to, &error, Some(room));
        }
    }

    fn typing(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
    ) {
        let msg = Typing {
            user: self.user.id.clone(),
        };
        let request = self.ask(&room, msg);
        ctx.spawn(request.into_actor(self).map(move |result, session, ctx| {
            if let Err(error) = result {
                session.send_error(ctx, reply_to, &error, Some(room));
            }
        }));
    }

    fn mark_read(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
        seq: Seq,
    ) {
        if seq < 0 {
            let error = DomainError::validation("seq must not be negative");
            return self.send_error(ctx, reply_to, &error, Some(room));
        }
        let store = self.state.store.clone();
        let user = self.user.id.clone();
        let target = room.clone();
        let request = async move { store.mark_read(&target, &user, seq).await };
        ctx.spawn(
            request
                .into_actor(self)
                .map(move |result, session, ctx| match result {
                    Ok(marker) => session.send(
                        ctx,
                        &ServerFrame::Ack {
                            reply_to,
                            room,
                            message_id: None,
                            seq: marker,
                            duplicate: false,
                        },
                    ),
                    Err(error) => session.send_error(ctx, reply_to, &error.to_domain(), Some(room)),
                }),
        );
    }

    /// Cancel / regenerate: the room decides (it knows the answers in progress and the roles)
    /// and the ack carries the room's head seq.
    /// Asks the room's actor, through this connection's link to it when it has one (no
    /// registry round trip), else through the registry. Flattens the room's own refusal.
    fn ask<M, T>(
        &self,
        room: &RoomId,
        msg: M,
    ) -> impl std::future::Future<Output = Result<T, DomainError>> + 'static
    where
        M: actix::Message<Result = Result<T, DomainError>> + Send + Clone + 'static,
        T: Send + 'static,
        Room: actix::Handler<M>,
        <Room as Actor>::Context: actix::dev::ToEnvelope<Room, M>,
    {
        let cached = match self.links.get(room) {
            Some(RoomLink::Ready(addr)) if addr.connected() => Some(addr.clone()),
            _ => None,
        };
        let registry = self.state.registry.clone();
        let target = room.clone();
        async move {
            if let Some(addr) = cached {
                if let Ok(answer) = addr.send(msg.clone()).await {
                    return answer;
                }
            }
            ask_room_at(&registry, &target, msg)
                .await
                .and_then(|(_, answer)| answer)
        }
    }

    fn ask_ai<M>(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reply_to: Option<Value>,
        room: RoomId,
        message_id: MessageId,
        msg: M,
    ) where
        M: actix::Message<Result = Result<Seq, DomainError>> + Send + Clone + 'static,
        Room: actix::Handler<M>,
        <Room as Actor>::Context: actix::dev::ToEnvelope<Room, M>,
    {
        let request = self.ask(&room, msg);
        ctx.spawn(
            request
                .into_actor(self)
                .map(move |result, session, ctx| match result {
                    Ok(seq) => session.send(
                        ctx,
                        &ServerFrame::Ack {
                            reply_to,
                            room,
                            message_id: Some(message_id),
                            seq,
                            duplicate: false,
                        },
                    ),
                    Err(error) => session.send_error(ctx, reply_to, &error, Some(room)),
                }),
        );
    }

    fn on_fragment(&mut self, item: Item, ctx: &mut ws::WebsocketContext<Self>) {
        let cap = self
            .state
            .settings
            .limits
            .max_frame_bytes
            .saturating_mul(4)
            .max(1024);
        match item {
            Item::FirstText(bytes) => self.fragments = Some(bytes.to_vec()),
            Item::FirstBinary(_) => {
                self.fragments = None;
                let error = DomainError::new(ErrorCode::BinaryNotSupported, "frames are JSON text");
                self.refuse(ctx, None, error);
            }
            Item::Continue(bytes) => {
                if let Some(buffer) = self.fragments.as_mut() {
                    buffer.extend_from_slice(&bytes);
                }
            }
            Item::Last(bytes) => {
                if let Some(mut buffer) = self.fragments.take() {
                    buffer.extend_from_slice(&bytes);
                    match String::from_utf8(buffer) {
                        Ok(text) => self.on_text(&text, ctx),
                        Err(_) => self.close(ctx, CloseCode::Invalid, "text frame is not UTF-8"),
                    }
                }
            }
        }
        if self
            .fragments
            .as_ref()
            .is_some_and(|buffer| buffer.len() > cap)
        {
            self.close(ctx, CloseCode::Size, "frame too large");
        }
    }
}

fn check_client_msg_id(id: &str) -> Result<(), DomainError> {
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID {
        return Err(DomainError::validation(format!(
            "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"
        )));
    }
    Ok(())
}

fn check_emoji(emoji: &str) -> Result<(), DomainError> {
    if emoji.is_empty()
        || emoji.len() > MAX_EMOJI_BYTES
        || emoji.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(DomainError::validation(format!(
            "emoji must be 1 to {MAX_EMOJI_BYTES} bytes without spaces"
        )));
    }
    Ok(())
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.state.metrics.connections.inc();
        let heartbeat = self
            .state
            .settings
            .heartbeat
            .max(Duration::from_millis(100));
        let timeout = self.state.settings.client_timeout;
        ctx.run_interval(heartbeat, move |session, ctx| {
            if session.last_heard.elapsed() > timeout {
                tracing::debug!(user = %session.user.id, "heartbeat timeout");
                ctx.stop();
            } else {
                ctx.ping(b"");
            }
        });
        // On drain, close with 1012 at a random point in the window so clients do not all
        // reconnect to the survivors at the same instant.
        let mut drain = self.state.drain.subscribe();
        let wait = async move {
            loop {
                if let Some(window) = *drain.borrow_and_update() {
                    return window;
                }
                if drain.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        ctx.spawn(wait.into_actor(self).map(|window, _session, ctx| {
            let delay = window.mul_f64(rand::random::<f64>());
            ctx.run_later(delay, |session, ctx| {
                session.close(
                    ctx,
                    CloseCode::Restart,
                    "server restarting: reconnect with since_seq",
                );
            });
        }));
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        for sub in self.subs.values() {
            sub.room.do_send(Leave { session: self.id });
        }
        self.subs.clear();
        self.state.metrics.connections.dec();
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        match msg {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(_)) => {
                let error = DomainError::new(ErrorCode::BinaryNotSupported, "frames are JSON text");
                self.refuse(ctx, None, error);
            }
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => self.close(ctx, CloseCode::Size, "frame too large"),
            Err(error) => {
                tracing::debug!(%error, "websocket protocol error");
                self.close(ctx, CloseCode::Protocol, "protocol error");
            }
        }
    }
}

impl StreamHandler<RoomItem> for Session {
    fn handle(&mut self, item: RoomItem, ctx: &mut Self::Context) {
        // Sessions hold a handful of subscriptions: a scan beats hashing the room id per frame.
        let Some((room, sub)) = self
            .subs
            .iter_mut()
            .find(|(_, sub)| sub.generation == item.generation)
        else {
            return;
        };
        match item.frame {
            None => {
                let room = room.clone();
                self.subs.remove(&room);
                let frame = ServerFrame::Unsubscribed {
                    reply_to: None,
                    room,
                    reason: Some("room_closed".into()),
                };
                self.send(ctx, &frame);
            }
            Some(Err(BroadcastStreamRecvError::Lagged(missed))) => {
                tracing::info!(user = %self.user.id, room = %room, missed, "slow consumer cut off");
                self.state.metrics.slow_consumers.inc();
                self.close(
                    ctx,
                    CloseCode::Policy,
                    "slow_consumer: reconnect with since_seq",
                );
            }
            Some(Ok(frame)) => {
                if frame.skip_user.as_ref() == Some(&self.user.id) {
                    return;
                }
                if let Some(seq) = frame.seq {
                    if seq <= sub.last_seq {
                        return;
                    }
                    if seq != sub.last_seq + 1 {
                        tracing::error!(room = %room, seq, last = sub.last_seq, "room stream skipped a seq");
                    }
                    sub.last_seq = seq;
                }
                self.state.metrics.frames_out.inc();
                ctx.text(frame.bytes.clone());
                if frame.revoke_user.as_ref() == Some(&self.user.id) {
                    let room = room.clone();
                    self.drop_subscription(ctx, &room, true);
                    let frame = ServerFrame::Unsubscribed {
                        reply_to: None,
                        room,
                        reason: Some("removed".into()),
                    };
                    self.send(ctx, &frame);
                }
            }
        }
    }

    /// A room stream ending is handled by its sentinel item; the session itself goes on.
    fn finished(&mut self, _ctx: &mut Self::Context) {}
}
