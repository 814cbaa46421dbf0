-- Housekeeping for big, busy databases (BENCHMARKS.md, "Tail latency and growth").
-- Pending chats get an index of their own: `chats_status` indexed every chat by status,
-- though the one query that needs it (the recovery's stale chats) only asks for pending
-- ones. (PostgreSQL's half of this migration also tunes autovacuum, which SQLite has not.)
DROP INDEX chats_status;
CREATE INDEX chats_pending ON chats (id) WHERE status = 'pending';
