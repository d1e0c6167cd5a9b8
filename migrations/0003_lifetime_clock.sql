-- The lifetime clock (server/daemon/src/lifetime.rs): deadlines (ttl_deadline_ms, remove_at_ms)
-- are read on CLOCK_BOOTTIME plus this offset, so that a wall-clock step never moves them, while
-- the offset carried across daemon restarts keeps them meaningful. After a reboot (another
-- boot_id) the offset is re-derived from the wall clock.
CREATE TABLE lifetime_clock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    boot_id   TEXT    NOT NULL,
    offset_ms INTEGER NOT NULL
);
