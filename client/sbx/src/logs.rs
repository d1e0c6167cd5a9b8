//! Following a sandbox's output over the log websocket, reconnecting where it left off.
//!
//! The daemon sends binary messages `[channel][data]` starting at the requested offset, then one
//! text message with the `LogEnd` JSON, then closes. The offset counts output bytes of both channels
//! together, so after a drop the stream asks again with `?offset=` set to the bytes already seen.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sandboxd_api::{LogEnd, CHANNEL_STDERR, CHANNEL_STDOUT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::client::Client;
use crate::error::{ClientError, Result};

/// Which output stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Stdout,
    Stderr,
}

impl Channel {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            CHANNEL_STDOUT => Some(Channel::Stdout),
            CHANNEL_STDERR => Some(Channel::Stderr),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            Channel::Stdout => CHANNEL_STDOUT,
            Channel::Stderr => CHANNEL_STDERR,
        }
    }
}

/// One item of `Client::follow_logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Output of the sandbox's command, in the order it was written.
    Output { channel: Channel, data: Bytes },
    /// The sandbox ended and all its output has been sent; this is always the last item.
    End(LogEnd),
}

/// What one websocket message means to the follower.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Event(LogEvent),
    /// Control traffic (ping, pong) that carries nothing for the caller.
    Ignore,
    /// The server closed the socket; before `LogEnd` this is a drop to recover from.
    Closed,
}

/// Interprets one websocket message of the log protocol.
pub(crate) fn decode_message(message: Message) -> Result<Decoded> {
    match message {
        Message::Binary(bytes) => {
            let Some(&first) = bytes.first() else {
                return Err(ClientError::LogProtocol("empty binary message".into()));
            };
            let channel = Channel::from_byte(first)
                .ok_or_else(|| ClientError::LogProtocol(format!("unknown channel {first}")))?;
            Ok(Decoded::Event(LogEvent::Output {
                channel,
                data: bytes.slice(1..),
            }))
        }
        Message::Text(text) => serde_json::from_str::<LogEnd>(text.as_str())
            .map(|end| Decoded::Event(LogEvent::End(end)))
            .map_err(|e| ClientError::LogProtocol(format!("bad LogEnd {:?}: {e}", text.as_str()))),
        Message::Close(_) => Ok(Decoded::Closed),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Decoded::Ignore),
    }
}

/// A TCP or unix stream under the websocket.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Transport for T {}

pub(crate) type Socket = WebSocketStream<Box<dyn Transport>>;

/// Open a websocket on `url` (a `ws://` URL of this client's daemon), over the client's unix
/// socket or TCP, with its token.
pub(crate) async fn open_websocket(client: &Client, url: String) -> Result<Socket> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::WebSocket(Box::new(e)))?;
    if let Some(token) = client.token() {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::LogProtocol("the token is not a valid header".into()))?;
        request.headers_mut().insert("Authorization", value);
    }
    let stream: Box<dyn Transport> = match client.unix_socket() {
        Some(path) => Box::new(UnixStream::connect(path).await.map_err(|source| {
            ClientError::WebSocketConnect {
                url: format!("unix:{}", path.display()),
                source,
            }
        })?),
        None => {
            let base = client.base_url();
            let host = base.host_str().unwrap_or("127.0.0.1");
            // Brackets of an IPv6 literal are not part of the address.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = base.port_or_known_default().unwrap_or(80);
            Box::new(TcpStream::connect((host, port)).await.map_err(|source| {
                ClientError::WebSocketConnect {
                    url: url.clone(),
                    source,
                }
            })?)
        }
    };
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((socket, _response)) => Ok(socket),
        // The daemon refused the upgrade with a normal HTTP error (404 for an unknown sandbox).
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            Err(ClientError::from_status_body(
                response.status().as_u16(),
                body,
            ))
        }
        Err(e) => Err(ClientError::WebSocket(Box::new(e))),
    }
}

/// The state carried from one item of the stream to the next.
struct Follower {
    client: Client,
    id: String,
    /// Output bytes received so far, counting from offset 0 of the sandbox's output.
    offset: u64,
    /// Drops since the last byte of output arrived.
    failures: u32,
    socket: Option<Socket>,
    done: bool,
}

impl Follower {
    fn ws_url(&self) -> String {
        let mut url = self.client.url(&["v1", "sandboxes", &self.id, "logs"]);
        // `Client::new` only accepts http://, and http -> ws is always a permitted scheme change.
        let _ = url.set_scheme("ws");
        url.query_pairs_mut()
            .append_pair("offset", &self.offset.to_string());
        url.into()
    }

    async fn connect(&self) -> Result<Socket> {
        open_websocket(&self.client, self.ws_url()).await
    }

    /// Records a drop and waits before the next attempt, or says it is time to give up.
    async fn back_off(&mut self, cause: Option<ClientError>) -> Option<ClientError> {
        self.socket = None;
        self.failures += 1;
        if self.failures > self.client.log_reconnects() {
            self.done = true;
            // Without a cause (the server closed cleanly) report how far the stream got.
            return Some(cause.unwrap_or(ClientError::LogsInterrupted {
                attempts: self.failures,
                offset: self.offset,
            }));
        }
        let delay = Duration::from_millis(50u64 << self.failures.min(5));
        tokio::time::sleep(delay).await;
        None
    }

    async fn next_event(&mut self) -> Option<Result<LogEvent>> {
        loop {
            if self.done {
                return None;
            }
            let Some(socket) = self.socket.as_mut() else {
                match self.connect().await {
                    Ok(socket) => self.socket = Some(socket),
                    Err(e) if is_retryable(&e) => {
                        if let Some(e) = self.back_off(Some(e)).await {
                            return Some(Err(e));
                        }
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            let decoded = match socket.next().await {
                Some(Ok(message)) => decode_message(message),
                Some(Err(e)) => {
                    let cause = ClientError::WebSocket(Box::new(e));
                    if let Some(e) = self.back_off(Some(cause)).await {
                        return Some(Err(e));
                    }
                    continue;
                }
                None => Ok(Decoded::Closed),
            };
            match decoded {
                Ok(Decoded::Event(event)) => {
                    match &event {
                        LogEvent::Output { data, .. } => {
                            self.offset += data.len() as u64;
                            self.failures = 0;
                        }
                        LogEvent::End(_) => {
                            self.done = true;
                            if let Some(mut socket) = self.socket.take() {
                                // Best effort: the server closes right after `LogEnd` anyway.
                                let _ = socket.close(None).await;
                            }
                        }
                    }
                    return Some(Ok(event));
                }
                Ok(Decoded::Ignore) => {}
                Ok(Decoded::Closed) => {
                    if let Some(e) = self.back_off(None).await {
                        return Some(Err(e));
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Errors worth another connection attempt: transport trouble and a daemon that is briefly unwell.
pub(crate) fn is_retryable(error: &ClientError) -> bool {
    match error {
        ClientError::WebSocket(e) => !matches!(
            **e,
            tungstenite::Error::Url(_) | tungstenite::Error::HttpFormat(_)
        ),
        ClientError::Api { status, .. } => *status >= 500,
        ClientError::WebSocketConnect { .. } => true,
        _ => false,
    }
}

impl Client {
    /// Streams the output of sandbox `id` from `offset` until its `LogEnd`, which is always the
    /// last item. A dropped websocket is reopened at the offset reached, up to the configured
    /// number of consecutive reconnects; an error item ends the stream.
    pub fn follow_logs(
        &self,
        id: &str,
        offset: u64,
    ) -> impl Stream<Item = Result<LogEvent>> + Send + 'static {
        let follower = Follower {
            client: self.clone(),
            id: id.to_owned(),
            offset,
            failures: 0,
            socket: None,
            done: false,
        };
        futures_util::stream::unfold(follower, |mut follower| async move {
            let event = follower.next_event().await?;
            Some((event, follower))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_api::EndReason;

    fn event(message: Message) -> LogEvent {
        match decode_message(message) {
            Ok(Decoded::Event(event)) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn binary_messages_carry_channel_and_data() {
        assert_eq!(
            event(Message::Binary(Bytes::from_static(b"\x01hello"))),
            LogEvent::Output {
                channel: Channel::Stdout,
                data: Bytes::from_static(b"hello")
            }
        );
        assert_eq!(
            event(Message::Binary(Bytes::from_static(b"\x02"))),
            LogEvent::Output {
                channel: Channel::Stderr,
                data: Bytes::new()
            }
        );
    }

    #[test]
    fn bad_binary_messages_are_protocol_errors() {
        for bytes in [&b""[..], b"\x00x", b"\x03x"] {
            let result = decode_message(Message::Binary(Bytes::copy_from_slice(bytes)));
            assert!(
                matches!(result, Err(ClientError::LogProtocol(_))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn text_message_is_log_end() {
        let text = r#"{"exit_code":3,"signal":null,"reason":"exited","offset":12}"#;
        assert_eq!(
            event(Message::text(text)),
            LogEvent::End(LogEnd {
                exit_code: Some(3),
                signal: None,
                reason: Some(EndReason::Exited),
                offset: 12
            })
        );
        let killed = r#"{"exit_code":137,"signal":"SIGKILL","reason":"killed","offset":0}"#;
        assert!(matches!(
            event(Message::text(killed)),
            LogEvent::End(LogEnd { signal: Some(s), .. }) if s == "SIGKILL"
        ));
        assert!(matches!(
            decode_message(Message::text("not json")),
            Err(ClientError::LogProtocol(_))
        ));
    }

    #[test]
    fn control_messages_are_ignored_and_close_is_reported() {
        assert_eq!(
            decode_message(Message::Ping(Bytes::new())).ok(),
            Some(Decoded::Ignore)
        );
        assert_eq!(
            decode_message(Message::Close(None)).ok(),
            Some(Decoded::Closed)
        );
    }

    #[test]
    fn ws_url_carries_the_offset() {
        let client = Client::new("http://127.0.0.1:4280").expect("valid url");
        let follower = Follower {
            client,
            id: "abc".into(),
            offset: 42,
            failures: 0,
            socket: None,
            done: false,
        };
        assert_eq!(
            follower.ws_url(),
            "ws://127.0.0.1:4280/v1/sandboxes/abc/logs?offset=42"
        );
    }
}
