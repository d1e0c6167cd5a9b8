-- Execs: processes started in a running sandbox (issue 6). Removed with their sandbox.
CREATE TABLE execs (
    -- Creation order within the daemon.
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    sandbox_id   TEXT    NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    state        TEXT    NOT NULL CHECK (state IN ('creating', 'running', 'exited', 'failed')),
    exit_code    INTEGER,
    signal       TEXT,
    error        TEXT,
    -- Unix milliseconds.
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    -- The CreateExec request as JSON (command, env, cwd, tty, stdin, size).
    spec         TEXT    NOT NULL
);

CREATE INDEX execs_sandbox ON execs (sandbox_id, seq);
CREATE INDEX execs_live ON execs (state) WHERE state IN ('creating', 'running');
