//! Images and image root filesystems, end to end: the test builds its own small images from host
//! binaries (a root filesystem tarball and a docker-archive with two layers and whiteouts),
//! imports them over real HTTP, runs sandboxes from them, and checks from inside and outside.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sandboxd_api::{Image, Sandbox};
use sandboxd_tests::{both_modes, eventually, require_e2e, Daemon, Mode};
use serde_json::{json, Value};

/// Host binaries the test images carry (with the libraries `ldd` names).
const BINARIES: &[&str] = &[
    "/usr/bin/dash",
    "/usr/bin/cat",
    "/usr/bin/ls",
    "/usr/bin/stat",
    "/usr/bin/dd",
    "/usr/bin/rm",
    "/usr/bin/mkdir",
    "/usr/bin/true",
    "/usr/bin/id",
];

/// A scratch directory for building archives, removed on drop.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sandboxd-e2e-img-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// A root filesystem made of host binaries: /bin/sh and a few tools, their libraries, an /etc
/// with root and a user 1000 who owns /home/user.
pub(crate) fn build_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for bin in BINARIES {
        let name = Path::new(bin).file_name().unwrap();
        std::fs::copy(bin, dir.join("bin").join(name)).unwrap();
        let out = Command::new("ldd").arg(bin).output().unwrap();
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let target = dir.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(lib, &target).unwrap();
        }
    }
    std::os::unix::fs::symlink("dash", dir.join("bin/sh")).unwrap();
    write(
        &dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    );
    write(&dir.join("etc/group"), "root:x:0:\nuser:x:1000:\n");
    write(&dir.join("etc/image-marker"), "from the image\n");
    write(&dir.join("etc/remove-me"), "layer 1\n");
    write(&dir.join("opaque/old-file"), "layer 1\n");
    write(&dir.join("home/user/notes"), "mine\n");
    std::fs::create_dir_all(dir.join("root")).unwrap();
    for p in ["home/user", "home/user/notes"] {
        nix::unistd::chown(&dir.join(p), Some(1000.into()), Some(1000.into())).unwrap();
    }
}

pub(crate) fn tar_dir(dir: &Path, out: &Path) {
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg("."));
}

/// `rootfs.tar.zst`: the root filesystem as one zstd-compressed tarball.
fn rootfs_archive(s: &Scratch) -> PathBuf {
    build_rootfs(&s.path("rootfs"));
    tar_dir(&s.path("rootfs"), &s.path("rootfs.tar"));
    run(Command::new("zstd")
        .args(["-q", "-f"])
        .arg(s.path("rootfs.tar"))
        .arg("-o")
        .arg(s.path("rootfs.tar.zst")));
    s.path("rootfs.tar.zst")
}

/// A docker-archive (`docker save` layout: layers, config, manifest.json last) with two layers;
/// the second (gzip-compressed) removes `/etc/remove-me`, makes `/opaque` opaque and adds files.
fn docker_archive(s: &Scratch) -> PathBuf {
    build_rootfs(&s.path("rootfs"));
    let outer = s.path("outer");
    std::fs::create_dir_all(outer.join("l1")).unwrap();
    std::fs::create_dir_all(outer.join("l2")).unwrap();
    tar_dir(&s.path("rootfs"), &outer.join("l1/layer.tar"));
    let l2 = s.path("layer2");
    write(&l2.join("etc/.wh.remove-me"), "");
    write(&l2.join("etc/layer2"), "layer 2\n");
    write(&l2.join("opaque/.wh..wh..opq"), "");
    write(&l2.join("opaque/new-file"), "layer 2\n");
    tar_dir(&l2, &outer.join("l2/layer.tar"));
    run(Command::new("gzip").arg(outer.join("l2/layer.tar")));
    write(
        &outer.join("config.json"),
        r#"{"architecture":"amd64","os":"linux"}"#,
    );
    write(
        &outer.join("manifest.json"),
        r#"[{"Config":"config.json","RepoTags":["e2e:layers"],"Layers":["l1/layer.tar","l2/layer.tar.gz"]}]"#,
    );
    run(Command::new("tar")
        .arg("-C")
        .arg(&outer)
        .arg("-cf")
        .arg(s.path("docker.tar"))
        .args(["l1", "l2", "config.json", "manifest.json"]));
    s.path("docker.tar")
}

pub(crate) fn import(d: &Daemon, name: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = d
        .request("POST", "/v1/images")
        .query("name", name)
        .header("content-type", "application/x-tar")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send();
    let body = serde_json::from_slice(&resp.bytes).unwrap_or(Value::Null);
    (resp.status, body)
}

pub(crate) fn import_ok(d: &Daemon, name: &str, file: &Path) -> Image {
    let (status, body) = import(d, name, std::fs::read(file).unwrap());
    assert_eq!(status, 201, "import {name}: {body}\n{}", d.log());
    serde_json::from_value(body).unwrap()
}

fn image_dirs(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn sh_in(d: &Daemon, image: &str, script: &str) -> (Sandbox, String) {
    d.run_spec(json!({"command": ["sh", "-c", script], "rootfs": {"image": image}}))
}

/// Every path below `dir` (not following links).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

#[test]
fn images_import_run_copy_on_write_and_refuse_deletion_in_use() {
    require_e2e!();
    let s = Scratch::new();
    let archive = rootfs_archive(&s);
    let d = Daemon::start(Mode::Privileged);

    let base = import_ok(&d, "base", &archive);
    assert_eq!((base.format.as_str(), base.layers), ("rootfs", 1));
    assert!(base.size_bytes > 100_000, "{base:?}");
    assert_eq!(base.in_use_by, 0);
    // The same content under another name is stored once.
    let again = import_ok(&d, "base-again", &archive);
    assert_eq!(again.digest, base.digest);
    let stored: Vec<String> = image_dirs(&d)
        .into_iter()
        .filter(|n| n.len() == 64)
        .collect();
    assert_eq!(stored, vec![hex(&base.digest).to_owned()]);
    let (status, _) = import(&d, "base", std::fs::read(&archive).unwrap());
    assert_eq!(status, 409, "a second image of the same name");

    // Inside: the image's files with the image's owners, and root may change them.
    let (first, out) = sh_in(
        &d,
        "base",
        "stat -c '%u:%g %n' /etc/passwd /home/user/notes && cat /etc/image-marker \
         && echo changed >> /etc/passwd && cat /etc/passwd && echo new > /etc/added && ls /",
    );
    assert_eq!(first.exit_code, Some(0), "{out}");
    assert!(out.contains("0:0 /etc/passwd"), "{out}");
    assert!(out.contains("1000:1000 /home/user/notes"), "{out}");
    assert!(out.contains("from the image"), "{out}");
    assert!(out.contains("/bin/sh\nchanged\n"), "{out}");
    // It is the image's root, not the host's: no host /usr.
    assert!(!out.contains("usr"), "{out}");

    // The change lives in that sandbox's upper layer, owned by its root; the image is intact.
    let rootfs = d
        .state_dir
        .join("images")
        .join(hex(&base.digest))
        .join("rootfs");
    let image_passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(!image_passwd.contains("changed"));
    assert!(!rootfs.join("etc/added").exists());
    let owner = std::fs::metadata(rootfs.join("etc/passwd")).unwrap().uid();
    assert!(
        owner >= 300_000_000,
        "stored files carry shifted owners, got {owner}"
    );
    assert_eq!(
        std::fs::read_to_string(d.sandbox_dir(&first.id.to_string()).join("image.digest")).unwrap(),
        hex(&base.digest)
    );
    let upper = d.sandbox_dir(&first.id.to_string()).join("private/upper");
    let upper_passwd = std::fs::metadata(upper.join("etc/passwd")).unwrap();
    assert_eq!(Some(upper_passwd.uid()), first.host_uid);
    // Untouched files are shared with the image, not copied.
    assert!(!upper.join("bin").exists());

    // A second sandbox sees the image as it is.
    let (second, out) = sh_in(&d, "base", "cat /etc/passwd; ls /etc");
    assert_eq!(second.exit_code, Some(0), "{out}");
    assert!(!out.contains("changed") && !out.contains("added"), "{out}");

    // Fifty sandboxes share the image's files: none of them holds a copy.
    let mut many = Vec::new();
    for _ in 0..50 {
        let (sb, out) = sh_in(
            &d,
            "base",
            "cat /etc/image-marker > /dev/null && ls /bin > /dev/null",
        );
        assert_eq!(sb.exit_code, Some(0), "{out}");
        let upper = d.sandbox_dir(&sb.id.to_string()).join("private/upper");
        let copied: Vec<_> = walk(&upper)
            .into_iter()
            .filter(|p| p.is_file() && !p.starts_with(upper.join("etc")))
            .collect();
        assert!(copied.is_empty(), "{copied:?}");
        many.push(sb.id);
    }
    for id in many {
        assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    }

    // Read-only on request.
    let (ro, out) = d.run_spec(json!({
        "command": ["sh", "-c", "echo x > /etc/x"],
        "rootfs": {"image": "base", "readonly": true}
    }));
    assert_ne!(ro.exit_code, Some(0));
    assert!(out.contains("Read-only file system"), "{out}");

    // In use by the three sandboxes until they are deleted.
    let got: Image = d.get("/v1/images/base").parse();
    assert_eq!(got.in_use_by, 3);
    let resp = d.delete("/v1/images/base");
    assert_eq!(resp.status, 409);
    let body: Value = resp.json();
    assert_eq!(body["error"]["code"], "image_in_use");
    for sb in [&first, &second, &ro] {
        assert_eq!(d.delete(&format!("/v1/sandboxes/{}", sb.id)).status, 204);
    }
    assert_eq!(d.delete("/v1/images/base").status, 204);
    assert_eq!(d.get("/v1/images/base").status, 404);
    // The other name still holds the content; once it goes, so do the files.
    assert!(rootfs.exists());
    assert_eq!(d.delete("/v1/images/base-again").status, 204);
    assert!(eventually(Duration::from_secs(10), || !image_dirs(&d)
        .iter()
        .any(|n| n.contains(hex(&base.digest)))));
    // Unknown images are refused before anything starts.
    let resp = d.post(
        "/v1/sandboxes",
        &json!({"command": ["true"], "rootfs": {"image": "base"}}),
    );
    assert_eq!(resp.status, 422);
}

#[test]
fn docker_archive_layers_apply_in_order_with_whiteouts() {
    require_e2e!();
    let s = Scratch::new();
    let archive = docker_archive(&s);
    let d = Daemon::start(Mode::Privileged);
    let image = import_ok(&d, "layered", &archive);
    assert_eq!((image.format.as_str(), image.layers), ("docker-archive", 2));
    let (sb, out) = sh_in(&d, "layered", "ls /etc /opaque");
    assert_eq!(sb.exit_code, Some(0), "{out}");
    assert!(out.contains("layer2") && out.contains("new-file"), "{out}");
    assert!(!out.contains("remove-me"), "whiteout not applied: {out}");
    assert!(
        !out.contains("old-file"),
        "opaque directory not applied: {out}"
    );
    assert!(!out.contains(".wh."), "{out}");
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Move `file` into `blobs/sha256/<its digest>` of an OCI layout; returns the digest.
fn blob(layout: &Path, file: &Path) -> (String, u64) {
    let digest = sha256_of(file);
    let size = std::fs::metadata(file).unwrap().len();
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::rename(file, dir.join(&digest)).unwrap();
    (format!("sha256:{digest}"), size)
}

/// An OCI image layout archive, itself gzip-compressed: layer 1 gzip, layer 2 zstd (the same
/// layers as the docker-archive).
fn oci_archive(s: &Scratch) -> PathBuf {
    build_rootfs(&s.path("rootfs"));
    let layout = s.path("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tar_dir(&s.path("rootfs"), &s.path("l1.tar"));
    run(Command::new("gzip").arg(s.path("l1.tar")));
    let l2 = s.path("layer2");
    write(&l2.join("etc/.wh.remove-me"), "");
    write(&l2.join("etc/layer2"), "layer 2\n");
    write(&l2.join("opaque/.wh..wh..opq"), "");
    write(&l2.join("opaque/new-file"), "layer 2\n");
    tar_dir(&l2, &s.path("l2.tar"));
    run(Command::new("zstd")
        .args(["-q", "--rm"])
        .arg(s.path("l2.tar"))
        .arg("-o")
        .arg(s.path("l2.tar.zst")));
    let (d1, n1) = blob(&layout, &s.path("l1.tar.gz"));
    let (d2, n2) = blob(&layout, &s.path("l2.tar.zst"));
    write(
        &s.path("config.json"),
        r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let (dc, nc) = blob(&layout, &s.path("config.json"));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": nc},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d1, "size": n1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": d2, "size": n2},
        ]
    });
    write(&s.path("manifest.json"), &manifest.to_string());
    let (dm, nm) = blob(&layout, &s.path("manifest.json"));
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": dm, "size": nm,
            "platform": {"architecture": "amd64", "os": "linux"}
        }]
    });
    write(&layout.join("index.json"), &index.to_string());
    write(
        &layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-czf")
        .arg(s.path("oci.tar.gz"))
        .arg("."));
    s.path("oci.tar.gz")
}

#[test]
fn oci_layout_archives_apply_their_layers_too() {
    require_e2e!();
    let s = Scratch::new();
    let archive = oci_archive(&s);
    let d = Daemon::start(Mode::Privileged);
    let image = import_ok(&d, "oci", &archive);
    assert_eq!((image.format.as_str(), image.layers), ("oci-layout", 2));
    let (sb, out) = sh_in(
        &d,
        "oci",
        "ls /etc /opaque && stat -c '%u' /home/user/notes",
    );
    assert_eq!(sb.exit_code, Some(0), "{out}");
    assert!(out.contains("layer2") && out.contains("new-file"), "{out}");
    assert!(
        !out.contains("remove-me") && !out.contains("old-file"),
        "{out}"
    );
    assert!(out.contains("1000"), "{out}");
    // The decompressed copy of the archive is not kept.
    let rootfs_parent = d.state_dir.join("images").join(hex(&image.digest));
    assert!(!rootfs_parent.join("archive.tar").exists());
}

/// A ustar member with a raw name and link target (GNU tar will not write `..` names).
fn member(name: &str, kind: u8, mode: u32, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}\0", width = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn archive(members: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = members.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn hostile_archives_are_refused_and_the_host_is_unchanged() {
    require_e2e!();
    let d = Daemon::start_with(Mode::Privileged, &["--max-image-bytes", "16M"]);
    let canary = std::env::temp_dir().join(format!("sbx-escape-{}", uuid::Uuid::new_v4().simple()));
    let canary_name = canary.to_str().unwrap().trim_start_matches('/').to_owned();
    let refused = [
        (
            "dotdot",
            archive(&[member(
                &format!("../../../../../../{canary_name}"),
                b'0',
                0o644,
                "",
                b"x",
            )]),
        ),
        (
            "absolute",
            archive(&[member(&format!("/{canary_name}"), b'0', 0o644, "", b"x")]),
        ),
        (
            "hardlink-out",
            archive(&[member("shadow", b'1', 0o644, "../../../../etc/shadow", b"")]),
        ),
        (
            "hardlink-absolute",
            archive(&[member("shadow", b'1', 0o644, "/etc/shadow", b"")]),
        ),
    ];
    for (name, body) in refused {
        let (status, body) = import(&d, name, body);
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["code"], "bad_image", "{name}: {body}");
        assert_eq!(d.get(&format!("/v1/images/{name}")).status, 404);
    }
    // A link planted to the host's /tmp, then a file through it: lands inside the image.
    let through_link = archive(&[
        member("tmp", b'5', 0o1777, "", b""),
        member("escape", b'2', 0o777, "/tmp", b""),
        member(
            &format!("escape/{}", canary.file_name().unwrap().to_str().unwrap()),
            b'0',
            0o644,
            "",
            b"x",
        ),
        // A device node is left out, setuid and setgid bits are dropped.
        member("dev-null", b'3', 0o666, "", b""),
        member("suid", b'0', 0o6755, "", b"#!/bin/sh\n"),
    ]);
    let (status, body) = import(&d, "through-link", through_link);
    assert_eq!(status, 201, "{body}");
    assert!(!canary.exists(), "an archive wrote to the host");
    let digest = body["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let rootfs = d.state_dir.join("images").join(&digest).join("rootfs");
    assert!(rootfs
        .join("tmp")
        .join(canary.file_name().unwrap())
        .exists());
    assert!(!rootfs.join("dev-null").exists());
    assert_eq!(
        std::fs::metadata(rootfs.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    // A decompression bomb stops at the cap, and nothing of it stays.
    let s = Scratch::new();
    std::fs::write(s.path("zeros"), vec![0u8; 64 << 20]).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&s.0)
        .arg("-czf")
        .arg(s.path("bomb.tar.gz"))
        .arg("zeros"));
    let bomb = std::fs::read(s.path("bomb.tar.gz")).unwrap();
    assert!(bomb.len() < 1 << 20);
    let (status, body) = import(&d, "bomb", bomb);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "image_too_large");
    assert!(eventually(Duration::from_secs(5), || image_dirs(&d)
        .iter()
        .all(|n| !n.starts_with('.'))));
    // Uploads are gone too.
    assert_eq!(
        std::fs::read_dir(d.state_dir.join("uploads"))
            .unwrap()
            .count(),
        0
    );
}

/// Mounts (from /proc/self/mountinfo) below a directory.
fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(dir)))
        .map(str::to_owned)
        .collect()
}

/// Loop devices backed by a file below a directory.
fn loops_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|f| f.starts_with(dir))
        .collect()
}

#[test]
fn disk_limit_gives_enospc_inside_and_leaves_nothing_behind() {
    require_e2e!();
    let s = Scratch::new();
    let archive = rootfs_archive(&s);
    let mut d = Daemon::start(Mode::Privileged);
    import_ok(&d, "base", &archive);
    let fill = "dd if=/dev/zero of=$0 bs=1M count=64 2>&1; echo status=$?";
    for (rootfs, target) in [
        (Some("base"), "/work/big"),
        (Some("base"), "/tmp/big"),
        (Some("base"), "/big-in-the-upper-layer"),
        (None, "/work/big"),
    ] {
        let mut spec = json!({
            "command": ["sh", "-c", fill, target],
            "limits": {"disk_bytes": 32 << 20}
        });
        if let Some(image) = rootfs {
            spec["rootfs"] = json!({"image": image});
        }
        let (sb, out) = d.run_spec(spec);
        assert!(out.contains("No space left on device"), "{target}: {out}");
        assert!(!out.contains("status=0"), "{target}: {out}");
        assert_eq!(sb.spec.limits.disk_bytes, Some(32 << 20));
    }
    // Files stay until delete (after the exit); then the mount and the loop device go.
    let sb = d.create(json!({
        "command": ["sh", "-c", "echo kept > /work/artifact"],
        "rootfs": {"image": "base"},
        "limits": {"disk_bytes": 32 << 20}
    }));
    let id = sb.id.to_string();
    d.wait(&id);
    let dir = d.sandbox_dir(&id);
    assert_eq!(
        std::fs::read_to_string(dir.join("private/work/artifact")).unwrap(),
        "kept\n"
    );
    // Its stats count what it wrote there.
    let stats: Value = d.get(&format!("/v1/sandboxes/{id}/stats")).json();
    assert!(stats["disk_bytes"].as_u64().unwrap() >= 4096, "{stats}");
    assert_eq!(mounts_below(&dir).len(), 1, "{:?}", mounts_below(&dir));
    assert_eq!(loops_below(&dir).len(), 1);
    // A daemon crash and restart loses nothing and leaves nothing once the sandbox is deleted.
    d.kill9();
    d.restart();
    assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    assert!(mounts_below(&dir).is_empty());
    assert!(eventually(Duration::from_secs(5), || loops_below(&dir).is_empty()));
    // Every sandbox gone: nothing mounted below the state directory at all.
    for item in d.get("/v1/sandboxes").json()["items"].as_array().unwrap() {
        let id = item["id"].as_str().unwrap();
        assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    }
    // Only the network hub stays mounted while the helper runs (see tests/tests/e2e/network.rs).
    let sandbox_mounts: Vec<_> = mounts_below(&d.state_dir)
        .into_iter()
        .filter(|m| !m.contains("/helper/hub.net "))
        .collect();
    assert!(sandbox_mounts.is_empty(), "{sandbox_mounts:?}");
    assert!(eventually(Duration::from_secs(5), || loops_below(
        &d.state_dir
    )
    .is_empty()));
}

#[test]
fn rootless_images_work_and_disk_limits_are_422() {
    require_e2e!();
    let s = Scratch::new();
    let archive = rootfs_archive(&s);
    let d = Daemon::start(Mode::Rootless);
    import_ok(&d, "base", &archive);
    let (sb, out) = sh_in(
        &d,
        "base",
        "stat -c '%u %n' /etc/passwd && echo changed >> /etc/passwd && cat /etc/passwd",
    );
    assert_eq!(sb.exit_code, Some(0), "{out}");
    assert!(
        out.contains("0 /etc/passwd") && out.contains("changed"),
        "{out}"
    );
    let resp = d.post(
        "/v1/sandboxes",
        &json!({"command": ["true"], "rootfs": {"image": "base"}, "limits": {"disk_bytes": 32 << 20}}),
    );
    assert_eq!(resp.status, 422);
    let body: Value = resp.json();
    assert_eq!(body["error"]["code"], "limit_unenforceable");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rootless"));
}

#[test]
fn cli_imports_lists_runs_and_removes_images() {
    require_e2e!();
    let s = Scratch::new();
    let archive = rootfs_archive(&s);
    let d = Daemon::start(Mode::Privileged);
    let file = archive.to_str().unwrap();
    let out = d.sbx(&["image", "import", file, "--name", "cli-image"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.sbx(&["image", "ls"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-image"));
    let out = d.sbx(&[
        "run",
        "--rm",
        "--image",
        "cli-image",
        "--",
        "cat",
        "/etc/image-marker",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the image\n");
    let out = d.sbx(&["image", "rm", "cli-image"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.sbx(&["image", "ls"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("cli-image"));
}

fn file_of(d: &Daemon, id: &str, path: &str) -> (u16, String) {
    let resp = d.get(&format!("/v1/sandboxes/{id}/files?path={path}"));
    let status = resp.status;
    (status, resp.body)
}

/// Files in and out of a sandbox whose root is an image (with a disk limit): before start the
/// file worker builds the same overlay root init gets, after exit it sees the upper layer's
/// changes, and the image itself never changes.
fn files_go_in_and_out_of_image_roots_before_start_and_after_exit(mode: Mode) {
    let s = Scratch::new();
    let archive = rootfs_archive(&s);
    let d = Daemon::start(mode);
    let image = import_ok(&d, "base", &archive);
    let mut spec = json!({
        "command": ["sh", "-c",
            "cat /work/in.txt > /work/out.txt && echo changed >> /etc/image-marker"],
        "rootfs": {"image": "base"},
        "start": false,
    });
    if mode == Mode::Privileged {
        spec["limits"] = json!({"disk_bytes": 32 << 20});
    }
    let sb = d.create(spec);
    let id = sb.id.to_string();
    // Before start: the image's files, seen through the sandbox's own root.
    assert_eq!(
        file_of(&d, &id, "/etc/image-marker"),
        (200, "from the image\n".to_owned()),
        "{mode:?}"
    );
    let resp = d
        .request(
            "PUT",
            &format!("/v1/sandboxes/{id}/files?path=/work/in.txt"),
        )
        .body("hello from the host\n")
        .send();
    assert_eq!(resp.status, 204, "{mode:?}: {}", resp.body);
    // Image files are not the API's to change: only /work is.
    let resp = d
        .request("PUT", &format!("/v1/sandboxes/{id}/files?path=/etc/passwd"))
        .body("x")
        .send();
    assert_eq!(resp.status, 400, "{mode:?}");
    let resp = d.start_after_transfer(&id);
    assert_eq!(resp.status, 200, "{mode:?}");
    let done = d.wait(&id);
    assert_eq!(done.exit_code, Some(0), "{mode:?}: {}", d.log());
    // After exit: the command's output in /work, and its change in the upper layer.
    assert_eq!(
        file_of(&d, &id, "/work/out.txt"),
        (200, "hello from the host\n".to_owned()),
        "{mode:?}"
    );
    assert_eq!(
        file_of(&d, &id, "/etc/image-marker"),
        (200, "from the image\nchanged\n".to_owned()),
        "{mode:?}"
    );
    // The image is unchanged, for the next sandbox and on disk.
    let (_, out) = sh_in(&d, "base", "cat /etc/image-marker");
    assert_eq!(out, "from the image\n", "{mode:?}");
    let stored = d
        .state_dir
        .join("images")
        .join(hex(&image.digest))
        .join("rootfs/etc/image-marker");
    assert_eq!(std::fs::read_to_string(stored).unwrap(), "from the image\n");
    assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
}
both_modes!(files_go_in_and_out_of_image_roots_before_start_and_after_exit);
