-- Agents' bearer tokens for connections over TCP (as migrations/sqlite
-- 0009). The token handed out is `kt_<id>_<secret>`; only the secret's
-- SHA-256 (hex) is kept. A token is live while revoked_ms is NULL and
-- expires_ms is NULL or in the future.
CREATE TABLE agent_tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    agent       TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    expires_ms  BIGINT,
    revoked_ms  BIGINT
);
CREATE INDEX agent_tokens_agent ON agent_tokens (agent);
