-- The Discord card outbox: one row per request that has (or needs) a card.
-- A card is due while want > done: every change to its request bumps `want`;
-- the bot sets `done` to the version it rendered once Discord accepted it.
-- `message_id` is recorded as soon as the card is posted, so it is never
-- posted twice; later changes are edits of that message.

CREATE TABLE discord_cards (
    request_id      TEXT PRIMARY KEY REFERENCES requests (id) ON DELETE CASCADE,
    channel_id      INTEGER NOT NULL,
    message_id      INTEGER,                 -- NULL until posted
    rendered_state  TEXT,                    -- request state the message shows
    want            INTEGER NOT NULL DEFAULT 1,
    done            INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    deadline_ms     INTEGER NOT NULL
);
CREATE INDEX discord_cards_due ON discord_cards (deadline_ms) WHERE want > done;
