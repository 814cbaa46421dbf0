-- Streaming. A streamed chat whose client went away before the model finished is
-- 'abandoned', and charged or refunded by ABANDONED_STREAM_CHARGE: `refunded` says which
-- (a failed chat is always refunded). Every chat keeps the usage the model reported.
ALTER TABLE chats DROP CONSTRAINT chats_status_check;
ALTER TABLE chats ADD CONSTRAINT chats_status_check
    CHECK (status IN ('pending', 'answered', 'failed', 'abandoned'));
ALTER TABLE chats ADD COLUMN refunded BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE chats ADD COLUMN prompt_tokens BIGINT;
ALTER TABLE chats ADD COLUMN completion_tokens BIGINT;
UPDATE chats SET refunded = TRUE WHERE status = 'failed';

-- A refunded abandoned chat is refunded like a failed one.
DROP TRIGGER failed_chat_is_refunded ON chats;
CREATE TRIGGER failed_chat_is_refunded AFTER UPDATE OF status ON chats
FOR EACH ROW WHEN (OLD.status = 'pending'
    AND (NEW.status = 'failed' OR (NEW.status = 'abandoned' AND NEW.refunded)))
EXECUTE FUNCTION failed_chat_is_refunded();
