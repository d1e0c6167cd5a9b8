//! TCP throughput from the host into a sandbox through a published port, side by side with the
//! same transfer over plain loopback to the same receiver program on the host.
//!
//! The receiver is one Python script (run inside a bridged sandbox, and on the host) that reads
//! every byte into a 1 MiB buffer and answers with the count; the sender writes `bytes` in 1 MiB
//! writes, shuts its side down and waits for the count. The figure is bytes over the time from
//! connect to answer. A benchmark, not a test: it reports, it asserts nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sandboxd_api::{CreateSandbox, NetworkMode, NetworkSpec, PortSpec};
use sandboxd_client::Client;

/// Reads whole connections and answers each with the number of bytes it read.
const RECEIVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("listening", s.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        n += k
    c.sendall(b"%d\n" % n)
    c.close()
"#;

const SANDBOX_PORT: u16 = 5001;

pub struct Report {
    bytes: u64,
    published: Vec<f64>,
    loopback: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Report {
    pub fn render(&self, markdown: bool) -> String {
        let (p, l) = (median(&self.published), median(&self.loopback));
        let mib = self.bytes >> 20;
        let runs = self.published.len();
        let mut out = String::new();
        if markdown {
            out.push_str(&format!(
                "TCP throughput host to receiver, {mib} MiB per transfer, median of {runs}:\n\n\
                 | path | median | min | max | vs loopback |\n|---|---|---|---|---|\n"
            ));
            for (name, v, m) in [
                ("published port into a bridged sandbox", &self.published, p),
                ("plain loopback on the host", &self.loopback, l),
            ] {
                let min = v.iter().copied().fold(f64::INFINITY, f64::min);
                let max = v.iter().copied().fold(0.0, f64::max);
                out.push_str(&format!(
                    "| {name} | {m:.0} MiB/s | {min:.0} MiB/s | {max:.0} MiB/s | {:.2}x |\n",
                    m / l
                ));
            }
        } else {
            out.push_str(&format!(
                "throughput ({mib} MiB per transfer, median of {runs}): published port {p:.0} MiB/s, \
                 loopback {l:.0} MiB/s, ratio {:.2}x\n",
                p / l
            ));
        }
        out
    }
}

/// One transfer; MiB/s.
fn transfer(port: u16, bytes: u64) -> anyhow::Result<f64> {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("connecting")?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).context("sending")?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .context("reading the count")?;
    let elapsed = start.elapsed();
    if answer.trim() != bytes.to_string() {
        bail!(
            "the receiver counted {:?} bytes, not {bytes}",
            answer.trim()
        );
    }
    Ok(bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64())
}

/// The host's receiver on 127.0.0.1; killed on drop.
struct HostReceiver(Child, u16);

impl HostReceiver {
    fn start() -> anyhow::Result<HostReceiver> {
        let mut child = Command::new("python3")
            .args(["-c", RECEIVER, "127.0.0.1", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3 on the host")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let port = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .context("the receiver did not say its port")?;
        Ok(HostReceiver(child, port))
    }
}

impl Drop for HostReceiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(client: &Client, bytes: u64, runs: u64) -> anyhow::Result<Report> {
    let spec = CreateSandbox {
        labels: [("sandboxd-bench".to_owned(), "throughput".to_owned())].into(),
        ttl_secs: Some(3600),
        network: Some(NetworkSpec {
            mode: NetworkMode::Bridge,
            group: None,
            ports: vec![PortSpec {
                sandbox: SANDBOX_PORT,
                host: 0,
            }],
            egress: None,
        }),
        ..CreateSandbox::new(vec![
            "python3".into(),
            "-c".into(),
            RECEIVER.into(),
            "0.0.0.0".into(),
            SANDBOX_PORT.to_string(),
        ])
    };
    let sandbox = client
        .create(&spec)
        .await
        .context("creating the receiver sandbox (bridge mode needs a privileged daemon)")?;
    let id = sandbox.id.to_string();
    let result = async {
        let port = sandbox
            .network
            .as_ref()
            .and_then(|n| n.ports.first())
            .map(|p| p.host)
            .context("the sandbox shows no published port")?;
        // Wait until the receiver inside listens (before that the forwarder's connection to it
        // is refused and the transfer fails).
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::task::spawn_blocking(move || transfer(port, 1))
            .await?
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the receiver in the sandbox did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::spawn_blocking(move || -> anyhow::Result<Report> {
            let host = HostReceiver::start()?;
            // Warm up both paths, then alternate so that neither gets a quieter moment.
            transfer(port, 16 << 20)?;
            transfer(host.1, 16 << 20)?;
            let mut report = Report {
                bytes,
                published: Vec::new(),
                loopback: Vec::new(),
            };
            for _ in 0..runs {
                report.published.push(transfer(port, bytes)?);
                report.loopback.push(transfer(host.1, bytes)?);
            }
            Ok(report)
        })
        .await?
    }
    .await;
    let _ = client.kill(&id, Some("SIGKILL")).await;
    let _ = client.wait(&id).await;
    let _ = client.delete(&id).await;
    result
}
