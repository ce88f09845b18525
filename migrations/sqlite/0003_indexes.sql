-- Indexes that no query used cost a page write per commit (the group
-- commit's WAL writes dominated the write path): drop them. The per-agent
-- pending count is kept in memory; audit rows are read by seq only.
DROP INDEX IF EXISTS requests_created;
DROP INDEX IF EXISTS requests_pending_agent;
DROP INDEX IF EXISTS audit_request;

-- The lethal-trifecta guard reads a task's approved tools on every call
-- with a task id; only rows that have one are indexed.
CREATE INDEX IF NOT EXISTS requests_task ON requests (agent, task_id)
    WHERE task_id IS NOT NULL;
