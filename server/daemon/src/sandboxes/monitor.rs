//! The daemon's side of a monitor's control socket (`monitor.sock`, see
//! `sandboxd_protocol::control`): waiting for the end of a sandbox and asking for a signal.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use sandboxd_protocol::control;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long a monitor may take to answer a kill request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// No monitor listens: the sandbox has ended (or never started).
    #[error("the sandbox's monitor is gone")]
    Gone(#[source] io::Error),
    #[error("talking to the monitor failed")]
    Io(#[from] io::Error),
    #[error("the monitor did not answer in time")]
    Timeout,
    #[error("the monitor refused: {0}")]
    Refused(String),
    #[error("the monitor closed the connection without an answer")]
    NoAnswer,
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Connect to a monitor; `Gone` when nobody listens any more.
pub async fn connect(socket: &Path) -> Result<UnixStream, MonitorError> {
    let classify = |e: io::Error| {
        if is_gone(&e) {
            MonitorError::Gone(e)
        } else {
            MonitorError::Io(e)
        }
    };
    // A socket address holds at most 107 bytes of path, and a deep state directory exceeds
    // that. Connect through an O_PATH descriptor of the sandbox's directory instead, whose
    // /proc/self/fd path is always short.
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return Err(MonitorError::Io(io::ErrorKind::InvalidInput.into()));
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(dir)
        .map_err(classify)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    let stream = UnixStream::connect(&short).await.map_err(classify);
    drop(dir);
    stream
}

/// Hold a connection until the monitor closes it, which it does only once the sandbox has ended
/// and its status and output are complete. Read errors count as the end as well.
pub async fn wait_for_close(mut stream: UnixStream) {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Ask the monitor to deliver signal `signo` to the sandbox.
pub async fn kill(socket: &Path, signo: i32) -> Result<(), MonitorError> {
    let stream = connect(socket).await?;
    let exchange = async {
        let mut reader = BufReader::new(stream);
        reader
            .get_mut()
            .write_all(control::kill_line(signo).as_bytes())
            .await?;
        let mut line = String::new();
        let n = (&mut reader)
            .take(control::MAX_LINE as u64 * 4)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Err(MonitorError::NoAnswer);
        }
        let line = line.trim_end_matches('\n');
        if line == "ok" {
            Ok(())
        } else {
            Err(MonitorError::Refused(
                line.strip_prefix("err ").unwrap_or(line).to_owned(),
            ))
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| MonitorError::Timeout)?
}
