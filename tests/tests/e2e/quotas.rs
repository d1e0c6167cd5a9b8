//! Image quotas and the free-space reserve, end to end: a tenant's images are limited in count
//! and in stored (unpacked) bytes — a small gzip that unpacks past the quota is stopped while
//! it unpacks and leaves nothing behind — and below `--min-free-space` imports and creates are
//! 507 while deletes still work.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use sandboxd_tests::{both_modes, Daemon, Mode, Reply};
use serde_json::json;

/// A gzip'd root filesystem tarball with one file of `mib` MiB of zeros (a few KiB on the wire).
fn zeros_image(mib: usize) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let data = vec![0u8; mib << 20];
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "zeros", data.as_slice())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gzip = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = gzip.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&tar).unwrap());
    let out = gzip.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn import(d: &Daemon, token: Option<&str>, name: &str, body: Vec<u8>) -> Reply {
    d.request("POST", "/v1/images")
        .token(token)
        .query("name", name)
        .header("content-type", "application/gzip")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send()
}

/// Names in `<state>/images` and `<state>/uploads`: stored digests, scratch directories, uploads.
fn stored(d: &Daemon) -> Vec<String> {
    ["images", "uploads"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(d.state_dir.join(dir))
                .into_iter()
                .flatten()
        })
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn image_quotas_count_stored_bytes_and_names(mode: Mode) {
    let d = Daemon::start(mode);
    let user = d.create_token("t", "user");
    let reply = d
        .request("PUT", "/v1/tenants/t/quota")
        .json(&json!({"max_images": 2, "max_image_bytes": 8u64 << 20}))
        .send();
    assert_eq!(reply.status, 200, "{}", reply.body);

    // 24 MiB unpacked from a few KiB of gzip: stopped at the 8 MiB the quota leaves.
    let bomb = zeros_image(24);
    assert!(bomb.len() < 256 << 10, "{}", bomb.len());
    let reply = import(&d, Some(&user), "big", bomb);
    assert_eq!(
        reply.assert_error(429, "over the image bytes quota"),
        "quota_exceeded"
    );
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    for part in [
        "max_image_bytes",
        &format!("{}", 8u64 << 20),
        "0 are in use",
    ] {
        assert!(message.contains(part), "{mode:?}: {part}: {message}");
    }
    // Nothing of it is kept: no digest, no scratch directory, no upload.
    assert!(
        sandboxd_tests::eventually(Duration::from_secs(10), || stored(&d).is_empty()),
        "{mode:?}: {:?}",
        stored(&d)
    );
    assert_eq!(
        d.request("GET", "/v1/images/big")
            .token(Some(&user))
            .send()
            .status,
        404
    );

    // Within the quota: 3 MiB each, twice; then the count is full.
    assert_eq!(import(&d, Some(&user), "a", zeros_image(3)).status, 201);
    let reply = import(&d, Some(&user), "b", zeros_image(3));
    assert_eq!(reply.status, 201, "{mode:?}: {}", reply.body);
    let reply = import(&d, Some(&user), "c", zeros_image(1));
    assert_eq!(reply.assert_error(429, "third image"), "quota_exceeded");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("max_images")
            && message.contains("at most 2")
            && message.contains("has 2"),
        "{mode:?}: {message}"
    );
    // Other tenants are not affected by t's quota.
    assert_eq!(import(&d, d.token(), "c", zeros_image(1)).status, 201);
    // A delete makes room again.
    assert_eq!(
        d.request("DELETE", "/v1/images/a")
            .token(Some(&user))
            .send()
            .status,
        204
    );
    assert_eq!(import(&d, Some(&user), "c", zeros_image(1)).status, 201);
}
both_modes!(image_quotas_count_stored_bytes_and_names);

fn below_the_free_space_reserve_imports_and_creates_are_507(mode: Mode) {
    let mut d = Daemon::start(mode);
    assert_eq!(import(&d, d.token(), "img", zeros_image(1)).status, 201);
    let kept = d.create(json!({"command": ["true"], "start": false}));
    // More must stay free than this filesystem has: the daemon is at its reserve.
    d.restart_with(&["--min-free-space", "1000T"]);
    let reply = import(&d, d.token(), "more", zeros_image(1));
    assert_eq!(
        reply.assert_error(507, "import below the reserve"),
        "insufficient_storage"
    );
    assert!(reply.body.contains("--min-free-space"), "{}", reply.body);
    let reply = d
        .request("POST", "/v1/sandboxes")
        .json(&json!({"command": ["true"]}))
        .send();
    assert_eq!(
        reply.assert_error(507, "create below the reserve"),
        "insufficient_storage"
    );
    let reply = d
        .request("POST", &format!("/v1/sandboxes/{}/start", kept.id))
        .send();
    assert_eq!(
        reply.assert_error(507, "start below the reserve"),
        "insufficient_storage"
    );
    // Deleting frees space, so it always works (the database is written meanwhile).
    assert_eq!(d.delete(&format!("/v1/sandboxes/{}", kept.id)).status, 204);
    assert_eq!(d.delete("/v1/images/img").status, 204);
    let reply = d
        .request("POST", "/v1/tokens")
        .json(&json!({"tenant": "x", "role": "user"}))
        .send();
    assert_eq!(reply.status, 201, "{}", reply.body);
    // A percentage works the same way; 0 turns the reserve off.
    d.restart_with(&["--min-free-space", "100%"]);
    let reply = d
        .request("POST", "/v1/sandboxes")
        .json(&json!({"command": ["true"]}))
        .send();
    assert_eq!(reply.status, 507, "{}", reply.body);
    d.restart_with(&["--min-free-space", "0"]);
    let (s, _) = d.run(&["true"]);
    assert_eq!(s.exit_code, Some(0));
}
both_modes!(below_the_free_space_reserve_imports_and_creates_are_507);
