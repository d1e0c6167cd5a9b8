//! Egress end to end (issue 13), privileged mode, against a test-made internet
//! (`sandboxd_tests::internet`): a namespace of the test's own, given to the daemon as
//! `--egress-uplink` with its DNS server as `--egress-dns`. No packet leaves namespaces the test
//! or the daemon under test made. Every negative case has its positive control in the same
//! sandbox: the probe that fails where the policy says no succeeds where it says yes.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::process::Command;
use std::time::Duration;

use sandboxd_tests::internet::{TestInternet, DNS, OTHER, WEB};
use sandboxd_tests::{eventually, require_e2e, Daemon, Mode};
use serde_json::{json, Value};

/// Longest a refused connection may take to fail: curl's own timeout is 10 s, so anything
/// close to it would be a silent drop, not a refusal.
const FAST_MS: u64 = 3000;

/// A DNS A query from inside the sandbox: `python3 -c "$DNSQ" NAME [SERVER]` prints
/// `NOERROR addr...`, `NXDOMAIN`, or `error <why>` when no answer came. The server defaults to
/// the sandbox's resolver (its gateway, from /etc/resolv.conf).
const DNSQ: &str = r#"
import socket, struct, sys
name = sys.argv[1]
server = sys.argv[2] if len(sys.argv) > 2 else [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\0' + struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.connect((server, 53))
    s.send(q)
    r = s.recv(4096)
except Exception as e:
    print('error', type(e).__name__)
    sys.exit(0)
rcode = r[3] & 15
count = struct.unpack('>H', r[6:8])[0]
i = 12
while r[i] != 0:
    i += r[i] + 1
i += 5
addrs = []
for _ in range(count):
    if r[i] & 0xc0 == 0xc0:
        i += 2
    else:
        while r[i] != 0:
            i += r[i] + 1
        i += 1
    typ, cls, ttl, ln = struct.unpack('>HHIH', r[i:i + 10])
    i += 10
    if typ == 1 and ln == 4:
        addrs.append(socket.inet_ntoa(r[i:i + 4]))
    i += ln
print({0: 'NOERROR', 3: 'NXDOMAIN'}.get(rcode, 'RCODE%d' % rcode), ' '.join(addrs))
"#;

/// A TCP client: `python3 -c "$TCP" HOST PORT` sends a line and prints what came back, or
/// `error <why>`.
const TCP: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.settimeout(10)
    s.sendall(b'hello\n')
    d = s.recv(100)
    print('reply', d.decode().strip() if d else '<closed>')
except Exception as e:
    print('error', type(e).__name__)
"#;

/// A UDP client: `python3 -c "$UDP" HOST PORT` sends a datagram and prints the echo.
const UDP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.send(b'ping')
    print('reply', s.recv(100).decode())
except Exception as e:
    print('error', type(e).__name__)
"#;

/// Shell functions every script gets: `t NAME CMD...` runs CMD and prints
/// `NAME rc=RC ms=MS out=OUTPUT` on one line; the CA is in /work/ca.pem.
const PRELUDE: &str = r#"
printf '%s' "$CA" > /work/ca.pem
t() {
    name=$1; shift
    s=$(date +%s%N)
    out=$("$@" 2>&1)
    rc=$?
    e=$(date +%s%N)
    echo "$name rc=$rc ms=$(( (e - s) / 1000000 )) out=$(printf '%s' "$out" | tr '\n' ' ')"
}
c() { curl -sS --connect-timeout 10 -m 10 --cacert /work/ca.pem "$@"; }
"#;

/// One probe's result.
#[derive(Debug, Clone)]
struct Probe {
    rc: i32,
    ms: u64,
    out: String,
}

fn probes(output: &str) -> HashMap<String, Probe> {
    let mut all = HashMap::new();
    for line in output.lines() {
        let Some((name, rest)) = line.split_once(" rc=") else {
            continue;
        };
        let Some((rc, rest)) = rest.split_once(" ms=") else {
            continue;
        };
        let Some((ms, out)) = rest.split_once(" out=") else {
            continue;
        };
        all.insert(
            name.to_owned(),
            Probe {
                rc: rc.parse().unwrap_or(-1),
                ms: ms.parse().unwrap_or(u64::MAX),
                out: out.to_owned(),
            },
        );
    }
    all
}

/// A privileged daemon whose egress goes into `net`; fails (with the daemon's reason) unless
/// egress is available and the daemon is connected to its filter.
fn daemon(net: &TestInternet, extra: &[&str]) -> Daemon {
    let uplink = net.path().display().to_string();
    let dns = net.dns().to_string();
    let mut args = vec![
        "--egress-uplink",
        uplink.as_str(),
        "--egress-dns",
        dns.as_str(),
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start_with(Mode::Privileged, &args);
    let info = d.get("/v1/info").json();
    assert_eq!(
        info["egress"]["available"],
        true,
        "egress is not available: {info}\n{}",
        d.log()
    );
    assert!(
        eventually(Duration::from_secs(15), || {
            d.get("/v1/info").json()["egress"]["connected"] == true
        }),
        "the daemon did not connect to its egress filter:\n{}",
        d.log()
    );
    d
}

/// A sandbox spec running `script` (after [`PRELUDE`]) with `egress` (or none when null).
fn spec(net: &TestInternet, egress: Value, script: &str) -> Value {
    let mut network = json!({"mode": "bridge"});
    if !egress.is_null() {
        network["egress"] = egress;
    }
    json!({
        "command": ["sh", "-c", format!("{PRELUDE}\n{script}")],
        "env": {"CA": net.ca_pem(), "DNSQ": DNSQ, "TCP": TCP, "UDP": UDP},
        "network": network,
    })
}

/// Run `script` to its end in a bridged sandbox with `egress`; its id and probes.
fn run(
    d: &Daemon,
    net: &TestInternet,
    egress: Value,
    script: &str,
) -> (String, HashMap<String, Probe>, String) {
    let (sandbox, output) = d.run_spec(spec(net, egress, script));
    assert_eq!(sandbox.exit_code, Some(0), "{output}");
    (sandbox.id.to_string(), probes(&output), output)
}

fn ok(p: &HashMap<String, Probe>, name: &str, all: &str) -> Probe {
    let probe = p
        .get(name)
        .unwrap_or_else(|| panic!("no probe {name}:\n{all}"))
        .clone();
    assert_eq!(probe.rc, 0, "{name} failed: {probe:?}\n{all}");
    probe
}

/// The probe failed, and fast (refused or reset, not a silent timeout).
fn refused_fast(p: &HashMap<String, Probe>, name: &str, all: &str) -> Probe {
    let probe = p
        .get(name)
        .unwrap_or_else(|| panic!("no probe {name}:\n{all}"))
        .clone();
    let failed = probe.rc != 0 || probe.out.starts_with("error") || probe.out.contains("<closed>");
    assert!(failed, "{name} was not refused: {probe:?}\n{all}");
    assert!(
        probe.ms < FAST_MS,
        "{name} took {} ms to fail (a timeout, not a refusal): {probe:?}",
        probe.ms
    );
    probe
}

fn denials(d: &Daemon, id: &str) -> Vec<Value> {
    let reply = d.get(&format!("/v1/sandboxes/{id}/network/denials?limit=1000"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Wait until a denial matching `f` is listed (the filter reports them as they happen).
fn denied(d: &Daemon, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    eventually(Duration::from_secs(10), || {
        found = denials(d, id).into_iter().find(|v| f(v));
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no denial for {what}: {:?}", denials(d, id)))
}

fn egress_counters(d: &Daemon, id: &str) -> Value {
    let reply = d.get(&format!("/v1/sandboxes/{id}/stats"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["egress"].clone()
}

/// Names of the test internet: an allowed one and its wildcard on the web server, names
/// never allowed on the other server.
fn internet() -> TestInternet {
    let net = TestInternet::new();
    net.add_a("pypi.test", WEB);
    net.add_a("files.test", WEB);
    net.add_a("*.files.test", WEB);
    net.add_a("evil.test", OTHER);
    net.add_a("dns.test", WEB);
    net
}

#[test]
fn allowed_names_work_and_others_get_nxdomain_and_a_fast_refusal() {
    require_e2e!();
    let net = internet();
    let d = daemon(&net, &[]);
    let script = r#"
t dns_allowed python3 -c "$DNSQ" pypi.test
t dns_denied python3 -c "$DNSQ" evil.test
t dns_apex python3 -c "$DNSQ" files.test
t http c http://pypi.test/a
t https c https://pypi.test/s
t wildcard c https://dl.files.test/w
t bytes c -o /dev/null -w '%{size_download}' http://pypi.test/bytes/100000
t denied_name c http://evil.test/
t direct c http://203.0.113.20/
t direct_control c -H 'Host: pypi.test' http://203.0.113.10/d
"#;
    let (id, p, all) = run(
        &d,
        &net,
        json!({"allow": ["pypi.test", "*.files.test"]}),
        script,
    );
    assert!(
        ok(&p, "dns_allowed", &all)
            .out
            .starts_with("NOERROR 203.0.113.10"),
        "{all}"
    );
    assert!(
        ok(&p, "dns_denied", &all).out.starts_with("NXDOMAIN"),
        "{all}"
    );
    // A wildcard covers names strictly below it only.
    assert!(
        ok(&p, "dns_apex", &all).out.starts_with("NXDOMAIN"),
        "{all}"
    );
    assert!(
        ok(&p, "http", &all)
            .out
            .contains("host=pypi.test path=/a scheme=http"),
        "{all}"
    );
    assert!(
        ok(&p, "https", &all)
            .out
            .contains("host=pypi.test path=/s scheme=https sni=pypi.test"),
        "{all}"
    );
    assert!(
        ok(&p, "wildcard", &all).out.contains("sni=dl.files.test"),
        "{all}"
    );
    assert_eq!(ok(&p, "bytes", &all).out.trim(), "100000", "{all}");
    // curl: "could not resolve host".
    assert_eq!(p["denied_name"].rc, 6, "{all}");
    refused_fast(&p, "direct", &all);
    assert!(
        ok(&p, "direct_control", &all).out.contains("path=/d"),
        "{all}"
    );
    // The refused connection never reached the destination.
    assert_eq!(net.received(SocketAddrV4::new(OTHER, 80)), 0);

    // Denials are listed with their reasons.
    let direct = denied(&d, &id, "the direct connection", |v| {
        v["address"] == "203.0.113.20" && v["port"] == 80
    });
    assert_eq!(direct["reason"], "not_allowed", "{direct}");
    assert_eq!(direct["protocol"], "tcp", "{direct}");
    let dns = denied(&d, &id, "evil.test", |v| v["name"] == "evil.test");
    assert_eq!(dns["reason"], "not_allowed", "{dns}");

    // The counters add up: five connections allowed (http, https, wildcard, bytes, the
    // direct control), at least the direct one denied, the 100000 bytes in.
    let mut counters = Value::Null;
    eventually(Duration::from_secs(10), || {
        counters = egress_counters(&d, &id);
        counters["connections_allowed"] == 5
            && counters["bytes_in"].as_u64().unwrap_or(0) >= 100_000
    });
    assert_eq!(counters["connections_allowed"], 5, "{counters}");
    assert!(
        counters["connections_denied"].as_u64().unwrap_or(0) >= 1,
        "{counters}"
    );
    let bytes_in = counters["bytes_in"].as_u64().unwrap_or(0);
    assert!(
        (100_000..200_000).contains(&bytes_in),
        "{counters}: 100000 bytes and five small replies came in"
    );
    assert!(
        counters["bytes_out"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );

    // Without a policy, a bridged sandbox reaches nothing beyond its group (as before egress).
    let (_, p, all) = run(
        &d,
        &net,
        Value::Null,
        "t dns python3 -c \"$DNSQ\" pypi.test\nt http c http://203.0.113.10/",
    );
    assert!(!p["dns"].out.starts_with("NOERROR"), "{all}");
    assert_ne!(p["http"].rc, 0, "{all}");

    // sbx run --egress: the same policy from the command line; a malformed rule is refused by
    // sbx before anything is sent.
    let out = d.sbx(&[
        "run",
        "--rm",
        "--egress",
        "pypi.test",
        "--egress",
        "*.files.test",
        "--",
        "curl",
        "-sS",
        "-m",
        "10",
        "http://x.files.test/cli",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("host=x.files.test path=/cli"),
        "{out:?}"
    );
    let before = d.get("/v1/sandboxes").json()["items"]
        .as_array()
        .unwrap()
        .len();
    let out = d.sbx(&["run", "--egress", "http://pypi.test", "--", "true"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("http://pypi.test"),
        "{out:?}"
    );
    let after = d.get("/v1/sandboxes").json()["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after);
}

#[test]
fn a_forged_server_name_toward_another_address_is_refused() {
    require_e2e!();
    let net = internet();
    let d = daemon(&net, &[]);
    let script = r#"
t https c https://pypi.test/ok
t forged_tls c --resolve pypi.test:443:203.0.113.20 https://pypi.test/forged
t forged_host c -H 'Host: pypi.test' http://203.0.113.20/forged
t host_control c -H 'Host: pypi.test' http://203.0.113.10/control
"#;
    let (id, p, all) = run(&d, &net, json!({"allow": ["pypi.test"]}), script);
    assert!(ok(&p, "https", &all).out.contains("sni=pypi.test"), "{all}");
    refused_fast(&p, "forged_tls", &all);
    refused_fast(&p, "forged_host", &all);
    assert!(
        ok(&p, "host_control", &all).out.contains("path=/control"),
        "{all}"
    );
    assert_eq!(net.received(SocketAddrV4::new(OTHER, 80)), 0);
    let tls = denied(&d, &id, "the forged server name", |v| {
        v["address"] == "203.0.113.20" && v["port"] == 443
    });
    assert_eq!(tls["reason"], "name_mismatch", "{tls}");
    assert_eq!(tls["name"], "pypi.test", "{tls}");
    let host = denied(&d, &id, "the forged Host", |v| {
        v["address"] == "203.0.113.20" && v["port"] == 80
    });
    assert_eq!(host["reason"], "name_mismatch", "{host}");
}

#[test]
fn address_and_port_rules_allow_and_deny() {
    require_e2e!();
    let net = internet();
    let d = daemon(&net, &[]);
    let script = r#"
t net80 c http://203.0.113.20/a
t web80 c http://203.0.113.10/b
t denied_port c http://203.0.113.20:8080/c
t tcp_echo python3 -c "$TCP" 203.0.113.20 7
t no_names python3 -c "$DNSQ" pypi.test
"#;
    let (id, p, all) = run(
        &d,
        &net,
        json!({"allow": ["203.0.113.0/24"], "deny": ["203.0.113.20:8080"]}),
        script,
    );
    assert!(
        ok(&p, "net80", &all).out.contains("local=203.0.113.20:80"),
        "{all}"
    );
    assert!(
        ok(&p, "web80", &all).out.contains("local=203.0.113.10:80"),
        "{all}"
    );
    // deny wins over allow.
    refused_fast(&p, "denied_port", &all);
    assert_eq!(net.received(SocketAddrV4::new(OTHER, 8080)), 0);
    assert!(
        ok(&p, "tcp_echo", &all).out.starts_with("reply hello"),
        "{all}"
    );
    // Address rules do not make names resolvable.
    assert!(
        ok(&p, "no_names", &all).out.starts_with("NXDOMAIN"),
        "{all}"
    );
    let port = denied(&d, &id, "port 8080", |v| v["port"] == 8080);
    assert_eq!(port["reason"], "not_allowed", "{port}");

    // UDP beyond DNS is refused (an address rule does not open it; `addr:port` UDP
    // forwarding is not built yet), while TCP to the same address works.
    let (_, p, all) = run(
        &d,
        &net,
        json!({"allow": ["203.0.113.0/24"]}),
        "t udp python3 -c \"$UDP\" 203.0.113.20 7\nt tcp python3 -c \"$TCP\" 203.0.113.20 7",
    );
    assert!(p["udp"].out.starts_with("error"), "{all}");
    assert!(ok(&p, "tcp", &all).out.starts_with("reply hello"), "{all}");
}

#[test]
fn private_ranges_and_the_host_stay_unreachable_even_with_star() {
    require_e2e!();
    let net = internet();
    // DNS rebinding: allowed names that resolve to always-denied addresses.
    net.add_a("rebind.test", std::net::Ipv4Addr::new(127, 0, 0, 1));
    net.add_a("metadata.test", std::net::Ipv4Addr::new(169, 254, 169, 254));
    let d = daemon(&net, &[]);
    // The host's own addresses (whatever they are here), and the uplink's end of the link.
    let host_addrs: Vec<String> =
        String::from_utf8_lossy(&Command::new("hostname").arg("-I").output().unwrap().stdout)
            .split_whitespace()
            .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .map(str::to_owned)
            .collect();
    let uplink_addrs: Vec<String> = net
        .ip(&["-o", "-4", "addr", "show"])
        .lines()
        .filter(|l| !l.contains(" lo "))
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next())
        .map(str::to_owned)
        .collect();
    assert!(
        !uplink_addrs.is_empty(),
        "the daemon made no uplink link in the test internet:\n{}",
        net.ip(&["-o", "addr", "show"])
    );
    let mut script = String::from(
        "t control c http://pypi.test/star\n\
         t rebind c http://rebind.test/\n\
         t metadata c http://metadata.test/latest/meta-data/\n",
    );
    let mut targets: Vec<(String, String)> = [
        "169.254.169.254",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "10.88.0.1",
    ]
    .iter()
    .map(|a| (a.replace('.', "_"), a.to_string()))
    .collect();
    for a in host_addrs.iter().chain(&uplink_addrs) {
        targets.push((format!("host_{}", a.replace('.', "_")), a.clone()));
    }
    for (name, addr) in &targets {
        script.push_str(&format!("t {name} c http://{addr}:80/\n"));
    }
    let (id, p, all) = run(&d, &net, json!({"allow": ["*"]}), &script);
    assert!(
        ok(&p, "control", &all).out.contains("host=pypi.test"),
        "{all}"
    );
    refused_fast(&p, "rebind", &all);
    refused_fast(&p, "metadata", &all);
    for (name, _) in &targets {
        refused_fast(&p, name, &all);
    }
    let rebind = denied(&d, &id, "rebind.test", |v| v["address"] == "127.0.0.1");
    assert_eq!(rebind["reason"], "private_range", "{rebind}");
    let meta = denied(&d, &id, "the metadata address", |v| {
        v["address"] == "169.254.169.254"
    });
    assert_eq!(meta["reason"], "private_range", "{meta}");
}

#[test]
fn doh_and_dot_to_an_unlisted_resolver_fail() {
    require_e2e!();
    let net = internet();
    let d = daemon(&net, &[]);
    let script = r#"
t resolver python3 -c "$DNSQ" pypi.test
t udp_upstream python3 -c "$DNSQ" pypi.test 198.51.100.53
t dot python3 -c "$TCP" 203.0.113.20 853
t doh_name c https://dns.test/dns-query
t doh_forged c --resolve pypi.test:443:198.51.100.53 https://pypi.test/dns-query
t doh_ip c -k https://198.51.100.53/dns-query
t https_control c https://pypi.test/control
"#;
    let (_, p, all) = run(&d, &net, json!({"allow": ["pypi.test"]}), script);
    assert!(
        ok(&p, "resolver", &all)
            .out
            .starts_with("NOERROR 203.0.113.10"),
        "{all}"
    );
    assert!(p["udp_upstream"].out.starts_with("error"), "{all}");
    refused_fast(&p, "dot", &all);
    assert_eq!(net.received(SocketAddrV4::new(OTHER, 853)), 0);
    // dns.test is not allowed: no name for it.
    assert_eq!(p["doh_name"].rc, 6, "{all}");
    refused_fast(&p, "doh_forged", &all);
    refused_fast(&p, "doh_ip", &all);
    assert!(
        ok(&p, "https_control", &all).out.contains("sni=pypi.test"),
        "{all}"
    );
    assert_eq!(net.received(SocketAddrV4::new(DNS, 443)), 0);
}

/// Keeps a TCP echo connection open, printing `echo ok N`, until it is cut (`cut ...`); then
/// tries a new echo connection and an HTTP request to pypi.test, then waits for `/work/go`
/// and tries the echo once more.
const LONG_LIVED: &str = r#"
import os, socket, time, urllib.request
def echo():
    return socket.create_connection(('203.0.113.20', 7), timeout=3)
s = echo()
n = 0
while True:
    try:
        s.sendall(b'x')
        d = s.recv(10)
        if not d:
            raise EOFError('closed')
        n += 1
        print('echo ok', n, flush=True)
    except Exception as e:
        print('cut', type(e).__name__, flush=True)
        break
    time.sleep(0.2)
try:
    n = echo()
    n.sendall(b'y')
    if not n.recv(10):
        raise EOFError('closed')
    print('new echo ok', flush=True)
except Exception as e:
    print('new echo failed', type(e).__name__, flush=True)
try:
    r = urllib.request.urlopen('http://pypi.test/after', timeout=5).read().decode()
    print('http', r.strip(), flush=True)
except Exception as e:
    print('http failed', type(e).__name__, flush=True)
while not os.path.exists('/tmp/go'):
    time.sleep(0.1)
try:
    t = echo()
    t.sendall(b'z')
    print('again', t.recv(10).decode(), flush=True)
except Exception as e:
    print('again failed', type(e).__name__, flush=True)
"#;

#[test]
fn patch_changes_a_running_policy_and_cuts_a_now_denied_connection() {
    require_e2e!();
    let net = internet();
    let d = daemon(&net, &[]);
    let sandbox = d.create(json!({
        "name": "long",
        "command": ["python3", "-c", LONG_LIVED],
        "network": {"mode": "bridge", "egress": {"allow": ["203.0.113.20:7"]}},
    }));
    let id = sandbox.id.to_string();
    let logs = || String::from_utf8_lossy(&d.logs(&id, "")).into_owned();
    assert!(
        eventually(Duration::from_secs(15), || logs().contains("echo ok 3")),
        "the echo connection did not work: {}",
        logs()
    );
    // sbx network set: the new policy allows pypi.test only; the open echo connection goes.
    let out = d.sbx(&["network", "set", "long", "--egress", "pypi.test"]);
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["egress"], json!({"allow": ["pypi.test"]}), "{shown}");
    assert!(
        eventually(Duration::from_secs(10), || logs().contains("http ")),
        "{}",
        logs()
    );
    let out = logs();
    assert!(out.contains("cut "), "{out}");
    assert!(out.contains("new echo failed"), "{out}");
    assert!(out.contains("http host=pypi.test path=/after"), "{out}");
    // The sandbox object shows the policy in force; its spec the request as it was.
    let s = d.get(&format!("/v1/sandboxes/{id}")).json();
    assert_eq!(s["network"]["egress"], json!({"allow": ["pypi.test"]}));
    assert_eq!(
        s["spec"]["network"]["egress"],
        json!({"allow": ["203.0.113.20:7"]})
    );
    // sbx inspect shows the policy and the recent denials (the new echo connection).
    let out = d.sbx(&["inspect", "long"]);
    assert!(out.status.success(), "{out:?}");
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        inspected["network"]["egress"]["allow"],
        json!(["pypi.test"])
    );
    assert!(
        inspected["recent_egress_denials"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v["port"] == 7)),
        "{inspected}"
    );
    // And back: the echo is allowed again at once.
    let reply = d
        .request("PATCH", &format!("/v1/sandboxes/{id}/network"))
        .json(&json!({"egress": {"allow": ["203.0.113.20:7"]}}))
        .send();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = d.post(
        &format!("/v1/sandboxes/{id}/execs"),
        &json!({"command": ["touch", "/tmp/go"]}),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
    let ended = d.wait(&id);
    assert_eq!(ended.exit_code, Some(0), "{}", logs());
    assert!(logs().contains("again z"), "{}", logs());
    // An ended sandbox's policy cannot change.
    let reply = d
        .request("PATCH", &format!("/v1/sandboxes/{id}/network"))
        .json(&json!({"egress": {"allow": ["*"]}}))
        .send();
    reply.assert_error(409, "not_running");
}

/// The daemon's filter: the pid in `<state>/helper/egress.pid`, if that process is a running
/// `sandboxd-egress` (the helper double-forks it into a session of its own).
fn filter_of(d: &Daemon) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(d.state_dir.join("helper").join("egress.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive_filter(pid).then_some(pid)
}

fn alive_filter(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim() == "sandboxd-egress")
}

fn nft_tables(net: &TestInternet) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", net.name(), "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn policies_and_counters_survive_a_restart_and_nothing_is_left_after() {
    require_e2e!();
    let net = internet();
    let mut d = daemon(&net, &[]);
    let filter = filter_of(&d).expect("the daemon's filter runs");
    let uplink_links: Vec<String> = net.links().into_iter().filter(|l| l != "lo").collect();
    assert_eq!(uplink_links.len(), 1, "{uplink_links:?}");
    // A sandbox that asks pypi.test every 200 ms and prints the result.
    let sandbox = d.create(spec(
        &net,
        json!({"allow": ["pypi.test"]}),
        "while true; do t ask c http://pypi.test/ask; t evil c http://evil.test/; sleep 0.2; done",
    ));
    let id = sandbox.id.to_string();
    let answered = |d: &Daemon| {
        String::from_utf8_lossy(&d.logs(&id, ""))
            .matches("ask rc=0")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(15), || answered(&d) >= 3),
        "{}",
        String::from_utf8_lossy(&d.logs(&id, ""))
    );
    let mut before = Value::Null;
    eventually(Duration::from_secs(10), || {
        before = egress_counters(&d, &id);
        before["connections_allowed"].as_u64().unwrap_or(0) >= 3
    });
    let allowed_before = before["connections_allowed"].as_u64().unwrap_or(0);
    assert!(allowed_before >= 3, "{before}");

    // kill -9 of the daemon (its helper follows; the filter stays, holding the policies), then
    // a restart: the sandbox kept running, the policy is pushed again (Sync), the counters went
    // on from where they were, and the restarted helper found the running filter.
    d.kill9();
    d.restart();
    assert!(
        eventually(Duration::from_secs(15), || {
            d.get("/v1/info").json()["egress"]["connected"] == true
        }),
        "{}",
        d.log()
    );
    let s = d.get(&format!("/v1/sandboxes/{id}")).json();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["network"]["egress"], json!({"allow": ["pypi.test"]}));
    let stored = egress_counters(&d, &id);
    assert!(
        stored["connections_allowed"].as_u64().unwrap_or(0) >= allowed_before,
        "{stored} after {before}"
    );
    let count = answered(&d);
    assert!(
        eventually(Duration::from_secs(15), || answered(&d) >= count + 3),
        "the sandbox lost its way out after the restart:\n{}",
        String::from_utf8_lossy(&d.logs(&id, ""))
    );
    let tail = String::from_utf8_lossy(&d.logs(&id, "")).into_owned();
    assert!(
        tail.lines()
            .rev()
            .take(20)
            .any(|l| l.starts_with("evil rc=6")),
        "a name not allowed still resolved after the restart:\n{tail}"
    );
    let mut after = Value::Null;
    eventually(Duration::from_secs(10), || {
        after = egress_counters(&d, &id);
        after["connections_allowed"].as_u64().unwrap_or(0) > allowed_before + 2
    });
    assert!(
        after["connections_allowed"].as_u64().unwrap_or(0) > allowed_before + 2,
        "{after} after {before}"
    );
    // One uplink link, not one per helper start; one filter, the same.
    let links: Vec<String> = net.links().into_iter().filter(|l| l != "lo").collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(filter_of(&d), Some(filter));

    // Delete: its policy, denials and counters go with it.
    assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    assert_eq!(
        d.get(&format!("/v1/sandboxes/{id}/network/denials")).status,
        404
    );
    // Stop the daemon: nothing is left in the uplink namespace (links, addresses, tables) or
    // on the host, and the filter is gone.
    let host_links_before = uplink_links.clone();
    drop(d);
    assert!(
        eventually(Duration::from_secs(10), || net.links() == ["lo"]),
        "links left in the uplink namespace: {:?}",
        net.links()
    );
    let addrs = net.ip(&["-o", "-4", "addr", "show"]);
    assert!(
        addrs.lines().all(|l| l.contains(" lo ")),
        "addresses left in the uplink namespace:\n{addrs}"
    );
    // The helper removes the link first and its table right after, as it exits.
    assert!(
        eventually(Duration::from_secs(10), || nft_tables(&net)
            .trim()
            .is_empty()),
        "tables left in the uplink: {}",
        nft_tables(&net)
    );
    let host = Command::new("ip").args(["-br", "link"]).output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    for l in &host_links_before {
        assert!(!host.contains(l.as_str()), "{l} on the host:\n{host}");
    }
    assert!(
        eventually(Duration::from_secs(10), || !alive_filter(filter)),
        "the filter outlived its daemon"
    );
}
