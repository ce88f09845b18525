-- Tools Keyturn runs itself. A request of a run-tool carries its run plan
-- (the argv as shown, the sandbox, as JSON; NULL for every other request),
-- and each run Keyturn starts is registered in `runs` with its outcome: the
-- process registry. A request runs at most once (request_id is unique).
-- Times are epoch milliseconds; argv is a JSON array of strings.
ALTER TABLE requests ADD COLUMN run_plan TEXT;

CREATE TABLE runs (
    id                TEXT PRIMARY KEY NOT NULL,
    request_id        TEXT NOT NULL UNIQUE REFERENCES requests (id),
    agent             TEXT NOT NULL,
    tool              TEXT NOT NULL,
    argv              TEXT NOT NULL,
    profile           TEXT NOT NULL,
    pid               INTEGER,
    host              TEXT NOT NULL,
    server_pid        INTEGER NOT NULL,
    approved_by       TEXT NOT NULL,
    started_ms        INTEGER NOT NULL,
    deadline_ms       INTEGER NOT NULL,
    state             TEXT NOT NULL,
    ended_ms          INTEGER,
    exit_code         INTEGER,
    signal            INTEGER,
    stdout_sha256     TEXT,
    stderr_sha256     TEXT,
    kill_requested_by TEXT
);
CREATE INDEX runs_state ON runs (state);
