-- migrations/sqlite/20261211000000_prices.sql for PostgreSQL: a priced chat or embeddings
-- call reserves the most it can cost and is settled to what it used (`cost` becomes the
-- charge, `reserved` keeps the reservation, the rest goes back in a settlement row written
-- by a trigger in the same statement), with the prices it was charged at and where its
-- usage came from.
ALTER TABLE chats ADD COLUMN reserved BIGINT CHECK (reserved >= cost);
ALTER TABLE chats ADD COLUMN model TEXT;
ALTER TABLE chats ADD COLUMN cached_tokens BIGINT;
ALTER TABLE chats ADD COLUMN usage_source TEXT CHECK (usage_source IN ('model', 'counted'));
ALTER TABLE chats ADD COLUMN output_cap BIGINT;
ALTER TABLE chats ADD COLUMN price_prompt BIGINT;
ALTER TABLE chats ADD COLUMN price_cached_prompt BIGINT;
ALTER TABLE chats ADD COLUMN price_completion BIGINT;
ALTER TABLE chats ADD COLUMN price_request BIGINT;

ALTER TABLE embeddings ADD COLUMN reserved BIGINT CHECK (reserved >= cost);
ALTER TABLE embeddings ADD COLUMN usage_source TEXT CHECK (usage_source IN ('model', 'counted'));
ALTER TABLE embeddings ADD COLUMN price_prompt BIGINT;
ALTER TABLE embeddings ADD COLUMN price_request BIGINT;

ALTER TABLE ledger DROP CONSTRAINT ledger_reason_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_reason_check
    CHECK (reason IN ('initial_grant', 'chat_reservation', 'chat_refund', 'grant',
                      'embedding', 'embedding_refund', 'chat_settlement',
                      'embedding_settlement')) NOT VALID;
ALTER TABLE ledger VALIDATE CONSTRAINT ledger_reason_check;

-- A refund gives back the whole reservation, whatever the row's cost says by then.
CREATE OR REPLACE FUNCTION failed_chat_is_refunded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost, 'chat_refund', NEW.id, 0, NEW.finished_at);
    DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION failed_embedding_is_refunded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost, 'embedding_refund', NEW.id, 0, NEW.finished_at);
    RETURN NULL;
END
$$;

-- A charged chat settled below its reservation gets the rest back (balance_after is set by
-- ledger_moves_balance).
CREATE FUNCTION settled_chat_returns_the_rest() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost - NEW.cost, 'chat_settlement', NEW.id, 0, NEW.finished_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER settled_chat_returns_the_rest AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.cost < OLD.cost
    AND (NEW.status = 'answered' OR (NEW.status = 'abandoned' AND NOT NEW.refunded)))
EXECUTE FUNCTION settled_chat_returns_the_rest();

CREATE FUNCTION settled_embedding_returns_the_rest() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost - NEW.cost, 'embedding_settlement', NEW.id, 0,
            NEW.finished_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER settled_embedding_returns_the_rest AFTER UPDATE OF status ON embeddings
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status = 'answered' AND NEW.cost < OLD.cost)
EXECUTE FUNCTION settled_embedding_returns_the_rest();
