-- Time-boxed grants, added by an approver with "Allow for…" while approving
-- one request: one agent, one exact tool, narrowed by `kind` (`call`: this
-- args_hash; `agent-tool`; `agent-tool-user`: this user_id). `expires_ms`
-- NULL means until revoked. Rows past their expiry are ignored at their
-- instant by the policy (no sweep needed). Times are epoch milliseconds.
CREATE TABLE timed_grants (
    id             TEXT PRIMARY KEY NOT NULL,
    agent          TEXT NOT NULL,
    tool           TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('call', 'agent-tool', 'agent-tool-user')),
    user_id        TEXT,
    args_hash      TEXT,
    expires_ms     BIGINT,
    created_by     TEXT NOT NULL,
    created_ms     BIGINT NOT NULL,
    origin_request TEXT NOT NULL,
    by_admin       BIGINT NOT NULL,
    CHECK (kind <> 'call' OR args_hash IS NOT NULL),
    CHECK (kind <> 'agent-tool-user' OR user_id IS NOT NULL)
);
