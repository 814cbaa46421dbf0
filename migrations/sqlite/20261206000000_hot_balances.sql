-- PostgreSQL's half of this migration leaves room on each page of `users` for balance
-- updates (its fillfactor); SQLite rewrites a row in place and has no such setting.
SELECT 1;
