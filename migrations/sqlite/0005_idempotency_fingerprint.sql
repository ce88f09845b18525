-- An idempotency key answers only the call it was first used for: the
-- fingerprint (SHA-256 over agent, tool, args_hash, user, channel, task) is
-- stored beside the key, and a reuse with a different fingerprint is refused.
-- Rows stored before this column existed have NULL here, and a reuse of
-- their key is refused too (fail closed: nothing says which call it was).
ALTER TABLE requests ADD COLUMN idempotency_fp TEXT;
