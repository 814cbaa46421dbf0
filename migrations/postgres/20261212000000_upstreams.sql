-- Several upstreams serve a model (issue 26): a chat records which upstream answered it
-- (its name in the configuration, `default` for LLM_BASE_URL's) and how many targets the
-- call tried to get that answer. Null for the demo model's chats and those from before.

ALTER TABLE chats ADD COLUMN upstream TEXT;
ALTER TABLE chats ADD COLUMN attempts BIGINT;
