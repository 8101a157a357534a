//! HTTP routes. Handlers are thin: validate, authorise, call the store or the room's actor, and
//! shape the JSON; every failure is an `ApiError`.

mod accounts;
mod agents;
mod health;
mod json;
mod messages;
mod rooms;

use actix_web::{error::JsonPayloadError, web, HttpRequest};
use cochat_actors::error::ErrorCode;

use crate::error::ApiError;
use crate::state::AppState;
use crate::ws;

pub fn routes(cfg: &mut web::ServiceConfig, body_limit: usize) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(|error, _| {
        ApiError::new(ErrorCode::Validation, format!("bad query: {error}")).into()
    }))
    .app_data(web::PathConfig::default().error_handler(|error, _| {
        ApiError::new(ErrorCode::Validation, format!("bad path: {error}")).into()
    }))
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .route("/metrics", web::get().to(health::metrics))
    .service(
        web::scope("/api/v1")
            .route("/auth/register", web::post().to(accounts::register))
            .route("/auth/login", web::post().to(accounts::login))
            .route("/me", web::get().to(accounts::me))
            .route("/ws", web::get().to(ws::upgrade))
            .route("/rooms", web::post().to(rooms::create))
            .route("/rooms", web::get().to(rooms::list))
            .route("/rooms/{room}", web::get().to(rooms::detail))
            .route(
                "/rooms/{room}/invites",
                web::post().to(rooms::create_invite),
            )
            .route(
                "/invites/{code}/accept",
                web::post().to(rooms::accept_invite),
            )
            .route(
                "/rooms/{room}/members/{user}",
                web::patch().to(rooms::change_role),
            )
            .route(
                "/rooms/{room}/members/{user}",
                web::delete().to(rooms::remove_member),
            )
            .route("/rooms/{room}/messages", web::get().to(messages::history))
            .route("/rooms/{room}/messages", web::post().to(messages::post))
            .route("/rooms/{room}/events", web::get().to(messages::events))
            .route("/rooms/{room}/read", web::post().to(messages::mark_read))
            .route("/rooms/{room}/agents", web::post().to(agents::create))
            .route("/rooms/{room}/usage", web::get().to(agents::usage)),
    )
    .default_service(web::to(not_found));
}

fn json_error(error: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api = match &error {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("body is limited to {limit} bytes"),
        ),
        JsonPayloadError::ContentType => ApiError::new(
            ErrorCode::BadJson,
            "expected Content-Type: application/json",
        ),
        JsonPayloadError::Deserialize(inner) if inner.is_data() => {
            ApiError::new(ErrorCode::Validation, format!("bad body: {inner}"))
        }
        other => ApiError::new(ErrorCode::BadJson, format!("bad JSON: {other}")),
    };
    api.into()
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::new(ErrorCode::NotFound, "no such endpoint"))
}

/// The caller's role in the room, or `room_not_found` (existence is not revealed).
pub(crate) async fn require_member(
    state: &AppState,
    room: &cochat_actors::ids::RoomId,
    user: &cochat_actors::ids::UserId,
) -> Result<cochat_actors::ids::Role, ApiError> {
    state
        .store
        .member_role(room, user)
        .await?
        .ok_or_else(|| cochat_actors::error::DomainError::room_not_found().into())
}
