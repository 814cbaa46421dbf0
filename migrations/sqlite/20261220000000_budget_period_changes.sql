-- A budget given another period moves its owner's calls made since the new period began into
-- it, and adds what they hold (`db::budget_periods`): those calls are found by their owner
-- and time, not by a walk of every call, while the owner's row is held. Partial on the
-- keys: a chat with a login token (most of them) writes no more index than before.
CREATE INDEX chats_key_created ON chats (api_key_id, created_at) WHERE api_key_id IS NOT NULL;
CREATE INDEX embeddings_key_created ON embeddings (api_key_id, created_at)
    WHERE api_key_id IS NOT NULL;
CREATE INDEX embeddings_user_created ON embeddings (user_id, created_at);
