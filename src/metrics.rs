//! Prometheus metrics. One `Metrics` per process; it also receives the actors' `Telemetry`.
//! docs/operations.md says what each one means and what to alert on.

use std::time::Duration;

use cochat_actors::error::ErrorCode;
use cochat_actors::ports::Telemetry;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub rooms_active: IntGauge,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    pub messages_persisted: IntCounter,
    pub store_commit_seconds: Histogram,
    pub store_batch_size: Histogram,
    pub delivery_lag_seconds: Histogram,
    pub slow_consumers: IntCounter,
    pub ws_errors: IntCounterVec,
    pub draining: IntGauge,
    pub bus_connected: IntGauge,
    pub bus_published: IntCounter,
    pub bus_dropped: IntCounter,
}

impl Metrics {
    pub fn new(node_id: &str) -> Result<Self, prometheus::Error> {
        let registry =
            Registry::new_custom(None, Some([("node".to_owned(), node_id.to_owned())].into()))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let metric = IntCounter::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let ws_errors = IntCounterVec::new(
            Opts::new(
                "cochat_ws_errors_total",
                "error frames sent on sockets, by code",
            ),
            &["code"],
        )?;
        registry.register(Box::new(ws_errors.clone()))?;
        Ok(Self {
            connections: gauge("cochat_connections", "open WebSocket connections")?,
            rooms_active: gauge("cochat_rooms_active", "Room actors running on this node")?,
            frames_in: counter("cochat_frames_in_total", "WebSocket frames received")?,
            frames_out: counter("cochat_frames_out_total", "WebSocket frames sent")?,
            messages_persisted: counter("cochat_messages_persisted_total", "writes carried by committed group-commit transactions")?,
            store_commit_seconds: histogram(
                "cochat_store_commit_seconds",
                "duration of one group-commit transaction",
                latency.clone(),
            )?,
            store_batch_size: histogram(
                "cochat_store_batch_size",
                "writes carried by one group-commit transaction",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )?,
            delivery_lag_seconds: histogram(
                "cochat_delivery_lag_seconds",
                "from commit to fan-out on this node",
                latency,
            )?,
            slow_consumers: counter(
                "cochat_slow_consumers_total",
                "sockets cut off because they fell behind their room",
            )?,
            ws_errors,
            draining: gauge("cochat_draining", "1 while this node drains for shutdown")?,
            bus_connected: gauge("cochat_bus_connected", "1 while the Redis subscriber connection is up")?,
            bus_published: counter("cochat_bus_published_total", "envelopes published to Redis")?,
            bus_dropped: counter(
                "cochat_bus_dropped_total",
                "envelopes not published (Redis down or outbox full); other nodes repair from the log",
            )?,
            registry,
        })
    }

    pub fn ws_error(&self, code: ErrorCode) {
        self.ws_errors.with_label_values(&[&code.to_string()]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Telemetry for Metrics {
    fn commit_batch(&self, writes: usize, elapsed: Duration, committed: bool) {
        self.store_commit_seconds.observe(elapsed.as_secs_f64());
        self.store_batch_size.observe(writes as f64);
        if committed {
            self.messages_persisted.inc_by(writes as u64);
        }
    }

    fn event_delivered(&self, lag: Duration) {
        self.delivery_lag_seconds.observe(lag.as_secs_f64());
    }

    fn rooms_changed(&self, delta: i64) {
        self.rooms_active.add(delta);
    }
}
