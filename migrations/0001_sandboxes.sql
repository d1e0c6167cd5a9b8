-- One row per sandbox the daemon knows about. Rows are removed by DELETE /v1/sandboxes/{id}.
CREATE TABLE sandboxes (
    -- Monotonic order of creation; the opaque list cursor encodes it.
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    name         TEXT    UNIQUE,
    state        TEXT    NOT NULL CHECK (state IN ('creating', 'running', 'exited', 'failed')),
    exit_code    INTEGER,
    signal       TEXT,
    reason       TEXT,
    error        TEXT,
    hostname     TEXT    NOT NULL,
    -- Unix milliseconds.
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    -- JSON object of string labels.
    labels       TEXT    NOT NULL DEFAULT '{}',
    -- The CreateSandbox request as JSON.
    spec         TEXT    NOT NULL,
    -- Privileged mode only: which uid range the sandbox uses (NULL when rootless).
    uid_slot     INTEGER,
    init_pid     INTEGER,
    host_uid     INTEGER
);

CREATE INDEX sandboxes_state ON sandboxes (state);

-- Two live sandboxes never share a uid range.
CREATE UNIQUE INDEX sandboxes_live_uid_slot ON sandboxes (uid_slot)
    WHERE uid_slot IS NOT NULL AND state IN ('creating', 'running');
