//! Liveness, readiness and metrics.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// Alive as long as the process serves HTTP.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "node": state.settings.node_id}))
}

/// Ready when the store answers and the node is not draining; 503 otherwise, with each check.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let store = match state.store.ping().await {
        Ok(()) => "ok".to_owned(),
        Err(error) => error.to_string(),
    };
    let draining = state.is_draining();
    // The bus is reported, not required: without Redis a node still accepts, persists and
    // serves its own members, and repairs cross-node delivery from the log when Redis returns.
    let bus = match (state.bus.shared(), state.bus.connected()) {
        (false, _) => "local",
        (true, true) => "connected",
        (true, false) => "disconnected",
    };
    let ready = store == "ok" && !draining;
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "node": state.settings.node_id,
        "checks": {"store": store, "bus": bus, "draining": draining},
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
