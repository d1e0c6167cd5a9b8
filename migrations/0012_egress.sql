-- Egress (issue 13): the policy in force per sandbox, its recent denials and its counters.
-- Everything goes with the sandbox's row (ON DELETE CASCADE); policies and counters survive a
-- daemon restart, and the daemon pushes the policies of live sandboxes to the filter again.
CREATE TABLE egress_policies (
    sandbox_id   TEXT    PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    -- The EgressPolicy as JSON ({"allow": [...], "deny": [...]}).
    policy       TEXT    NOT NULL,
    -- Unix milliseconds of the create or the last PATCH.
    updated_at   INTEGER NOT NULL
);

-- The most recent denials of each sandbox (the daemon keeps the last 1000 per sandbox).
CREATE TABLE egress_denials (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id   TEXT    NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    -- Unix milliseconds.
    at           INTEGER NOT NULL,
    -- tcp, udp or dns.
    protocol     TEXT    NOT NULL,
    address      TEXT,
    port         INTEGER,
    name         TEXT,
    -- not_allowed, private_range or name_mismatch.
    reason       TEXT    NOT NULL
);

CREATE INDEX egress_denials_sandbox ON egress_denials (sandbox_id, seq);

-- The last totals the filter reported for each sandbox.
CREATE TABLE egress_counters (
    sandbox_id          TEXT    PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    connections_allowed INTEGER NOT NULL,
    connections_denied  INTEGER NOT NULL,
    bytes_out           INTEGER NOT NULL,
    bytes_in            INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);
