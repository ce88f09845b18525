-- Start-up counts each agent's pending requests (`max_pending` is then kept
-- in memory). Without this index the count visits every pending row in the
-- table: measured 0.6 s with 100,000 pending. Only pending rows are indexed,
-- so calls the policy decides alone never touch it.
CREATE INDEX IF NOT EXISTS requests_pending_agent ON requests (agent) WHERE state = 'pending';
