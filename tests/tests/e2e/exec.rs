//! Execs from outside: processes started in a running sandbox through the real daemon, driven
//! over real HTTP and real websockets, in both modes.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use sandboxd_api::{AttachEnd, Exec, SandboxState};
use sandboxd_tests::{both_modes, require_e2e, Daemon, Mode};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

fn create_exec(d: &Daemon, sandbox: &str, spec: Value) -> Exec {
    let resp = d.post(&format!("/v1/sandboxes/{sandbox}/execs"), &spec);
    assert_eq!(
        resp.status,
        201,
        "exec {spec} answered {}: {}\n{}",
        resp.status,
        resp.body,
        d.log()
    );
    resp.parse()
}

/// The exec's whole output (following until it ends) and its final row.
fn finish(d: &Daemon, exec: &Exec) -> (String, Exec) {
    let path = format!(
        "/v1/sandboxes/{}/execs/{}/logs?follow=true",
        exec.sandbox_id, exec.id
    );
    let resp = d.get(&path);
    assert_eq!(resp.status, 200, "{}", resp.body);
    let out = resp.body;
    (out, get_exec(d, exec))
}

fn get_exec(d: &Daemon, exec: &Exec) -> Exec {
    let resp = d.get(&format!(
        "/v1/sandboxes/{}/execs/{}",
        exec.sandbox_id, exec.id
    ));
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.parse()
}

fn run_exec(d: &Daemon, sandbox: &str, command: &[&str]) -> (String, Exec) {
    let exec = create_exec(d, sandbox, json!({ "command": command }));
    finish(d, &exec)
}

fn attach(d: &Daemon, exec: &Exec, query: &str) -> Result<WebSocket<TcpStream>, u16> {
    d.websocket_as(
        &format!(
            "/v1/sandboxes/{}/execs/{}/attach{query}",
            exec.sandbox_id, exec.id
        ),
        d.token(),
    )
}

fn send_stdin(ws: &mut WebSocket<TcpStream>, data: &[u8]) {
    let mut msg = vec![0u8];
    msg.extend_from_slice(data);
    ws.send(Message::Binary(msg.into())).expect("send stdin");
}

fn send_text(ws: &mut WebSocket<TcpStream>, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .expect("send control");
}

/// Read output until `want` appears in it (or the timeout passes); returns everything read.
fn read_until(ws: &mut WebSocket<TcpStream>, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Binary(data)) => {
                out.extend_from_slice(&data[1..]);
                if String::from_utf8_lossy(&out).contains(want) {
                    break;
                }
            }
            Ok(Message::Text(t)) => panic!(
                "exec ended while waiting for {want:?}: {t}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(_) => {}
            Err(e) => panic!(
                "websocket failed waiting for {want:?}: {e}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Read to the end: all output bytes and the final `AttachEnd`.
fn read_to_end(ws: &mut WebSocket<TcpStream>) -> (Vec<u8>, AttachEnd) {
    let mut out = Vec::new();
    loop {
        match ws.read().expect("websocket read") {
            Message::Binary(data) => out.extend_from_slice(&data[1..]),
            Message::Text(t) => {
                let end: AttachEnd = serde_json::from_str(&t).expect("an AttachEnd");
                return (out, end);
            }
            Message::Close(_) => panic!("closed without an AttachEnd"),
            _ => {}
        }
    }
}

fn exec_sees_the_main_process_and_its_files_and_exit_codes_are_exact(mode: Mode) {
    let d = Daemon::start(mode);
    let id = d.start_sandbox(&["sh", "-c", "echo from-main > /work/shared; exec sleep 300"]);
    // The main process's file is visible once it wrote it.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = run_exec(&d, &id, &["cat", "/work/shared"]).0;
        if seen == "from-main\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, "from-main\n", "{mode:?}");
    // Same PID namespace: the main command (PID 2, under init) is visible; so is the hostname.
    let (ps, exec) = run_exec(
        &d,
        &id,
        &["sh", "-c", "cat /proc/2/cmdline | tr '\\0' ' '; echo; hostname; id -u; cat /proc/self/status | grep -E '^(CapBnd|CapEff|CapInh|CapAmb|NoNewPrivs|Seccomp|Uid|Gid):'; cat /proc/self/cgroup; for n in user mnt pid uts ipc net cgroup; do [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/2/ns/$n)\" ] || echo \"namespace $n differs from the main command's\"; done"],
    );
    assert_eq!(exec.exit_code, Some(0), "{mode:?}: {ps}");
    assert!(ps.starts_with("sleep 300"), "{mode:?}: {ps}");
    let sandbox = d.sandbox(&id);
    assert!(ps.contains(&sandbox.hostname), "{mode:?}: {ps}");
    // The same identity and restrictions as a main command (and all of this one's namespaces:
    // a differing namespace would add a line).
    let (_, main_status) = d.run(&[
        "sh",
        "-c",
        "cat /proc/self/status | grep -E '^(CapBnd|CapEff|CapInh|CapAmb|NoNewPrivs|Seccomp|Uid|Gid):'; cat /proc/self/cgroup",
    ]);
    let exec_status: Vec<&str> = ps.lines().skip(3).collect();
    let main_lines: Vec<String> = main_status.lines().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(exec_status, main_lines, "{mode:?}");
    assert_eq!(ps.lines().nth(2), Some("0"), "{mode:?}: {ps}");
    // Exit codes, exactly.
    for code in [0, 1, 7, 42, 255] {
        let (_, e) = run_exec(&d, &id, &["sh", "-c", &format!("exit {code}")]);
        assert_eq!(e.exit_code, Some(code), "{mode:?}");
        assert_eq!(e.state, SandboxState::Exited);
    }
    let (_, e) = run_exec(&d, &id, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(e.exit_code, Some(128 + 15), "{mode:?}");
    assert_eq!(e.signal.as_deref(), Some("SIGTERM"), "{mode:?}");
    let (out, e) = run_exec(&d, &id, &["no-such-program"]);
    assert_eq!(e.exit_code, Some(127), "{mode:?}: {out}");
    assert!(e.error.is_some(), "{mode:?}");
    // Env and cwd.
    let exec = create_exec(
        &d,
        &id,
        json!({"command": ["sh", "-c", "echo $FOO; pwd"], "env": {"FOO": "bar"}, "cwd": "/tmp"}),
    );
    assert_eq!(finish(&d, &exec).0, "bar\n/tmp\n", "{mode:?}");
    // The list has them all, oldest first.
    let list: Value = d.get(&format!("/v1/sandboxes/{id}/execs")).json();
    let items = list["items"].as_array().expect("items");
    assert!(items.len() >= 9, "{mode:?}");
    assert_eq!(items.last().expect("one")["id"], exec.id.to_string());
    // The main process is untouched by all of this.
    assert_eq!(d.sandbox(&id).state, SandboxState::Running, "{mode:?}");
}
both_modes!(exec_sees_the_main_process_and_its_files_and_exit_codes_are_exact);

fn exec_into_a_sandbox_that_is_not_running_is_409(mode: Mode) {
    let d = Daemon::start(mode);
    let (sandbox, _) = d.run(&["true"]);
    let resp = d.post(
        &format!("/v1/sandboxes/{}/execs", sandbox.id),
        &json!({"command": ["true"]}),
    );
    assert_eq!(resp.status, 409, "{mode:?}");
    let body: Value = resp.json();
    assert_eq!(body["error"]["code"], "not_running");
    // No row was left behind.
    let list: Value = d.get(&format!("/v1/sandboxes/{}/execs", sandbox.id)).json();
    assert_eq!(list["items"], json!([]));
    // Unknown execs and bad requests.
    let resp = d.get(&format!(
        "/v1/sandboxes/{}/execs/{}",
        sandbox.id,
        uuid::Uuid::new_v4()
    ));
    assert_eq!(resp.status, 404);
    let id = d.start_sandbox(&["sleep", "300"]);
    // Another tenant's sandbox answers exactly like a missing one, execs and attach included.
    let other = d.create_token("other-tenant", "user");
    let exec = create_exec(&d, &id, json!({"command": ["true"]}));
    let resp = d
        .request("POST", &format!("/v1/sandboxes/{id}/execs"))
        .token(Some(&other))
        .json(&json!({"command": ["true"]}))
        .send();
    assert_eq!(resp.status, 404, "{mode:?}");
    for path in [
        format!("/v1/sandboxes/{id}/execs"),
        format!("/v1/sandboxes/{id}/execs/{}", exec.id),
        format!("/v1/sandboxes/{id}/execs/{}/logs", exec.id),
    ] {
        let resp = d.request("GET", &path).token(Some(&other)).send();
        assert_eq!(resp.status, 404, "{mode:?} {path}");
    }
    let attach_path = format!("/v1/sandboxes/{id}/execs/{}/attach", exec.id);
    assert_eq!(d.websocket_as(&attach_path, Some(&other)).err(), Some(404));
    // An exec id of one sandbox is not found under another.
    let resp = d.get(&format!("/v1/sandboxes/{}/execs/{}", sandbox.id, exec.id));
    assert_eq!(resp.status, 404);
    for bad in [
        json!({"command": []}),
        json!({"command": ["x"], "cwd": "relative"}),
        json!({"command": ["x"], "env": {"1A": "x"}}),
        json!({"command": ["x"], "cols": 80}),
        json!({"command": ["x"], "tty": true, "rows": 0}),
        json!({"command": ["x"], "unknown": 1}),
    ] {
        let resp = d.post(&format!("/v1/sandboxes/{id}/execs"), &bad);
        assert_eq!(resp.status, 400, "{bad}");
    }
}
both_modes!(exec_into_a_sandbox_that_is_not_running_is_409);

fn an_interactive_shell_on_a_terminal_answers_and_resizes(mode: Mode) {
    let d = Daemon::start(mode);
    let id = d.start_sandbox(&["sleep", "300"]);
    let exec = create_exec(
        &d,
        &id,
        json!({"command": ["sh", "-i"], "tty": true, "stdin": true, "cols": 100, "rows": 30}),
    );
    let mut ws = attach(&d, &exec, "").expect("attach");
    send_stdin(&mut ws, b"echo h''i\n");
    let out = read_until(&mut ws, "hi\r\n", Duration::from_secs(20));
    assert!(out.contains("hi\r\n"), "{mode:?}: {out:?}");
    send_stdin(&mut ws, b"stty size; tty\n");
    let out = read_until(&mut ws, "/dev/pts/", Duration::from_secs(20));
    assert!(out.contains("30 100"), "{mode:?}: {out:?}");
    assert!(out.contains("/dev/pts/"), "{mode:?}: {out:?}");
    send_text(&mut ws, json!({"resize": {"cols": 132, "rows": 43}}));
    send_stdin(&mut ws, b"stty size\n");
    let out = read_until(&mut ws, "43 132", Duration::from_secs(20));
    assert!(out.contains("43 132"), "{mode:?}: {out:?}");
    // Job control through the terminal: ^Z stops the foreground job, ^C interrupts one.
    send_stdin(&mut ws, b"sleep 30\n");
    std::thread::sleep(Duration::from_millis(500));
    send_stdin(&mut ws, b"\x1a");
    let out = read_until(&mut ws, "Stopped", Duration::from_secs(20));
    assert!(out.contains("Stopped"), "{mode:?}: {out:?}");
    send_stdin(&mut ws, b"kill -9 %1; echo job-$((1+1))-done\n");
    let out = read_until(&mut ws, "job-2-done", Duration::from_secs(20));
    assert!(out.contains("job-2-done"), "{mode:?}: {out:?}");
    send_stdin(&mut ws, b"sleep 30\n");
    std::thread::sleep(Duration::from_millis(500));
    send_stdin(&mut ws, b"\x03echo after-$((2+2))\n");
    let out = read_until(&mut ws, "after-4", Duration::from_secs(20));
    assert!(out.contains("after-4"), "{mode:?}: {out:?}");
    send_stdin(&mut ws, b"exit 5\n");
    let (_, end) = read_to_end(&mut ws);
    assert_eq!(end.exit_code, Some(5), "{mode:?}");
    assert_eq!(get_exec(&d, &exec).exit_code, Some(5));
}
both_modes!(an_interactive_shell_on_a_terminal_answers_and_resizes);

fn stdin_piped_to_cat_round_trips_five_megabytes(mode: Mode) {
    let d = Daemon::start(mode);
    let id = d.start_sandbox(&["sleep", "300"]);
    let exec = create_exec(&d, &id, json!({"command": ["cat"], "stdin": true}));
    let mut ws = attach(&d, &exec, "").expect("attach");
    // Pseudo-random bytes, every value included.
    let mut data = Vec::with_capacity(5 << 20);
    let mut x: u32 = 12345;
    while data.len() < 5 << 20 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        data.push((x >> 16) as u8);
    }
    // All of it first, then read: stdin never waits for a reader of the output.
    for chunk in data.chunks(100_000) {
        send_stdin(&mut ws, chunk);
    }
    send_text(&mut ws, json!({"close_stdin": true}));
    let (out, end) = read_to_end(&mut ws);
    assert_eq!(end.exit_code, Some(0), "{mode:?}");
    assert_eq!(out.len(), data.len(), "{mode:?}");
    assert!(out == data, "{mode:?}: the bytes differ");
    // The stored log is the same, and it is stdout only.
    let (logged, _) = finish(&d, &exec);
    assert_eq!(logged.len(), String::from_utf8_lossy(&data).len());
}
both_modes!(stdin_piped_to_cat_round_trips_five_megabytes);

fn dropping_and_reattaching_a_websocket_loses_nothing_and_kills_nothing(mode: Mode) {
    let d = Daemon::start(mode);
    let id = d.start_sandbox(&["sleep", "300"]);
    // A line-numbering loop that reads stdin: it must survive the drop and take input again.
    let exec = create_exec(
        &d,
        &id,
        json!({"command": ["sh", "-c", "i=0; while read line; do i=$((i+1)); echo \"$i:$line\"; done; echo done:$i"], "stdin": true}),
    );
    let mut ws = attach(&d, &exec, "").expect("attach");
    send_stdin(&mut ws, b"a\nb\n");
    let first = read_until(&mut ws, "2:b\n", Duration::from_secs(20));
    // A second writer is refused while the first owns stdin; a reader is welcome.
    assert_eq!(attach(&d, &exec, "?stdin=true").err(), Some(409));
    let mut reader = attach(&d, &exec, "?stdin=false").expect("reader");
    // Drop the writer without a close frame.
    drop(ws);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get_exec(&d, &exec).state, SandboxState::Running, "{mode:?}");
    // Reattach from where we were: nothing lost, nothing repeated.
    let offset = first.len();
    let mut ws = attach(&d, &exec, &format!("?offset={offset}")).expect("reattach");
    send_stdin(&mut ws, b"c\n");
    send_text(&mut ws, json!({"close_stdin": true}));
    let (rest, end) = read_to_end(&mut ws);
    assert_eq!(end.exit_code, Some(0));
    let all = format!("{first}{}", String::from_utf8_lossy(&rest));
    assert_eq!(all, "1:a\n2:b\n3:c\ndone:3\n", "{mode:?}");
    assert_eq!(end.offset as usize, all.len());
    // The reader saw everything too, and stdin frames from it were ignored.
    send_stdin(&mut reader, b"ignored\n");
    let (seen, _) = read_to_end(&mut reader);
    assert_eq!(String::from_utf8_lossy(&seen), all, "{mode:?}");
}
both_modes!(dropping_and_reattaching_a_websocket_loses_nothing_and_kills_nothing);

#[test]
fn an_exec_survives_a_daemon_restart_with_its_output_and_exit() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    let id = d.start_sandbox(&["sleep", "300"]);
    let exec = create_exec(
        &d,
        &id,
        json!({"command": ["sh", "-c", "echo before; read x; echo got:$x; exit 9"], "stdin": true}),
    );
    let mut ws = attach(&d, &exec, "").expect("attach");
    read_until(&mut ws, "before\n", Duration::from_secs(20));
    d.restart();
    // Still running, and stdin still reaches it through the restarted daemon.
    assert_eq!(get_exec(&d, &exec).state, SandboxState::Running);
    let mut ws = attach(&d, &exec, "").expect("attach after restart");
    send_stdin(&mut ws, b"yes\n");
    let (out, end) = read_to_end(&mut ws);
    assert_eq!(String::from_utf8_lossy(&out), "before\ngot:yes\n");
    assert_eq!(end.exit_code, Some(9));
    // An exec that ends while the daemon is down is recorded when it comes back.
    let exec = create_exec(
        &d,
        &id,
        json!({"command": ["sh", "-c", "sleep 1; echo late; exit 4"]}),
    );
    d.kill9();
    std::thread::sleep(Duration::from_secs(2));
    d.restart();
    let (out, e) = finish(&d, &exec);
    assert_eq!(out, "late\n");
    assert_eq!(e.exit_code, Some(4));
    assert_eq!(e.state, SandboxState::Exited);
}

/// tmux on a socket of its own, killed (with everything in it) when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Wait until the screen shows `want`; returns the screen.
    fn wait_for(&self, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if screen.contains(want) || Instant::now() > deadline {
                return screen;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        // kill-server leaves its socket behind.
        let uid = nix::unistd::getuid();
        let _ = std::fs::remove_file(format!("/tmp/tmux-{uid}/{}", self.socket));
    }
}

#[test]
fn sbx_exec_it_drives_a_shell_through_a_real_terminal() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let id = d.start_sandbox(&["sleep", "300"]);
    let tmux = Tmux {
        socket: format!("sbx-e2e-exec-{}", std::process::id()),
    };
    let sbx = sandboxd_tests::binaries().join("sbx");
    let script = format!(
        "{} exec -it {id} -- sh; echo EXIT=$?; sleep 60",
        sbx.display()
    );
    let url = format!("SANDBOXD_URL={}", d.url);
    let token = format!("SANDBOXD_TOKEN={}", d.token().unwrap_or_default());
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        "-e",
        &url,
        "-e",
        &token,
        &script,
    ]);
    // The shell's prompt (root's `#`), then a command typed on the real terminal.
    let screen = tmux.wait_for("#");
    assert!(screen.contains('#'), "no prompt: {screen}");
    tmux.run(&[
        "send-keys",
        "-t",
        "t",
        "echo h''i-$((40+2)); stty size",
        "Enter",
    ]);
    let screen = tmux.wait_for("hi-42");
    assert!(screen.contains("hi-42"), "{screen}");
    let screen = tmux.wait_for("30 100");
    assert!(
        screen.contains("30 100"),
        "the exec's terminal has the local size: {screen}"
    );
    // The local terminal is resized: sbx gets SIGWINCH and resizes the sandbox's terminal.
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.run(&["send-keys", "-t", "t", "clear; stty size", "Enter"]);
    let screen = tmux.wait_for("40 120");
    assert!(screen.contains("40 120"), "{screen}");
    // Raw mode: ^C reaches the sandbox's terminal and interrupts its foreground job, not sbx.
    tmux.run(&["send-keys", "-t", "t", "sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.run(&["send-keys", "-t", "t", "C-c"]);
    tmux.run(&["send-keys", "-t", "t", "echo still-$((1+2))", "Enter"]);
    let screen = tmux.wait_for("still-3");
    assert!(screen.contains("still-3"), "{screen}");
    // The exit code comes back through sbx.
    tmux.run(&["send-keys", "-t", "t", "exit 3", "Enter"]);
    let screen = tmux.wait_for("EXIT=3");
    assert!(screen.contains("EXIT=3"), "{screen}");
}

#[test]
fn sbx_exec_passes_stdin_and_exit_codes() {
    require_e2e!();
    let d = Daemon::start(Mode::Rootless);
    let id = d.start_sandbox(&["sleep", "300"]);
    let out = d.sbx(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // -i: stdin goes to the command, and its end closes the command's stdin.
    let mut child = std::process::Command::new(sandboxd_tests::binaries().join("sbx"))
        .args(["exec", "-i", &id, "--", "sh", "-c", "tr a-z A-Z; exit 4"])
        .env("SANDBOXD_URL", &d.url)
        .env("SANDBOXD_TOKEN", d.token().unwrap_or_default())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sbx");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello exec\n").expect("write");
    }
    let out = child.wait_with_output().expect("sbx output");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO EXEC\n");
    assert_eq!(out.status.code(), Some(4));
    // Into a sandbox that has ended: the daemon's 409, reported as sbx's own error.
    let (sandbox, _) = d.run(&["true"]);
    let out = d.sbx(&["exec", &sandbox.id.to_string(), "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{out:?}"
    );
}

fn the_main_command_can_have_stdin_and_a_terminal(mode: Mode) {
    let d = Daemon::start(mode);
    // A terminal: an interactive shell as the main command.
    let sandbox = d.create(json!({
        "command": ["sh", "-i"], "tty": true, "stdin": true, "cols": 90, "rows": 20
    }));
    let path = format!("/v1/sandboxes/{}/attach", sandbox.id);
    let mut ws = d.websocket_as(&path, d.token()).expect("attach");
    send_stdin(&mut ws, b"echo h''i; stty size\n");
    let out = read_until(&mut ws, "20 90", Duration::from_secs(20));
    assert!(out.contains("hi\r\n"), "{mode:?}: {out:?}");
    send_text(&mut ws, json!({"resize": {"cols": 101, "rows": 33}}));
    send_stdin(&mut ws, b"stty size\n");
    let out = read_until(&mut ws, "33 101", Duration::from_secs(20));
    assert!(out.contains("33 101"), "{mode:?}: {out:?}");
    // A second writer is refused; the main command ends with the shell's exit code.
    assert_eq!(d.websocket_as(&path, d.token()).err(), Some(409));
    send_stdin(&mut ws, b"exit 6\n");
    let (_, end) = read_to_end(&mut ws);
    assert_eq!(end.exit_code, Some(6), "{mode:?}");
    assert_eq!(d.wait(&sandbox.id.to_string()).exit_code, Some(6));

    // A pipe: stdin to `wc -c`, closed with close_stdin; a drop in between loses nothing.
    let sandbox = d.create(json!({"command": ["wc", "-c"], "stdin": true}));
    let path = format!("/v1/sandboxes/{}/attach", sandbox.id);
    let mut ws = d.websocket_as(&path, d.token()).expect("attach");
    send_stdin(&mut ws, &[b'x'; 1000]);
    drop(ws);
    // The daemon notices the drop (and releases stdin) a moment later: 409 until then.
    let mut reattached = Err(0);
    for _ in 0..50 {
        reattached = d.websocket_as(&path, d.token());
        if reattached.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut ws = reattached.expect("reattach");
    send_stdin(&mut ws, &[b'y'; 234]);
    send_text(&mut ws, json!({"close_stdin": true}));
    let (out, end) = read_to_end(&mut ws);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1234", "{mode:?}");
    assert_eq!(end.exit_code, Some(0));
    // Without stdin: attaching as a writer is refused.
    let sandbox = d.create(json!({"command": ["sleep", "30"]}));
    let path = format!("/v1/sandboxes/{}/attach?stdin=true", sandbox.id);
    assert_eq!(d.websocket_as(&path, d.token()).err(), Some(409));
}
both_modes!(the_main_command_can_have_stdin_and_a_terminal);

#[test]
fn sbx_run_it_gives_the_main_command_this_terminal() {
    require_e2e!();
    let d = Daemon::start(Mode::Rootless);
    let tmux = Tmux {
        socket: format!("sbx-e2e-run-{}", std::process::id()),
    };
    let sbx = sandboxd_tests::binaries().join("sbx");
    let script = format!(
        "{} run --rm -it -- sh; echo EXIT=$?; sleep 60",
        sbx.display()
    );
    let url = format!("SANDBOXD_URL={}", d.url);
    let token = format!("SANDBOXD_TOKEN={}", d.token().unwrap_or_default());
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "90",
        "-y",
        "25",
        "-e",
        &url,
        "-e",
        &token,
        &script,
    ]);
    let screen = tmux.wait_for("#");
    assert!(screen.contains('#'), "no prompt: {screen}");
    tmux.run(&[
        "send-keys",
        "-t",
        "t",
        "echo $((6*7)); stty size; tty",
        "Enter",
    ]);
    let screen = tmux.wait_for("/dev/pts/");
    assert!(
        screen.contains("42") && screen.contains("25 90"),
        "{screen}"
    );
    tmux.run(&["send-keys", "-t", "t", "exit 4", "Enter"]);
    let screen = tmux.wait_for("EXIT=4");
    assert!(screen.contains("EXIT=4"), "{screen}");
}

#[test]
fn tiocsti_reaches_no_terminal_but_the_callers_own() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let id = d.start_sandbox(&["sleep", "300"]);
    // A shell on a terminal of the sandbox's devpts...
    let shell = create_exec(
        &d,
        &id,
        json!({"command": ["sh", "-i"], "tty": true, "stdin": true}),
    );
    let mut ws = attach(&d, &shell, "").expect("attach");
    send_stdin(&mut ws, b"tty\n");
    let out = read_until(&mut ws, "/dev/pts/", Duration::from_secs(20));
    let pts = out
        .split_whitespace()
        .find(|w| w.starts_with("/dev/pts/"))
        .expect("the shell's terminal")
        .to_owned();
    // ...cannot be fed input by another process of the sandbox (not its controlling terminal).
    let script = format!(
        "import fcntl, os, termios\n\
         fd = os.open('{pts}', os.O_RDWR | os.O_NOCTTY)\n\
         try:\n    fcntl.ioctl(fd, termios.TIOCSTI, b'x')\n    print('injected')\n\
         except PermissionError:\n    print('refused')\n"
    );
    let (out, exec) = run_exec(&d, &id, &["python3", "-c", &script]);
    assert_eq!(exec.exit_code, Some(0), "{out}");
    assert_eq!(out, "refused\n");
    // The only terminals in the sandbox are its own: no host pts is visible.
    let (out, _) = run_exec(&d, &id, &["sh", "-c", "ls /dev/pts"]);
    let mine = pts.trim_start_matches("/dev/pts/");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        [mine, "ptmx"],
        "{out}"
    );
}
