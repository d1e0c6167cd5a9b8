//! Files in and out of a sandbox: `"start": false` + `POST /start`, `/files` and `/archive`,
//! and every way a sandbox might try to make a transfer touch the host.

#![allow(clippy::unwrap_used)] // Test code: a panic is the failure report.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sandboxd_api::{Sandbox, SandboxState};
use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::{json, Value};

const MODES: [Mode; 2] = [Mode::Privileged, Mode::Rootless];

fn put(
    d: &Daemon,
    id: &str,
    what: &str,
    query: &str,
    body: Vec<u8>,
) -> reqwest::blocking::Response {
    d.http()
        .put(format!("{}/v1/sandboxes/{id}/{what}?{query}", d.url))
        .body(body)
        .send()
        .unwrap()
}

fn get(d: &Daemon, id: &str, what: &str, query: &str) -> reqwest::blocking::Response {
    d.get(&format!("/v1/sandboxes/{id}/{what}?{query}"))
}

/// Status and body of a response, for assertions with context.
fn answer(resp: reqwest::blocking::Response) -> (u16, Vec<u8>) {
    let status = resp.status().as_u16();
    (status, resp.bytes().unwrap().to_vec())
}

fn expect(resp: reqwest::blocking::Response, status: u16, what: &str) -> Vec<u8> {
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

#[test]
fn files_go_in_before_start_and_come_out_after_exit_byte_for_byte() {
    require_e2e!();
    for mode in MODES {
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
        let started = d
            .http()
            .post(format!("{}/v1/sandboxes/{id}/start", d.url))
            .send()
            .unwrap();
        assert_eq!(started.status().as_u16(), 200);
        let done = d.wait(&id);
        let out = String::from_utf8_lossy(&d.logs(&id, "")).into_owned();
        assert_eq!(done.exit_code, Some(0), "{done:?}: {out}");
        assert_eq!(out, "640 0\n755 0\n");
        // A second start is a conflict.
        let again = d
            .http()
            .post(format!("{}/v1/sandboxes/{id}/start", d.url))
            .send()
            .unwrap();
        assert_eq!(again.status().as_u16(), 409);

        // After exit: the file and the tree come out exactly.
        let resp = get(&d, &id, "files", "path=/work/out.bin");
        assert_eq!(
            resp.headers()
                .get("x-sandbox-file-mode")
                .and_then(|v| v.to_str().ok()),
            Some("0644")
        );
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
}
