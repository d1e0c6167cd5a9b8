//! Output from outside: every byte arrives, in order, over plain HTTP (whole, filtered, followed,
//! resumed) and over the websocket (backlog first, then live, then the end and a close).

use std::time::Duration;

use sandboxd_api::{LogEnd, SandboxState, CHANNEL_STDERR, CHANNEL_STDOUT};
use sandboxd_tests::{eventually, read_websocket, require_e2e, Daemon, Mode, WsLog};
use serde_json::json;

/// `seq 1 n` as the test computes it.
fn seq(n: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

/// Assert the websocket ended properly: exactly one text message, a `LogEnd` with `exit_code`
/// and `offset`, nothing binary after it, and a close frame. Returns the `LogEnd`.
fn check_end(ws: &WsLog, exit_code: i32, offset: usize, what: &str) -> LogEnd {
    assert_eq!(
        ws.texts.len(),
        1,
        "{what}: expected exactly one text message, got {:?}",
        ws.texts
    );
    let end: LogEnd = serde_json::from_str(&ws.texts[0]).unwrap_or_else(|e| {
        panic!(
            "{what}: the text message is not a LogEnd ({e}): {}",
            ws.texts[0]
        )
    });
    assert_eq!(end.exit_code, Some(exit_code), "{what}: {end:?}");
    assert_eq!(
        end.offset, offset as u64,
        "{what}: LogEnd offset must be the total byte count"
    );
    assert_eq!(ws.binary_after_text, 0, "{what}: output after the LogEnd");
    assert_eq!(
        ws.empty_binary, 0,
        "{what}: binary messages without a channel byte"
    );
    assert!(ws.closed, "{what}: no close frame after the LogEnd");
    end
}

/// First position where two byte strings differ, for readable failures on big outputs.
fn describe_mismatch(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let context = |s: &[u8]| {
        String::from_utf8_lossy(&s[at.saturating_sub(20)..(at + 20).min(s.len())]).into_owned()
    };
    format!(
        "got {} bytes, want {}; first difference at byte {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        context(got),
        context(want)
    )
}

fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert!(got == want, "{what}: {}", describe_mismatch(got, want));
}

#[test]
fn interleaved_stdout_and_stderr_keep_their_order_and_filter() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let script = "echo out1; sleep 0.05; echo err1 >&2; sleep 0.05; echo out2; sleep 0.05; \
                  echo err2 >&2; sleep 0.05; echo out3; sleep 0.05; echo err3 >&2";
    let (sandbox, combined) = daemon.run(&["sh", "-c", script]);
    assert_eq!(sandbox.exit_code, Some(0));
    let id = sandbox.id.to_string();
    assert_eq!(combined, "out1\nerr1\nout2\nerr2\nout3\nerr3\n");
    assert_eq!(daemon.logs(&id, "?stream=stdout"), b"out1\nout2\nout3\n");
    assert_eq!(daemon.logs(&id, "?stream=stderr"), b"err1\nerr2\nerr3\n");

    // The websocket tells the streams apart by channel, in the same order.
    let ws = read_websocket(daemon.logs_websocket(&id, ""));
    check_end(&ws, 0, combined.len(), "websocket");
    let mut lines = Vec::new();
    for (channel, data) in &ws.frames {
        for line in String::from_utf8_lossy(data).lines() {
            lines.push((*channel, line.to_string()));
        }
    }
    let want: Vec<(u8, String)> = [
        (CHANNEL_STDOUT, "out1"),
        (CHANNEL_STDERR, "err1"),
        (CHANNEL_STDOUT, "out2"),
        (CHANNEL_STDERR, "err2"),
        (CHANNEL_STDOUT, "out3"),
        (CHANNEL_STDERR, "err3"),
    ]
    .into_iter()
    .map(|(c, l)| (c, l.to_string()))
    .collect();
    assert_eq!(lines, want);
}

#[test]
fn ten_megabytes_arrive_byte_for_byte_plain_follow_and_websocket() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    const N: u32 = 1_500_000;
    let want = seq(N);
    assert!(want.len() > 10_000_000);

    let sandbox = daemon.create(json!({"command": ["seq", "1", N.to_string()]}));
    let id = sandbox.id.to_string();
    // Started while it runs (or at least before anyone waited for it).
    let followed = std::thread::scope(|s| {
        let follow = s.spawn(|| daemon.logs(&id, "?follow=true"));
        let ws = s.spawn(|| read_websocket(daemon.logs_websocket(&id, "")));
        (
            follow.join().expect("follow thread"),
            ws.join().expect("websocket thread"),
        )
    });
    let (follow, ws) = followed;
    assert_bytes(&follow, &want, "GET ?follow=true started while running");
    assert_bytes(&ws.bytes(None), &want, "websocket started while running");
    assert!(
        ws.frames.iter().all(|(c, _)| *c == CHANNEL_STDOUT),
        "seq writes only stdout"
    );
    check_end(&ws, 0, want.len(), "websocket started while running");

    let done = daemon.wait(&id);
    assert_eq!(done.exit_code, Some(0));
    assert_bytes(&daemon.logs(&id, ""), &want, "plain GET after exit");
    assert_bytes(
        &daemon.logs(&id, "?stream=stdout"),
        &want,
        "GET ?stream=stdout after exit",
    );
    assert!(daemon.logs(&id, "?stream=stderr").is_empty());
    assert_bytes(
        &daemon.logs(&id, "?follow=true"),
        &want,
        "GET ?follow=true after exit",
    );

    // And the websocket after exit, from the backlog only.
    let ws = read_websocket(daemon.logs_websocket(&id, ""));
    assert_bytes(&ws.bytes(None), &want, "websocket after exit");
    check_end(&ws, 0, want.len(), "websocket after exit");
}

#[test]
fn big_output_on_both_streams_is_complete_per_stream() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let (sandbox, _) = daemon.run(&["sh", "-c", "seq 1 200000 & seq 1 200000 >&2; wait"]);
    assert_eq!(sandbox.exit_code, Some(0));
    let id = sandbox.id.to_string();
    let want = seq(200_000);
    assert_bytes(&daemon.logs(&id, "?stream=stdout"), &want, "stdout");
    assert_bytes(&daemon.logs(&id, "?stream=stderr"), &want, "stderr");
    let all = daemon.logs(&id, "");
    assert_eq!(all.len(), 2 * want.len());
    let ws = read_websocket(daemon.logs_websocket(&id, ""));
    assert_bytes(
        &ws.bytes(Some(CHANNEL_STDOUT)),
        &want,
        "websocket channel 1",
    );
    assert_bytes(
        &ws.bytes(Some(CHANNEL_STDERR)),
        &want,
        "websocket channel 2",
    );
    assert_bytes(
        &ws.bytes(None),
        &all,
        "websocket in the order of the plain log",
    );
    check_end(&ws, 0, all.len(), "websocket");
}

#[test]
fn a_late_follower_gets_the_backlog_then_the_rest() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let sandbox =
        daemon.create(json!({"command": ["sh", "-c", "echo first; sleep 2; echo second"]}));
    let id = sandbox.id.to_string();
    assert!(
        eventually(Duration::from_secs(30), || daemon.logs(&id, "")
            == b"first\n"),
        "the first line never showed up: {:?}",
        String::from_utf8_lossy(&daemon.logs(&id, ""))
    );
    let ws = daemon.logs_websocket(&id, "");
    let follow = std::thread::scope(|s| {
        let follow = s.spawn(|| daemon.logs(&id, "?follow=true"));
        let ws = read_websocket(ws);
        assert_eq!(ws.bytes(None), b"first\nsecond\n");
        assert_eq!(
            ws.frames.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            vec![CHANNEL_STDOUT; ws.frames.len()]
        );
        check_end(&ws, 0, 13, "late websocket");
        follow.join().expect("follow thread")
    });
    assert_eq!(follow, b"first\nsecond\n", "late GET ?follow=true");
    assert_eq!(daemon.sandbox(&id).state, SandboxState::Exited);
}

#[test]
fn resume_from_an_offset_yields_exactly_the_suffix() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    // Three records: stdout "aaaa", stderr "BBBB", stdout "cccc".
    let script = "printf aaaa; sleep 0.1; printf BBBB >&2; sleep 0.1; printf cccc";
    let (sandbox, all) = daemon.run(&["sh", "-c", script]);
    assert_eq!(all, "aaaaBBBBcccc");
    let id = sandbox.id.to_string();
    let all = all.as_bytes();
    for offset in [0usize, 2, 4, 6, 8, 11, 12] {
        let suffix = &all[offset..];
        assert_eq!(
            daemon.logs(&id, &format!("?offset={offset}")),
            suffix,
            "plain ?offset={offset}"
        );
        assert_eq!(
            daemon.logs(&id, &format!("?offset={offset}&follow=true")),
            suffix,
            "plain ?offset={offset}&follow=true"
        );
        let ws = read_websocket(daemon.logs_websocket(&id, &format!("?offset={offset}")));
        assert_eq!(ws.bytes(None), suffix, "websocket ?offset={offset}");
        // Each byte keeps its channel: uppercase bytes came from stderr.
        for (channel, data) in &ws.frames {
            let want = if data.iter().all(u8::is_ascii_uppercase) {
                CHANNEL_STDERR
            } else {
                CHANNEL_STDOUT
            };
            assert!(
                data.iter()
                    .all(|b| b.is_ascii_uppercase() == (want == CHANNEL_STDERR)),
                "a websocket message mixes streams at ?offset={offset}: {:?}",
                String::from_utf8_lossy(data)
            );
            assert_eq!(
                *channel,
                want,
                "channel of {:?} at ?offset={offset}",
                String::from_utf8_lossy(data)
            );
        }
        check_end(&ws, 0, all.len(), &format!("websocket ?offset={offset}"));
    }
    // The offset counts in the combined stream, also when one stream is selected.
    assert_eq!(daemon.logs(&id, "?stream=stdout&offset=2"), b"aacccc");
    assert_eq!(daemon.logs(&id, "?stream=stdout&offset=6"), b"cccc");
    assert_eq!(daemon.logs(&id, "?stream=stderr&offset=6"), b"BB");
    assert_eq!(daemon.logs(&id, "?stream=stderr&offset=8"), b"");
}

#[test]
fn output_without_a_trailing_newline_is_exact() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let (sandbox, out) = daemon.run(&["printf", "abc"]);
    assert_eq!(sandbox.exit_code, Some(0));
    assert_eq!(out, "abc");
    let id = sandbox.id.to_string();
    assert_eq!(daemon.logs(&id, "?follow=true"), b"abc");
    let ws = read_websocket(daemon.logs_websocket(&id, ""));
    assert_eq!(ws.bytes(None), b"abc");
    check_end(&ws, 0, 3, "websocket");

    // Also while it is still running, before its last bytes.
    let sandbox =
        daemon.create(json!({"command": ["sh", "-c", "printf 'x y'; sleep 1; printf z"]}));
    let ws = read_websocket(daemon.logs_websocket(&sandbox.id.to_string(), ""));
    assert_eq!(ws.bytes(None), b"x yz");
    check_end(&ws, 0, 4, "websocket while running");
}

#[test]
fn no_output_and_a_failing_command_end_the_websocket_properly() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let (quiet, out) = daemon.run(&["true"]);
    assert_eq!(out, "");
    let ws = read_websocket(daemon.logs_websocket(&quiet.id.to_string(), ""));
    assert!(ws.frames.is_empty(), "{:?}", ws.frames);
    check_end(&ws, 0, 0, "no output");

    let (failing, out) = daemon.run(&["sh", "-c", "echo bye >&2; exit 4"]);
    assert_eq!(out, "bye\n");
    let ws = read_websocket(daemon.logs_websocket(&failing.id.to_string(), ""));
    assert_eq!(ws.bytes(Some(CHANNEL_STDERR)), b"bye\n");
    let end = check_end(&ws, 4, 4, "exit 4");
    assert_eq!(end.reason, Some(sandboxd_api::EndReason::Exited));
}

#[test]
fn websocket_and_follow_work_in_rootless_mode() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Rootless);
    let sandbox = daemon.create(json!({"command": ["sh", "-c", "seq 1 100000; echo done >&2"]}));
    let id = sandbox.id.to_string();
    let mut want = seq(100_000);
    want.extend_from_slice(b"done\n");
    let ws = read_websocket(daemon.logs_websocket(&id, ""));
    assert_bytes(&ws.bytes(None), &want, "rootless websocket");
    check_end(&ws, 0, want.len(), "rootless websocket");
    assert_bytes(&daemon.logs(&id, "?follow=true"), &want, "rootless follow");
}
