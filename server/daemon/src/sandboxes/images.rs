//! Images: import (the upload is streamed to `<state>/uploads/<uuid>` while its sha256 is
//! computed, then unpacked by the helper), list, get, delete, and reconciliation at start.
//!
//! One `RwLock` orders image deletion against sandbox creation: a create holds it shared from
//! resolving the image's name until its row is inserted (from then on the image counts as in
//! use), a delete holds it exclusively, so an image is never deleted under a sandbox being
//! created from it.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sandboxd_api::{Image, ImageConfig};
use sandboxd_protocol::layout::UPLOADS_DIR;
use sandboxd_protocol::wire::HelperErrorCode;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::{SandboxError, Service};
use crate::helper_client::{self, HelperClientError};
use crate::store::{image_quota_refusal, ImageUsage, NewImage, StoreError};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no such image")]
    NotFound,
    #[error("the image is in use by {0} sandbox(es): delete them first")]
    InUse(u64),
    #[error("an image of that name exists already: delete it first")]
    Exists,
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    TooLarge(String),
    /// The tenant's image quota (429); the message names the quota, its limit and the usage.
    #[error("{0}")]
    Quota(String),
    /// The state filesystem is down to its free-space reserve (507).
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("storing the upload")]
    Upload(#[source] std::io::Error),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("helper")]
    Helper(#[from] HelperClientError),
    #[error("internal task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// An image a create refers to: its digest and configuration, and a guard that keeps it from
/// being deleted until the sandbox's row exists.
pub struct ResolvedImage {
    pub digest: String,
    pub config: ImageConfig,
    pub _guard: tokio::sync::OwnedRwLockReadGuard<()>,
}

/// How many bytes of an upload may arrive between two measurements of the free space.
const UPLOAD_MEASURE_EVERY: u64 = 4 << 20;

/// What set an import's cap, so that its refusal names the right limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// `--max-image-bytes` (413).
    Daemon,
    /// The tenant's `max_image_bytes` (429).
    Quota,
    /// The free-space reserve (507).
    Reserve,
}

/// An upload received, on its way to the helper.
struct Import {
    upload: Upload,
    id: Uuid,
    digest: String,
    total: u64,
    cap: u64,
    bound: Bound,
}

/// Removes an upload file when dropped (a finished import, or a client that went away).
struct Upload(PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Service {
    fn uploads_dir(&self) -> PathBuf {
        self.state_dir.join(UPLOADS_DIR)
    }

    /// Receive an image archive and store it under `name` in `tenant`.
    pub async fn import_image<S, E>(
        self: &std::sync::Arc<Self>,
        tenant: &str,
        name: &str,
        mut body: S,
    ) -> Result<Image, ImageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        crate::validate::check_image_name(name)
            .map_err(|e| ImageError::Bad(format!("name: {e}")))?;
        if self.store.image(tenant, name).await?.is_some() {
            return Err(ImageError::Exists);
        }
        // A tenant at its image count (or already at its bytes) is refused before any upload.
        let quota = self.store.quota(tenant).await?;
        let usage = self.store.image_usage(tenant).await?;
        if let Some(why) = image_quota_refusal(tenant, &quota, usage, 0) {
            return Err(ImageError::Quota(why));
        }
        self.storage_headroom()?;
        let max = self.policy.max_image_bytes;
        let dir = self.uploads_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(ImageError::Upload)?;
        let id = Uuid::new_v4();
        let upload = Upload(dir.join(id.to_string()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&upload.0)
            .await
            .map_err(ImageError::Upload)?;
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        // The upload itself takes space too: the reserve is measured again every few MiB.
        let mut measured_at: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ImageError::Bad(format!("reading the body: {e}")))?;
            total += chunk.len() as u64;
            if total > max {
                return Err(ImageError::TooLarge(format!(
                    "the upload is larger than this daemon's maximum of {max} bytes"
                )));
            }
            if total - measured_at >= UPLOAD_MEASURE_EVERY {
                measured_at = total;
                self.storage_headroom()?;
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(ImageError::Upload)?;
        }
        file.flush().await.map_err(ImageError::Upload)?;
        drop(file);
        if total == 0 {
            return Err(ImageError::Bad("the body is empty".into()));
        }
        let digest =
            sandboxd_protocol::rules::Digest::of_sha256(&hasher.finalize().into()).into_string();
        // From here on the work runs in its own task: a client hanging up must not leave an
        // unpacked image without its row (or a row-less image until the next start).
        // What the unpacked image may take: the daemon's cap, what the tenant's quota leaves,
        // and what is free above the reserve, whichever is least. The helper counts the bytes
        // it stores as it writes them and stops (removing the partial image) past this cap.
        let quota_left = quota
            .max_image_bytes
            .map(|q| u64::try_from(q).unwrap_or(0).saturating_sub(usage.bytes));
        let headroom = self.storage_headroom()?;
        let bound = if quota_left.is_some_and(|q| q < max.min(headroom)) {
            Bound::Quota
        } else if headroom < max {
            Bound::Reserve
        } else {
            Bound::Daemon
        };
        let cap = max.min(headroom).min(quota_left.unwrap_or(u64::MAX));
        let svc = std::sync::Arc::clone(self);
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        tokio::spawn(async move {
            let job = Import {
                upload,
                id,
                digest,
                total,
                cap,
                bound,
            };
            svc.finish_import(job, &tenant, &name, usage).await
        })
        .await?
    }

    /// Bytes that may still be written above the free-space reserve (507 when none).
    fn storage_headroom(&self) -> Result<u64, ImageError> {
        self.require_storage().map_err(|e| match e {
            SandboxError::InsufficientStorage(m) => ImageError::InsufficientStorage(m),
            other => ImageError::Bad(other.to_string()),
        })
    }

    async fn finish_import(
        &self,
        job: Import,
        tenant: &str,
        name: &str,
        usage: ImageUsage,
    ) -> Result<Image, ImageError> {
        let Import {
            upload,
            id,
            digest,
            total,
            cap,
            bound,
        } = job;
        let imported = helper_client::import_image(&*self.helper, id, digest.clone(), Some(cap))
            .await
            .map_err(|e| match e {
                HelperClientError::Refused(h) => match (h.code, bound) {
                    (HelperErrorCode::BadImage, _) => ImageError::Bad(h.message),
                    (HelperErrorCode::ImageTooLarge, Bound::Quota) => ImageError::Quota(format!(
                        "quota max_image_bytes: tenant {tenant:?} may store at most {} \
                             bytes of images; {} are in use, and this image unpacks to more \
                             than the {cap} left (the import was stopped and removed)",
                        usage.bytes.saturating_add(cap),
                        usage.bytes
                    )),
                    (HelperErrorCode::ImageTooLarge, Bound::Reserve) => {
                        ImageError::InsufficientStorage(format!(
                            "the daemon's storage is full: this image unpacks to more than the \
                             {cap} bytes free above the reserve (--min-free-space); the import \
                             was stopped and removed"
                        ))
                    }
                    (HelperErrorCode::ImageTooLarge, Bound::Daemon) => {
                        ImageError::TooLarge(h.message)
                    }
                    _ => ImageError::Helper(HelperClientError::Refused(h)),
                },
                other => ImageError::Helper(other),
            })?;
        drop(upload);
        let new = NewImage {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            digest: digest.clone(),
            size_bytes: imported.size_bytes,
            archive_bytes: total,
            entries: imported.entries,
            format: imported.format,
            layers: imported.layers,
            created_at_ms: self.clock.now_unix_ms(),
            config: imported.config,
        };
        let _guard = self.image_lock.write().await;
        let refused = match self.store.insert_image(&new).await {
            Ok(()) => None,
            // Lost a race with another import of the same name.
            Err(StoreError::NameTaken) => Some(ImageError::Exists),
            // Stored already (no unpacking, so no cap applied) but beyond the quota, or another
            // import of the tenant's took the room meanwhile.
            Err(StoreError::QuotaExceeded(why)) => Some(ImageError::Quota(why)),
            Err(e) => return Err(e.into()),
        };
        if let Some(refused) = refused {
            // Drop our content if nothing else names it.
            if !self.store.digest_referenced(&digest).await? {
                let _ = helper_client::delete_image(&*self.helper, digest).await;
            }
            return Err(refused);
        }
        self.store
            .image(tenant, name)
            .await?
            .ok_or(ImageError::NotFound)
    }

    pub async fn images(&self, tenant: &str) -> Result<Vec<Image>, ImageError> {
        Ok(self.store.images(tenant).await?)
    }

    pub async fn image(&self, tenant: &str, name: &str) -> Result<Image, ImageError> {
        self.store
            .image(tenant, name)
            .await?
            .ok_or(ImageError::NotFound)
    }

    /// Delete an image name (409 while a sandbox uses it); its files go once no name is left.
    pub async fn delete_image(&self, tenant: &str, name: &str) -> Result<(), ImageError> {
        let _guard = self.image_lock.write().await;
        let digest = self
            .store
            .image_digest(tenant, name)
            .await?
            .ok_or(ImageError::NotFound)?;
        match self.store.delete_image(tenant, name).await? {
            None => return Err(ImageError::NotFound),
            Some(0) => {}
            Some(n) => return Err(ImageError::InUse(n)),
        }
        if !self.store.digest_referenced(&digest).await? {
            if let Err(e) = helper_client::delete_image(&*self.helper, digest).await {
                tracing::warn!(error = %e, "removing an image's files failed");
            }
        }
        Ok(())
    }

    /// The digest and configuration of `name` in `tenant`, and a guard that keeps it from
    /// being deleted until the sandbox's row exists.
    pub(super) async fn resolve_image(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<ResolvedImage, SandboxError> {
        let guard = std::sync::Arc::clone(&self.image_lock).read_owned().await;
        let (digest, config) = self
            .store
            .image_launch(tenant, name)
            .await?
            .ok_or_else(|| SandboxError::UnknownImage(name.to_owned()))?;
        Ok(ResolvedImage {
            digest,
            config,
            _guard: guard,
        })
    }

    /// At start: remove uploads a crash left, and stored images no row names any more.
    pub async fn reconcile_images(&self) -> Result<(), ImageError> {
        if let Ok(entries) = std::fs::read_dir(self.uploads_dir()) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for digest in helper_client::list_images(&*self.helper).await? {
            if !self.store.digest_referenced(&digest).await? {
                tracing::info!(%digest, "removing a stored image no name refers to");
                helper_client::delete_image(&*self.helper, digest).await?;
            }
        }
        Ok(())
    }
}
