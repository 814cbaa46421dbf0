-- A budget per API key (issue 27): at most `budget_tokens` charged in each period
-- (`budget_period`: day, week or month in UTC, or total), reservations in flight included.
-- `budget_spent` is what the period that began at `budget_period_start` (Unix seconds; 0 for
-- total) has spent. A chat or embeddings call of a key with a budget records the key and the
-- period it counted in; the trigger that counts it refuses the statement when the budget
-- would be passed, so the check and the reservation are one statement, as the balance's are.
-- The trigger's UPDATE takes the key's row lock and reads its latest version, so concurrent
-- calls from any number of processes queue on that row and each sees the others' spending.
-- Settling gives back what was reserved and not charged, in that period only.
-- Lock order: a reservation locks the payer's row first (chat_locks_its_payer) and the key's
-- after; a settlement locks the payer's row in its ledger trigger, and the key's in one whose
-- name sorts after it (PostgreSQL fires triggers by name), so no two calls wait on each
-- other in opposite orders.

ALTER TABLE api_keys ADD COLUMN budget_tokens BIGINT;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT;
ALTER TABLE api_keys ADD COLUMN budget_spent BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN budget_period_start BIGINT;
ALTER TABLE chats ADD COLUMN api_key_id BIGINT;
ALTER TABLE chats ADD COLUMN budget_period_start BIGINT;
ALTER TABLE embeddings ADD COLUMN api_key_id BIGINT;
ALTER TABLE embeddings ADD COLUMN budget_period_start BIGINT;

CREATE FUNCTION call_counts_against_its_key_budget() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    over BOOLEAN;
BEGIN
    UPDATE api_keys
    SET budget_spent = CASE WHEN budget_period_start = NEW.budget_period_start
                            THEN budget_spent ELSE 0 END + NEW.cost,
        budget_period_start = NEW.budget_period_start
    WHERE id = NEW.api_key_id
    RETURNING budget_tokens IS NOT NULL AND budget_spent > budget_tokens INTO over;
    IF over THEN
        RAISE EXCEPTION 'budget_exceeded';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_counts_against_its_key_budget AFTER INSERT ON chats
FOR EACH ROW WHEN (NEW.budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_key_budget();

CREATE TRIGGER embedding_counts_against_its_key_budget AFTER INSERT ON embeddings
FOR EACH ROW WHEN (NEW.budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_key_budget();

-- What a settled call keeps of its reservation: nothing once failed (or, a chat, refunded),
-- else its cost; the rest goes back to its key's budget.
CREATE FUNCTION settled_call_frees_its_key_budget() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kept BIGINT := NEW.cost;
BEGIN
    IF NEW.status = 'failed' THEN
        kept := 0;
    ELSIF TG_TABLE_NAME = 'chats' THEN
        IF NEW.refunded THEN
            kept := 0;
        END IF;
    END IF;
    UPDATE api_keys SET budget_spent = budget_spent - (OLD.cost - kept)
    WHERE id = NEW.api_key_id AND budget_period_start = NEW.budget_period_start;
    RETURN NULL;
END
$$;

CREATE TRIGGER settled_chat_then_frees_its_key_budget AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status <> 'pending'
    AND NEW.budget_period_start IS NOT NULL
    AND (NEW.status = 'failed' OR NEW.refunded OR NEW.cost < OLD.cost))
EXECUTE FUNCTION settled_call_frees_its_key_budget();

CREATE TRIGGER settled_embedding_then_frees_its_key_budget AFTER UPDATE OF status ON embeddings
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status <> 'pending'
    AND NEW.budget_period_start IS NOT NULL
    AND (NEW.status = 'failed' OR NEW.cost < OLD.cost))
EXECUTE FUNCTION settled_call_frees_its_key_budget();
