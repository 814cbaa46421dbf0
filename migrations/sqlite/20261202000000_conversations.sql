-- Conversations: each chat belongs to one, and the model is sent its earlier answered
-- turns. Deleting a conversation erases its chats' messages and answers (`erased_at`) but
-- keeps the chats themselves, because the ledger rows that charged them stay.
CREATE TABLE conversations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title      TEXT    NOT NULL,
    created_at BIGINT  NOT NULL
);

CREATE INDEX conversations_user ON conversations (user_id, id);

ALTER TABLE chats ADD COLUMN conversation_id INTEGER REFERENCES conversations (id);
ALTER TABLE chats ADD COLUMN erased_at BIGINT;

CREATE INDEX chats_conversation ON chats (conversation_id, id);
