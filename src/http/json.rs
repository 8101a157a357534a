//! JSON shapes of the HTTP answers (kept apart from the store's types so either can change).

use cochat_actors::ports::{Member, RoomInfo, RoomListing, User};
use serde_json::{json, Value};

pub fn user(user: &User) -> Value {
    json!({
        "id": user.id,
        "username": user.username,
        "display_name": user.display_name,
        "created_at": user.created_at,
    })
}

pub fn room(room: &RoomInfo) -> Value {
    json!({
        "id": room.id,
        "name": room.name,
        "created_by": room.created_by,
        "created_at": room.created_at,
        "last_seq": room.last_seq,
    })
}

pub fn listing(listing: &RoomListing) -> Value {
    let mut value = room(&listing.room);
    value["role"] = json!(listing.role);
    value["last_read_seq"] = json!(listing.last_read_seq);
    value["unread"] = json!(listing.unread);
    value
}

pub fn member(member: &Member) -> Value {
    json!({"user": member.user, "role": member.role, "joined_at": member.joined_at})
}
