//! The one websocket relay of the API, for log websockets (a sandbox's or an exec's) and attach
//! websockets alike: the output is read from the log and sent as binary messages
//! `[channel][data]`, then one text message ([`LogEnd`] or [`AttachEnd`]) and a normal close.
//! An attached client's messages go to its [`AttachSession`]; a reader's are ignored. Input and
//! output run independently: a client that reads slowly never holds up its stdin, and the
//! reverse.

use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use sandboxd_api::{AttachControl, AttachEnd, EndReason, LogEnd, CHANNEL_STDIN};
use uuid::Uuid;

use super::AppState;
use crate::logs::{read_logs, LogEvent, ReadOptions};
use crate::sandboxes::AttachSession;

/// Whose output a websocket streams.
pub(super) enum Target {
    /// An exec: (sandbox id, exec id).
    Exec(Uuid, Uuid),
    /// The sandbox's main command.
    Main(Uuid),
}

/// What the client's messages are for.
pub(super) enum Incoming {
    /// A log websocket: the client has nothing to say; only its close counts.
    Ignored,
    /// An attach websocket: stdin, resizes and the end of stdin, for the session when there is
    /// one (none: a reader, or the process has ended).
    Attach(Option<AttachSession>),
}

/// The last message: a log's or an attach's.
#[derive(Clone, Copy)]
pub(super) enum Last {
    LogEnd,
    AttachEnd,
}

impl Target {
    fn dir(&self, state: &AppState) -> sandboxd_protocol::layout::SandboxDir {
        match self {
            Target::Exec(s, e) => state.svc.exec_dir(*s, *e),
            Target::Main(id) => state.svc.dir(*id),
        }
    }

    fn exit(&self, state: &AppState) -> Option<tokio::sync::watch::Receiver<bool>> {
        match self {
            Target::Exec(_, e) => state.svc.subscribe_exec(*e),
            Target::Main(id) => state.svc.subscribe(*id),
        }
    }

    /// Exit code, signal and (for a sandbox) the reason it ended, once final.
    async fn end(&self, state: &AppState) -> (Option<i32>, Option<String>, Option<EndReason>) {
        match self {
            Target::Exec(s, e) => {
                let row = state.svc.exec_row(*s, *e).await.ok().flatten();
                (
                    row.as_ref().and_then(|e| e.exit_code),
                    row.and_then(|e| e.signal),
                    None,
                )
            }
            Target::Main(id) => {
                let row = state.svc.sandbox(*id).await.ok().flatten();
                (
                    row.as_ref().and_then(|s| s.exit_code),
                    row.as_ref().and_then(|s| s.signal.clone()),
                    row.and_then(|s| s.reason),
                )
            }
        }
    }
}

type Sink = SplitSink<WebSocket, Message>;

async fn close(sink: &mut Sink, code: u16, reason: &str) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned().into(),
        })))
        .await;
}

/// Relay `target`'s output from `opts` on until it has ended and everything was sent (or the
/// client goes away), and the client's input as `incoming` says.
pub(super) async fn relay(
    state: AppState,
    target: Target,
    opts: ReadOptions,
    incoming: Incoming,
    socket: WebSocket,
    last: Last,
) {
    let mut rx = read_logs(target.dir(&state), opts, target.exit(&state));
    let (mut sink, stream) = socket.split();
    // The input side says why the connection must close (or ends: the client went away).
    let (close_tx, mut close_rx) = tokio::sync::mpsc::channel::<(u16, &'static str)>(1);
    let mut input = tokio::spawn(forward_input(stream, incoming, close_tx));
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Ok(LogEvent::Data { channel, data })) => {
                    let mut msg = Vec::with_capacity(1 + data.len());
                    msg.push(channel);
                    msg.extend_from_slice(&data);
                    if sink.send(Message::Binary(msg.into())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(LogEvent::End { offset })) => {
                    let (exit_code, signal, reason) = target.end(&state).await;
                    let text = match last {
                        Last::LogEnd => serde_json::to_string(&LogEnd { exit_code, signal, reason, offset }),
                        Last::AttachEnd => serde_json::to_string(&AttachEnd { exit_code, signal, offset }),
                    };
                    if sink.send(Message::Text(text.unwrap_or_default().into())).await.is_ok() {
                        close(&mut sink, close_code::NORMAL, "").await;
                        // Give the client a moment to answer the close frame, completing the
                        // closing handshake.
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut input).await;
                    }
                    break;
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "reading logs for a websocket failed");
                    close(&mut sink, close_code::ERROR, "reading the log failed").await;
                    break;
                }
                None => break,
            },
            why = close_rx.recv() => {
                if let Some((code, reason)) = why {
                    close(&mut sink, code, reason).await;
                }
                break;
            }
        }
    }
    // Dropping the attach session releases stdin; the process goes on.
    input.abort();
}

/// What one client message asks of the attached process.
enum Input {
    Stdin(Vec<u8>),
    Control(AttachControl),
}

/// Pass the client's messages on to the attach session until the client goes away.
async fn forward_input(
    mut stream: SplitStream<WebSocket>,
    incoming: Incoming,
    close_tx: tokio::sync::mpsc::Sender<(u16, &'static str)>,
) {
    let mut session = match incoming {
        Incoming::Attach(session) => session,
        Incoming::Ignored => {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    return;
                }
            }
            return;
        }
    };
    while let Some(msg) = stream.next().await {
        let input = match msg {
            Err(_) | Ok(Message::Close(_)) => return,
            Ok(Message::Binary(data)) => match data.split_first() {
                Some((&CHANNEL_STDIN, payload)) => Input::Stdin(payload.to_vec()),
                _ => {
                    let why = "binary messages must start with channel 0 (stdin)";
                    let _ = close_tx.send((close_code::INVALID, why)).await;
                    return;
                }
            },
            Ok(Message::Text(text)) => match serde_json::from_str::<AttachControl>(text.as_str()) {
                Ok(control) => Input::Control(control),
                Err(_) => {
                    let why = "text messages must be {\"resize\":{\"cols\":C,\"rows\":R}} or {\"close_stdin\":true}";
                    let _ = close_tx.send((close_code::INVALID, why)).await;
                    return;
                }
            },
            Ok(_) => continue,
        };
        // Without an attach session (a reader, or the process ended) input goes nowhere.
        if let Some(attached) = session.as_mut() {
            let sent = match input {
                Input::Stdin(data) => attached.send_stdin(&data).await,
                Input::Control(control) => {
                    let mut sent = Ok(());
                    if let Some(size) = control.resize {
                        sent = attached.resize(size.cols, size.rows).await;
                    }
                    if sent.is_ok() && control.close_stdin == Some(true) {
                        sent = attached.close_stdin().await;
                    }
                    sent
                }
            };
            if sent.is_err() {
                // The process ended: its end arrives through the log.
                session = None;
            }
        }
    }
}
