//! The one error type of the HTTP layer, mapped to a status and the JSON body
//! `{"error": {"code", "message"}}` in one place.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use cochat_actors::error::{DomainError, ErrorCode, StoreError};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ApiError(pub DomainError);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(DomainError::new(code, message))
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Validation, message)
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        Self(error)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if let StoreError::Backend(detail) = &error {
            tracing::error!(%detail, "store backend failed");
        }
        Self(error.to_domain())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .json(json!({"error": {"code": self.0.code, "message": self.0.message}}))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
