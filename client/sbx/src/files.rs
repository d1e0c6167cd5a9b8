//! File transfers: `POST /start`, `/files` and `/archive`, with content as streams both ways.

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use reqwest::Method;
use sandboxd_api::{FileListing, Sandbox};

use crate::client::Client;
use crate::error::{ClientError, Result};

/// What `GET /files` found.
pub enum Download {
    /// A regular file: its permission bits (never setuid, setgid or sticky) and its content.
    File {
        mode: Option<u32>,
        content: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>,
    },
    /// A directory: its listing.
    Directory(FileListing),
}

fn body_stream(resp: reqwest::Response) -> impl Stream<Item = Result<Bytes>> + Send {
    resp.bytes_stream().map_err(ClientError::Decode)
}

impl Client {
    /// `POST /v1/sandboxes/{id}/start`.
    pub async fn start(&self, id_or_name: &str) -> Result<Sandbox> {
        let url = self.sandbox_url(id_or_name, &["start"]);
        self.json(self.http().post(url)).await
    }

    /// `PUT /v1/sandboxes/{id}/files`: `body` becomes the file at `path`.
    pub async fn put_file(
        &self,
        id_or_name: &str,
        path: &str,
        mode: Option<u32>,
        body: reqwest::Body,
    ) -> Result<()> {
        let url = self.sandbox_url(id_or_name, &["files"]);
        let mut query = vec![("path", path.to_owned())];
        if let Some(mode) = mode {
            query.push(("mode", format!("{mode:o}")));
        }
        self.send(self.http().put(url).query(&query).body(body))
            .await?;
        Ok(())
    }

    /// `GET /v1/sandboxes/{id}/files`: a file's content as a stream, or a directory's listing.
    pub async fn get_file(&self, id_or_name: &str, path: &str) -> Result<Download> {
        let url = self.sandbox_url(id_or_name, &["files"]);
        let resp = self
            .send(self.http().get(url).query(&[("path", path)]))
            .await?;
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            return resp
                .json()
                .await
                .map(Download::Directory)
                .map_err(ClientError::Decode);
        }
        let mode = resp
            .headers()
            .get("x-sandbox-file-mode")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            // Permission bits only, whatever the header says (see `unpack`).
            .map(|m| m & crate::unpack::MODE_BITS);
        Ok(Download::File {
            mode,
            content: Box::pin(body_stream(resp)),
        })
    }

    /// `DELETE /v1/sandboxes/{id}/files`.
    pub async fn delete_file(&self, id_or_name: &str, path: &str) -> Result<()> {
        let url = self.sandbox_url(id_or_name, &["files"]);
        self.send(
            self.http()
                .request(Method::DELETE, url)
                .query(&[("path", path)]),
        )
        .await?;
        Ok(())
    }

    /// `PUT /v1/sandboxes/{id}/archive`: extract the tar stream `body` into `path`.
    pub async fn put_archive(
        &self,
        id_or_name: &str,
        path: &str,
        body: reqwest::Body,
    ) -> Result<()> {
        let url = self.sandbox_url(id_or_name, &["archive"]);
        self.send(
            self.http()
                .put(url)
                .query(&[("path", path)])
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .body(body),
        )
        .await?;
        Ok(())
    }

    /// `GET /v1/sandboxes/{id}/archive`: a tar stream of `path`.
    pub async fn get_archive(
        &self,
        id_or_name: &str,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Bytes>> + Send + 'static> {
        let url = self.sandbox_url(id_or_name, &["archive"]);
        let resp = self
            .send(self.http().get(url).query(&[("path", path)]))
            .await?;
        Ok(body_stream(resp))
    }
}
