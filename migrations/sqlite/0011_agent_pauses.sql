-- The kill switch: agents paused by an admin. A paused agent's every call
-- is denied (`agent_paused`) until it is resumed. The row with agent `*`
-- is the global pause (`pause-all`): it stops every agent. Times are epoch
-- milliseconds.
CREATE TABLE agent_pauses (
    agent TEXT PRIMARY KEY NOT NULL,
    paused_by TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    reason TEXT
);
