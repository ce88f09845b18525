-- Edit, then approve (as migrations/sqlite 0014): an approver may approve a
-- request with edited arguments. `args`/`args_hash` (and `run_plan`) then
-- hold the edited call (arguments masked as always; the hash over the full
-- edited arguments), and the call as submitted is kept here: its masked
-- arguments, its hash, who edited it and when (epoch milliseconds). All
-- NULL for a request that was not edited.
ALTER TABLE requests ADD COLUMN original_args TEXT;
ALTER TABLE requests ADD COLUMN original_args_hash TEXT;
ALTER TABLE requests ADD COLUMN edited_by TEXT;
ALTER TABLE requests ADD COLUMN edited_ms BIGINT;
