-- Authentication and tenants (issue 7).

-- Bearer tokens. Only the SHA-256 of the secret (hex) is stored; the secret is shown once.
-- Times are Unix milliseconds.
CREATE TABLE tokens (
    id          TEXT    PRIMARY KEY,
    hash        TEXT    UNIQUE NOT NULL,
    tenant      TEXT    NOT NULL,
    role        TEXT    NOT NULL CHECK (role IN ('admin', 'user')),
    created_at  INTEGER,
    expires_at  INTEGER NULL,
    revoked_at  INTEGER NULL
);

-- Per-tenant quotas; NULL means unlimited. A tenant without a row has no quota.
CREATE TABLE quotas (
    tenant            TEXT    PRIMARY KEY,
    max_sandboxes     INTEGER NULL,
    max_memory_bytes  INTEGER NULL
);

-- Every sandbox belongs to a tenant; rows from before this migration belong to 'default'.
ALTER TABLE sandboxes ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
CREATE INDEX sandboxes_tenant_state ON sandboxes (tenant, state);
