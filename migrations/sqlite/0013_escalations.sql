-- The escalation ladder: one row per (request, step) fired, claimed before
-- anyone is pinged, so a step never pings twice (across a restart or a
-- change of leader). `targets` is JSON ({"roles": [...], "users": [...]}).
-- `sent_ms` is NULL until the step's message(s) reached Discord; a claim
-- left unsent by a crash is resent with the same message nonce. Times are
-- epoch milliseconds.
CREATE TABLE escalations (
    request_id TEXT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    step       INTEGER NOT NULL CHECK (step >= 0),
    action     TEXT NOT NULL,
    targets    TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL,
    sent_ms    INTEGER,
    PRIMARY KEY (request_id, step)
);
