-- migrations/sqlite/20261124120000_hardening.sql for PostgreSQL: each chat records its own
-- deadline, balances stay under a ceiling, and expired login tokens can be found.

-- When a pending chat counts as abandoned: its own process's LLM_TIMEOUT_SECS plus a
-- margin, so processes with different time-outs never refund each other's live chats.
-- NULL for chats reserved before this column existed; recovery then uses its own limit.
ALTER TABLE chats ADD COLUMN deadline_at BIGINT;

CREATE INDEX login_tokens_expiry ON login_tokens (expires_at) WHERE expires_at IS NOT NULL;

-- A balance is whole tokens from 0 to 10^15 (config::MAX_BALANCE). BIGINT admits no
-- fraction and raises on overflow by itself; SQLite needs triggers for what this states.
ALTER TABLE users ADD CONSTRAINT users_tokens_within_ceiling
    CHECK (tokens <= 1000000000000000);
