//! `sandboxd-egress`: the egress filter. The helper starts it inside the daemon's hub network
//! namespace, as the daemon's uid, without capabilities and with no_new_privs:
//!
//! ```text
//! sandboxd-egress --config '<FilterConfig JSON>'
//! ```
//!
//! with three inherited, already-bound descriptors named in the configuration: `tcp_fd` (the
//! listening socket redirected sandbox connections arrive on), `dns_fd` (UDP port 53 of the
//! gateway) and `control_fd` (the daemon's listening unix socket). It runs until SIGTERM and
//! outlives daemon and helper restarts; policies come from the daemon over the control socket.
//!
//! Modules: `sys` (descriptors and socket options; the only `unsafe`), `seccomp` (its own
//! system call filter), `policy` (the table and
//! the decision), `shared` (locks, a log throttle), `sniff` (SNI and Host), `dns` (the resolver), `tcp` (connections), `control`
//! (the daemon's socket and events).

mod control;
mod dns;
mod policy;
mod seccomp;
mod shared;
mod sniff;
mod sys;
mod tcp;

use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use sandboxd_protocol::egress::FilterConfig;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOXD_EGRESS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> anyhow::Result<FilterConfig> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = match args.as_slice() {
        [flag, json] if flag == "--config" => json,
        _ => bail!("usage: sandboxd-egress --config '<FilterConfig JSON>'"),
    };
    serde_json::from_str(json).context("parse --config")
}

fn run() -> anyhow::Result<()> {
    let config = parse_args()?;
    let fds = [config.tcp_fd, config.dns_fd, config.control_fd];
    if fds[0] == fds[1] || fds[0] == fds[2] || fds[1] == fds[2] {
        bail!("tcp_fd, dns_fd and control_fd must be three different descriptors");
    }
    let tcp = sys::adopt(config.tcp_fd, sys::Kind::TcpListener).context("tcp_fd")?;
    let dns = sys::adopt(config.dns_fd, sys::Kind::Udp).context("dns_fd")?;
    let control = sys::adopt(config.control_fd, sys::Kind::UnixListener).context("control_fd")?;
    raise_nofile();
    tracing::info!(credentials = %sys::credentials(), "sandboxd-egress starting");
    // Two workers: the copy loops of many connections spread over both cores; every shared
    // structure is behind a short mutex or an atomic.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    // Seccomp needs no_new_privs without CAP_SYS_ADMIN (the helper sets it already; the filter
    // never executes anything, so setting it again costs nothing).
    nix::sys::prctl::set_no_new_privs().context("set no_new_privs")?;
    match seccomp::install() {
        Ok(()) => tracing::info!("seccomp filter installed"),
        Err(seccomp::SeccompError::Arch) => {
            tracing::warn!("no seccomp filter for this architecture; running without")
        }
        Err(e) => return Err(e).context("seccomp"),
    }
    runtime.block_on(serve(config, tcp, dns, control))
}

/// Let the soft descriptor limit go up to the hard one: each connection holds two.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "raise RLIMIT_NOFILE");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "read RLIMIT_NOFILE"),
    }
}

async fn serve(
    config: FilterConfig,
    tcp: OwnedFd,
    dns: OwnedFd,
    control: OwnedFd,
) -> anyhow::Result<()> {
    let tcp = std::net::TcpListener::from(tcp);
    tcp.set_nonblocking(true).context("tcp_fd non-blocking")?;
    let tcp = tokio::net::TcpListener::from_std(tcp).context("tcp_fd")?;
    let dns = std::net::UdpSocket::from(dns);
    dns.set_nonblocking(true).context("dns_fd non-blocking")?;
    let dns = tokio::net::UdpSocket::from_std(dns).context("dns_fd")?;
    let control = std::os::unix::net::UnixListener::from(control);
    control
        .set_nonblocking(true)
        .context("control_fd non-blocking")?;
    let control = tokio::net::UnixListener::from_std(control).context("control_fd")?;

    let table = Arc::new(Mutex::new(policy::Table::default()));
    let events = Arc::new(control::Events::default());
    let limits = Arc::new(policy::Limits::from_config(&config));
    let upstream = Arc::new(dns::Upstream::new(config.upstream_dns));
    tracing::info!(
        tcp = %tcp::describe(&tcp),
        dns = %dns.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config.upstream_dns,
        subnet = %config.subnet,
        daemon_uid = config.daemon_uid,
        "serving"
    );
    let tcp_side = Arc::new(tcp::Tcp {
        table: Arc::clone(&table),
        events: Arc::clone(&events),
        limits: Arc::clone(&limits),
        slots: Arc::new(Semaphore::new(tcp::MAX_CONNECTIONS)),
        over_limit: shared::Throttle::default(),
        upstream: Arc::clone(&upstream),
    });
    let dns_side = Arc::new(dns::Dns {
        table: Arc::clone(&table),
        events: Arc::clone(&events),
        limits,
        upstream,
        failures: shared::Throttle::default(),
    });
    let control_side = Arc::new(control::Control {
        table,
        events,
        daemon_uid: config.daemon_uid,
    });
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        r = tcp_side.serve(tcp) => r.context("tcp listener")?,
        r = dns_side.serve(dns) => r.context("dns socket")?,
        r = control_side.serve(control) => r.context("control socket")?,
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = int.recv() => tracing::info!("SIGINT: exiting"),
    }
    Ok(())
}
