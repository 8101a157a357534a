//! What every handler and session shares: the store, the room registry, the token keys, metrics,
//! the drain signal. Built once in `run` and handed to actix-web as `web::Data`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use cochat_actors::bus::Bus;
use cochat_actors::commit::Committer;
use cochat_actors::ids::SessionId;
use cochat_actors::ports::Store;
use cochat_actors::registry::RoomRegistry;
use tokio::sync::watch;

use crate::auth::{Hasher, TokenKeys};
use crate::metrics::Metrics;
use crate::rate::KeyedLimiter;
use crate::settings::Settings;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub registry: Addr<RoomRegistry>,
    pub committer: Committer,
    pub tokens: TokenKeys,
    pub metrics: Arc<Metrics>,
    /// `Some(window)` once the node drains: sessions close at a random point within `window`.
    pub drain: watch::Sender<Option<Duration>>,
    /// HTTP writes and auth attempts, per caller.
    pub http_limiter: KeyedLimiter,
    /// Password hashing threads, one per core (argon2id takes 19 MiB and tens of ms each): bounds
    /// the memory and CPU a burst of sign-ups or log-ins can take.
    pub hashing: Hasher,
    next_session: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Arc<Settings>,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        registry: Addr<RoomRegistry>,
        committer: Committer,
        tokens: TokenKeys,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limits = &settings.limits;
        let http_limiter = KeyedLimiter::new(limits.rate_per_s, limits.rate_burst);
        Self {
            settings,
            store,
            bus,
            registry,
            committer,
            tokens,
            metrics,
            drain: watch::channel(None).0,
            http_limiter,
            hashing: Hasher::new(
                std::thread::available_parallelism().map_or(2, |cores| cores.get()),
            ),
            next_session: AtomicU64::new(1),
        }
    }

    pub fn new_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    pub fn is_draining(&self) -> bool {
        self.drain.borrow().is_some()
    }
}
