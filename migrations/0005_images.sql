-- Images (issue 3). The helper stores each unpacked image once, under its digest; these rows
-- give them names per tenant. A sandbox refers to an image by name in its spec
-- (`spec.rootfs.image`), and an image cannot be deleted while a sandbox of its tenant refers to it.
CREATE TABLE images (
    tenant         TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    -- 64 hex digits: the sha256 of the uploaded archive.
    digest         TEXT    NOT NULL,
    size_bytes     INTEGER NOT NULL,
    archive_bytes  INTEGER NOT NULL,
    entries        INTEGER NOT NULL,
    format         TEXT    NOT NULL,
    layers         INTEGER NOT NULL,
    -- Unix milliseconds.
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE INDEX images_digest ON images (digest);
