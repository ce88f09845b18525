-- Anomaly alerts: one row per rule, agent and window, its count raised by
-- every later match in the window. Written before anything is posted, so a
-- restart or a Discord outage loses none; the message is due while
-- posted_version < version. Times are epoch milliseconds.
CREATE TABLE anomaly_alerts (
    id TEXT PRIMARY KEY NOT NULL,
    agent TEXT NOT NULL,
    rule TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    count INTEGER NOT NULL,
    opened_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    paused_by TEXT,
    version INTEGER NOT NULL DEFAULT 1,
    message_id INTEGER,
    posted_version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX anomaly_alerts_opened ON anomaly_alerts (opened_ms);
CREATE INDEX anomaly_alerts_due ON anomaly_alerts (updated_ms) WHERE posted_version < version;

-- The tools each agent has been seen calling (the `new_tool` rule), so a
-- tool stays known across a restart. Bounded per agent by the store.
CREATE TABLE anomaly_seen_tools (
    agent TEXT NOT NULL,
    tool TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, tool)
);
