-- Housekeeping for big, busy databases (BENCHMARKS.md, "Tail latency and growth").
--
-- 1. Pending chats get an index of their own. `chats_status` indexed every chat by status,
--    so settling a chat (pending -> answered) added an entry to it for each new row version:
--    190 MB on 5,000,000 chats, for a query (the recovery's stale chats) that only ever
--    asks for pending ones. The partial index holds just the chats in flight.
DROP INDEX chats_status;
CREATE INDEX chats_pending ON chats (id) WHERE status = 'pending';

-- 2. Vacuum and analyze the busy tables after a small share of changed rows (0.5%, at
--    least 1,000; inserts alone: 1%) instead of PostgreSQL's 20% (10% for statistics):
--    by default 5,000,000 chats wait for a million dead rows before they are vacuumed, and
--    a busy user's row versions and index entries pile up in the meantime: the big database's `/balance` fell to a quarter of the empty one's rate
--    over three benchmark runs, and a manual VACUUM brought it back.
ALTER TABLE users SET (
    autovacuum_vacuum_scale_factor = 0.005, autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.005, autovacuum_analyze_threshold = 1000);
ALTER TABLE chats SET (
    autovacuum_vacuum_scale_factor = 0.005, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.005, autovacuum_analyze_threshold = 1000);
ALTER TABLE ledger SET (
    autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.005, autovacuum_analyze_threshold = 1000);
ALTER TABLE conversations SET (
    autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.005, autovacuum_analyze_threshold = 1000);
