-- Flood digests: when more cards wait than Discord lets the bot post in
-- time, the waiting cards of one (agent, tool) are replaced by one digest
-- message with bulk actions. A request moves from its (unposted) card to a
-- digest in one transaction: its `discord_cards` row is deleted and its
-- member row inserted, so it is never both carded and digested; the
-- primary key on `request_id` keeps it in one digest only. `seq` is the
-- order of joining: a bulk action acts on the members with `seq` up to the
-- count the clicked message showed. Times are epoch milliseconds.
CREATE TABLE discord_digests (
    id               TEXT PRIMARY KEY NOT NULL,
    channel_id       INTEGER NOT NULL,
    agent            TEXT NOT NULL,
    tool             TEXT NOT NULL,
    message_id       INTEGER,                 -- NULL until posted
    members          INTEGER NOT NULL DEFAULT 0,
    rendered         TEXT,                    -- the summary the message shows
    open_until_ms    INTEGER NOT NULL,        -- takes new requests until then
    finished         INTEGER NOT NULL DEFAULT 0, -- every member decided and shown so
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms  INTEGER NOT NULL DEFAULT 0,
    created_ms       INTEGER NOT NULL
);
CREATE INDEX discord_digests_live ON discord_digests (created_ms) WHERE finished = 0;

CREATE TABLE discord_digest_members (
    request_id TEXT PRIMARY KEY NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    digest_id  TEXT NOT NULL REFERENCES discord_digests (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL
);
CREATE UNIQUE INDEX discord_digest_members_seq ON discord_digest_members (digest_id, seq);
