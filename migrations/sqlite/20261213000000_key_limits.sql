-- Limits per API key (issue 27), the first of them: the served models a key may ask for
-- (a JSON array of names; null: every model) and when it stops working (Unix seconds;
-- null: never, until revoked).

ALTER TABLE api_keys ADD COLUMN models TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
