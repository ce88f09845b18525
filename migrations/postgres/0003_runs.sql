-- Tools Keyturn runs itself (as migrations/sqlite 0010). A request of a
-- run-tool carries its run plan (JSON; NULL for every other request), and
-- each run Keyturn starts is registered in `runs` with its outcome: the
-- process registry. A request runs at most once (request_id is unique).
-- Times are epoch milliseconds; argv is a JSON array of strings.
ALTER TABLE requests ADD COLUMN run_plan TEXT;

CREATE TABLE runs (
    id                TEXT COLLATE "C" PRIMARY KEY,
    request_id        TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES requests (id),
    agent             TEXT NOT NULL,
    tool              TEXT NOT NULL,
    argv              TEXT NOT NULL,
    profile           TEXT NOT NULL,
    pid               BIGINT,
    host              TEXT NOT NULL,
    server_pid        BIGINT NOT NULL,
    approved_by       TEXT NOT NULL,
    started_ms        BIGINT NOT NULL,
    deadline_ms       BIGINT NOT NULL,
    state             TEXT NOT NULL,
    ended_ms          BIGINT,
    exit_code         BIGINT,
    signal            BIGINT,
    stdout_sha256     TEXT,
    stderr_sha256     TEXT,
    kill_requested_by TEXT
);
CREATE INDEX runs_state ON runs (state);
