//! The `prepare` and `spawn` requests: a sandbox's directory (its image checked and recorded, its
//! disk limit checked), then for a spawn the image's idmapped lower layer, the cgroup, the network
//! and the monitor, in this order. A failure after the directory exists rolls back what was made
//! (by [`Rollback`], a drop guard) and keeps both errors when the rollback fails too.

use sandboxd_protocol::wire::{self, HelperError, HelperErrorCode, Spawned};

use crate::cgroup::{CgroupError, Cgroups};
use crate::config::Config;
use crate::dirs::{DirError, Layout, SandboxFiles, SandboxesDir};
use crate::image::ImageStore;
use crate::net::{NetError, Network};
use crate::validate::{Rootfs, ValidSpawn};

/// What these requests need of the helper.
pub struct Context<'a> {
    pub config: &'a Config,
    pub sandboxes: &'a SandboxesDir,
    pub cgroups: &'a Cgroups,
    pub images: &'a ImageStore,
    pub network: &'a Network,
}

/// Undoes a half-made sandbox when dropped armed: its cgroup and network (once made) and its
/// directory. Declared before the sandbox's `SandboxFiles`, so that their locks are released
/// (dropped first) before the directory is removed.
struct Rollback<'a> {
    cx: &'a Context<'a>,
    id: uuid::Uuid,
    armed: bool,
    cgroup: bool,
    network: bool,
}

impl<'a> Rollback<'a> {
    fn new(cx: &'a Context<'a>, id: uuid::Uuid) -> Self {
        Self {
            cx,
            id,
            armed: false,
            cgroup: false,
            network: false,
        }
    }

    /// Roll back now, and say whether removing the directory failed.
    fn run(mut self) -> Result<(), DirError> {
        self.armed = false;
        self.undo()
    }

    fn undo(&self) -> Result<(), DirError> {
        if self.cgroup {
            self.cx.cgroups.remove(self.id);
        }
        if self.network {
            self.cx.network.teardown(self.id);
        }
        self.cx.sandboxes.destroy(self.id)
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.undo();
        }
    }
}

/// `prepare`: the directory (and a disk-limited sandbox's filesystem) stays; its locks are
/// released at once, since a created sandbox has no monitor until it starts.
pub fn prepare(cx: &Context<'_>, spawn: &ValidSpawn) -> Result<(), HelperError> {
    create_dir(cx, spawn).map(drop)
}

/// `spawn`: make (or, when `prepared`, open) the directory, then the rest, then the monitor.
pub fn spawn(cx: &Context<'_>, spawn: &ValidSpawn, prepared: bool) -> Result<Spawned, HelperError> {
    // The user first: a name the root does not know refuses the request before anything exists.
    let resolved;
    let spawn = match &spawn.user {
        None => spawn,
        Some(user) => {
            let digest = match &spawn.rootfs {
                Rootfs::Image { digest, .. } => Some(digest.as_str()),
                Rootfs::Host => None,
            };
            let rootless = cx.config.mode == wire::Mode::Rootless;
            let run_as = crate::image::passwd::resolve_for(cx.images, digest, user, rootless)
                .map_err(|e| {
                    let code = match e {
                        crate::image::passwd::UserError::Read { .. } => {
                            HelperErrorCode::SetupFailed
                        }
                        _ => HelperErrorCode::UnknownUser,
                    };
                    crate::error::wire(code, &e)
                })?;
            resolved = ValidSpawn {
                run_as: Some(run_as),
                ..spawn.clone()
            };
            &resolved
        }
    };
    let mut rollback = Rollback::new(cx, spawn.id);
    let mut files = if prepared {
        cx.sandboxes
            .open_prepared(spawn.id, spawn.ids)
            .map_err(DirError::into_wire)?
    } else {
        create_dir(cx, spawn)?
    };
    rollback.armed = true;
    if let (Rootfs::Image { digest, .. }, wire::Mode::Privileged) = (&spawn.rootfs, cx.config.mode)
    {
        let lower = crate::image::idmapped_lower(cx.images, cx.config, digest, spawn.ids)
            .map_err(crate::image::ImageError::into_wire)?;
        files.image_lower = Some(lower);
    }
    cx.cgroups.create(spawn.id, &spawn.limits).map_err(|e| {
        let code = match e {
            CgroupError::Unenforceable(_) => HelperErrorCode::Invalid,
            _ => HelperErrorCode::SetupFailed,
        };
        crate::error::wire(code, &e)
    })?;
    rollback.cgroup = true;
    let net = cx.network.prepare(spawn).map_err(|e| {
        let code = match e {
            NetError::PortInUse(_) | NetError::RangeFull(_) => HelperErrorCode::PortInUse,
            NetError::Unavailable(_) => HelperErrorCode::Invalid,
            _ => HelperErrorCode::SetupFailed,
        };
        crate::error::wire(code, &e)
    })?;
    rollback.network = true;
    let ports = net.as_ref().map(|n| n.ports()).unwrap_or_default();
    match crate::monitor::start(spawn, files, cx.config, cx.cgroups, net) {
        Ok(mut spawned) => {
            rollback.armed = false;
            spawned.host_uid = spawn.ids.host_root_uid();
            spawned.ports = ports;
            Ok(spawned)
        }
        // Keep the start error, which is the one worth reporting.
        Err(e) => match rollback.run() {
            Ok(()) => Err(e),
            Err(cleanup) => Err(HelperError::new(
                e.code,
                format!("{} (and cleaning up failed: {cleanup})", e.message),
            )),
        },
    }
}

/// Create a new sandbox's directory for `spawn`: its image checked to be stored, its disk
/// limit checked to be enforceable, and the image's digest recorded in it.
fn create_dir(cx: &Context<'_>, spawn: &ValidSpawn) -> Result<SandboxFiles, HelperError> {
    let image = match &spawn.rootfs {
        Rootfs::Image { digest, .. } => Some(digest.as_str()),
        Rootfs::Host => None,
    };
    if image.is_some_and(|d| !cx.images.exists(d)) {
        return Err(crate::image::ImageError::NotStored.into_wire());
    }
    if spawn.limits.disk_bytes.is_some() {
        if let Some(why) = crate::disk::unavailable(cx.config.mode == wire::Mode::Privileged) {
            return Err(HelperError::new(
                HelperErrorCode::Invalid,
                format!("disk limits are not enforceable: {why}"),
            ));
        }
    }
    let layout = Layout {
        image: image.is_some(),
        disk_bytes: spawn.limits.disk_bytes,
    };
    let mut rollback = Rollback::new(cx, spawn.id);
    let files = cx
        .sandboxes
        .create(
            spawn.id,
            spawn.ids,
            cx.config.allow_uid,
            cx.config.allow_gid,
            layout,
        )
        .map_err(DirError::into_wire)?;
    if let Some(digest) = image {
        // Recorded so that whoever looks at the sandbox later (after its exit too) knows
        // its lower layer.
        rollback.armed = true;
        crate::image::record_digest(&files.dir, digest).map_err(|e| e.into_wire())?;
        rollback.armed = false;
    }
    Ok(files)
}
