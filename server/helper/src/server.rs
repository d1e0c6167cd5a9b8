//! The helper's request loop: one thread, `poll` over the listening socket and the daemon's
//! connections, one request at a time.
//!
//! Only the daemon's uid may connect (checked with SO_PEERCRED on every accept). The first request
//! of a connection must be `Hello` with our protocol version. Every request gets exactly one
//! typed answer; a bad request closes at most its connection, never the helper.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use sandboxd_protocol::wire::{
    self, HelperError, HelperErrorCode, Request, Response, PROTOCOL_VERSION,
};

use crate::cgroup::{CgroupError, Cgroups};
use crate::config::Config;
use crate::dirs::{DirError, SandboxesDir};
use crate::net::NetError;
use crate::{files, info, monitor, validate};

const MAX_CONNECTIONS: usize = 16;
/// A connection that starts a frame must finish it within this time.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Helper {
    pub config: Config,
    pub sandboxes: SandboxesDir,
    pub cgroups: Cgroups,
    pub images: crate::image::ImageStore,
    /// Read end of the daemon's lifeline pipe: end of file means the daemon is gone.
    pub lifeline: Option<std::os::fd::OwnedFd>,
    /// Network namespaces, the hub and its bridges (see `net/`).
    pub network: crate::net::Network,
    /// SIGTERM, blocked and read here: release the hub, then exit.
    pub sigterm: nix::sys::signalfd::SignalFd,
}

struct Connection {
    stream: UnixStream,
    greeted: bool,
}

impl Helper {
    pub fn serve(&self, listener: UnixListener) -> ! {
        let mut conns: Vec<Connection> = Vec::new();
        loop {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                conns
                    .iter()
                    .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
            );
            fds.push(PollFd::new(self.sigterm.as_fd(), PollFlags::POLLIN));
            if let Some(lifeline) = &self.lifeline {
                fds.push(PollFd::new(lifeline.as_fd(), PollFlags::POLLIN));
            }
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                continue;
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            let term_slot = conns.len() + 1;
            if ready[term_slot] {
                // Stopped (SIGTERM, also the daemon's death): sandboxes are unaffected.
                self.network.release_if_idle();
                self.cgroups.release_parents_if_empty();
                std::process::exit(0);
            }
            if self.lifeline.is_some() && ready.last() == Some(&true) {
                // The daemon never writes to the pipe, so readiness means it closed: exit.
                // Sandboxes are unaffected; they belong to their monitors.
                self.network.release_if_idle();
                self.cgroups.release_parents_if_empty();
                std::process::exit(0);
            }
            for i in (0..conns.len()).rev() {
                if ready[i + 1] && !self.serve_one(&mut conns[i]) {
                    conns.swap_remove(i);
                }
            }
            if ready[0] {
                if let Ok((stream, _)) = listener.accept() {
                    let peer = getsockopt(&stream, PeerCredentials).map(|c| c.uid());
                    if peer == Ok(self.config.allow_uid) && conns.len() < MAX_CONNECTIONS {
                        let _ = stream.set_read_timeout(Some(FRAME_TIMEOUT));
                        let _ = stream.set_write_timeout(Some(FRAME_TIMEOUT));
                        conns.push(Connection {
                            stream,
                            greeted: false,
                        });
                    }
                }
            }
        }
    }

    /// Read one request and answer it. False when the connection should close.
    fn serve_one(&self, conn: &mut Connection) -> bool {
        let mut prefix = [0u8; 4];
        if conn.stream.read_exact(&mut prefix).is_err() {
            return false;
        }
        let Ok(len) = wire::frame_len(prefix) else {
            return false;
        };
        let mut body = vec![0u8; len];
        if conn.stream.read_exact(&mut body).is_err() {
            return false;
        }
        let (response, keep) = match wire::decode::<Request>(&body) {
            Err(e) => (invalid(format!("malformed request: {e}")), false),
            Ok(Request::Hello { version }) if version == PROTOCOL_VERSION => {
                conn.greeted = true;
                (
                    Response::Hello {
                        version: PROTOCOL_VERSION,
                        mode: self.config.mode,
                    },
                    true,
                )
            }
            Ok(Request::Hello { version }) => (
                invalid(format!(
                    "protocol version {version} is not {PROTOCOL_VERSION}"
                )),
                false,
            ),
            Ok(_) if !conn.greeted => (invalid("the first request must be hello".into()), false),
            // A transfer takes the connection over: a file worker answers on it from now on.
            Ok(Request::Files(req)) => match files::start(
                &files::Context {
                    config: &self.config,
                    sandboxes: &self.sandboxes,
                    images: &self.images,
                },
                &req,
                &conn.stream,
            ) {
                Ok(()) => return false,
                Err(e) => (Response::Error(e.into_wire()), false),
            },
            Ok(Request::ImportImage { upload, digest }) => {
                // Long work: a forked worker answers on this connection, which leaves our list.
                self.import_in_worker(&conn.stream, upload, digest);
                return false;
            }
            Ok(request) => (self.handle(request), true),
        };
        let Ok(frame) = wire::encode(&response) else {
            return false;
        };
        conn.stream.write_all(&frame).is_ok() && keep
    }

    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Hello { .. } => invalid("hello was already sent".into()),
            Request::Info => {
                let mut info = info::detect(&self.config, &self.cgroups);
                info.network_modes = self.network.modes();
                if info.network_modes.iter().any(|m| m == "bridge") {
                    info.network_subnet = Some(self.config.net_subnet.to_string());
                }
                Response::Info(info)
            }
            Request::List => match self.sandboxes.list() {
                // Sandboxes with a directory, and cgroups left without one (a crash between
                // the two), so that the daemon can destroy every orphan.
                Ok(mut ids) => {
                    ids.extend(self.cgroups.list());
                    ids.sort();
                    ids.dedup();
                    Response::List { ids }
                }
                Err(e) => Response::Error(DirError::into_wire(e)),
            },
            Request::Stats { id } => match self.sandboxes.stats(id) {
                Ok(mut stats) => {
                    let cg = self.cgroups.stats(id);
                    stats.memory_bytes = cg.memory_bytes;
                    stats.memory_peak_bytes = cg.memory_peak_bytes;
                    stats.cpu_usec = cg.cpu_usec;
                    stats.pids = cg.pids;
                    stats.pids_peak = cg.pids_peak;
                    Response::Stats(stats)
                }
                Err(e) => Response::Error(DirError::into_wire(e)),
            },
            Request::Destroy { id } => {
                let had_cgroup = self.cgroups.exists(id);
                match self.sandboxes.destroy(id) {
                    Ok(()) => {
                        self.cgroups.remove(id);
                        self.network.teardown(id);
                        Response::Destroyed
                    }
                    Err(DirError::NotFound(_)) if had_cgroup => {
                        self.cgroups.remove(id);
                        self.network.teardown(id);
                        Response::Destroyed
                    }
                    Err(e) => Response::Error(DirError::into_wire(e)),
                }
            }
            Request::ImportImage { .. } => invalid("import is answered by a worker".into()),
            Request::DeleteImage { digest } => match self.images.delete(&digest) {
                Ok(()) => Response::ImageDeleted,
                Err(e) => Response::Error(e.into_wire()),
            },
            Request::ListImages => match self.images.list() {
                Ok(digests) => Response::ImageList { digests },
                Err(e) => Response::Error(e.into_wire()),
            },
            Request::Prepare(req) => {
                let spawn = match validate::validate(&req, &self.config) {
                    Ok(s) => s,
                    Err(e) => return invalid(e.to_string()),
                };
                // The directory (and a disk-limited sandbox's filesystem) stays; its locks are
                // released at once: a created sandbox has no monitor until it starts.
                match self.create_dir(&spawn) {
                    Ok(files) => {
                        drop(files);
                        Response::Prepared
                    }
                    Err(e) => Response::Error(e),
                }
            }
            // Handled in `serve_one`, which owns the connection.
            Request::Files(_) => invalid("a transfer needs a connection of its own".into()),
            Request::Spawn(req) => {
                let spawn = match validate::validate(&req, &self.config) {
                    Ok(s) => s,
                    Err(e) => return invalid(e.to_string()),
                };
                let files = if req.prepared {
                    self.sandboxes
                        .open_prepared(spawn.id, spawn.ids)
                        .map_err(DirError::into_wire)
                } else {
                    self.create_dir(&spawn)
                };
                let mut files = match files {
                    Ok(f) => f,
                    Err(e) => return Response::Error(e),
                };
                if let (crate::validate::Rootfs::Image { digest, .. }, wire::Mode::Privileged) =
                    (&spawn.rootfs, self.config.mode)
                {
                    match crate::image::idmapped_lower(
                        &self.images,
                        &self.config,
                        digest,
                        spawn.ids,
                    ) {
                        Ok(lower) => files.image_lower = Some(lower),
                        Err(e) => {
                            drop(files);
                            let _ = self.sandboxes.destroy(spawn.id);
                            return Response::Error(e.into_wire());
                        }
                    }
                }
                if let Err(e) = self.cgroups.create(spawn.id, &spawn.limits) {
                    drop(files);
                    let _ = self.sandboxes.destroy(spawn.id);
                    let code = match e {
                        CgroupError::Unenforceable(_) => HelperErrorCode::Invalid,
                        _ => HelperErrorCode::SetupFailed,
                    };
                    return Response::Error(crate::error::wire(code, &e));
                }
                let net = match self.network.prepare(&spawn) {
                    Ok(net) => net,
                    Err(e) => {
                        drop(files);
                        self.cgroups.remove(spawn.id);
                        let _ = self.sandboxes.destroy(spawn.id);
                        let code = match e {
                            NetError::PortInUse(_) => HelperErrorCode::PortInUse,
                            NetError::Unavailable(_) => HelperErrorCode::Invalid,
                            _ => HelperErrorCode::SetupFailed,
                        };
                        return Response::Error(crate::error::wire(code, &e));
                    }
                };
                let ports = net.as_ref().map(|n| n.ports()).unwrap_or_default();
                match monitor::start(&spawn, files, &self.config, &self.cgroups, net) {
                    Ok(mut spawned) => {
                        spawned.host_uid = spawn.ids.host_root_uid();
                        spawned.ports = ports;
                        Response::Spawned(spawned)
                    }
                    Err(e) => {
                        // Roll back; keep the start error, which is the one worth reporting.
                        self.cgroups.remove(spawn.id);
                        self.network.teardown(spawn.id);
                        if let Err(cleanup) = self.sandboxes.destroy(spawn.id) {
                            return Response::Error(HelperError::new(
                                e.code,
                                format!("{} (and cleaning up failed: {cleanup})", e.message),
                            ));
                        }
                        Response::Error(e)
                    }
                }
            }
        }
    }

    /// Create a new sandbox's directory for `spawn`: its image checked to be stored, its disk
    /// limit checked to be enforceable, and the image's digest recorded in it.
    fn create_dir(
        &self,
        spawn: &validate::ValidSpawn,
    ) -> Result<crate::dirs::SandboxFiles, HelperError> {
        let image = match &spawn.rootfs {
            crate::validate::Rootfs::Image { digest, .. } => Some(digest.as_str()),
            crate::validate::Rootfs::Host => None,
        };
        if image.is_some_and(|d| !self.images.exists(d)) {
            return Err(HelperError::new(
                HelperErrorCode::NotFound,
                "the image is not stored",
            ));
        }
        if spawn.limits.disk_bytes.is_some() {
            if let Some(why) = crate::disk::unavailable(self.config.mode == wire::Mode::Privileged)
            {
                return Err(HelperError::new(
                    HelperErrorCode::Invalid,
                    format!("disk limits are not enforceable: {why}"),
                ));
            }
        }
        let layout = crate::dirs::Layout {
            image: image.is_some(),
            disk_bytes: spawn.limits.disk_bytes,
        };
        let files = self
            .sandboxes
            .create(
                spawn.id,
                spawn.ids,
                self.config.allow_uid,
                self.config.allow_gid,
                layout,
            )
            .map_err(DirError::into_wire)?;
        if let Some(digest) = image {
            // Recorded so that whoever looks at the sandbox later (after its exit too) knows
            // its lower layer.
            if let Err(e) = crate::image::record_digest(&files.dir, digest) {
                drop(files);
                let _ = self.sandboxes.destroy(spawn.id);
                return Err(e.into_wire());
            }
        }
        Ok(files)
    }
}

impl Helper {
    /// Fork a worker that imports an image and answers on `stream` itself (double-forked, so
    /// the helper reaps only the short-lived intermediate process).
    fn import_in_worker(&self, stream: &UnixStream, upload: uuid::Uuid, digest: String) {
        let (stream_fd, images_fd) = (stream.as_raw_fd(), self.images.raw_fd());
        crate::image::detached(|| {
            let _ = crate::fds::close_all_except(&[stream_fd, images_fd]);
            let response = match crate::image::import(&self.config, &self.images, upload, &digest) {
                Ok(done) => Response::ImageImported(done),
                Err(e) => Response::Error(e.into_wire()),
            };
            if let Ok(frame) = wire::encode(&response) {
                let _ = (&*stream).write_all(&frame);
            }
        });
    }
}

fn invalid(message: String) -> Response {
    Response::Error(HelperError::new(HelperErrorCode::Invalid, message))
}
