-- Keyturn schema (SQLite). Times are epoch milliseconds.

CREATE TABLE requests (
    id                 TEXT PRIMARY KEY,
    agent              TEXT NOT NULL,
    tool               TEXT NOT NULL,
    args               TEXT NOT NULL,            -- redacted JSON
    args_hash          TEXT NOT NULL,            -- sha256 of the canonical full arguments
    user_id            TEXT,
    channel_id         TEXT,
    justification      TEXT NOT NULL,
    task_id            TEXT,
    idempotency_key    TEXT,
    risk               TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    admin_only         INTEGER NOT NULL,
    rule               TEXT NOT NULL,
    rule_detail        TEXT NOT NULL,
    flags              TEXT NOT NULL,            -- JSON array
    created_ms         INTEGER NOT NULL,
    deadline_ms        INTEGER NOT NULL,
    state              TEXT NOT NULL,
    decided_by         TEXT,
    decided_who        TEXT,
    decided_reason     TEXT,
    decided_ms         INTEGER
);
CREATE UNIQUE INDEX requests_idempotency ON requests (agent, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX requests_pending_deadline ON requests (deadline_ms) WHERE state = 'pending';
CREATE INDEX requests_pending_agent ON requests (agent) WHERE state = 'pending';
CREATE INDEX requests_created ON requests (created_ms);

CREATE TABLE votes (
    request_id TEXT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    voter      TEXT NOT NULL,                   -- identity: uid:1000, discord:1234
    name       TEXT,                            -- display name only
    approve    INTEGER NOT NULL,
    reason     TEXT,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (request_id, voter)
);

CREATE TABLE grants (
    scope      TEXT NOT NULL,
    tool       TEXT NOT NULL,
    effect     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, tool, effect)
);

CREATE TABLE tool_risks (
    tool   TEXT PRIMARY KEY,
    risk   TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_ms INTEGER NOT NULL
);

CREATE TABLE paired_users (
    user_id      TEXT PRIMARY KEY,
    roles        TEXT NOT NULL DEFAULT '[]',     -- JSON array of role ids
    display_name TEXT,
    paired_by    TEXT NOT NULL,
    paired_ms    INTEGER NOT NULL
);

CREATE TABLE pairing_codes (
    code_hash    TEXT PRIMARY KEY,               -- sha256 of the code; the code itself is never stored
    user_id      TEXT NOT NULL UNIQUE,           -- one live code per user
    display_name TEXT,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL
);

CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    at_ms      INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    actor      TEXT NOT NULL,
    request_id TEXT,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_request ON audit (request_id);

-- The chain head, updated in the same transaction as every append: a deleted
-- last row (which no row can show) is caught by comparing against it.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
