//! The image endpoints of [`Client`]: import (streamed from a file), list, get, delete.

use std::path::Path;

use bytes::Bytes;
use reqwest::{Body, Method};
use sandboxd_api::{Image, ImageList};
use tokio::io::AsyncReadExt;

use super::Client;
use crate::error::{ClientError, Result};

/// Chunk size of an upload read from a file.
const CHUNK: usize = 256 * 1024;

impl Client {
    /// `POST /v1/images?name=`: upload an archive file (read and sent in chunks, never whole).
    pub async fn import_image(&self, name: &str, file: &Path) -> Result<Image> {
        let file = tokio::fs::File::open(file)
            .await
            .map_err(|e| ClientError::Io(file.display().to_string(), e))?;
        let stream = futures_util::stream::unfold(file, |mut file| async move {
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        let url = self.url(&["v1", "images"]);
        let request = self
            .http
            .post(url)
            .query(&[("name", name)])
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(Body::wrap_stream(stream));
        self.json(request).await
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
