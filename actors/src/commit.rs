//! Group commit. Rooms hand their writes to a `Committer`; each shard task drains everything
//! queued so far into ONE `RoomLog::append` transaction, so a busy room (or many rooms) pays one
//! fsync per batch instead of one per message. A room always maps to the same shard, and a shard
//! commits one batch at a time, so one room's writes commit in the order they were submitted.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::error::{DomainError, ErrorCode};
use crate::ports::{RoomLog, Telemetry, Write, WriteResult};

struct Pending {
    write: Write,
    reply: oneshot::Sender<WriteResult>,
}

/// Cheap to clone: a handle on the shard queues.
#[derive(Clone)]
pub struct Committer {
    shards: Arc<Vec<mpsc::Sender<Pending>>>,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, Debug)]
pub struct CommitterConfig {
    /// Parallel transactions (different rooms). SQLite wants 1: it has one writer anyway.
    pub shards: usize,
    /// Most writes in one transaction.
    pub max_batch: usize,
    /// Writes waiting per shard before submitters wait (backpressure, not an unbounded queue).
    pub queue: usize,
}

impl Default for CommitterConfig {
    fn default() -> Self {
        Self {
            shards: 2,
            max_batch: 512,
            queue: 8192,
        }
    }
}

impl Committer {
    /// Starts the shard tasks on the current tokio runtime.
    pub fn start(
        log: Arc<dyn RoomLog>,
        config: CommitterConfig,
        telemetry: Arc<dyn Telemetry>,
    ) -> Self {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let shards = (0..config.shards.max(1))
            .map(|_| {
                let (sender, receiver) = mpsc::channel(config.queue.max(1));
                tokio::spawn(run_shard(
                    receiver,
                    log.clone(),
                    config.max_batch.max(1),
                    telemetry.clone(),
                    in_flight.clone(),
                ));
                sender
            })
            .collect();
        Self {
            shards: Arc::new(shards),
            in_flight,
        }
    }

    /// Queues one write now (so writes queued one after another commit in that order) and
    /// returns where its answer will arrive, once the transaction carrying it has committed.
    /// A full queue is refused at once rather than buffered without bound.
    pub fn enqueue(&self, write: Write) -> Result<oneshot::Receiver<WriteResult>, DomainError> {
        let shard = &self.shards[shard_of(&write, self.shards.len())];
        let (reply, answer) = oneshot::channel();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        match shard.try_send(Pending { write, reply }) {
            Ok(()) => Ok(answer),
            Err(error) => {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                Err(match error {
                    mpsc::error::TrySendError::Full(_) => {
                        DomainError::new(ErrorCode::StoreUnavailable, "the store is busy, retry")
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        DomainError::new(ErrorCode::ShuttingDown, "the server is shutting down")
                    }
                })
            }
        }
    }

    /// Commits one write and answers once the transaction that carries it has committed.
    pub async fn submit(&self, write: Write) -> WriteResult {
        answer_of(self.enqueue(write)?).await
    }

    /// Writes submitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until every submitted write has been answered, or the deadline passes.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while self.in_flight() > 0 {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Waits for an enqueued write's answer.
pub async fn answer_of(answer: oneshot::Receiver<WriteResult>) -> WriteResult {
    answer.await.unwrap_or_else(|_| {
        Err(DomainError::new(
            ErrorCode::StoreUnavailable,
            "the write was abandoned",
        ))
    })
}

fn shard_of(write: &Write, shards: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    write.room.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

async fn run_shard(
    mut queue: mpsc::Receiver<Pending>,
    log: Arc<dyn RoomLog>,
    max_batch: usize,
    telemetry: Arc<dyn Telemetry>,
    in_flight: Arc<AtomicUsize>,
) {
    while let Some(first) = queue.recv().await {
        let mut writes = vec![first.write];
        let mut replies = vec![first.reply];
        while writes.len() < max_batch {
            match queue.try_recv() {
                Ok(pending) => {
                    writes.push(pending.write);
                    replies.push(pending.reply);
                }
                Err(_) => break,
            }
        }
        let count = writes.len();
        let started = Instant::now();
        let outcome = log.append(writes).await;
        telemetry.commit_batch(count, started.elapsed(), outcome.is_ok());
        match outcome {
            Ok(results) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Ok(results) => {
                tracing::error!(
                    count,
                    got = results.len(),
                    "store answered a batch with the wrong number of results"
                );
                fail_all(replies, "storage answered inconsistently");
            }
            Err(error) => {
                tracing::warn!(%error, count, "group commit failed; nothing in it was committed");
                fail_all(replies, "storage is unavailable, try again");
            }
        }
        in_flight.fetch_sub(count, Ordering::SeqCst);
    }
}

fn fail_all(replies: Vec<oneshot::Sender<WriteResult>>, message: &str) {
    for reply in replies {
        let _ = reply.send(Err(DomainError::new(ErrorCode::StoreUnavailable, message)));
    }
}
