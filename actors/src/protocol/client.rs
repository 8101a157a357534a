//! Client -> server frames, and the parser that turns a text frame into one, or into an error
//! with a stable code (`bad_json`, `invalid_frame`, `unknown_type`) plus the frame's `id` so the
//! error can still carry `reply_to`.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{DomainError, ErrorCode};
use crate::ids::{MessageId, RoomId, Seq};

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Subscribe {
        room: RoomId,
        #[serde(default)]
        since_seq: Option<Seq>,
    },
    Unsubscribe {
        room: RoomId,
    },
    Send {
        room: RoomId,
        client_msg_id: String,
        text: String,
        #[serde(default)]
        reply_to_message: Option<MessageId>,
    },
    Edit {
        room: RoomId,
        message_id: MessageId,
        text: String,
    },
    Delete {
        room: RoomId,
        message_id: MessageId,
    },
    React {
        room: RoomId,
        message_id: MessageId,
        emoji: String,
        on: bool,
    },
    Typing {
        room: RoomId,
    },
    Read {
        room: RoomId,
        seq: Seq,
    },
    /// Stops an AI answer (`message_id` of the answer, or of a trigger still queued).
    Cancel {
        room: RoomId,
        message_id: MessageId,
    },
    /// Asks the agent that wrote answer `message_id` to answer its trigger again.
    Regenerate {
        room: RoomId,
        message_id: MessageId,
    },
    Ping,
}

/// Every `type` a client may send; anything else is `unknown_type` rather than `invalid_frame`.
pub const CLIENT_FRAME_TYPES: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "send",
    "edit",
    "delete",
    "react",
    "typing",
    "read",
    "cancel",
    "regenerate",
    "ping",
];

/// A parsed frame with the client's correlation id (echoed as `reply_to`).
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedFrame {
    pub id: Option<Value>,
    pub frame: ClientFrame,
}

/// Parses one text frame. On failure returns the id (when one could be read) with the error.
pub fn parse_client_frame(text: &str) -> Result<ParsedFrame, (Option<Value>, DomainError)> {
    let mut value: Value = serde_json::from_str(text).map_err(|error| {
        (
            None,
            DomainError::new(ErrorCode::BadJson, format!("not JSON: {error}")),
        )
    })?;
    let Some(object) = value.as_object_mut() else {
        return Err((
            None,
            DomainError::new(ErrorCode::InvalidFrame, "a frame is a JSON object"),
        ));
    };
    // Only strings and numbers are accepted as ids: they are echoed back verbatim.
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id),
        Some(_) => {
            return Err((
                None,
                DomainError::new(ErrorCode::InvalidFrame, "`id` must be a string or a number"),
            ))
        }
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        _ => {
            return Err((
                id,
                DomainError::new(ErrorCode::InvalidFrame, "missing string field `type`"),
            ))
        }
    };
    if !CLIENT_FRAME_TYPES.contains(&kind.as_str()) {
        return Err((
            id,
            DomainError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type `{kind}`"),
            ),
        ));
    }
    match serde_json::from_value::<ClientFrame>(value) {
        Ok(frame) => Ok(ParsedFrame { id, frame }),
        Err(error) => Err((
            id,
            DomainError::new(
                ErrorCode::InvalidFrame,
                format!("bad `{kind}` frame: {error}"),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_send_frame_and_keeps_its_id() {
        let parsed = parse_client_frame(
            r#"{"type":"send","id":7,"room":"r1","client_msg_id":"c1","text":"hi"}"#,
        )
        .expect("a valid send frame parses");
        assert_eq!(parsed.id, Some(Value::from(7)));
        assert_eq!(
            parsed.frame,
            ClientFrame::Send {
                room: RoomId::from("r1"),
                client_msg_id: "c1".into(),
                text: "hi".into(),
                reply_to_message: None,
            }
        );
    }

    #[test]
    fn classifies_each_kind_of_bad_frame() {
        let code = |text: &str| {
            parse_client_frame(text)
                .expect_err("must be refused")
                .1
                .code
        };
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"room":"r"}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"send","room":"r"}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"read","room":"r","seq":"x"}"#),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn an_error_keeps_the_id_for_reply_to() {
        let (id, error) =
            parse_client_frame(r#"{"type":"warp","id":"abc"}"#).expect_err("unknown type");
        assert_eq!(id, Some(Value::from("abc")));
        assert_eq!(error.code, ErrorCode::UnknownType);
    }
}
