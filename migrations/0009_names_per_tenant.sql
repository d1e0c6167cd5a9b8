-- Sandbox names are unique per tenant, not per daemon (issue 12 finding 10: a daemon-wide unique
-- name told one tenant the names of another, and let it take the names another's CI expects).
--
-- The old uniqueness is a column constraint (`name TEXT UNIQUE`), which no statement can drop:
-- the table is rebuilt, the way the SQLite documentation gives ("making other kinds of table
-- schema changes"). The migration runs in one transaction with foreign keys on, so dropping the
-- old table cascades to `execs`: its rows are kept aside and put back, and the AUTOINCREMENT
-- high-water mark (the list cursor's order) is kept too.
CREATE TABLE sandboxes_new (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    name         TEXT,
    state        TEXT    NOT NULL CHECK (state IN ('created', 'creating', 'running', 'exited', 'failed')),
    exit_code    INTEGER,
    signal       TEXT,
    reason       TEXT,
    error        TEXT,
    hostname     TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    labels       TEXT    NOT NULL DEFAULT '{}',
    spec         TEXT    NOT NULL,
    uid_slot     INTEGER,
    init_pid     INTEGER,
    host_uid     INTEGER,
    stats        TEXT,
    output_truncated INTEGER NOT NULL DEFAULT 0,
    ttl_deadline_ms INTEGER,
    remove_after_exit_ms INTEGER,
    remove_at_ms INTEGER,
    kill_reason  TEXT,
    tenant       TEXT    NOT NULL DEFAULT 'default',
    network      TEXT,
    net_index    INTEGER
);

INSERT INTO sandboxes_new (seq, id, name, state, exit_code, signal, reason, error, hostname,
                           created_at, started_at, finished_at, labels, spec, uid_slot, init_pid,
                           host_uid, stats, output_truncated, ttl_deadline_ms,
                           remove_after_exit_ms, remove_at_ms, kill_reason, tenant, network,
                           net_index)
SELECT seq, id, name, state, exit_code, signal, reason, error, hostname, created_at, started_at,
       finished_at, labels, spec, uid_slot, init_pid, host_uid, stats, output_truncated,
       ttl_deadline_ms, remove_after_exit_ms, remove_at_ms, kill_reason, tenant, network, net_index
  FROM sandboxes;

CREATE TABLE keep_execs AS SELECT * FROM execs;
CREATE TABLE keep_seq AS SELECT seq FROM sqlite_sequence WHERE name = 'sandboxes';

DROP TABLE sandboxes;
ALTER TABLE sandboxes_new RENAME TO sandboxes;

DELETE FROM sqlite_sequence WHERE name = 'sandboxes';
INSERT INTO sqlite_sequence (name, seq) SELECT 'sandboxes', seq FROM keep_seq;
DROP TABLE keep_seq;

INSERT INTO execs SELECT * FROM keep_execs;
DROP TABLE keep_execs;

CREATE UNIQUE INDEX sandboxes_tenant_name ON sandboxes (tenant, name) WHERE name IS NOT NULL;
CREATE INDEX sandboxes_state ON sandboxes (state);
CREATE INDEX sandboxes_ttl_deadline ON sandboxes (ttl_deadline_ms)
    WHERE ttl_deadline_ms IS NOT NULL;
CREATE INDEX sandboxes_remove_at ON sandboxes (remove_at_ms)
    WHERE remove_at_ms IS NOT NULL;
CREATE INDEX sandboxes_tenant_state ON sandboxes (tenant, state);
CREATE UNIQUE INDEX sandboxes_live_uid_slot ON sandboxes (uid_slot)
    WHERE uid_slot IS NOT NULL AND state IN ('created', 'creating', 'running');
CREATE UNIQUE INDEX sandboxes_live_net_index ON sandboxes (net_index)
    WHERE net_index IS NOT NULL AND state IN ('creating', 'running');
