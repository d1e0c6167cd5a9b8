//! User mistakes get a 4xx that says what happened, never a 5xx or a misleading message: an
//! exec racing its sandbox's exit is 409 `not_running`; a start while a file transfer holds the
//! sandbox names the transfer; `sbx` prints a sandbox's `error` field; a disk cap beyond what
//! the state filesystem holds is 422, not a `spawn_failed` 500.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sandboxd_api::SandboxState;
use sandboxd_tests::{both_modes, Daemon, Mode};
use serde_json::json;

/// Execs sent while sandboxes end on their own: each is 201 (it ran) or 409 `not_running`
/// (it came too late), never a 5xx, however the timing falls.
fn an_exec_racing_the_exit_is_409_not_a_500(mode: Mode) {
    let d = Daemon::start(mode);
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..6 {
        // Each sandbox lives a little longer than the one before, so that the execs fall on
        // every moment of its end.
        let s = d.create(json!({"command": ["sleep", format!("0.{}", 2 + round)]}));
        let id = s.id.to_string();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let mut seen = Vec::new();
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while Instant::now() < deadline {
                            let reply = d
                                .request("POST", &format!("/v1/sandboxes/{id}/execs"))
                                .json(&json!({"command": ["true"]}))
                                .send();
                            let code = if reply.status == 201 {
                                "201".to_owned()
                            } else {
                                let code = reply.json()["error"]["code"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned();
                                format!("{} {code}: {}", reply.status, reply.body)
                            };
                            let done = reply.status == 409;
                            seen.push(code);
                            if done {
                                break;
                            }
                        }
                        seen
                    })
                })
                .collect();
            for w in workers {
                for code in w.join().unwrap() {
                    *answers.entry(code).or_default() += 1;
                }
            }
        });
    }
    let unexpected: Vec<_> = answers
        .keys()
        .filter(|k| *k != "201" && !k.starts_with("409 not_running:"))
        .collect();
    assert!(unexpected.is_empty(), "{mode:?}: {answers:#?}");
    assert!(
        answers.keys().any(|k| k.starts_with("409 not_running")),
        "{mode:?}: no exec came late: {answers:#?}"
    );
}
both_modes!(an_exec_racing_the_exit_is_409_not_a_500);

/// A start while an upload into the created sandbox is still arriving: 409 naming the transfer
/// (not "still stopping"), and the sandbox starts once the upload is done.
fn a_start_during_a_transfer_names_the_transfer(mode: Mode) {
    let d = Daemon::start(mode);
    let s = d.create(json!({"command": ["cat", "/work/in.txt"], "start": false}));
    assert_eq!(s.state, SandboxState::Created);
    let id = s.id.to_string();
    // An upload whose body arrives in two parts, with the start in between.
    let body = b"hello from the transfer\n";
    let mut upload = TcpStream::connect(&d.addr).unwrap();
    let mut head = format!(
        "PUT /v1/sandboxes/{id}/files?path=/work/in.txt HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        d.addr,
        body.len()
    );
    if let Some(auth) = d.auth_header() {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    upload.write_all(head.as_bytes()).unwrap();
    upload.write_all(&body[..5]).unwrap();
    upload.flush().unwrap();
    // The worker holds the root from the moment it has resolved the path, a moment after the
    // daemon has the request's head.
    std::thread::sleep(Duration::from_millis(500));
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let reply = d
            .request("POST", &format!("/v1/sandboxes/{id}/start"))
            .send();
        if reply.status == 409 {
            last = Some(reply);
            break;
        }
        assert_ne!(
            reply.status, 200,
            "{mode:?}: started under a transfer: {}",
            reply.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = last.expect("the start is refused while the upload lasts");
    assert_eq!(
        reply.assert_error(409, "start during a transfer"),
        "conflict"
    );
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("file transfer"), "{mode:?}: {message}");
    assert!(!message.contains("stopping"), "{mode:?}: {message}");

    upload.write_all(&body[5..]).unwrap();
    let mut answer = String::new();
    upload.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{mode:?}: {answer}");
    let started = d.start_after_transfer(&id);
    assert_eq!(started.status, 200, "{mode:?}: {}", started.body);
    let ended = d.wait(&id);
    assert_eq!(ended.exit_code, Some(0), "{mode:?}: {ended:?}");
    let out = String::from_utf8(d.logs(&id, "")).unwrap();
    assert_eq!(out, "hello from the transfer\n");
}
both_modes!(a_start_during_a_transfer_names_the_transfer);

/// `sbx run`, `sbx wait` and `sbx inspect` print the `error` the daemon recorded for a sandbox
/// whose command could not be run, not only its exit code.
fn sbx_prints_a_sandboxs_error(mode: Mode) {
    let d = Daemon::start(mode);
    let out = d.sbx(&["run", "--name", "broken", "--", "/no/such/program"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let row = d.sandbox("broken");
    let error = row.error.clone().expect("the daemon records why");
    assert!(
        stderr.contains(&format!("sbx: sandbox {}: {error}", row.id)),
        "{mode:?}: {stderr}"
    );
    for args in [&["wait", "broken"][..], &["inspect", "broken"][..]] {
        let out = d.sbx(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains(&format!("sbx: sandbox {}: {error}", row.id)),
            "{mode:?} {args:?}: {stderr}"
        );
    }
    // stdout of inspect is still the JSON document alone.
    let out = d.sbx(&["inspect", "broken"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"], json!(error));
}
both_modes!(sbx_prints_a_sandboxs_error);

/// `limits.disk_bytes` larger than the daemon's state filesystem (here 1 PiB, which ext4 cannot
/// even size a file to) is the client's mistake: 422 naming the field, for a create and for a
/// created sandbox's start alike; a cap that fits still works.
#[test]
fn a_disk_cap_beyond_the_filesystem_is_422() {
    let d = Daemon::start(Mode::Privileged);
    let info = d.get("/v1/info").json();
    if !info["limits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l == "disk")
    {
        assert!(
            std::env::var("SANDBOXD_E2E_REQUIRE").is_err(),
            "this host cannot enforce disk limits: {info}"
        );
        return;
    }
    for start in [true, false] {
        let reply = d
            .request("POST", "/v1/sandboxes")
            .json(
                &json!({"command": ["true"], "start": start, "limits": {"disk_bytes": 1u64 << 50}}),
            )
            .send();
        assert_eq!(reply.status, 422, "{}", reply.body);
        let body = reply.json();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("limits.disk_bytes"),
            "{body}"
        );
    }
    let s = d.create(json!({"command": ["true"], "limits": {"disk_bytes": 64u64 << 20}}));
    assert_eq!(d.wait(&s.id.to_string()).state, SandboxState::Exited);
}
