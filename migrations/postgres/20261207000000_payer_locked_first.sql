-- A new chat locks its payer's row before anything else touches it (BENCHMARKS.md, "Row
-- locks that no reader can see past"). Inserting a chat checks its foreign key to `users`,
-- which takes a KEY SHARE lock on the user's row; that lock does not conflict with another
-- chat's, so a busy user's concurrent chats all held one while the first of them updated
-- the balance, and PostgreSQL recorded the row's new version with a MultiXact. An index scan
-- can hint an old version dead only when it knows who deleted it, and it does not look a
-- MultiXact up, so every old version of a busy user's row stayed in the way of every read
-- of that row until VACUUM came (the big database's `/balance` fell to a third of the empty
-- one's). Taking the row lock first, as the balance update would anyway, makes the foreign
-- key checks that follow share the lock this transaction already holds, and old versions
-- carry one plain transaction id that readers can hint away.
CREATE FUNCTION chat_locks_its_payer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM users WHERE id = NEW.user_id FOR NO KEY UPDATE;
    RETURN NEW;
END
$$;

CREATE TRIGGER chat_locks_its_payer BEFORE INSERT ON chats
FOR EACH ROW EXECUTE FUNCTION chat_locks_its_payer();
