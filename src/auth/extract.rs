//! `AuthUser`: the caller of an HTTP handler, from `Authorization: Bearer <jwt>`.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use cochat_actors::event::UserRef;
use cochat_actors::ids::UserId;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Clone, Debug)]
pub struct AuthUser {
    pub id: UserId,
    pub name: String,
}

impl AuthUser {
    pub fn user_ref(&self) -> UserRef {
        UserRef {
            id: self.id.clone(),
            name: self.name.clone(),
        }
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer_token(req: &HttpRequest) -> Option<String> {
    bearer_token_in(req.headers())
}

/// The bearer token in `Authorization`, if there is one.
pub fn bearer_token_in(headers: &actix_web::http::header::HeaderMap) -> Option<String> {
    let header = headers.get(actix_web::http::header::AUTHORIZATION)?;
    let value = header.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

impl AuthUser {
    pub fn from_token(state: &AppState, token: &str) -> Result<Self, ApiError> {
        let claims = state
            .tokens
            .verify(token)
            .map_err(|_| ApiError::unauthorized("invalid or expired token"))?;
        Ok(AuthUser {
            id: UserId(claims.sub),
            name: claims.name,
        })
    }
}

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::new(
                cochat_actors::error::ErrorCode::Internal,
                "application state missing",
            )));
        };
        ready(match bearer_token(req) {
            Some(token) => AuthUser::from_token(state, &token),
            None => Err(ApiError::unauthorized("missing bearer token")),
        })
    }
}
