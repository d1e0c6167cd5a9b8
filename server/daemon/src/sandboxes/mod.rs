//! The sandbox lifecycle: create, watch, wait, kill, delete, and reconciliation at start.
//!
//! Every running sandbox has one watcher task (see [`watcher`]) holding a connection to its
//! monitor; when the monitor closes it the watcher records the exit in the store and notifies
//! everyone waiting through a `tokio::sync::watch` channel kept in the in-memory registry. No
//! per-sandbox polling happens anywhere.
//!
//! Lifetimes (`ttl_secs`, `remove_after_exit_secs`, `/extend`) are enforced by one reaper task
//! (see [`reaper`]) that sleeps until the earliest deadline in the store.

mod egress;
mod execs;
mod files;
mod images;
mod monitor;
mod network;
mod reaper;
mod watcher;

pub use crate::store::ListQuery;
pub use egress::{EgressLinkError, MAX_DENIALS_LISTED};
pub use execs::{AttachSession, ExecError};
pub use files::{FileError, Transfer};
pub use images::ImageError;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandboxd_api::{EndReason, Info, NetworkInfo, Sandbox, SandboxState, Stats};
use sandboxd_protocol::layout::SandboxDir;
use sandboxd_protocol::rules::Signal;
use sandboxd_protocol::wire::{HelperErrorCode, Mode, SandboxStats};
use tokio::sync::{watch, Notify, OnceCell};
use uuid::Uuid;

use crate::helper_client::{self, Helper, HelperClientError};
use crate::lifetime::Clock;
use crate::limits::{self, HostLimits, LimitError, LimitPolicy, Resolved};
use crate::storage::{FreeSpace, Reserve, StorageError};
use crate::store::{Ending, NewSandbox, Store, StoreError};
use crate::validate::ValidCreate;
use files::spawn_request;
use monitor::MonitorError;

/// How long `DELETE` waits for a killed sandbox to end.
const DELETE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, and how far apart, `DELETE` retries a helper that is still releasing a sandbox.
const DESTROY_BUSY_ATTEMPTS: u32 = 60;
const DESTROY_BUSY_PAUSE: Duration = Duration::from_millis(50);

/// Why a lifecycle operation (create, start, wait, kill, delete, stats, extend) failed. Execs,
/// files and images have their own errors ([`ExecError`], [`FileError`], [`ImageError`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no such sandbox")]
    NotFound,
    #[error("the name is already taken")]
    NameTaken,
    #[error("sandboxes of several tenants are named {0:?}: address it by id")]
    AmbiguousName(String),
    #[error("no free uid range: too many sandboxes are running")]
    NoCapacity,
    #[error("the sandbox is not running")]
    NotRunning,
    #[error("the sandbox is not in state created (it was started already)")]
    NotCreated,
    #[error("signal {0:?} is not allowed")]
    BadSignal(String),
    #[error("setting up sandbox {id} failed")]
    SpawnFailed {
        id: Uuid,
        #[source]
        source: HelperClientError,
    },
    #[error("the sandbox did not stop in time")]
    StopTimeout,
    /// Something holds the sandbox for a moment; the message (for the client) says what.
    #[error("the sandbox is busy: {0}")]
    Busy(String),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("this tenant has a memory quota: the sandbox needs limits.memory_bytes")]
    MemoryLimitRequired,
    #[error("rootfs.image: this tenant has no image named {0:?}")]
    UnknownImage(String),
    /// The request and its image give nothing valid to run.
    #[error(transparent)]
    Launch(#[from] crate::validate::LaunchError),
    /// `user` names nobody the root filesystem knows (the helper's message).
    #[error("user: {0}")]
    UnknownUser(String),
    #[error("{0}")]
    NetworkUnavailable(String),
    #[error("{0}")]
    PortInUse(String),
    #[error("{0}")]
    PortNotAllowed(String),
    /// The state filesystem is down to its free-space reserve (507).
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("no free address in the sandbox subnet: too many bridged sandboxes are running")]
    NoAddress,
    #[error("{0}")]
    EgressUnavailable(String),
    #[error("network.egress: tenant {0:?} may not use egress on this daemon (--egress-tenants)")]
    EgressNotAllowed(String),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("helper")]
    Helper(#[from] HelperClientError),
    #[error("monitor")]
    Monitor(#[from] MonitorError),
    #[error("internal task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl SandboxError {
    /// For `SpawnFailed`: what the sandbox's `error` field records (the helper's message).
    pub fn spawn_failure(&self) -> Option<String> {
        match self {
            SandboxError::SpawnFailed { source, .. } => Some(spawn_failure_text(source)),
            _ => None,
        }
    }
}

fn spawn_failure_text(source: &HelperClientError) -> String {
    match source {
        HelperClientError::Refused(e) => e.message.clone(),
        other => other.to_string(),
    }
}

/// Which sandboxes a caller may see: a `user` token sees only its tenant's, an `admin` every one.
/// A sandbox outside the scope is answered exactly like one that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Tenant(String),
}

impl Scope {
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Tenant(t) => Some(t),
        }
    }
}

/// The lifecycle service shared by all handlers.
pub struct Service {
    store: Store,
    helper: Arc<dyn Helper>,
    clock: Arc<dyn Clock>,
    state_dir: PathBuf,
    uid_slots: u32,
    policy: LimitPolicy,
    /// What the host can enforce, asked of the helper once.
    host: OnceCell<HostLimits>,
    /// One entry per sandbox that is not final yet; the value turns `true` when it is.
    live: Mutex<HashMap<Uuid, watch::Sender<bool>>>,
    /// Wakes the reaper when a deadline may have moved earlier.
    reaper_wake: Notify,
    /// Sandboxes the reaper is removing right now.
    reaping: Mutex<HashSet<Uuid>>,
    /// Like `live`, for execs (see [`execs`]).
    live_execs: Mutex<HashMap<Uuid, watch::Sender<bool>>>,
    /// Orders image deletion against creation from an image (see `images.rs`).
    image_lock: Arc<tokio::sync::RwLock<()>>,
    /// The helper's subnet when it offers bridge mode (asked once; see `network.rs`).
    net_subnet: OnceCell<Option<sandboxd_protocol::net::Subnet>>,
    /// What must stay free on the state directory's filesystem (`--min-free-space`).
    min_free_space: std::sync::RwLock<Reserve>,
    /// Egress: the helper's status and the filter link (set by `start_egress`).
    egress: std::sync::OnceLock<egress::EgressState>,
}

impl Service {
    pub fn new(
        store: Store,
        helper: Arc<dyn Helper>,
        clock: Arc<dyn Clock>,
        state_dir: &Path,
        uid_slots: u32,
        policy: LimitPolicy,
    ) -> Arc<Self> {
        Arc::new(Service {
            store,
            helper,
            clock,
            state_dir: state_dir.to_owned(),
            uid_slots,
            policy,
            host: OnceCell::new(),
            live: Mutex::new(HashMap::new()),
            reaper_wake: Notify::new(),
            reaping: Mutex::new(HashSet::new()),
            live_execs: Mutex::new(HashMap::new()),
            image_lock: Arc::new(tokio::sync::RwLock::new(())),
            net_subnet: OnceCell::new(),
            min_free_space: std::sync::RwLock::new(Reserve::default()),
            egress: std::sync::OnceLock::new(),
        })
    }

    /// Set the free-space reserve (`--min-free-space`; the default is [`Reserve::default`]).
    pub fn set_min_free_space(&self, reserve: Reserve) {
        *self
            .min_free_space
            .write()
            .unwrap_or_else(|p| p.into_inner()) = reserve;
    }

    /// Bytes the daemon may still add to its state filesystem before the reserve;
    /// `InsufficientStorage` (507) when it is down to it. A filesystem that cannot be measured
    /// does not block anything (it is logged).
    pub(crate) fn require_storage(&self) -> Result<u64, SandboxError> {
        let reserve = *self
            .min_free_space
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match FreeSpace::new(&self.state_dir, reserve).headroom() {
            Ok(n) => Ok(n),
            Err(e @ StorageError::BelowReserve { .. }) => {
                tracing::warn!(error = %e, "refusing new data: the free-space reserve is reached");
                Err(SandboxError::InsufficientStorage(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(error = %crate::chain(&e), "cannot measure the free space");
                Ok(u64::MAX)
            }
        }
    }

    /// Fit the sandbox's disk cap to the state filesystem, which holds its image
    /// ([`limits::fit_disk`]). A filesystem that cannot be measured leaves the cap as it is.
    pub(crate) fn fit_disk(
        &self,
        resolved: &mut limits::Resolved,
        spec: &sandboxd_api::CreateSandbox,
    ) -> Result<(), SandboxError> {
        match crate::storage::capacity(&self.state_dir) {
            Ok(capacity) => Ok(limits::fit_disk(
                resolved,
                spec.limits.disk_bytes.is_some(),
                capacity,
            )?),
            Err(e) => {
                tracing::warn!(error = %crate::chain(&e), "cannot measure the state filesystem");
                Ok(())
            }
        }
    }

    pub fn policy(&self) -> &LimitPolicy {
        &self.policy
    }

    /// What the host can enforce (asked of the helper on first use; the answer does not change
    /// while the helper lives, and the daemon exits with its helper).
    pub async fn host_limits(&self) -> Result<&HostLimits, SandboxError> {
        self.host
            .get_or_try_init(|| async {
                let info = helper_client::info(&*self.helper).await?;
                Ok::<_, SandboxError>(HostLimits::from_info(&info))
            })
            .await
    }

    /// Ask the helper what it enforces and warn about daemon defaults that cannot apply.
    pub async fn check_host_limits(&self) -> Result<(), SandboxError> {
        let host = self.host_limits().await?;
        tracing::info!(enforceable = ?host.enforceable, cgroup = %host.cgroup_version, "resource limits");
        for warning in self.policy.unapplied_defaults(host) {
            tracing::warn!("{warning}");
        }
        Ok(())
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The clock every reading of time in the services comes from.
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// A sandbox by id, whoever owns it (for a caller that found it within its scope before).
    pub async fn sandbox(&self, id: Uuid) -> Result<Option<Sandbox>, SandboxError> {
        Ok(self.store.get(id).await?)
    }

    pub fn dir(&self, id: Uuid) -> SandboxDir {
        SandboxDir::new(&self.state_dir, id)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<bool>>> {
        // A panic while holding this lock cannot leave the map inconsistent (every operation is a
        // single insert or remove), so a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, id: Uuid) {
        self.registry()
            .entry(id)
            .or_insert_with(|| watch::channel(false).0);
    }

    /// Mark a sandbox final for everyone waiting on it (and for the reaper: its
    /// `remove_after_exit` deadline is set now).
    fn notify_final(&self, id: Uuid) {
        if let Some(tx) = self.registry().remove(&id) {
            tx.send_replace(true);
        }
        self.reaper_wake.notify_one();
    }

    /// A receiver that turns `true` when the sandbox is final; `None` if it already is (or is
    /// unknown).
    pub fn subscribe(&self, id: Uuid) -> Option<watch::Receiver<bool>> {
        self.registry().get(&id).map(watch::Sender::subscribe)
    }

    /// Find a sandbox by id (anything that parses as a UUID) or by name, within `scope`. Names
    /// are unique per tenant: an admin's name that several tenants use is `AmbiguousName`.
    pub async fn find(&self, scope: &Scope, id_or_name: &str) -> Result<Sandbox, SandboxError> {
        let found = match Uuid::parse_str(id_or_name) {
            Ok(id) => self.store.get_in(id, scope.tenant()).await?,
            Err(_) => match self.store.get_by_name_in(id_or_name, scope.tenant()).await {
                Err(StoreError::AmbiguousName(name)) => {
                    return Err(SandboxError::AmbiguousName(name))
                }
                other => other?,
            },
        };
        found.ok_or(SandboxError::NotFound)
    }

    pub async fn list(&self, q: &ListQuery) -> Result<(Vec<Sandbox>, Option<i64>), SandboxError> {
        Ok(self.store.list(q).await?)
    }

    /// Create and start a sandbox in `tenant`; with `wait`, answer only once it has ended.
    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        v: ValidCreate,
        wait: bool,
    ) -> Result<Sandbox, SandboxError> {
        let mut resolved = limits::resolve(&self.policy, self.host_limits().await?, &v.spec)?;
        self.fit_disk(&mut resolved, &v.spec)?;
        self.require_storage()?;
        let capabilities =
            limits::resolve_capabilities(&self.policy, v.spec.capabilities.as_ref())?;
        if v.spec.nested_user_namespaces && !self.policy.allow_nested_userns {
            return Err(limits::LimitError::NestedUsernsNotAllowed.into());
        }
        let image = match &v.spec.rootfs {
            Some(rootfs) => Some(self.resolve_image(tenant, &rootfs.image).await?),
            None => None,
        };
        // What runs is known before anything is created: a request that, with its image, names
        // no program is refused here (the host name is only needed for the environment).
        v.launch(image.as_ref().map(|i| &i.config), "")?;
        self.check_network(&v.spec).await?;
        self.check_create_egress(tenant, &v.spec)?;
        // The setup runs in its own task so that a client hanging up cannot leave a row in
        // `creating` without a watcher.
        let svc = Arc::clone(self);
        let tenant = tenant.to_owned();
        let start = v.spec.start;
        let id = tokio::spawn(async move {
            svc.create_and_start(tenant, v, resolved, capabilities, image)
                .await
        })
        .await??;
        if wait && start {
            self.wait(id).await
        } else {
            self.store.get(id).await?.ok_or(SandboxError::NotFound)
        }
    }

    async fn create_and_start(
        self: Arc<Self>,
        tenant: String,
        v: ValidCreate,
        resolved: Resolved,
        capabilities: Option<Vec<String>>,
        image: Option<images::ResolvedImage>,
    ) -> Result<Uuid, SandboxError> {
        let id = Uuid::new_v4();
        let hostname = v.hostname_for(id);
        let launch = v.launch(image.as_ref().map(|i| &i.config), &hostname)?;
        let created_at_ms = self.clock.now_unix_ms();
        // The stored spec shows the limits in effect, daemon defaults included.
        let mut spec = v.spec.clone();
        spec.limits = resolved.limits.clone();
        let new = NewSandbox {
            id,
            name: v.name.clone(),
            tenant,
            quota_memory_default: self.policy.max_memory,
            hostname: hostname.clone(),
            created_at_ms,
            ttl_deadline_ms: spec.ttl_secs.map(|t| self.clock.now_ms() + secs_to_ms(t)),
            remove_after_exit_ms: spec.remove_after_exit_secs.map(secs_to_ms),
            spec,
        };
        let slots = (self.helper.mode() == Mode::Privileged).then_some(self.uid_slots);
        self.register(id);
        let uid_slot = match self.store.insert_creating(&new, slots).await {
            Ok(slot) => slot,
            Err(e) => {
                self.registry().remove(&id);
                return Err(match e {
                    StoreError::NameTaken => SandboxError::NameTaken,
                    StoreError::NoCapacity => SandboxError::NoCapacity,
                    StoreError::QuotaExceeded(m) => SandboxError::QuotaExceeded(m),
                    StoreError::MemoryLimitRequired => SandboxError::MemoryLimitRequired,
                    other => other.into(),
                });
            }
        };
        if let Some(policy) = v.spec.network.as_ref().and_then(|n| n.egress.as_ref()) {
            if let Err(e) = self
                .store
                .set_egress_policy(id, policy, created_at_ms)
                .await
            {
                let _ = self.store.delete(id).await;
                self.registry().remove(&id);
                return Err(e.into());
            }
        }
        let (net_info, network) = if v.spec.start {
            match self.assign_network(id, &v.spec).await {
                Ok(n) => n,
                Err(e) => {
                    // Nothing was started: the row goes, as if the request had never come.
                    let _ = self.store.delete(id).await;
                    self.registry().remove(&id);
                    return Err(e);
                }
            }
        } else {
            (NetworkInfo::default(), None)
        };
        let mut request = spawn_request(
            id,
            uid_slot,
            hostname,
            &v,
            launch,
            &resolved,
            capabilities,
            // The image's guard is held until the spawn has answered.
            image.as_ref().map(|i| i.digest.clone()),
            network,
            false,
        );
        let start = v.spec.start;
        // A slot the database thinks free can still be held by a monitor whose sandbox the
        // database lost track of (marked lost, or a row deleted by hand); the helper refuses it
        // and we move on to the next free slot instead of failing every create.
        let mut busy_slots = Vec::new();
        let result = loop {
            let result = if start {
                helper_client::spawn(&*self.helper, request.clone())
                    .await
                    .map(Some)
            } else {
                helper_client::prepare(&*self.helper, request.clone())
                    .await
                    .map(|()| None)
            };
            match (&result, request.uid_slot) {
                (Err(HelperClientError::Refused(e)), Some(slot))
                    if e.code == HelperErrorCode::SlotBusy && busy_slots.len() < 8 =>
                {
                    tracing::warn!(%id, slot, "uid slot still held by a live monitor; trying another");
                    busy_slots.push(slot);
                    match self
                        .store
                        .reassign_slot(id, &busy_slots, self.uid_slots)
                        .await
                    {
                        Ok(next) => request.uid_slot = Some(next),
                        Err(_) => break result,
                    }
                }
                _ => break result,
            }
        };
        if new.ttl_deadline_ms.is_some() {
            self.reaper_wake.notify_one();
        }
        match result {
            // Created without starting: it waits in `created` for POST /start.
            Ok(None) => {
                self.store.set_created(id).await?;
                // Nothing runs: `wait` answers at once until it is started (as after a restart).
                self.registry().remove(&id);
                Ok(id)
            }
            Ok(Some(spawned)) => self.spawned(id, net_info, false, Ok(spawned)).await,
            Err(e) => self.spawned(id, net_info, false, Err(e)).await,
        }
    }

    /// Record the outcome of a spawn: `running` with a watcher, or `failed` and cleaned up.
    /// `prepared`: the start of a sandbox created with `"start": false`.
    async fn spawned(
        self: &Arc<Self>,
        id: Uuid,
        net_info: NetworkInfo,
        prepared: bool,
        result: Result<sandboxd_protocol::wire::Spawned, HelperClientError>,
    ) -> Result<Uuid, SandboxError> {
        match result {
            // A port conflict on a new sandbox is answered as if it had never been asked for. A
            // created sandbox's start fails like any other failed start (below), its row kept.
            Err(HelperClientError::Refused(e))
                if e.code == HelperErrorCode::PortInUse && !prepared =>
            {
                // A conflict, not a failure: nothing was started and nothing is kept (the helper
                // rolled back already; this only makes sure).
                match helper_client::destroy(&*self.helper, id).await {
                    Ok(()) => {}
                    Err(HelperClientError::Refused(e)) if e.code == HelperErrorCode::NotFound => {}
                    Err(e) => tracing::warn!(%id, error = %e, "removing a refused sandbox failed"),
                }
                let _ = self.store.delete(id).await;
                self.forget_policy(id);
                self.notify_final(id);
                Err(SandboxError::PortInUse(e.message))
            }
            // Likewise a user the root does not know: the helper refused before creating
            // anything.
            Err(HelperClientError::Refused(e))
                if e.code == HelperErrorCode::UnknownUser && !prepared =>
            {
                let _ = self.store.delete(id).await;
                self.notify_final(id);
                Err(SandboxError::UnknownUser(e.message))
            }
            Ok(spawned) => {
                self.record_ports(id, net_info, &spawned.ports).await?;
                self.store
                    .set_running(
                        id,
                        spawned.started_at_unix_ms,
                        spawned.init_pid,
                        spawned.host_uid,
                    )
                    .await?;
                if let Some(e) = &spawned.exec_error {
                    tracing::info!(%id, error = %e, "command could not be executed");
                }
                self.start_watcher(id);
                Ok(id)
            }
            Err(source) => {
                tracing::error!(%id, error = %source, "spawning a sandbox failed");
                let end = Ending {
                    state: SandboxState::Failed,
                    exit_code: None,
                    signal: None,
                    reason: EndReason::SpawnFailed,
                    error: Some(spawn_failure_text(&source)),
                    finished_at_ms: self.clock.now_unix_ms(),
                    stats: None,
                };
                if let Err(e) = self.store.finish(id, &end, self.clock.now_ms()).await {
                    tracing::error!(%id, error = %e, "recording a failed spawn failed");
                }
                // Keep both errors: the spawn failure is reported, a cleanup failure is logged.
                if let Err(e) = helper_client::destroy(&*self.helper, id).await {
                    tracing::warn!(%id, error = %e, "removing a failed sandbox failed");
                }
                self.forget_policy(id);
                self.notify_final(id);
                match source {
                    HelperClientError::Refused(e) if e.code == HelperErrorCode::PortInUse => {
                        Err(SandboxError::PortInUse(e.message))
                    }
                    HelperClientError::Refused(e) if e.code == HelperErrorCode::UnknownUser => {
                        Err(SandboxError::UnknownUser(e.message))
                    }
                    source => Err(SandboxError::SpawnFailed { id, source }),
                }
            }
        }
    }

    fn start_watcher(self: &Arc<Self>, id: Uuid) {
        self.register(id);
        tokio::spawn(watcher::watch(Arc::clone(self), id));
    }

    /// Wait until the sandbox is final and return it.
    pub async fn wait(&self, id: Uuid) -> Result<Sandbox, SandboxError> {
        // Subscribe before reading the row, so that an exit in between is not missed.
        if let Some(mut rx) = self.subscribe(id) {
            // An error means the sender is gone, which happens only after it was set final.
            let _ = rx.wait_for(|done| *done).await;
        }
        self.store.get(id).await?.ok_or(SandboxError::NotFound)
    }

    /// Wait until `id` meets `condition`, for at most `timeout` (none: as long as it takes).
    /// `Ok(None)`: the time ran out first. `Removed` answers the sandbox as last seen.
    pub async fn wait_for(
        &self,
        id: Uuid,
        condition: WaitCondition,
        timeout: Option<std::time::Duration>,
    ) -> Result<Option<Sandbox>, SandboxError> {
        let waited = async {
            match condition {
                // The final state has a notification; the others are polled (they are rare,
                // and a row read is cheap).
                WaitCondition::Exited => self.wait(id).await.map(Some),
                WaitCondition::Running | WaitCondition::Removed => {
                    let mut last = None;
                    loop {
                        match self.store.get(id).await? {
                            None if condition == WaitCondition::Removed => {
                                return last.ok_or(SandboxError::NotFound).map(Some)
                            }
                            None => return Err(SandboxError::NotFound),
                            Some(s)
                                if condition == WaitCondition::Running
                                    && (s.state == SandboxState::Running || s.state.is_final()) =>
                            {
                                return Ok(Some(s))
                            }
                            Some(s) => last = Some(s),
                        }
                        tokio::time::sleep(WAIT_POLL).await;
                    }
                }
            }
        };
        match timeout {
            None => waited.await,
            Some(t) => match tokio::time::timeout(t, waited).await {
                Ok(result) => result,
                Err(_elapsed) => Ok(None),
            },
        }
    }

    /// Deliver a signal (a name like `SIGTERM`/`TERM` or a number; SIGKILL when absent).
    pub async fn kill(
        &self,
        scope: &Scope,
        id_or_name: &str,
        signal: Option<&str>,
    ) -> Result<Sandbox, SandboxError> {
        let signo = match signal {
            Some(s) => Signal::parse(s)
                .map_err(|_| SandboxError::BadSignal(s.to_owned()))?
                .number(),
            None => Signal::KILL.number(),
        };
        let sandbox = self.find(scope, id_or_name).await?;
        if sandbox.state != SandboxState::Running {
            return Err(SandboxError::NotRunning);
        }
        match monitor::kill(&self.dir(sandbox.id).monitor_socket(), signo).await {
            Ok(()) => {}
            Err(MonitorError::Gone(_)) => return Err(SandboxError::NotRunning),
            Err(e) => return Err(e.into()),
        }
        self.store
            .get(sandbox.id)
            .await?
            .ok_or(SandboxError::NotFound)
    }

    /// Stop (SIGKILL) if needed, remove every trace through the helper, then forget the row.
    pub async fn delete(&self, scope: &Scope, id_or_name: &str) -> Result<(), SandboxError> {
        let sandbox = self.find(scope, id_or_name).await?;
        let id = sandbox.id;
        if sandbox.state == SandboxState::Created {
            // Nothing runs: whoever waits on it is told it is gone.
            self.notify_final(id);
        } else if !sandbox.state.is_final() {
            match monitor::kill(&self.dir(id).monitor_socket(), 9).await {
                Ok(()) | Err(MonitorError::Gone(_)) => {}
                Err(e) => tracing::warn!(%id, error = %e, "kill before delete failed"),
            }
            tokio::time::timeout(DELETE_STOP_TIMEOUT, self.wait(id))
                .await
                .map_err(|_| SandboxError::StopTimeout)??;
        }
        // The monitor closes its socket (and so the sandbox becomes final) a moment before it
        // exits and releases the sandbox, so the helper may still answer Busy for a short while.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match helper_client::destroy(&*self.helper, id).await {
                Ok(()) => break,
                Err(HelperClientError::Refused(e)) if e.code == HelperErrorCode::NotFound => break,
                Err(HelperClientError::Refused(e)) if e.code == HelperErrorCode::Busy => {
                    if attempt >= DESTROY_BUSY_ATTEMPTS {
                        tracing::warn!(%id, error = %e.message, "the helper still holds the sandbox");
                        return Err(SandboxError::Busy(
                            "the sandbox is still stopping, or a file transfer holds it; retry"
                                .into(),
                        ));
                    }
                    tokio::time::sleep(DESTROY_BUSY_PAUSE).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !self.store.delete(id).await? {
            return Err(SandboxError::NotFound);
        }
        self.forget_policy(id);
        Ok(())
    }

    /// What this host can do, from the helper's point of view plus the daemon's constants.
    /// `GET /readyz`: whether the database and the helper answer, each within `within`.
    pub async fn readiness(
        &self,
        within: std::time::Duration,
    ) -> (Result<(), String>, Result<(), String>) {
        let db = match tokio::time::timeout(within, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::chain(&e)),
            Err(_) => Err("no answer in time".to_owned()),
        };
        let helper = match tokio::time::timeout(within, helper_client::info(&*self.helper)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(crate::chain(&e)),
            Err(_) => Err("no answer in time".to_owned()),
        };
        (db, helper)
    }

    pub async fn info(&self) -> Result<Info, SandboxError> {
        let h = helper_client::info(&*self.helper).await?;
        let unenforced = self
            .policy
            .unenforced(&HostLimits::from_info(&h))
            .into_iter()
            .map(|(limit, reason)| sandboxd_api::UnenforcedLimit {
                limit: limit.to_owned(),
                reason,
            })
            .collect();
        Ok(Info {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: h.mode.as_str().to_owned(),
            user_namespaces: h.user_namespaces,
            namespaces: ["user", "pid", "mount", "uts", "ipc", "net", "cgroup"]
                .map(String::from)
                .to_vec(),
            cgroup: sandboxd_api::CgroupInfo {
                version: h.cgroup_version,
                controllers: h.cgroup_controllers,
            },
            overlayfs: h.overlayfs,
            network_modes: if h.network_modes.is_empty() {
                vec!["none".to_owned()]
            } else {
                h.network_modes
            },
            uid_ranges: sandboxd_api::UidRanges {
                base: h.uid_base,
                size: h.uid_range_size,
                slots: h.uid_slots,
            },
            unenforced,
            limits: h.enforceable_limits,
            preflight: h
                .preflight
                .into_iter()
                .map(|c| sandboxd_api::PreflightCheck {
                    name: c.name,
                    ok: c.ok,
                    detail: c.detail,
                    fix: c.fix,
                })
                .collect(),
            egress: self.egress_info(),
        })
    }

    /// Resource figures: live from the helper while the sandbox runs, the stored final ones after.
    pub async fn stats(&self, scope: &Scope, id_or_name: &str) -> Result<Stats, SandboxError> {
        let sandbox = self.find(scope, id_or_name).await?;
        let id = sandbox.id;
        let mut stats = self.resource_stats(&sandbox).await?;
        stats.egress = self.egress_counters(id).await?;
        Ok(stats)
    }

    async fn resource_stats(&self, sandbox: &Sandbox) -> Result<Stats, SandboxError> {
        let id = sandbox.id;
        if sandbox.state == SandboxState::Running {
            match helper_client::stats(&*self.helper, id).await {
                Ok(s) => return Ok(api_stats(s)),
                // It ended in between: its final figures are being recorded.
                Err(HelperClientError::Refused(e))
                    if matches!(e.code, HelperErrorCode::NotFound | HelperErrorCode::Busy) =>
                {
                    let _ = tokio::time::timeout(STATS_FINAL_WAIT, self.wait(id)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let stored = self.store.stats(id).await?.ok_or(SandboxError::NotFound)?;
        Ok(match stored.stats {
            Some(s) => api_stats(s),
            // Never started, still being created, or lost: only the log can be measured.
            None => Stats {
                output_bytes: tokio::fs::metadata(self.dir(id).output_log())
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0),
                output_truncated: stored.output_truncated,
                ..Stats::default()
            },
        })
    }

    /// Move the TTL deadline of a sandbox to `ttl_secs` from now (also when it had none).
    pub async fn extend(
        &self,
        scope: &Scope,
        id_or_name: &str,
        ttl_secs: u64,
    ) -> Result<Sandbox, SandboxError> {
        limits::check_ttl(&self.policy, ttl_secs)?;
        let sandbox = self.find(scope, id_or_name).await?;
        let deadline = self.clock.now_ms() + secs_to_ms(ttl_secs);
        if !self.store.set_ttl_deadline(sandbox.id, deadline).await? {
            return Err(SandboxError::NotFound);
        }
        self.reaper_wake.notify_one();
        // Answered as it is now: its `expires_at` shows the new deadline.
        self.store
            .get(sandbox.id)
            .await?
            .ok_or(SandboxError::NotFound)
    }

    /// Bring the store and the sandbox directories back in line after a (possibly unclean) stop:
    /// live rows get a watcher again or are marked lost, directories without a row are removed.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), SandboxError> {
        let on_disk: HashSet<Uuid> = helper_client::list(&*self.helper)
            .await?
            .into_iter()
            .collect();
        for sandbox in self.store.live().await? {
            let id = sandbox.id;
            if on_disk.contains(&id) {
                tracing::info!(%id, "watching sandbox again after restart");
                self.start_watcher(id);
            } else {
                tracing::warn!(%id, "sandbox directory is gone; marking the sandbox lost");
                let why = lost(
                    "the sandbox directory disappeared",
                    self.clock.now_unix_ms(),
                );
                self.store.finish(id, &why, self.clock.now_ms()).await?;
            }
        }
        let known: HashSet<Uuid> = self.store.ids().await?.into_iter().collect();
        for id in on_disk.difference(&known) {
            // A sandbox nobody knows of (its row was lost) may still run: stop it first, through
            // its monitor, then remove every trace. Never leave it silently.
            let socket = self.dir(*id).monitor_socket();
            if let Ok(stream) = monitor::connect(&socket).await {
                if monitor::kill(&socket, 9).await.is_ok() {
                    let _ =
                        tokio::time::timeout(DELETE_STOP_TIMEOUT, monitor::wait_for_close(stream))
                            .await;
                }
            }
            let mut result = helper_client::destroy(&*self.helper, *id).await;
            for _ in 0..30 {
                match &result {
                    Err(HelperClientError::Refused(e)) if e.code == HelperErrorCode::Busy => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        result = helper_client::destroy(&*self.helper, *id).await;
                    }
                    _ => break,
                }
            }
            match result {
                Ok(()) => tracing::info!(%id, "removed a sandbox without a row"),
                Err(e) => tracing::error!(%id, error = %e, "could not remove an orphaned sandbox"),
            }
        }
        self.reconcile_execs().await?;
        Ok(())
    }
}

/// What `POST /v1/sandboxes/{id}/wait?condition=` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCondition {
    /// A final state (`exited` or `failed`): Docker's `not-running`.
    Exited,
    /// `running`, or a final state (a sandbox that already ended will never run).
    Running,
    /// Gone: deleted (by `DELETE`, its TTL or `remove_after_exit_secs`).
    Removed,
}

/// How often a `running` or `removed` wait reads the row.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn lost(why: &str, now_unix_ms: i64) -> Ending {
    Ending {
        state: SandboxState::Failed,
        exit_code: None,
        signal: None,
        reason: EndReason::Lost,
        error: Some(why.to_owned()),
        finished_at_ms: now_unix_ms,
        stats: None,
    }
}

/// How long `/stats` waits for the final figures of a sandbox that ended during the request.
const STATS_FINAL_WAIT: Duration = Duration::from_secs(2);

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn api_stats(s: SandboxStats) -> Stats {
    Stats {
        memory_bytes: s.memory_bytes,
        memory_peak_bytes: s.memory_peak_bytes,
        cpu_usec: s.cpu_usec,
        pids: s.pids,
        pids_peak: s.pids_peak,
        disk_bytes: s.disk_bytes,
        output_bytes: s.output_bytes,
        output_truncated: s.output_truncated,
        egress: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reconcile_marks_lost_rows_and_removes_orphans() {
        use crate::helper_client::{FakeHelper, FakeSpawn};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let helper = FakeHelper::new(dir.path(), Mode::Rootless, FakeSpawn::ExitAtOnce);
        let clock = crate::lifetime::FakeClock::at(1_000);
        let svc = Service::new(
            store.clone(),
            helper,
            clock,
            dir.path(),
            4,
            LimitPolicy::default(),
        );
        // A running row whose directory is gone, and a directory without a row.
        let spec: sandboxd_api::CreateSandbox =
            serde_json::from_value(serde_json::json!({"command": ["true"]})).unwrap();
        let gone = NewSandbox {
            id: Uuid::new_v4(),
            name: None,
            tenant: "default".into(),
            quota_memory_default: None,
            hostname: "h".into(),
            created_at_ms: 1,
            ttl_deadline_ms: None,
            remove_after_exit_ms: None,
            spec,
        };
        store.insert_creating(&gone, None).await.unwrap();
        store.set_running(gone.id, 2, 10, 1000).await.unwrap();
        let orphan = svc.dir(Uuid::new_v4());
        std::fs::create_dir_all(orphan.root()).unwrap();

        svc.reconcile().await.unwrap();
        let row = store.get(gone.id).await.unwrap().unwrap();
        assert_eq!(row.state, SandboxState::Failed);
        assert_eq!(row.reason, Some(EndReason::Lost));
        assert!(!orphan.root().exists());
    }
}
