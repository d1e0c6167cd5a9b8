//! The helper's request loop: one thread, `poll` over the listening socket and the daemon's
//! connections, one request at a time. It dispatches only: each request goes to the module that
//! does it (`spawn`, `files`, `image`, `dirs`, `info`) with just what that module needs, and module
//! errors become the wire's errors here.
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

use crate::cgroup::Cgroups;
use crate::config::Config;
use crate::dirs::{DirError, SandboxesDir};
use crate::{files, info, validate};

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
            Ok(Request::ImportImage {
                upload,
                digest,
                max_bytes,
            }) => {
                // Long work: a forked worker answers on this connection, which leaves our list.
                self.import_in_worker(&conn.stream, upload, digest, max_bytes);
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
                self.network.ensure_egress();
                info.egress = self.network.egress_status();
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
            Request::Prepare(req) => match validate::validate(&req, &self.config) {
                Ok(spawn) if spawn.network.is_some() => {
                    // A bridged sandbox may use egress: a filter that died is started again.
                    self.network.ensure_egress();
                    match crate::spawn::prepare(&self.spawn_context(), &spawn) {
                        Ok(()) => Response::Prepared,
                        Err(e) => Response::Error(e),
                    }
                }
                Ok(spawn) => match crate::spawn::prepare(&self.spawn_context(), &spawn) {
                    Ok(()) => Response::Prepared,
                    Err(e) => Response::Error(e),
                },
                Err(e) => invalid(e.to_string()),
            },
            // Handled in `serve_one`, which owns the connection.
            Request::Files(_) => invalid("a transfer needs a connection of its own".into()),
            Request::Spawn(req) => match validate::validate(&req, &self.config) {
                Ok(spawn) => {
                    if spawn.network.is_some() {
                        self.network.ensure_egress();
                    }
                    match crate::spawn::spawn(&self.spawn_context(), &spawn, req.prepared) {
                        Ok(spawned) => Response::Spawned(spawned),
                        Err(e) => Response::Error(e),
                    }
                }
                Err(e) => invalid(e.to_string()),
            },
        }
    }

    /// What the spawn and prepare requests need of the helper.
    fn spawn_context(&self) -> crate::spawn::Context<'_> {
        crate::spawn::Context {
            config: &self.config,
            sandboxes: &self.sandboxes,
            cgroups: &self.cgroups,
            images: &self.images,
            network: &self.network,
        }
    }
}

impl Helper {
    /// Fork a worker that imports an image and answers on `stream` itself (double-forked, so
    /// the helper reaps only the short-lived intermediate process).
    fn import_in_worker(
        &self,
        stream: &UnixStream,
        upload: uuid::Uuid,
        digest: String,
        max_bytes: Option<u64>,
    ) {
        let (stream_fd, images_fd) = (stream.as_raw_fd(), self.images.raw_fd());
        // The daemon may lower the cap for this import (a quota, the free-space reserve), never
        // raise it above the operator's.
        let mut config = self.config.clone();
        if let Some(max) = max_bytes {
            config.max_image_bytes = config.max_image_bytes.min(max);
        }
        crate::image::detached(|| {
            let _ = crate::fds::close_all_except(&[stream_fd, images_fd]);
            let response = match crate::image::import(&config, &self.images, upload, &digest) {
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
