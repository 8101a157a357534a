//! Identifier newtypes and roles. Ids are opaque strings on the wire and in the store so that a
//! store or a client never has to guess their format; newtypes keep a room id from being passed
//! where a user id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A fresh random id (UUID v4, 32 hex digits).
            pub fn random() -> Self {
                Self(uuid::Uuid::new_v4().simple().to_string())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

string_id!(
    /// A user (person or AI agent).
    UserId
);
string_id!(
    /// A chat room.
    RoomId
);
string_id!(
    /// A message inside a room.
    MessageId
);

/// Position of a durable event in its room's log: 1, 2, 3, ... with no gaps.
pub type Seq = i64;

/// One WebSocket connection on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// A member's role in a room. `owner > admin > member > guest`; `ai` writes like a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Guest,
    Member,
    Ai,
    Admin,
    Owner,
}

impl Role {
    pub fn rank(self) -> u8 {
        match self {
            Role::Guest => 0,
            Role::Member | Role::Ai => 1,
            Role::Admin => 2,
            Role::Owner => 3,
        }
    }

    /// Guests read and do not write.
    pub fn can_write(self) -> bool {
        self.rank() >= 1
    }

    pub fn is_admin(self) -> bool {
        self.rank() >= 2
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Guest => "guest",
            Role::Member => "member",
            Role::Ai => "ai",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "guest" => Some(Role::Guest),
            "member" => Some(Role::Member),
            "ai" => Some(Role::Ai),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
