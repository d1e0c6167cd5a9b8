//! `sandboxd-bench`: create-to-exit latency of `true` through the sandboxd API, side by side with
//! `bwrap` and a bare fork+exec, at concurrency 1 and N. A benchmark, not a test: it asserts nothing
//! about timings and only reports them.

mod daemon;
mod peers;
mod report;
mod stats;
mod throughput;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use futures_util::{stream, StreamExt, TryStreamExt};
use sandboxd_client::{Client, DEFAULT_URL};

use crate::daemon::Daemon;
use crate::peers::{find_in_path, Peer, PeerError};

mod image;
use crate::report::Row;
use crate::stats::Stats;

/// Benchmark sandboxd's create-to-exit latency against bwrap and fork+exec.
#[derive(Debug, Parser)]
#[command(name = "sandboxd-bench", version)]
struct Args {
    /// Base URL of the daemon.
    #[arg(long, env = "SANDBOXD_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Bearer token for the daemon; with --spawn-daemon, its admin token is used by default.
    #[arg(long, env = "SANDBOXD_TOKEN")]
    token: Option<String>,
    /// Measured iterations at concurrency 1.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    iterations: u64,
    /// Concurrency of the second phase.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=256))]
    concurrency: u64,
    /// Measured iterations in total at the higher concurrency.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..))]
    concurrent_iterations: u64,
    /// Unmeasured runs of each peer before its first phase.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Print the results as Markdown tables (for BENCHMARKS.md).
    #[arg(long)]
    markdown: bool,
    /// Also run sandboxd with memory, cpus and pids limits (the cost of enforcing them).
    #[arg(long)]
    with_limits: bool,
    /// Leave out the exec row (`true` as an exec in one running sandbox).
    #[arg(long)]
    no_exec: bool,
    /// Also run `true` from an image (an overlay on an idmapped image) instead of the host root.
    #[arg(long)]
    with_image: bool,
    /// Also run sandboxd with a bridged network (the cost of the veth, address and route).
    #[arg(long)]
    with_bridge: bool,
    /// Also measure TCP throughput from the host into a sandbox through a published port,
    /// against the same transfer over plain loopback (needs bridge mode: a privileged daemon).
    #[arg(long)]
    throughput: bool,
    /// Bytes sent per throughput transfer.
    #[arg(long, default_value_t = 512 << 20)]
    throughput_bytes: u64,
    /// Transfers per throughput peer.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    throughput_runs: u64,
    /// Install missing peers (`apt-get install -y bubblewrap`) instead of skipping them.
    #[arg(long)]
    install_peers: bool,
    /// Start this sandboxd binary for the run (with --listen from --url) and stop it afterwards.
    #[arg(long, value_name = "PATH_TO_SANDBOXD")]
    spawn_daemon: Option<PathBuf>,
    /// State directory of the spawned daemon; a fresh temporary directory by default.
    #[arg(long, requires = "spawn_daemon")]
    state_dir: Option<PathBuf>,
    /// Extra arguments for the spawned daemon (after `--`).
    #[arg(last = true, requires = "spawn_daemon")]
    daemon_args: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sandboxd-bench: starting async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandboxd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut client = Client::new(&args.url)?;
    if let Some(token) = &args.token {
        client = client.with_token(token.clone());
    }

    // Declared before the daemon so that the daemon is stopped before its directory goes away.
    let mut temp_dir = None;
    let _daemon = match &args.spawn_daemon {
        Some(path) => {
            let state_dir = match &args.state_dir {
                Some(dir) => dir.clone(),
                None => temp_dir
                    .insert(tempfile::tempdir().context("creating a temporary state directory")?)
                    .path()
                    .to_owned(),
            };
            eprintln!(
                "starting {} (state in {})",
                path.display(),
                state_dir.display()
            );
            let started = Daemon::start(path, &client, &state_dir, &args.daemon_args).await;
            // The daemon writes its admin token at first start; the benchmark uses it.
            if args.token.is_none() {
                if let Ok(token) = std::fs::read_to_string(state_dir.join("admin.token")) {
                    client = client.with_token(token.trim().to_owned());
                }
            }
            if started.is_err() {
                // Keep the log that the error points at.
                if let Some(dir) = temp_dir.take() {
                    let _ = dir.keep();
                }
            }
            Some(started?)
        }
        None => {
            client.health().await.with_context(|| {
                format!(
                    "no daemon answers at {}; start one or pass --spawn-daemon",
                    client.base_url()
                )
            })?;
            None
        }
    };

    let mut peers = vec![Peer::Sandboxd(client.clone())];
    if args.with_limits {
        peers.push(Peer::SandboxdLimited(client.clone()));
    }
    // Kept until the end of the run: the image's tarball is built in it.
    let image_dir = tempfile::tempdir().context("creating a directory for the image")?;
    if args.with_image {
        image::import(&client, image_dir.path()).await?;
        peers.push(Peer::SandboxdImage(client.clone()));
    }
    if args.with_bridge {
        peers.push(Peer::SandboxdBridge(client.clone()));
    }
    let mut skipped = Vec::new();
    match bwrap(args.install_peers) {
        Ok(path) => peers.push(Peer::Bwrap(path)),
        Err(why) => {
            eprintln!("bwrap: {why}; skipping it");
            skipped.push(("bwrap", why));
        }
    }
    peers.push(Peer::ForkExec);
    // One long-lived sandbox for the exec row, removed at the end.
    let exec_sandbox = if args.no_exec {
        None
    } else {
        let spec = sandboxd_api::CreateSandbox {
            labels: [("sandboxd-bench".to_owned(), "exec".to_owned())].into(),
            ..sandboxd_api::CreateSandbox::new(vec!["sleep".to_owned(), "86400".to_owned()])
        };
        let sandbox = client.create(&spec).await?;
        let id = sandbox.id.to_string();
        peers.push(Peer::SandboxdExec(client.clone(), id.clone()));
        Some(id)
    };

    let phases = [
        (1, args.iterations),
        (args.concurrency, args.concurrent_iterations),
    ];
    let mut rows = Vec::new();
    let mut broken: Vec<&'static str> = Vec::new();
    for peer in &peers {
        if args.warmup > 0 {
            if let Err(e) = measure(peer, args.warmup, 1).await {
                eprintln!("{}: warm-up failed: {}", peer.name(), chain(&e));
                broken.push(peer.name());
            }
        }
    }
    for &(concurrency, iterations) in &phases {
        for peer in &peers {
            let outcome = if broken.contains(&peer.name()) {
                Err("failed in warm-up".to_owned())
            } else {
                eprintln!(
                    "{}: {iterations} runs at concurrency {concurrency}...",
                    peer.name()
                );
                measure(peer, iterations, concurrency).await.map_err(|e| {
                    eprintln!("{}: failed: {}", peer.name(), chain(&e));
                    "failed".to_owned()
                })
            };
            rows.push(Row {
                peer: peer.name(),
                concurrency: usize::try_from(concurrency).unwrap_or(usize::MAX),
                outcome,
            });
        }
        for (name, _) in &skipped {
            rows.push(Row {
                peer: name,
                concurrency: usize::try_from(concurrency).unwrap_or(usize::MAX),
                outcome: Err("skipped".to_owned()),
            });
        }
    }

    if let Some(id) = exec_sandbox {
        if let Err(e) = client.delete(&id).await {
            eprintln!("removing the exec sandbox {id}: {}", chain(&e));
        }
    }
    print_report(&args, &client, &peers, &rows).await;
    if args.throughput {
        let report = throughput::run(&client, args.throughput_bytes, args.throughput_runs).await?;
        println!();
        print!("{}", report.render(args.markdown));
    }
    let sandboxd_ok = rows
        .iter()
        .filter(|r| r.peer == "sandboxd")
        .all(|r| r.outcome.is_ok());
    Ok(if sandboxd_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `iterations` runs of `peer`, `concurrency` at a time, stopping at the first failure.
async fn measure(peer: &Peer, iterations: u64, concurrency: u64) -> Result<Stats, PeerError> {
    let concurrency = usize::try_from(concurrency).unwrap_or(1);
    let start = Instant::now();
    let latencies: Vec<_> = stream::iter(0..iterations)
        .map(|_| peer.run_once())
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let wall = start.elapsed();
    Ok(Stats::new(latencies, wall).expect("iterations is at least 1"))
}

/// The path of `bwrap`, installing it first when allowed.
fn bwrap(install: bool) -> Result<PathBuf, String> {
    if let Some(path) = find_in_path("bwrap") {
        return Ok(path);
    }
    if !install {
        return Err("not installed (pass --install-peers to apt-get install bubblewrap)".into());
    }
    eprintln!("bwrap: not installed; running apt-get install -y bubblewrap");
    let status = Command::new("apt-get")
        .args(["install", "-y", "bubblewrap"])
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !status.success() {
        return Err(format!(
            "apt-get install -y bubblewrap failed with {status}"
        ));
    }
    find_in_path("bwrap").ok_or_else(|| "still not in PATH after installing bubblewrap".into())
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

async fn print_report(args: &Args, client: &Client, peers: &[Peer], rows: &[Row]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let daemon = match client.info().await {
        Ok(info) => format!("sandboxd {} ({} mode)", info.version, info.mode),
        Err(_) => "sandboxd (version unknown)".to_owned(),
    };
    let notes = [
        format!("{daemon}, {cores} cores"),
        "latency: from the request (or fork) until `true` has exited; for sandboxd the DELETE \
         that follows each run is not in the latency but is in the throughput"
            .to_owned(),
    ];
    let runs: Vec<String> = peers
        .iter()
        .map(|p| format!("{}: {}", p.name(), p.describe()))
        .collect();
    if args.markdown {
        for line in notes.iter().chain(&runs) {
            println!("- {line}");
        }
        println!();
        print!("{}", report::markdown(rows, "sandboxd"));
    } else {
        for line in notes.iter().chain(&runs) {
            println!("{line}");
        }
        println!();
        print!("{}", report::text(rows, "sandboxd"));
    }
}
