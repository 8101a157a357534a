-- cochat schema v2 (SQLite): AI agents. Same tables and columns as sql/postgres/V002__ai.sql.

-- The room's AI personas (the default `ai` is implicit until stored).
CREATE TABLE agents (
    room_id       TEXT NOT NULL REFERENCES rooms(id),
    name          TEXT NOT NULL,
    model         TEXT NULL,
    system_prompt TEXT NULL,
    provider      TEXT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (room_id, name)
);

-- Answers in progress: started, not yet finished (checkpointed text).
CREATE TABLE ai_partials (
    message_id         TEXT PRIMARY KEY,
    room_id            TEXT NOT NULL,
    agent              TEXT NOT NULL,
    trigger_message_id TEXT NOT NULL,
    trigger_author     TEXT NOT NULL,
    text               TEXT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX ai_partials_room_id ON ai_partials (room_id);

-- Rolling summary of a room's history per agent, and the last seq it covers.
CREATE TABLE ai_summaries (
    room_id     TEXT NOT NULL,
    agent       TEXT NOT NULL,
    summary     TEXT NOT NULL,
    through_seq BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (room_id, agent)
);

-- Token ledger: one row per answer that reported usage, charged to a user.
CREATE TABLE ai_usage (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id           TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    agent             TEXT NOT NULL,
    message_id        TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    created_at        BIGINT NOT NULL
);
CREATE INDEX ai_usage_room_created ON ai_usage (room_id, created_at);
CREATE INDEX ai_usage_user_created ON ai_usage (user_id, created_at);
