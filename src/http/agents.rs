//! AI personas of a room and the room's AI usage.

use actix_web::{web, HttpResponse};
use cochat_actors::agent::trigger::valid_agent_name;
use cochat_actors::agent::utc_day;
use cochat_actors::error::DomainError;
use cochat_actors::event::AgentInfo;
use cochat_actors::ids::RoomId;
use cochat_actors::ports::Command;
use serde::Deserialize;
use serde_json::json;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::http::require_member;
use crate::http::rooms::submit;
use crate::state::AppState;

const SYSTEM_PROMPT_MAX: usize = 8000;
const MODEL_MAX: usize = 100;

#[derive(Deserialize)]
pub struct NewAgent {
    name: String,
    model: Option<String>,
    system_prompt: Option<String>,
    provider: Option<String>,
}

/// `POST /api/v1/rooms/{room}/agents` (admin+): adds a persona, announced as `agent.added`.
pub async fn create(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
    body: web::Json<NewAgent>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    let role = require_member(&state, &room, &caller.id).await?;
    if !role.is_admin() {
        return Err(DomainError::forbidden("only admins and owners add agents").into());
    }
    let body = body.into_inner();
    let name = body.name.trim().to_lowercase();
    if !valid_agent_name(&name) {
        return Err(ApiError::validation(
            "name must be 1-32 characters of a-z, 0-9, _ and -",
        ));
    }
    let model = body
        .model
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty());
    if model.as_ref().is_some_and(|m| m.len() > MODEL_MAX) {
        return Err(ApiError::validation(format!(
            "model is limited to {MODEL_MAX} bytes"
        )));
    }
    let system_prompt = body.system_prompt.filter(|p| !p.trim().is_empty());
    if system_prompt
        .as_ref()
        .is_some_and(|p| p.chars().count() > SYSTEM_PROMPT_MAX)
    {
        return Err(ApiError::validation(format!(
            "system_prompt is limited to {SYSTEM_PROMPT_MAX} characters"
        )));
    }
    // One provider is configured per deployment; a persona may name it, not another.
    let configured = state
        .settings
        .ai_provider
        .as_ref()
        .map(|config| config.provider.clone());
    let provider = body
        .provider
        .map(|p| p.trim().to_lowercase())
        .filter(|p| !p.is_empty());
    if let Some(wanted) = &provider {
        if configured.as_deref() != Some(wanted.as_str()) {
            return Err(ApiError::validation(format!(
                "provider {wanted:?} is not configured on this server (configured: {})",
                configured.as_deref().unwrap_or("none")
            )));
        }
    }
    let agent = AgentInfo {
        name,
        model,
        system_prompt,
        provider,
    };
    let command = Command::AddAgent {
        actor: caller.id.clone(),
        agent: agent.clone(),
    };
    let applied = submit(&state, &room, &caller.id, command).await?;
    Ok(HttpResponse::Created().json(json!({"agent": agent, "seq": applied.seq})))
}

/// The room's personas, the default `ai` first unless a stored one replaces it.
pub async fn list_for(state: &AppState, room: &RoomId) -> Result<Vec<AgentInfo>, ApiError> {
    let mut agents = state.store.agents(room).await?;
    if !agents
        .iter()
        .any(|agent| agent.name == AgentInfo::DEFAULT_NAME)
    {
        agents.insert(0, AgentInfo::default_agent());
    }
    Ok(agents)
}

/// `GET /api/v1/rooms/{room}/usage` (members): tokens used today (UTC), per user, and limits.
pub async fn usage(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<RoomId>,
) -> ApiResult<HttpResponse> {
    let room = path.into_inner();
    require_member(&state, &room, &caller.id).await?;
    let (day, since) = utc_day();
    let totals = state.store.room_usage(&room, since).await?;
    let by_user = state.store.room_usage_by_user(&room, since).await?;
    let limits = &state.settings.ai;
    let by_user: Vec<_> = by_user
        .iter()
        .map(|(user, t)| json!({"user": user, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens, "answers": t.answers}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "room": room,
        "day": day,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "answers": totals.answers,
        "by_user": by_user,
        "limits": {
            "tokens_per_day_room": limits.tokens_per_day_room,
            "tokens_per_day_user": limits.tokens_per_day_user,
            "triggers_per_min_room": limits.triggers_per_min_room,
            "triggers_per_min_user": limits.triggers_per_min_user,
        },
    })))
}
