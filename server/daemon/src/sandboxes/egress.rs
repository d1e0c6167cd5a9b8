//! Egress on the daemon's side: which requests may have a policy, the policies in the store, and
//! the one connection to the egress filter (`<state>/helper/egress.sock`, the line protocol of
//! `sandboxd_protocol::egress`).
//!
//! The store is the truth: a policy is written there first and only then pushed. The link task
//! (see [`run_link`]) connects when the helper reports egress available, reconnects with backoff,
//! and on every connection sends `Sync` with the policies of all live bridged sandboxes read from
//! the store at that moment, so whatever was queued while it was away is superseded and dropped.
//! After that it forwards `Set` and `Remove` in the order they were queued, and stores the
//! filter's `Denied` and `Counters` events.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandboxd_api::egress::{EgressCounters, EgressDenial, EgressPolicy};
use sandboxd_api::{EgressInfo, NetworkInfo, NetworkMode, SandboxState};
use sandboxd_protocol::egress::{
    EgressStatus, FilterEvent, FilterRequest, SandboxPolicy, FILTER_PROTOCOL_VERSION,
    FILTER_SOCKET, MAX_LINE,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{SandboxError, Scope, Service};
use crate::helper_client;
use crate::store::Store;

/// First and longest pause between connection attempts to the filter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a create waits for its policy to be written to the filter before it starts the
/// sandbox anyway (a `Sync` on the next connection carries it).
const SET_WAIT: Duration = Duration::from_secs(2);
/// Most denials one request lists.
pub const MAX_DENIALS_LISTED: u32 = 1000;

/// Why the filter link failed (logged; the link reconnects).
#[derive(Debug, thiserror::Error)]
pub enum EgressLinkError {
    #[error("connecting to the egress filter")]
    Connect(#[source] std::io::Error),
    #[error("reading from the egress filter")]
    Read(#[source] std::io::Error),
    #[error("writing to the egress filter")]
    Write(#[source] std::io::Error),
    #[error("the egress filter closed the connection")]
    Closed,
    #[error("a line from the egress filter is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("unreadable line from the egress filter")]
    Parse(#[source] serde_json::Error),
    #[error("the egress filter speaks protocol {0}, this daemon {FILTER_PROTOCOL_VERSION}")]
    Version(u32),
    #[error("the egress filter's first line was not ready")]
    NotReady,
    #[error("reading the policies to push")]
    Store(#[source] crate::store::StoreError),
    #[error("encoding a request")]
    Encode(#[source] serde_json::Error),
}

/// One queued request and, for a `Set`, who waits until it is written.
struct Push {
    request: FilterRequest,
    written: Option<oneshot::Sender<()>>,
}

/// The daemon's end of the filter link, kept by the service.
pub(super) struct EgressLink {
    queue: mpsc::UnboundedSender<Push>,
    connected: Arc<AtomicBool>,
}

/// What the service knows of egress: the helper's status and, when available, the link.
pub(super) struct EgressState {
    status: EgressStatus,
    link: Option<EgressLink>,
}

impl Service {
    /// Ask the helper whether it offers egress and, when it does, start the link to the filter.
    /// Called once at start-up, after reconciliation; without it egress is unavailable.
    pub async fn start_egress(self: &Arc<Self>) -> Result<(), SandboxError> {
        let info = helper_client::info(&*self.helper).await?;
        let status = info.egress;
        let link = if status.available {
            let (tx, rx) = mpsc::unbounded_channel();
            let connected = Arc::new(AtomicBool::new(false));
            let socket = self.state_dir.join("helper").join(FILTER_SOCKET);
            tokio::spawn(run_link(
                self.store.clone(),
                Arc::clone(&self.clock),
                socket,
                rx,
                Arc::clone(&connected),
            ));
            tracing::info!(uplink = ?status.uplink, dns = ?status.upstream_dns, "egress available");
            Some(EgressLink {
                queue: tx,
                connected,
            })
        } else {
            tracing::info!(reason = ?status.reason, "egress not available");
            None
        };
        // A second call keeps the first link.
        let _ = self.egress.set(EgressState { status, link });
        Ok(())
    }

    /// `egress` of `GET /v1/info`.
    pub(super) fn egress_info(&self) -> EgressInfo {
        match self.egress.get() {
            Some(state) => EgressInfo {
                available: state.status.available,
                reason: state.status.reason.clone(),
                connected: state
                    .link
                    .as_ref()
                    .is_some_and(|l| l.connected.load(Ordering::Relaxed)),
            },
            None => EgressInfo {
                available: false,
                reason: Some("the daemon has not set up egress".into()),
                connected: false,
            },
        }
    }

    /// May `tenant` give a sandbox in this network `policy`? 422 outside bridge mode or where
    /// the daemon offers no egress, 403 for a tenant the operator did not allow.
    fn check_egress_use(&self, tenant: &str, mode: NetworkMode) -> Result<(), SandboxError> {
        if mode != NetworkMode::Bridge {
            return Err(SandboxError::EgressUnavailable(
                "network.egress needs network.mode \"bridge\" (a sandbox in mode \"none\" has \
                 only loopback): add \"mode\": \"bridge\" (sbx run --net bridge)"
                    .into(),
            ));
        }
        match self.egress.get() {
            Some(state) if state.status.available => {}
            Some(state) => {
                return Err(SandboxError::EgressUnavailable(format!(
                    "network.egress: this daemon offers no egress: {}",
                    state
                        .status
                        .reason
                        .as_deref()
                        .unwrap_or("the helper reports it unavailable")
                )))
            }
            None => {
                return Err(SandboxError::EgressUnavailable(
                    "network.egress: this daemon offers no egress (it was not set up)".into(),
                ))
            }
        }
        if !self.policy.egress_tenants.allows(tenant) {
            return Err(SandboxError::EgressNotAllowed(tenant.to_owned()));
        }
        Ok(())
    }

    /// The create-time check of `network.egress` (nothing to check without one).
    pub(super) fn check_create_egress(
        &self,
        tenant: &str,
        spec: &sandboxd_api::CreateSandbox,
    ) -> Result<(), SandboxError> {
        match &spec.network {
            Some(net) if net.egress.is_some() => self.check_egress_use(tenant, net.mode),
            _ => Ok(()),
        }
    }

    /// Push the stored policy of a sandbox that just got its address (create or start), and
    /// wait (briefly) until it is written, so that its first connection finds it.
    pub(super) async fn push_policy(
        &self,
        id: Uuid,
        address: Ipv4Addr,
    ) -> Result<(), SandboxError> {
        let Some(link) = self.egress.get().and_then(|s| s.link.as_ref()) else {
            return Ok(());
        };
        let Some(policy) = self.store.egress_policy(id).await? else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        let push = Push {
            request: FilterRequest::Set(SandboxPolicy {
                sandbox: id,
                address,
                policy,
            }),
            written: Some(tx),
        };
        if link.queue.send(push).is_ok() {
            // Dropped unwritten when the filter is away: the next Sync carries it.
            let _ = tokio::time::timeout(SET_WAIT, rx).await;
        }
        Ok(())
    }

    /// The sandbox ended or is going: the filter drops its policy and connections.
    pub(super) fn forget_policy(&self, id: Uuid) {
        if let Some(link) = self.egress.get().and_then(|s| s.link.as_ref()) {
            let _ = link.queue.send(Push {
                request: FilterRequest::Remove { sandbox: id },
                written: None,
            });
        }
    }

    /// `PATCH /v1/sandboxes/{id}/network`: replace the egress policy. A running sandbox's new
    /// policy applies at once (the filter cuts open connections it no longer allows); a created
    /// one's applies when it starts; an ended one's is 409.
    pub async fn set_egress(
        &self,
        scope: &Scope,
        id_or_name: &str,
        policy: EgressPolicy,
    ) -> Result<NetworkInfo, SandboxError> {
        let sandbox = self.find(scope, id_or_name).await?;
        let id = sandbox.id;
        if sandbox.state.is_final() {
            return Err(SandboxError::NotRunning);
        }
        let requested = sandbox.spec.network.clone().unwrap_or_default();
        let tenant = self
            .store
            .sandbox_tenant(id)
            .await?
            .ok_or(SandboxError::NotFound)?;
        self.check_egress_use(&tenant, requested.mode)?;
        if !self
            .store
            .set_egress_policy(id, &policy, self.clock.now_unix_ms())
            .await?
        {
            return Err(SandboxError::NotFound);
        }
        let current = self.store.get(id).await?.ok_or(SandboxError::NotFound)?;
        let address = current
            .network
            .as_ref()
            .and_then(|n| n.address.as_deref())
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        if matches!(
            current.state,
            SandboxState::Running | SandboxState::Creating
        ) {
            if let Some(address) = address {
                self.push_policy(id, address).await?;
            }
        }
        Ok(match current.network {
            Some(info) if current.state != SandboxState::Created => info,
            // Not started yet: what it will get.
            _ => NetworkInfo {
                mode: requested.mode,
                group: requested.group,
                ports: requested.ports,
                egress: Some(policy),
                ..NetworkInfo::default()
            },
        })
    }

    /// `GET /v1/sandboxes/{id}/network/denials`: the most recent first.
    pub async fn egress_denials(
        &self,
        scope: &Scope,
        id_or_name: &str,
        limit: u32,
    ) -> Result<Vec<EgressDenial>, SandboxError> {
        let sandbox = self.find(scope, id_or_name).await?;
        Ok(self.store.egress_denials(sandbox.id, limit).await?)
    }

    /// The egress counters `/stats` shows: the last totals, zero before the first report, and
    /// none without a policy.
    pub(super) async fn egress_counters(
        &self,
        id: Uuid,
    ) -> Result<Option<EgressCounters>, SandboxError> {
        if let Some(c) = self.store.egress_counters(id).await? {
            return Ok(Some(c));
        }
        Ok(self
            .store
            .egress_policy(id)
            .await?
            .map(|_| EgressCounters::default()))
    }
}

/// Keep a connection to the filter for as long as the daemon runs.
async fn run_link(
    store: Store,
    clock: Arc<dyn crate::lifetime::Clock>,
    socket: std::path::PathBuf,
    mut queue: mpsc::UnboundedReceiver<Push>,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut logged = false;
    loop {
        match UnixStream::connect(&socket).await {
            Ok(stream) => {
                let result = serve_link(stream, &store, &*clock, &mut queue, &connected).await;
                connected.store(false, Ordering::Relaxed);
                if let Err(e) = result {
                    tracing::warn!(error = %crate::chain(&e), "egress filter link lost; reconnecting");
                }
                backoff = BACKOFF_FIRST;
                logged = false;
            }
            Err(e) => {
                if !logged {
                    let e = EgressLinkError::Connect(e);
                    tracing::warn!(socket = %socket.display(), error = %crate::chain(&e), "egress filter not reachable yet; retrying");
                    logged = true;
                }
            }
        }
        // While away, whatever is queued is superseded by the next Sync: drop it (its waiter
        // is released at once).
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                push = queue.recv() => match push {
                    Some(_) => {}
                    // The service is gone: so is the daemon.
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: `Ready`, `Sync`, then queued requests out and events in, until it fails.
async fn serve_link(
    stream: UnixStream,
    store: &Store,
    clock: &dyn crate::lifetime::Clock,
    queue: &mut mpsc::UnboundedReceiver<Push>,
    connected: &AtomicBool,
) -> Result<(), EgressLinkError> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    match read_event(&mut read).await? {
        FilterEvent::Ready { version } if version == FILTER_PROTOCOL_VERSION => {}
        FilterEvent::Ready { version } => return Err(EgressLinkError::Version(version)),
        _ => return Err(EgressLinkError::NotReady),
    }
    // Everything queued so far is in the store already: the Sync below carries it.
    while queue.try_recv().is_ok() {}
    let sandboxes = store
        .live_egress_policies()
        .await
        .map_err(EgressLinkError::Store)?
        .into_iter()
        .map(|p| SandboxPolicy {
            sandbox: p.sandbox,
            address: p.address,
            policy: p.policy,
        })
        .collect::<Vec<_>>();
    tracing::info!(policies = sandboxes.len(), "connected to the egress filter");
    write_request(&mut write, &FilterRequest::Sync { sandboxes }).await?;
    connected.store(true, Ordering::Relaxed);
    // Two loops, each one future for the whole connection (a line read is never cut off
    // half-way by a write).
    let events = async {
        loop {
            match read_event(&mut read).await {
                Ok(event) => handle_event(store, clock, event).await,
                Err(e) => return Err::<(), _>(e),
            }
        }
    };
    let requests = async {
        while let Some(push) = queue.recv().await {
            write_request(&mut write, &push.request).await?;
            if let Some(done) = push.written {
                let _ = done.send(());
            }
        }
        Ok::<(), EgressLinkError>(())
    };
    tokio::select! {
        r = events => r,
        r = requests => r,
    }
}

async fn handle_event(store: &Store, clock: &dyn crate::lifetime::Clock, event: FilterEvent) {
    match event {
        FilterEvent::Denied { sandbox, denial } => {
            tracing::debug!(%sandbox, reason = ?denial.reason, "egress denied");
            if let Err(e) = store.add_egress_denial(sandbox, &denial).await {
                tracing::warn!(%sandbox, error = %crate::chain(&e), "storing an egress denial failed");
            }
        }
        FilterEvent::Counters { sandbox, counters } => {
            if let Err(e) = store
                .set_egress_counters(sandbox, &counters, clock.now_unix_ms())
                .await
            {
                tracing::warn!(%sandbox, error = %crate::chain(&e), "storing egress counters failed");
            }
        }
        FilterEvent::Error { message } => {
            tracing::warn!(%message, "the egress filter refused a request");
        }
        FilterEvent::Ready { .. } => {}
    }
}

async fn write_request(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    request: &FilterRequest,
) -> Result<(), EgressLinkError> {
    let mut line = serde_json::to_vec(request).map_err(EgressLinkError::Encode)?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(EgressLinkError::Write)
}

/// One event line, at most [`MAX_LINE`] bytes.
async fn read_event<R: AsyncRead + Unpin>(
    read: &mut BufReader<R>,
) -> Result<FilterEvent, EgressLinkError> {
    let mut line = Vec::new();
    let n = (&mut *read)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(EgressLinkError::Read)?;
    if n == 0 {
        return Err(EgressLinkError::Closed);
    }
    if !line.ends_with(b"\n") {
        return Err(if line.len() > MAX_LINE {
            EgressLinkError::LineTooLong
        } else {
            EgressLinkError::Closed
        });
    }
    serde_json::from_slice(&line).map_err(EgressLinkError::Parse)
}
