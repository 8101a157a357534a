//! The WebSocket endpoint. actix-web-actors (deprecated upstream, successor actix-ws) is used only
//! inside this module, so a later move stays local.

mod session;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

use crate::auth::{bearer_token, AuthUser};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub use session::Session;

#[derive(serde::Deserialize)]
pub struct WsQuery {
    token: Option<String>,
}

/// `GET /api/v1/ws`: authenticates (header, or `?token=` for browsers) before the upgrade, so a
/// bad token is a plain 401 with the JSON error body.
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    query: web::Query<WsQuery>,
    state: web::Data<AppState>,
) -> ApiResult<HttpResponse> {
    if state.is_draining() {
        return Err(ApiError::new(
            cochat_actors::error::ErrorCode::ShuttingDown,
            "this node is draining; reconnect",
        ));
    }
    let token = bearer_token(&req)
        .or_else(|| query.into_inner().token)
        .ok_or_else(|| ApiError::unauthorized("missing token (Authorization header or ?token=)"))?;
    let user = AuthUser::from_token(&state, &token)?;
    let limits = &state.settings.limits;
    // Frames up to 4x the limit are read and refused with an error frame; beyond that the codec
    // gives up and the socket closes with 1009.
    let hard_cap = limits.max_frame_bytes.saturating_mul(4).max(1024);
    let node = state.settings.node_id.clone();
    let session = Session::new(user, state.into_inner());
    let mut response = ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(hard_cap)
        .start()
        .map_err(|error| {
            ApiError::new(
                cochat_actors::error::ErrorCode::InvalidFrame,
                error.to_string(),
            )
        })?;
    // Which node took the socket: for operators behind a load balancer, and for cluster tests.
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&node) {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-cochat-node"),
            value,
        );
    }
    Ok(response)
}
