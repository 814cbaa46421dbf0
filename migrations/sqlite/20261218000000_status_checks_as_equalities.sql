-- The status CHECKs of `chats` and `embeddings` written as equalities (issue 23). SQLite
-- evaluates `status IN (three or more constants)` by building a temporary B-tree of the
-- constants, once per statement: every chat's reservation and settlement built one. The
-- ledger's CHECK was rewritten the same way in 20261211000000_prices.
--
-- The tables are not rebuilt: a CHECK is not stored in any row, so SQLite's documented
-- procedure for changing one edits the table's definition in `sqlite_schema`
-- (https://sqlite.org/lang_altertable.html, "Making Other Kinds Of Table Schema Changes").
-- Rebuilding `chats` would mean recreating its eleven triggers in their firing order and the
-- ledger's foreign keys, for the same result. The two conditions are equivalent for every
-- value, NULL included, so no row can pass one and fail the other.
--
-- `status_checks_rewritten` makes the migration fail (and roll back) unless both
-- definitions changed; creating it also moves the schema's version on, so every open
-- connection reads the new definitions, and `writable_schema = RESET` makes this one read
-- them again.

PRAGMA writable_schema = ON;

UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (status IN (''pending'', ''answered'', ''failed'', ''abandoned''))',
       'CHECK (status = ''pending'' OR status = ''answered'' OR status = ''failed''
               OR status = ''abandoned'')')
 WHERE type = 'table' AND name = 'chats';

UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (status IN (''pending'', ''answered'', ''failed''))',
       'CHECK (status = ''pending'' OR status = ''answered'' OR status = ''failed'')')
 WHERE type = 'table' AND name = 'embeddings';

CREATE TABLE status_checks_rewritten (tables INTEGER NOT NULL CHECK (tables = 2));
INSERT INTO status_checks_rewritten
SELECT count(*) FROM sqlite_schema
 WHERE type = 'table' AND name IN ('chats', 'embeddings')
   AND sql LIKE '%status = ''failed''%' AND sql NOT LIKE '%status IN%';
DROP TABLE status_checks_rewritten;

PRAGMA writable_schema = RESET;
