-- Conversations: each chat belongs to one, and the model is sent its earlier answered
-- turns. A chat inserted without one starts its own, in the same statement (the trigger
-- chat_starts_a_conversation below): the conversation takes the id of its first chat and
-- that chat's message, trimmed and cut to 80 characters, as its title. Deleting a
-- conversation erases its chats' messages and answers (`erased_at`) but keeps the chats
-- themselves, because the ledger rows that charged them stay.
CREATE TABLE conversations (
    -- the id of its first chat
    id         BIGINT PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title      TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX conversations_user ON conversations (user_id, id);

ALTER TABLE chats ADD COLUMN conversation_id BIGINT REFERENCES conversations (id);
ALTER TABLE chats ADD COLUMN erased_at BIGINT;

CREATE INDEX chats_conversation ON chats (conversation_id, id);

CREATE FUNCTION chat_starts_a_conversation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversations (id, user_id, title, created_at)
    VALUES (NEW.id, NEW.user_id, left(btrim(NEW.message, E' \t\n\r'), 80), NEW.created_at);
    UPDATE chats SET conversation_id = NEW.id WHERE id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_starts_a_conversation AFTER INSERT ON chats
FOR EACH ROW WHEN (NEW.conversation_id IS NULL)
EXECUTE FUNCTION chat_starts_a_conversation();
