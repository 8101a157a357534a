//! Rooms, invites and membership. Membership changes go through the room's actor like every
//! other durable write, so the member cache and the log never disagree.

use actix_web::{web, HttpResponse};
use cochat_actors::error::{DomainError, ErrorCode};
use cochat_actors::ids::{Role, RoomId, UserId};
use cochat_actors::ports::{Command, NewInvite};
use cochat_actors::registry::ask_room;
use cochat_actors::room::Submit;
use cochat_actors::time::Timestamp;
use serde::Deserialize;
use serde_json::json;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::http::{json, require_member};
use crate::state::AppState;

const ROOM_NAME_MAX: usize = 100;
const INVITE_MAX_TTL_S: i64 = 365 * 24 * 3600;

#[derive(Deserialize)]
pub struct CreateRoom {
    name: String,
}

pub async fn create(
    state: web::Data<AppState>,
    caller: AuthUser,
    body: web::Json<CreateRoom>,
) -> ApiResult<HttpResponse> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > ROOM_NAME_MAX || name.chars().any(char::is_control)
    {
        return Err(ApiError::validation(format!(
            "name must be 1-{ROOM_NAME_MAX} printable characters"
        )));
    }
    let (room, _) = state.store.create_room(name, &caller.user_ref()).await?;
    let mut body = json::room(&room);
    body["role"] = json!(Role::Owner);
    Ok(HttpResponse::Created().json(json!({"room": body})))
}

pub async fn list(state: web::Data<AppState>, caller: AuthUser) -> ApiResult<HttpResponse> {
    let rooms = state.store.rooms_for_user(&caller.id).await?;
    let rooms: Vec<_> = rooms.iter().map(json::listing).collect();
    Ok(HttpResponse::Ok().json(json!({"rooms": rooms})))
}

pub async fn detail(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
) -> ApiResult<HttpResponse> {
    let room_id = path.into_inner();
    let role = require_member(&state, &room_id, &caller.id).await?;
    let room = state
        .store
        .room(&room_id)
        .await?
        .ok_or_else(DomainError::room_not_found)?;
    let members = state.store.members(&room_id).await?;
    let members: Vec<_> = members.iter().map(json::member).collect();
    let agents = crate::http::agents::list_for(&state, &room_id).await?;
    let mut body = json::room(&room);
    body["role"] = json!(role);
    Ok(HttpResponse::Ok().json(json!({"room": body, "members": members, "agents": agents})))
}

#[derive(Deserialize)]
pub struct CreateInvite {
    role: Option<Role>,
    max_uses: Option<i64>,
    expires_in_s: Option<i64>,
}

pub async fn create_invite(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
    body: web::Json<CreateInvite>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    let own = require_member(&state, &room, &caller.id).await?;
    if !own.is_admin() {
        return Err(DomainError::forbidden("only admins and owners create invites").into());
    }
    let role = body.role.unwrap_or(Role::Member);
    if role == Role::Ai {
        return Err(ApiError::validation(
            "the ai role is for agents, not invites",
        ));
    }
    if role.rank() > own.rank() {
        return Err(
            DomainError::forbidden("an invite cannot grant more than your own role").into(),
        );
    }
    if body.max_uses.is_some_and(|uses| uses < 1) {
        return Err(ApiError::validation("max_uses must be at least 1"));
    }
    if body
        .expires_in_s
        .is_some_and(|ttl| !(1..=INVITE_MAX_TTL_S).contains(&ttl))
    {
        return Err(ApiError::validation(format!(
            "expires_in_s must be 1-{INVITE_MAX_TTL_S}"
        )));
    }
    let expires_at = body
        .expires_in_s
        .map(|ttl| Timestamp(Timestamp::now().millis() + ttl * 1000));
    let invite = NewInvite {
        code: invite_code(),
        room: room.clone(),
        role,
        max_uses: body.max_uses,
        expires_at,
        created_by: caller.id.clone(),
    };
    state.store.create_invite(&invite).await?;
    Ok(HttpResponse::Created().json(json!({
        "code": invite.code,
        "room": room,
        "role": role,
        "max_uses": invite.max_uses,
        "expires_at": expires_at,
    })))
}

/// 20 characters from an alphabet without look-alikes: ~100 bits, not guessable.
fn invite_code() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    (0..20)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect()
}

pub async fn accept_invite(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let code = path.into_inner();
    let invalid = || {
        ApiError::new(
            ErrorCode::InviteInvalid,
            "this invite is unknown, used up or expired",
        )
    };
    let room_id = state.store.invite_room(&code).await?.ok_or_else(invalid)?;
    let command = Command::JoinByInvite {
        user: caller.user_ref(),
        code,
    };
    let applied = submit(&state, &room_id, &caller.id, command).await?;
    let room = state.store.room(&room_id).await?.ok_or_else(invalid)?;
    Ok(HttpResponse::Ok().json(json!({"room": json::room(&room), "role": applied.role})))
}

#[derive(Deserialize)]
pub struct ChangeRole {
    role: Role,
}

pub async fn change_role(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<(RoomId, UserId)>,
    body: web::Json<ChangeRole>,
) -> ApiResult<HttpResponse> {
    let (room, user) = path.into_inner();
    let command = Command::ChangeRole {
        actor: caller.id.clone(),
        user: user.clone(),
        role: body.role,
    };
    let applied = submit(&state, &room, &caller.id, command).await?;
    Ok(HttpResponse::Ok()
        .json(json!({"room": room, "user": user, "role": body.role, "seq": applied.seq})))
}

pub async fn remove_member(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<(RoomId, UserId)>,
) -> ApiResult<HttpResponse> {
    let (room, user) = path.into_inner();
    let command = Command::RemoveMember {
        actor: caller.id.clone(),
        user,
    };
    submit(&state, &room, &caller.id, command).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A durable command through the room's actor; answers after the commit.
pub(crate) async fn submit(
    state: &AppState,
    room: &RoomId,
    actor: &UserId,
    command: Command,
) -> Result<cochat_actors::ports::Applied, ApiError> {
    let msg = Submit {
        actor: actor.clone(),
        command,
    };
    Ok(ask_room(&state.registry, room, msg).await??)
}
