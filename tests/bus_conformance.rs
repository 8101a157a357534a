//! One bus conformance suite, run against the in-process hub and against Redis pub/sub (the
//! local Redis on 6379, each test on its own channel prefix): two nodes, one room.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cochat::bus::redis::RedisBus;
use cochat::metrics::Metrics;
use cochat_actors::bus::{Bus, BusNotice, BusPayload, LocalHub};
use cochat_actors::event::{EventBody, StoredEvent, UserRef};
use cochat_actors::ids::{Role, RoomId, UserId};
use cochat_actors::time::Timestamp;
use common::redis::RedisProcess;
use tokio::sync::mpsc;

struct Node {
    bus: Arc<dyn Bus>,
    notices: mpsc::Receiver<BusNotice>,
}

/// Two nodes on one bus, both connected.
type Pair = (Node, Node);

fn local_pair() -> Pair {
    let hub = LocalHub::new();
    let (a_tx, a_rx) = mpsc::channel(10_000);
    let (b_tx, b_rx) = mpsc::channel(10_000);
    (
        Node {
            bus: Arc::new(hub.join("node-a", a_tx)),
            notices: a_rx,
        },
        Node {
            bus: Arc::new(hub.join("node-b", b_tx)),
            notices: b_rx,
        },
    )
}

async fn redis_pair(url: &str) -> Pair {
    let prefix = common::unique("test:");
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let (tx, mut rx) = mpsc::channel(10_000);
        let metrics = Arc::new(Metrics::new(name).expect("metrics register"));
        let bus = RedisBus::start(url, &prefix, name, tx, metrics).expect("a valid Redis URL");
        // The subscriber announces its (first) connection.
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("connects")
            .expect("open");
        assert_eq!(first, BusNotice::Reconnected);
        nodes.push(Node {
            bus: Arc::new(bus),
            notices: rx,
        });
    }
    let b = nodes.pop().expect("two nodes");
    let a = nodes.pop().expect("two nodes");
    (a, b)
}

fn shared_redis_url() -> Option<String> {
    common::redis::shared().map(str::to_owned)
}

macro_rules! both_buses {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn in_process() {
                    super::$name(super::local_pair()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    if let Some(url) = super::shared_redis_url() {
                        super::$name(super::redis_pair(&url).await).await;
                    }
                }
            }
        )*
    };
}

both_buses!(
    envelopes_reach_other_subscribed_nodes_in_order_and_never_echo,
    unsubscribed_and_other_rooms_hear_nothing,
);

fn event(room: &RoomId, seq: i64) -> BusPayload {
    BusPayload::Event {
        event: StoredEvent {
            room: room.clone(),
            seq,
            at: Timestamp::now(),
            event: EventBody::MemberJoined {
                user: UserRef {
                    id: UserId::from("u"),
                    name: format!("user {seq}"),
                },
                role: Role::Member,
            },
        },
    }
}

async fn next_envelope(node: &mut Node) -> Option<cochat_actors::bus::Envelope> {
    loop {
        match tokio::time::timeout(Duration::from_millis(500), node.notices.recv()).await {
            Ok(Some(BusNotice::Envelope(envelope))) => return Some(envelope),
            Ok(Some(BusNotice::Reconnected)) => continue,
            _ => return None,
        }
    }
}

async fn envelopes_reach_other_subscribed_nodes_in_order_and_never_echo((mut a, mut b): Pair) {
    let room = RoomId::random();
    a.bus.subscribe(&room).await;
    b.bus.subscribe(&room).await;
    assert!(a.bus.shared() && b.bus.connected());
    for seq in 1..=200 {
        a.bus.publish(&room, event(&room, seq));
    }
    b.bus.publish(
        &room,
        BusPayload::Typing {
            user: UserRef {
                id: UserId::from("t"),
                name: "T".into(),
            },
        },
    );
    for seq in 1..=200 {
        let envelope = next_envelope(&mut b)
            .await
            .unwrap_or_else(|| panic!("envelope {seq} arrives"));
        assert_eq!(
            (envelope.origin.as_str(), &envelope.room),
            ("node-a", &room)
        );
        match envelope.payload {
            BusPayload::Event { event } => assert_eq!(event.seq, seq, "in publish order"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // A hears B's typing and nothing of its own.
    let heard = next_envelope(&mut a).await.expect("typing arrives");
    assert!(matches!(heard.payload, BusPayload::Typing { .. }));
    assert_eq!(heard.origin, "node-b");
    assert!(
        next_envelope(&mut a).await.is_none(),
        "no echo of a node's own envelopes"
    );
}

async fn unsubscribed_and_other_rooms_hear_nothing((a, mut b): Pair) {
    let (room, other) = (RoomId::random(), RoomId::random());
    a.bus.subscribe(&room).await;
    b.bus.subscribe(&room).await;
    a.bus.publish(&other, event(&other, 1));
    assert!(
        next_envelope(&mut b).await.is_none(),
        "not subscribed to that room"
    );
    b.bus.unsubscribe(&room).await;
    a.bus.publish(&room, event(&room, 1));
    assert!(next_envelope(&mut b).await.is_none(), "unsubscribed");
    b.bus.subscribe(&room).await;
    a.bus.publish(&room, event(&room, 2));
    assert!(next_envelope(&mut b).await.is_some(), "subscribed again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_is_noticed_and_subscriptions_come_back() {
    let mut redis = RedisProcess::start().await;
    let (a, mut b) = redis_pair(&redis.url()).await;
    let room = RoomId::random();
    a.bus.subscribe(&room).await;
    b.bus.subscribe(&room).await;
    redis.kill();
    // While Redis is down publishing neither blocks nor fails loudly.
    for seq in 1..=10 {
        a.bus.publish(&room, event(&room, seq));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.bus.connected());
    redis.restart().await;
    let notice = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match b.notices.recv().await {
                Some(BusNotice::Reconnected) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await
    .expect("the subscriber reconnects");
    assert!(notice);
    assert!(b.bus.connected());
    // The room's subscription was restored: new envelopes flow again.
    let mut delivered = false;
    for seq in 11..=60 {
        a.bus.publish(&room, event(&room, seq));
        if let Some(envelope) = next_envelope(&mut b).await {
            if matches!(envelope.payload, BusPayload::Event { .. }) {
                delivered = true;
                break;
            }
        }
    }
    assert!(delivered, "envelopes flow after the restart");
}
