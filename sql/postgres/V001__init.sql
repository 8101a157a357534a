-- cochat schema, version 1 (PostgreSQL). The SQLite driver uses the same tables and columns.
-- Times are milliseconds since the Unix epoch (BIGINT); ids are opaque text.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    -- stored lower-cased so that names are unique regardless of case
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    kind          TEXT NOT NULL DEFAULT 'user',
    created_at    BIGINT NOT NULL
);

CREATE TABLE rooms (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- seq of the room's newest event; appends lock this row (FOR UPDATE) to serialise per room
    last_seq   BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE members (
    room_id       TEXT NOT NULL REFERENCES rooms(id),
    user_id       TEXT NOT NULL REFERENCES users(id),
    role          TEXT NOT NULL,
    joined_at     BIGINT NOT NULL,
    last_read_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX members_user_id ON members (user_id);

CREATE TABLE events (
    room_id    TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    message_id TEXT NULL,
    -- serde_json of cochat_actors::event::EventBody
    payload    JSONB NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, seq)
);
CREATE INDEX events_message_id ON events (message_id);

CREATE TABLE messages (
    id            TEXT PRIMARY KEY,
    room_id       TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    author_id     TEXT NOT NULL,
    author_name   TEXT NOT NULL,
    author_kind   TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    text          TEXT NOT NULL,
    reply_to      TEXT NULL,
    created_at    BIGINT NOT NULL,
    edited_at     BIGINT NULL,
    deleted       BOOLEAN NOT NULL DEFAULT false,
    UNIQUE (room_id, author_id, client_msg_id)
);
CREATE INDEX messages_room_seq ON messages (room_id, seq);

CREATE TABLE reactions (
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    emoji      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
);

CREATE TABLE invites (
    code       TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL,
    role       TEXT NOT NULL,
    max_uses   BIGINT NULL,
    uses       BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
