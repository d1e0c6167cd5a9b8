//! Sandboxes created without starting (`POST /start`), and file transfers in and out.
//!
//! A transfer is resolved and carried out by a file worker of the helper (see
//! `server/helper/src/files/`); the daemon only checks who may ask and in which state, rebuilds
//! the sandbox's spawn request from the stored spec (so the worker builds the same root as init),
//! and hands the HTTP layer a [`Transfer`] to stream the content through, one chunk at a time.

use std::sync::Arc;

use bytes::Bytes;
use sandboxd_api::{NetworkInfo, Sandbox, SandboxState};
use sandboxd_protocol::files::{FileOp, SandboxPath};
use sandboxd_protocol::wire::{
    FileReady, FilesRequest, HelperError, HelperErrorCode, SpawnNetwork, SpawnRequest,
};
use uuid::Uuid;

use super::{SandboxError, Scope, Service};
use crate::helper_client::{self, FileTransfer, HelperClientError, TransferError};
use crate::limits::{self, Resolved};
use crate::store::StoreError;
use crate::validate::{Launch, ValidCreate};

/// Why a file transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Finding its sandbox failed, or rebuilding its spawn request.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The sandbox is in a state without files (being set up, failed to start).
    #[error("{0}")]
    NoFiles(String),
    /// The file worker refused or failed, and said why.
    #[error("{}", .0.message)]
    Refused(HelperError),
    /// The worker stopped reading an upload; [`Transfer::outcome`] says why.
    #[error("the file worker stopped reading")]
    Stopped,
    #[error("helper")]
    Helper(#[source] HelperClientError),
    #[error("unexpected answer from the file worker: {0}")]
    Unexpected(String),
}

impl From<TransferError> for FileError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Refused(e) => FileError::Refused(e),
            TransferError::Stopped => FileError::Stopped,
            TransferError::Helper(e) => FileError::Helper(e),
            TransferError::Unexpected(m) => FileError::Unexpected(m),
        }
    }
}

/// A file transfer whose path the worker has resolved: a download's chunks come out of
/// [`Transfer::next_chunk`], an upload's go in through [`Transfer::send`] and end with
/// [`Transfer::end_upload`]. Dropping it midway makes the worker discard an upload.
pub struct Transfer {
    inner: Box<dyn FileTransfer>,
}

impl Transfer {
    /// What the worker found at the path (kind, size and mode of a regular file).
    pub fn ready(&self) -> &FileReady {
        self.inner.ready()
    }

    /// The next piece of a download; `None` after the last, once the worker said it is done.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, FileError> {
        Ok(self.inner.next_chunk().await?)
    }

    /// Send a piece of an upload; [`FileError::Stopped`] when the worker no longer reads.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), FileError> {
        Ok(self.inner.send(data).await?)
    }

    /// End an upload and wait for the worker's verdict.
    pub async fn end_upload(self) -> Result<(), FileError> {
        Ok(self.inner.end_upload().await?)
    }

    /// The worker's verdict without sending more: a deletion, or an upload it stopped reading.
    pub async fn outcome(self) -> Result<(), FileError> {
        Ok(self.inner.outcome().await?)
    }
}

impl Service {
    /// The spawn request of an existing sandbox, rebuilt from its stored spec.
    async fn stored_spawn_request(
        &self,
        sandbox: &Sandbox,
        prepared: bool,
    ) -> Result<(SpawnRequest, NetworkInfo), SandboxError> {
        let corrupt = |what: String| {
            SandboxError::Store(StoreError::Corrupt {
                id: sandbox.id.to_string(),
                what,
            })
        };
        let v = ValidCreate::parse(sandbox.spec.clone())
            .map_err(|e| corrupt(format!("stored spec: {}", e.0)))?;
        let mut resolved = limits::resolve(&self.policy, self.host_limits().await?, &v.spec)?;
        self.fit_disk(&mut resolved, &v.spec)?;
        let capabilities =
            limits::resolve_capabilities(&self.policy, v.spec.capabilities.as_ref())?;
        let uid_slot = self.store.uid_slot(sandbox.id).await?;
        // A start gets the network now (its address, its group's members as they are now); a
        // file worker needs none.
        let (net_info, network) = if prepared {
            self.assign_network(sandbox.id, &v.spec).await?
        } else {
            (NetworkInfo::default(), None)
        };
        let image = match &v.spec.rootfs {
            Some(rootfs) => Some(
                self.store
                    .sandbox_image_digest(sandbox.id)
                    .await?
                    .ok_or_else(|| corrupt(format!("image {:?} is not stored", rootfs.image)))?,
            ),
            None => None,
        };
        let launch = v.launch(image.as_ref().map(|(_, config)| config), &sandbox.hostname)?;
        let request = spawn_request(
            sandbox.id,
            uid_slot,
            sandbox.hostname.clone(),
            &v,
            launch,
            &resolved,
            capabilities,
            image.map(|(digest, _)| digest),
            network,
            prepared,
        );
        Ok((request, net_info))
    }

    /// `POST /start`: run the command of a sandbox created with `"start": false`.
    pub async fn start(
        self: &Arc<Self>,
        scope: &Scope,
        id_or_name: &str,
    ) -> Result<Sandbox, SandboxError> {
        let sandbox = self.find(scope, id_or_name).await?;
        if sandbox.state != SandboxState::Created {
            return Err(SandboxError::NotCreated);
        }
        self.require_storage()?;
        let id = sandbox.id;
        if !self.store.start_created(id).await? {
            return Err(SandboxError::NotCreated);
        }
        let (request, net_info) = match self.stored_spawn_request(&sandbox, true).await {
            Ok(r) => r,
            Err(e) => {
                // Not started after all: back to `created`, for another try.
                let _ = self.store.set_created(id).await;
                return Err(e);
            }
        };
        self.register(id);
        // As for a create: the start runs in its own task, so a client hanging up cannot leave
        // the row in `creating` without a watcher.
        let svc = Arc::clone(self);
        tokio::spawn(async move {
            let result = helper_client::spawn(&*svc.helper, request).await;
            if let Err(HelperClientError::Refused(e)) = &result {
                if e.code == HelperErrorCode::Busy {
                    // A file transfer holds the sandbox's root (see the helper's files/mod.rs):
                    // nothing was started, so it stays `created` for another try.
                    svc.store.set_created(id).await?;
                    svc.registry().remove(&id);
                    return Err(SandboxError::Busy(
                        "a file transfer into this sandbox is in progress; start it once it ends"
                            .into(),
                    ));
                }
            }
            svc.spawned(id, net_info, true, result).await
        })
        .await??;
        self.store.get(id).await?.ok_or(SandboxError::NotFound)
    }

    /// Start a transfer, once the worker has resolved the path.
    /// `path` was checked for `op` by the caller (400s come before any filesystem work).
    pub async fn transfer(
        &self,
        scope: &Scope,
        id_or_name: &str,
        op: FileOp,
        path: &SandboxPath,
        mode: Option<u32>,
    ) -> Result<Transfer, FileError> {
        let sandbox = self.find(scope, id_or_name).await?;
        match sandbox.state {
            SandboxState::Creating => {
                return Err(FileError::NoFiles(
                    "the sandbox is being set up; retry in a moment".into(),
                ))
            }
            SandboxState::Failed if sandbox.started_at.is_none() => {
                return Err(FileError::NoFiles(
                    "the sandbox failed to start and has no files".into(),
                ))
            }
            _ => {}
        }
        let (spawn, _) = self.stored_spawn_request(&sandbox, false).await?;
        let request = FilesRequest {
            spawn,
            op,
            path: path.as_str().to_owned(),
            mode,
        };
        match self.helper.transfer(request).await {
            Ok(inner) => Ok(Transfer { inner }),
            Err(HelperClientError::Refused(e)) => Err(FileError::Refused(e)),
            Err(e) => Err(FileError::Helper(e)),
        }
    }
}

/// The spawn request of a sandbox: from the create request, or (for POST /start and file
/// transfers) from the stored spec, so that both build the same root.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_request(
    id: Uuid,
    uid_slot: Option<u32>,
    hostname: String,
    v: &ValidCreate,
    launch: Launch,
    resolved: &Resolved,
    capabilities: Option<Vec<String>>,
    rootfs_image: Option<String>,
    network: Option<SpawnNetwork>,
    prepared: bool,
) -> SpawnRequest {
    SpawnRequest {
        id,
        uid_slot,
        command: launch.command,
        env: launch.env,
        cwd: launch.cwd,
        user: launch.user,
        hostname,
        timeout_secs: v.timeout_secs,
        limits: resolved.spawn,
        capabilities,
        nested_user_namespaces: v.spec.nested_user_namespaces,
        stdin: v.spec.stdin,
        tty: v
            .spec
            .tty
            .then(|| (v.spec.cols.unwrap_or(80), v.spec.rows.unwrap_or(24))),
        prepared,
        rootfs_readonly: v.spec.rootfs.as_ref().is_some_and(|r| r.readonly),
        rootfs_image,
        network,
    }
}
