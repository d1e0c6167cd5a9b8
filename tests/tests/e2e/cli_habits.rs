//! The habits Docker users bring to `sbx`, against a real daemon: strict flags (an unknown one
//! creates nothing), `-p HOST:SANDBOX`, `run -d --rm`, `--env-file`, `ps`, `ls -q`, `--format`,
//! `logs --tail/--since`, completions, daemon errors with their code, and a taken image name
//! answered with the daemon's 409 even for a large upload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sandboxd_tests::{binaries, eventually, require_e2e, Daemon, Mode};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run sbx and assert it exited with `code`.
fn sbx(daemon: &Daemon, args: &[&str], code: i32) -> Output {
    let out = daemon.sbx(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "sbx {args:?}\nstdout: {}\nstderr: {}\n{}",
        stdout(&out),
        stderr(&out),
        daemon.log()
    );
    out
}

/// The ids `sbx ls -q` prints.
fn ids(daemon: &Daemon) -> BTreeSet<String> {
    stdout(&sbx(daemon, &["ls", "-q", "--all-pages"], 0))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A directory of the test's own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sbx-habits-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn unknown_flags_create_nothing_and_daemon_errors_show_their_code() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let before = ids(&d);
    // Flags sbx does not know, before the command: usage errors (status 2), nothing created.
    for (args, says) in [
        (&["run", "-Z", "1000", "--", "id"][..], "'-Z'"),
        (&["run", "--usr", "1000", "id"], "--usr"),
        (&["run", "--entry-point", "sh", "--", "id"], "--entry-point"),
        (&["create", "-Z", "1000", "--", "id"], "'-Z'"),
        (&["run", "-d", "--bogus", "sleep", "9"], "--bogus"),
        // The old SANDBOX:HOST order of -p, refused with the new spelling.
        (&["run", "-p", "8080:0", "--", "true"], "-p 0:8080"),
        (
            &["run", "--env-file", "/nonexistent/sbx.env", "--", "true"],
            "sbx.env",
        ),
    ] {
        let out = sbx(&d, args, 2);
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(ids(&d), before, "a refused command created a sandbox");
    assert!(before.is_empty(), "{before:?}");

    // An exec with an unknown flag before its command starts nothing either.
    let id = stdout(&sbx(&d, &["run", "-d", "--", "sleep", "30"], 0))
        .trim()
        .to_owned();
    sbx(&d, &["exec", &id, "-u", "1000", "id"], 2);
    let execs = d.get(&format!("/v1/sandboxes/{id}/execs"));
    let execs: serde_json::Value = execs.json();
    assert_eq!(execs["items"], serde_json::json!([]), "{execs}");
    // Flags after the command are the command's.
    let out = sbx(&d, &["exec", &id, "sh", "-c", "echo $0", "-u"], 0);
    assert_eq!(stdout(&out), "-u\n");

    // Daemon errors carry their code and HTTP status.
    let out = sbx(&d, &["inspect", "no-such-sandbox"], 125);
    assert!(
        stderr(&out).contains("(not_found, HTTP 404)"),
        "{}",
        stderr(&out)
    );
    sbx(&d, &["rm", "-f", &id], 0);
}

#[test]
fn publish_maps_the_host_port_to_the_sandbox_port() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    // A free host port, distinct from the sandbox's 8080 so that the order matters.
    let host = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let publish = format!("{host}:8080");
    let out = sbx(
        &d,
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--net",
            "bridge",
            "-p",
            &publish,
            "--",
            "sh",
            "-c",
            "echo served-by-the-sandbox > /work/index.txt && exec python3 -m http.server 8080",
        ],
        0,
    );
    let id = stdout(&out).trim().to_owned();
    let out = sbx(&d, &["inspect", "--format", "{{.network.ports}}", "web"], 0);
    let ports: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        ports,
        serde_json::json!([{ "host": host, "sandbox": 8080 }])
    );
    let url = format!("http://127.0.0.1:{host}/index.txt");
    let mut body = String::new();
    let answered = eventually(Duration::from_secs(15), || {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "2", &url])
            .output()
            .unwrap();
        body = stdout(&out);
        out.status.success()
    });
    assert!(
        answered,
        "host port {host} does not reach the sandbox's 8080"
    );
    assert_eq!(body, "served-by-the-sandbox\n");

    // `-p 8080` and `-p 0:8080` pick a free host port for sandbox port 8080.
    for spelling in ["8080", "0:8080"] {
        let out = sbx(
            &d,
            &["create", "--net", "bridge", "-p", spelling, "--", "true"],
            0,
        );
        let created = stdout(&out).trim().to_owned();
        let spec = sbx(
            &d,
            &["inspect", "--format", "{{.spec.network.ports}}", &created],
            0,
        );
        let ports: serde_json::Value = serde_json::from_str(stdout(&spec).trim()).unwrap();
        assert_eq!(ports, serde_json::json!([{ "host": 0, "sandbox": 8080 }]));
        sbx(&d, &["rm", "-f", &created], 0);
    }
    sbx(&d, &["rm", "-f", &id], 0);
}

#[test]
fn env_files_detached_rm_ps_quiet_and_formats() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let s = Scratch::new("env");
    let env_file = s.path("app.env");
    std::fs::write(
        &env_file,
        "# settings\n\nA=from file\nB=overridden\nFROM_CALLER\nNOT_SET_ANYWHERE\n",
    )
    .unwrap();
    let mut cmd = Command::new(binaries().join("sbx"));
    cmd.env("SANDBOXD_URL", &d.url)
        .env("FROM_CALLER", "the caller's")
        .env_remove("NOT_SET_ANYWHERE");
    if let Some(token) = d.token() {
        cmd.env("SANDBOXD_TOKEN", token);
    }
    let out = d.sbx_command(
        cmd,
        &[
            "run",
            "--env-file",
            env_file.to_str().unwrap(),
            "-e",
            "B=flag",
            "--",
            "sh",
            "-c",
            "echo \"$A|$B|$FROM_CALLER|${NOT_SET_ANYWHERE-unset}\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from file|flag|the caller's|unset\n");

    // -d --rm: detached, and the daemon removes it soon after it exits.
    let gone = stdout(&sbx(&d, &["run", "-d", "--rm", "--", "true"], 0))
        .trim()
        .to_owned();
    assert_eq!(gone.len(), 36, "{gone}");
    assert!(
        eventually(Duration::from_secs(20), || !ids(&d).contains(&gone)),
        "sandbox {gone} of `run -d --rm` was not removed"
    );

    // ps is ls; -q prints ids only; --format prints fields or a template.
    let id = stdout(&sbx(
        &d,
        &["run", "-d", "--name", "fmt", "--", "sleep", "30"],
        0,
    ))
    .trim()
    .to_owned();
    assert_eq!(
        stdout(&sbx(&d, &["ps", "-q", "--state", "running"], 0)),
        format!("{id}\n")
    );
    assert!(stdout(&sbx(&d, &["ps"], 0)).starts_with("ID "));
    let out = sbx(
        &d,
        &["ls", "--state", "running", "--format", "id,name,state"],
        0,
    );
    assert_eq!(stdout(&out), format!("{id}\tfmt\trunning\n"));
    let out = sbx(
        &d,
        &[
            "ps",
            "--state",
            "running",
            "--format",
            "{{.Name}} is {{.state}}",
        ],
        0,
    );
    assert_eq!(stdout(&out), "fmt is running\n");
    let out = sbx(
        &d,
        &["inspect", "-f", "{{.id}} {{.spec.command}}", "fmt"],
        0,
    );
    assert_eq!(stdout(&out), format!("{id} sleep 30\n"));
    let out = sbx(&d, &["inspect", "--format", "nosuchfield", "fmt"], 125);
    assert!(stderr(&out).contains("no field"), "{}", stderr(&out));
    sbx(&d, &["rm", "-f", "fmt"], 0);
}

#[test]
fn logs_tail_and_since() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    sbx(
        &d,
        &[
            "run",
            "--name",
            "done",
            "--",
            "sh",
            "-c",
            "seq 1 5; echo err >&2",
        ],
        0,
    );
    // The last two lines of stdout and stderr together: `5` then `err`.
    let out = sbx(&d, &["logs", "--tail", "2", "done"], 0);
    assert_eq!((stdout(&out), stderr(&out)), ("5\n".into(), "err\n".into()));
    let out = sbx(&d, &["logs", "-n", "3", "--stream", "stdout", "done"], 0);
    assert_eq!(stdout(&out), "4\n5\n");
    let out = sbx(&d, &["logs", "--tail", "100", "done"], 0);
    assert_eq!(stdout(&out), "1\n2\n3\n4\n5\n");
    let out = sbx(&d, &["logs", "--tail", "0", "done"], 0);
    assert_eq!((stdout(&out), stderr(&out)), (String::new(), String::new()));
    // Started within the hour: all of it.
    let out = sbx(&d, &["logs", "--since", "1h", "done"], 0);
    assert_eq!(stdout(&out), "1\n2\n3\n4\n5\n");

    // A running sandbox: the tail of its output so far, then live with -f.
    sbx(
        &d,
        &[
            "run",
            "-d",
            "--name",
            "live",
            "--",
            "sh",
            "-c",
            "seq 1 10; sleep 6; echo 11",
        ],
        0,
    );
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            last = stdout(&sbx(&d, &["logs", "--tail", "3", "live"], 0));
            last == "8\n9\n10\n"
        }),
        "tail of a running sandbox: {last:?}"
    );
    let out = sbx(&d, &["logs", "-f", "--tail", "1", "live"], 0);
    assert_eq!(stdout(&out), "10\n11\n");

    // Ended more than a second ago: nothing newer than 1s. The log has no per-line times, so a
    // sandbox that ran across the moment is an error, not a guess.
    std::thread::sleep(Duration::from_millis(1500));
    let out = sbx(&d, &["logs", "--since", "1s", "done"], 0);
    assert_eq!(stdout(&out), "");
    sbx(
        &d,
        &["run", "-d", "--name", "across", "--", "sleep", "30"],
        0,
    );
    std::thread::sleep(Duration::from_millis(2500));
    let out = sbx(&d, &["logs", "--since", "1s", "across"], 125);
    assert!(stderr(&out).contains("no timestamps"), "{}", stderr(&out));
    sbx(&d, &["rm", "-f", "across", "live", "done"], 0);
}

/// A minimal root filesystem tarball: one directory and one file.
fn tiny_rootfs(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_cksum();
    b.append_data(&mut dir, "etc", std::io::empty()).unwrap();
    let data = b"habits\n";
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o644);
    file.set_size(data.len() as u64);
    file.set_cksum();
    b.append_data(&mut file, "etc/marker", &data[..]).unwrap();
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

#[test]
fn completions_and_a_taken_image_name_with_a_large_upload() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    // Completion scripts need no daemon; bash loads its own.
    for shell in ["bash", "zsh", "fish"] {
        let out = sbx(&d, &["completion", shell], 0);
        assert!(stdout(&out).contains("sbx"), "{shell}");
    }
    let script = stdout(&sbx(&d, &["completion", "bash"], 0));
    let out = Command::new("bash")
        .args(["-c", "eval \"$0\" && complete -p sbx", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("sbx"), "{}", stdout(&out));

    let s = Scratch::new("image");
    let small = s.path("small.tar");
    tiny_rootfs(&small);
    let out = sbx(
        &d,
        &[
            "image",
            "import",
            small.to_str().unwrap(),
            "--name",
            "taken",
        ],
        0,
    );
    // No progress bar when stderr is not a terminal.
    assert_eq!(stderr(&out), "");
    // 256 MiB the daemon never reads: it answers 409 at once and closes the connection.
    let big = s.path("big.tar");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(256 << 20).unwrap();
    // A client that only writes saw "Broken pipe" about half the time: try a few times.
    for _ in 0..5 {
        let out = sbx(
            &d,
            &["image", "import", big.to_str().unwrap(), "--name", "taken"],
            125,
        );
        let err = stderr(&out);
        assert!(err.contains("(image_exists, HTTP 409)"), "{err}");
        assert!(!err.to_lowercase().contains("broken pipe"), "{err}");
    }
    // On a terminal (script(1) gives it one) the import draws a bar with rate and ETA.
    let command = format!(
        "{} image import {} --name other",
        binaries().join("sbx").display(),
        big.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &command, "/dev/null"])
        .env("SANDBOXD_URL", &d.url);
    if let Some(token) = d.token() {
        cmd.env("SANDBOXD_TOKEN", token);
    }
    let out = d.sbx_command(cmd, &[]);
    let shown = stdout(&out);
    assert!(
        shown.contains("importing other") && shown.contains("ETA") && shown.contains("MiB/s"),
        "{shown:?}"
    );
    if out.status.success() {
        sbx(&d, &["image", "rm", "other"], 0);
    }
    // The image is still the small one.
    let listed = stdout(&sbx(&d, &["image", "ls", "--json"], 0));
    let images: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images}");
    assert_eq!(images[0]["name"], "taken");
}
