//! Register, log in, and who am I.

use actix_web::{web, HttpRequest, HttpResponse};
use cochat_actors::error::ErrorCode;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{hash_password, verify_password, AuthUser};
use crate::error::{ApiError, ApiResult};
use crate::http::json;
use crate::state::AppState;

const PASSWORD_MIN: usize = 8;
const PASSWORD_MAX: usize = 256;
const DISPLAY_NAME_MAX: usize = 64;

#[derive(Deserialize)]
pub struct Register {
    username: String,
    password: String,
    display_name: Option<String>,
}

#[derive(Deserialize)]
pub struct Login {
    username: String,
    password: String,
}

/// Usernames are 3-32 of `a-z 0-9 _ . -`, compared lower-cased.
fn normalise_username(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim().to_lowercase();
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if !(3..=32).contains(&name.len()) || !valid_chars {
        return Err(ApiError::validation(
            "username must be 3-32 characters of a-z, 0-9, _ . -",
        ));
    }
    Ok(name)
}

fn throttle(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let peer = req
        .peer_addr()
        .map(|addr| addr.ip().to_string())
        .unwrap_or_default();
    if state.http_limiter.allow(&format!("auth:{peer}")) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many attempts, slow down",
        ))
    }
}

/// Runs password hashing or verification on the hashing threads, at most one per core at once
/// (argon2id takes 19 MiB and tens of milliseconds each).
async fn hashing<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    state
        .hashing
        .run(work)
        .await
        .map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))
}

pub async fn register(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Register>,
) -> ApiResult<HttpResponse> {
    throttle(&state, &req)?;
    let body = body.into_inner();
    let username = normalise_username(&body.username)?;
    if !(PASSWORD_MIN..=PASSWORD_MAX).contains(&body.password.chars().count()) {
        return Err(ApiError::validation(format!(
            "password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters"
        )));
    }
    let display_name = body
        .display_name
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| username.clone());
    if display_name.chars().count() > DISPLAY_NAME_MAX || display_name.chars().any(char::is_control)
    {
        return Err(ApiError::validation(format!(
            "display_name must be 1-{DISPLAY_NAME_MAX} printable characters"
        )));
    }
    let password = body.password;
    let hash = hashing(&state, move || hash_password(&password))
        .await?
        .map_err(|error| ApiError::new(ErrorCode::Internal, error))?;
    let user = state
        .store
        .create_user(&username, &display_name, &hash)
        .await?;
    let token = issue(&state, &user.id, &user.display_name)?;
    Ok(HttpResponse::Created().json(json!({"user": json::user(&user), "token": token})))
}

pub async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Login>,
) -> ApiResult<HttpResponse> {
    throttle(&state, &req)?;
    let body = body.into_inner();
    let found = state
        .store
        .user_by_name(&body.username.trim().to_lowercase())
        .await?;
    // Verify against a real hash even for an unknown user, so timing does not tell names apart.
    let (user, stored) = match found {
        Some((user, hash)) => (Some(user), hash),
        None => (None, dummy_hash().to_owned()),
    };
    let password = body.password;
    let valid = hashing(&state, move || verify_password(&password, &stored)).await?;
    match user {
        Some(user) if valid => {
            let token = issue(&state, &user.id, &user.display_name)?;
            Ok(HttpResponse::Ok().json(json!({"user": json::user(&user), "token": token})))
        }
        _ => Err(ApiError::unauthorized("wrong username or password")),
    }
}

pub async fn me(state: web::Data<AppState>, caller: AuthUser) -> ApiResult<HttpResponse> {
    let user = state
        .store
        .user_by_id(&caller.id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
    Ok(HttpResponse::Ok().json(json!({"user": json::user(&user)})))
}

fn issue(
    state: &AppState,
    user: &cochat_actors::ids::UserId,
    name: &str,
) -> Result<String, ApiError> {
    state
        .tokens
        .issue(user, name)
        .map_err(|error| ApiError::new(ErrorCode::Internal, error))
}

fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password("not a real password").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::normalise_username;

    #[test]
    fn usernames_are_lower_cased_and_checked() {
        assert_eq!(normalise_username(" Ada_L ").expect("valid"), "ada_l");
        assert!(normalise_username("ab").is_err());
        assert!(normalise_username("has space").is_err());
        assert!(normalise_username(&"x".repeat(33)).is_err());
    }
}
