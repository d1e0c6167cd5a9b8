-- Files in and out (issue 3): a sandbox created with "start": false stays in state 'created'
-- until POST /start, holding its uid slot like a live one.
--
-- SQLite cannot alter a CHECK constraint. Rebuilding the table would have to name every column,
-- and other migrations add columns; so the constraint is relaxed in place, the procedure the
-- SQLite documentation gives for loosening a CHECK (the stored rows' format does not change),
-- and the schema is reloaded at once so that this connection sees it.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql,
                     'CHECK (state IN (''creating'', ''running'', ''exited'', ''failed''))',
                     'CHECK (state IN (''created'', ''creating'', ''running'', ''exited'', ''failed''))')
 WHERE type = 'table' AND name = 'sandboxes';
PRAGMA writable_schema = RESET;

-- A created sandbox keeps its uid range until it is deleted.
DROP INDEX sandboxes_live_uid_slot;
CREATE UNIQUE INDEX sandboxes_live_uid_slot ON sandboxes (uid_slot)
    WHERE uid_slot IS NOT NULL AND state IN ('created', 'creating', 'running');
