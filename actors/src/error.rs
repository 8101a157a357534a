//! Error codes shared by the socket and HTTP: one stable `code` string per failure, so clients can
//! branch on it. The HTTP status for each code is decided in one place (`ErrorCode::http_status`).

use serde::{Deserialize, Serialize};

/// Every error a client can see. The serialised names are part of the wire contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    #[error("bad_json")]
    BadJson,
    #[error("unknown_type")]
    UnknownType,
    #[error("invalid_frame")]
    InvalidFrame,
    #[error("binary_not_supported")]
    BinaryNotSupported,
    #[error("frame_too_large")]
    FrameTooLarge,
    #[error("text_too_large")]
    TextTooLarge,
    #[error("rate_limited")]
    RateLimited,
    #[error("unauthorized")]
    Unauthorized,
    #[error("forbidden")]
    Forbidden,
    #[error("room_not_found")]
    RoomNotFound,
    #[error("message_not_found")]
    MessageNotFound,
    #[error("user_not_found")]
    UserNotFound,
    #[error("not_subscribed")]
    NotSubscribed,
    #[error("invite_invalid")]
    InviteInvalid,
    #[error("username_taken")]
    UsernameTaken,
    #[error("conflict")]
    Conflict,
    #[error("validation")]
    Validation,
    #[error("not_found")]
    NotFound,
    #[error("payload_too_large")]
    PayloadTooLarge,
    #[error("store_unavailable")]
    StoreUnavailable,
    #[error("shutting_down")]
    ShuttingDown,
    #[error("internal")]
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadJson | ErrorCode::UnknownType | ErrorCode::InvalidFrame => 400,
            ErrorCode::BinaryNotSupported | ErrorCode::NotSubscribed => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::RoomNotFound
            | ErrorCode::MessageNotFound
            | ErrorCode::UserNotFound
            | ErrorCode::InviteInvalid
            | ErrorCode::NotFound => 404,
            ErrorCode::UsernameTaken | ErrorCode::Conflict => 409,
            ErrorCode::FrameTooLarge | ErrorCode::TextTooLarge | ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Validation => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::StoreUnavailable | ErrorCode::ShuttingDown => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// A refusal with a code and a human sentence. Domain errors travel inside the wire enums
/// and the HTTP error body; they never carry internal details (those go to the log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DomainError {
    pub code: ErrorCode,
    pub message: String,
}

impl DomainError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn room_not_found() -> Self {
        Self::new(
            ErrorCode::RoomNotFound,
            "no such room, or you are not a member",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Validation, message)
    }
}

/// A store failure: either the request itself is refused (domain) or the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    pub fn backend(error: impl std::fmt::Display) -> Self {
        StoreError::Backend(error.to_string())
    }

    /// What a client may see: domain errors as they are, backend errors as `store_unavailable`.
    pub fn to_domain(&self) -> DomainError {
        match self {
            StoreError::Domain(error) => error.clone(),
            StoreError::Backend(_) => DomainError::new(
                ErrorCode::StoreUnavailable,
                "storage is unavailable, try again",
            ),
        }
    }
}
