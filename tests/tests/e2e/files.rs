//! Files in and out of a sandbox: `"start": false` + `POST /start`, `/files` and `/archive`,
//! and every way a sandbox might try to make a transfer touch the host.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sandboxd_api::{Sandbox, SandboxState};
use sandboxd_tests::{both_modes, require_e2e, Daemon, Mode, Reply};
use serde_json::{json, Value};

fn put(d: &Daemon, id: &str, what: &str, query: &str, body: Vec<u8>) -> Reply {
    d.request("PUT", &format!("/v1/sandboxes/{id}/{what}?{query}"))
        .body(body)
        .send()
}

fn get(d: &Daemon, id: &str, what: &str, query: &str) -> Reply {
    d.get(&format!("/v1/sandboxes/{id}/{what}?{query}"))
}

/// Status and body of a response, for assertions with context.
fn answer(resp: Reply) -> (u16, Vec<u8>) {
    (resp.status, resp.bytes)
}

fn expect(resp: Reply, status: u16, what: &str) -> Vec<u8> {
    let (got, body) = answer(resp);
    assert_eq!(got, status, "{what}: {}", String::from_utf8_lossy(&body));
    body
}

/// Bytes of every value, in an order that a truncation or a shift would show.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A tar archive of `(path, mode, content)` files (directories made implicitly or by entries
/// ending in '/'), and symlinks as `(path, 0, "->target")`.
fn tar_of(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_mtime(1_600_000_000);
        if let Some(target) = data.strip_prefix(b"->") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, path, std::str::from_utf8(target).unwrap())
                .unwrap();
        } else if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, path, &[][..]).unwrap();
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// A tar archive with one raw entry whose name is written as is (the tar crate refuses to
/// write `..` or absolute names itself).
fn raw_tar(name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, data).unwrap();
    b.into_inner().unwrap()
}

/// Path -> (mode, content, link target) of every entry of a tar stream.
fn untar(bytes: &[u8]) -> BTreeMap<String, (u32, Vec<u8>, Option<String>)> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = String::from_utf8_lossy(&entry.path_bytes())
            .trim_end_matches('/')
            .to_string();
        let mode = entry.header().mode().unwrap();
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(path, (mode, data, link));
    }
    out
}

fn create_unstarted(d: &Daemon, script: &str) -> Sandbox {
    let s = d.create(json!({ "command": ["sh", "-c", script], "start": false }));
    assert_eq!(s.state, SandboxState::Created, "{s:?}");
    s
}

fn files_go_in_before_start_and_come_out_after_exit_byte_for_byte(mode: Mode) {
    let d = Daemon::start(mode);
    let script = "set -e; cat /work/in.bin > /work/out.bin; \
                  stat -c '%a %u' /work/in.bin /work/tree/bin/run.sh; \
                  cp -a /work/tree /work/tree-out; echo made > /work/tree-out/new.txt; \
                  chmod 600 /work/tree-out/new.txt";
    let s = create_unstarted(&d, script);
    let id = s.id.to_string();
    // Nothing runs yet: no output, no start time.
    assert!(s.started_at.is_none());

    let content = pattern(3 * 1024 * 1024 + 17, 7);
    expect(
        put(
            &d,
            &id,
            "files",
            "path=/work/in.bin&mode=0640",
            content.clone(),
        ),
        204,
        "PUT file",
    );
    let tree = tar_of(&[
        ("bin/", 0o755, b""),
        ("bin/run.sh", 0o755, b"#!/bin/sh\necho hi\n"),
        ("docs/deep/er/notes.txt", 0o644, &pattern(70_000, 3)),
        ("docs/link", 0, b"->deep/er/notes.txt"),
        ("empty", 0o600, b""),
    ]);
    expect(
        put(&d, &id, "archive", "path=/work/tree", tree),
        204,
        "PUT archive",
    );
    // The listing of a directory, before start.
    let listing: Value =
        serde_json::from_slice(&expect(get(&d, &id, "files", "path=/work"), 200, "listing"))
            .unwrap();
    assert_eq!(listing["path"], "/work");
    let entries = listing["entries"].as_array().unwrap();
    let find = |name: &str| entries.iter().find(|e| e["name"] == name).cloned();
    let f = find("in.bin").expect("in.bin listed");
    assert_eq!(f["type"], "file");
    assert_eq!(f["size"], content.len() as u64);
    assert_eq!(f["mode"], 0o640);
    assert_eq!(find("tree").unwrap()["type"], "directory");

    // On the host the files belong to the sandbox's root, inside its private directory.
    let work = d.sandbox_dir(&id).join("private/work");
    let meta = std::fs::metadata(work.join("in.bin")).unwrap();
    let work_owner = std::fs::metadata(&work).unwrap().uid();
    assert_eq!(meta.uid(), work_owner, "uploaded file owner");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    if mode == Mode::Privileged {
        assert_ne!(meta.uid(), 0);
        assert_ne!(meta.uid(), d.uid);
    }

    // Start: the command sees the files as root's, with their modes.
    let started = d.start_after_transfer(&id);
    assert_eq!(started.status, 200, "start: {}\n{}", started.body, d.log());
    let done = d.wait(&id);
    let out = String::from_utf8_lossy(&d.logs(&id, "")).into_owned();
    assert_eq!(done.exit_code, Some(0), "{done:?}: {out}");
    assert_eq!(out, "640 0\n755 0\n");
    // A second start is a conflict.
    let again = d
        .request("POST", &format!("/v1/sandboxes/{id}/start"))
        .send();
    assert_eq!(again.status, 409, "second start: {}", again.body);

    // After exit: the file and the tree come out exactly.
    let resp = get(&d, &id, "files", "path=/work/out.bin");
    assert_eq!(resp.header("x-sandbox-file-mode"), Some("0644"));
    assert_eq!(expect(resp, 200, "GET out.bin"), content);
    let tar = expect(
        get(&d, &id, "archive", "path=/work/tree-out"),
        200,
        "GET archive",
    );
    let got = untar(&tar);
    assert_eq!(got["bin/run.sh"].0, 0o755);
    assert_eq!(got["bin/run.sh"].1, b"#!/bin/sh\necho hi\n");
    assert_eq!(got["docs/deep/er/notes.txt"].1, pattern(70_000, 3));
    assert_eq!(got["docs/link"].2.as_deref(), Some("deep/er/notes.txt"));
    assert_eq!(got["empty"].0, 0o600);
    assert_eq!(got["new.txt"], (0o600, b"made\n".to_vec(), None));
    // An archive of a single file holds that file under its name.
    let single = untar(&expect(
        get(&d, &id, "archive", "path=/work/in.bin"),
        200,
        "GET archive of a file",
    ));
    assert_eq!(single["in.bin"].1, content);

    // DELETE a file and a tree.
    expect(
        d.delete(&format!("/v1/sandboxes/{id}/files?path=/work/out.bin")),
        204,
        "DELETE file",
    );
    expect(
        get(&d, &id, "files", "path=/work/out.bin"),
        404,
        "GET deleted",
    );
    expect(
        d.delete(&format!("/v1/sandboxes/{id}/files?path=/work/tree-out")),
        204,
        "DELETE tree",
    );
    assert!(!work.join("tree-out").exists());
    assert!(work.join("tree/bin/run.sh").exists());
    // Gone with the sandbox.
    expect(
        d.delete(&format!("/v1/sandboxes/{id}")),
        204,
        "DELETE sandbox",
    );
    expect(
        get(&d, &id, "files", "path=/work"),
        404,
        "files of a deleted sandbox",
    );
}
both_modes!(files_go_in_before_start_and_come_out_after_exit_byte_for_byte);

/// A file on the host that a sandbox must never reach, and a name that must never appear.
struct Canary {
    dir: std::path::PathBuf,
    secret: Vec<u8>,
    tag: String,
}

impl Canary {
    fn new(d: &Daemon) -> Canary {
        let dir = d.state_dir.join("canary");
        std::fs::create_dir_all(&dir).unwrap();
        let secret = format!("host secret {}", uuid::Uuid::new_v4()).into_bytes();
        std::fs::write(dir.join("secret"), &secret).unwrap();
        Canary {
            dir,
            secret,
            tag: format!("evil-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The host is as it was: the secret unchanged, nothing new beside it, and the tagged name
    /// nowhere a transfer might have put it.
    fn assert_untouched(&self) {
        assert_eq!(std::fs::read(self.dir.join("secret")).unwrap(), self.secret);
        let names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        for dir in ["/", "/etc", "/tmp", "/usr", "/root", "/proc/self/root"] {
            let p = std::path::Path::new(dir).join(&self.tag);
            assert!(!p.exists(), "{} exists on the host", p.display());
        }
    }
}

fn bad_request(resp: Reply, what: &str) -> String {
    let (status, body) = answer(resp);
    assert!(
        status == 400 || status == 404 || status == 403,
        "{what}: expected a refusal, got {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        panic!(
            "{what}: not the error shape: {}",
            String::from_utf8_lossy(&body)
        )
    });
    v["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn planted_links_fifos_and_devices_never_reach_the_host() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let canary = Canary::new(&d);
    let plant = format!(
        "set -e; cd /work; ln -s / root; ln -s ../../../../../../.. up; \
         ln -s /proc/self/root self; ln -s /proc/1/cwd cwd; ln -s {canary} canary; \
         mkfifo fifo; ln -s /dev/zero zero; mkdir d; ln -s /etc d/etc; echo mine > own.txt",
        canary = canary.dir.display()
    );
    let (s, out) = d.run(&["sh", "-c", &plant]);
    assert_eq!(s.exit_code, Some(0), "{out}");
    let id = s.id.to_string();
    let tag = &canary.tag;

    // The same PUT to a plain path is accepted (the refusals below are about the links).
    expect(
        put(
            &d,
            &id,
            "files",
            &format!("path=/work/d/{tag}-plain"),
            b"fine".to_vec(),
        ),
        204,
        "PUT to a plain path",
    );
    // Writes through planted links: refused, or landing inside the sandbox's own root.
    for path in [
        format!("/work/root/etc/{tag}"),
        format!("/work/root/tmp/{tag}"),
        format!("/work/up/{tag}"),
        format!("/work/up/tmp/{tag}"),
        format!("/work/self/{tag}"),
        format!("/work/cwd/{tag}"),
        format!("/work/canary/{tag}"),
        format!("/work/d/etc/{tag}"),
    ] {
        bad_request(
            put(&d, &id, "files", &format!("path={path}"), b"pwned".to_vec()),
            &format!("PUT {path}"),
        );
    }
    // Replacing a planted link replaces the link, never its target.
    expect(
        put(
            &d,
            &id,
            "files",
            "path=/work/canary",
            b"just a file".to_vec(),
        ),
        204,
        "PUT over a link",
    );
    // Reads through planted links see the sandbox's root, never the host's.
    let hostname = expect(
        get(&d, &id, "files", "path=/work/up/etc/hostname"),
        200,
        "GET through ../",
    );
    assert_eq!(String::from_utf8_lossy(&hostname).trim(), s.hostname);
    let hostname = expect(
        get(&d, &id, "files", "path=/work/root/etc/hostname"),
        200,
        "GET through /",
    );
    assert_eq!(String::from_utf8_lossy(&hostname).trim(), s.hostname);
    for path in [
        "/work/root/etc/shadow".to_string(),
        format!("{}/secret", canary.dir.display()),
        "/work/self/etc/passwd".to_string(),
        "/work/cwd/own.txt".to_string(),
        "/proc/self/environ".to_string(),
        "/proc/1/root/etc/passwd".to_string(),
        "/work/zero".to_string(),
        "/dev/zero".to_string(),
        "/dev/null".to_string(),
    ] {
        bad_request(
            get(&d, &id, "files", &format!("path={path}")),
            &format!("GET {path}"),
        );
    }
    // A FIFO answers at once (an open that would wait for a writer is never made).
    let message = bad_request(get(&d, &id, "files", "path=/work/fifo"), "GET fifo");
    assert!(message.contains("not a regular file"), "{message}");
    bad_request(
        get(&d, &id, "archive", "path=/work/fifo"),
        "GET archive of a fifo",
    );
    // An archive of /work stores the links as links and skips the FIFO.
    let tree = untar(&expect(
        get(&d, &id, "archive", "path=/work"),
        200,
        "GET archive",
    ));
    assert_eq!(tree["root"].2.as_deref(), Some("/"));
    assert_eq!(tree["d/etc"].2.as_deref(), Some("/etc"));
    assert!(!tree.contains_key("fifo"));
    assert!(tree.values().all(|(_, data, _)| data != &canary.secret));
    // Deleting a link removes the link.
    expect(
        d.delete(&format!("/v1/sandboxes/{id}/files?path=/work/root")),
        204,
        "DELETE link",
    );
    assert!(std::path::Path::new("/etc/hostname").exists());

    // Archives that try to leave the target directory.
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot",
            raw_tar(
                format!("../{tag}").as_bytes(),
                tar::EntryType::Regular,
                b"",
                b"x",
            ),
        ),
        (
            "deep dot-dot",
            raw_tar(
                format!("a/../../../{tag}").as_bytes(),
                tar::EntryType::Regular,
                b"",
                b"x",
            ),
        ),
        (
            "absolute",
            raw_tar(
                format!("/tmp/{tag}").as_bytes(),
                tar::EntryType::Regular,
                b"",
                b"x",
            ),
        ),
        (
            "through a planted link",
            raw_tar(
                format!("d/etc/{tag}").as_bytes(),
                tar::EntryType::Regular,
                b"",
                b"x",
            ),
        ),
        (
            "through its own link",
            tar_of(&[("lnk", 0, b"->/"), (&format!("lnk/etc/{tag}"), 0o644, b"x")]),
        ),
        (
            "through a relative link",
            tar_of(&[
                ("up2", 0, b"->../../../.."),
                (&format!("up2/{tag}"), 0o644, b"x"),
            ]),
        ),
        (
            "hard link out",
            raw_tar(
                tag.as_bytes(),
                tar::EntryType::Link,
                b"../../etc/passwd",
                b"",
            ),
        ),
        (
            "device",
            raw_tar(tag.as_bytes(), tar::EntryType::Char, b"", b""),
        ),
        (
            "fifo",
            raw_tar(tag.as_bytes(), tar::EntryType::Fifo, b"", b""),
        ),
    ];
    for (what, archive) in hostile {
        bad_request(put(&d, &id, "archive", "path=/work", archive), what);
    }
    // The same archives aimed at a link: the target itself must be on /work.
    bad_request(
        put(
            &d,
            &id,
            "archive",
            "path=/work/up",
            tar_of(&[(tag, 0o644, b"x")]),
        ),
        "archive into a link to /",
    );
    canary.assert_untouched();
    // The sandbox's own files are intact.
    assert_eq!(
        expect(get(&d, &id, "files", "path=/work/own.txt"), 200, "own"),
        b"mine\n"
    );
}

#[test]
fn bad_paths_and_modes_are_refused_before_any_file_work() {
    require_e2e!();
    let d = Daemon::start(Mode::Rootless);
    let s = create_unstarted(&d, "true");
    let id = s.id.to_string();
    let long = format!("/work/{}", "a".repeat(300));
    let very_long = format!("/work/{}", "abc/".repeat(1100));
    for (method, what, query) in [
        ("GET", "files", "path=work/a"),
        ("GET", "files", "path=/work/../etc/passwd"),
        ("GET", "files", "path=/work/a%00b"),
        ("GET", "files", "path=/work//a"),
        ("GET", "files", &format!("path={long}")),
        ("GET", "files", &format!("path={very_long}")),
        ("GET", "files", ""),
        ("PUT", "files", "path=/etc/passwd"),
        ("PUT", "files", "path=/tmp/x"),
        ("PUT", "files", "path=/work"),
        ("PUT", "files", "path=/workshop/x"),
        ("PUT", "files", "path=/work/x&mode=4755"),
        ("PUT", "files", "path=/work/x&mode=rwx"),
        ("PUT", "archive", "path=/usr"),
        ("PUT", "archive", "path=/work/x&mode=0644"),
        ("DELETE", "files", "path=/work"),
        ("DELETE", "files", "path=/"),
    ] {
        let reply = d
            .request(method, &format!("/v1/sandboxes/{id}/{what}?{query}"))
            .send();
        reply.assert_error(400, &format!("{method} {what}?{query}"));
    }
    // Not found, and not yours, are 404s.
    expect(
        get(&d, &id, "files", "path=/work/nothing"),
        404,
        "missing file",
    );
    expect(
        get(&d, &uuid::Uuid::new_v4().to_string(), "files", "path=/work"),
        404,
        "missing sandbox",
    );
    // Nothing of the refused requests reached the sandbox's directory.
    let work = d.sandbox_dir(&id).join("private/work");
    assert_eq!(std::fs::read_dir(work).unwrap().count(), 0);
    // A sandbox that never started is deleted like any other, leaving nothing.
    expect(
        d.delete(&format!("/v1/sandboxes/{id}")),
        204,
        "DELETE created",
    );
    assert!(!d.sandbox_dir(&id).exists());
}

#[test]
fn a_symlink_swap_race_during_transfers_never_reaches_the_host() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let canary = Canary::new(&d);
    let tag = canary.tag.clone();
    // /work/d flips between a directory and links to /, to the host canary's path and to
    // ../../.., as fast as the sandbox can, while transfers go through it.
    let swap = format!(
        "cd /work; mkdir stable; while :; do rm -rf d; mkdir -p d/sub; rm -rf d; ln -s / d; rm -f d; \
         mkdir d; rm -rf d; ln -s {canary} d; rm -f d; ln -s ../../../.. d; rm -f d; done",
        canary = canary.dir.display()
    );
    let s = d.create(json!({ "command": ["sh", "-c", swap], "limits": { "timeout_secs": 300 } }));
    let id = s.id.to_string();
    let archive = tar_of(&[("sub/", 0o755, b""), (&format!("sub/{tag}"), 0o644, b"x")]);
    // The same transfers against a directory that stays put all succeed: what the race makes
    // of them below is the race's doing.
    assert!(sandboxd_tests::eventually(Duration::from_secs(10), || {
        get(&d, &id, "files", "path=/work/stable").status == 200
    }));
    expect(
        put(
            &d,
            &id,
            "files",
            &format!("path=/work/stable/{tag}"),
            b"x".to_vec(),
        ),
        204,
        "PUT file, stable",
    );
    expect(
        put(&d, &id, "archive", "path=/work/stable", archive.clone()),
        204,
        "PUT archive, stable",
    );
    let stable = untar(&expect(
        get(&d, &id, "archive", "path=/work/stable"),
        200,
        "GET archive, stable",
    ));
    assert!(
        stable.contains_key(&format!("sub/{tag}")),
        "{:?}",
        stable.keys()
    );
    expect(
        d.delete(&format!("/v1/sandboxes/{id}/files?path=/work/stable/sub")),
        204,
        "DELETE, stable",
    );
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..40 {
        let mut record = |what: &str, resp: Reply| {
            let (status, body) = answer(resp);
            assert!(
                matches!(status, 200 | 204 | 400 | 403 | 404),
                "{what} in round {round}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            *outcomes.entry(format!("{what} {status}")).or_default() += 1;
            body
        };
        record(
            "PUT file",
            put(
                &d,
                &id,
                "files",
                &format!("path=/work/d/{tag}"),
                b"x".to_vec(),
            ),
        );
        record(
            "PUT archive",
            put(&d, &id, "archive", "path=/work/d", archive.clone()),
        );
        let body = record("GET archive", get(&d, &id, "archive", "path=/work/d"));
        assert!(
            !body
                .windows(canary.secret.len())
                .any(|w| w == canary.secret),
            "the host's secret came out"
        );
        record("GET secret", get(&d, &id, "files", "path=/work/d/secret"));
        record(
            "DELETE",
            d.delete(&format!("/v1/sandboxes/{id}/files?path=/work/d/sub")),
        );
    }
    eprintln!("outcomes: {outcomes:?}");
    assert_eq!(
        d.sandbox(&id).state,
        SandboxState::Running,
        "the swap loop kept running"
    );
    d.request("POST", &format!("/v1/sandboxes/{id}/kill"))
        .send();
    d.wait(&id);
    canary.assert_untouched();
}

fn sbx_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.sbx(args);
    assert!(
        out.status.success(),
        "sbx {args:?}: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sbx_create_cp_start_and_cp_back(mode: Mode) {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(mode);
    let local = d.state_dir.join("cli-files");
    let src = local.join("src");
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    let big = pattern(2 * 1024 * 1024 + 3, 11);
    std::fs::write(local.join("big.bin"), &big).unwrap();
    std::fs::set_permissions(
        local.join("big.bin"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    std::fs::write(src.join("nested/deeper/a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.join("top.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("top.sh"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("nested/deeper/a.txt", src.join("link")).unwrap();

    let id = sbx_ok(
        &d,
        &[
            "create",
            "--",
            "sh",
            "-c",
            "cp /work/big.bin /work/big.out && cp -a /work/tree /work/tree.out && \
             stat -c %a /work/big.bin /work/tree/top.sh",
        ],
    )
    .trim()
    .to_string();
    assert_eq!(d.sandbox(&id).state, SandboxState::Created);
    let short: String = id.replace('-', "")[..12].to_string();
    assert!(sbx_ok(&d, &["ls", "--state", "created"]).contains(&short));
    sbx_ok(
        &d,
        &[
            "cp",
            local.join("big.bin").to_str().unwrap(),
            &format!("{id}:/work/"),
        ],
    );
    sbx_ok(
        &d,
        &["cp", src.to_str().unwrap(), &format!("{id}:/work/tree")],
    );
    assert_eq!(sbx_ok(&d, &["start", &id]).trim(), id);
    assert_eq!(sbx_ok(&d, &["wait", &id]).trim(), "0");
    assert_eq!(
        String::from_utf8_lossy(&d.logs(&id, "")),
        "751\n700\n",
        "modes inside"
    );

    let back = local.join("back");
    std::fs::create_dir_all(&back).unwrap();
    sbx_ok(
        &d,
        &["cp", &format!("{id}:/work/big.out"), back.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(back.join("big.out")).unwrap(), big);
    sbx_ok(
        &d,
        &[
            "cp",
            &format!("{id}:/work/tree.out"),
            back.join("tree").to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(back.join("tree/nested/deeper/a.txt")).unwrap(),
        b"alpha\n"
    );
    let top = std::fs::metadata(back.join("tree/top.sh")).unwrap();
    assert_eq!(top.permissions().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::read_link(back.join("tree/link")).unwrap(),
        std::path::Path::new("nested/deeper/a.txt")
    );
    // Mistakes are reported, with the daemon's message.
    let out = d.sbx(&[
        "cp",
        local.join("big.bin").to_str().unwrap(),
        &format!("{id}:/etc/x"),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.sbx(&["cp", "a", "b"]);
    assert!(!out.status.success());
    let out = d.sbx(&["start", &id]);
    assert!(!out.status.success(), "a second start");
    // A created sandbox runs nothing: `sbx rm` removes it without -f.
    let other = sbx_ok(&d, &["create", "--", "true"]).trim().to_string();
    sbx_ok(&d, &["rm", &other]);
    assert!(!d.sandbox_dir(&other).exists());
}
both_modes!(sbx_create_cp_start_and_cp_back);

/// `len` bytes of a repeating pattern, generated as they are read.
struct Generated {
    left: u64,
    pos: u64,
}

/// 251 (a prime) repeated: byte `i` of a stream is `i % 251`.
fn cycle() -> &'static [u8] {
    static CYCLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CYCLE.get_or_init(|| (0..251 * 4096).map(|i| (i % 251) as u8).collect())
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = (self.pos % 251) as usize;
        let n = buf.len().min(self.left as usize).min(cycle().len() - start);
        buf[..n].copy_from_slice(&cycle()[start..start + n]);
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn large_transfers_stream_with_flat_daemon_memory() {
    require_e2e!();
    const SIZE: u64 = 128 << 20;
    let d = Daemon::start(Mode::Rootless);
    let s = create_unstarted(&d, "true");
    let id = s.id.to_string();
    // Warm the daemon up with a small transfer, then measure its peak memory across big ones.
    expect(
        put(&d, &id, "files", "path=/work/small", vec![1; 4096]),
        204,
        "warm-up",
    );
    let before = peak_rss_kib(d.pid());
    let resp = d
        .request("PUT", &format!("/v1/sandboxes/{id}/files?path=/work/big"))
        .timeout(Duration::from_secs(600))
        .body(reqwest::blocking::Body::sized(
            Generated { left: SIZE, pos: 0 },
            SIZE,
        ))
        .send();
    assert_eq!(resp.status, 204, "{}", resp.body);
    // Download it as a file and as an archive, reading as it arrives and checking every byte.
    for what in ["files", "archive"] {
        let mut resp = d
            .request("GET", &format!("/v1/sandboxes/{id}/{what}?path=/work/big"))
            .timeout(Duration::from_secs(600))
            .stream();
        assert_eq!(resp.status().as_u16(), 200);
        let mut expected = Generated { left: SIZE, pos: 0 };
        let mut skip = if what == "archive" { 512 } else { 0 };
        let mut buf = vec![0u8; 1 << 20];
        let mut want = vec![0u8; 1 << 20];
        let mut seen = 0u64;
        loop {
            let n = resp.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            let mut data = &buf[..n];
            let s = skip.min(data.len());
            data = &data[s..];
            skip -= s;
            let take = data.len().min(expected.left as usize);
            let mut filled = 0;
            while filled < take {
                filled += expected.read(&mut want[filled..take]).unwrap();
            }
            assert!(
                data[..take] == want[..take],
                "{what}: content differs near byte {seen}"
            );
            seen += take as u64;
        }
        assert_eq!(seen, SIZE, "{what}: length");
    }
    let after = peak_rss_kib(d.pid());
    eprintln!("daemon peak RSS: {before} KiB before, {after} KiB after moving 3 x {SIZE} bytes");
    assert!(
        after < before + 32 * 1024,
        "the daemon's memory grew with the transfer: {before} KiB -> {after} KiB"
    );
}

/// Start a download of `path` that nobody reads (its worker stays blocked), returning the stream.
fn stalled_download(d: &Daemon, id: &str, path: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
    let auth = d
        .auth_header()
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    std::io::Write::write_all(
        &mut stream,
        format!(
            "GET /v1/sandboxes/{id}/files?path={path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n",
            d.addr
        )
        .as_bytes(),
    )
    .unwrap();
    stream
}

/// A stalled download whose answer has begun: its worker has built the root, dropped every
/// capability and opened the file (it answers only then), and now waits for us to read.
fn ready_download(d: &Daemon, id: &str, path: &str) -> std::net::TcpStream {
    let mut stream = stalled_download(d, id, path);
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    stream
}

/// Processes of `uid` outside the pid namespace of the sandbox's init (if it runs): file workers.
fn workers_of(uid: u32, init_pid: Option<i32>) -> Vec<i32> {
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let sandbox = init_pid.and_then(ns);
    sandboxd_tests::processes_of_uid(uid)
        .into_iter()
        .filter(|pid| sandbox.is_none() || ns(*pid) != sandbox)
        .collect()
}

/// The one file worker of `uid`: no capability at all, no_new_privs, every uid `uid`, not in
/// the host's mount namespace.
fn assert_capless_worker(uid: u32, init_pid: Option<i32>) {
    let mut workers = Vec::new();
    assert!(sandboxd_tests::eventually(Duration::from_secs(10), || {
        workers = workers_of(uid, init_pid);
        !workers.is_empty()
    }));
    assert_eq!(workers.len(), 1, "one worker: {workers:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", workers[0])).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(cap), "0000000000000000", "{cap} of the worker");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    let uids: Vec<u32> = field("Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4, "real, effective, saved, fs: {status}");
    assert!(uids.iter().all(|u| *u == uid), "{uids:?}");
    let host_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    if let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/mnt", workers[0])) {
        assert_ne!(ns, host_ns);
    }
}

#[test]
fn the_file_worker_is_the_sandboxs_root_without_capabilities() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let big = "head -c 33554432 /dev/zero > /work/big";
    // An exited sandbox: the worker builds the root itself.
    let (s, out) = d.run(&["sh", "-c", big]);
    assert_eq!(s.exit_code, Some(0), "{out}");
    let host_uid = s.host_uid.expect("host uid");
    let id = s.id.to_string();
    assert!(workers_of(host_uid, None).is_empty());
    let stream = ready_download(&d, &id, "/work/big");
    assert_capless_worker(host_uid, None);
    drop(stream);
    assert!(
        sandboxd_tests::eventually(Duration::from_secs(30), || {
            workers_of(host_uid, None).is_empty()
        }),
        "the worker ends with its transfer"
    );

    // A running sandbox: the worker joins its namespaces.
    let s = d.create(json!({ "command": ["sh", "-c", format!("{big}; sleep 600")] }));
    let id = s.id.to_string();
    let host_uid = s.host_uid.expect("host uid");
    assert!(sandboxd_tests::eventually(Duration::from_secs(10), || {
        let (status, body) = answer(get(&d, &id, "files", "path=/work"));
        status == 200 && String::from_utf8_lossy(&body).contains("33554432")
    }));
    let init = s.init_pid;
    assert!(init.is_some());
    // (The workers of the listings above end with their transfers.)
    assert!(sandboxd_tests::eventually(Duration::from_secs(10), || {
        workers_of(host_uid, init).is_empty()
    }));
    let stream = ready_download(&d, &id, "/work/big");
    assert_capless_worker(host_uid, init);
    drop(stream);
    assert!(sandboxd_tests::eventually(Duration::from_secs(30), || {
        workers_of(host_uid, init).is_empty()
    }));
}

fn a_running_sandbox_is_reached_through_its_own_root(mode: Mode) {
    // Without a disk cap, /tmp is a tmpfs (with one, it lives on the sandbox's own filesystem
    // and stays until delete, like /work).
    let d = Daemon::start_with(mode, &["--default-disk", "0"]);
    // The running sandbox's tmpfs /tmp is its own: the API sees it while it runs.
    let s = d.create(json!({
        "command": ["sh", "-c", "echo running > /tmp/state; echo $$ > /work/pid; \
                    while [ ! -e /work/stop ]; do sleep 0.05; done; cat /work/stop"],
    }));
    let id = s.id.to_string();
    assert!(sandboxd_tests::eventually(Duration::from_secs(10), || {
        answer(get(&d, &id, "files", "path=/work/pid")).0 == 200
    }));
    assert_eq!(
        expect(
            get(&d, &id, "files", "path=/tmp/state"),
            200,
            "the running /tmp"
        ),
        b"running\n"
    );
    let listing: Value =
        serde_json::from_slice(&expect(get(&d, &id, "files", "path=/tmp"), 200, "listing"))
            .unwrap();
    assert!(listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "state"));
    // /proc in there is the sandbox's: refused like every pseudo file system.
    bad_request(
        get(&d, &id, "files", "path=/proc/1/environ"),
        "proc while running",
    );
    // A write while it runs is seen at once inside.
    expect(
        put(&d, &id, "files", "path=/work/stop", b"bye\n".to_vec()),
        204,
        "PUT stop",
    );
    let done = d.wait(&id);
    assert_eq!(done.exit_code, Some(0), "{mode:?}");
    assert_eq!(String::from_utf8_lossy(&d.logs(&id, "")), "bye\n");
    // After the exit its tmpfs is gone; /work stays.
    expect(
        get(&d, &id, "files", "path=/tmp/state"),
        404,
        "the exited /tmp",
    );
    expect(
        get(&d, &id, "files", "path=/work/stop"),
        200,
        "the exited /work",
    );
}
both_modes!(a_running_sandbox_is_reached_through_its_own_root);

#[test]
fn a_created_sandbox_and_its_files_survive_a_daemon_restart() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    let s = create_unstarted(&d, "cat /work/in.txt");
    let id = s.id.to_string();
    expect(
        put(&d, &id, "files", "path=/work/in.txt", b"kept\n".to_vec()),
        204,
        "PUT",
    );
    d.restart();
    // Still created, its directory kept (not an orphan to remove), still startable.
    assert_eq!(d.sandbox(&id).state, SandboxState::Created);
    assert_eq!(
        expect(
            get(&d, &id, "files", "path=/work/in.txt"),
            200,
            "GET after restart"
        ),
        b"kept\n"
    );
    let started = d.start_after_transfer(&id);
    assert_eq!(started.status, 200, "start: {}\n{}", started.body, d.log());
    let done = d.wait(&id);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(d.logs(&id, ""), b"kept\n");
}

/// A transfer that builds a created sandbox's root holds it: a start meanwhile answers 409 and
/// leaves the sandbox `created` (rather than mounting its root a second time), and succeeds once
/// the transfer has ended.
#[test]
fn a_start_waits_until_no_transfer_holds_the_created_root() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let s = create_unstarted(&d, "test -s /work/big && echo started");
    let id = s.id.to_string();
    expect(
        put(&d, &id, "files", "path=/work/big", vec![7u8; 32 << 20]),
        204,
        "upload",
    );
    let mut stream = stalled_download(&d, &id, "/work/big");
    // The answer's head has come: the worker runs (and holds the root) and now stalls on us.
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let resp = d.post(&format!("/v1/sandboxes/{id}/start"), &json!({}));
    let (status, body) = answer(resp);
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(d.sandbox(&id).state, SandboxState::Created);
    drop(stream);
    assert!(
        sandboxd_tests::eventually(Duration::from_secs(30), || {
            d.post(&format!("/v1/sandboxes/{id}/start"), &json!({}))
                .status
                == 200
        }),
        "the start succeeds once the transfer has ended"
    );
    let done = d.wait(&id);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(String::from_utf8_lossy(&d.logs(&id, "")), "started\n");
}
