//! Redis pub/sub bus. One channel per room (`channel_of`), one publishing connection (a task
//! that pipelines queued publishes) and one dedicated subscriber connection (a task that keeps
//! it alive: on loss it reconnects with backoff, resubscribes every room and tells the node
//! `Reconnected` so rooms fetch from the log whatever was published meanwhile).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cochat_actors::bus::{Bus, BusNotice, BusPayload, Envelope};
use cochat_actors::ids::RoomId;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::{mpsc, Mutex};

use crate::metrics::Metrics;

/// Publishes queued before new ones are dropped (receivers repair durable events from the log).
const OUTBOX: usize = 65_536;
/// Most publishes in one pipelined round trip.
const PIPELINE: usize = 256;
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The one place channel names are made: `<prefix>room:<room id>`.
pub fn channel_of(prefix: &str, room: &RoomId) -> String {
    format!("{prefix}room:{room}")
}

/// Subscriptions by channel (a room actor restarting on this node may subscribe before its
/// predecessor's unsubscribe ran: counting keeps the channel), and the live subscriber sink.
#[derive(Default)]
struct Subscriptions {
    counts: HashMap<String, usize>,
    sink: Option<PubSubSink>,
}

pub struct RedisBus {
    node: String,
    prefix: String,
    outbox: mpsc::Sender<(String, Vec<u8>)>,
    subscriptions: Arc<Mutex<Subscriptions>>,
    connected: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl RedisBus {
    /// Starts the publisher and subscriber tasks; Redis may be down (they keep trying).
    pub fn start(
        url: &str,
        prefix: &str,
        node: &str,
        notices: mpsc::Sender<BusNotice>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|error| format!("REDIS_URL: {error}"))?;
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let subscriptions = Arc::new(Mutex::new(Subscriptions::default()));
        let connected = Arc::new(AtomicBool::new(false));
        tokio::spawn(publish_loop(client.clone(), queued, metrics.clone()));
        tokio::spawn(subscribe_loop(
            client,
            node.to_owned(),
            prefix.to_owned(),
            subscriptions.clone(),
            connected.clone(),
            notices,
            metrics.clone(),
        ));
        Ok(Self {
            node: node.to_owned(),
            prefix: prefix.to_owned(),
            outbox,
            subscriptions,
            connected,
            metrics,
        })
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn publish(&self, room: &RoomId, payload: BusPayload) {
        let envelope = Envelope {
            origin: self.node.clone(),
            room: room.clone(),
            payload,
        };
        let Ok(bytes) = serde_json::to_vec(&envelope) else {
            return;
        };
        if self
            .outbox
            .try_send((channel_of(&self.prefix, room), bytes))
            .is_err()
        {
            self.metrics.bus_dropped.inc();
        }
    }

    async fn subscribe(&self, room: &RoomId) {
        let channel = channel_of(&self.prefix, room);
        let mut subscriptions = self.subscriptions.lock().await;
        let count = subscriptions.counts.entry(channel.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            if let Some(sink) = subscriptions.sink.as_mut() {
                // On failure the subscriber loop notices the broken connection and resubscribes.
                let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(&channel)).await;
            }
        }
    }

    async fn unsubscribe(&self, room: &RoomId) {
        let channel = channel_of(&self.prefix, room);
        let mut subscriptions = self.subscriptions.lock().await;
        let Some(count) = subscriptions.counts.get_mut(&channel) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            subscriptions.counts.remove(&channel);
            if let Some(sink) = subscriptions.sink.as_mut() {
                let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.unsubscribe(&channel)).await;
            }
        }
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn shared(&self) -> bool {
        true
    }
}

async fn publish_loop(
    client: redis::Client,
    mut queued: mpsc::Receiver<(String, Vec<u8>)>,
    metrics: Arc<Metrics>,
) {
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < PIPELINE {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        if connection.is_none() {
            match tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
                .await
            {
                Ok(Ok(fresh)) => connection = Some(fresh),
                _ => {
                    metrics.bus_dropped.inc_by(batch.len() as u64);
                    // Do not spin while Redis is away; what queues meanwhile is sent later.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(conn) = connection.as_mut() else {
            continue;
        };
        let mut pipe = redis::pipe();
        for (channel, payload) in &batch {
            pipe.cmd("PUBLISH")
                .arg(channel)
                .arg(payload.as_slice())
                .ignore();
        }
        match tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(conn)).await {
            Ok(Ok(())) => metrics.bus_published.inc_by(batch.len() as u64),
            _ => {
                metrics.bus_dropped.inc_by(batch.len() as u64);
                connection = None;
            }
        }
    }
}

async fn subscribe_loop(
    client: redis::Client,
    node: String,
    prefix: String,
    subscriptions: Arc<Mutex<Subscriptions>>,
    connected: Arc<AtomicBool>,
    notices: mpsc::Sender<BusNotice>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pubsub = match tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis subscriber cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {
                tracing::warn!("redis subscriber connect timed out; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        {
            // The sink goes in first, then every known channel is subscribed: a room subscribing
            // concurrently either is in the list or finds the sink (see `RedisBus::subscribe`).
            let mut state = subscriptions.lock().await;
            let channels: Vec<String> = state.counts.keys().cloned().collect();
            if !channels.is_empty() {
                match tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(&channels)).await {
                    Ok(Ok(())) => {}
                    _ => {
                        drop(state);
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
            }
            state.sink = Some(sink);
        }
        backoff = Duration::from_millis(100);
        connected.store(true, Ordering::SeqCst);
        metrics.bus_connected.set(1);
        tracing::info!("redis subscriber connected");
        // Whatever was published while we were not listening is only in the log now.
        if notices.send(BusNotice::Reconnected).await.is_err() {
            return;
        }
        while let Some(message) = stream.next().await {
            let envelope: Envelope = match serde_json::from_slice(message.get_payload_bytes()) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::warn!(%error, channel = message.get_channel_name(), "undecodable bus message");
                    continue;
                }
            };
            if envelope.origin == node || !message.get_channel_name().starts_with(&prefix) {
                continue;
            }
            if notices.send(BusNotice::Envelope(envelope)).await.is_err() {
                return;
            }
        }
        connected.store(false, Ordering::SeqCst);
        metrics.bus_connected.set(0);
        subscriptions.lock().await.sink = None;
        tracing::warn!("redis subscriber connection lost; reconnecting");
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_carry_the_prefix_and_the_room() {
        assert_eq!(channel_of("cochat:", &RoomId::from("r1")), "cochat:room:r1");
        assert_eq!(channel_of("t42:", &RoomId::from("r1")), "t42:room:r1");
    }
}
