//! Transport: the local unix socket, TLS beyond loopback, request limits and rate limiting.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandboxd_tests::{binaries, ensure_user, require_e2e, Daemon, Mode, DAEMON_USER};

fn sbx_local(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binaries().join("sbx"));
    cmd.env_remove("SANDBOXD_URL")
        .env_remove("SANDBOXD_TOKEN")
        .env("SANDBOXD_STATE_DIR", &d.state_dir);
    d.sbx_command(cmd, args)
}

#[test]
fn the_local_socket_serves_root_without_a_token_and_nobody_else() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let socket = d.state_dir.join("api.sock");
    let meta = std::fs::metadata(&socket).expect("the daemon creates api.sock");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "api.sock mode");
    let token = std::fs::metadata(d.state_dir.join("admin.token")).unwrap();
    assert_eq!(
        token.permissions().mode() & 0o777,
        0o600,
        "admin.token mode"
    );

    // sbx as root without --url or a token: over the socket, HTTP and the log websocket both.
    let out = sbx_local(&d, &["run", "--", "echo", "over the socket"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sbx run over api.sock: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over the socket\n");
    let out = sbx_local(&d, &["ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sbx_local(&d, &["token", "ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another uid: refused by the file mode, and by the peer check even when the mode allows it.
    let curl_as_nobody = || {
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "--",
            ])
            .args([
                "curl",
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--unix-socket")
            .arg(&socket)
            .arg("http://localhost/v1/info")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let code = curl_as_nobody();
    assert!(code == "000" || code.starts_with('4'), "nobody got {code}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir_mode = std::fs::metadata(&d.state_dir)
        .unwrap()
        .permissions()
        .mode();
    std::fs::set_permissions(&d.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let code = curl_as_nobody();
    std::fs::set_permissions(&d.state_dir, std::fs::Permissions::from_mode(dir_mode)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        code == "000" || code == "401" || code == "403",
        "SO_PEERCRED let uid 65534 in: {code}"
    );
    // The daemon's own uid is let in.
    let (uid, gid) = ensure_user(DAEMON_USER);
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--clear-groups",
        ])
        .args([
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--unix-socket")
        .arg(&socket)
        .arg("http://localhost/v1/info")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the daemon's own uid"
    );
}

#[test]
fn sbx_without_any_way_in_fails_in_one_clear_line() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let empty = std::env::temp_dir().join(format!("sbx-no-state-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let mut cmd = Command::new(binaries().join("sbx"));
    cmd.env("SANDBOXD_URL", &d.url)
        .env_remove("SANDBOXD_TOKEN")
        .env("SANDBOXD_STATE_DIR", &empty);
    let out = d.sbx_command(cmd, &["ls"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--token") && err.contains("SANDBOXD_TOKEN"),
        "{err}"
    );
    // Positive control: without a URL, the state directory's local socket lets it in.
    let mut cmd = Command::new(binaries().join("sbx"));
    cmd.env_remove("SANDBOXD_URL")
        .env_remove("SANDBOXD_TOKEN")
        .env("SANDBOXD_STATE_DIR", &d.state_dir);
    let out = d.sbx_command(cmd, &["ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&empty);
}

/// Issue 12, finding 5: given a URL but no token, sbx must not send the admin token it can read
/// in a state directory to whatever server the URL names.
#[test]
fn sbx_never_sends_the_state_dirs_admin_token_to_a_url() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let admin = std::fs::read_to_string(d.state_dir.join("admin.token")).unwrap();
    assert!(!admin.trim().is_empty());
    // A server that is not the daemon: it records the request head and answers 401.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut heads = Vec::new();
        listener.set_nonblocking(false).unwrap();
        // sbx makes one request; stop after the first (or when sbx gives up and the test ends).
        if let Ok((mut conn, _)) = listener.accept() {
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match std::io::Read::read(&mut conn, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = r#"{"error":{"code":"unauthorized","message":"no token"}}"#;
            let _ = std::io::Write::write_all(
                &mut conn,
                format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            heads.push(String::from_utf8_lossy(&head).into_owned());
        }
        heads
    });
    let mut cmd = Command::new(binaries().join("sbx"));
    cmd.env("SANDBOXD_URL", &url)
        .env_remove("SANDBOXD_TOKEN")
        .env("SANDBOXD_STATE_DIR", &d.state_dir);
    let out = d.sbx_command(cmd, &["ls"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--token"), "the hint names --token: {err}");
    let heads = server.join().unwrap();
    // The probe reached the server (so the absence below means something).
    assert_eq!(heads.len(), 1, "sbx made no request: {err}");
    let head = heads[0].to_ascii_lowercase();
    assert!(head.starts_with("get /v1/sandboxes"), "{head}");
    assert!(!head.contains("authorization"), "{head}");
    assert!(
        !heads[0].contains(admin.trim()),
        "the admin token left: {}",
        heads[0]
    );
}

#[test]
fn listening_beyond_loopback_needs_tls() {
    require_e2e!();
    ensure_user(DAEMON_USER);
    let state = std::env::temp_dir().join(format!("sandboxd-e2e-notls-{}", std::process::id()));
    std::fs::create_dir_all(&state).unwrap();
    let mut child = Command::new(binaries().join("sandboxd"))
        .args(["--listen", "0.0.0.0:0", "--state-dir"])
        .arg(&state)
        .args(["--user", DAEMON_USER])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sandboxd --listen 0.0.0.0:0 without TLS kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let _ = std::fs::remove_dir_all(&state);
    assert!(!status.success(), "exit status {status}: {err}");
    assert!(
        err.contains("--tls-cert"),
        "the message names --tls-cert: {err}"
    );
}

#[test]
fn tls_beyond_loopback_works() {
    require_e2e!();
    let dir = std::env::temp_dir().join(format!("sandboxd-e2e-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let d = Daemon::start_on(
        Mode::Privileged,
        "0.0.0.0:0",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--allowed-host",
            "localhost",
        ],
    );
    let port = d.addr.rsplit(':').next().unwrap().to_string();
    let curl = |path: &str, token: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("--cacert")
            .arg(&cert)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let out = cmd
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let token = std::fs::read_to_string(d.state_dir.join("admin.token")).unwrap();
    assert_eq!(curl("/healthz", None), "200", "{}", d.log());
    assert_eq!(curl("/v1/info", Some(token.trim())), "200");
    assert_eq!(curl("/v1/info", None), "401");
    // Plain HTTP on the TLS port gets nothing useful.
    let plain = Command::new("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Write a raw request and read the answer's status line (None if the daemon just closed).
fn raw_status(d: &Daemon, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(&d.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

fn assert_healthy(d: &Daemon) {
    let reply = d.request("GET", "/healthz").token(None).send();
    assert_eq!(reply.status, 200, "the daemon is unwell: {}", d.log());
}

#[test]
fn oversize_headers_and_bodies_are_refused_quickly() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let auth = d.auth_header().unwrap_or_default();
    let started = Instant::now();
    let big = "a".repeat(64 << 10);
    let request = format!(
        "GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    );
    let status = raw_status(&d, request.as_bytes());
    assert!(
        status.is_none_or(|s| s == 431 || s == 400 || s == 413),
        "64 KiB header answered {status:?}"
    );
    assert_healthy(&d);

    let body = vec![b' '; 2 << 20];
    let reply = d
        .request("POST", "/v1/sandboxes")
        .header("content-type", "application/json")
        .body(body)
        .send();
    assert_eq!(reply.status, 413, "2 MiB body: {}", reply.body);
    assert_healthy(&d);

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let reply = d.request("POST", "/v1/sandboxes").json_text(&deep).send();
    assert!(
        reply.status / 100 == 4,
        "deep JSON: {} {}",
        reply.status,
        reply.body
    );
    assert_healthy(&d);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_burst_gets_429_with_retry_after_and_others_still_get_through() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let burst = d.create_token("team-burst", "user");
    let other = d.create_token("team-calm", "user");
    let started = Instant::now();
    let mut limited = None;
    for _ in 0..2000 {
        let resp = d.request("GET", "/v1/info").token(Some(&burst)).send();
        if resp.status == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.unwrap_or_else(|| {
        panic!(
            "2000 requests in {:?} were never rate limited",
            started.elapsed()
        )
    });
    assert_eq!(resp.assert_error(429, "burst"), "rate_limited");
    let retry_after: u64 = resp
        .header("retry-after")
        .expect("429 carries Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    // Another token is not starved, and the daemon is healthy.
    let reply = d.request("GET", "/v1/info").token(Some(&other)).send();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_healthy(&d);
}

#[test]
fn an_oversized_websocket_message_closes_that_socket_and_nothing_else() {
    sandboxd_tests::require_e2e!();
    let d = sandboxd_tests::Daemon::start(sandboxd_tests::Mode::Privileged);
    let id = d
        .create(serde_json::json!({"command": ["sleep", "30"]}))
        .id
        .to_string();
    let mut ws = d.logs_websocket(&id, "");
    // The log websocket has nothing to hear from clients: 1 MiB is far past its limit.
    let _ = ws.send(tungstenite::Message::Binary(vec![0u8; 1 << 20].into()));
    let closed = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(_)) | Err(_) => break true,
            Ok(_) => continue,
        }
    };
    assert!(closed);
    assert_eq!(d.get("/healthz").status, 200);
    assert_eq!(d.sandbox(&id).state, sandboxd_api::SandboxState::Running);
}

#[test]
fn a_trickling_body_times_out() {
    use std::io::{Read, Write};
    sandboxd_tests::require_e2e!();
    let d = sandboxd_tests::Daemon::start(sandboxd_tests::Mode::Privileged);
    let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"command\"",
        d.token().unwrap_or_default()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // ... and nothing more: the daemon answers 408 instead of waiting forever.
    let mut answer = vec![0u8; 512];
    let n = stream.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(d.get("/healthz").status, 200);
}
