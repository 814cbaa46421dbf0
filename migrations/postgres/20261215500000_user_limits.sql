-- Limits per user (issue 27), set by the operator (`tokenchat user limits`), with defaults in
-- the configuration: a budget of tokens a period, the served models, requests and model
-- tokens a minute. And tokens a minute per API key (`api_keys.tpm`), counted in
-- `rate_limits` as requests a minute are.
--
-- A user's budget is counted as a key's is: a chat or embeddings call under a user budget
-- records the period it counted in (`user_budget_period_start`) and the budget in force
-- (`user_budget_tokens`: the user's own or the configuration's default, which the trigger
-- cannot read), and the trigger refuses the statement past it. Settling gives back what was
-- not charged, in that period only.

ALTER TABLE api_keys ADD COLUMN tpm BIGINT;

-- A user's own limits are one JSON object (`limits`; null: none of their own), read with
-- every credential: one column costs a look-up a fifth of what five did (BENCHMARKS.md).
-- Only what the triggers keep has columns of its own.
ALTER TABLE users ADD COLUMN limits TEXT;
ALTER TABLE users ADD COLUMN budget_spent BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN budget_period_start BIGINT;

ALTER TABLE chats ADD COLUMN user_budget_tokens BIGINT;
ALTER TABLE chats ADD COLUMN user_budget_period_start BIGINT;
ALTER TABLE embeddings ADD COLUMN user_budget_tokens BIGINT;
ALTER TABLE embeddings ADD COLUMN user_budget_period_start BIGINT;

CREATE FUNCTION call_counts_against_its_user_budget() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    over BOOLEAN;
BEGIN
    UPDATE users
    SET budget_spent = CASE WHEN budget_period_start = NEW.user_budget_period_start
                            THEN budget_spent ELSE 0 END + NEW.cost,
        budget_period_start = NEW.user_budget_period_start
    WHERE id = NEW.user_id
    RETURNING budget_spent > NEW.user_budget_tokens INTO over;
    IF over THEN
        RAISE EXCEPTION 'user_budget_exceeded';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_counts_against_its_user_budget AFTER INSERT ON chats
FOR EACH ROW WHEN (NEW.user_budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_user_budget();

CREATE TRIGGER embedding_counts_against_its_user_budget AFTER INSERT ON embeddings
FOR EACH ROW WHEN (NEW.user_budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_user_budget();

CREATE FUNCTION settled_call_frees_its_user_budget() RETURNS trigger LANGUAGE plpgsql AS $$
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
    UPDATE users SET budget_spent = budget_spent - (OLD.cost - kept)
    WHERE id = NEW.user_id AND budget_period_start = NEW.user_budget_period_start;
    RETURN NULL;
END
$$;

CREATE TRIGGER settled_chat_then_frees_its_user_budget AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status <> 'pending'
    AND NEW.user_budget_period_start IS NOT NULL
    AND (NEW.status = 'failed' OR NEW.refunded OR NEW.cost < OLD.cost))
EXECUTE FUNCTION settled_call_frees_its_user_budget();

CREATE TRIGGER settled_embedding_then_frees_its_user_budget AFTER UPDATE OF status ON embeddings
FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status <> 'pending'
    AND NEW.user_budget_period_start IS NOT NULL
    AND (NEW.status = 'failed' OR NEW.cost < OLD.cost))
EXECUTE FUNCTION settled_call_frees_its_user_budget();
