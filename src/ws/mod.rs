//! The WebSocket endpoint. actix-web-actors (deprecated upstream, successor actix-ws) is used only
//! inside this module, so a later move stays local.
//!
//! A WebSocket upgrade request never reaches the HTTP routes: actix-http hands it, with its TCP
//! stream, to `transport::upgrade_service`. The `GET /api/v1/ws` route answers only requests that
//! are not upgrades, with the same checks and errors.

mod session;
mod transport;

use actix_web::http::header::HeaderMap;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::HandshakeError;
use cochat_actors::error::ErrorCode;

use crate::auth::{bearer_token_in, AuthUser};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub use session::Session;
pub use transport::upgrade_service;

/// Where the WebSocket endpoint lives.
pub const WS_PATH: &str = "/api/v1/ws";

#[derive(serde::Deserialize)]
struct WsQuery {
    token: Option<String>,
}

/// The checks made before an upgrade: the node is not draining, and the token (header, or
/// `?token=` for browsers) is valid. A failure is a plain HTTP error with the JSON body.
fn authorize(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> ApiResult<AuthUser> {
    if state.is_draining() {
        return Err(ApiError::new(
            ErrorCode::ShuttingDown,
            "this node is draining; reconnect",
        ));
    }
    let from_query = || {
        web::Query::<WsQuery>::from_query(query.unwrap_or(""))
            .ok()
            .and_then(|q| q.into_inner().token)
    };
    let token = bearer_token_in(headers)
        .or_else(from_query)
        .ok_or_else(|| ApiError::unauthorized("missing token (Authorization header or ?token=)"))?;
    AuthUser::from_token(state, &token)
}

fn handshake_error(error: HandshakeError) -> ApiError {
    ApiError::new(ErrorCode::InvalidFrame, error.to_string())
}

/// `GET /api/v1/ws` without an upgrade: the same refusals as the upgrade (draining, token), and
/// for an authorised caller the handshake error (400).
pub async fn upgrade(req: HttpRequest, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    authorize(&state, req.headers(), req.uri().query())?;
    match actix_http::ws::handshake(req.head()) {
        Err(error) => Err(handshake_error(error)),
        // A request that passes the handshake is an upgrade and is served by the transport.
        Ok(_) => Err(ApiError::new(
            ErrorCode::InvalidFrame,
            "expected a WebSocket upgrade",
        )),
    }
}
