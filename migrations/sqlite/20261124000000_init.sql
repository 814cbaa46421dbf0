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
CREATE INDEX chats_status ON chats (status, created_at);

-- Every balance change. The ledger drives the balance (trigger ledger_moves_balance below),
-- so for every user users.tokens = SUM(ledger.amount), always; balance_after is the
-- balance right after the row.
CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    amount        BIGINT  NOT NULL,
    reason        TEXT    NOT NULL
        CHECK (reason IN ('initial_grant', 'chat_reservation', 'chat_refund', 'grant')),
    chat_id       INTEGER REFERENCES chats (id) ON DELETE CASCADE,
    balance_after BIGINT  NOT NULL CHECK (balance_after >= 0),
    created_at    BIGINT  NOT NULL
);

CREATE INDEX ledger_user ON ledger (user_id, id);
CREATE INDEX ledger_chat ON ledger (chat_id);

-- Idempotency-Key of POST /chat: claimed before the chat starts (chat_id NULL until its
-- chat is reserved), released when the chat fails.
CREATE TABLE idempotency_keys (
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    idem_key     TEXT    NOT NULL,
    -- hex SHA-256 of the chat message: a reused key must come with the same request
    request_hash TEXT    NOT NULL,
    chat_id      INTEGER REFERENCES chats (id) ON DELETE CASCADE,
    created_at   BIGINT  NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The database itself keeps balances and the ledger together: nothing writes users.tokens
-- but this trigger, and the chat moves below are written with the chat change that causes
-- them, in the same statement.

-- A ledger row moves its user's balance by its amount.
CREATE TRIGGER ledger_moves_balance AFTER INSERT ON ledger
BEGIN
    UPDATE users SET tokens = tokens + NEW.amount WHERE id = NEW.user_id;
END;

-- A new chat reserves its cost.
CREATE TRIGGER chat_reserves_its_cost AFTER INSERT ON chats
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    SELECT NEW.user_id, -NEW.cost, 'chat_reservation', NEW.id, tokens - NEW.cost, NEW.created_at
    FROM users WHERE id = NEW.user_id;
END;

-- A pending chat that fails gets its reservation back and lets go of its idempotency key.
CREATE TRIGGER failed_chat_is_refunded AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending' AND NEW.status = 'failed'
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    SELECT NEW.user_id, NEW.cost, 'chat_refund', NEW.id, tokens + NEW.cost, NEW.finished_at
    FROM users WHERE id = NEW.user_id;
    DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
END;
