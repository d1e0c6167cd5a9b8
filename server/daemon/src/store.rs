//! The SQLite store: every SQL statement of the daemon lives in this module.
//!
//! Writes go through a pool of exactly one connection so that they are serialised (SQLite allows
//! one writer anyway) and multi-statement steps such as uid slot allocation cannot race; reads use
//! a separate pool, which WAL mode lets run beside the writer.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sandboxd_api::{CreateSandbox, EndReason, Role, Sandbox, SandboxState};
use sandboxd_protocol::wire::SandboxStats;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

mod images;
pub use images::{image_quota_refusal, ImageUsage, NewImage};
mod egress;
pub use egress::LivePolicy;
mod network;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

const COLUMNS: &str = "seq, id, name, state, exit_code, signal, reason, error, hostname, \
     created_at, started_at, finished_at, labels, spec, init_pid, host_uid, output_truncated, network, \
     ttl_deadline_ms, \
     (SELECT policy FROM egress_policies WHERE sandbox_id = sandboxes.id) AS egress_policy";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the database")]
    Open(#[source] sqlx::Error),
    #[error("making the database file {path} private (0600)")]
    Private {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migrating the database")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("the name is already taken")]
    NameTaken,
    #[error("sandboxes of several tenants are named {0:?}")]
    AmbiguousName(String),
    #[error("no free uid slot")]
    NoCapacity,
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    #[error("the tenant's memory quota requires a memory limit")]
    MemoryLimitRequired,
    #[error("corrupt row {id}: {what}")]
    Corrupt { id: String, what: String },
}

/// What the daemon knows before the sandbox is started.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub id: Uuid,
    pub name: Option<String>,
    /// The tenant the sandbox belongs to (its quota is checked on insert).
    pub tenant: String,
    /// What a live sandbox without a memory limit counts as against a memory quota (the daemon's
    /// `--max-memory`); when `None`, creating one in a tenant with a memory quota is refused.
    pub quota_memory_default: Option<u64>,
    pub hostname: String,
    pub created_at_ms: i64,
    pub spec: CreateSandbox,
    /// Wall-clock deadline of `ttl_secs` (Unix ms).
    pub ttl_deadline_ms: Option<i64>,
    /// `remove_after_exit_secs` in milliseconds.
    pub remove_after_exit_ms: Option<i64>,
}

/// How `GET /v1/sandboxes` narrows the list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub state: Option<SandboxState>,
    /// Only this tenant's sandboxes (`None`: every tenant).
    pub tenant: Option<String>,
    pub labels: Vec<(String, String)>,
    pub limit: u32,
    /// Only rows created before the row with this sequence number.
    pub before_seq: Option<i64>,
}

/// How a sandbox ended, as stored.
#[derive(Debug, Clone)]
pub struct Ending {
    pub state: SandboxState,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub reason: EndReason,
    pub error: Option<String>,
    pub finished_at_ms: i64,
    /// Final figures from `status.json`; `None` when the sandbox never ran or was lost.
    pub stats: Option<SandboxStats>,
}

/// Which lifetime deadline of a sandbox has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// `ttl_secs` (or the last `/extend`) ran out.
    Ttl,
    /// `remove_after_exit_secs` after the exit ran out.
    RemoveAfterExit,
}

/// What is stored about a sandbox's resource use.
#[derive(Debug, Clone)]
pub struct StoredStats {
    pub state: SandboxState,
    pub stats: Option<SandboxStats>,
    pub output_truncated: bool,
}

#[derive(Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Store {
    /// Open (creating if needed) the database at `path` and apply the migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        // The database holds every tenant's specs (env values included) and the token table:
        // it is created 0600 here, and SQLite gives its `-wal` and `-shm` the mode of the
        // database file. An existing database is made private too (it was 0644 before).
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let private = |source| StoreError::Private {
                path: path.to_owned(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(path)
                .map_err(private)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(private)?;
            for suffix in ["-wal", "-shm"] {
                let mut side = path.as_os_str().to_owned();
                side.push(suffix);
                match std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(StoreError::Private {
                            path: side.into(),
                            source,
                        })
                    }
                }
            }
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            // sqlx does not enable WAL by itself; readers then never block the writer.
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable against process crashes, which is what reconciliation
            // relies on; a power loss may lose the last transactions, which reconciliation repairs.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::Open)?;
        MIGRATOR.run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(StoreError::Open)?;
        Ok(Store { writer, reader })
    }

    /// Insert a row in state `creating`. With `uid_slots`, also allocate the lowest uid slot that
    /// no live sandbox holds. Returns the allocated slot.
    pub async fn insert_creating(
        &self,
        new: &NewSandbox,
        uid_slots: Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        let labels = serde_json::to_string(&new.spec.labels).map_err(corrupt_json(new.id))?;
        let spec = serde_json::to_string(&new.spec).map_err(corrupt_json(new.id))?;
        let mut tx = self.writer.begin().await?;
        check_quota(&mut tx, new).await?;
        let slot = match uid_slots {
            None => None,
            Some(slots) => {
                // The lowest free slot is either 0 or right after a used one.
                let row = sqlx::query(
                    "SELECT s FROM (
                         SELECT 0 AS s
                         UNION ALL
                         SELECT uid_slot + 1 FROM sandboxes
                          WHERE uid_slot IS NOT NULL AND state IN ('created', 'creating', 'running')
                     )
                     WHERE s < ?1 AND s NOT IN (
                         SELECT uid_slot FROM sandboxes
                          WHERE uid_slot IS NOT NULL AND state IN ('created', 'creating', 'running'))
                     ORDER BY s LIMIT 1",
                )
                .bind(i64::from(slots))
                .fetch_optional(&mut *tx)
                .await?;
                match row {
                    Some(r) => Some(u32::try_from(r.try_get::<i64, _>(0)?).map_err(|_| {
                        StoreError::Corrupt {
                            id: new.id.to_string(),
                            what: "uid slot out of range".into(),
                        }
                    })?),
                    None => return Err(StoreError::NoCapacity),
                }
            }
        };
        let inserted = sqlx::query(
            "INSERT INTO sandboxes (id, name, state, hostname, created_at, labels, spec, uid_slot,
                                    ttl_deadline_ms, remove_after_exit_ms, tenant)
             VALUES (?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(new.id.to_string())
        .bind(new.name.as_deref())
        .bind(&new.hostname)
        .bind(new.created_at_ms)
        .bind(labels)
        .bind(spec)
        .bind(slot.map(i64::from))
        .bind(new.ttl_deadline_ms)
        .bind(new.remove_after_exit_ms)
        .bind(&new.tenant)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::NameTaken)
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(slot)
    }

    /// Give a `creating` sandbox another uid slot: the lowest free one that is not in `avoid`
    /// (slots the helper found still held by a live monitor the database no longer knows of).
    pub async fn reassign_slot(
        &self,
        id: Uuid,
        avoid: &[u32],
        uid_slots: u32,
    ) -> Result<u32, StoreError> {
        let avoid_json = serde_json::to_string(avoid).map_err(corrupt_json(id))?;
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT s FROM (
                 SELECT 0 AS s
                 UNION ALL
                 SELECT uid_slot + 1 FROM sandboxes
                  WHERE uid_slot IS NOT NULL AND state IN ('created', 'creating', 'running')
                 UNION ALL
                 SELECT value + 1 FROM json_each(?2)
             )
             WHERE s < ?1
               AND s NOT IN (SELECT uid_slot FROM sandboxes
                              WHERE uid_slot IS NOT NULL AND state IN ('created', 'creating', 'running'))
               AND s NOT IN (SELECT value FROM json_each(?2))
             ORDER BY s LIMIT 1",
        )
        .bind(i64::from(uid_slots))
        .bind(&avoid_json)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NoCapacity);
        };
        let slot = u32::try_from(row.try_get::<i64, _>(0)?).map_err(|_| StoreError::Corrupt {
            id: id.to_string(),
            what: "uid slot out of range".into(),
        })?;
        sqlx::query("UPDATE sandboxes SET uid_slot = ? WHERE id = ? AND state = 'creating'")
            .bind(i64::from(slot))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(slot)
    }

    pub async fn set_running(
        &self,
        id: Uuid,
        started_at_ms: i64,
        init_pid: i32,
        host_uid: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET state = 'running', started_at = ?, init_pid = ?, host_uid = ?
             WHERE id = ? AND state = 'creating'",
        )
        .bind(started_at_ms)
        .bind(init_pid)
        .bind(i64::from(host_uid))
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The uid slot a sandbox holds (privileged mode), for requests that rebuild its spawn.
    pub async fn uid_slot(&self, id: Uuid) -> Result<Option<u32>, StoreError> {
        let row = sqlx::query("SELECT uid_slot FROM sandboxes WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        let slot: Option<i64> = match row {
            Some(r) => r.try_get(0)?,
            None => None,
        };
        slot.map(|s| {
            u32::try_from(s).map_err(|_| StoreError::Corrupt {
                id: id.to_string(),
                what: "uid slot out of range".into(),
            })
        })
        .transpose()
    }

    /// A sandbox created with `"start": false` is set up: `creating` becomes `created`.
    pub async fn set_created(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'created' WHERE id = ? AND state = 'creating'",
        )
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `POST /start`: `created` becomes `creating`; false when it was not `created` (started
    /// already, or by a concurrent request).
    pub async fn start_created(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'creating' WHERE id = ? AND state = 'created'",
        )
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// After a restart, a row left in `creating` whose monitor answers is in fact running.
    pub async fn recover_running(&self, id: Uuid, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET state = 'running', started_at = COALESCE(started_at, ?)
             WHERE id = ? AND state = 'creating'",
        )
        .bind(now_ms)
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Record how a live sandbox ended. Returns false when it was already final (or gone).
    ///
    /// A sandbox the daemon killed itself (see [`Store::set_kill_reason`]) is recorded with that
    /// reason instead of `killed`; `remove_at_ms` is `now_ms` (the lifetime clock) plus
    /// `remove_after_exit_ms`.
    pub async fn finish(&self, id: Uuid, end: &Ending, now_ms: i64) -> Result<bool, StoreError> {
        let stats = end
            .stats
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt_json(id))?;
        let truncated = end.stats.as_ref().is_some_and(|s| s.output_truncated);
        let done = sqlx::query(
            "UPDATE sandboxes
                SET state = ?1, exit_code = ?2, signal = ?3,
                    reason = CASE WHEN ?4 = 'killed' AND kill_reason IS NOT NULL
                                  THEN kill_reason ELSE ?4 END,
                    error = ?5, finished_at = ?6, stats = ?7, output_truncated = ?8,
                    remove_at_ms = CASE WHEN remove_after_exit_ms IS NULL THEN NULL
                                        ELSE ?10 + remove_after_exit_ms END
              WHERE id = ?9 AND state IN ('creating', 'running')",
        )
        .bind(end.state.as_str())
        .bind(end.exit_code)
        .bind(end.signal.as_deref())
        .bind(end.reason.as_str())
        .bind(end.error.as_deref())
        .bind(end.finished_at_ms)
        .bind(stats)
        .bind(truncated)
        .bind(id.to_string())
        .bind(now_ms)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The stored lifetime clock: boot id and offset (see `crate::lifetime`).
    pub async fn lifetime_clock(&self) -> Result<Option<(String, i64)>, StoreError> {
        let row = sqlx::query("SELECT boot_id, offset_ms FROM lifetime_clock WHERE id = 1")
            .fetch_optional(&self.writer)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
            None => None,
        })
    }

    pub async fn set_lifetime_clock(
        &self,
        boot_id: &str,
        offset_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO lifetime_clock (id, boot_id, offset_ms) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET boot_id = ?1, offset_ms = ?2",
        )
        .bind(boot_id)
        .bind(offset_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Remember that the daemon is about to kill this sandbox for `reason`, so that its exit is
    /// recorded with that reason (also when the daemon restarts before the exit is seen).
    pub async fn set_kill_reason(&self, id: Uuid, reason: EndReason) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET kill_reason = ? WHERE id = ?")
            .bind(reason.as_str())
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Move the TTL deadline; false when there is no such sandbox.
    pub async fn set_ttl_deadline(&self, id: Uuid, deadline_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE sandboxes SET ttl_deadline_ms = ? WHERE id = ?")
            .bind(deadline_ms)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Push a deadline that could not be acted on to `at_ms`, so the reaper retries later.
    pub async fn postpone(&self, id: Uuid, which: Deadline, at_ms: i64) -> Result<(), StoreError> {
        let sql = match which {
            Deadline::Ttl => "UPDATE sandboxes SET ttl_deadline_ms = ? WHERE id = ?",
            Deadline::RemoveAfterExit => "UPDATE sandboxes SET remove_at_ms = ? WHERE id = ?",
        };
        sqlx::query(sql)
            .bind(at_ms)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Sandboxes with a deadline at or before `now_ms` (a TTL first when both passed), and the
    /// earliest deadline after `now_ms`.
    pub async fn deadlines(
        &self,
        now_ms: i64,
    ) -> Result<(Vec<(Uuid, Deadline)>, Option<i64>), StoreError> {
        let rows = sqlx::query(
            "SELECT id, CASE WHEN ttl_deadline_ms IS NOT NULL AND ttl_deadline_ms <= ?1
                             THEN 'ttl' ELSE 'remove' END
               FROM sandboxes
              WHERE ttl_deadline_ms <= ?1 OR remove_at_ms <= ?1
              ORDER BY seq",
        )
        .bind(now_ms)
        .fetch_all(&self.reader)
        .await?;
        let mut due = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get(0)?;
            let kind: String = r.try_get(1)?;
            let which = if kind == "ttl" {
                Deadline::Ttl
            } else {
                Deadline::RemoveAfterExit
            };
            due.push((parse_uuid(&id)?, which));
        }
        let next: Option<i64> = sqlx::query(
            "SELECT MIN(d) FROM (
                 SELECT ttl_deadline_ms AS d FROM sandboxes WHERE ttl_deadline_ms > ?1
                 UNION ALL
                 SELECT remove_at_ms FROM sandboxes WHERE remove_at_ms > ?1)",
        )
        .bind(now_ms)
        .fetch_one(&self.reader)
        .await?
        .try_get(0)?;
        Ok((due, next))
    }

    /// The stored resource figures of a sandbox.
    pub async fn stats(&self, id: Uuid) -> Result<Option<StoredStats>, StoreError> {
        let row = sqlx::query("SELECT state, stats, output_truncated FROM sandboxes WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get(0)?;
        let state = SandboxState::parse(&state).ok_or_else(|| StoreError::Corrupt {
            id: id.to_string(),
            what: "state".into(),
        })?;
        let stats: Option<String> = row.try_get(1)?;
        let stats = stats
            .map(|s| serde_json::from_str::<SandboxStats>(&s))
            .transpose()
            .map_err(corrupt_json(id))?;
        Ok(Some(StoredStats {
            state,
            stats,
            output_truncated: row.try_get(2)?,
        }))
    }

    pub async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM sandboxes WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A sandbox by id, only if it belongs to `tenant` (any tenant when `None`).
    pub async fn get_in(
        &self,
        id: Uuid,
        tenant: Option<&str>,
    ) -> Result<Option<Sandbox>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(tenant)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| to_sandbox(&r).map(|(_, s)| s)).transpose()
    }

    /// A sandbox by name, only if it belongs to `tenant`. Names are unique per tenant; with
    /// `None` (an admin) the name must name one sandbox across all tenants, else
    /// `AmbiguousName`.
    pub async fn get_by_name_in(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<Option<Sandbox>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE name = ?1 AND (?2 IS NULL OR tenant = ?2) \
             LIMIT 2"
        );
        let rows = sqlx::query(&sql)
            .bind(name)
            .bind(tenant)
            .fetch_all(&self.reader)
            .await?;
        match rows.as_slice() {
            [] => Ok(None),
            [row] => to_sandbox(row).map(|(_, s)| Some(s)),
            _ => Err(StoreError::AmbiguousName(name.to_owned())),
        }
    }

    /// Whether the database answers (`GET /readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.reader).await?;
        Ok(())
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Sandbox>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| to_sandbox(&r).map(|(_, s)| s)).transpose()
    }

    pub async fn get_by_name(&self, name: &str) -> Result<Option<Sandbox>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM sandboxes WHERE name = ?");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| to_sandbox(&r).map(|(_, s)| s)).transpose()
    }

    /// One page of sandboxes, newest first, and the sequence number to continue before.
    pub async fn list(&self, q: &ListQuery) -> Result<(Vec<Sandbox>, Option<i64>), StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM sandboxes WHERE 1 = 1");
        if q.state.is_some() {
            sql.push_str(" AND state = ?");
        }
        if q.tenant.is_some() {
            sql.push_str(" AND tenant = ?");
        }
        if q.before_seq.is_some() {
            sql.push_str(" AND seq < ?");
        }
        for _ in &q.labels {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM json_each(sandboxes.labels) \
                 WHERE json_each.key = ? AND json_each.value = ?)",
            );
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        let mut query = sqlx::query(&sql);
        if let Some(state) = q.state {
            query = query.bind(state.as_str());
        }
        if let Some(tenant) = &q.tenant {
            query = query.bind(tenant);
        }
        if let Some(seq) = q.before_seq {
            query = query.bind(seq);
        }
        for (k, v) in &q.labels {
            query = query.bind(k).bind(v);
        }
        let limit = i64::from(q.limit.max(1));
        let rows = query.bind(limit + 1).fetch_all(&self.reader).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last_seq = None;
        for row in rows.iter().take(q.limit.max(1) as usize) {
            let (seq, sandbox) = to_sandbox(row)?;
            last_seq = Some(seq);
            items.push(sandbox);
        }
        let next = if rows.len() as i64 > limit {
            last_seq
        } else {
            None
        };
        Ok((items, next))
    }

    // ---- Tokens and quotas -------------------------------------------------------------------

    pub async fn insert_token(&self, t: &StoredToken, hash: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, tenant, role, created_at, expires_at, revoked_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(hash)
        .bind(&t.tenant)
        .bind(t.role.as_str())
        .bind(t.created_at_ms)
        .bind(t.expires_at_ms)
        .bind(t.revoked_at_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The token whose secret hashes to `hash`, valid or not.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<StoredToken>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant, role, created_at, expires_at, revoked_at FROM tokens WHERE hash = ?",
        )
        .bind(hash)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(to_token).transpose()
    }

    pub async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant, role, created_at, expires_at, revoked_at FROM tokens WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(to_token).transpose()
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, role, created_at, expires_at, revoked_at FROM tokens
              ORDER BY created_at, id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(to_token).collect()
    }

    /// Revoke a token at `now_ms`; false when there is no such token. Revoking twice keeps the
    /// first time.
    pub async fn revoke_token(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(now_ms)
                .bind(id)
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether some admin token is neither revoked nor expired at `now_ms`.
    pub async fn valid_admin_token_exists(&self, now_ms: i64) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM tokens WHERE role = 'admin' AND revoked_at IS NULL
                              AND (expires_at IS NULL OR expires_at > ?))",
        )
        .bind(now_ms)
        .fetch_one(&self.writer)
        .await?;
        Ok(row.try_get::<bool, _>(0)?)
    }

    /// Set (replace) a tenant's quota.
    pub async fn set_quota(&self, tenant: &str, q: &StoredQuota) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO quotas (tenant, max_sandboxes, max_memory_bytes, max_images,
                                 max_image_bytes) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant) DO UPDATE SET max_sandboxes = ?2, max_memory_bytes = ?3,
                                                max_images = ?4, max_image_bytes = ?5",
        )
        .bind(tenant)
        .bind(q.max_sandboxes)
        .bind(q.max_memory_bytes)
        .bind(q.max_images)
        .bind(q.max_image_bytes)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// A tenant's quota (all `None` when it has none).
    pub async fn quota(&self, tenant: &str) -> Result<StoredQuota, StoreError> {
        let mut conn = self.reader.acquire().await?;
        self.quota_in(&mut conn, tenant).await
    }

    /// A tenant's quota, read on `conn` (a transaction's, for checks that must hold at insert).
    pub(crate) async fn quota_in(
        &self,
        conn: &mut sqlx::SqliteConnection,
        tenant: &str,
    ) -> Result<StoredQuota, StoreError> {
        let row = sqlx::query(
            "SELECT max_sandboxes, max_memory_bytes, max_images, max_image_bytes FROM quotas
              WHERE tenant = ?",
        )
        .bind(tenant)
        .fetch_optional(conn)
        .await?;
        Ok(match row {
            Some(r) => StoredQuota {
                max_sandboxes: r.try_get(0)?,
                max_memory_bytes: r.try_get(1)?,
                max_images: r.try_get(2)?,
                max_image_bytes: r.try_get(3)?,
            },
            None => StoredQuota::default(),
        })
    }

    /// Every sandbox in `creating` or `running`, for reconciliation.
    pub async fn live(&self) -> Result<Vec<Sandbox>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE state IN ('creating', 'running') ORDER BY seq"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.reader).await?;
        rows.iter().map(|r| to_sandbox(r).map(|(_, s)| s)).collect()
    }

    /// Ids of every row.
    pub async fn ids(&self) -> Result<Vec<Uuid>, StoreError> {
        let rows = sqlx::query("SELECT id FROM sandboxes")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                parse_uuid(&id)
            })
            .collect()
    }
}

/// A token as stored (its hash aside). Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

impl StoredToken {
    /// Neither revoked nor expired at `now_ms`.
    pub fn is_valid(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| e > now_ms)
    }
}

/// A tenant's quota; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredQuota {
    pub max_sandboxes: Option<i64>,
    pub max_memory_bytes: Option<i64>,
    pub max_images: Option<i64>,
    pub max_image_bytes: Option<i64>,
}

fn to_token(row: &SqliteRow) -> Result<StoredToken, StoreError> {
    let id: String = row.try_get(0)?;
    let role: String = row.try_get(2)?;
    let role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
        id: id.clone(),
        what: "role".into(),
    })?;
    Ok(StoredToken {
        id,
        tenant: row.try_get(1)?,
        role,
        created_at_ms: row.try_get::<Option<i64>, _>(3)?.unwrap_or(0),
        expires_at_ms: row.try_get(4)?,
        revoked_at_ms: row.try_get(5)?,
    })
}

/// Refuse an insert that would take the tenant beyond its quota. Runs in the insert's
/// transaction (on the single writer connection), so concurrent creates cannot both pass.
async fn check_quota(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    new: &NewSandbox,
) -> Result<(), StoreError> {
    let row = sqlx::query("SELECT max_sandboxes, max_memory_bytes FROM quotas WHERE tenant = ?")
        .bind(&new.tenant)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else { return Ok(()) };
    let max_sandboxes: Option<i64> = row.try_get(0)?;
    let max_memory: Option<i64> = row.try_get(1)?;
    if max_sandboxes.is_none() && max_memory.is_none() {
        return Ok(());
    }
    let fallback = new
        .quota_memory_default
        .map(|m| i64::try_from(m).unwrap_or(i64::MAX));
    let mine = match new.spec.limits.memory_bytes {
        Some(m) => i64::try_from(m).unwrap_or(i64::MAX),
        None if max_memory.is_none() => 0,
        None => match fallback {
            Some(f) => f,
            None => return Err(StoreError::MemoryLimitRequired),
        },
    };
    let usage = sqlx::query(
        "SELECT COUNT(*),
                COALESCE(SUM(COALESCE(json_extract(spec, '$.limits.memory_bytes'), ?2)), 0)
           FROM sandboxes WHERE tenant = ?1 AND state IN ('created', 'creating', 'running')",
    )
    .bind(&new.tenant)
    .bind(fallback.unwrap_or(0))
    .fetch_one(&mut **tx)
    .await?;
    let live: i64 = usage.try_get(0)?;
    let memory: i64 = usage.try_get(1)?;
    if let Some(max) = max_sandboxes {
        if live >= max {
            return Err(StoreError::QuotaExceeded(format!(
                "tenant {:?} may have at most {max} live sandboxes and has {live}",
                new.tenant
            )));
        }
    }
    if let Some(max) = max_memory {
        if memory.saturating_add(mine) > max {
            return Err(StoreError::QuotaExceeded(format!(
                "tenant {:?} may use at most {max} bytes of memory over its live sandboxes; \
                 {memory} are in use and this sandbox asks for {mine}",
                new.tenant
            )));
        }
    }
    Ok(())
}

fn corrupt_json(id: Uuid) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupt {
        id: id.to_string(),
        what: e.to_string(),
    }
}

fn parse_uuid(id: &str) -> Result<Uuid, StoreError> {
    Uuid::from_str(id).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        what: e.to_string(),
    })
}

fn time_of(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_sandbox(row: &SqliteRow) -> Result<(i64, Sandbox), StoreError> {
    let id_text: String = row.try_get("id")?;
    let bad = |what: &str| StoreError::Corrupt {
        id: id_text.clone(),
        what: what.to_owned(),
    };
    let id = parse_uuid(&id_text)?;
    let state: String = row.try_get("state")?;
    let state = SandboxState::parse(&state).ok_or_else(|| bad("state"))?;
    let reason: Option<String> = row.try_get("reason")?;
    let reason = match reason {
        Some(r) => Some(EndReason::parse(&r).ok_or_else(|| bad("reason"))?),
        None => None,
    };
    let labels: String = row.try_get("labels")?;
    let labels: BTreeMap<String, String> =
        serde_json::from_str(&labels).map_err(|_| bad("labels"))?;
    let spec: String = row.try_get("spec")?;
    let spec: CreateSandbox = serde_json::from_str(&spec).map_err(|_| bad("spec"))?;
    let host_uid: Option<i64> = row.try_get("host_uid")?;
    let sandbox = Sandbox {
        id,
        name: row.try_get("name")?,
        state,
        exit_code: row.try_get("exit_code")?,
        signal: row.try_get("signal")?,
        reason,
        error: row.try_get("error")?,
        hostname: row.try_get("hostname")?,
        created_at: time_of(row.try_get("created_at")?),
        started_at: row.try_get::<Option<i64>, _>("started_at")?.map(time_of),
        finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(time_of),
        labels,
        spec,
        output_truncated: row.try_get("output_truncated")?,
        init_pid: row.try_get("init_pid")?,
        host_uid: host_uid.and_then(|u| u32::try_from(u).ok()),
        network: match row.try_get::<Option<String>, _>("network")? {
            Some(json) => {
                let mut info: sandboxd_api::NetworkInfo =
                    serde_json::from_str(&json).map_err(|_| bad("network"))?;
                // The policy in force lives in its own table (PATCH replaces it).
                info.egress = match row.try_get::<Option<String>, _>("egress_policy")? {
                    Some(p) => Some(serde_json::from_str(&p).map_err(|_| bad("egress policy"))?),
                    None => None,
                };
                Some(info)
            }
            None => None,
        },
        // The lifetime clock reads as Unix milliseconds (it starts equal to the wall clock and
        // only parts from it when the wall clock is stepped), so its deadline is shown as one.
        expires_at: row
            .try_get::<Option<i64>, _>("ttl_deadline_ms")?
            .map(time_of),
    };
    Ok((row.try_get("seq")?, sandbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_clock_is_stored_per_boot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        assert_eq!(store.lifetime_clock().await.unwrap(), None);
        store.set_lifetime_clock("b1", 42).await.unwrap();
        store.set_lifetime_clock("b2", 43).await.unwrap();
        assert_eq!(
            store.lifetime_clock().await.unwrap(),
            Some(("b2".into(), 43))
        );
    }

    pub(super) fn new(name: Option<&str>) -> NewSandbox {
        NewSandbox {
            id: Uuid::new_v4(),
            name: name.map(str::to_owned),
            tenant: "default".into(),
            quota_memory_default: None,
            hostname: "h".into(),
            created_at_ms: 1,
            ttl_deadline_ms: None,
            remove_after_exit_ms: None,
            spec: CreateSandbox {
                name: name.map(str::to_owned),
                labels: [("a".to_string(), "1".to_string())].into(),
                ..CreateSandbox::new(vec!["true".into()])
            },
        }
    }

    #[tokio::test]
    async fn slots_are_lowest_free_and_names_unique() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let a = new(Some("a"));
        assert_eq!(store.insert_creating(&a, Some(2)).await.unwrap(), Some(0));
        let b = new(None);
        assert_eq!(store.insert_creating(&b, Some(2)).await.unwrap(), Some(1));
        assert!(matches!(
            store.insert_creating(&new(None), Some(2)).await,
            Err(StoreError::NoCapacity)
        ));
        assert!(matches!(
            store.insert_creating(&new(Some("a")), None).await,
            Err(StoreError::NameTaken)
        ));
        let end = Ending {
            state: SandboxState::Exited,
            exit_code: Some(0),
            signal: None,
            reason: EndReason::Exited,
            error: None,
            finished_at_ms: 2,
            stats: None,
        };
        assert!(store.finish(a.id, &end, 1).await.unwrap());
        assert!(!store.finish(a.id, &end, 1).await.unwrap());
        assert_eq!(
            store.insert_creating(&new(None), Some(2)).await.unwrap(),
            Some(0)
        );
        let q = ListQuery {
            labels: vec![("a".into(), "1".into())],
            limit: 2,
            ..Default::default()
        };
        let (items, next) = store.list(&q).await.unwrap();
        assert_eq!(items.len(), 2);
        let (rest, none) = store
            .list(&ListQuery {
                before_seq: next,
                ..q
            })
            .await
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, a.id);
        assert!(none.is_none());
    }

    #[tokio::test]
    async fn a_kill_reason_survives_until_the_exit_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let mut a = new(None);
        a.remove_after_exit_ms = Some(5000);
        a.ttl_deadline_ms = Some(100);
        store.insert_creating(&a, None).await.unwrap();
        store.set_running(a.id, 2, 10, 1000).await.unwrap();
        store.set_kill_reason(a.id, EndReason::Ttl).await.unwrap();
        // A new Store, as after a daemon restart.
        drop(store);
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let (due, next) = store.deadlines(1000).await.unwrap();
        assert_eq!((due, next), (vec![(a.id, Deadline::Ttl)], None));
        let end = Ending {
            state: SandboxState::Exited,
            exit_code: Some(137),
            signal: Some("SIGKILL".into()),
            reason: EndReason::Killed,
            error: None,
            finished_at_ms: 2000,
            stats: Some(SandboxStats {
                output_bytes: 9,
                output_truncated: true,
                ..SandboxStats::default()
            }),
        };
        let now = 5_000;
        assert!(store.finish(a.id, &end, now).await.unwrap());
        let row = store.get(a.id).await.unwrap().unwrap();
        assert_eq!(row.reason, Some(EndReason::Ttl));
        assert!(row.output_truncated);
        let stored = store.stats(a.id).await.unwrap().unwrap();
        assert_eq!(stored.stats.unwrap().output_bytes, 9);
        // remove_at = the lifetime clock when the exit was recorded + remove_after_exit.
        store.set_ttl_deadline(a.id, i64::MAX / 2).await.unwrap();
        let (due, next) = store.deadlines(1000).await.unwrap();
        let next = next.unwrap();
        assert!(due.is_empty() && next == now + 5000, "{next}");
        let (due, _) = store.deadlines(now + 5000).await.unwrap();
        assert_eq!(due, vec![(a.id, Deadline::RemoveAfterExit)]);
    }

    #[tokio::test]
    async fn a_created_sandbox_holds_its_slot_until_it_starts_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let a = new(None);
        assert_eq!(store.insert_creating(&a, Some(2)).await.unwrap(), Some(0));
        assert!(store.set_created(a.id).await.unwrap());
        assert_eq!(
            store.get(a.id).await.unwrap().unwrap().state,
            SandboxState::Created
        );
        // Its slot stays taken.
        assert_eq!(
            store.insert_creating(&new(None), Some(2)).await.unwrap(),
            Some(1)
        );
        assert!(store.start_created(a.id).await.unwrap());
        assert!(!store.start_created(a.id).await.unwrap());
        assert_eq!(
            store.get(a.id).await.unwrap().unwrap().state,
            SandboxState::Creating
        );
        // The same database opened again (migrations already applied) accepts the state too.
        drop(store);
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let b = new(None);
        store.insert_creating(&b, None).await.unwrap();
        assert!(store.set_created(b.id).await.unwrap());
    }
}

// ---- Execs (issue 6) -------------------------------------------------------------------------

const EXEC_COLUMNS: &str =
    "id, sandbox_id, state, exit_code, signal, error, created_at, started_at, finished_at, spec";

/// How an exec ended, as stored.
#[derive(Debug, Clone)]
pub struct ExecEnding {
    pub state: SandboxState,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
    pub finished_at_ms: i64,
}

impl Store {
    /// Insert an exec in state `creating`, only while its sandbox is `running` (false otherwise).
    pub async fn insert_exec(
        &self,
        id: Uuid,
        sandbox: Uuid,
        created_at_ms: i64,
        spec: &sandboxd_api::CreateExec,
    ) -> Result<bool, StoreError> {
        let spec = serde_json::to_string(spec).map_err(corrupt_json(id))?;
        let done = sqlx::query(
            "INSERT INTO execs (id, sandbox_id, state, created_at, spec)
             SELECT ?1, ?2, 'creating', ?3, ?4
              WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?2 AND state = 'running')",
        )
        .bind(id.to_string())
        .bind(sandbox.to_string())
        .bind(created_at_ms)
        .bind(spec)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_exec_running(&self, id: Uuid, started_at_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE execs SET state = 'running', started_at = ? WHERE id = ? AND state = 'creating'",
        )
        .bind(started_at_ms)
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Record how a live exec ended. Returns false when it was already final (or gone).
    pub async fn finish_exec(&self, id: Uuid, end: &ExecEnding) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE execs SET state = ?1, exit_code = ?2, signal = ?3, error = ?4, finished_at = ?5
              WHERE id = ?6 AND state IN ('creating', 'running')",
        )
        .bind(end.state.as_str())
        .bind(end.exit_code)
        .bind(end.signal.as_deref())
        .bind(end.error.as_deref())
        .bind(end.finished_at_ms)
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forget an exec that never started (the sandbox ended before it could).
    pub async fn delete_exec(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM execs WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// One exec of one sandbox.
    pub async fn exec(
        &self,
        sandbox: Uuid,
        id: Uuid,
    ) -> Result<Option<sandboxd_api::Exec>, StoreError> {
        let sql = format!("SELECT {EXEC_COLUMNS} FROM execs WHERE id = ? AND sandbox_id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(sandbox.to_string())
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(exec_from_row).transpose()
    }

    /// Every exec of a sandbox, oldest first.
    pub async fn execs(&self, sandbox: Uuid) -> Result<Vec<sandboxd_api::Exec>, StoreError> {
        let sql = format!("SELECT {EXEC_COLUMNS} FROM execs WHERE sandbox_id = ? ORDER BY seq ASC");
        let rows = sqlx::query(&sql)
            .bind(sandbox.to_string())
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(exec_from_row).collect()
    }

    /// Execs not final yet, across all sandboxes (for reconciliation at start).
    pub async fn live_execs(&self) -> Result<Vec<sandboxd_api::Exec>, StoreError> {
        let sql = format!(
            "SELECT {EXEC_COLUMNS} FROM execs WHERE state IN ('creating', 'running') ORDER BY seq"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.writer).await?;
        rows.iter().map(exec_from_row).collect()
    }
}

fn exec_from_row(row: &SqliteRow) -> Result<sandboxd_api::Exec, StoreError> {
    let id = parse_uuid(&row.try_get::<String, _>(0)?)?;
    let state: String = row.try_get(2)?;
    let spec: String = row.try_get(9)?;
    Ok(sandboxd_api::Exec {
        id,
        sandbox_id: parse_uuid(&row.try_get::<String, _>(1)?)?,
        state: SandboxState::parse(&state).ok_or_else(|| StoreError::Corrupt {
            id: id.to_string(),
            what: format!("state {state:?}"),
        })?,
        exit_code: row.try_get(3)?,
        signal: row.try_get(4)?,
        error: row.try_get(5)?,
        created_at: time_of(row.try_get(6)?),
        started_at: row.try_get::<Option<i64>, _>(7)?.map(time_of),
        finished_at: row.try_get::<Option<i64>, _>(8)?.map(time_of),
        spec: serde_json::from_str(&spec).map_err(corrupt_json(id))?,
    })
}
