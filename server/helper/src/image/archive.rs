//! What an upload is (a root filesystem tarball, a docker-archive or an OCI image layout, each
//! possibly gzip- or zstd-compressed) and the layers it holds, in the order they apply.
//!
//! Nothing is held whole in memory: a plain archive is scanned once by seeking over member
//! contents (only names and offsets are kept), then each layer is read from its offset. A
//! compressed image archive is first decompressed to a file (its size charged to the budget);
//! a compressed root filesystem tarball is streamed twice through the decoder (once to tell
//! what it is, once to apply it) rather than stored decompressed.
//!
//! Layouts: `docker save` before Docker 25 (`<id>/layer.tar`, a repeated layer a symlink to the
//! first), `docker save` since 25 (`manifest.json` naming `blobs/sha256/<hex>` of an OCI layout
//! in the same archive), `podman save` / skopeo's docker-archive (top-level `<hex>.tar` layers and
//! `<hex>.json` config, with legacy `<id>/layer.tar` symlinks to them), and OCI image layouts.
//! A member that is a symbolic or hard link is followed inside the archive (a few hops, never
//! outside it). The image's configuration (`Env`, `Entrypoint`, `Cmd`, `WorkingDir`, `User`)
//! is read and checked ([`image_config`]); nothing in it is trusted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;

use sandboxd_protocol::rules;
use sandboxd_protocol::wire::ImageConfig;
use serde::Deserialize;

use super::unpack::{self, Budget, UnpackError};

/// Largest JSON document (manifest, index) read from an archive.
const MAX_JSON: u64 = 4 << 20;
/// Largest image configuration kept, in bytes of its strings: it travels in the unpacker's
/// report and in `meta.json`, both read with a 64 KiB cap.
const MAX_CONFIG_BYTES: usize = 32 * 1024;
/// Most links followed to find a member.
const MAX_LINK_HOPS: usize = 8;

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

/// The members of an archive that matter: regular files by name, and links (symbolic, resolved
/// against the link's directory, or hard) by name to the name they point at.
#[derive(Debug, Default)]
struct Members {
    files: HashMap<String, Member>,
    links: HashMap<String, String>,
}

impl Members {
    fn contains(&self, name: &str) -> bool {
        self.files.contains_key(name) || self.links.contains_key(name)
    }

    /// The regular file `name` is or leads to.
    fn get(&self, name: &str) -> Option<Member> {
        let mut name = name;
        for _ in 0..=MAX_LINK_HOPS {
            if let Some(m) = self.files.get(name) {
                return Some(*m);
            }
            name = self.links.get(name)?;
        }
        None
    }
}

/// `target` of a symbolic link at `link`, as a member name: relative to the link's directory,
/// `.` and `..` folded; `None` if it leaves the archive or is absolute.
fn link_target(link: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
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
        || (!name.contains('/') && (name.ends_with(".json") || name.ends_with(".tar")))
}

fn normalise(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    s.trim_start_matches("./").to_owned()
}

fn format_of(members: &Members) -> Format {
    if members.contains("manifest.json") {
        Format::DockerArchive
    } else if members.contains("index.json") && members.contains("oci-layout") {
        Format::OciLayout
    } else {
        Format::Rootfs
    }
}

/// Scan a stream's member names (for a compressed root filesystem, which is not seekable).
fn scan_stream<R: Read>(reader: R) -> Result<Members, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut members = Members::default();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let entry = entry.map_err(UnpackError::Read)?;
        note(&mut members, &entry);
    }
    Ok(members)
}

/// Keep `entry` in `members` if it is an image member: a regular file, or a link to one.
fn note<R: Read>(members: &mut Members, entry: &tar::Entry<'_, R>) {
    let name = normalise(&entry.path_bytes());
    if !is_image_member(&name) {
        return;
    }
    let kind = entry.header().entry_type();
    if kind.is_file() {
        members.files.insert(
            name,
            Member {
                offset: entry.raw_file_position(),
                size: entry.header().size().unwrap_or(0),
            },
        );
    } else if kind.is_symlink() || kind.is_hard_link() {
        let Some(target) = entry.link_name_bytes() else {
            return;
        };
        let target = String::from_utf8_lossy(&target).into_owned();
        let target = if kind.is_symlink() {
            link_target(&name, &target)
        } else {
            Some(target.trim_start_matches("./").to_owned())
        };
        if let Some(target) = target {
            members.links.insert(name, target);
        }
    }
}

/// Scan a plain archive file, seeking over contents.
fn scan_file(file: &File) -> Result<Members, UnpackError> {
    // Offsets are counted from where reading starts: the start of the file.
    let mut f = file;
    f.seek(SeekFrom::Start(0)).map_err(UnpackError::Read)?;
    let mut archive = tar::Archive::new(file);
    let mut members = Members::default();
    for entry in archive.entries_with_seek().map_err(UnpackError::Read)? {
        let entry = entry.map_err(UnpackError::Read)?;
        note(&mut members, &entry);
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
    members: &Members,
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
    members: &Members,
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
    #[serde(rename = "Config", default)]
    config: Option<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// An image configuration (Docker's and OCI's share these fields); only `config` matters here.
#[derive(Deserialize)]
struct ImageConfigFile {
    #[serde(default)]
    config: Option<RawConfig>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

/// Check an image's configuration: every string free of NUL bytes, environment entries
/// `NAME=value` with valid names, the working directory absolute without `..`, the user a valid
/// `UID[:GID]`/`NAME[:GROUP]`, and all of it small. Empty strings mean "not set", as in Docker.
fn image_config(raw: RawConfig) -> Result<ImageConfig, UnpackError> {
    let refuse = |why: String| bad(format!("image config: {why}"));
    let mut total = 0usize;
    let mut count = |s: &str| -> Result<(), UnpackError> {
        total += s.len() + 1;
        if s.contains('\0') {
            return Err(refuse(format!("{s:?} contains a NUL byte")));
        }
        if total > MAX_CONFIG_BYTES {
            return Err(refuse(format!("larger than {MAX_CONFIG_BYTES} bytes")));
        }
        Ok(())
    };
    let mut env = Vec::new();
    for entry in raw.env.unwrap_or_default() {
        count(&entry)?;
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        rules::EnvEntry::parse(name, value).map_err(|e| refuse(format!("Env: {e}")))?;
        env.push(format!("{name}={value}"));
    }
    for list in [&raw.entrypoint, &raw.cmd].into_iter().flatten() {
        for arg in list {
            count(arg)?;
        }
    }
    let working_dir = raw.working_dir.filter(|w| !w.is_empty());
    if let Some(w) = &working_dir {
        count(w)?;
        if !w.starts_with('/') || w.split('/').any(|c| c == "..") {
            return Err(refuse(format!(
                "WorkingDir {w:?} must be absolute, without '..'"
            )));
        }
    }
    let user = raw.user.filter(|u| !u.is_empty());
    if let Some(u) = &user {
        count(u)?;
        rules::UserSpec::parse(u).map_err(|e| refuse(format!("User {u:?}: {e}")))?;
    }
    Ok(ImageConfig {
        env,
        entrypoint: raw.entrypoint.filter(|e| !e.is_empty()),
        cmd: raw.cmd.filter(|c| !c.is_empty()),
        working_dir,
        user,
    })
}

/// Read and check the configuration member `name`.
fn read_config(file: &File, members: &Members, name: &str) -> Result<ImageConfig, UnpackError> {
    let doc: ImageConfigFile = read_json(file, members, name)?;
    match doc.config {
        Some(raw) => image_config(raw),
        None => Ok(ImageConfig::default()),
    }
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
    config: Option<Descriptor>,
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

/// An image's layer member names, in the order they apply, and its configuration member.
struct Plan {
    layers: Vec<String>,
    config: Option<String>,
}

/// Where an image archive keeps its layers and configuration.
fn plan(file: &File, members: &Members, format: Format) -> Result<Plan, UnpackError> {
    match format {
        Format::Rootfs => Ok(Plan {
            layers: Vec::new(),
            config: None,
        }),
        Format::DockerArchive => {
            let manifests: Vec<DockerManifest> = read_json(file, members, "manifest.json")?;
            let first = manifests
                .into_iter()
                .next()
                .ok_or_else(|| bad("manifest.json lists no image"))?;
            Ok(Plan {
                layers: first
                    .layers
                    .into_iter()
                    .map(|l| l.trim_start_matches("./").to_owned())
                    .collect(),
                config: first.config.map(|c| c.trim_start_matches("./").to_owned()),
            })
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
                        return Ok(Plan {
                            layers: manifest
                                .layers
                                .iter()
                                .map(|l| blob_path(&l.digest))
                                .collect::<Result<_, _>>()?,
                            config: manifest.config.map(|c| blob_path(&c.digest)).transpose()?,
                        });
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
    /// The image's configuration (empty for a root filesystem tarball).
    pub config: ImageConfig,
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
                config: ImageConfig::default(),
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
        return Ok(Unpacked {
            format,
            layers: 1,
            config: ImageConfig::default(),
        });
    }
    let Plan {
        layers: names,
        config,
    } = plan(&plain, &members, format)?;
    if names.is_empty() {
        return Err(bad("the image has no layers"));
    }
    // The configuration first: a bad one refuses the image before any layer is unpacked.
    let config = match config {
        Some(name) => read_config(&plain, &members, &name)?,
        None => ImageConfig::default(),
    };
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
        config,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_links_resolve_inside_the_archive() {
        let cases = [
            ("abc/layer.tar", "../def/layer.tar", Some("def/layer.tar")),
            ("abc/layer.tar", "../0123.tar", Some("0123.tar")),
            ("abc/layer.tar", "./x/../layer2.tar", Some("abc/layer2.tar")),
            ("abc/layer.tar", "../../etc/passwd", None),
            ("abc/layer.tar", "/etc/passwd", None),
            ("top.tar", "..", None),
        ];
        for (link, target, want) in cases {
            assert_eq!(
                link_target(link, target).as_deref(),
                want,
                "{link} -> {target}"
            );
        }
    }

    #[test]
    fn members_follow_links_a_few_hops_and_no_further() {
        let mut m = Members::default();
        m.files.insert(
            "0123.tar".into(),
            Member {
                offset: 512,
                size: 7,
            },
        );
        m.links.insert("a/layer.tar".into(), "0123.tar".into());
        m.links.insert("b/layer.tar".into(), "a/layer.tar".into());
        m.links.insert("loop1".into(), "loop2".into());
        m.links.insert("loop2".into(), "loop1".into());
        assert_eq!(m.get("b/layer.tar").map(|m| m.offset), Some(512));
        assert!(m.contains("a/layer.tar"));
        assert!(m.get("loop1").is_none());
        assert!(m.get("missing").is_none());
    }

    fn raw(v: serde_json::Value) -> RawConfig {
        let file: ImageConfigFile =
            serde_json::from_value(serde_json::json!({ "config": v })).expect("a config document");
        file.config.expect("a config")
    }

    #[test]
    fn image_configs_are_checked() {
        let ok = image_config(raw(serde_json::json!({
            "Env": ["PATH=/usr/bin:/bin", "EMPTY=", "BARE"],
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve"],
            "WorkingDir": "/srv",
            "User": "app:staff",
            "ExposedPorts": {"80/tcp": {}},
        })))
        .expect("a valid config");
        assert_eq!(
            ok,
            ImageConfig {
                env: vec!["PATH=/usr/bin:/bin".into(), "EMPTY=".into(), "BARE=".into()],
                entrypoint: Some(vec!["/bin/app".into()]),
                cmd: Some(vec!["--serve".into()]),
                working_dir: Some("/srv".into()),
                user: Some("app:staff".into()),
            }
        );
        // Empty and null mean "not set".
        let empty = image_config(raw(serde_json::json!({
            "Env": null, "Entrypoint": null, "Cmd": [], "WorkingDir": "", "User": ""
        })))
        .expect("an empty config");
        assert_eq!(empty, ImageConfig::default());
        for (bad, why) in [
            (serde_json::json!({"Env": ["1X=y"]}), "Env"),
            (serde_json::json!({"Env": ["A=b\u{0}c"]}), "NUL"),
            (serde_json::json!({"WorkingDir": "srv"}), "WorkingDir"),
            (serde_json::json!({"WorkingDir": "/a/../b"}), "WorkingDir"),
            (serde_json::json!({"User": "a b"}), "User"),
            (serde_json::json!({"User": "70000"}), "User"),
            (serde_json::json!({"Cmd": ["x".repeat(40_000)]}), "larger"),
        ] {
            let e = image_config(raw(bad.clone()))
                .expect_err("refused")
                .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
