-- The OpenAI-compatible routes pass requests through (issue 24). A chat keeps its answer's
-- tool calls (the JSON array the model gave, or assembled from a stream's deltas), and
-- embeddings are metered calls of their own: each reserves its cost when it is created and
-- keeps it when answered or gets it back when it fails, like a chat, with ledger rows of
-- its own kinds (`embedding`, `embedding_refund`) that name it.
--
-- The ledger's CHECK on `reason` grows two names, which SQLite cannot change in place: the
-- ledger is rebuilt as the streaming migration rebuilt it (renamed aside, created anew,
-- filled with the same rows and ids, the old one dropped), and the triggers that write to
-- it, which the rename pointed at the old table, are created again as they were.

ALTER TABLE chats ADD COLUMN tool_calls TEXT;

CREATE TABLE embeddings (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- the served model the client asked for
    model         TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('pending', 'answered', 'failed')),
    cost          BIGINT  NOT NULL CHECK (cost >= 0),
    created_at    BIGINT  NOT NULL,
    -- when a pending one counts as abandoned (recovery refunds it)
    deadline_at   BIGINT  NOT NULL,
    finished_at   BIGINT,
    -- the usage the model reported
    prompt_tokens BIGINT,
    total_tokens  BIGINT
);

CREATE INDEX embeddings_pending ON embeddings (id) WHERE status = 'pending';

DROP TRIGGER chat_reserves_its_cost;
DROP TRIGGER failed_chat_is_refunded;

ALTER TABLE ledger RENAME TO ledger_before_embeddings;

CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    amount        BIGINT  NOT NULL,
    reason        TEXT    NOT NULL
        CHECK (reason IN ('initial_grant', 'chat_reservation', 'chat_refund', 'grant',
                          'embedding', 'embedding_refund')),
    chat_id       INTEGER REFERENCES chats (id) ON DELETE CASCADE,
    balance_after BIGINT  NOT NULL CHECK (balance_after >= 0),
    created_at    BIGINT  NOT NULL,
    embedding_id  INTEGER REFERENCES embeddings (id) ON DELETE CASCADE
);

INSERT INTO ledger (id, user_id, amount, reason, chat_id, balance_after, created_at)
SELECT id, user_id, amount, reason, chat_id, balance_after, created_at
FROM ledger_before_embeddings;

DROP TABLE ledger_before_embeddings;

CREATE INDEX ledger_user ON ledger (user_id, id);
CREATE INDEX ledger_chat ON ledger (chat_id);
CREATE INDEX ledger_embedding ON ledger (embedding_id) WHERE embedding_id IS NOT NULL;

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

-- A new embedding reserves its cost; a pending one that fails gets it back.
CREATE TRIGGER embedding_reserves_its_cost AFTER INSERT ON embeddings
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    SELECT NEW.user_id, -NEW.cost, 'embedding', NEW.id, tokens - NEW.cost, NEW.created_at
    FROM users WHERE id = NEW.user_id;
END;

CREATE TRIGGER failed_embedding_is_refunded AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NEW.status = 'failed'
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    SELECT NEW.user_id, NEW.cost, 'embedding_refund', NEW.id, tokens + NEW.cost, NEW.finished_at
    FROM users WHERE id = NEW.user_id;
END;
