//! The image endpoints of [`Client`]: import (streamed from a file), list, get, delete.
//!
//! An import from a file is one HTTP/1.1 request written by hand on its own connection, with
//! the response read while the body is still going out: the daemon answers a taken name or a
//! bad query (409, 400) before it reads the upload and closes the connection, so the upload's
//! write fails (broken pipe) while its answer is already there to read.

use std::path::Path;

use reqwest::Method;
use sandboxd_api::{Image, ImageList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::Client;
use crate::error::{ClientError, Result};
use crate::logs::Transport;

/// Chunk size of an upload read from a file.
const CHUNK: usize = 256 * 1024;

/// Largest answer read back from an import (an `Image` or an error body).
const MAX_ANSWER: u64 = 1 << 20;

impl Client {
    /// `POST /v1/images?name=`: upload an archive file (read and sent in chunks, never whole).
    pub async fn import_image(&self, name: &str, file: &Path) -> Result<Image> {
        self.import_image_with_progress(name, file, |_| {}).await
    }

    /// `import_image`, calling `sent(n)` after each `n` bytes of the archive went out. When the
    /// upload is cut off, the daemon's answer (a 409 for a taken name) is the error, if it sent
    /// one.
    pub async fn import_image_with_progress(
        &self,
        name: &str,
        file: &Path,
        sent: impl Fn(u64) + Send,
    ) -> Result<Image> {
        let io = |e| ClientError::Io(file.display().to_string(), e);
        let mut archive = tokio::fs::File::open(file).await.map_err(io)?;
        let length = archive.metadata().await.map_err(io)?.len();
        let mut url = self.url(&["v1", "images"]);
        url.query_pairs_mut().append_pair("name", name);
        let (shown, stream) = self.connect_raw(&url).await?;
        let mut head = format!(
            "POST {}?{} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-tar\r\n\
             Content-Length: {length}\r\nConnection: close\r\nAccept: application/json\r\n",
            url.path(),
            url.query().unwrap_or_default(),
            host_header(&url, self.unix_socket.is_some()),
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");

        let (mut reader, mut writer) = tokio::io::split(stream);
        let upload = async {
            writer.write_all(head.as_bytes()).await?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match archive.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return Ok(Err(e)),
                };
                writer.write_all(&buf[..n]).await?;
                sent(n as u64);
            }
            writer.flush().await?;
            // Not shut down: the daemon takes a half-closed connection for a client gone away.
            Ok::<_, std::io::Error>(Ok(()))
        };
        let answer = async {
            let mut bytes = Vec::new();
            // The daemon closes the connection after its answer (the request asked it to). A
            // reset after an early answer still leaves the answer's bytes read.
            let read = (&mut reader).take(MAX_ANSWER).read_to_end(&mut bytes).await;
            (bytes, read)
        };
        let (uploaded, (bytes, read)) = tokio::join!(upload, answer);
        let cut_off = |source| ClientError::WebSocketConnect {
            url: format!("{shown} (upload of {} cut off)", file.display()),
            source,
        };
        match (parse_answer(&bytes), uploaded) {
            (Some((status, body)), _) if (200..300).contains(&status) => {
                serde_json::from_slice(&body)
                    .map_err(|e| cut_off(std::io::Error::other(format!("unexpected answer: {e}"))))
            }
            // The daemon's answer, whether or not the upload got through.
            (Some((status, body)), _) => Err(ClientError::from_status_body(status, &body)),
            (None, Ok(Err(e))) => Err(io(e)),
            (None, Err(e)) => Err(cut_off(e)),
            (None, Ok(Ok(()))) => Err(cut_off(read.err().unwrap_or_else(|| {
                std::io::Error::other("the daemon closed the connection without an answer")
            }))),
        }
    }

    /// A connection of its own to the daemon (its unix socket or TCP), and how to name it.
    async fn connect_raw(&self, url: &reqwest::Url) -> Result<(String, Box<dyn Transport>)> {
        if let Some(path) = &self.unix_socket {
            let shown = format!("unix:{}", path.display());
            let stream = UnixStream::connect(path).await.map_err(|source| {
                ClientError::WebSocketConnect {
                    url: shown.clone(),
                    source,
                }
            })?;
            return Ok((shown, Box::new(stream)));
        }
        let host = url.host_str().unwrap_or("127.0.0.1");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port_or_known_default().unwrap_or(80);
        let shown = self.base.to_string();
        let stream = TcpStream::connect((host, port)).await.map_err(|source| {
            ClientError::WebSocketConnect {
                url: shown.clone(),
                source,
            }
        })?;
        Ok((shown, Box::new(stream)))
    }

    /// `POST /v1/images?name=` with the archive in memory.
    pub async fn import_image_bytes(&self, name: &str, archive: Vec<u8>) -> Result<Image> {
        let url = self.url(&["v1", "images"]);
        let request = self
            .http
            .post(url)
            .query(&[("name", name)])
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(archive);
        self.json(request).await
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<Vec<Image>> {
        let list: ImageList = self
            .json(self.http.get(self.url(&["v1", "images"])))
            .await?;
        Ok(list.images)
    }

    /// `GET /v1/images/{name}`.
    pub async fn image(&self, name: &str) -> Result<Image> {
        self.json(self.http.get(self.url(&["v1", "images", name])))
            .await
    }

    /// `DELETE /v1/images/{name}`.
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        let url = self.url(&["v1", "images", name]);
        self.send(self.http.request(Method::DELETE, url)).await?;
        Ok(())
    }
}

/// The `Host` header for `url` (`localhost` on the unix socket).
fn host_header(url: &reqwest::Url, unix: bool) -> String {
    if unix {
        return "localhost".to_owned();
    }
    let host = url.host_str().unwrap_or("127.0.0.1");
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// The status and body of a complete HTTP/1.1 answer in `bytes` (`Content-Length`, chunked, or
/// up to the end), or `None` when there is no complete answer head.
fn parse_answer(bytes: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let rest = &bytes[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(length) = length {
        rest.get(..length)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some((status, body))
}

/// The data of a chunked body (`None` when it is cut short).
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed() {
        let conflict = b"HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: 13\r\nconnection: close\r\n\r\n{\"error\":{}}xx";
        assert_eq!(
            parse_answer(conflict),
            Some((409, b"{\"error\":{}}x".to_vec()))
        );
        let chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_answer(chunked), Some((201, b"abcde".to_vec())));
        assert_eq!(
            parse_answer(b"HTTP/1.1 409 Conflict\r\ncontent-length: 5"),
            None
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 409 Conflict\r\ncontent-length: 5\r\n\r\nab"),
            None
        );
        assert_eq!(parse_answer(b""), None);
        assert_eq!(
            host_header(
                &reqwest::Url::parse("http://127.0.0.1:4280/x").unwrap(),
                false
            ),
            "127.0.0.1:4280"
        );
    }
}
