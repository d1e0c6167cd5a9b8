//! The monitor's event loop: one `poll` over every source that has registered a descriptor
//! (each process's outputs, status pipe, pidfd, terminal and stdin; the control listener and
//! its connections; the OOM watch; the port forwarder) and the earliest deadline one asked for
//! (the timeout, the end of a drain grace period).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::process;

/// What a registered descriptor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `processes[i]`: process zero is the main command.
    Process(usize, process::Event),
    Listener,
    /// `clients[i]`, a control connection.
    Client(usize),
    /// `attachments[i]`.
    Attachment(usize),
    Oom,
    Forwarder,
}

/// One turn's registrations.
pub struct Poll<'a> {
    fds: Vec<PollFd<'a>>,
    sources: Vec<Source>,
    wake_at: Option<Instant>,
}

/// Longest sleep without any deadline.
const IDLE: Duration = Duration::from_secs(3600);

impl<'a> Poll<'a> {
    pub fn new() -> Poll<'a> {
        Poll {
            fds: Vec::with_capacity(16),
            sources: Vec::with_capacity(16),
            wake_at: None,
        }
    }

    pub fn register(&mut self, fd: BorrowedFd<'a>, flags: PollFlags, source: Source) {
        self.fds.push(PollFd::new(fd, flags));
        self.sources.push(source);
    }

    /// Wake up at `at` at the latest, even without an event.
    pub fn wake_at(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    /// Wait for events; the sources that have one, in registration order.
    pub fn wait(mut self) -> Result<Vec<Source>, Errno> {
        let wait = self
            .wake_at
            .map_or(IDLE, |at| at.saturating_duration_since(Instant::now()))
            .min(IDLE);
        let timeout = PollTimeout::try_from((wait.as_millis() as i32).saturating_add(1))
            .unwrap_or(PollTimeout::MAX);
        nix::poll::poll(&mut self.fds, timeout)?;
        Ok(self
            .fds
            .iter()
            .zip(self.sources)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, source)| source)
            .collect())
    }
}
