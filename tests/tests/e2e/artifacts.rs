//! What leaves a sandbox: a file or tree a sandbox made, downloaded over the API and by `sbx cp`
//! run as root on the host, never becomes a setuid, setgid or sticky file, a device node, a FIFO
//! or a socket on the host (issue 12).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sandboxd_tests::{both_modes, Daemon, Mode};

/// The script a hostile sandbox runs: privileged-looking files and special files in `/work/out`.
const PLANT: &str = "set -e
mkdir -p /work/out/sub /work/out/sticky
printf '#!/bin/sh\\nid\\n' > /work/out/suid
chmod 4755 /work/out/suid
printf 'x' > /work/out/sub/sgid
chmod 2755 /work/out/sub/sgid
chmod 1777 /work/out/sticky
chmod 2775 /work/out/sub
mkfifo /work/out/fifo
# Device nodes cannot be made in a user namespace: the attempt must fail, and nothing is left.
! mknod /work/out/null c 1 3 2>/dev/null
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"/work/out/sock\")'
stat -c '%n %a %F' /work/out/suid /work/out/sub/sgid /work/out/sticky /work/out/fifo /work/out/sock
";

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn artifacts_lose_setuid_bits_and_special_files(mode: Mode) {
    let d = Daemon::start(mode);
    let (sandbox, out) = d.run(&["sh", "-c", PLANT]);
    assert_eq!(sandbox.exit_code, Some(0), "{out}");
    // The sandbox really made them (else the test proves nothing).
    assert!(out.contains("/work/out/suid 4755 regular file"), "{out}");
    assert!(out.contains("/work/out/sub/sgid 2755"), "{out}");
    assert!(out.contains("/work/out/sticky 1777 directory"), "{out}");
    assert!(out.contains("/work/out/fifo 644 fifo"), "{out}");
    assert!(out.contains("socket"), "{out}");
    let id = sandbox.id.to_string();

    // The helper's stream: only permission bits in the headers, no special entry at all.
    let reply = d.get(&format!("/v1/sandboxes/{id}/archive?path=/work/out"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut archive = tar::Archive::new(&reply.bytes[..]);
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        let header = entry.header();
        assert_eq!(
            header.mode().unwrap() & 0o7000,
            0,
            "{name} keeps a setuid, setgid or sticky bit in the stream"
        );
        assert!(
            matches!(
                header.entry_type(),
                tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink
            ),
            "{name} is {:?}",
            header.entry_type()
        );
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["sticky", "sub", "sub/sgid", "suid"], "{names:?}");
    // A single file: the mode header carries permission bits only.
    let reply = d.get(&format!("/v1/sandboxes/{id}/files?path=/work/out/suid"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sandbox-file-mode"), Some("0755"));

    // `sbx cp` as root (this test runs as root): nothing privileged or special on the host.
    let local = std::env::temp_dir().join(format!(
        "sandboxd-artifacts-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&local).unwrap();
    let tree = local.join("out");
    let cp = |from: &str, to: &Path| {
        let out = d.sbx(&["cp", &format!("{id}:{from}"), to.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "sbx cp {from}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cp("/work/out", &tree);
    cp("/work/out/suid", &local.join("single"));
    assert_eq!(mode_of(&tree.join("suid")), 0o755);
    assert_eq!(mode_of(&tree.join("sub/sgid")), 0o755);
    assert_eq!(mode_of(&tree.join("sub")), 0o775);
    assert_eq!(mode_of(&tree.join("sticky")), 0o777);
    assert_eq!(mode_of(&local.join("single")), 0o755);
    assert_eq!(
        std::fs::metadata(tree.join("suid")).unwrap().uid(),
        0,
        "root's own file"
    );
    for special in ["fifo", "sock", "null"] {
        assert!(
            std::fs::symlink_metadata(tree.join(special)).is_err(),
            "{special} came out"
        );
    }
    // Whatever else the walk finds: regular files and directories only, no privileged bit.
    let mut pending = vec![tree.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            assert!(
                !ft.is_fifo() && !ft.is_socket() && !ft.is_char_device() && !ft.is_block_device(),
                "{} is special",
                path.display()
            );
            assert_eq!(meta.mode() & 0o7000, 0, "{}", path.display());
            if ft.is_dir() {
                pending.push(path);
            }
        }
    }
    std::fs::remove_dir_all(&local).unwrap();
}
both_modes!(artifacts_lose_setuid_bits_and_special_files);
