//! Bus drivers behind `cochat_actors::bus::Bus`: in-process (the embedded default, one node) or
//! Redis pub/sub when `REDIS_URL` is set.

pub mod redis;

use std::sync::Arc;

use cochat_actors::bus::{Bus, BusNotice, LocalHub};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::settings::Settings;

/// Envelopes waiting for the registry; when full, the Redis reader waits (Redis then buffers,
/// and past its limit drops the connection, which we notice and repair from the log).
const NOTICE_QUEUE: usize = 65_536;

/// The bus in effect and the notices it hands this node.
pub fn open(
    settings: &Settings,
    metrics: Arc<Metrics>,
) -> Result<(Arc<dyn Bus>, mpsc::Receiver<BusNotice>), String> {
    let (notices, incoming) = mpsc::channel(NOTICE_QUEUE);
    let bus: Arc<dyn Bus> = match &settings.redis_url {
        Some(url) => Arc::new(redis::RedisBus::start(
            url,
            &settings.redis_prefix,
            &settings.node_id,
            notices,
            metrics,
        )?),
        None => Arc::new(LocalHub::new().join(&settings.node_id, notices)),
    };
    Ok((bus, incoming))
}
