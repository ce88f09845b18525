-- Anomaly alerts (as migrations/sqlite 0015): one row per rule, agent and
-- window, its count raised by every later match in the window. Written
-- before anything is posted; the message is due while
-- posted_version < version. Times are epoch milliseconds.
CREATE TABLE anomaly_alerts (
    id             TEXT COLLATE "C" PRIMARY KEY,
    agent          TEXT COLLATE "C" NOT NULL,
    rule           TEXT NOT NULL,
    action         TEXT NOT NULL,
    detail         TEXT NOT NULL,
    count          BIGINT NOT NULL,
    opened_ms      BIGINT NOT NULL,
    updated_ms     BIGINT NOT NULL,
    paused_by      TEXT,
    version        BIGINT NOT NULL DEFAULT 1,
    message_id     BIGINT,
    posted_version BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX anomaly_alerts_opened ON anomaly_alerts (opened_ms);
CREATE INDEX anomaly_alerts_due ON anomaly_alerts (updated_ms) WHERE posted_version < version;

-- The tools each agent has been seen calling (the `new_tool` rule).
CREATE TABLE anomaly_seen_tools (
    agent    TEXT COLLATE "C" NOT NULL,
    tool     TEXT COLLATE "C" NOT NULL,
    first_ms BIGINT NOT NULL,
    PRIMARY KEY (agent, tool)
);
