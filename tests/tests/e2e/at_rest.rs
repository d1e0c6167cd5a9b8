//! Files at rest (issue 12): after a daemon has run sandboxes, execs, file transfers and an image
//! import, nothing in its state directory is readable or writable by other users, and the files
//! the helper hands the daemon belong to the daemon's real primary group.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandboxd_tests::{both_modes, eventually, Daemon, Mode};
use serde_json::{json, Value};

/// A small image: a root filesystem tarball with a few files and directories.
fn image_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, data) in [
        ("etc/", 0o755, &b""[..]),
        ("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
        ("bin/", 0o755, b""),
        ("bin/tool", 0o755, b"#!/bin/sh\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Exercise the daemon: a finished and a running sandbox, an exec, transfers both ways, an image.
fn exercise(d: &Daemon) -> (String, String) {
    let (done, out) = d.run(&["sh", "-c", "echo out; echo err >&2; echo data > /work/made"]);
    assert_eq!(done.exit_code, Some(0), "{out}");
    let done = done.id.to_string();
    let running = d.start_sandbox(&["sleep", "300"]);
    let exec = d.post(
        &format!("/v1/sandboxes/{running}/execs"),
        &json!({"command": ["sh", "-c", "echo from the exec; touch /work/exec-was-here"]}),
    );
    assert_eq!(exec.status, 201, "{}", exec.body);
    let exec: Value = exec.json();
    let exec_id = exec["id"].as_str().unwrap().to_owned();
    let logs = d.get(&format!(
        "/v1/sandboxes/{running}/execs/{exec_id}/logs?follow=true"
    ));
    assert!(logs.body.contains("from the exec"), "{}", logs.body);
    let put = d
        .request(
            "PUT",
            &format!("/v1/sandboxes/{running}/files?path=/work/put&mode=0644"),
        )
        .body(b"content".to_vec())
        .send();
    assert!(put.status < 300, "{}", put.body);
    let get = d.get(&format!("/v1/sandboxes/{done}/archive?path=/work"));
    assert_eq!(get.status, 200, "{}", get.body);
    let import = d
        .request("POST", "/v1/images")
        .query("name", "at-rest")
        .header("content-type", "application/x-tar")
        .body(image_tar())
        .timeout(Duration::from_secs(120))
        .send();
    assert_eq!(import.status, 201, "{}", import.body);
    (done, running)
}

/// Whether "other" (any user but the owner and the group) may pass through `mode`'s directory.
fn other_may_traverse(mode: u32) -> bool {
    mode & 0o001 != 0
}

/// Every entry below `dir` that "other" can reach (each directory above it lets "other" through)
/// and may read or write, with its mode. Links are not followed; mounts are walked into.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // gone meanwhile
            };
            let mode = meta.mode() & 0o7777;
            if meta.file_type().is_symlink() {
                continue; // a link's own mode means nothing
            }
            if mode & 0o006 != 0 && !allowed(&path, &meta) {
                found.push((path.clone(), mode));
            }
            if meta.is_dir() && other_may_traverse(mode) {
                pending.push(path);
            }
        }
    }
    found
}

/// The justified exceptions: none so far.
///
/// Not exceptions, by construction: directories that are `o+x` only (`<state>` 0711,
/// `sandboxes/` and each `<uuid>/` 0711, `images/` 0711) let a sandbox's own host uid (privileged
/// mode: "other" to the daemon and the helper) reach its work directory and image layers by
/// name; they list nothing. What a sandbox itself made (below `private/`, 0710 with the sandbox's
/// group, or in an image's `<digest>/`, 0700) has the sandbox's modes and is unreachable for
/// "other", so the walk does not enter it.
fn allowed(_path: &Path, _meta: &std::fs::Metadata) -> bool {
    false
}

fn state_directory_is_private(mode: Mode) {
    let d = Daemon::start(mode);
    let (done, running) = exercise(&d);
    let found = open_to_others(&d.state_dir);
    assert!(
        found.is_empty(),
        "readable or writable by other users:\n{}",
        found
            .iter()
            .map(|(p, m)| format!("  {:04o} {}", m, p.display()))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The walk saw the sandbox files, not an empty directory.
    assert!(d.sandbox_dir(&done).join("output.log").exists());
    assert!(d.sandbox_dir(&running).join("monitor.sock").exists());
    let kill = d.post(&format!("/v1/sandboxes/{running}/kill"), &json!({}));
    assert!(kill.status < 300, "{}", kill.body);
    d.wait(&running);
}
both_modes!(state_directory_is_private);

/// The files the helper hands the daemon are in the daemon's primary group, not in the group
/// whose number equals the daemon's uid.
fn daemon_files_belong_to_the_daemons_group(mode: Mode) {
    let d = Daemon::start(mode);
    let user = nix::unistd::User::from_uid(d.uid.into())
        .unwrap()
        .expect("the daemon's user");
    let gid = user.gid.as_raw();
    // The harness makes them differ, else this test could not tell them apart.
    assert_ne!(gid, d.uid, "the daemon's uid and gid numbers are equal");
    let (done, running) = exercise(&d);
    let kill = d.post(&format!("/v1/sandboxes/{running}/kill"), &json!({}));
    assert!(kill.status < 300, "{}", kill.body);
    d.wait(&running);
    let mut files = vec![d.state_dir.join("helper/helper.sock")];
    for id in [&done, &running] {
        let dir = d.sandbox_dir(id);
        assert!(
            eventually(Duration::from_secs(10), || dir.join("status.json").exists()),
            "no status.json in {}",
            dir.display()
        );
        files.extend(["output.log", "output.idx", "status.json"].map(|f| dir.join(f)));
    }
    let execs = d.sandbox_dir(&running).join("execs");
    for exec in std::fs::read_dir(&execs).unwrap() {
        let exec = exec.unwrap().path();
        files.extend(["output.log", "output.idx", "status.json"].map(|f| exec.join(f)));
    }
    for file in files {
        let meta =
            std::fs::symlink_metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(
            (meta.uid(), meta.gid()),
            (d.uid, gid),
            "owner and group of {}",
            file.display()
        );
        assert!(!meta.file_type().is_fifo());
        assert_eq!(
            meta.mode() & 0o007,
            0,
            "{} is open to others",
            file.display()
        );
    }
}
both_modes!(daemon_files_belong_to_the_daemons_group);
