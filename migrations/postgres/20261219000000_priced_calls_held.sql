-- migrations/sqlite/20261219000000_priced_calls_held.sql for PostgreSQL: a priced call's
-- reservation is a hold on the balance (`users.held`), not a ledger row, and a charged call
-- writes one ledger row of minus its charge. `CHECK (held <= tokens)` is checked under the
-- user's row lock, which every hold and every ledger row takes, so a reservation that lost
-- a race for the last tokens fails it, as a ledger row below zero did. Calls reserved before
-- this, and flat calls, keep `held` false and the triggers of before.
ALTER TABLE users ADD COLUMN held BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD CONSTRAINT users_held_check CHECK (held >= 0 AND held <= tokens);
ALTER TABLE chats ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE embeddings ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;

ALTER TABLE ledger DROP CONSTRAINT ledger_reason_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_reason_check
    CHECK (reason IN ('initial_grant', 'chat_reservation', 'chat_refund', 'grant',
                      'embedding', 'embedding_refund', 'chat_settlement',
                      'embedding_settlement', 'chat_charge', 'embedding_charge')) NOT VALID;
ALTER TABLE ledger VALIDATE CONSTRAINT ledger_reason_check;

-- The triggers of before, for calls that are not held.
DROP TRIGGER chat_reserves_its_cost ON chats;
CREATE TRIGGER chat_reserves_its_cost AFTER INSERT ON chats
FOR EACH ROW WHEN (NOT NEW.held)
EXECUTE FUNCTION chat_reserves_its_cost();

DROP TRIGGER failed_chat_is_refunded ON chats;
CREATE TRIGGER failed_chat_is_refunded AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending' AND NOT NEW.held
    AND (NEW.status = 'failed' OR (NEW.status = 'abandoned' AND NEW.refunded)))
EXECUTE FUNCTION failed_chat_is_refunded();

DROP TRIGGER settled_chat_returns_the_rest ON chats;
CREATE TRIGGER settled_chat_returns_the_rest AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending' AND NOT NEW.held AND NEW.cost < OLD.cost
    AND (NEW.status = 'answered' OR (NEW.status = 'abandoned' AND NOT NEW.refunded)))
EXECUTE FUNCTION settled_chat_returns_the_rest();

DROP TRIGGER embedding_reserves_its_cost ON embeddings;
CREATE TRIGGER embedding_reserves_its_cost AFTER INSERT ON embeddings
FOR EACH ROW WHEN (NOT NEW.held)
EXECUTE FUNCTION embedding_reserves_its_cost();

DROP TRIGGER failed_embedding_is_refunded ON embeddings;
CREATE TRIGGER failed_embedding_is_refunded AFTER UPDATE OF status ON embeddings
FOR EACH ROW WHEN (OLD.status = 'pending' AND NOT NEW.held AND NEW.status = 'failed')
EXECUTE FUNCTION failed_embedding_is_refunded();

DROP TRIGGER settled_embedding_returns_the_rest ON embeddings;
CREATE TRIGGER settled_embedding_returns_the_rest AFTER UPDATE OF status ON embeddings
FOR EACH ROW WHEN (OLD.status = 'pending' AND NOT NEW.held AND NEW.status = 'answered'
    AND NEW.cost < OLD.cost)
EXECUTE FUNCTION settled_embedding_returns_the_rest();

-- Held calls: the reservation adds to the hold; the ending takes it off, and a charged call
-- then writes its charge (balance_after is set by ledger_moves_balance). The hold goes
-- first: the charge moves `tokens` below `held` whenever the balance was all held.
CREATE FUNCTION call_holds_its_reservation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET held = held + NEW.cost WHERE id = NEW.user_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_holds_its_reservation AFTER INSERT ON chats
FOR EACH ROW WHEN (NEW.held)
EXECUTE FUNCTION call_holds_its_reservation();

CREATE TRIGGER embedding_holds_its_reservation AFTER INSERT ON embeddings
FOR EACH ROW WHEN (NEW.held)
EXECUTE FUNCTION call_holds_its_reservation();

CREATE FUNCTION held_chat_is_settled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET held = held - OLD.cost WHERE id = NEW.user_id;
    IF NEW.status = 'answered' OR (NEW.status = 'abandoned' AND NOT NEW.refunded) THEN
        INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
        VALUES (NEW.user_id, -NEW.cost, 'chat_charge', NEW.id, 0, NEW.finished_at);
    ELSE
        DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER held_chat_is_settled AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status <> 'pending' AND NEW.held)
EXECUTE FUNCTION held_chat_is_settled();

CREATE FUNCTION held_embedding_is_settled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET held = held - OLD.cost WHERE id = NEW.user_id;
    IF NEW.status = 'answered' THEN
        INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
        VALUES (NEW.user_id, -NEW.cost, 'embedding_charge', NEW.id, 0, NEW.finished_at);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER held_embedding_is_settled AFTER UPDATE OF status ON embeddings
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status <> 'pending' AND NEW.held)
EXECUTE FUNCTION held_embedding_is_settled();
