-- Nothing to change on PostgreSQL: the SQLite migration of this version rewrites two CHECKs
-- whose IN lists SQLite evaluated with a temporary B-tree per statement (issue 23).
-- PostgreSQL evaluates `status IN (...)` as a plain comparison with each constant.
SELECT 1;
