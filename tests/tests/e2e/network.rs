//! Networking end to end: bridged sandboxes of one group talk by name, nothing else reaches
//! anything (other groups, the daemon's API, host loopback services), published ports reach the
//! sandbox from the host and survive a daemon restart, the sandbox cannot change its own
//! network, `none` has no route, and nothing is left behind after delete or a crash.
//!
//! Traffic goes only to the host's loopback and between namespaces the daemon under test made.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use sandboxd_tests::{
    both_modes, descendants_of, eventually, parent_of, require_e2e, Daemon, Mode,
};
use serde_json::{json, Value};

/// A TCP server that greets each connection with `hello <peer address>` and closes it.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("listening", flush=True)
while True:
    c, a = s.accept()
    c.sendall(("hello %s\n" % a[0]).encode())
    c.close()
"#;

/// Tries each `host:port` argument: prints `TARGET connected GREETING` or `TARGET failed ERROR`.
/// With `--serve-self` first, it also serves a greeting on its own loopback (`SELF`) and tries
/// that too: the positive control that shows the probe can connect where something listens.
const PROBE: &str = r#"
import socket, sys, threading
targets = sys.argv[1:]
if targets[:1] == ["--serve-self"]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 7777))
    srv.listen(8)
    def serve():
        while True:
            c, _ = srv.accept()
            c.sendall(b"hello self\n")
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    targets = targets[1:] + ["127.0.0.1:7777"]
for target in targets:
    host, port = target.rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=2)
        s.settimeout(2)
        print(target, "connected", s.recv(100).decode().strip())
    except Exception as e:
        print(target, "failed", type(e).__name__)
"#;

fn bridged(group: Option<&str>) -> Value {
    match group {
        Some(g) => json!({"mode": "bridge", "group": g}),
        None => json!({"mode": "bridge"}),
    }
}

/// Start a greeting server on `port` and wait until it listens.
fn server(d: &Daemon, name: &str, port: u16, network: Value) -> sandboxd_api::Sandbox {
    let sandbox = d.create(json!({
        "name": name,
        "command": ["python3", "-c", SERVER, port.to_string()],
        "network": network,
    }));
    let id = sandbox.id.to_string();
    assert!(
        eventually(Duration::from_secs(10), || {
            String::from_utf8_lossy(&d.logs(&id, "")).contains("listening")
        }),
        "server {name} did not start: {}",
        String::from_utf8_lossy(&d.logs(&id, ""))
    );
    d.sandbox(&id)
}

/// The probe's own loopback server (see `PROBE`).
const SELF: &str = "127.0.0.1:7777";

/// Run the probe in a new sandbox with `network`; returns its output, after checking that the
/// same probe reached its own loopback server (so a "failed" line means something).
fn probe(d: &Daemon, network: Value, targets: &[String]) -> String {
    let mut command = vec!["python3".to_string(), "-c".into(), PROBE.into()];
    command.push("--serve-self".into());
    command.extend(targets.iter().cloned());
    let (sandbox, out) = d.run_spec(json!({"command": command, "network": network}));
    assert_eq!(sandbox.exit_code, Some(0), "probe failed: {out}");
    assert_eq!(
        line(&out, SELF),
        format!("{SELF} connected hello self"),
        "{network}: the probe does not even reach its own loopback: {out}"
    );
    out
}

fn line<'a>(out: &'a str, target: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{target} ")))
        .unwrap_or_else(|| panic!("no line for {target} in {out}"))
}

fn address(s: &sandboxd_api::Sandbox) -> String {
    s.network
        .as_ref()
        .and_then(|n| n.address.clone())
        .expect("a bridged sandbox shows its address")
}

/// `ip -br link` in the daemon's hub (where its bridges and veths live).
fn hub_links(d: &Daemon) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", d.hub_path().display()))
        .args(["ip", "-br", "link"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -br addr` and `ip rule` in the hub.
fn hub_addresses_and_rules(d: &Daemon) -> (String, String) {
    let run = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", d.hub_path().display()))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (run(&["ip", "-br", "addr"]), run(&["ip", "rule"]))
}

/// The hub holds nothing but its loopback: no bridge, no veth, no address but lo's, and the
/// default rules only (and it does show its loopback, so an empty answer cannot pass).
fn assert_hub_empty(d: &Daemon) {
    let only_lo = |out: &str| out.lines().count() == 1 && out.starts_with("lo ");
    let ok = eventually(Duration::from_secs(5), || only_lo(&hub_links(d)));
    assert!(ok, "links left in the hub:\n{}", hub_links(d));
    let (addrs, rules) = hub_addresses_and_rules(d);
    assert!(only_lo(&addrs), "{addrs}");
    assert_eq!(
        rules.lines().count(),
        3,
        "rules changed in the hub:\n{rules}"
    );
}

/// Published host ports of a sandbox.
fn host_port(s: &sandboxd_api::Sandbox) -> u16 {
    s.network.as_ref().unwrap().ports[0].host
}

fn greet(port: u16) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

#[test]
fn a_group_talks_by_name_and_nothing_else_reaches_it() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    // Port 80: root inside binds a low port (ip_unprivileged_port_start is 0 in its namespace).
    let srv = server(&d, "srv", 80, bridged(Some("web")));
    let net = srv.network.clone().unwrap();
    assert_eq!(net.mode, sandboxd_api::NetworkMode::Bridge);
    assert_eq!(net.group.as_deref(), Some("web"));
    assert_eq!(net.gateway.as_deref(), Some("10.88.0.1"));
    let addr = address(&srv);

    // Same group, by name: the answer shows the client's own address as the source.
    let out = probe(&d, bridged(Some("web")), &["srv:80".into()]);
    let l = line(&out, "srv:80");
    assert!(l.contains("connected hello 10.88.0."), "{out}");
    assert!(!l.contains(&addr), "{out}");

    // Another group, and no group: neither the name nor the address. (The other group does
    // reach its own server by name: names work there, they just do not cross groups.)
    server(&d, "osrv", 80, bridged(Some("other")));
    for network in [
        bridged(Some("other")),
        bridged(None),
        json!({"mode": "none"}),
    ] {
        let out = probe(
            &d,
            network.clone(),
            &["srv:80".into(), format!("{addr}:80"), "osrv:80".into()],
        );
        for target in ["srv:80".to_string(), format!("{addr}:80")] {
            assert!(
                line(&out, &target).contains(" failed "),
                "{network} reached the group web: {out}"
            );
        }
        if network == bridged(Some("other")) {
            assert!(
                line(&out, "osrv:80").contains("connected hello 10.88.0."),
                "the group other does not reach its own server: {out}"
            );
        }
    }
}

#[test]
fn sandboxes_reach_neither_the_host_nor_the_api() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let api_port: u16 = d.addr.rsplit(':').next().unwrap().parse().unwrap();
    let mut targets = Vec::new();
    for port in [host_port, api_port] {
        for host in ["127.0.0.1", "10.88.0.1"] {
            targets.push(format!("{host}:{port}"));
        }
    }
    for network in [bridged(Some("g")), bridged(None), json!({"mode": "none"})] {
        let out = probe(&d, network.clone(), &targets);
        for t in &targets {
            assert!(line(&out, t).contains("failed"), "{network}: {out}");
        }
    }
    assert!(
        listener.accept().is_err(),
        "a sandbox reached the host's loopback listener"
    );
    // From the host both answer: what the sandboxes could not reach is really there.
    let _from_host = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || listener.accept().is_ok()),
        "the host's own connection to its listener was not accepted"
    );
    assert_eq!(d.get("/healthz").status, 200, "the API answers the host");
}

#[test]
fn a_published_port_reaches_the_sandbox_and_survives_a_daemon_restart() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    let srv = server(
        &d,
        "pub",
        8080,
        json!({"mode": "bridge", "ports": [{"sandbox": 8080, "host": 0}]}),
    );
    let port = host_port(&srv);
    assert_ne!(port, 0, "host 0 picks a port and shows it");
    assert_eq!(srv.network.as_ref().unwrap().ports[0].sandbox, 8080);
    // The sandbox sees the connection coming from its gateway, never from the host.
    assert_eq!(greet(port).unwrap().trim(), "hello 10.88.0.1");
    // Netlink runs on a runtime of the helper's own thread: the helper still has one thread,
    // so forking monitors from it stays sound.
    let helper = descendants_of(d.pid() as i32)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "sandboxd-helper")
        })
        .expect("the helper runs");
    let status = std::fs::read_to_string(format!("/proc/{helper}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Threads:\t1"), "{status}");

    // The same host port again: 409, and nothing is kept of the refused sandbox.
    let before = d.get("/v1/sandboxes").json()["items"]
        .as_array()
        .unwrap()
        .len();
    let reply = d
        .request("POST", "/v1/sandboxes")
        .json(&json!({"command": ["true"],
                "network": {"mode": "bridge", "ports": [{"sandbox": 1, "host": port}]}}))
        .send();
    assert_eq!(reply.assert_error(409, "port conflict"), "port_in_use");
    let after = d.get("/v1/sandboxes").json()["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after);

    // The forwarder belongs to the sandbox's monitor, not to the daemon.
    d.restart();
    assert_eq!(greet(port).unwrap().trim(), "hello 10.88.0.1");
    assert_eq!(d.sandbox("pub").network.unwrap().ports[0].host, port);

    // Gone with the sandbox: the listener closes as the monitor's processes end, which can
    // trail the 204 by a moment on a loaded host (as the hub's links do, see assert_hub_empty).
    assert_eq!(d.delete("/v1/sandboxes/pub").status, 204);
    assert!(
        eventually(Duration::from_secs(5), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()),
        "the published port {port} still answers after DELETE"
    );
    assert_hub_empty(&d);
}

/// Reads whole connections and answers each with the number of bytes it read.
const COUNTER: &str = r#"
import socket
s = socket.socket()
s.bind(("0.0.0.0", 5001))
s.listen(8)
print("listening", flush=True)
buf = bytearray(1 << 16)
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

#[test]
fn a_published_port_carries_a_large_transfer_in_full() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let sandbox = d.create(json!({
        "command": ["python3", "-c", COUNTER],
        "network": {"mode": "bridge", "ports": [{"sandbox": 5001}]},
    }));
    let id = sandbox.id.to_string();
    assert!(eventually(Duration::from_secs(10), || {
        String::from_utf8_lossy(&d.logs(&id, "")).contains("listening")
    }));
    let port = host_port(&sandbox);
    // Far more than any buffer on the way (the forwarder's, the sockets'), in odd-sized writes.
    let total: usize = 48 << 20;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let chunk = vec![7u8; 100_003];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        std::io::Write::write_all(&mut stream, &chunk[..n]).unwrap();
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.trim(), total.to_string());
}

#[test]
fn the_sandbox_cannot_change_its_network_even_with_cap_net_admin() {
    require_e2e!();
    let d = Daemon::start_with(Mode::Privileged, &["--allow-cap", "NET_ADMIN"]);
    let script = r#"
import socket, subprocess
def ip(*args):
    r = subprocess.run(["ip"] + list(args), capture_output=True, text=True)
    return "ok" if r.returncode == 0 else "refused"
print("show", ip("addr", "show", "dev", "eth0"))
print("addr", ip("addr", "add", "10.88.0.200/16", "dev", "eth0"))
print("route", ip("route", "add", "10.99.0.0/16", "via", "10.88.0.1"))
print("link", ip("link", "set", "eth0", "down"))
print("lo", ip("addr", "add", "10.88.0.201/32", "dev", "lo"))
# No raw or packet socket (CAP_NET_RAW counts only over a namespace the sandbox owns): no forged
# source address, no forged ARP.
for family, kind, proto in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                            (socket.AF_PACKET, socket.SOCK_RAW, 0)]:
    try:
        socket.socket(family, kind, proto).close()
        print("raw", family, "ok")
    except PermissionError:
        print("raw", family, "refused")
# What root expects still works: ping sockets and low ports.
socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
print("ping ok")
s = socket.socket(); s.bind(("0.0.0.0", 22)); print("bind ok")
with open("/proc/self/status") as f:
    print([l for l in f if l.startswith("CapEff")][0].strip())
"#;
    let (sandbox, out) = d.run_spec(json!({
        "command": ["python3", "-c", script],
        "network": {"mode": "bridge"},
        "capabilities": {"add": ["NET_ADMIN"]},
    }));
    assert_eq!(sandbox.exit_code, Some(0), "{out}");
    // CAP_NET_ADMIN (bit 12) is really there: it is the namespace's owner that says no.
    let capeff = out.lines().find(|l| l.starts_with("CapEff")).unwrap();
    let bits = u64::from_str_radix(capeff.split_whitespace().last().unwrap(), 16).unwrap();
    assert!(bits & (1 << 12) != 0, "{out}");
    // The same `ip` reads what it may not change: "refused" below is the kernel's answer.
    assert!(out.lines().any(|l| l == "show ok"), "{out}");
    for what in ["addr", "route", "link", "lo"] {
        assert_eq!(
            out.lines().find(|l| l.starts_with(&format!("{what} "))),
            Some(format!("{what} refused").as_str()),
            "{out}"
        );
    }
    assert!(out.contains("ping ok") && out.contains("bind ok"), "{out}");
    let raw: Vec<&str> = out.lines().filter(|l| l.starts_with("raw ")).collect();
    assert_eq!(raw.len(), 2, "{out}");
    assert!(raw.iter().all(|l| l.ends_with(" refused")), "{out}");
}

fn mode_none_has_only_loopback_and_no_route(mode: Mode) {
    let d = Daemon::start(mode);
    let out = d.sh(
        "cat /proc/net/route | wc -l; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; \
         cat /etc/resolv.conf",
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("1"),
        "only the header of the routing table: {out}"
    );
    assert_eq!(lines.next(), Some("lo"), "{out}");
    let (sandbox, _) = d.run(&["true"]);
    let net = sandbox
        .network
        .expect("every new sandbox shows its network");
    assert_eq!(net.mode, sandboxd_api::NetworkMode::None);
    assert!(net.address.is_none() && net.ports.is_empty());
    if mode == Mode::Privileged {
        // The helper made the namespace: root inside may still bind low ports and ping.
        let out = d.sh(
            "python3 -c 'import socket; socket.socket().bind((\"127.0.0.1\", 80)); \
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print(\"ok\")'",
        );
        assert_eq!(out.trim(), "ok");
    }
}
both_modes!(mode_none_has_only_loopback_and_no_route);

#[test]
fn rootless_bridge_is_a_clear_422() {
    require_e2e!();
    let d = Daemon::start(Mode::Rootless);
    let info: Value = d.get("/v1/info").json();
    assert_eq!(info["network_modes"], json!(["none"]));
    let reply = d
        .request("POST", "/v1/sandboxes")
        .json(&json!({"command": ["true"], "network": {"mode": "bridge"}}))
        .send();
    assert_eq!(
        reply.assert_error(422, "rootless bridge"),
        "network_unavailable"
    );
    let privileged = Daemon::start(Mode::Privileged);
    let info: Value = privileged.get("/v1/info").json();
    assert_eq!(info["network_modes"], json!(["none", "bridge"]));
}

#[test]
fn nothing_is_left_after_delete_or_a_crash() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    let mut ids = Vec::new();
    for (group, port) in [
        (Some("a"), true),
        (Some("a"), false),
        (Some("b"), true),
        (None, false),
    ] {
        let mut network = bridged(group);
        if port {
            network["ports"] = json!([{"sandbox": 9, "host": 0}]);
        }
        let s = d.create(json!({"command": ["sleep", "600"], "network": network}));
        ids.push(s);
    }
    let links = hub_links(&d);
    assert_eq!(
        links.lines().filter(|l| l.starts_with("ve")).count(),
        4,
        "{links}"
    );
    // One bridge per group; the sandbox without a group has none (its veth holds the gateway).
    assert_eq!(
        links.lines().filter(|l| l.starts_with("br")).count(),
        2,
        "{links}"
    );
    // Each sandbox's veth has the name the protocol gives it (so its absence later means gone).
    for s in &ids {
        let veth = sandboxd_protocol::net::veth_name(s.id);
        assert!(links.contains(&veth), "{veth} not in the hub:\n{links}");
    }
    let addresses: Vec<String> = ids.iter().map(address).collect();
    let mut unique = addresses.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{addresses:?}");

    // A crash: the daemon dies, and one sandbox's monitor with it while nobody watches.
    d.kill9();
    let lost = &ids[0];
    let monitor = parent_of(lost.init_pid.unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.restart();
    let row = d.sandbox(&lost.id.to_string());
    assert_eq!(row.state, sandboxd_api::SandboxState::Failed, "{row:?}");
    // Its address is free again: the next bridged sandbox gets it.
    let next = d.create(json!({"command": ["sleep", "600"], "network": bridged(Some("c"))}));
    assert_eq!(address(&next), address(lost));
    ids.push(next);

    // The published ports of the running sandboxes answer on the host until they are deleted
    // (the lost sandbox's forwarder died with its monitor).
    let published: Vec<u16> = ids
        .iter()
        .flat_map(|s| s.network.as_ref().unwrap().ports.iter().map(|p| p.host))
        .collect();
    assert_eq!(published.len(), 2, "{ids:?}");
    let running_port = ids[2].network.as_ref().unwrap().ports[0].host;
    assert!(TcpStream::connect(("127.0.0.1", running_port)).is_ok());

    for s in &ids {
        assert_eq!(d.delete(&format!("/v1/sandboxes/{}", s.id)).status, 204);
    }
    assert_hub_empty(&d);
    for port in &published {
        assert!(TcpStream::connect(("127.0.0.1", *port)).is_err());
    }
    // Nothing of ours on the host either.
    let host = Command::new("ip").args(["-br", "link"]).output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    for s in &ids {
        let veth = sandboxd_protocol::net::veth_name(s.id);
        assert!(!host.contains(&veth), "{veth} on the host:\n{host}");
    }
    // The helper releases the unused hub when it stops (here: with its daemon).
    let hub = d.hub_path().display().to_string();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&hub)
    };
    assert!(mounted());
    d.kill9();
    assert!(
        eventually(Duration::from_secs(5), || !mounted()),
        "the hub is still mounted after its helper stopped"
    );
    // And its parent cgroups, now empty, are gone with it (cgroup v1 here: one per controller).
    let parent = sandboxd_tests::cgroup_parent_name(&d.state_dir);
    let left = || {
        ["memory", "pids", "cpu", "cpuacct", "unified"]
            .iter()
            .map(|c| std::path::Path::new("/sys/fs/cgroup").join(c).join(&parent))
            .filter(|p| p.exists())
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(5), || left().is_empty()),
        "parent cgroups left after the helper stopped: {:?}",
        left()
    );
}

#[test]
fn sbx_run_publishes_and_inspect_shows_address_and_ports() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let out = d.sbx(&[
        "run", "-d", "--name", "cli", "--net", "bridge", "--group", "g", "-p", "0:8080", "--",
        "python3", "-c", SERVER, "8080",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = d.sbx(&["inspect", "cli"]);
    assert!(out.status.success(), "{out:?}");
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    let net = &inspected["network"];
    assert_eq!(net["mode"], "bridge");
    assert_eq!(net["group"], "g");
    assert!(
        net["address"].as_str().unwrap().starts_with("10.88.0."),
        "{net}"
    );
    let port = net["ports"][0]["host"].as_u64().unwrap() as u16;
    assert_eq!(net["ports"][0]["sandbox"], 8080);
    assert!(
        eventually(Duration::from_secs(10), || greet(port)
            .is_ok_and(|g| g.starts_with("hello"))),
        "the published port does not answer"
    );
    // A bad flag is the CLI's error, before any request.
    let out = d.sbx(&["run", "-p", "x:1", "--", "true"]);
    assert!(!out.status.success());
}

/// A sandbox created without starting gets its address and ports when it starts (a file put in
/// before the start is its server), and an exec into it shares its network namespace (the
/// exec joins the host-owned namespace before the sandbox's user namespace).
#[test]
fn a_created_sandbox_gets_its_network_at_start_and_execs_share_it() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let created = d.create(json!({
        "command": ["python3", "/work/server.py", "8080"],
        "network": {"mode": "bridge", "group": "late", "ports": [{"sandbox": 8080}]},
        "start": false,
    }));
    let id = created.id.to_string();
    assert_eq!(created.state, sandboxd_api::SandboxState::Created);
    assert!(
        created
            .network
            .as_ref()
            .and_then(|n| n.address.clone())
            .is_none(),
        "no address before the start: {:?}",
        created.network
    );
    let resp = d
        .request(
            "PUT",
            &format!("/v1/sandboxes/{id}/files?path=/work/server.py"),
        )
        .body(SERVER)
        .send();
    assert_eq!(resp.status, 204);
    let resp = d.start_after_transfer(&id);
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(
        eventually(Duration::from_secs(10), || {
            String::from_utf8_lossy(&d.logs(&id, "")).contains("listening")
        }),
        "{}",
        String::from_utf8_lossy(&d.logs(&id, ""))
    );
    let started = d.sandbox(&id);
    let addr = address(&started);
    let port = host_port(&started);
    assert_ne!(port, 0);
    assert!(greet(port).unwrap().starts_with("hello "));
    // An exec is in the same network namespace: it reaches the server on the sandbox's own
    // loopback and sees the same address.
    let mut command = vec![
        "python3".to_string(),
        "-c".into(),
        PROBE.into(),
        "127.0.0.1:8080".into(),
    ];
    command.push(format!("{addr}:8080"));
    let resp = d.post(
        &format!("/v1/sandboxes/{id}/execs"),
        &json!({ "command": command }),
    );
    assert_eq!(resp.status, 201);
    let exec: Value = resp.json();
    let logs = d.get(&format!(
        "/v1/sandboxes/{id}/execs/{}/logs?follow=true",
        exec["id"].as_str().unwrap()
    ));
    let out = logs.body;
    assert!(
        line(&out, "127.0.0.1:8080").contains("connected hello"),
        "{out}"
    );
    assert!(
        line(&out, &format!("{addr}:8080")).contains("connected hello"),
        "{out}"
    );
    assert_eq!(
        d.delete(&format!("/v1/sandboxes/{id}?force=true")).status,
        204
    );
    assert_hub_empty(&d);
}
