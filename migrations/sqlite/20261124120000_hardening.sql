-- Hardening: each chat records its own deadline, balances stay integers under a ceiling,
-- and expired login tokens can be found to be deleted.

-- When a pending chat counts as abandoned: its own process's LLM_TIMEOUT_SECS plus a
-- margin, so processes with different time-outs never refund each other's live chats.
-- NULL for chats reserved before this column existed; recovery then uses its own limit.
ALTER TABLE chats ADD COLUMN deadline_at BIGINT;

CREATE INDEX login_tokens_expiry ON login_tokens (expires_at) WHERE expires_at IS NOT NULL;

-- A balance is a whole number of tokens from 0 to 10^15 (config::MAX_BALANCE). SQLite
-- turns an overflowing integer sum into a REAL; these refuse that, and anything over the
-- ceiling, so a bad grant fails whole instead of corrupting the account.
CREATE TRIGGER ledger_rows_are_whole_tokens BEFORE INSERT ON ledger
WHEN typeof(NEW.amount) <> 'integer' OR typeof(NEW.balance_after) <> 'integer'
    OR NEW.balance_after > 1000000000000000
BEGIN
    SELECT RAISE(ABORT, 'ledger amounts and balances must be whole tokens within the ceiling');
END;

CREATE TRIGGER balances_are_whole_tokens BEFORE UPDATE OF tokens ON users
WHEN typeof(NEW.tokens) <> 'integer' OR NEW.tokens > 1000000000000000
BEGIN
    SELECT RAISE(ABORT, 'a balance must be whole tokens within the ceiling');
END;
