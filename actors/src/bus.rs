//! The bus port: how a node tells the other nodes about a room's events. Publishing is
//! fire-and-forget and at-most-once (Redis pub/sub is); completeness comes from the log: a Room
//! that sees a gap, or hears that the bus reconnected, fetches what it missed from the store.
//!
//! `LocalHub` is the in-process driver: the embedded default (one node: nobody to tell) and, with
//! several `LocalBus` handles on one hub, several nodes in one process for tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::event::{StoredEvent, UserRef};
use crate::ids::{MessageId, RoomId, UserId};
use crate::protocol::{QueuedTrigger, UsageReport};

/// What travels between nodes about one room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The node that published it; a node ignores its own envelopes.
    pub origin: String,
    pub room: RoomId,
    pub payload: BusPayload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
// Payloads are built once per event and moved, never stored in bulk: boxing the big variant
// would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub enum BusPayload {
    /// A durable event, committed by the origin node (its `seq` orders it).
    Event { event: StoredEvent },
    /// Ephemeral: a member on the origin node is typing.
    Typing { user: UserRef },
    /// Ephemeral: everyone online in the room on the origin node (a full snapshot, so a lost
    /// one is repaired by the next; sent on change and as a heartbeat).
    Presence { online: Vec<UserRef> },
    /// A node started serving the room and asks the others for their presence snapshots.
    PresenceQuery,
    /// New text of an AI answer (see `ServerFrame::AiDelta`).
    AiDelta {
        message_id: MessageId,
        offset: usize,
        text: String,
    },
    /// The whole text so far of an AI answer, sent now and then while it streams, so a node
    /// that missed deltas (or started serving the room mid-answer) can repair.
    AiSnapshot { message_id: MessageId, text: String },
    /// An agent's queue changed.
    AiQueue {
        agent: String,
        queue: Vec<QueuedTrigger>,
    },
    /// The room's AI usage changed.
    AiUsage { usage: UsageReport },
    /// Someone allowed to asked to stop an answer (or a queued trigger): the node running the
    /// agent acts on it.
    AiCancel { message_id: MessageId, by: UserId },
}

/// What a bus driver hands to its node.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // see BusPayload
pub enum BusNotice {
    Envelope(Envelope),
    /// The connection to the other nodes was lost and is back: anything published meanwhile may
    /// be lost, so every room resynchronises from the log.
    Reconnected,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    fn node_id(&self) -> &str;
    /// Queues the payload for every other node subscribed to the room. Never blocks; a payload
    /// that cannot be sent is dropped (receivers repair durable events from the log).
    fn publish(&self, room: &RoomId, payload: BusPayload);
    /// Starts receiving the room's envelopes; returns once the subscription is in place (or the
    /// bus is down, in which case it is made when the bus reconnects).
    async fn subscribe(&self, room: &RoomId);
    async fn unsubscribe(&self, room: &RoomId);
    /// Whether envelopes currently flow.
    fn connected(&self) -> bool;
    /// Whether other nodes may exist (false for a lone in-process bus: no periodic resync needed).
    fn shared(&self) -> bool;
}

/// In-process nodes that hear each other's rooms.
/// A node on the hub: where its notices go and which rooms it listens to.
type HubNode = (mpsc::Sender<BusNotice>, HashSet<RoomId>);

#[derive(Default)]
pub struct LocalHub {
    nodes: Mutex<HashMap<String, HubNode>>,
}

/// One node's handle on a `LocalHub`.
pub struct LocalBus {
    node: String,
    hub: Arc<LocalHub>,
}

impl LocalHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Joins the hub as `node`; envelopes for its rooms arrive on `notices`.
    pub fn join(self: &Arc<Self>, node: &str, notices: mpsc::Sender<BusNotice>) -> LocalBus {
        self.nodes
            .lock()
            .expect("hub mutex is never poisoned")
            .insert(node.to_owned(), (notices, HashSet::new()));
        LocalBus {
            node: node.to_owned(),
            hub: self.clone(),
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn publish(&self, room: &RoomId, payload: BusPayload) {
        let envelope = Envelope {
            origin: self.node.clone(),
            room: room.clone(),
            payload,
        };
        let nodes = self.hub.nodes.lock().expect("hub mutex is never poisoned");
        for (node, (notices, rooms)) in nodes.iter() {
            if *node != self.node && rooms.contains(room) {
                // At-most-once, like Redis: a node that cannot keep up loses the envelope.
                let _ = notices.try_send(BusNotice::Envelope(envelope.clone()));
            }
        }
    }

    async fn subscribe(&self, room: &RoomId) {
        if let Some((_, rooms)) = self
            .hub
            .nodes
            .lock()
            .expect("hub mutex is never poisoned")
            .get_mut(&self.node)
        {
            rooms.insert(room.clone());
        }
    }

    async fn unsubscribe(&self, room: &RoomId) {
        if let Some((_, rooms)) = self
            .hub
            .nodes
            .lock()
            .expect("hub mutex is never poisoned")
            .get_mut(&self.node)
        {
            rooms.remove(room);
        }
    }

    fn connected(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        self.hub
            .nodes
            .lock()
            .expect("hub mutex is never poisoned")
            .len()
            > 1
    }
}

impl Drop for LocalBus {
    fn drop(&mut self) {
        if let Ok(mut nodes) = self.hub.nodes.lock() {
            nodes.remove(&self.node);
        }
    }
}
