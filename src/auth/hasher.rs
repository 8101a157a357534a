//! A small fixed pool of threads for password hashing and verification.
//!
//! Why not `web::block`: argon2id allocates a 19 MiB block per hash, and tokio's blocking pool runs
//! each job on whichever of its many threads is free. glibc malloc gives each thread its own arena
//! and, once the first such block is freed, raises its mmap threshold, so later blocks come from
//! the arenas and stay there after being freed: one per arena, up to 8 arenas per core, which left
//! hundreds of MiB resident after a burst of sign-ups. Here the same few threads always hash, so at
//! most that many arenas ever hold a block. The pool also bounds the work: one hash per thread.
//! (An arena could still keep several blocks: a small allocation made here that outlives its job,
//! such as the hash string returned, splits the freed block so the next one is placed beyond it.
//! So `password` gives each pool thread one block for its life instead; see `on_pool_thread`.)

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static ON_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Whether this is one of the pool's threads: only these keep per-thread hashing memory, so there
/// are at most as many such buffers as the pool has threads.
pub(super) fn on_pool_thread() -> bool {
    ON_POOL.with(Cell::get)
}

#[derive(Debug, thiserror::Error)]
pub enum HasherError {
    /// No thread is left to take the job.
    #[error("hashing is closed")]
    Closed,
    /// The job was taken but gave no answer (it panicked).
    #[error("hashing was interrupted")]
    Interrupted,
}

/// Runs jobs on `threads` long-lived threads, in the order they come. Dropping it lets the threads
/// finish their queue and end.
pub struct Hasher {
    jobs: mpsc::Sender<Job>,
}

impl Hasher {
    pub fn new(threads: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = thread::Builder::new()
                .name(format!("cochat-hash-{i}"))
                .spawn(move || work(&queue));
            if let Err(error) = spawned {
                // With no thread at all the queue is dropped and every job fails as `Closed`.
                tracing::error!(%error, "starting a password hashing thread");
            }
        }
        Self { jobs }
    }

    /// Runs `work` on the pool and waits for its result. A job whose caller has gone by the time a
    /// thread takes it is skipped.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HasherError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            if !reply.is_closed() {
                let _ = reply.send(work());
            }
        });
        self.jobs.send(job).map_err(|_| HasherError::Closed)?;
        answer.await.map_err(|_| HasherError::Interrupted)
    }
}

fn work(queue: &Mutex<mpsc::Receiver<Job>>) {
    ON_POOL.with(|on_pool| on_pool.set(true));
    loop {
        // The lock is held while waiting for a job, never while running one.
        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = next else {
            return; // The `Hasher` is gone.
        };
        // A panicking job drops its reply (its caller sees `Interrupted`); the thread carries on.
        let _ = panic::catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_on_the_named_threads_and_survives_a_panic() {
        let hasher = Hasher::new(2);
        let name = hasher
            .run(|| thread::current().name().map(str::to_owned))
            .await
            .expect("the pool runs jobs");
        assert!(name.is_some_and(|name| name.starts_with("cochat-hash-")));
        assert!(hasher
            .run(on_pool_thread)
            .await
            .expect("the pool runs jobs"));
        assert!(!on_pool_thread());

        let panicked = hasher.run(|| -> u32 { panic!("boom") }).await;
        assert!(matches!(panicked, Err(HasherError::Interrupted)));
        let sums = futures_util::future::join_all((0..4).map(|i| hasher.run(move || i + 1))).await;
        let sums: Vec<_> = sums
            .into_iter()
            .map(|sum| sum.expect("still runs"))
            .collect();
        assert_eq!(sums, vec![1, 2, 3, 4]);
    }
}
