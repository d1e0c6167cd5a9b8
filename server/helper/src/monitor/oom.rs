//! The OOM watch of a sandbox's cgroup: an event source of the monitor's loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::poll::PollFlags;

use crate::cgroup::Cgroups;

/// Notification of an OOM kill in the sandbox's cgroup (notifications, not polling).
pub enum OomEvent {
    /// v1: an eventfd registered on memory.oom_control through cgroup.event_control.
    V1 { eventfd: File, _oom_control: File },
    /// v2: memory.events, which signals POLLPRI when it changes.
    V2 { events: File },
}

impl OomEvent {
    pub fn watch(cgroups: &Cgroups, id: uuid::Uuid) -> Option<OomEvent> {
        let (file, control) = cgroups.oom_event_files(id)?;
        match control {
            None => File::open(file).ok().map(|events| OomEvent::V2 { events }),
            Some(control) => {
                let oom_control = File::open(&file).ok()?;
                let efd = nix::sys::eventfd::EventFd::from_flags(
                    nix::sys::eventfd::EfdFlags::EFD_CLOEXEC
                        | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
                )
                .ok()?;
                let eventfd = File::from(OwnedFd::from(efd));
                let line = format!("{} {}", eventfd.as_raw_fd(), oom_control.as_raw_fd());
                std::fs::write(control, line).ok()?;
                Some(OomEvent::V1 {
                    eventfd,
                    _oom_control: oom_control,
                })
            }
        }
    }

    pub fn fd(&self) -> (BorrowedFd<'_>, PollFlags) {
        match self {
            OomEvent::V1 { eventfd, .. } => (eventfd.as_fd(), PollFlags::POLLIN),
            OomEvent::V2 { events } => (events.as_fd(), PollFlags::POLLPRI),
        }
    }

    /// Consume the notification.
    pub fn reset(&mut self) {
        match self {
            OomEvent::V1 { eventfd, .. } => {
                let mut buf = [0u8; 8];
                let _ = eventfd.read(&mut buf);
            }
            OomEvent::V2 { events } => {
                use std::io::{Seek, SeekFrom};
                let mut buf = String::new();
                let _ = events.seek(SeekFrom::Start(0));
                let _ = events.read_to_string(&mut buf);
            }
        }
    }
}
