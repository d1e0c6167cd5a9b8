//! Execs: starting a process in a running sandbox, and attaching to it over a websocket.
//!
//! The attach websocket carries `[channel][data]` binary messages both ways (0 stdin from us,
//! 1 stdout and 2 stderr from the daemon), text control messages from us (`resize`,
//! `close_stdin`) and one final `AttachEnd` text message from the daemon. Output offsets count
//! both channels together, so a dropped attach is resumed with `offset` set to the bytes seen.

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use sandboxd_api::{
    AttachControl, AttachEnd, CreateExec, Exec, ExecList, TerminalSize, CHANNEL_STDIN,
};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::logs::{open_websocket, Channel, Socket};

/// What the daemon sends on an attach websocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    Output {
        channel: Channel,
        data: Bytes,
    },
    /// The process ended and all its output was sent; always the last event.
    End(AttachEnd),
}

/// The sending half of an attach websocket.
pub struct AttachWriter {
    sink: SplitSink<Socket, Message>,
}

/// The receiving half of an attach websocket.
pub struct AttachReader {
    stream: SplitStream<Socket>,
}

impl AttachWriter {
    /// Bytes for the process's stdin.
    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(1 + data.len());
        msg.push(CHANNEL_STDIN);
        msg.extend_from_slice(data);
        self.send(Message::Binary(msg.into())).await
    }

    /// The terminal's new size.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        self.control(&AttachControl {
            resize: Some(TerminalSize { cols, rows }),
            close_stdin: None,
        })
        .await
    }

    /// End of input (with a terminal: its end-of-file character).
    pub async fn close_stdin(&mut self) -> Result<()> {
        self.control(&AttachControl {
            resize: None,
            close_stdin: Some(true),
        })
        .await
    }

    async fn control(&mut self, control: &AttachControl) -> Result<()> {
        let text = serde_json::to_string(control)
            .map_err(|e| ClientError::LogProtocol(format!("encoding a control message: {e}")))?;
        self.send(Message::Text(text.into())).await
    }

    async fn send(&mut self, msg: Message) -> Result<()> {
        self.sink
            .send(msg)
            .await
            .map_err(|e| ClientError::WebSocket(Box::new(e)))
    }
}

impl AttachReader {
    /// The next event; `None` when the websocket closed before the end (reattach to resume).
    pub async fn next(&mut self) -> Option<Result<AttachEvent>> {
        loop {
            let msg = match self.stream.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(ClientError::WebSocket(Box::new(e)))),
            };
            match msg {
                Message::Binary(data) => {
                    let Some((&byte, rest)) = data.split_first() else {
                        continue;
                    };
                    let Some(channel) = Channel::from_byte(byte) else {
                        return Some(Err(ClientError::LogProtocol(format!(
                            "unknown channel {byte}"
                        ))));
                    };
                    return Some(Ok(AttachEvent::Output {
                        channel,
                        data: Bytes::copy_from_slice(rest),
                    }));
                }
                Message::Text(text) => {
                    return Some(
                        serde_json::from_str(text.as_str())
                            .map(AttachEvent::End)
                            .map_err(|e| {
                                ClientError::LogProtocol(format!("bad AttachEnd {text:?}: {e}"))
                            }),
                    )
                }
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }
}

impl Client {
    /// `POST /v1/sandboxes/{id}/execs`: answers once the command has been executed.
    pub async fn create_exec(&self, sandbox: &str, spec: &CreateExec) -> Result<Exec> {
        let url = self.url(&["v1", "sandboxes", sandbox, "execs"]);
        self.json_request(self.http().post(url).json(spec)).await
    }

    /// `GET /v1/sandboxes/{id}/execs`.
    pub async fn list_execs(&self, sandbox: &str) -> Result<Vec<Exec>> {
        let url = self.url(&["v1", "sandboxes", sandbox, "execs"]);
        let list: ExecList = self.json_request(self.http().get(url)).await?;
        Ok(list.items)
    }

    /// Wait until an exec has ended (by reading its output to the end) and return it.
    pub async fn wait_exec(&self, sandbox: &str, exec: &str) -> Result<Exec> {
        let mut url = self.url(&["v1", "sandboxes", sandbox, "execs", exec, "logs"]);
        url.query_pairs_mut().append_pair("follow", "true");
        let response = self.send_request(self.http().get(url)).await?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            chunk.map_err(ClientError::Decode)?;
        }
        self.get_exec(sandbox, exec).await
    }

    /// `GET /v1/sandboxes/{id}/execs/{exec_id}`.
    pub async fn get_exec(&self, sandbox: &str, exec: &str) -> Result<Exec> {
        let url = self.url(&["v1", "sandboxes", sandbox, "execs", exec]);
        self.json_request(self.http().get(url)).await
    }

    /// Open the attach websocket of a sandbox's main command (created with `stdin` or `tty`).
    pub async fn attach_sandbox(
        &self,
        sandbox: &str,
        offset: u64,
        stdin: bool,
    ) -> Result<(AttachWriter, AttachReader)> {
        let url = self.url(&["v1", "sandboxes", sandbox, "attach"]);
        self.open_attach(url, offset, stdin).await
    }

    /// Open the attach websocket of an exec, with output from `offset`, owning stdin or not.
    pub async fn attach_exec(
        &self,
        sandbox: &str,
        exec: &str,
        offset: u64,
        stdin: bool,
    ) -> Result<(AttachWriter, AttachReader)> {
        let url = self.url(&["v1", "sandboxes", sandbox, "execs", exec, "attach"]);
        self.open_attach(url, offset, stdin).await
    }

    async fn open_attach(
        &self,
        mut url: reqwest::Url,
        offset: u64,
        stdin: bool,
    ) -> Result<(AttachWriter, AttachReader)> {
        let _ = url.set_scheme("ws");
        url.query_pairs_mut()
            .append_pair("offset", &offset.to_string())
            .append_pair("stdin", if stdin { "true" } else { "false" });
        let socket = open_websocket(self, url.into()).await?;
        let (sink, stream) = socket.split();
        Ok((AttachWriter { sink }, AttachReader { stream }))
    }
}
