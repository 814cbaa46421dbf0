-- A priced call's reservation is a hold on the balance, not a ledger row (issue 25). A
-- priced chat or embeddings call reserves the most it can cost and nearly always settles
-- below it, so reserving in the ledger wrote two rows a call (the reservation, then the
-- rest given back), each with its two index entries and its log frames: the second row was
-- the whole difference between priced and flat throughput (BENCHMARKS.md). Now:
--
-- - `users.held` is what the user's priced calls in flight have reserved. The balance a
--   call may spend is `tokens - held`, and `CHECK (held <= tokens)` makes that exact on
--   both backends, whoever writes (on PostgreSQL a reservation that lost a race fails it,
--   as a ledger row below zero did).
-- - A call with `held` set reserves by adding its cost to `users.held`, and ends by taking
--   it off again in the statement that settles it; a charged call (answered, or abandoned
--   and not refunded) then writes one ledger row, `chat_charge` or `embedding_charge`, of
--   minus its charge. A refunded call writes no row: nothing of the balance moved.
-- - `users.tokens` stays the sum of the ledger, and the ledger's rows still each move it.
--
-- Calls reserved before this (and flat calls, which are charged what they reserve) keep
-- `held` false and the triggers of before, so a call pending across the upgrade settles as
-- it was reserved.
--
-- The ledger's CHECK on `reason` gains the two names by SQLite's documented procedure for
-- changing a CHECK (see 20261218000000_status_checks_as_equalities): `charges_allowed`
-- makes the migration fail unless the definition changed.
--
-- The same edit drops the ledger's AUTOINCREMENT. A held call's charge row is written in
-- the statement that settles it, the call's second commit, and with AUTOINCREMENT every
-- ledger row also rewrote `sqlite_sequence`'s page: one more page to the log in every
-- priced settlement, 3 to 4 points of priced `/chat` throughput (BENCHMARKS.md).
-- AUTOINCREMENT only keeps the ids of deleted rows from being given again, and no ledger
-- row is ever deleted (nor the users and chats they cascade from: a deleted conversation's
-- chats are erased, not deleted), so a new row's id, the largest plus one, is what it was.
-- The table's pages are the same either way; only the rule for the next id changes, and
-- the ledger's row in `sqlite_sequence` goes.

PRAGMA writable_schema = ON;

UPDATE sqlite_schema
   SET sql = replace(replace(sql,
       'OR reason = ''embedding_settlement''),',
       'OR reason = ''embedding_settlement''
               OR reason = ''chat_charge'' OR reason = ''embedding_charge''),'),
       'INTEGER PRIMARY KEY AUTOINCREMENT', 'INTEGER PRIMARY KEY')
 WHERE type = 'table' AND name = 'ledger';

CREATE TABLE charges_allowed (tables INTEGER NOT NULL CHECK (tables = 1));
INSERT INTO charges_allowed
SELECT count(*) FROM sqlite_schema
 WHERE type = 'table' AND name = 'ledger' AND sql LIKE '%reason = ''embedding_charge''%'
   AND sql NOT LIKE '%AUTOINCREMENT%';
DROP TABLE charges_allowed;

PRAGMA writable_schema = RESET;

DELETE FROM sqlite_sequence WHERE name = 'ledger';

ALTER TABLE users ADD COLUMN held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= tokens);
ALTER TABLE chats ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE embeddings ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;

DROP TRIGGER chat_reserves_its_cost;
DROP TRIGGER failed_chat_is_refunded;
DROP TRIGGER settled_chat_returns_the_rest;
DROP TRIGGER embedding_reserves_its_cost;
DROP TRIGGER failed_embedding_is_refunded;
DROP TRIGGER settled_embedding_returns_the_rest;

-- The triggers of 20261211000000_prices, for calls that are not held.
CREATE TRIGGER chat_reserves_its_cost AFTER INSERT ON chats
WHEN NOT NEW.held
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, -NEW.cost, 'chat_reservation', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) - NEW.cost, NEW.created_at);
END;

CREATE TRIGGER failed_chat_is_refunded AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending' AND NOT NEW.held
    AND (NEW.status = 'failed' OR (NEW.status = 'abandoned' AND NEW.refunded))
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost, 'chat_refund', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost, NEW.finished_at);
    DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
END;

CREATE TRIGGER settled_chat_returns_the_rest AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending' AND NOT NEW.held AND NEW.cost < OLD.cost
    AND (NEW.status = 'answered' OR (NEW.status = 'abandoned' AND NOT NEW.refunded))
BEGIN
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost - NEW.cost, 'chat_settlement', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost - NEW.cost,
            NEW.finished_at);
END;

CREATE TRIGGER embedding_reserves_its_cost AFTER INSERT ON embeddings
WHEN NOT NEW.held
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, -NEW.cost, 'embedding', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) - NEW.cost, NEW.created_at);
END;

CREATE TRIGGER failed_embedding_is_refunded AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NOT NEW.held AND NEW.status = 'failed'
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost, 'embedding_refund', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost, NEW.finished_at);
END;

CREATE TRIGGER settled_embedding_returns_the_rest AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NOT NEW.held AND NEW.status = 'answered'
    AND NEW.cost < OLD.cost
BEGIN
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, OLD.cost - NEW.cost, 'embedding_settlement', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) + OLD.cost - NEW.cost,
            NEW.finished_at);
END;

-- Held calls. The hold is let go of before the charge is written: the charge moves
-- `tokens` below `held` whenever the balance was all held.
CREATE TRIGGER chat_holds_its_reservation AFTER INSERT ON chats
WHEN NEW.held
BEGIN
    UPDATE users SET held = held + NEW.cost WHERE id = NEW.user_id;
END;

CREATE TRIGGER held_chat_is_charged AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending' AND NEW.held
    AND (NEW.status = 'answered' OR (NEW.status = 'abandoned' AND NOT NEW.refunded))
BEGIN
    UPDATE users SET held = held - OLD.cost WHERE id = NEW.user_id;
    INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
    VALUES (NEW.user_id, -NEW.cost, 'chat_charge', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) - NEW.cost, NEW.finished_at);
END;

CREATE TRIGGER held_chat_is_released AFTER UPDATE OF status ON chats
WHEN OLD.status = 'pending' AND NEW.held
    AND (NEW.status = 'failed' OR (NEW.status = 'abandoned' AND NEW.refunded))
BEGIN
    UPDATE users SET held = held - OLD.cost WHERE id = NEW.user_id;
    DELETE FROM idempotency_keys WHERE chat_id = NEW.id;
END;

CREATE TRIGGER embedding_holds_its_reservation AFTER INSERT ON embeddings
WHEN NEW.held
BEGIN
    UPDATE users SET held = held + NEW.cost WHERE id = NEW.user_id;
END;

CREATE TRIGGER held_embedding_is_charged AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NEW.held AND NEW.status = 'answered'
BEGIN
    UPDATE users SET held = held - OLD.cost WHERE id = NEW.user_id;
    INSERT INTO ledger (user_id, amount, reason, embedding_id, balance_after, created_at)
    VALUES (NEW.user_id, -NEW.cost, 'embedding_charge', NEW.id,
            (SELECT tokens FROM users WHERE id = NEW.user_id) - NEW.cost, NEW.finished_at);
END;

CREATE TRIGGER held_embedding_is_released AFTER UPDATE OF status ON embeddings
WHEN OLD.status = 'pending' AND NEW.held AND NEW.status = 'failed'
BEGIN
    UPDATE users SET held = held - OLD.cost WHERE id = NEW.user_id;
END;
