//! History, the event log for resuming clients, posting over HTTP (bots, webhooks), read markers.

use actix_web::{web, HttpResponse};
use cochat_actors::error::{DomainError, ErrorCode};
use cochat_actors::event::{Author, AuthorKind};
use cochat_actors::ids::{MessageId, RoomId, Seq};
use cochat_actors::ports::Command;
use serde::Deserialize;
use serde_json::json;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::http::require_member;
use crate::http::rooms::submit;
use crate::state::AppState;

const PAGE_DEFAULT: u32 = 50;
const PAGE_MAX: u32 = 500;

#[derive(Deserialize)]
pub struct HistoryQuery {
    before_seq: Option<Seq>,
    after_seq: Option<Seq>,
    limit: Option<u32>,
}

fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(PAGE_DEFAULT),
        Some(limit) if (1..=PAGE_MAX).contains(&limit) => Ok(limit),
        Some(_) => Err(ApiError::validation(format!("limit must be 1-{PAGE_MAX}"))),
    }
}

pub async fn history(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
    query: web::Query<HistoryQuery>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    let limit = page_limit(query.limit)?;
    require_member(&state, &room, &caller.id).await?;
    let page = state
        .store
        .messages(&room, query.before_seq, query.after_seq, limit)
        .await?;
    Ok(HttpResponse::Ok().json(json!({"messages": page.messages, "has_more": page.has_more})))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    after_seq: Option<Seq>,
    limit: Option<u32>,
}

/// The durable events after `after_seq`, for a client whose `subscribe` answer said `truncated`.
pub async fn events(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
    query: web::Query<EventsQuery>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    let limit = page_limit(query.limit)?;
    require_member(&state, &room, &caller.id).await?;
    let after = query.after_seq.unwrap_or(0).max(0);
    // One more than asked tells whether there is more without a second query.
    let mut events = state.store.events_after(&room, after, limit + 1).await?;
    let has_more = events.len() > limit as usize;
    events.truncate(limit as usize);
    Ok(HttpResponse::Ok().json(json!({"events": events, "has_more": has_more})))
}

/// The same fields as the socket's `send` frame (`room` comes from the path; `type` is ignored).
#[derive(Deserialize)]
pub struct PostMessage {
    client_msg_id: String,
    text: String,
    reply_to_message: Option<MessageId>,
}

pub async fn post(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
    body: web::Json<PostMessage>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    if !state.http_limiter.allow(&format!("post:{}", caller.id)) {
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many messages, slow down",
        ));
    }
    let body = body.into_inner();
    let max = state.settings.limits.max_text_bytes;
    if body.text.len() > max {
        return Err(ApiError::new(
            ErrorCode::TextTooLarge,
            format!("texts are limited to {max} bytes"),
        ));
    }
    if body.text.trim().is_empty() {
        return Err(ApiError::validation("text is empty"));
    }
    if body.client_msg_id.is_empty() || body.client_msg_id.len() > 64 {
        return Err(ApiError::validation("client_msg_id must be 1 to 64 bytes"));
    }
    let command = Command::PostMessage {
        author: Author {
            id: caller.id.clone(),
            name: caller.name.clone(),
            kind: AuthorKind::User,
        },
        client_msg_id: body.client_msg_id,
        text: body.text,
        reply_to: body.reply_to_message,
    };
    let applied = submit(&state, &room, &caller.id, command).await?;
    let ack = json!({
        "type": "ack",
        "room": room,
        "message_id": applied.message_id,
        "seq": applied.seq,
        "duplicate": applied.duplicate,
    });
    Ok(if applied.duplicate {
        HttpResponse::Ok().json(ack)
    } else {
        HttpResponse::Created().json(ack)
    })
}

#[derive(Deserialize)]
pub struct MarkRead {
    seq: Seq,
}

pub async fn mark_read(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
    body: web::Json<MarkRead>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    if body.seq < 0 {
        return Err(DomainError::validation("seq must not be negative").into());
    }
    let marker = state.store.mark_read(&room, &caller.id, body.seq).await?;
    Ok(HttpResponse::Ok().json(json!({"room": room, "last_read_seq": marker})))
}
