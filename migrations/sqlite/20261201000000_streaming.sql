-- Streaming. A streamed chat whose client went away before the model finished is
-- 'abandoned', and charged or refunded by ABANDONED_STREAM_CHARGE: `refunded` says which
-- (a failed chat is always refunded). Every chat keeps the usage the model reported.
--
-- SQLite cannot change a CHECK constraint in place, so `chats` is rebuilt, and with it the
-- two tables that reference it. The usual procedure turns foreign keys off first, which
-- sqlx's migration transaction does not allow; with them on, dropping `chats` would
-- cascade to the ledger. So all three are renamed aside (SQLite rewrites the references
-- and the triggers' bodies to follow), built anew under their names, filled with the same
-- rows and ids, and the old ones dropped children first, so no drop cascades to a row.
-- Then the indexes and triggers of the three are created again, as they were, but that a
-- refunded abandoned chat is refunded like a failed one.

ALTER TABLE ledger RENAME TO ledger_before_streaming;
ALTER TABLE idempotency_keys RENAME TO idempotency_keys_before_streaming;
ALTER TABLE chats RENAME TO chats_before_streaming;

CREATE TABLE chats (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id           INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    message           TEXT    NOT NULL,
    response          TEXT,
    status            TEXT    NOT NULL
        CHECK (status IN ('pending', 'answered', 'failed', 'abandoned')),
    cost              BIGINT  NOT NULL CHECK (cost >= 0),
    created_at        BIGINT  NOT NULL,
    finished_at       BIGINT,
    deadline_at       BIGINT,
    refunded          BOOLEAN NOT NULL DEFAULT FALSE,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT
);

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

CREATE TABLE idempotency_keys (
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    idem_key     TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    chat_id      INTEGER REFERENCES chats (id) ON DELETE CASCADE,
    created_at   BIGINT  NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);

INSERT INTO chats
    (id, user_id, message, response, status, cost, created_at, finished_at, deadline_at, refunded)
SELECT id, user_id, message, response, status, cost, created_at, finished_at, deadline_at,
       status = 'failed'
FROM chats_before_streaming;

INSERT INTO ledger (id, user_id, amount, reason, chat_id, balance_after, created_at)
SELECT id, user_id, amount, reason, chat_id, balance_after, created_at
FROM ledger_before_streaming;

INSERT INTO idempotency_keys (user_id, idem_key, request_hash, chat_id, created_at)
SELECT user_id, idem_key, request_hash, chat_id, created_at
FROM idempotency_keys_before_streaming;

DROP TABLE idempotency_keys_before_streaming;
DROP TABLE ledger_before_streaming;
DROP TABLE chats_before_streaming;

CREATE INDEX chats_user ON chats (user_id, id);
CREATE INDEX chats_status ON chats (status, created_at);
CREATE INDEX ledger_user ON ledger (user_id, id);
CREATE INDEX ledger_chat ON ledger (chat_id);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TRIGGER ledger_moves_balance AFTER INSERT ON ledger
BEGIN
    UPDATE users SET tokens = tokens + NEW.amount WHERE id = NEW.user_id;
END;

CREATE TRIGGER ledger_rows_are_whole_tokens BEFORE INSERT ON ledger
WHEN typeof(NEW.amount) <> 'integer' OR typeof(NEW.balance_after) <> 'integer'
    OR NEW.balance_after > 1000000000000000
BEGIN
    SELECT RAISE(ABORT, 'ledger amounts and balances must be whole tokens within the ceiling');
END;

CREATE TRIGGER chat_reserves_its_cost AFTER INSERT ON chats
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    SELECT NEW.user_id, -NEW.cost, 'chat_reservation', NEW.id, tokens - NEW.cost, NEW.created_at
    FROM users WHERE id = NEW.user_id;
END;

CREATE TRIGGER failed_chat_is_refunded AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending'
    AND (NEW.status = 'failed' OR (NEW.status = 'abandoned' AND NEW.refunded))
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    SELECT NEW.user_id, NEW.cost, 'chat_refund', NEW.id, tokens + NEW.cost, NEW.finished_at
    FROM users WHERE id = NEW.user_id;
    DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
END;
