-- Users, their login tokens (hashed) and their chats. Times are Unix seconds (UTC).
-- Written in SQL that SQLite and PostgreSQL both speak, bar the id columns.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL,
    -- username folded to lower case: uniqueness regardless of letter case
    username_key  TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    tokens        BIGINT  NOT NULL CHECK (tokens >= 0),
    created_at    BIGINT  NOT NULL
);

CREATE TABLE login_tokens (
    -- hex SHA-256 of the token; the token itself is never stored
    token_hash TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    issued_at  BIGINT  NOT NULL,
    -- NULL: never expires
    expires_at BIGINT
);

CREATE INDEX login_tokens_user ON login_tokens (user_id);

CREATE TABLE chats (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    message     TEXT    NOT NULL,
    response    TEXT,
    status      TEXT    NOT NULL CHECK (status IN ('pending', 'answered', 'failed')),
    cost        BIGINT  NOT NULL CHECK (cost >= 0),
    created_at  BIGINT  NOT NULL,
    finished_at BIGINT
);

CREATE INDEX chats_user ON chats (user_id, id);
CREATE INDEX chats_status ON chats (status);
