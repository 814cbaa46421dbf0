-- A budget's period never goes back (issue 27, found in review). The period a call counts in
-- is chosen by its instance's clock before the reservation; a call chosen just before
-- midnight could land after one of the new day, and the counting triggers, which started
-- afresh whenever the period differed, went back to the old day, forgetting the new day's
-- spending. Now a call counts in the later of its own period and the budget's, and records
-- the one it counted in, so settlement gives back to that same period and the audit adds it
-- there.
--
-- The user's triggers are created first: SQLite fires the newest trigger of an event first,
-- so a call over both budgets is refused for its key's, as on PostgreSQL (whose triggers
-- fire in the order of their names).
--
-- On SQLite, whose one writer runs reservations one at a time, the reservation's statement
-- records the later period itself (`db::chats::reserve`); these triggers also never move a
-- budget's period back, should a row ever arrive with an older one.

DROP TRIGGER chat_counts_against_its_key_budget;
DROP TRIGGER embedding_counts_against_its_key_budget;
DROP TRIGGER chat_counts_against_its_user_budget;
DROP TRIGGER embedding_counts_against_its_user_budget;

CREATE TRIGGER chat_counts_against_its_user_budget AFTER INSERT ON chats
WHEN NEW.user_budget_period_start IS NOT NULL
BEGIN
    UPDATE users
    SET budget_spent = CASE WHEN budget_period_start IS NULL
                              OR NEW.user_budget_period_start > budget_period_start
                            THEN 0 ELSE budget_spent END + NEW.cost,
        budget_period_start = MAX(COALESCE(budget_period_start, NEW.user_budget_period_start),
                                  NEW.user_budget_period_start)
    WHERE id = NEW.user_id;
    SELECT RAISE(ABORT, 'user_budget_exceeded') FROM users
    WHERE id = NEW.user_id AND budget_spent > NEW.user_budget_tokens;
END;

CREATE TRIGGER embedding_counts_against_its_user_budget AFTER INSERT ON embeddings
WHEN NEW.user_budget_period_start IS NOT NULL
BEGIN
    UPDATE users
    SET budget_spent = CASE WHEN budget_period_start IS NULL
                              OR NEW.user_budget_period_start > budget_period_start
                            THEN 0 ELSE budget_spent END + NEW.cost,
        budget_period_start = MAX(COALESCE(budget_period_start, NEW.user_budget_period_start),
                                  NEW.user_budget_period_start)
    WHERE id = NEW.user_id;
    SELECT RAISE(ABORT, 'user_budget_exceeded') FROM users
    WHERE id = NEW.user_id AND budget_spent > NEW.user_budget_tokens;
END;

CREATE TRIGGER chat_counts_against_its_key_budget AFTER INSERT ON chats
WHEN NEW.budget_period_start IS NOT NULL
BEGIN
    UPDATE api_keys
    SET budget_spent = CASE WHEN budget_period_start IS NULL
                              OR NEW.budget_period_start > budget_period_start
                            THEN 0 ELSE budget_spent END + NEW.cost,
        budget_period_start = MAX(COALESCE(budget_period_start, NEW.budget_period_start),
                                  NEW.budget_period_start)
    WHERE id = NEW.api_key_id;
    SELECT RAISE(ABORT, 'budget_exceeded') FROM api_keys
    WHERE id = NEW.api_key_id AND budget_tokens IS NOT NULL AND budget_spent > budget_tokens;
END;

CREATE TRIGGER embedding_counts_against_its_key_budget AFTER INSERT ON embeddings
WHEN NEW.budget_period_start IS NOT NULL
BEGIN
    UPDATE api_keys
    SET budget_spent = CASE WHEN budget_period_start IS NULL
                              OR NEW.budget_period_start > budget_period_start
                            THEN 0 ELSE budget_spent END + NEW.cost,
        budget_period_start = MAX(COALESCE(budget_period_start, NEW.budget_period_start),
                                  NEW.budget_period_start)
    WHERE id = NEW.api_key_id;
    SELECT RAISE(ABORT, 'budget_exceeded') FROM api_keys
    WHERE id = NEW.api_key_id AND budget_tokens IS NOT NULL AND budget_spent > budget_tokens;
END;

