-- Prices per model and per token (issue 25). A priced chat reserves the most it can cost
-- and is settled to what it used: `cost` becomes the charge when it settles, `reserved`
-- keeps what was reserved, and the difference goes back in a `chat_settlement` ledger row
-- written in the same statement (the trigger settled_chat_returns_the_rest). The chat
-- keeps the snapshot of the prices it was charged at, so a later change of the price book
-- rewrites no history, and where its usage came from (the model's report, or tokenchat's
-- own count). A flat chat (no price for its model) has `reserved` = `cost` and no prices;
-- chats from before this have `reserved` NULL, which means the same. Embeddings the same.
--
-- The ledger's CHECK on `reason` grows two names, which SQLite cannot change in place: the
-- ledger is rebuilt as the pass-through migration rebuilt it, and the triggers that write
-- to it created again. Each now inserts its row with VALUES and reads the balance in a
-- subquery: an INSERT ... SELECT into a table that has triggers (the ledger has two) makes
-- SQLite gather the rows in a temporary table first, which opened and closed a B-tree on
-- every reservation, refund and settlement (callgrind: about 20k instructions each).

ALTER TABLE chats ADD COLUMN reserved BIGINT CHECK (reserved >= cost);
ALTER TABLE chats ADD COLUMN model TEXT;
ALTER TABLE chats ADD COLUMN cached_tokens BIGINT;
ALTER TABLE chats ADD COLUMN usage_source TEXT CHECK (usage_source IN ('model', 'counted'));
-- the output cap sent upstream (the client's, the model's max_output_tokens, or lowered)
ALTER TABLE chats ADD COLUMN output_cap BIGINT;
ALTER TABLE chats ADD COLUMN price_prompt BIGINT;
ALTER TABLE chats ADD COLUMN price_cached_prompt BIGINT;
ALTER TABLE chats ADD COLUMN price_completion BIGINT;
ALTER TABLE chats ADD COLUMN price_request BIGINT;

ALTER TABLE embeddings ADD COLUMN reserved BIGINT CHECK (reserved >= cost);
ALTER TABLE embeddings ADD COLUMN usage_source TEXT CHECK (usage_source IN ('model', 'counted'));
ALTER TABLE embeddings ADD COLUMN price_prompt BIGINT;
ALTER TABLE embeddings ADD COLUMN price_request BIGINT;

DROP TRIGGER chat_reserves_its_cost;
DROP TRIGGER failed_chat_is_refunded;
DROP TRIGGER embedding_reserves_its_cost;
DROP TRIGGER failed_embedding_is_refunded;

ALTER TABLE ledger RENAME TO ledger_before_prices;

CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    amount        BIGINT  NOT NULL,
    -- Written as equalities, not `reason IN (...)`: SQLite checks an IN list of more than two
    -- values by building a temporary B-tree of them for every statement that inserts a row.
    reason        TEXT    NOT NULL
        CHECK (reason = 'initial_grant' OR reason = 'chat_reservation'
               OR reason = 'chat_refund' OR reason = 'grant' OR reason = 'embedding'
               OR reason = 'embedding_refund' OR reason = 'chat_settlement'
               OR reason = 'embedding_settlement'),
    chat_id       INTEGER REFERENCES chats (id) ON DELETE CASCADE,
    balance_after BIGINT  NOT NULL CHECK (balance_after >= 0),
    created_at    BIGINT  NOT NULL,
    embedding_id  INTEGER REFERENCES embeddings (id) ON DELETE CASCADE
);

INSERT INTO ledger (id, user_id, amount, reason, chat_id, balance_after, created_at, embedding_id)
SELECT id, user_id, amount, reason, chat_id, balance_after, created_at, embedding_id
FROM ledger_before_prices;

DROP TABLE ledger_before_prices;

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
    VALUES (NEW.user_id, -NEW.cost, 'chat_reservation', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) - NEW.cost, NEW.created_at);
END;

-- A refund gives back the whole reservation, whatever the row's cost says by then.
CREATE TRIGGER failed_chat_is_refunded AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending'
    AND (NEW.status = 'failed' OR (NEW.status = 'abandoned' AND NEW.refunded))
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost, 'chat_refund', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost, NEW.finished_at);
    DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
END;

-- A charged chat settled below its reservation gets the rest back.
CREATE TRIGGER settled_chat_returns_the_rest AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending' AND NEW.cost < OLD.cost
    AND (NEW.status = 'answered' OR (NEW.status = 'abandoned' AND NOT NEW.refunded))
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost - NEW.cost, 'chat_settlement', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost - NEW.cost,
            NEW.finished_at);
END;

CREATE TRIGGER embedding_reserves_its_cost AFTER INSERT ON embeddings
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, -NEW.cost, 'embedding', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) - NEW.cost, NEW.created_at);
END;

CREATE TRIGGER failed_embedding_is_refunded AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NEW.status = 'failed'
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost, 'embedding_refund', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost, NEW.finished_at);
END;

CREATE TRIGGER settled_embedding_returns_the_rest AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NEW.status = 'answered' AND NEW.cost < OLD.cost
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost - NEW.cost, 'embedding_settlement', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost - NEW.cost,
            NEW.finished_at);
END;
