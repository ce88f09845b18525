-- Flood digests (see the SQLite migration 0016 for the design): when more
-- cards wait than Discord lets the bot post in time, the waiting cards of
-- one (agent, tool) are replaced by one digest message with bulk actions.
-- A request moves from its unposted card to a digest in one transaction
-- (card row deleted, member row inserted): never both, never two digests.
CREATE TABLE discord_digests (
    id               TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    channel_id       BIGINT NOT NULL,
    agent            TEXT NOT NULL,
    tool             TEXT NOT NULL,
    message_id       BIGINT,                  -- NULL until posted
    members          BIGINT NOT NULL DEFAULT 0,
    rendered         TEXT,                    -- the summary the message shows
    open_until_ms    BIGINT NOT NULL,         -- takes new requests until then
    finished         BIGINT NOT NULL DEFAULT 0, -- every member decided and shown so
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms  BIGINT NOT NULL DEFAULT 0,
    created_ms       BIGINT NOT NULL
);
CREATE INDEX discord_digests_live ON discord_digests (created_ms) WHERE finished = 0;

CREATE TABLE discord_digest_members (
    request_id TEXT COLLATE "C" PRIMARY KEY NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    digest_id  TEXT COLLATE "C" NOT NULL REFERENCES discord_digests (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL
);
CREATE UNIQUE INDEX discord_digest_members_seq ON discord_digest_members (digest_id, seq);
