//! `RoomRegistry`: this node's map from room id to its `Room` actor. It starts a Room on first
//! use and forgets it when the Room reports it stopped (rooms stop themselves when idle).
//! A message that reaches a Room just as it stops fails with a closed mailbox; `ask_room`
//! retries through the registry, which by then starts a fresh Room.

use std::collections::HashMap;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::bus::{BusNotice, BusPayload};
use crate::error::DomainError;
use crate::event::StoredEvent;
use crate::ids::RoomId;
use crate::room::{unreachable_room, Deliver, RemoteEphemeral, Resync, Room, RoomDeps};

pub struct RoomRegistry {
    rooms: HashMap<RoomId, Addr<Room>>,
    deps: RoomDeps,
}

impl RoomRegistry {
    pub fn new(deps: RoomDeps) -> Self {
        Self {
            rooms: HashMap::new(),
            deps,
        }
    }
}

impl Actor for RoomRegistry {
    type Context = Context<Self>;
}

/// The room's actor on this node, started if needed.
#[derive(Message)]
#[rtype(result = "Addr<Room>")]
pub struct GetRoom {
    pub room: RoomId,
}

impl Handler<GetRoom> for RoomRegistry {
    type Result = MessageResult<GetRoom>;

    fn handle(&mut self, msg: GetRoom, ctx: &mut Self::Context) -> Self::Result {
        if let Some(addr) = self.rooms.get(&msg.room) {
            if addr.connected() {
                return MessageResult(addr.clone());
            }
        }
        let room = Room::new(msg.room.clone(), self.deps.clone(), ctx.address()).start();
        self.rooms.insert(msg.room, room.clone());
        MessageResult(room)
    }
}

/// Sent by a Room from `stopped()`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomStopped {
    pub room: RoomId,
    pub addr: Addr<Room>,
}

impl Handler<RoomStopped> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, msg: RoomStopped, _ctx: &mut Self::Context) {
        // Only forget the entry if it is still the actor that stopped (a new one may exist).
        if self.rooms.get(&msg.room) == Some(&msg.addr) {
            self.rooms.remove(&msg.room);
        }
    }
}

/// Events committed elsewhere, for the room's local subscribers if the room is active here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliverRemote {
    pub room: RoomId,
    pub events: Vec<StoredEvent>,
}

impl Handler<DeliverRemote> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, msg: DeliverRemote, _ctx: &mut Self::Context) {
        if let Some(addr) = self.rooms.get(&msg.room) {
            addr.do_send(Deliver { events: msg.events });
        }
    }
}

/// Typing and presence from another node, for the room if it is active here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliverEphemeral {
    pub room: RoomId,
    pub origin: String,
    pub payload: BusPayload,
}

impl Handler<DeliverEphemeral> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, msg: DeliverEphemeral, _ctx: &mut Self::Context) {
        if let Some(addr) = self.rooms.get(&msg.room) {
            addr.do_send(RemoteEphemeral {
                origin: msg.origin,
                payload: msg.payload,
            });
        }
    }
}

/// The bus reconnected: every active room fetches what it may have missed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ResyncAll;

impl Handler<ResyncAll> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, _msg: ResyncAll, _ctx: &mut Self::Context) {
        for addr in self.rooms.values() {
            addr.do_send(Resync);
        }
    }
}

/// Routes what the bus hands this node to the registry (and so to the rooms).
pub fn route_bus_notice(registry: &Addr<RoomRegistry>, notice: BusNotice) {
    match notice {
        BusNotice::Reconnected => registry.do_send(ResyncAll),
        BusNotice::Envelope(envelope) => match envelope.payload {
            BusPayload::Event { event } => registry.do_send(DeliverRemote {
                room: envelope.room,
                events: vec![event],
            }),
            payload => registry.do_send(DeliverEphemeral {
                room: envelope.room,
                origin: envelope.origin,
                payload,
            }),
        },
    }
}

/// Sends `msg` to the room's actor, retrying when it hit a Room that was stopping.
pub async fn ask_room<M>(
    registry: &Addr<RoomRegistry>,
    room: &RoomId,
    msg: M,
) -> Result<M::Result, DomainError>
where
    M: Message + Send + Clone + 'static,
    M::Result: Send,
    Room: Handler<M>,
    <Room as Actor>::Context: ToEnvelope<Room, M>,
{
    ask_room_at(registry, room, msg)
        .await
        .map(|(_, answer)| answer)
}

/// Like `ask_room`, and also returns the actor that answered (sessions keep it).
pub async fn ask_room_at<M>(
    registry: &Addr<RoomRegistry>,
    room: &RoomId,
    msg: M,
) -> Result<(Addr<Room>, M::Result), DomainError>
where
    M: Message + Send + Clone + 'static,
    M::Result: Send,
    Room: Handler<M>,
    <Room as Actor>::Context: ToEnvelope<Room, M>,
{
    for attempt in 0..3u64 {
        let addr = registry
            .send(GetRoom { room: room.clone() })
            .await
            .map_err(|_| unreachable_room())?;
        match addr.send(msg.clone()).await {
            Ok(answer) => return Ok((addr, answer)),
            Err(_) => tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await,
        }
    }
    Err(unreachable_room())
}
