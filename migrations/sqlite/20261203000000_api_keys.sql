-- API keys: long-lived credentials for SDKs and tools, stored only as SHA-256 hashes.
-- A revoked key keeps its row (revoked_at set) so it is never accepted again.
CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT    NOT NULL,
    -- hex SHA-256 of the key; the key itself is never stored
    key_hash     TEXT    NOT NULL UNIQUE,
    -- its first 7 characters, to tell keys apart in a list
    prefix       TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);

CREATE INDEX api_keys_user ON api_keys (user_id, id);
