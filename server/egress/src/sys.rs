//! The filter's few system calls: taking over the descriptors the helper left open for it,
//! a redirected connection's original destination, a control peer's uid, and what the process
//! runs as. The only module of the filter with `unsafe` (one block: adopting an inherited
//! descriptor number).

#![allow(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("descriptor {0} is stdin, stdout or stderr")]
    Stdio(RawFd),
    #[error("descriptor {0} is not open")]
    NotOpen(RawFd, #[source] Errno),
    #[error("descriptor {fd} is not a {want} socket")]
    WrongKind { fd: RawFd, want: &'static str },
    #[error("inspect descriptor {0}")]
    Inspect(RawFd, #[source] Errno),
    #[error("read the original destination")]
    OriginalDst(#[source] Errno),
    #[error("read the peer's credentials")]
    PeerCred(#[source] Errno),
}

/// What an inherited descriptor must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A listening IPv4 TCP socket.
    TcpListener,
    /// An IPv4 UDP socket.
    Udp,
    /// A listening unix stream socket.
    UnixListener,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::TcpListener => "listening IPv4 TCP",
            Kind::Udp => "IPv4 UDP",
            Kind::UnixListener => "listening unix stream",
        }
    }
}

/// Take ownership of descriptor `fd`, inherited from the helper, after checking that it is
/// open and a socket of `kind`. Marks it close-on-exec (the filter never execs, but nothing it
/// might start should hold it).
pub fn adopt(fd: RawFd, kind: Kind) -> Result<OwnedFd, SysError> {
    if (0..=2).contains(&fd) {
        return Err(SysError::Stdio(fd));
    }
    let flags = fcntl(fd, FcntlArg::F_GETFD).map_err(|e| SysError::NotOpen(fd, e))?;
    // SAFETY: `fd` is open (F_GETFD succeeded) and not a standard stream. It was inherited
    // across exec for this process alone, named in the configuration only, and `main` adopts
    // each configured number once (it refuses duplicates), so no other owner of this
    // descriptor exists in the process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut flags = FdFlag::from_bits_truncate(flags);
    flags.insert(FdFlag::FD_CLOEXEC);
    fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(flags)).map_err(|e| SysError::Inspect(fd, e))?;
    check_kind(&owned, kind)?;
    Ok(owned)
}

fn check_kind(fd: &OwnedFd, kind: Kind) -> Result<(), SysError> {
    let raw = fd.as_raw_fd();
    let wrong = || SysError::WrongKind {
        fd: raw,
        want: kind.describe(),
    };
    let ty = match getsockopt(fd, sockopt::SockType) {
        Ok(ty) => ty,
        Err(Errno::ENOTSOCK) => return Err(wrong()),
        Err(e) => return Err(SysError::Inspect(raw, e)),
    };
    let addr: SockaddrStorage = getsockname(raw).map_err(|e| SysError::Inspect(raw, e))?;
    let (want_ty, want_family, listening) = match kind {
        Kind::TcpListener => (SockType::Stream, AddressFamily::Inet, true),
        Kind::Udp => (SockType::Datagram, AddressFamily::Inet, false),
        Kind::UnixListener => (SockType::Stream, AddressFamily::Unix, true),
    };
    if ty != want_ty || addr.family() != Some(want_family) {
        return Err(wrong());
    }
    if listening && !getsockopt(fd, sockopt::AcceptConn).map_err(|e| SysError::Inspect(raw, e))? {
        return Err(wrong());
    }
    Ok(())
}

/// Where a connection redirected to the filter was going (`SO_ORIGINAL_DST`, from conntrack).
pub fn original_dst(sock: &impl AsFd) -> Result<SocketAddrV4, SysError> {
    let sin = getsockopt(sock, sockopt::OriginalDst).map_err(SysError::OriginalDst)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// The uid of the process at the other end of a unix socket (`SO_PEERCRED`).
pub fn peer_uid(sock: &impl AsFd) -> Result<u32, SysError> {
    getsockopt(sock, sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(SysError::PeerCred)
}

/// One line for the log: the ids and capability sets this process runs with, from
/// `/proc/self/status` (the filter needs no capability; this shows it has none).
pub fn credentials() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "uid {} gid {} groups [{}] CapEff {} CapPrm {} NoNewPrivs {}",
        field("Uid:"),
        field("Gid:"),
        field("Groups:"),
        field("CapEff:"),
        field("CapPrm:"),
        field("NoNewPrivs:"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::IntoRawFd;

    #[test]
    fn adopt_checks_the_kind() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dir = std::env::temp_dir().join(format!("egress-sys-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let unix = std::os::unix::net::UnixListener::bind(&dir).expect("bind");
        let (tcp, udp, unix) = (
            OwnedFd::from(tcp).into_raw_fd(),
            OwnedFd::from(udp).into_raw_fd(),
            OwnedFd::from(unix).into_raw_fd(),
        );
        assert!(matches!(adopt(1, Kind::Udp), Err(SysError::Stdio(1))));
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let file = OwnedFd::from(file).into_raw_fd();
        assert!(matches!(
            adopt(file, Kind::Udp),
            Err(SysError::WrongKind { .. })
        ));
        assert!(matches!(
            adopt(udp, Kind::TcpListener),
            Err(SysError::WrongKind { .. })
        ));
        assert!(adopt(tcp, Kind::TcpListener).is_ok());
        assert!(adopt(unix, Kind::UnixListener).is_ok());
        let _ = std::fs::remove_file(&dir);
        assert!(credentials().contains("CapEff"));
    }
}
