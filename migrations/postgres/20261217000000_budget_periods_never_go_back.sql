-- A budget's period never goes back (issue 27, found in review). The period a call counts in
-- is chosen by its instance's clock before the reservation; a call chosen just before
-- midnight (or on an instance whose clock is behind) could land after one of the new day,
-- and the counting triggers, which started afresh whenever the period differed, went back
-- to the old day, forgetting the new day's spending. Now a call counts in the later of its
-- own period and the budget's, and records the one it counted in, so settlement gives back
-- to that same period and the audit adds it there.
--
-- On PostgreSQL the counting moves to BEFORE INSERT triggers, which may set the row's
-- period under the row lock of the key or user. Their names sort after
-- `*_locks_its_payer`, so a reservation still locks its payer's row first, then its key's,
-- as settlement does.

CREATE OR REPLACE FUNCTION call_counts_against_its_key_budget() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    over BOOLEAN;
    counted_in BIGINT;
BEGIN
    UPDATE api_keys
    SET budget_spent = CASE WHEN budget_period_start IS NULL
                              OR NEW.budget_period_start > budget_period_start
                            THEN 0 ELSE budget_spent END + NEW.cost,
        budget_period_start = GREATEST(budget_period_start, NEW.budget_period_start)
    WHERE id = NEW.api_key_id
    RETURNING budget_tokens IS NOT NULL AND budget_spent > budget_tokens, budget_period_start
    INTO over, counted_in;
    IF over THEN
        RAISE EXCEPTION 'budget_exceeded';
    END IF;
    NEW.budget_period_start := COALESCE(counted_in, NEW.budget_period_start);
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION call_counts_against_its_user_budget() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    over BOOLEAN;
    counted_in BIGINT;
BEGIN
    UPDATE users
    SET budget_spent = CASE WHEN budget_period_start IS NULL
                              OR NEW.user_budget_period_start > budget_period_start
                            THEN 0 ELSE budget_spent END + NEW.cost,
        budget_period_start = GREATEST(budget_period_start, NEW.user_budget_period_start)
    WHERE id = NEW.user_id
    RETURNING budget_spent > NEW.user_budget_tokens, budget_period_start
    INTO over, counted_in;
    IF over THEN
        RAISE EXCEPTION 'user_budget_exceeded';
    END IF;
    NEW.user_budget_period_start := COALESCE(counted_in, NEW.user_budget_period_start);
    RETURN NEW;
END
$$;

DROP TRIGGER chat_counts_against_its_key_budget ON chats;
DROP TRIGGER embedding_counts_against_its_key_budget ON embeddings;
DROP TRIGGER chat_counts_against_its_user_budget ON chats;
DROP TRIGGER embedding_counts_against_its_user_budget ON embeddings;

CREATE TRIGGER chat_then_counts_against_its_key_budget BEFORE INSERT ON chats
FOR EACH ROW WHEN (NEW.budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_key_budget();

CREATE TRIGGER embedding_then_counts_against_its_key_budget BEFORE INSERT ON embeddings
FOR EACH ROW WHEN (NEW.budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_key_budget();

CREATE TRIGGER chat_then_counts_against_its_user_budget BEFORE INSERT ON chats
FOR EACH ROW WHEN (NEW.user_budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_user_budget();

CREATE TRIGGER embedding_then_counts_against_its_user_budget BEFORE INSERT ON embeddings
FOR EACH ROW WHEN (NEW.user_budget_period_start IS NOT NULL)
EXECUTE FUNCTION call_counts_against_its_user_budget();
