-- Keyturn schema (PostgreSQL): the final schema of migrations/sqlite
-- 0001..0007 in one file. Times are epoch milliseconds (BIGINT), flags are
-- BOOLEAN, ids TEXT as in SQLite. Ids and keys compare bytewise
-- (COLLATE "C"), so paging by id is the same order on both backends.

CREATE TABLE requests (
    id                 TEXT COLLATE "C" PRIMARY KEY,
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
    approvals_required BIGINT NOT NULL,
    admin_only         BOOLEAN NOT NULL,
    rule               TEXT NOT NULL,
    rule_detail        TEXT NOT NULL,
    flags              TEXT NOT NULL,            -- JSON array
    created_ms         BIGINT NOT NULL,
    deadline_ms        BIGINT NOT NULL,
    state              TEXT NOT NULL,
    decided_by         TEXT,
    decided_who        TEXT,
    decided_reason     TEXT,
    decided_ms         BIGINT,
    -- SHA-256 over agent, tool, args_hash, user, channel, task (see sqlite 0005).
    idempotency_fp     TEXT,
    -- The Unix uid the request came from (see sqlite 0006).
    requester_uid      BIGINT,
    -- Trifecta capabilities: 1 reads_private_data, 2 sees_untrusted_input,
    -- 4 communicates_externally (see sqlite 0007).
    caps               BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX requests_idempotency ON requests (agent, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX requests_pending_deadline ON requests (deadline_ms) WHERE state = 'pending';
CREATE INDEX requests_pending_agent ON requests (agent) WHERE state = 'pending';

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

-- Pending requests per agent, kept in the transactions that queue and
-- resolve them, so `max_pending` holds across processes.
CREATE TABLE agent_pending (
    agent   TEXT PRIMARY KEY,
    pending BIGINT NOT NULL CHECK (pending >= 0)
);

CREATE TABLE votes (
    request_id TEXT COLLATE "C" NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    voter      TEXT NOT NULL,                   -- identity: uid:1000, discord:1234
    name       TEXT,                            -- display name only
    approve    BOOLEAN NOT NULL,
    reason     TEXT,
    at_ms      BIGINT NOT NULL,
    PRIMARY KEY (request_id, voter)
);

CREATE TABLE grants (
    scope      TEXT NOT NULL,
    tool       TEXT NOT NULL,
    effect     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (scope, tool, effect)
);

CREATE TABLE tool_risks (
    tool   TEXT PRIMARY KEY,
    risk   TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_ms BIGINT NOT NULL
);

CREATE TABLE paired_users (
    user_id      TEXT PRIMARY KEY,
    roles        TEXT NOT NULL DEFAULT '[]',     -- JSON array of role ids
    display_name TEXT,
    paired_by    TEXT NOT NULL,
    paired_ms    BIGINT NOT NULL
);

CREATE TABLE pairing_codes (
    code_hash    TEXT PRIMARY KEY,               -- sha256 of the code; the code itself is never stored
    user_id      TEXT NOT NULL UNIQUE,           -- one live code per user
    display_name TEXT,
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL
);

CREATE TABLE audit (
    seq        BIGINT PRIMARY KEY,
    at_ms      BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    actor      TEXT NOT NULL,
    request_id TEXT,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

-- The chain head, updated in the same transaction as every append. Every
-- transaction that appends locks this row first (SELECT ... FOR UPDATE), so
-- the processes sharing the database keep one unbroken chain.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- The Discord card outbox (see sqlite 0002). A process draining it claims
-- the rows it is about to post (`claimed_by`, its store's origin, until
-- `claim_until_ms`), so two processes never post the same card.
CREATE TABLE discord_cards (
    request_id      TEXT COLLATE "C" PRIMARY KEY REFERENCES requests (id) ON DELETE CASCADE,
    channel_id      BIGINT NOT NULL,
    message_id      BIGINT,                  -- NULL until posted
    rendered_state  TEXT,                    -- request state the message shows
    want            BIGINT NOT NULL DEFAULT 1,
    done            BIGINT NOT NULL DEFAULT 0,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL DEFAULT 0,
    deadline_ms     BIGINT NOT NULL,
    claimed_by      TEXT,
    claim_until_ms  BIGINT
);
CREATE INDEX discord_cards_due ON discord_cards (deadline_ms) WHERE want > done;
