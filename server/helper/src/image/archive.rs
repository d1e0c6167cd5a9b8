//! What an upload is (a root filesystem tarball, a docker-archive or an OCI image layout, each
//! possibly gzip- or zstd-compressed) and the layers it holds, in the order they apply.
//!
//! Nothing is held whole in memory: a plain archive is scanned once by seeking over member
//! contents (only names and offsets are kept), then each layer is read from its offset. A
//! compressed image archive is first decompressed to a file (its size charged to the budget);
//! a compressed root filesystem tarball is streamed twice through the decoder (once to tell
//! what it is, once to apply it) rather than stored decompressed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;

use serde::Deserialize;

use super::unpack::{self, Budget, UnpackError};

/// Largest JSON document (manifest, index) read from an archive.
const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Tell the compression from the first bytes.
pub fn sniff(reader: &mut impl BufRead) -> std::io::Result<Compression> {
    let head = reader.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// A reader that decompresses `reader` as `compression` says.
pub fn decoder<'a, R: BufRead + 'a>(
    reader: R,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(ruzstd::decoding::StreamingDecoder::new(reader).map_err(
            |e| UnpackError::Read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        )?),
    })
}

/// Reads at most `limit` bytes and fails (instead of ending) past them: a decompression bomb
/// stops at the cap.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("more than {} bytes after decompression", self.limit),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Where a member of a plain archive keeps its content.
#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

/// The kind of upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Rootfs,
    DockerArchive,
    OciLayout,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Rootfs => "rootfs",
            Format::DockerArchive => "docker-archive",
            Format::OciLayout => "oci-layout",
        }
    }
}

/// The members that matter for telling an image archive from a root filesystem.
fn is_image_member(name: &str) -> bool {
    matches!(name, "manifest.json" | "index.json" | "oci-layout")
        || name.starts_with("blobs/")
        || name.matches('/').count() == 1
        || (!name.contains('/') && name.ends_with(".json"))
}

fn normalise(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    s.trim_start_matches("./").to_owned()
}

fn format_of(members: &HashMap<String, Member>) -> Format {
    if members.contains_key("manifest.json") {
        Format::DockerArchive
    } else if members.contains_key("index.json") && members.contains_key("oci-layout") {
        Format::OciLayout
    } else {
        Format::Rootfs
    }
}

/// Scan a stream's member names (for a compressed root filesystem, which is not seekable).
fn scan_stream<R: Read>(reader: R) -> Result<HashMap<String, Member>, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut members = HashMap::new();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let entry = entry.map_err(UnpackError::Read)?;
        let name = normalise(&entry.path_bytes());
        if is_image_member(&name) {
            let size = entry.header().size().unwrap_or(0);
            members.insert(
                name,
                Member {
                    offset: entry.raw_file_position(),
                    size,
                },
            );
        }
    }
    Ok(members)
}

/// Scan a plain archive file, seeking over contents.
fn scan_file(file: &File) -> Result<HashMap<String, Member>, UnpackError> {
    // Offsets are counted from where reading starts: the start of the file.
    let mut f = file;
    f.seek(SeekFrom::Start(0)).map_err(UnpackError::Read)?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek().map_err(UnpackError::Read)? {
        let entry = entry.map_err(UnpackError::Read)?;
        let name = normalise(&entry.path_bytes());
        if is_image_member(&name) && entry.header().entry_type().is_file() {
            members.insert(
                name,
                Member {
                    offset: entry.raw_file_position(),
                    size: entry.header().size().unwrap_or(0),
                },
            );
        }
    }
    Ok(members)
}

fn bad(why: impl Into<String>) -> UnpackError {
    UnpackError::Read(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        why.into(),
    ))
}

fn member_reader<'a>(
    file: &'a File,
    members: &HashMap<String, Member>,
    name: &str,
) -> Result<std::io::Take<&'a File>, UnpackError> {
    let m = members.get(name).ok_or_else(|| {
        bad(format!(
            "the archive names {name:?} but does not contain it"
        ))
    })?;
    let mut f = file;
    f.seek(SeekFrom::Start(m.offset))
        .map_err(UnpackError::Read)?;
    Ok(f.take(m.size))
}

fn read_json<T: for<'de> Deserialize<'de>>(
    file: &File,
    members: &HashMap<String, Member>,
    name: &str,
) -> Result<T, UnpackError> {
    let mut bytes = Vec::new();
    member_reader(file, members, name)?
        .take(MAX_JSON)
        .read_to_end(&mut bytes)
        .map_err(UnpackError::Read)?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("{name}: {e}")))
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn blob_path(digest: &str) -> Result<String, UnpackError> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| bad(format!("malformed digest {digest:?}")))?;
    if alg.is_empty()
        || !alg.chars().all(|c| c.is_ascii_alphanumeric())
        || hex.is_empty()
        || !hex.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(bad(format!("malformed digest {digest:?}")));
    }
    Ok(format!("blobs/{alg}/{hex}"))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Pick this host's manifest from an index (or the only one).
fn pick(manifests: Vec<Descriptor>) -> Result<Descriptor, UnpackError> {
    let mut fallback = None;
    for d in manifests {
        match &d.platform {
            Some(p) if p.os == "linux" && p.architecture == host_arch() => return Ok(d),
            Some(p) if p.architecture == "unknown" => {} // attestation manifests
            _ => {
                fallback.get_or_insert(d);
            }
        }
    }
    fallback.ok_or_else(|| bad("the image index lists no manifest"))
}

/// Layer member names, in the order they apply.
fn layer_names(
    file: &File,
    members: &HashMap<String, Member>,
    format: Format,
) -> Result<Vec<String>, UnpackError> {
    match format {
        Format::Rootfs => Ok(Vec::new()),
        Format::DockerArchive => {
            let manifests: Vec<DockerManifest> = read_json(file, members, "manifest.json")?;
            let first = manifests
                .into_iter()
                .next()
                .ok_or_else(|| bad("manifest.json lists no image"))?;
            Ok(first
                .layers
                .into_iter()
                .map(|l| l.trim_start_matches("./").to_owned())
                .collect())
        }
        Format::OciLayout => {
            let index: OciIndex = read_json(file, members, "index.json")?;
            let mut desc = pick(index.manifests)?;
            // An index may point at another index (multi-platform images): follow a few.
            for _ in 0..4 {
                let manifest: OciManifest = read_json(file, members, &blob_path(&desc.digest)?)?;
                match manifest.manifests {
                    Some(list)
                        if desc.media_type.contains("index") || manifest.layers.is_empty() =>
                    {
                        desc = pick(list)?;
                    }
                    _ => {
                        return manifest
                            .layers
                            .iter()
                            .map(|l| blob_path(&l.digest))
                            .collect();
                    }
                }
            }
            Err(bad("image indexes nest too deeply"))
        }
    }
}

/// What [`unpack_upload`] did.
pub struct Unpacked {
    pub format: Format,
    pub layers: u32,
}

/// Unpack `upload` into `rootfs`. `scratch` is an empty directory for a decompressed copy of a
/// compressed image archive.
pub fn unpack_upload(
    upload: File,
    rootfs: &OwnedFd,
    scratch: &OwnedFd,
    budget: &mut Budget,
) -> Result<Unpacked, UnpackError> {
    let mut reader = BufReader::new(&upload);
    let compression = sniff(&mut reader).map_err(UnpackError::Read)?;
    let cap = budget.max_bytes;
    let plain: File = if compression == Compression::None {
        drop(reader);
        upload
    } else {
        // Pass 1: what is it? (Names only; contents are decoded and dropped.)
        let members = scan_stream(Capped {
            inner: decoder(reader, compression)?,
            left: cap,
            limit: cap,
        })?;
        let mut again = &upload;
        again.seek(SeekFrom::Start(0)).map_err(UnpackError::Read)?;
        let reader = BufReader::new(&upload);
        let stream = Capped {
            inner: decoder(reader, compression)?,
            left: cap,
            limit: cap,
        };
        if format_of(&members) == Format::Rootfs {
            unpack::apply_layer(rootfs, stream, budget)?;
            return Ok(Unpacked {
                format: Format::Rootfs,
                layers: 1,
            });
        }
        // An image archive: its layers must be read in manifest order, so keep a plain copy.
        decompress_to_scratch(stream, scratch)?
    };
    let members = scan_file(&plain)?;
    let format = format_of(&members);
    if format == Format::Rootfs {
        let mut f = &plain;
        f.seek(SeekFrom::Start(0)).map_err(UnpackError::Read)?;
        unpack::apply_layer(rootfs, BufReader::new(f), budget)?;
        return Ok(Unpacked { format, layers: 1 });
    }
    let names = layer_names(&plain, &members, format)?;
    if names.is_empty() {
        return Err(bad("the image has no layers"));
    }
    for name in &names {
        let mut layer = BufReader::new(member_reader(&plain, &members, name)?);
        let compression = sniff(&mut layer).map_err(UnpackError::Read)?;
        let stream = Capped {
            inner: decoder(layer, compression)?,
            left: cap,
            limit: cap,
        };
        unpack::apply_layer(rootfs, stream, budget)?;
    }
    Ok(Unpacked {
        format,
        layers: names.len() as u32,
    })
}

fn decompress_to_scratch(mut stream: impl Read, scratch: &OwnedFd) -> Result<File, UnpackError> {
    use std::os::fd::AsRawFd;
    let fd = crate::sys::openat(
        Some(scratch.as_raw_fd()),
        "archive.tar",
        nix::fcntl::OFlag::O_RDWR
            | nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_EXCL
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| UnpackError::Write {
        path: "archive.tar".into(),
        step: "creating a scratch file",
        source: e,
    })?;
    let mut file = File::from(fd);
    std::io::copy(&mut stream, &mut file).map_err(UnpackError::Read)?;
    file.seek(SeekFrom::Start(0)).map_err(UnpackError::Read)?;
    Ok(file)
}
