-- Each agent's pending requests, counted in the transactions that queue and
-- decide them, so `max_pending` is checked inside the insert transaction
-- (one limit however many processes share the database) and costs one row
-- read, not a count over the pending requests.
CREATE TABLE IF NOT EXISTS agent_pending (
    agent   TEXT PRIMARY KEY,
    pending INTEGER NOT NULL CHECK (pending >= 0)
);

INSERT INTO agent_pending (agent, pending)
SELECT agent, COUNT(*) FROM requests WHERE state = 'pending' GROUP BY agent
ON CONFLICT (agent) DO UPDATE SET pending = excluded.pending;
