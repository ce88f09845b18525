-- The lethal-trifecta guard keeps each call's capabilities on its row
-- (`caps`: 1 reads_private_data, 2 sees_untrusted_input, 4
-- communicates_externally), so its history needs no config lookup and
-- survives restarts and config edits. The history is per agent and per user
-- over a time window, never per task id (which the agent chooses), and is
-- read in the transaction that stores the call. One partial index per
-- capability and scope holds only tagged rows that count (approved or still
-- pending), so each lookup is one index seek and untagged calls pay nothing.
ALTER TABLE requests ADD COLUMN caps INTEGER NOT NULL DEFAULT 0;

CREATE INDEX requests_caps1_agent ON requests (agent, created_ms)
    WHERE (caps & 1) != 0 AND state IN ('approved', 'pending');
CREATE INDEX requests_caps2_agent ON requests (agent, created_ms)
    WHERE (caps & 2) != 0 AND state IN ('approved', 'pending');
CREATE INDEX requests_caps4_agent ON requests (agent, created_ms)
    WHERE (caps & 4) != 0 AND state IN ('approved', 'pending');
CREATE INDEX requests_caps1_user ON requests (user_id, created_ms)
    WHERE (caps & 1) != 0 AND state IN ('approved', 'pending');
CREATE INDEX requests_caps2_user ON requests (user_id, created_ms)
    WHERE (caps & 2) != 0 AND state IN ('approved', 'pending');
CREATE INDEX requests_caps4_user ON requests (user_id, created_ms)
    WHERE (caps & 4) != 0 AND state IN ('approved', 'pending');

-- The per-task lookup it replaces had this index; nothing reads it now.
DROP INDEX IF EXISTS requests_task;
