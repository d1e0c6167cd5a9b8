//! The hub's side of egress (privileged mode), against a test internet of the test's own
//! (`sandboxd_tests::internet`): the uplink pair, both nftables tables and the filter exist when
//! egress is on and are gone after the daemon stops; the filter runs as the daemon's uid without
//! capabilities, in the hub; a sandbox's TCP connection reaches the filter (refused fast without a
//! policy, and nothing arrives at the test internet), other UDP is refused fast, the host's
//! addresses stay out of reach; kill -9 of daemon and helper and a restart keep one filter and
//! leave nothing behind.
//!
//! Packets go only to the host's own addresses (never answered by anything but this test's
//! listener) and into namespaces this test or the daemon under test made.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sandboxd_tests::internet::{self, TestInternet, DNS, OTHER, WEB};
use sandboxd_tests::{descendants_of, eventually, process_exists, require_e2e, Daemon, Mode};
use serde_json::{json, Value};

/// `tcp HOST PORT` connects, sends a request and reads; `udp HOST PORT` sends and waits for an
/// answer; `dns SERVER NAME` asks for an A record. Each prints `KIND TARGET RESULT SECONDS`.
const PROBE: &str = r#"
import socket, struct, sys, time
def tcp(host, port):
    s = socket.create_connection((host, int(port)), timeout=5)
    s.settimeout(5)
    s.sendall(b"GET /probe HTTP/1.1\r\nHost: probe.test\r\nConnection: close\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    if not data:
        return "closed"
    text = data.decode(errors="replace")
    shown = text.split("\r\n\r\n", 1)[1] if text.startswith("HTTP/") else text.split("\r\n")[0]
    return "data:" + shown.strip().replace(" ", "_")
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((host, int(port)))
    s.send(b"ping")
    return "data:" + s.recv(100).decode(errors="replace")
def dns(server, name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    r = s.recv(512)
    return "rcode:%d" % (r[3] & 15)
args = sys.argv[1:]
while args:
    kind, a, b = args[:3]
    args = args[3:]
    t = time.monotonic()
    try:
        result = {"tcp": tcp, "udp": udp, "dns": dns}[kind](a, b)
    except Exception as e:
        result = type(e).__name__
    print(kind, a + ":" + b, result, "%.3f" % (time.monotonic() - t), flush=True)
"#;

/// One line of the probe's output: (result, seconds).
fn outcome(output: &str, kind: &str, target: &str) -> (String, f64) {
    let line = output
        .lines()
        .find(|l| l.starts_with(&format!("{kind} {target} ")))
        .unwrap_or_else(|| panic!("no {kind} {target} in the probe's output:\n{output}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    (
        fields[2].to_owned(),
        fields[3].parse().expect("the probe prints seconds"),
    )
}

fn egress_daemon(net: &TestInternet) -> Daemon {
    let uplink = net.path().to_str().expect("a UTF-8 path").to_owned();
    Daemon::start_with(
        Mode::Privileged,
        &[
            "--egress-uplink",
            &uplink,
            "--egress-dns",
            &net.dns().to_string(),
        ],
    )
}

/// Run the probe in a bridged sandbox (with `egress` as its policy, if any).
fn probe(d: &Daemon, egress: Option<Value>, args: &[&str]) -> String {
    let mut network = json!({"mode": "bridge"});
    if let Some(e) = egress {
        network["egress"] = e;
    }
    let mut command = vec!["python3", "-c", PROBE];
    command.extend_from_slice(args);
    let (sandbox, out) = d.run_spec(json!({"command": command, "network": network}));
    assert_eq!(sandbox.exit_code, Some(0), "the probe failed: {out}");
    out
}

/// What the filter wrote to its log (for failure messages).
fn filter_log(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join("helper/egress.log")).unwrap_or_default()
}

fn filter_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state_dir.join("helper/egress.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    (exe.file_name()? == "sandboxd-egress").then_some(pid)
}

/// Every running `sandboxd-egress` in the hub `hub` (a namespace file).
fn filters_in(hub: &Path) -> Vec<i32> {
    let Ok(hub) = std::fs::metadata(hub).map(|m| m.ino()) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_filter = std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.file_name().is_some_and(|n| n == "sandboxd-egress"));
        let in_hub = std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == hub);
        if is_filter && in_hub {
            pids.push(pid);
        }
    }
    pids
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

fn host_addresses() -> Vec<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

fn has_prefix(names: &[String], prefix: &str) -> bool {
    names.iter().any(|n| n.starts_with(prefix))
}

/// The whole life of the hub's egress side: built at start, working, gone after the stop.
#[test]
fn the_uplink_the_tables_and_the_filter_come_and_go() {
    require_e2e!();
    let net = TestInternet::new();
    net.add_a("www.example.test", WEB);
    let d = egress_daemon(&net);
    let info = d.get("/v1/info").json();
    assert_eq!(info["egress"]["available"], true, "{info}");

    // The pair, the tables.
    let hub = d.hub_path();
    assert!(internet::links_in(&hub).contains(&"uplink0".to_owned()));
    assert!(has_prefix(&net.links(), "sbxup"), "{:?}", net.links());
    assert!(has_prefix(&internet::nft_tables(&hub), "sandboxd_"));
    assert!(has_prefix(&net.nft_tables(), "sandboxd_"));

    // The filter: the daemon's uid, no capability, no_new_privs, in the hub.
    let pid = filter_pid(&d.state_dir)
        .unwrap_or_else(|| panic!("the filter runs; its log:\n{}", filter_log(&d.state_dir)));
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some(d.uid.to_string().as_str())
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let filter_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(filter_ns, std::fs::metadata(&hub).unwrap().ino());
    let sock = std::fs::metadata(d.state_dir.join("helper/egress.sock")).unwrap();
    assert_eq!((sock.uid(), sock.mode() & 0o777), (d.uid, 0o600));

    // A listener on every host address: nothing from a sandbox may arrive.
    let host = TcpListener::bind("0.0.0.0:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port().to_string();
    let mut host_targets: Vec<String> = host_addresses().iter().map(|a| a.to_string()).collect();
    // The link's two ends and the hub's gateway are the host's side too.
    host_targets.extend(["100.127.255.253", "100.127.255.254", "10.88.0.1"].map(String::from));

    let mut args: Vec<&str> = vec![
        "tcp",
        "203.0.113.10",
        "80",
        "udp",
        "203.0.113.20",
        "7",
        "dns",
        "10.88.0.1",
        "www.example.test",
    ];
    for t in &host_targets {
        args.extend(["tcp", t.as_str(), port.as_str()]);
    }
    let out = probe(&d, None, &args);
    // No policy: the filter takes the connection and resets it, fast; nothing arrives.
    let (web, secs) = outcome(&out, "tcp", "203.0.113.10:80");
    assert!(!web.starts_with("data:"), "{out}");
    assert!(secs < 2.0, "a denial must be fast: {out}");
    assert_eq!(net.received(SocketAddrV4::new(WEB, 80)), 0);
    // UDP other than DNS: refused at once (ICMP port unreachable), never sent.
    let (udp, secs) = outcome(&out, "udp", "203.0.113.20:7");
    assert_eq!(udp, "ConnectionRefusedError", "{out}");
    assert!(secs < 2.0, "{out}");
    assert_eq!(net.received(SocketAddrV4::new(OTHER, 7)), 0);
    // The gateway answers DNS (the filter), and refuses a name no policy allows.
    let (dns, _) = outcome(&out, "dns", "10.88.0.1:www.example.test");
    assert!(dns.starts_with("rcode:") && dns != "rcode:0", "{out}");
    assert_eq!(net.received(SocketAddrV4::new(DNS, 53)), 0);
    for t in &host_targets {
        let (r, _) = outcome(&out, "tcp", &format!("{t}:{port}"));
        assert!(!r.starts_with("data:"), "{t}: {out}");
    }
    assert!(host.accept().is_err(), "a sandbox reached the host");

    // The positive control: allowed by address, the same path reaches the test internet.
    let out = probe(
        &d,
        Some(json!({"allow": ["203.0.113.10:80"]})),
        &["tcp", "203.0.113.10", "80", "tcp", "203.0.113.20", "8080"],
    );
    let (web, _) = outcome(&out, "tcp", "203.0.113.10:80");
    assert!(
        web.starts_with("data:host=probe.test_path=/probe_scheme=http"),
        "{out}\nfilter log:\n{}",
        filter_log(&d.state_dir)
    );
    assert_eq!(net.received(SocketAddrV4::new(WEB, 80)), 1);
    let (other, _) = outcome(&out, "tcp", "203.0.113.20:8080");
    assert!(!other.starts_with("data:"), "{out}");
    assert_eq!(net.received(SocketAddrV4::new(OTHER, 8080)), 0);

    // Stopped with no sandbox left: nothing stays (the hub is looked at through a descriptor:
    // its bind mount goes too).
    let hub_ns = std::fs::File::open(&hub).unwrap();
    let hub_now = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&hub_ns)
    );
    drop(d);
    assert!(
        eventually(Duration::from_secs(10), || !process_exists(pid)),
        "the filter outlived its daemon"
    );
    assert!(
        eventually(Duration::from_secs(5), || !has_prefix(
            &net.links(),
            "sbxup"
        )),
        "{:?}",
        net.links()
    );
    assert!(net.nft_tables().is_empty(), "{:?}", net.nft_tables());
    assert_eq!(net.links(), vec!["lo".to_owned()]);
    assert_eq!(
        internet::links_in(Path::new(&hub_now)),
        vec!["lo".to_owned()]
    );
    assert!(internet::nft_tables(Path::new(&hub_now)).is_empty());
    assert!(filters_in(Path::new(&hub_now)).is_empty());
}

/// kill -9 of daemon and helper, then a restart: the running filter is found (not a second one
/// started), the sandbox still reaches it, and the final stop leaves nothing.
#[test]
fn a_crash_and_a_restart_keep_one_filter_and_leave_nothing() {
    require_e2e!();
    let net = TestInternet::new();
    let mut d = egress_daemon(&net);
    let sleeper = d.create(json!({
        "command": ["sleep", "600"],
        "network": {"mode": "bridge", "egress": {"allow": ["203.0.113.20:7"]}},
    }));
    let id = sleeper.id.to_string();
    let first = filter_pid(&d.state_dir)
        .unwrap_or_else(|| panic!("the filter runs; its log:\n{}", filter_log(&d.state_dir)));
    let helper: Vec<i32> = descendants_of(d.pid() as i32)
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.file_name().is_some_and(|n| n == "sandboxd-helper"))
        })
        .collect();
    assert_eq!(helper.len(), 1, "one helper: {helper:?}");
    // kill -9 of both at once: no teardown of any kind runs.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper[0]),
        nix::sys::signal::Signal::SIGKILL,
    );
    d.restart();
    assert!(eventually(Duration::from_secs(10), || {
        d.get("/v1/info").json()["egress"]["available"] == true
    }));
    assert!(process_exists(first), "the filter died with the helper");
    assert_eq!(
        filters_in(&d.hub_path()),
        vec![first],
        "one filter, the same one"
    );
    assert_eq!(
        net.links()
            .iter()
            .filter(|n| n.starts_with("sbxup"))
            .count(),
        1
    );
    let hub_links = internet::links_in(&d.hub_path());
    assert_eq!(hub_links.iter().filter(|n| *n == "uplink0").count(), 1);
    // The kept filter still works (echo on :7, allowed by address).
    let out = probe(
        &d,
        Some(json!({"allow": ["203.0.113.20:7"]})),
        &["tcp", "203.0.113.20", "7"],
    );
    let (echo, _) = outcome(&out, "tcp", "203.0.113.20:7");
    assert!(echo.starts_with("data:GET_/probe"), "{out}");

    // The filter dies: the next request that needs it starts it again.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(eventually(Duration::from_secs(5), || !process_exists(
        first
    )));
    assert!(eventually(Duration::from_secs(10), || {
        d.get("/v1/info").json()["egress"]["available"] == true
    }));
    // The new filter writes its pid file between its fork and its exec.
    let mut second = None;
    eventually(Duration::from_secs(5), || {
        second = filter_pid(&d.state_dir).filter(|p| *p != first);
        second.is_some()
    });
    let second = second
        .unwrap_or_else(|| panic!("a new filter runs; its log:\n{}", filter_log(&d.state_dir)));
    assert_ne!(second, first);
    assert_eq!(filters_in(&d.hub_path()), vec![second]);

    assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    let hub = d.hub_path();
    let hub_ns = std::fs::File::open(&hub).unwrap();
    drop(d);
    assert!(eventually(Duration::from_secs(10), || {
        !process_exists(second)
    }));
    let hub_now = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&hub_ns)
    );
    assert!(filters_in(Path::new(&hub_now)).is_empty());
    assert!(eventually(Duration::from_secs(5), || {
        net.links() == vec!["lo".to_owned()]
    }));
    assert!(net.nft_tables().is_empty(), "{:?}", net.nft_tables());
    assert_eq!(
        internet::links_in(Path::new(&hub_now)),
        vec!["lo".to_owned()]
    );
    assert!(internet::nft_tables(Path::new(&hub_now)).is_empty());
    drop(hub_ns);
    assert!(!hub.exists(), "the hub stays bound");
}

/// Without `--egress-dns`, egress is off and says why; nothing is built.
#[test]
fn without_egress_dns_nothing_is_built() {
    require_e2e!();
    let net = TestInternet::new();
    let uplink = net.path().to_str().unwrap().to_owned();
    let d = Daemon::start_with(Mode::Privileged, &["--egress-uplink", &uplink]);
    let info = d.get("/v1/info").json();
    assert_eq!(info["egress"]["available"], false, "{info}");
    assert!(
        info["egress"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--egress-dns")),
        "{info}"
    );
    assert_eq!(net.links(), vec!["lo".to_owned()]);
    assert!(net.nft_tables().is_empty());
    assert!(filter_pid(&d.state_dir).is_none());
}
