//! Images as Docker means them, end to end: one image (host binaries, a user `user` 1000:1000
//! and a group `staff` it belongs to) with a configuration (`Env`, `Entrypoint`, `Cmd`,
//! `WorkingDir`, `User`), written by the test in every archive layout the importer accepts:
//! `docker save` before Docker 25 (`<id>/layer.tar`, a repeated layer as a symlink), `docker save`
//! since 25 (`manifest.json` into `blobs/sha256/`), `podman save`'s docker-archive (top-level
//! `<sha>.tar` layers, legacy `<id>/layer.tar` symlinks to them) and an OCI layout. Each is
//! imported over HTTP, shows its configuration, and runs as the configuration says, with the
//! request's fields winning as in Docker.

use std::path::Path;
use std::process::Command;

use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::{json, Value};

use crate::images::{build_rootfs, import, import_ok, run, tar_dir, write, Scratch};

const CMD: &str = "echo cmd:$GREETING:$MODE:$(pwd):$(id -u):$(id -g):$(id -G)";

fn config_json() -> String {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=hello", "MODE=image"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": [CMD],
            "WorkingDir": "/srv",
            "User": "user",
            "Labels": {"org.example": "ignored"}
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    })
    .to_string()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The image's two layers: the root filesystem, and a second one adding `/srv` and the group
/// `staff` (which lists `user`).
fn layers(s: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    build_rootfs(&s.path("rootfs"));
    tar_dir(&s.path("rootfs"), &s.path("layer1.tar"));
    let l2 = s.path("layer2");
    write(&l2.join("srv/README"), "served\n");
    write(
        &l2.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nstaff:x:50:other,user\n",
    );
    tar_dir(&l2, &s.path("layer2.tar"));
    (s.path("layer1.tar"), s.path("layer2.tar"))
}

fn pack(dir: &Path, out: &Path) {
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg("."));
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

fn symlink(target: &str, link: &Path) {
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// `docker save` before Docker 25: `<id>/layer.tar`, `<hex>.json`; the last layer repeated at
/// the end as a symlink to it (as Docker writes a layer the image has twice).
fn docker_legacy(s: &Scratch) -> std::path::PathBuf {
    let (l1, l2) = layers(s);
    let out = s.path("legacy");
    copy(&l1, &out.join("aaa/layer.tar"));
    copy(&l2, &out.join("bbb/layer.tar"));
    symlink("../bbb/layer.tar", &out.join("ccc/layer.tar"));
    write(&out.join("cfg0123.json"), &config_json());
    write(
        &out.join("manifest.json"),
        &json!([{"Config": "cfg0123.json", "RepoTags": ["e2e:legacy"],
                 "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"]}])
        .to_string(),
    );
    pack(&out, &s.path("legacy.tar"));
    s.path("legacy.tar")
}

/// `podman save` (docker-archive): layers as top-level `<sha>.tar`, the config as `<sha>.json`,
/// and legacy `<id>/layer.tar` symlinks to the layers.
fn podman_archive(s: &Scratch) -> std::path::PathBuf {
    let (l1, l2) = layers(s);
    let out = s.path("podman");
    let (h1, h2) = (sha256(&l1), sha256(&l2));
    copy(&l1, &out.join(format!("{h1}.tar")));
    copy(&l2, &out.join(format!("{h2}.tar")));
    symlink(&format!("../{h1}.tar"), &out.join("id1/layer.tar"));
    symlink(&format!("../{h2}.tar"), &out.join("id2/layer.tar"));
    write(&out.join("cfg.json"), &config_json());
    let hc = sha256(&out.join("cfg.json"));
    std::fs::rename(out.join("cfg.json"), out.join(format!("{hc}.json"))).unwrap();
    write(
        &out.join("manifest.json"),
        &json!([{"Config": format!("{hc}.json"), "RepoTags": ["localhost/e2e:podman"],
                 "Layers": [format!("{h1}.tar"), format!("{h2}.tar")]}])
        .to_string(),
    );
    write(
        &out.join("repositories"),
        r#"{"localhost/e2e":{"podman":"id2"}}"#,
    );
    pack(&out, &s.path("podman.tar"));
    s.path("podman.tar")
}

/// Blobs of an OCI layout under `out`: the layers, the config and a manifest; returns the
/// manifest's and the config's and layers' hex digests.
fn oci_blobs(s: &Scratch, out: &Path) -> (String, String, Vec<String>) {
    let (l1, l2) = layers(s);
    let blobs = out.join("blobs/sha256");
    let mut hexes = Vec::new();
    for l in [&l1, &l2] {
        let h = sha256(l);
        copy(l, &blobs.join(&h));
        hexes.push(h);
    }
    write(&blobs.join("config"), &config_json());
    let hc = sha256(&blobs.join("config"));
    std::fs::rename(blobs.join("config"), blobs.join(&hc)).unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{hc}"), "size": 1},
        "layers": hexes.iter().map(|h| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{h}"), "size": 1})).collect::<Vec<_>>(),
    });
    write(&blobs.join("manifest"), &manifest.to_string());
    let hm = sha256(&blobs.join("manifest"));
    std::fs::rename(blobs.join("manifest"), blobs.join(&hm)).unwrap();
    write(
        &out.join("index.json"),
        &json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{hm}"), "size": 1,
            "platform": {"architecture": "amd64", "os": "linux"}}]})
        .to_string(),
    );
    write(&out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
    (hm, hc, hexes)
}

/// `docker save` since Docker 25: an OCI layout plus a `manifest.json` naming its blobs.
fn docker_25(s: &Scratch) -> std::path::PathBuf {
    let out = s.path("docker25");
    let (_, hc, hexes) = oci_blobs(s, &out);
    write(
        &out.join("manifest.json"),
        &json!([{"Config": format!("blobs/sha256/{hc}"), "RepoTags": ["e2e:25"],
                 "Layers": hexes.iter().map(|h| format!("blobs/sha256/{h}")).collect::<Vec<_>>()}])
        .to_string(),
    );
    pack(&out, &s.path("docker25.tar"));
    s.path("docker25.tar")
}

/// An OCI image layout archive (`podman save --format oci-archive`, `skopeo copy oci-archive:`).
fn oci_archive(s: &Scratch) -> std::path::PathBuf {
    let out = s.path("oci");
    oci_blobs(s, &out);
    pack(&out, &s.path("oci.tar"));
    s.path("oci.tar")
}

/// Writes one layout of the test image into a scratch directory and returns the archive.
type Builder = fn(&Scratch) -> std::path::PathBuf;

/// Run `spec` (over `rootfs.image = image`) to its end: its exit code and output.
fn run_in(d: &Daemon, image: &str, mut spec: Value) -> (Option<i32>, String) {
    spec["rootfs"] = json!({ "image": image });
    let (sandbox, out) = d.run_spec(spec);
    (sandbox.exit_code, out)
}

fn sandbox_count(d: &Daemon) -> usize {
    d.get("/v1/sandboxes").json()["items"]
        .as_array()
        .unwrap()
        .len()
}

/// The configuration takes effect in every layout (privileged: the image's user 1000 exists in
/// the sandbox's range).
#[test]
fn image_configs_apply_in_every_layout() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let layouts: [(&str, Builder, &str); 4] = [
        ("legacy", docker_legacy, "docker-archive"),
        ("podman", podman_archive, "docker-archive"),
        ("docker25", docker_25, "docker-archive"),
        ("oci", oci_archive, "oci-layout"),
    ];
    for (name, build, format) in layouts {
        let s = Scratch::new();
        let image = import_ok(&d, name, &build(&s));
        assert_eq!(image.format, format, "{name}");
        let shown = d.get(&format!("/v1/images/{name}")).json();
        assert_eq!(
            shown["config"],
            json!({"env": ["PATH=/bin", "GREETING=hello", "MODE=image"],
                   "entrypoint": ["/bin/sh", "-c"], "cmd": [CMD],
                   "working_dir": "/srv", "user": "user"}),
            "{name}: {shown}"
        );
        // No command: Entrypoint + Cmd, the image's Env, WorkingDir and User (with the groups
        // that list it).
        let (code, out) = run_in(&d, name, json!({}));
        assert_eq!(
            (code, out.as_str()),
            (Some(0), "cmd:hello:image:/srv:1000:1000:1000 50\n"),
            "{name}"
        );
    }

    // The request's fields win, as in Docker (one layout is enough for the rules).
    let image = "podman";
    let cases = [
        // `command` replaces Cmd and follows the Entrypoint; `env` wins over Env.
        (
            json!({"command": ["echo mine:$MODE:$GREETING"], "env": {"MODE": "request"}}),
            "mine:request:hello\n",
        ),
        // `entrypoint` replaces the Entrypoint and drops Cmd.
        (
            json!({"entrypoint": ["/bin/cat"], "command": ["/srv/README"]}),
            "served\n",
        ),
        (
            json!({"entrypoint": ["/bin/id"], "command": ["-u"]}),
            "1000\n",
        ),
        // `[]` clears the Entrypoint: `command` runs alone.
        (
            json!({"entrypoint": [], "command": ["/bin/id", "-u"]}),
            "1000\n",
        ),
        // `cwd` over WorkingDir; `user` over User, by number or by name.
        (
            json!({"command": ["pwd; id -u"], "cwd": "/tmp", "user": "0"}),
            "/tmp\n0\n",
        ),
        (
            json!({"command": ["id -u; id -g"], "user": "root:staff"}),
            "0\n50\n",
        ),
        (
            json!({"command": ["id -u; id -g"], "user": "4242"}),
            "4242\n0\n",
        ),
        (
            json!({"command": ["id -u; id -g"], "user": "1000:7"}),
            "1000\n7\n",
        ),
    ];
    for (spec, want) in cases {
        let (code, out) = run_in(&d, image, spec.clone());
        assert_eq!((code, out.as_str()), (Some(0), want), "{spec}");
    }
    // A non-root user really is one: no capability, so root's files stay root's.
    let (code, out) = run_in(
        &d,
        image,
        json!({"command": ["{ echo x > /etc/passwd; } 2>/dev/null || echo refused"]}),
    );
    assert_eq!((code, out.as_str()), (Some(0), "refused\n"));

    // Refusals create nothing: an unknown user or group is 422 `unknown_user`, nothing to run
    // is 422 `no_command`, a malformed user 400.
    let before = sandbox_count(&d);
    for (spec, status, code) in [
        (json!({"user": "ghost"}), 422, "unknown_user"),
        (json!({"user": "user:ghosts"}), 422, "unknown_user"),
        (json!({"entrypoint": []}), 422, "no_command"),
        (json!({"user": "a b"}), 400, "invalid_request"),
        (json!({"user": "70000"}), 400, "invalid_request"),
    ] {
        let mut spec = spec;
        spec["rootfs"] = json!({"image": image});
        let reply = d.post("/v1/sandboxes", &spec);
        assert_eq!(
            reply.assert_error(status, &spec.to_string()),
            code,
            "{spec}"
        );
    }
    // On the host root, names are refused (there is no image passwd) and numbers work.
    let reply = d.post(
        "/v1/sandboxes",
        &json!({"command": ["true"], "user": "user"}),
    );
    assert_eq!(
        reply.assert_error(422, "a name on the host root"),
        "unknown_user"
    );
    assert_eq!(
        sandbox_count(&d),
        before,
        "a refused request created a sandbox"
    );
    let (sandbox, out) =
        d.run_spec(json!({"command": ["sh", "-c", "id -u; id -g"], "user": "1234:99"}));
    assert_eq!((sandbox.exit_code, out.as_str()), (Some(0), "1234\n99\n"));

    // A created sandbox starts with the same configuration.
    let created = d.create(json!({"rootfs": {"image": image}, "start": false}));
    let id = created.id.to_string();
    assert_eq!(d.start_after_transfer(&id).status, 200);
    let done = d.wait(&id);
    let out = String::from_utf8_lossy(&d.logs(&id, "")).into_owned();
    assert_eq!(
        (done.exit_code, out.as_str()),
        (Some(0), "cmd:hello:image:/srv:1000:1000:1000 50\n")
    );

    // The CLI: -u and --entrypoint, and a command taken from the image.
    let out = d.sbx(&["run", "--image", image, "-u", "0:50", "--", "id -u; id -g"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n50\n", "{out:?}");
    let out = d.sbx(&[
        "run",
        "--image",
        image,
        "--entrypoint",
        "/bin/cat",
        "--",
        "/srv/README",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "served\n", "{out:?}");
    let out = d.sbx(&["run", "--image", image]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "cmd:hello:image:/srv:1000:1000:1000 50\n",
        "{out:?}"
    );
}

/// Rootless: only root exists, so the image's `User` must be overridden with root, and any other
/// user is 422 before anything is created.
#[test]
fn rootless_sandboxes_run_image_configs_as_root_only() {
    require_e2e!();
    let d = Daemon::start(Mode::Rootless);
    let s = Scratch::new();
    import_ok(&d, "podman", &podman_archive(&s));
    let reply = d.post("/v1/sandboxes", &json!({"rootfs": {"image": "podman"}}));
    assert_eq!(
        reply.assert_error(422, "user 1000 rootless"),
        "unknown_user"
    );
    assert_eq!(sandbox_count(&d), 0);
    let (code, out) = run_in(&d, "podman", json!({"user": "root"}));
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "cmd:hello:image:/srv:0:0:0\n")
    );
}

/// A configuration that breaks a rule refuses the image at import (400 `bad_image`).
#[test]
fn bad_image_configs_are_refused_at_import() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    for (i, config) in [
        json!({"config": {"Env": ["1BAD=x"]}}),
        json!({"config": {"WorkingDir": "relative"}}),
        json!({"config": {"User": "no body"}}),
    ]
    .into_iter()
    .enumerate()
    {
        let s = Scratch::new();
        let out = s.path("img");
        std::fs::create_dir_all(&out).unwrap();
        let layer = s.path("layer");
        write(&layer.join("etc/marker"), "x\n");
        std::fs::create_dir_all(out.join("l")).unwrap();
        tar_dir(&layer, &out.join("l/layer.tar"));
        write(&out.join("c.json"), &config.to_string());
        write(
            &out.join("manifest.json"),
            r#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#,
        );
        pack(&out, &s.path("img.tar"));
        let (status, body) = import(
            &d,
            &format!("bad{i}"),
            std::fs::read(s.path("img.tar")).unwrap(),
        );
        assert_eq!(status, 400, "{config}: {body}");
        assert_eq!(body["error"]["code"], "bad_image", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("image config"),
            "{body}"
        );
    }
}
