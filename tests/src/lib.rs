//! Harness for the end-to-end tests: builds the real binaries, starts `sandboxd` in privileged
//! mode (as root with `--user`, so the daemon itself runs unprivileged) or fully rootless (the
//! daemon started as an unprivileged uid), and talks to it over real HTTP and websockets.
//!
//! These tests need root to create their test users and to start the privileged helper. Without
//! root they are skipped with a message, unless `SANDBOXD_E2E_REQUIRE=1` (set by `.ci/run`), which
//! turns a skip into a failure so CI can never pass by testing nothing.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod internet;

use sandboxd_api::Sandbox;
use serde_json::{json, Value};

/// Users the harness creates (system users without a home or a shell).
pub const DAEMON_USER: &str = "sbx-e2e-daemon";
pub const ROOTLESS_USER: &str = "sbx-e2e-rootless";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Root starts the daemon, which starts the root helper and drops to `DAEMON_USER`.
    Privileged,
    /// The daemon is started as `ROOTLESS_USER`; its helper has only that user's rights.
    Rootless,
}

/// Whether the end-to-end tests can run here. Panics instead of skipping when required.
pub fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("SANDBOXD_E2E_REQUIRE").as_deref() == Ok("1") {
        panic!("SANDBOXD_E2E_REQUIRE=1 but the end-to-end tests need root to create their users");
    }
    eprintln!("skipping: end-to-end tests need root (set SANDBOXD_E2E_REQUIRE=1 to fail instead)");
    false
}

/// Skip the calling test (returning early) when the harness cannot run here.
#[macro_export]
macro_rules! require_e2e {
    () => {
        if !$crate::can_run() {
            return;
        }
    };
}

/// Run the test function `name(mode: Mode)` in both modes, as two tests reported separately
/// (`<name>::privileged` and `<name>::rootless`), so a failure in one mode never hides the other
/// mode's result. The function stays an ordinary one (formatted, documented, found by the
/// editor); the macro adds a module of the same name with the two tests. Each skips like
/// [`require_e2e!`] (or fails under `SANDBOXD_E2E_REQUIRE=1`).
///
/// ```text
/// /// What the test shows.
/// fn first_sandbox_runs(mode: Mode) {
///     let d = Daemon::start(mode);
///     assert_eq!(d.sh("echo hi"), "hi\n");
/// }
/// both_modes!(first_sandbox_runs);
/// ```
#[macro_export]
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            #[test]
            fn privileged() {
                $crate::require_e2e!();
                super::$name($crate::Mode::Privileged);
            }

            #[test]
            fn rootless() {
                $crate::require_e2e!();
                super::$name($crate::Mode::Rootless);
            }
        }
    };
}

/// The workspace's target directory, found from this test executable (target/debug/deps/x).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps")
        .to_path_buf()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

const BIN_DIR_PREFIX: &str = "sandboxd-e2e-bin-";

/// Remove the binaries directories of test processes that are gone (each test binary makes one
/// and cannot remove it at exit, since statics are not dropped).
fn remove_stale_binary_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(BIN_DIR_PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_exists(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Build the binaries once, then copy them to a world-readable directory so an unprivileged
/// daemon can execute them wherever the checkout lives (CI clones under /root, which is 0700).
pub fn binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let profile_dir = target_dir();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .current_dir(workspace_root())
            .args(["build", "--workspace", "--bins"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        remove_stale_binary_dirs();
        let dir = std::env::temp_dir().join(format!("{BIN_DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the binaries directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for bin in ["sandboxd", "sandboxd-helper", "sandboxd-egress", "sbx"] {
            let dest = dir.join(bin);
            // A hard link costs no space (a copy of the debug binaries is about 240 MB per test
            // process); a copy only where the target directory is on another filesystem.
            std::fs::hard_link(profile_dir.join(bin), &dest)
                .or_else(|_| std::fs::copy(profile_dir.join(bin), &dest).map(drop))
                .unwrap_or_else(|e| panic!("copy {bin}: {e}"));
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        dir
    })
}

/// Create a system user if it does not exist; returns (uid, gid).
pub fn ensure_user(name: &str) -> (u32, u32) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status()
            .expect("useradd runs");
        assert!(status.success(), "useradd {name} failed");
    }
    let user = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .expect("the user exists now");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// Each daemon gets its own uid ranges, so daemons of concurrent tests never share one.
fn next_uid_base() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst) + std::process::id() % 64 * 64;
    // 8 slots and the image range after them (see the helper's config.rs), all below 2^31:
    // `ping_group_range` cannot name a gid above 2^31 - 1, so higher ranges could not ping.
    const RANGES: u32 = (i32::MAX as u32 - 300_000_000) / (9 * 65536);
    300_000_000 + (n % RANGES) * 9 * 65536
}

/// A running daemon. Killed, and its sandboxes and state removed, on drop.
pub struct Daemon {
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub url: String,
    pub addr: String,
    /// The uid the daemon runs as.
    pub uid: u32,
    uid_base: u32,
    extra_args: Vec<String>,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    http: reqwest::blocking::Client,
    /// The admin token the daemon wrote to `<state-dir>/admin.token` (None before auth existed).
    token: Option<String>,
}

/// The blocking HTTP client every [`Request`] goes through (the request adds its token).
fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

impl Daemon {
    pub fn start(mode: Mode) -> Daemon {
        Self::start_with(mode, &[])
    }

    /// Start a daemon with extra command-line arguments (kept across restarts).
    pub fn start_with(mode: Mode, extra_args: &[&str]) -> Daemon {
        Self::start_on(mode, "127.0.0.1:0", extra_args)
    }

    /// Start a daemon listening on `listen` with extra command-line arguments.
    pub fn start_on(mode: Mode, listen: &str, extra_args: &[&str]) -> Daemon {
        let state_dir =
            std::env::temp_dir().join(format!("sandboxd-e2e-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&state_dir).expect("create the state dir");
        let uid = match mode {
            Mode::Privileged => ensure_user(DAEMON_USER).0,
            Mode::Rootless => {
                let (uid, gid) = ensure_user(ROOTLESS_USER);
                nix::unistd::chown(&state_dir, Some(uid.into()), Some(gid.into())).expect("chown");
                uid
            }
        };
        let mut daemon = Daemon {
            mode,
            state_dir,
            url: String::new(),
            addr: String::new(),
            uid,
            uid_base: next_uid_base(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            http: http_client(),
            token: None,
        };
        daemon.spawn(listen);
        daemon
    }

    /// Start (or restart) the daemon process on `listen`.
    fn spawn(&mut self, listen: &str) {
        let mut cmd = Command::new(binaries().join("sandboxd"));
        cmd.args(["--listen", listen, "--state-dir"])
            .arg(&self.state_dir)
            .args(["--uid-base", &self.uid_base.to_string(), "--uid-slots", "8"])
            .args(&self.extra_args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SANDBOXD_LOG", "info,sandboxd=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match self.mode {
            Mode::Privileged => {
                cmd.args(["--user", DAEMON_USER]);
            }
            Mode::Rootless => {
                let (uid, gid) = ensure_user(ROOTLESS_USER);
                cmd.uid(uid).gid(gid).env("HOME", "/nonexistent");
            }
        }
        let mut child = cmd.spawn().expect("start sandboxd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let clean = strip_ansi(&line);
                // The TCP address (possibly with a scheme); not the unix socket's path.
                if let Some(addr) = clean
                    .split("listening on ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(|a| {
                        a.trim_start_matches("https://")
                            .trim_start_matches("http://")
                            .trim_end_matches(['/', ',', ')'])
                    })
                    .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&clean);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("sandboxd did not start; its log:\n{}", self.log());
            }
        };
        self.addr = addr.clone();
        self.url = format!("http://{addr}");
        self.child = Some(child);
        self.token = self.read_admin_token();
    }

    /// The admin token from `<state-dir>/admin.token`. A daemon without auth writes none; a daemon
    /// with auth answers 401 without a token, and then the file must appear.
    fn read_admin_token(&self) -> Option<String> {
        let path = self.state_dir.join("admin.token");
        let read = || {
            std::fs::read_to_string(&path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        };
        if let Some(token) = read() {
            return Some(token);
        }
        let status = self.request("GET", "/v1/info").token(None).send().status;
        if status != 401 {
            return None;
        }
        let mut token = None;
        eventually(Duration::from_secs(10), || {
            token = read();
            token.is_some()
        });
        assert!(
            token.is_some(),
            "the daemon answers 401 but wrote no {}; its log:\n{}",
            path.display(),
            self.log()
        );
        token
    }

    /// The admin token (None against a daemon without authentication).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The `Authorization` header value of the admin token, if any.
    pub fn auth_header(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// Create a token with the admin token (`POST /v1/tokens`) and return the whole answer.
    pub fn create_token_with(&self, tenant: &str, role: &str, ttl_secs: Option<u64>) -> Value {
        let mut body = json!({ "tenant": tenant, "role": role });
        if let Some(ttl) = ttl_secs {
            body["ttl_secs"] = json!(ttl);
        }
        let reply = self.post("/v1/tokens", &body);
        assert_eq!(
            reply.status, 201,
            "POST /v1/tokens {body}: {} {}",
            reply.status, reply.body
        );
        reply.json()
    }

    /// Create a token for `tenant` with `role` and return its secret.
    pub fn create_token(&self, tenant: &str, role: &str) -> String {
        self.create_token_with(tenant, role, None)["token"]
            .as_str()
            .expect("the answer carries the secret")
            .to_string()
    }

    /// A websocket handshake request for `path` (e.g. `/v1/sandboxes/ID/logs?offset=0`) carrying
    /// `token` as a bearer token (or nothing).
    pub fn ws_request_as(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> tungstenite::handshake::client::Request {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .expect("a websocket request");
        if let Some(token) = token {
            request.headers_mut().insert(
                "Authorization",
                format!("Bearer {token}").parse().expect("header value"),
            );
        }
        request
    }

    /// A websocket handshake request for `path` with the admin token.
    pub fn ws_request(&self, path: &str) -> tungstenite::handshake::client::Request {
        self.ws_request_as(path, self.token())
    }

    /// Open a websocket on `path` with `token` (or none); its HTTP status when refused.
    pub fn websocket_as(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<tungstenite::WebSocket<TcpStream>, u16> {
        let stream = TcpStream::connect(&self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        match tungstenite::client(self.ws_request_as(path, token), stream) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("websocket handshake on {path} failed: {e}"),
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the daemon runs")
    }

    /// SIGKILL the daemon (its helper follows by PDEATHSIG); sandboxes must survive.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait up to `timeout` for the daemon to exit on its own; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the daemon again on the same state directory and the same address.
    pub fn restart(&mut self) {
        self.kill9();
        let addr = self.addr.clone();
        // The old socket may linger in TIME_WAIT for a moment; the daemon must be able to rebind.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpListener::bind(&addr).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn(&addr);
    }

    /// A request to this daemon with the admin token (see [`Request`] for the rest):
    /// `d.request("PUT", path).body(bytes).send()`.
    pub fn request(&self, method: &str, path: &str) -> Request<'_> {
        Request {
            daemon: self,
            method: reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method"),
            path: path.to_string(),
            token: self.token.clone(),
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
            timeout: None,
        }
    }

    /// `GET path` with the admin token, read to the end.
    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path).send()
    }

    /// `POST path` with a JSON body and the admin token, read to the end.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path).json(body).send()
    }

    /// `DELETE path` with the admin token, read to the end.
    pub fn delete(&self, path: &str) -> Reply {
        self.request("DELETE", path).send()
    }

    /// Create a sandbox and return it, asserting 201.
    pub fn create(&self, spec: Value) -> Sandbox {
        let reply = self.post("/v1/sandboxes", &spec);
        assert_eq!(
            reply.status,
            201,
            "create {spec} answered {}: {}\n{}",
            reply.status,
            reply.body,
            self.log()
        );
        reply.parse()
    }

    /// Run a command to completion (`?wait=true`) and return the sandbox and its stdout+stderr.
    pub fn run(&self, command: &[&str]) -> (Sandbox, String) {
        self.run_spec(json!({ "command": command }))
    }

    pub fn run_spec(&self, spec: Value) -> (Sandbox, String) {
        let reply = self.post("/v1/sandboxes?wait=true", &spec);
        assert_eq!(
            reply.status,
            201,
            "create {spec} answered {}: {}\n{}",
            reply.status,
            reply.body,
            self.log()
        );
        let sandbox: Sandbox = reply.parse();
        let logs = self.logs(&sandbox.id.to_string(), "");
        (sandbox, String::from_utf8_lossy(&logs).into_owned())
    }

    /// Run a shell script in a sandbox, assert it exited 0, and return its output.
    pub fn sh(&self, script: &str) -> String {
        let (sandbox, output) = self.run(&["sh", "-c", script]);
        assert_eq!(
            sandbox.exit_code,
            Some(0),
            "script {script:?} failed ({:?}): {output}",
            sandbox.reason
        );
        output
    }

    pub fn logs(&self, id: &str, query: &str) -> Vec<u8> {
        let reply = self.get(&format!("/v1/sandboxes/{id}/logs{query}"));
        assert_eq!(reply.status, 200, "logs of {id}: {}", reply.body);
        reply.bytes
    }

    pub fn sandbox(&self, id: &str) -> Sandbox {
        let reply = self.get(&format!("/v1/sandboxes/{id}"));
        assert_eq!(reply.status, 200, "GET {id}: {}", reply.body);
        reply.parse()
    }

    pub fn wait(&self, id: &str) -> Sandbox {
        let reply = self
            .request("POST", &format!("/v1/sandboxes/{id}/wait"))
            .send();
        assert_eq!(reply.status, 200, "wait {id}: {}", reply.body);
        reply.parse()
    }

    /// The file the helper binds its hub network namespace (the bridges) to.
    pub fn hub_path(&self) -> PathBuf {
        self.state_dir.join("helper").join("hub.net")
    }

    /// The directory the helper keeps for a sandbox.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    /// Open the log websocket of a sandbox (with an optional query string such as `?offset=10`).
    pub fn logs_websocket(&self, id: &str, query: &str) -> tungstenite::WebSocket<TcpStream> {
        let stream = TcpStream::connect(&self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let request = self.ws_request(&format!("/v1/sandboxes/{id}/logs{query}"));
        let (ws, _) = tungstenite::client(request, stream).expect("websocket handshake");
        ws
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Best effort: delete every sandbox so nothing outlives the test.
            if let Ok(list) = self
                .request("GET", "/v1/sandboxes?limit=1000")
                .try_send()
                .and_then(|r| r.json::<Value>())
            {
                for item in list["items"].as_array().into_iter().flatten() {
                    if let Some(id) = item["id"].as_str() {
                        let _ = self
                            .request("DELETE", &format!("/v1/sandboxes/{id}"))
                            .try_send();
                    }
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The helper keeps its (now empty) parent cgroups for the next start on this state
        // directory; a test's state directory has no next start, so remove them.
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(entry.path().join(cgroup_parent_name(&self.state_dir)));
        }
        // The hub of bridged sandboxes stays bound while its daemon is stopped (a restart reuses
        // it); a test's state directory has no next start.
        let _ = nix::mount::umount2(&self.hub_path(), nix::mount::MntFlags::MNT_DETACH);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Poll `f` until it returns true or `timeout` passes (for host-side effects that are
/// asynchronous by nature, such as a process disappearing after a kill).
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A host process's real uid, from /proc (None once it is gone).
pub fn host_uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Read everything from a reader (used for child processes' output).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// A request being built, from [`Daemon::request`]: it carries the admin token unless
/// [`Request::token`] says otherwise. [`Request::send`] reads the whole answer into a [`Reply`];
/// [`Request::stream`] hands over the response to read as it arrives.
pub struct Request<'a> {
    daemon: &'a Daemon,
    method: reqwest::Method,
    path: String,
    token: Option<String>,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<reqwest::blocking::Body>,
    timeout: Option<Duration>,
}

impl Request<'_> {
    /// A query parameter, percent-encoded (for values a test does not want to encode by hand).
    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.to_string(), value.to_string()));
        self
    }

    /// Send `token` as the bearer token instead of the admin token (None: no token at all).
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self
    }

    /// A header (added after the bearer token, so an `authorization` here is sent as well).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A raw body (bytes, a string, or a streaming `reqwest::blocking::Body`).
    pub fn body(mut self, body: impl Into<reqwest::blocking::Body>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// A JSON body with `Content-Type: application/json`.
    pub fn json(self, body: &Value) -> Self {
        self.json_text(&body.to_string())
    }

    /// A body sent as JSON exactly as written (for malformed or hand-written bodies).
    pub fn json_text(self, body: &str) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string())
    }

    /// A longer (or shorter) timeout than the client's 60 seconds.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Send it; the response, unread, or the transport error.
    pub fn try_send(self) -> reqwest::Result<reqwest::blocking::Response> {
        let url = format!("{}{}", self.daemon.url, self.path);
        let mut req = self.daemon.http.request(self.method, url);
        if let Some(token) = &self.token {
            let mut value: reqwest::header::HeaderValue = format!("Bearer {token}")
                .parse()
                .expect("a token is a header value");
            value.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, value);
        }
        if !self.query.is_empty() {
            req = req.query(&self.query);
        }
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        if let Some(body) = self.body {
            req = req.body(body);
        }
        if let Some(timeout) = self.timeout {
            req = req.timeout(timeout);
        }
        req.send()
    }

    /// Send it and hand over the response to read as it arrives (panics if it cannot be sent).
    pub fn stream(self) -> reqwest::blocking::Response {
        let what = format!("{} {}", self.method, self.path);
        self.try_send()
            .unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }

    /// Send it and read the whole answer (panics if it cannot be sent).
    pub fn send(self) -> Reply {
        Reply::from(self.stream())
    }
}

/// A response read to the end: its status, headers and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body as text (lossy where it is not UTF-8).
    pub body: String,
    /// The body as it came.
    pub bytes: Vec<u8>,
}

impl From<reqwest::blocking::Response> for Reply {
    fn from(resp: reqwest::blocking::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }
}

impl Reply {
    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        self.parse()
    }

    /// The body as JSON of type `T` (panics with the body when it is not).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.bytes).unwrap_or_else(|e| {
            panic!(
                "answer {} is not the JSON expected ({e}): {:?}",
                self.status, self.body
            )
        })
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert this is an API error with `status`, in the one error shape
    /// `{"error":{"code","message"}}` with a non-empty code and message; returns the code.
    pub fn assert_error(&self, status: u16, what: &str) -> String {
        assert_eq!(
            self.status, status,
            "{what}: expected {status}, got {}: {}",
            self.status, self.body
        );
        let json = self.json();
        let code = json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && !message.is_empty(),
            "{what}: error body is not {{\"error\":{{\"code\",\"message\"}}}}: {}",
            self.body
        );
        code
    }
}

impl Daemon {
    /// `POST /v1/sandboxes/{id}/start` of a created sandbox right after a file transfer into it.
    /// A transfer's worker holds the created root until it has exited, and the daemon answers a
    /// transfer only once its worker is gone, so a start right after the answer must find the
    /// sandbox free: no retry here (a 409 would be the race coming back).
    pub fn start_after_transfer(&self, id: &str) -> Reply {
        self.request("POST", &format!("/v1/sandboxes/{id}/start"))
            .send()
    }

    /// Create a sandbox without waiting for it and return its id (asserting 201).
    pub fn start_sandbox(&self, command: &[&str]) -> String {
        self.create(json!({ "command": command })).id.to_string()
    }

    /// Run the `sbx` client against this daemon with a timeout; returns its output.
    pub fn sbx(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(binaries().join("sbx"));
        cmd.env("SANDBOXD_URL", &self.url);
        if let Some(token) = self.token() {
            cmd.env("SANDBOXD_TOKEN", token);
        }
        self.sbx_command(cmd, args)
    }

    /// Run `sbx` as prepared in `cmd` (environment, uid...) with `args` and a timeout.
    pub fn sbx_command(&self, mut cmd: Command, args: &[&str]) -> std::process::Output {
        let child = cmd
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sbx");
        let pid = child.id();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !done.load(Ordering::SeqCst) {
                    if Instant::now() > deadline {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let output = child.wait_with_output().expect("sbx output");
        done.store(true, Ordering::SeqCst);
        let _ = watchdog.join();
        output
    }
}

/// Everything a log websocket sent until it closed.
#[derive(Debug, Default)]
pub struct WsLog {
    /// Binary messages as (channel, payload), in order.
    pub frames: Vec<(u8, Vec<u8>)>,
    /// Text messages, in order (there should be exactly one, the `LogEnd`).
    pub texts: Vec<String>,
    /// Whether a close frame arrived (and whether anything other than a close came after a text).
    pub closed: bool,
    /// Binary messages that arrived after the first text message.
    pub binary_after_text: usize,
    /// Binary messages without a channel byte.
    pub empty_binary: usize,
}

impl WsLog {
    /// The concatenated payloads, of one channel or (None) of all.
    pub fn bytes(&self, channel: Option<u8>) -> Vec<u8> {
        self.frames
            .iter()
            .filter(|(c, _)| channel.is_none_or(|want| *c == want))
            .flat_map(|(_, data)| data.iter().copied())
            .collect()
    }
}

/// Read a log websocket until the server closes it (or the read times out, which panics).
pub fn read_websocket(mut ws: tungstenite::WebSocket<TcpStream>) -> WsLog {
    use tungstenite::Message;
    let mut log = WsLog::default();
    loop {
        match ws.read() {
            Ok(Message::Binary(data)) => {
                if !log.texts.is_empty() {
                    log.binary_after_text += 1;
                }
                match data.split_first() {
                    Some((channel, rest)) => log.frames.push((*channel, rest.to_vec())),
                    None => log.empty_binary += 1,
                }
            }
            Ok(Message::Text(text)) => log.texts.push(text.to_string()),
            Ok(Message::Close(_)) => {
                log.closed = true;
                // Complete the closing handshake; errors here do not matter.
                let _ = ws.flush();
                let _ = ws.read();
                return log;
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {
                return log
            }
            Err(e) => panic!(
                "websocket read failed after {} frames: {e}",
                log.frames.len()
            ),
        }
    }
}

/// Every process on the host whose real uid is `uid`.
pub fn processes_of_uid(uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| host_uid_of(*pid) == Some(uid))
        .collect()
}

/// The parent pid of a host process, from /proc (None once it is gone).
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every host process descended from `pid` (children, grandchildren...), not `pid` itself.
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let all: Vec<(i32, i32)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(|p| parent_of(p).map(|parent| (p, parent)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (child, _) in all.iter().filter(|(_, pp)| *pp == parent) {
            if !found.contains(child) {
                found.push(*child);
                frontier.push(*child);
            }
        }
    }
    found
}

/// The parent cgroup the helper uses for a state directory (the same FNV-1a as the helper's
/// `cgroup::parent_name`).
pub fn cgroup_parent_name(state_dir: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("sandboxd.{:012x}", hash & 0xffff_ffff_ffff)
}
