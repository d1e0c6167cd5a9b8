-- Resource limits, accounting and lifetimes (issue 4).

-- Final resource figures from status.json (sandboxd_protocol::wire::SandboxStats as JSON);
-- NULL until the sandbox has ended, and for sandboxes that never started.
ALTER TABLE sandboxes ADD COLUMN stats TEXT;
-- 1 once the stored output was cut at limits.output_bytes.
ALTER TABLE sandboxes ADD COLUMN output_truncated INTEGER NOT NULL DEFAULT 0;
-- Lifetimes, in wall-clock Unix milliseconds (they must survive daemon restarts). The TTL deadline
-- is set from ttl_secs at creation and moved by POST /extend; remove_at is set at exit from
-- remove_after_exit_ms.
ALTER TABLE sandboxes ADD COLUMN ttl_deadline_ms INTEGER;
ALTER TABLE sandboxes ADD COLUMN remove_after_exit_ms INTEGER;
ALTER TABLE sandboxes ADD COLUMN remove_at_ms INTEGER;
-- Why the daemon itself killed the sandbox ('ttl'), recorded before the kill is sent, so the exit
-- is recorded with that reason instead of 'killed' even across a daemon restart.
ALTER TABLE sandboxes ADD COLUMN kill_reason TEXT;

CREATE INDEX sandboxes_ttl_deadline ON sandboxes (ttl_deadline_ms)
    WHERE ttl_deadline_ms IS NOT NULL;
CREATE INDEX sandboxes_remove_at ON sandboxes (remove_at_ms)
    WHERE remove_at_ms IS NOT NULL;
