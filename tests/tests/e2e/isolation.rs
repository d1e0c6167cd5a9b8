//! Every isolation promise of a sandbox, checked from inside (a shell script in the sandbox) and
//! from the host (the host's /proc, mount table, hostname and IPC), in both privileged and
//! rootless mode.

use std::time::Duration;

use sandboxd_tests::{both_modes, eventually, host_uid_of, require_e2e, Daemon, Mode};
use serde_json::json;

/// A long-running sandbox for host-side inspection; returns (id, init pid, host uid).
fn running(daemon: &Daemon, script: &str) -> (String, i32, u32) {
    let sandbox = daemon.create(json!({ "command": ["sh", "-c", script] }));
    let id = sandbox.id.to_string();
    let pid = sandbox
        .init_pid
        .expect("a running sandbox shows its init pid");
    let uid = sandbox
        .host_uid
        .expect("a running sandbox shows its host uid");
    (id, pid, uid)
}

fn user_namespace_root_inside_unprivileged_outside(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh("id -u; id -g; cat /proc/self/uid_map");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out}");
    assert_eq!(lines.next(), Some("0"), "{out}");
    let map: Vec<u64> = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    match d.mode {
        Mode::Privileged => {
            // A whole range, never containing root or the daemon's uid.
            assert_eq!(map[0], 0);
            assert_eq!(map[2], 65536, "{out}");
            let range = map[1]..map[1] + map[2];
            assert!(
                !range.contains(&0) && !range.contains(&u64::from(d.uid)),
                "{out}"
            );
        }
        Mode::Rootless => assert_eq!(map, vec![0, u64::from(d.uid), 1], "{out}"),
    }

    // From the host: every process of the sandbox runs as a non-zero host uid.
    let (id, pid, host_uid) = running(d, "sleep 30 & wait");
    assert_ne!(host_uid, 0);
    assert_eq!(host_uid_of(pid), Some(host_uid), "init's host uid");
    let children =
        || std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(10), || !children().trim().is_empty()),
        "init {pid} shows no child: nothing below would be checked"
    );
    for child in children().split_whitespace() {
        let child: i32 = child.parse().unwrap();
        assert_eq!(host_uid_of(child), Some(host_uid), "the command's host uid");
    }
    match d.mode {
        Mode::Privileged => {
            assert_ne!(host_uid, d.uid, "the daemon's uid is never a sandbox's")
        }
        Mode::Rootless => assert_eq!(host_uid, d.uid),
    }
    let resp = d.delete(&format!("/v1/sandboxes/{id}"));
    let status = resp.status;
    assert_eq!(status, 204, "{}\n{}", resp.body, d.log());
}
both_modes!(user_namespace_root_inside_unprivileged_outside);

#[test]
fn privileged_sandboxes_get_disjoint_uid_ranges() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let a = running(&d, "sleep 30");
    let b = running(&d, "sleep 30");
    assert_ne!(a.2, b.2);
    assert!(
        a.2.abs_diff(b.2) >= 65536,
        "ranges overlap: {} and {}",
        a.2,
        b.2
    );
}

fn pid_namespace_shows_only_the_sandbox(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh("sleep 5 & ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; echo $$; cat /proc/1/status | grep -E '^(PPid|NSpid)'");
    let mut lines = out.lines();
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids[0], 1, "{out}");
    // init, the shell, sleep and the pipeline: a handful of small pids, none of the host's.
    assert!(pids.len() <= 8 && *pids.last().unwrap() < 20, "{out}");
    assert_eq!(
        lines.next(),
        Some("2"),
        "the command is init's first child: {out}"
    );
    assert!(
        out.contains("PPid:\t0"),
        "PID 1 has no parent inside: {out}"
    );
    // init's executable is out of reach (it is non-dumpable), so the sandbox cannot reopen it.
    let (sandbox, output) = d.run(&[
        "sh",
        "-c",
        "readlink /proc/1/exe || echo denied; cat /proc/1/environ >/dev/null 2>&1 || echo denied",
    ]);
    assert_eq!(sandbox.exit_code, Some(0));
    assert_eq!(output.matches("denied").count(), 2, "{output}");
}
both_modes!(pid_namespace_shows_only_the_sandbox);

/// The host's mount table, without the mounts of the other daemons that tests running at the
/// same time keep in their own state directories (a network hub, a disk-limited root): those
/// come and go with those tests. Everything else, this daemon's state directory included, counts.
fn host_mounts(d: &Daemon) -> Vec<String> {
    let others = std::env::temp_dir().join("sandboxd-e2e-");
    let others = others.to_string_lossy();
    let own = d.state_dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            let point = l.split(' ').nth(4).unwrap_or_default();
            // Other tests' daemons and test internets (`ip netns add` binds them under
            // /run/netns, itself made a mount point the first time) come and go.
            (!point.starts_with(&*others) || point.starts_with(&*own))
                && point != "/run/netns"
                && !point.starts_with("/run/netns/")
                // The helper's own mount of a sandbox's disk-capped filesystem (the default
                // disk limit), there until the sandbox is deleted (the images tests check it
                // goes then): not something the sandbox did.
                && !(point.starts_with(&format!("{own}/sandboxes/")) && point.ends_with("/private"))
        })
        .map(str::to_string)
        .collect()
}

fn mount_namespace_has_its_own_root_and_changes_nothing_on_the_host(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let before = host_mounts(d);
    let out = d.sh("cat /proc/self/mountinfo; echo ===; \
         touch /usr/x 2>/dev/null && echo usr-writable; \
         touch /etc/x 2>/dev/null && echo etc-writable; \
         touch / 2>/dev/null; touch /newfile 2>/dev/null && echo root-writable; \
         touch /work/a /tmp/a /root/a /run/a && echo writable-ok; \
         mkdir -p /tmp/m && mount -t tmpfs none /tmp/m 2>/dev/null && echo mounted; \
         ls -a /; awk 'BEGIN { print \"awk-ok\" }'");
    let (mountinfo, rest) = out.split_once("===").unwrap();
    // Only the sandbox's filesystems, mounted at the sandbox's own places (field 5 of mountinfo
    // is the mount point; nothing of the old root remains).
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(points[0], "/", "{mountinfo}");
    for p in &points {
        let known = [
            "/", "/usr", "/etc", "/work", "/tmp", "/root", "/run", "/dev", "/proc",
        ];
        assert!(
            known
                .iter()
                .any(|k| *p == *k || p.starts_with(&format!("{k}/"))),
            "unexpected mount {p}:\n{mountinfo}"
        );
    }
    assert!(
        !rest.contains("usr-writable")
            && !rest.contains("etc-writable")
            && !rest.contains("root-writable"),
        "{rest}"
    );
    assert!(rest.contains("writable-ok"), "{rest}");
    assert!(
        !rest.contains("mounted"),
        "a sandbox must not mount: {rest}"
    );
    assert!(
        rest.contains("awk-ok"),
        "host tools work through /etc/alternatives: {rest}"
    );
    // `ls -a /` did list the root (the same check finds what is there).
    for present in ["usr\n", "etc\n", "work\n", "tmp\n"] {
        assert!(
            rest.contains(&format!("\n{present}")),
            "/{present} is listed: {rest}"
        );
    }
    for absent in ["sys\n", "home\n", "var\n", "mnt\n", "opt\n"] {
        assert!(
            !rest.contains(&format!("\n{absent}")),
            "/{} should be absent: {rest}",
            absent.trim()
        );
    }
    // The host's mount table is unchanged by running a sandbox.
    let changed = || {
        let now = host_mounts(d);
        let gone: Vec<_> = before.iter().filter(|l| !now.contains(l)).collect();
        let new: Vec<_> = now.iter().filter(|l| !before.contains(l)).collect();
        format!("gone: {gone:#?}\nnew: {new:#?}")
    };
    assert!(
        eventually(Duration::from_secs(5), || host_mounts(d) == before),
        "the host's mount table changed:\n{}",
        changed()
    );
}
both_modes!(mount_namespace_has_its_own_root_and_changes_nothing_on_the_host);

fn etc_has_what_programs_need_and_no_secrets(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh(
        "for f in shadow gshadow sudoers sudoers.d ssh machine-id subuid subgid; do \
           [ -e /etc/$f ] && echo leaked:$f; done; \
         cat /etc/passwd /etc/hostname /etc/hosts; \
         for f in passwd hostname hosts; do [ -e /etc/$f ] && echo present:$f; done; \
         test -r /etc/ld.so.cache && test -d /etc/ssl/certs && echo needed-ok",
    );
    assert!(!out.contains("leaked:"), "{out}");
    // The same test finds the files that are meant to be there.
    for f in ["passwd", "hostname", "hosts"] {
        assert!(out.contains(&format!("present:{f}\n")), "{out}");
    }
    assert!(out.contains("needed-ok"), "{out}");
    assert!(out.starts_with("root:x:0:0:"), "{out}");
    assert!(
        !out.contains(&format!(":{}:", d.uid)),
        "no host users: {out}"
    );
}
both_modes!(etc_has_what_programs_need_and_no_secrets);

fn dev_is_minimal_and_proc_is_masked(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh("ls /dev | tr '\\n' ' '; echo; \
         echo x > /dev/null && head -c 4 /dev/zero | wc -c && head -c 4 /dev/urandom | wc -c; \
         echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo procsys-writable; \
         [ -s /proc/kcore ] && echo kcore-readable; [ -s /proc/self/exe ] && echo exe-sized; \
         echo t > /proc/sysrq-trigger 2>/dev/null && echo sysrq-writable; \
         grep -c . /proc/keys 2>/dev/null || true; \
         ls /dev/pts; true");
    let devs: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    let expected = [
        "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
        "stdout", "tty", "urandom", "zero",
    ];
    assert_eq!(devs, expected, "{out}");
    assert!(out.contains("4\n4\n"), "{out}");
    // The same `-s` test does see a file with a size under /proc (the shell's own binary).
    assert!(out.contains("exe-sized"), "{out}");
    for bad in ["procsys-writable", "kcore-readable", "sysrq-writable"] {
        assert!(!out.contains(bad), "{bad}: {out}");
    }
    assert!(out.contains("ptmx"), "its own devpts instance: {out}");
}
both_modes!(dev_is_minimal_and_proc_is_masked);

fn uts_namespace_has_its_own_hostname(mode: Mode) {
    let host_before = nix::unistd::gethostname().unwrap();
    let d = Daemon::start(mode);
    let (sandbox, out) = d.run_spec(json!({ "command": ["sh", "-c", "hostname; hostname other 2>/dev/null; hostname"], "hostname": "box-1" }));
    assert_eq!(sandbox.exit_code, Some(0));
    assert!(out.starts_with("box-1\n"), "{out}");
    let (_, out) = d.run_spec(json!({ "command": ["hostname"], "name": "named-box" }));
    assert_eq!(out, "named-box\n");
    assert_eq!(
        nix::unistd::gethostname().unwrap(),
        host_before,
        "the host's hostname is unchanged"
    );
}
both_modes!(uts_namespace_has_its_own_hostname);

fn ipc_namespace_hides_host_objects(mode: Mode) {
    // A System V shared memory segment on the host, seen by the host's own ipcs (the
    // positive control: the probe does see a segment where there is one).
    let out = std::process::Command::new("ipcmk")
        .args(["-M", "4096"])
        .output()
        .expect("ipcmk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let shmid: String = text.split_whitespace().last().unwrap_or("").to_string();
    let host = std::process::Command::new("sh")
        .args(["-c", "ipcs -m | grep -c '^0x' || true"])
        .output()
        .expect("ipcs");
    let host_count: u32 = String::from_utf8_lossy(&host.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(host_count >= 1, "the host shows its own segment {shmid:?}");
    let d = Daemon::start(mode);
    let out = d.sh("ipcs -m | grep -c '^0x' || true; ls -A /dev/mqueue | wc -l; grep mqueue /proc/self/mountinfo | wc -l");
    let _ = std::process::Command::new("ipcrm")
        .args(["-m", &shmid])
        .status();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "host shared memory is visible: {out}");
    assert_eq!(lines[1], "0", "{out}");
    assert_eq!(lines[2], "1", "its own mqueue mount: {out}");
}
both_modes!(ipc_namespace_hides_host_objects);

fn network_namespace_has_only_loopback(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh(
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; echo ===; \
         cat /proc/net/route | tail -n +2 | wc -l; \
         grep -c . /proc/net/if_inet6 2>/dev/null || true; \
         ip -o link show lo | grep -q 'UP' && echo lo-up",
    );
    let (ifaces, rest) = out.split_once("===").unwrap();
    assert_eq!(ifaces.trim(), "lo", "{out}");
    assert!(rest.starts_with("\n0\n"), "no routes: {out}");
    assert!(rest.contains("lo-up"), "{out}");
}
both_modes!(network_namespace_has_only_loopback);

fn cgroup_namespace_shows_the_sandbox_at_its_root(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh("cat /proc/self/cgroup");
    assert!(out.lines().count() > 0, "no cgroup line to check: {out:?}");
    for line in out.lines() {
        let path = line.rsplit(':').next().unwrap();
        assert_eq!(path, "/", "{out}");
    }
}
both_modes!(cgroup_namespace_shows_the_sandbox_at_its_root);

fn baseline_hardening(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let out = d.sh("grep -E '^(NoNewPrivs|CapBnd|CapAmb|CapInh)' /proc/self/status; ls /proc/self/fd | tr '\\n' ' '");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    let field = |name: &str| {
        let hex = out
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    const CAP_SYS_MODULE: u64 = 1 << 16;
    const CAP_NET_ADMIN: u64 = 1 << 12;
    let bounding = field("CapBnd:");
    for cap in [CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_NET_ADMIN] {
        assert_eq!(bounding & cap, 0, "bounding set {bounding:x} keeps {cap:x}");
    }
    assert_eq!(field("CapAmb:"), 0);
    assert_eq!(field("CapInh:"), 0);
    // ls sees its own 0-2 and the directory it is listing: nothing inherited.
    let fds = out.lines().last().unwrap();
    assert_eq!(fds.trim(), "0 1 2 3", "{out}");
}
both_modes!(baseline_hardening);

fn work_is_private_writable_and_removed_on_delete(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    let sandbox = d.create(
        json!({ "command": ["sh", "-c", "echo data > /work/file; ls -ld /work | cut -c1-10"] }),
    );
    let id = sandbox.id.to_string();
    let done = d.wait(&id);
    assert_eq!(done.exit_code, Some(0));
    let work = d.sandbox_dir(&id).join("private").join("work");
    assert_eq!(
        std::fs::read_to_string(work.join("file")).unwrap(),
        "data\n"
    );
    // Another sandbox does not see it.
    assert_eq!(d.sh("ls -A /work | wc -l"), "0\n");
    assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    assert!(
        !d.sandbox_dir(&id).exists(),
        "the sandbox directory is removed"
    );
}
both_modes!(work_is_private_writable_and_removed_on_delete);

fn other_host_users_cannot_reach_or_run_what_a_sandbox_leaves_in_work(mode: Mode) {
    let daemon = Daemon::start(mode);
    let d = &daemon;
    // A setuid copy of a shell: harmless inside (no_new_privs, its own uids), but a way into
    // the sandbox's host uid for anyone on the host who could execute it.
    let sandbox = d.create(json!({ "command": ["sh", "-c", "cp /bin/sh /work/suid && chmod 4755 /work/suid && chmod 777 /work"] }));
    let id = sandbox.id.to_string();
    assert_eq!(d.wait(&id).exit_code, Some(0));
    let private = d.sandbox_dir(&id).join("private");
    let suid = private.join("work").join("suid");
    // An unrelated host user (nobody) cannot even reach it. (Through a shell of nobody's:
    // setpriv itself resolves the program before it has dropped every capability.)
    let as_nobody = |script: &str, arg: &std::path::Path| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "/bin/sh",
                "-c",
                script,
            ])
            .arg(arg)
            .output()
            .expect("setpriv")
    };
    // nobody does run a shell of the host's (the way in is sound, so a refusal below is
    // the sandbox's directory refusing).
    let out = as_nobody(r#""$0" -c 'id -u'"#, std::path::Path::new("/bin/sh"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "65534\n",
        "{:?}: nobody cannot run a host shell: {out:?}",
        d.mode
    );
    let out = as_nobody(r#""$0" -p -c 'id -u'"#, &suid);
    assert!(
        !out.status.success(),
        "{:?}: nobody ran the sandbox's setuid file: {}",
        d.mode,
        String::from_utf8_lossy(&out.stdout)
    );
    let out = as_nobody(r#"ls "$0""#, &private);
    assert!(
        !out.status.success(),
        "{:?}: nobody can list private/",
        d.mode
    );
    // While the sandbox's own host uid (root inside) can.
    let (uid, gid) = (sandbox.host_uid.unwrap(), sandbox.host_uid.unwrap());
    let out = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
            "/bin/sh",
            "-c",
            r#"ls "$0""#,
        ])
        .arg(private.join("work"))
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "{:?}: the sandbox's own uid reaches /work",
        d.mode
    );
}
both_modes!(other_host_users_cannot_reach_or_run_what_a_sandbox_leaves_in_work);

#[test]
fn capabilities_can_be_dropped_and_added_only_as_the_operator_allows() {
    require_e2e!();
    const CAP_NET_RAW: u64 = 1 << 13;
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    let bounding = |d: &Daemon, spec: serde_json::Value| {
        let (sandbox, out) = d.run_spec(spec);
        assert_eq!(sandbox.exit_code, Some(0), "{out}");
        let hex = out
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .unwrap()
            .trim()
            .to_string();
        u64::from_str_radix(&hex, 16).unwrap()
    };
    let cmd = json!(["grep", "CapBnd", "/proc/self/status"]);
    let d = Daemon::start(Mode::Privileged);
    let default = bounding(&d, json!({"command": cmd}));
    // Exactly the documented default set (capability numbers are their positions in `ALL`).
    use sandboxd_protocol::capabilities::{ALL, DEFAULT};
    let documented: u64 = DEFAULT
        .iter()
        .map(|name| 1u64 << ALL.iter().position(|c| c == name).unwrap())
        .sum();
    assert_eq!(default, documented, "{default:x} != {documented:x}");
    assert_ne!(default & CAP_NET_RAW, 0);
    assert_eq!(default & CAP_SYS_PTRACE, 0);
    let dropped = bounding(
        &d,
        json!({"command": cmd, "capabilities": {"drop": ["NET_RAW"]}}),
    );
    assert_eq!(dropped, default & !CAP_NET_RAW);
    let resp = d.post(
        "/v1/sandboxes",
        &json!({"command": cmd, "capabilities": {"add": ["SYS_PTRACE"]}}),
    );
    assert_eq!(resp.status, 422);
    let resp = d.post(
        "/v1/sandboxes",
        &json!({"command": cmd, "capabilities": {"add": ["CAP_NOPE"]}}),
    );
    assert_eq!(resp.status, 400);

    let d = Daemon::start_with(Mode::Privileged, &["--allow-cap", "SYS_PTRACE"]);
    let added = bounding(
        &d,
        json!({"command": cmd, "capabilities": {"add": ["SYS_PTRACE"]}}),
    );
    assert_eq!(added, default | CAP_SYS_PTRACE);
}
