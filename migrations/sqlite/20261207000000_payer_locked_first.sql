-- PostgreSQL's half of this migration makes a new chat lock its payer's row before its
-- foreign key checks; SQLite's one writer at a time takes no row locks.
SELECT 1;
