//! cochat: the process and its adapters. `run(settings, listener)` starts the real server on a
//! listener the caller bound, so integration tests start exactly what production runs.

pub mod ai;
pub mod auth;
pub mod bus;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod rate;
pub mod settings;
pub mod state;
pub mod store;
pub mod ws;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use actix_http::HttpService;
use actix_service::{map_config, IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use anyhow::Context as _;
use cochat_actors::agent::{AiDeps, TriggerLimiter};
use cochat_actors::commit::{Committer, CommitterConfig};
use cochat_actors::ports::RoomLog;
use cochat_actors::registry::{route_bus_notice, RoomRegistry};
use cochat_actors::room::{RoomConfig, RoomDeps};

use crate::auth::{load_or_generate_secret, TokenKeys};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::state::AppState;

/// Serves until SIGTERM or Ctrl-C, then drains (see `drain`).
pub async fn run(settings: Settings, listener: TcpListener) -> anyhow::Result<()> {
    run_until(settings, listener, shutdown_signal()).await
}

/// Serves until `shutdown` completes, then drains. Must run inside an actix `System`.
pub async fn run_until(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let store_url = settings.store_url();
    let store = store::open(&store_url)
        .await
        .with_context(|| format!("opening the store at {}", store::redact_url(&store_url)))?;
    let secret = load_or_generate_secret(settings.jwt_secret.as_deref(), &settings.data_dir)
        .context("preparing the JWT secret")?;
    let tokens = TokenKeys::new(&secret, settings.token_ttl);
    let metrics = Arc::new(Metrics::new(&settings.node_id).context("registering metrics")?);

    // SQLite has a single writer: parallel transactions would only wait on each other.
    let shards = if store_url.starts_with("sqlite") {
        1
    } else {
        settings.store_writers
    };
    let log: Arc<dyn RoomLog> = store.clone();
    let committer = Committer::start(
        log.clone(),
        CommitterConfig {
            shards,
            max_batch: settings.store_batch,
            queue: 8192,
        },
        metrics.clone(),
    );
    let (bus, notices) = bus::open(&settings, metrics.clone()).map_err(anyhow::Error::msg)?;
    let provider = match settings.ai_provider.clone() {
        Some(config) => {
            tracing::info!(provider = %config.provider, model = %config.model, "AI provider configured");
            Some(ai::presets::build(config).map_err(anyhow::Error::msg)?)
        }
        None => {
            tracing::info!("AI is not configured (AI_PROVIDER unset): agents answer with a notice");
            None
        }
    };
    let ai = AiDeps {
        store: store.clone(),
        provider,
        config: settings.ai.clone(),
        limiter: Arc::new(TriggerLimiter::default()),
    };
    let deps = RoomDeps {
        log,
        bus: bus.clone(),
        ai: Some(ai),
        committer: committer.clone(),
        telemetry: metrics.clone(),
        config: RoomConfig {
            // One group commit delivers up to a batch of events at once: a buffer smaller than
            // that would cut off even readers that keep up.
            broadcast_capacity: settings.room_buffer.max(settings.store_batch * 2),
            idle_timeout: settings.room_idle,
            presence_interval: settings.presence_interval,
            presence_ttl: settings.presence_ttl,
            resync_interval: settings.resync_interval,
        },
    };
    let registry = RoomRegistry::new(deps).start();
    let router = registry.clone();
    actix_web::rt::spawn(async move {
        let mut notices = notices;
        while let Some(notice) = notices.recv().await {
            route_bus_notice(&router, notice);
        }
    });
    let state = web::Data::new(AppState::new(
        settings.clone(),
        store,
        bus,
        registry,
        committer,
        tokens,
        metrics,
    ));

    let address = listener
        .local_addr()
        .context("reading the listener's address")?;
    let body_limit = settings.limits.http_body_bytes;
    let app_state = state.clone();
    // Told to idle keep-alive connections when the server stops, so they close at once instead
    // of holding the shutdown until their keep-alive runs out (what `HttpServer` does too).
    let stopping = Arc::new(tokio::sync::Notify::new());
    let stopping_signal = stopping.clone();
    let mut server = actix_server::Server::build()
        // We drain ourselves on SIGTERM (readiness first, sockets closed over a window).
        .disable_signals()
        .shutdown_timeout(settings.drain_window.as_secs() + 10);
    if settings.workers > 0 {
        server = server.workers(settings.workers);
    }
    // actix-web's `HttpServer`, built by hand for one addition: WebSocket upgrades go to
    // `ws::upgrade_service`, which runs them on the bare TCP stream (see `ws/transport.rs`).
    let server = server
        .listen("cochat", listener, move || {
            let app = App::new()
                .app_data(app_state.clone())
                .configure(|cfg| http::routes(cfg, body_limit))
                .into_factory()
                .map_err(|error: actix_web::Error| error.error_response());
            let stopping = stopping_signal.clone();
            HttpService::build()
                // Chat frames are small and latency matters: no Nagle delay on sockets.
                .tcp_nodelay(true)
                .local_addr(address)
                .graceful_shutdown_signal(move || {
                    let stopping = stopping.clone();
                    async move { stopping.notified().await }
                })
                .upgrade(ws::upgrade_service(app_state.clone()))
                .finish(map_config(app, move |_| AppConfig::default()))
                .tcp()
        })
        .context("listening")?;
    let server = server.run();
    let handle = server.handle();
    let handle = ServerHandle { handle, stopping };
    let serving = actix_web::rt::spawn(server);
    tracing::info!(%address, node = %settings.node_id, store = %store::redact_url(&store_url), "cochat is serving");

    shutdown.await;
    drain(&state, &handle).await;
    serving.await.context("server task")?.context("server")?;
    tracing::info!("cochat stopped");
    Ok(())
}

struct ServerHandle {
    handle: actix_server::ServerHandle,
    /// Wakes idle keep-alive connections so they close when the server stops.
    stopping: Arc<tokio::sync::Notify>,
}

/// Readiness goes false at once; sockets close with 1012 at random points over the drain window
/// so their reconnects spread over the other nodes; writes in flight commit; then the server stops.
async fn drain(state: &AppState, handle: &ServerHandle) {
    let window = state.settings.drain_window;
    tracing::info!(?window, "draining");
    state.metrics.draining.set(1);
    state.drain.send_replace(Some(window));
    let deadline = Instant::now() + window + Duration::from_secs(2);
    while state.metrics.connections.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !state.committer.drain(Duration::from_secs(5)).await {
        tracing::warn!(
            in_flight = state.committer.in_flight(),
            "writes still in flight at shutdown"
        );
    }
    handle.stopping.notify_waiters();
    handle.handle.stop(true).await;
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
