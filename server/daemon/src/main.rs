//! `sandboxd`: parse the configuration, start the helper, drop privileges, then serve.
//!
//! Everything before the privilege drop is synchronous and single-threaded on purpose: the helper
//! is started with `std::process::Command` before any tokio runtime (and so any thread) exists,
//! and the runtime is built only once the daemon has its final, unprivileged identity.

use std::io::{BufRead, BufReader, IsTerminal};
use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use sandboxd::api::{self, AppState};
use sandboxd::config::{self, Args};
use sandboxd::helper_client::SocketHelper;
use sandboxd::privileges;
use sandboxd::sandboxes::Service;
use sandboxd::store::Store;
use sandboxd::transport::{self, ConnLimits, Edge};
use sandboxd_protocol::layout::helper_socket;
use tokio_rustls::TlsAcceptor;

/// How long in-flight requests (followers, websockets) may delay shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(&args.log_level);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(args: Args) -> anyhow::Result<()> {
    // 0. Nothing created from here on is open to other users by accident.
    privileges::set_private_umask();
    // 1. Resolve the configuration.
    args.limits.policy()?;
    // The TLS key is read now, while still privileged: it may be readable by root only.
    let (tls, edge) = transport_setup(&args)?;
    let is_root = privileges::is_root();
    let target = if is_root {
        Some(privileges::lookup_user(&args.user)?)
    } else {
        None
    };
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => config::default_state_dir(is_root)?,
    };
    let helper = match &args.helper {
        Some(h) => h.clone(),
        None => config::default_helper_path()?,
    };
    if !helper.is_file() {
        bail!(
            "helper binary {} not found: pass --helper PATH",
            helper.display()
        );
    }

    // 2. The state directory: traversable by sandbox tooling, listable only by its owner.
    create_state_dir(&state_dir)?;
    // The daemon's ids after the drop: the helper hands it its files with exactly these (the
    // group is the user's primary group, whose number need not equal the uid's).
    let (daemon_uid, daemon_gid) = match &target {
        Some(t) => {
            chown(&state_dir, Some(t.uid.as_raw()), Some(t.gid.as_raw()))
                .with_context(|| format!("chown {} to {}", state_dir.display(), t.name))?;
            (t.uid.as_raw(), t.gid.as_raw())
        }
        None => (privileges::current_uid(), privileges::current_gid()),
    };

    // 3. Start the helper while still single-threaded, and wait until its socket is bound.
    let helper_child = start_helper(&helper, &state_dir, (daemon_uid, daemon_gid), &args)?;

    // 4. Become the unprivileged user for good.
    if let Some(t) = &target {
        privileges::drop_to(t)
            .with_context(|| format!("dropping privileges to user {}", t.name))?;
        tracing::info!(user = %t.name, uid = t.uid.as_raw(), "dropped privileges");
    }
    privileges::set_no_new_privs()?;

    // 5. Only now: threads, the database, the helper connection, reconciliation, serving.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(serve(args, state_dir, helper_child, tls, edge));
    // Watchers and followers are cut off here; sandboxes keep running under their monitors.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(())
}

fn start_helper(
    helper: &PathBuf,
    state_dir: &Path,
    (daemon_uid, daemon_gid): (u32, u32),
    args: &Args,
) -> anyhow::Result<std::process::Child> {
    #[allow(
        clippy::disallowed_methods,
        reason = "the helper is the one process the daemon starts, before any thread exists"
    )]
    let mut child = Command::new(helper)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--allow-uid")
        .arg(daemon_uid.to_string())
        .arg("--allow-gid")
        .arg(daemon_gid.to_string())
        .arg("--uid-base")
        .arg(args.uid_base.to_string())
        .arg("--uid-slots")
        .arg(args.uid_slots.to_string())
        .arg("--exit-with-stdin")
        .args(args.no_cgroups.then_some("--no-cgroups"))
        .args(
            args.allow_caps
                .iter()
                .flat_map(|c| ["--allow-cap", c.as_str()]),
        )
        .args(args.allow_nested_userns.then_some("--allow-nested-userns"))
        .arg("--max-image-bytes")
        .arg(args.limits.max_image_bytes.to_string())
        .args(["--net-subnet", args.net_subnet.as_str()])
        .arg("--publish-ports")
        .arg(args.publish_ports.to_string())
        .args(args.egress.helper_args())
        // The helper's lifeline: it exits when this pipe closes, that is when the daemon dies
        // however it dies. (PR_SET_PDEATHSIG alone is not enough: the kernel checks the dying
        // parent's permission to signal, and an unprivileged daemon may not signal a root helper.)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // The helper's own log lines go where ours go.
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting the helper {}", helper.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("the helper's stdout is not a pipe")?;
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    if matches!(read, Ok(n) if n > 0) && line == "ready\n" {
        tracing::info!(pid = child.id(), "helper ready");
        // Deliberately never closed: the write end lives exactly as long as this process.
        std::mem::forget(child.stdin.take());
        return Ok(child);
    }
    // The helper did not come up: report how it ended (its stderr is already on ours).
    let _ = child.kill();
    let status = child.wait().context("waiting for the helper")?;
    match read {
        Err(e) => bail!("reading the helper's ready line failed ({e}); helper {status}"),
        Ok(_) if line.is_empty() => {
            bail!("the helper exited before it was ready ({status}); see its messages above")
        }
        Ok(_) => bail!(
            "the helper said {:?} instead of \"ready\" ({status})",
            line.trim_end()
        ),
    }
}

async fn serve(
    args: Args,
    state_dir: PathBuf,
    mut helper_child: std::process::Child,
    tls: Option<TlsAcceptor>,
    edge: Edge,
) -> anyhow::Result<()> {
    let store = Store::open(&state_dir.join("sandboxd.db"))
        .await
        .context("opening the database")?;
    let stored_clock = store
        .lifetime_clock()
        .await
        .context("reading the lifetime clock")?;
    let boot = sandboxd::lifetime::boot_id();
    let (clock, changed) = sandboxd::lifetime::SystemClock::establish(stored_clock, &boot);
    if let Some(offset) = changed {
        store
            .set_lifetime_clock(&boot, offset)
            .await
            .context("storing the lifetime clock")?;
    }
    let clock: Arc<dyn sandboxd::lifetime::Clock> = Arc::new(clock);
    let helper = SocketHelper::connect(&helper_socket(&state_dir))
        .await
        .context("connecting to the helper")?;
    tracing::info!(mode = helper_mode(&helper), "connected to the helper");
    let mut policy = args.limits.policy()?;
    policy.allow_nested_userns = args.allow_nested_userns;
    policy.publish_ports = args.publish_ports;
    policy.egress_tenants = args.egress.egress_tenants.clone();
    for name in &args.allow_caps {
        match sandboxd_protocol::capabilities::canonical(name) {
            Some(cap) => policy.allowed_caps.push(cap),
            None => anyhow::bail!("--allow-cap: unknown capability {name:?}"),
        }
    }
    let auth = Arc::new(sandboxd::auth::Auth::new(store.clone(), Arc::clone(&clock)));
    let svc = Service::new(
        store,
        Arc::new(helper),
        clock,
        &state_dir,
        args.uid_slots,
        policy,
    );
    svc.set_min_free_space(args.limits.min_free_space);
    svc.check_host_limits()
        .await
        .context("asking the helper what it can enforce")?;
    svc.reconcile().await.context("reconciling state")?;
    // After reconciliation: the filter is told the policies of the sandboxes still live.
    svc.start_egress()
        .await
        .context("asking the helper about egress")?;
    svc.reconcile_images()
        .await
        .context("reconciling stored images")?;
    // After reconciliation, so that its first pass (at once) sees every row's final state.
    svc.start_reaper();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let socket_path = state_dir.join(transport::API_SOCKET);
    let unix_listener = transport::bind_unix(&socket_path)?;
    let mut state = AppState::new(svc, auth);
    state.failed_auth_burst = args.transport.failed_auth_burst;
    sandboxd::auth::bootstrap_admin_token(&state.auth, &state_dir)
        .await
        .context("creating the admin token")?;
    let app = transport::edge(api::app(state), &edge);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{addr}");
    tracing::info!("listening on unix:{}", socket_path.display());

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = ConnLimits::default();
    let tcp = transport::serve_tcp(listener, app.clone(), tls, limits, stop_rx.clone());
    let unix = transport::serve_unix(
        unix_listener,
        app,
        privileges::current_uid(),
        limits,
        stop_rx.clone(),
    );
    let server = async move {
        tokio::join!(tcp, unix);
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down; sandboxes keep running");
        stop_tx.send_replace(true);
    });
    // A daemon without its helper cannot start or remove sandboxes, and after the privilege drop
    // it cannot start a new root helper: exit with an error so that a supervisor restarts both.
    // Running sandboxes are unaffected (they belong to their monitors) and are found again.
    let helper_exit = tokio::task::spawn_blocking(move || helper_child.wait());
    tokio::select! {
        () = server => {}
        status = helper_exit => {
            let status = match status {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            bail!("the helper exited ({status}); exiting so that a supervisor restarts sandboxd (running sandboxes are unaffected)");
        }
        _ = async {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!("open connections did not finish in time; closing them"),
    }
    Ok(())
}

/// Check the transport flags (TLS beyond loopback, CORS origins, the burst limit) and load the
/// TLS certificate and key.
fn transport_setup(args: &Args) -> anyhow::Result<(Option<TlsAcceptor>, Edge)> {
    let t = &args.transport;
    let tls = match (&t.tls_cert, &t.tls_key) {
        (Some(cert), Some(key)) => Some(transport::load_tls(cert, key)?),
        (None, None) => None,
        _ => return Err(transport::TransportError::TlsHalf.into()),
    };
    transport::check_listen(args.listen, tls.is_some())?;
    let rate = t.rate_limit_per_sec;
    if !rate.is_finite() || rate < 0.0 {
        return Err(transport::TransportError::RateLimit(rate).into());
    }
    let edge = Edge {
        allowed_hosts: args.allowed_hosts.clone(),
        allowed_origins: args.allowed_origins.clone(),
        cors_origins: transport::cors_origins(&t.cors_origins)?,
        rate_limit: (rate > 0.0).then_some((rate, t.rate_limit_burst)),
    };
    Ok((tls, edge))
}

fn helper_mode(h: &SocketHelper) -> &'static str {
    use sandboxd::helper_client::Helper;
    h.mode().as_str()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
