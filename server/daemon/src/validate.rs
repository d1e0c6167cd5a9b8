//! Parse a `CreateSandbox` request once into a [`ValidCreate`]; nothing downstream re-checks it.

use std::collections::BTreeMap;

use sandboxd_api::{CreateSandbox, ImageConfig, Limits};
use sandboxd_protocol::rules::{EnvEntry, Hostname, UserSpec};
use uuid::Uuid;

pub const MAX_ARGS: usize = 4096;
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;
pub const MAX_ENV: usize = 1024;
pub const MAX_CWD_BYTES: usize = 4096;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_VALUE: usize = 255;
pub const MAX_TIMEOUT_SECS: u64 = 31_536_000;
/// Longest `ttl_secs`, `remove_after_exit_secs` and `/extend` (ten years).
pub const MAX_LIFETIME_SECS: u64 = 10 * 365 * 86_400;
pub const MIN_MEMORY_BYTES: u64 = 1024 * 1024;
pub const MIN_CPUS: f64 = 0.001;
pub const MAX_CPUS: f64 = 1024.0;
pub const MIN_OUTPUT_BYTES: u64 = 1024;
/// Smallest `limits.disk_bytes` (ext4 needs some room of its own).
pub const MIN_DISK_BYTES: u64 = 16 << 20;

/// The largest integer the contract (int64) and the database hold.
pub const MAX_INT64: u64 = i64::MAX as u64;

pub const DEFAULT_CWD: &str = "/work";
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A request that failed validation; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError(msg.into())
}

/// What a sandbox runs: its request over its image's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub command: Vec<String>,
    /// In order: the request's variables, the image's it did not set, then the defaults.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub user: Option<String>,
}

/// Why a request and its image give nothing valid to run (422: the request itself is well
/// formed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    #[error("command: the request has none and the image names neither an Entrypoint nor a Cmd")]
    NoCommand,
    #[error("the image's configuration: {0}")]
    ImageConfig(ValidationError),
}

/// A create request whose every field is known to be acceptable.
#[derive(Debug, Clone)]
pub struct ValidCreate {
    /// The request as the client sent it (stored and shown as `spec`).
    pub spec: CreateSandbox,
    pub name: Option<String>,
    pub timeout_secs: Option<u64>,
    hostname: Option<String>,
}

impl ValidCreate {
    pub fn parse(spec: CreateSandbox) -> Result<Self, ValidationError> {
        check_args("command", &spec.command)?;
        if let Some(entrypoint) = &spec.entrypoint {
            check_args("entrypoint", entrypoint)?;
            let both: Vec<String> = entrypoint.iter().chain(&spec.command).cloned().collect();
            check_args("entrypoint and command together", &both)?;
        }
        // Without an image nothing else can say what to run.
        if spec.rootfs.is_none() {
            let argv0 = spec.entrypoint.iter().flatten().chain(&spec.command).next();
            if argv0.is_none_or(|a| a.is_empty()) {
                return Err(invalid("command: must not be empty"));
            }
        }
        if let Some(user) = &spec.user {
            UserSpec::parse(user).map_err(|e| invalid(format!("user: {e}")))?;
        }
        check_env(&spec.env)?;
        if let Some(cwd) = &spec.cwd {
            check_cwd(cwd)?;
        }
        if let Some(h) = &spec.hostname {
            Hostname::parse(h).map_err(|e| invalid(format!("hostname: {e}")))?;
        }
        if let Some(n) = &spec.name {
            check_name(n)?;
        }
        check_labels(&spec.labels)?;
        check_limits(&spec.limits)?;
        check_terminal(spec.tty, spec.cols, spec.rows)?;
        if let Some(rootfs) = &spec.rootfs {
            check_image_name(&rootfs.image).map_err(|e| invalid(format!("rootfs.{e}")))?;
        }
        if let Some(changes) = &spec.capabilities {
            for name in changes.drop.iter().chain(&changes.add) {
                if sandboxd_protocol::capabilities::canonical(name).is_none() {
                    return Err(invalid(format!(
                        "capabilities: unknown capability {name:?}"
                    )));
                }
            }
        }
        if let Some(net) = &spec.network {
            check_network(net)?;
        }
        if let Some(t) = spec.ttl_secs {
            check_lifetime("ttl_secs", t)?;
        }
        if let Some(t) = spec.remove_after_exit_secs {
            check_lifetime("remove_after_exit_secs", t)?;
        }
        Ok(ValidCreate {
            name: spec.name.clone(),
            timeout_secs: spec.limits.timeout_secs,
            hostname: spec.hostname.clone(),
            spec,
        })
    }

    /// The host name: the requested one, else the name when it is a valid host name, else
    /// `sbx-` and the first 8 hex digits of the id.
    pub fn hostname_for(&self, id: Uuid) -> String {
        if let Some(h) = &self.hostname {
            return h.clone();
        }
        if let Some(n) = self.name.as_deref().filter(|n| Hostname::parse(n).is_ok()) {
            return n.to_owned();
        }
        let simple = id.simple().to_string();
        format!("sbx-{}", &simple[..8])
    }

    /// What runs, by Docker's rules: a request's `entrypoint` replaces the image's and drops
    /// its `Cmd`; otherwise the image's `Entrypoint` is followed by the request's `command`, or
    /// by the image's `Cmd` when the request has none. The request's `env` wins over the
    /// image's, which wins over the defaults (`PATH`, `HOME`, `HOSTNAME`); `cwd` over
    /// `WorkingDir` over `/work`; `user` over `User`. What the image contributes is checked as a
    /// request's field would be.
    pub fn launch(
        &self,
        image: Option<&ImageConfig>,
        hostname: &str,
    ) -> Result<Launch, LaunchError> {
        let none = ImageConfig::default();
        let image = image.unwrap_or(&none);
        let spec = &self.spec;
        let from_image = LaunchError::ImageConfig;
        let (entrypoint, cmd) = match &spec.entrypoint {
            Some(entrypoint) => (entrypoint.clone(), spec.command.clone()),
            None if spec.command.is_empty() => (
                image.entrypoint.clone().unwrap_or_default(),
                image.cmd.clone().unwrap_or_default(),
            ),
            None => (
                image.entrypoint.clone().unwrap_or_default(),
                spec.command.clone(),
            ),
        };
        let command: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if command.first().is_none_or(|a| a.is_empty()) {
            return Err(LaunchError::NoCommand);
        }
        check_args("command", &command).map_err(from_image)?;
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for entry in &image.env {
            let (k, v) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
            EnvEntry::parse(k, v).map_err(|e| from_image(invalid(format!("env: {e}"))))?;
            if !env.iter().any(|(have, _)| have == k) {
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        if env.len() > MAX_ENV {
            return Err(from_image(invalid(format!(
                "env: at most {MAX_ENV} entries"
            ))));
        }
        let user = spec.user.clone().or_else(|| image.user.clone());
        if let Some(u) = &user {
            UserSpec::parse(u).map_err(|e| from_image(invalid(format!("user: {e}"))))?;
        }
        // Docker's HOME: root's is /root; another user's is its passwd entry's, which only the
        // helper reads, so it gets `/` unless the request or the image sets HOME.
        let is_root = user
            .as_deref()
            .is_none_or(|u| matches!(u.split(':').next(), Some("0" | "root")));
        let home = if is_root { "/root" } else { "/" };
        for (k, v) in [
            ("PATH", DEFAULT_PATH),
            ("HOME", home),
            ("HOSTNAME", hostname),
        ] {
            if !env.iter().any(|(have, _)| have == k) {
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        let cwd = match (&spec.cwd, &image.working_dir) {
            (Some(cwd), _) => cwd.clone(),
            (None, Some(dir)) => {
                check_cwd(dir).map_err(from_image)?;
                dir.clone()
            }
            (None, None) => DEFAULT_CWD.to_owned(),
        };
        Ok(Launch {
            command,
            env,
            cwd,
            user,
        })
    }
}

/// The form of each limit (400 when malformed); maximums and enforceability are `limits.rs`'s.
pub fn check_limits(l: &Limits) -> Result<(), ValidationError> {
    // Sizes and counts are int64 in the contract and in the database: a larger u64 is a 400,
    // never a store error (schemathesis sent 2^63).
    for (field, value) in [
        ("memory_bytes", l.memory_bytes),
        ("pids", l.pids),
        ("disk_bytes", l.disk_bytes),
        ("output_bytes", l.output_bytes),
    ] {
        if value.is_some_and(|v| v > MAX_INT64) {
            return Err(invalid(format!(
                "limits.{field}: must be at most {MAX_INT64}"
            )));
        }
    }
    if let Some(t) = l.timeout_secs {
        if !(1..=MAX_TIMEOUT_SECS).contains(&t) {
            return Err(invalid(format!(
                "limits.timeout_secs: must be between 1 and {MAX_TIMEOUT_SECS}"
            )));
        }
    }
    if let Some(m) = l.memory_bytes {
        if m < MIN_MEMORY_BYTES {
            return Err(invalid(format!(
                "limits.memory_bytes: must be at least {MIN_MEMORY_BYTES} (1 MiB)"
            )));
        }
    }
    if let Some(c) = l.cpus {
        if !c.is_finite() || !(MIN_CPUS..=MAX_CPUS).contains(&c) {
            return Err(invalid(format!(
                "limits.cpus: must be a number of cores between {MIN_CPUS} and {MAX_CPUS}"
            )));
        }
    }
    if l.pids
        .is_some_and(|p| !(1..=sandboxd_protocol::wire::MAX_PIDS).contains(&p))
    {
        return Err(invalid(format!(
            "limits.pids: must be between 1 and {} (the kernel's most)",
            sandboxd_protocol::wire::MAX_PIDS
        )));
    }
    if l.disk_bytes.is_some_and(|d| d < MIN_DISK_BYTES) {
        return Err(invalid(format!(
            "limits.disk_bytes: must be at least {MIN_DISK_BYTES} (16 MiB)"
        )));
    }
    if let Some(o) = l.output_bytes {
        if o < MIN_OUTPUT_BYTES {
            return Err(invalid(format!(
                "limits.output_bytes: must be at least {MIN_OUTPUT_BYTES} (1 KiB)"
            )));
        }
    }
    Ok(())
}

/// `ttl_secs`, `remove_after_exit_secs`, and the body of `/extend`.
pub fn check_lifetime(field: &str, secs: u64) -> Result<(), ValidationError> {
    if !(1..=MAX_LIFETIME_SECS).contains(&secs) {
        return Err(invalid(format!(
            "{field}: must be between 1 and {MAX_LIFETIME_SECS} (ten years)"
        )));
    }
    Ok(())
}

/// Published ports of one sandbox at most (the helper's limit too).
pub const MAX_PORTS: usize = 64;

/// The form of `network` (400 when malformed); whether this host offers the mode is the
/// service's (422).
pub fn check_network(net: &sandboxd_api::NetworkSpec) -> Result<(), ValidationError> {
    if let Some(policy) = &net.egress {
        policy
            .check_size()
            .map_err(|e| invalid(format!("network.egress: {e}")))?;
    }
    if net.mode == sandboxd_api::NetworkMode::None && (net.group.is_some() || !net.ports.is_empty())
    {
        return Err(invalid(
            "network: group and ports need mode \"bridge\" (mode \"none\" has only loopback)",
        ));
    }
    if let Some(g) = &net.group {
        if !sandboxd_protocol::net::valid_group(g) {
            return Err(invalid(
                "network.group: must be 1-63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            ));
        }
    }
    if net.ports.len() > MAX_PORTS {
        return Err(invalid(format!("network.ports: at most {MAX_PORTS}")));
    }
    for (i, p) in net.ports.iter().enumerate() {
        if p.sandbox == 0 {
            return Err(invalid("network.ports: sandbox port must be 1-65535"));
        }
        if p.host != 0 && p.host < 1024 {
            return Err(invalid(
                "network.ports: host port must be 0 (pick a free one) or 1024-65535",
            ));
        }
        if net.ports[..i].iter().any(|q| q.sandbox == p.sandbox) {
            return Err(invalid(format!(
                "network.ports: sandbox port {} is published twice",
                p.sandbox
            )));
        }
        if p.host != 0 && net.ports[..i].iter().any(|q| q.host == p.host) {
            return Err(invalid(format!(
                "network.ports: host port {} is given twice",
                p.host
            )));
        }
    }
    Ok(())
}

fn check_command(command: &[String]) -> Result<(), ValidationError> {
    if command.is_empty() || command[0].is_empty() {
        return Err(invalid("command: must not be empty"));
    }
    check_args("command", command)
}

/// The sizes and bytes of an argument list (`command`, `entrypoint`), which may be empty.
fn check_args(field: &str, args: &[String]) -> Result<(), ValidationError> {
    if args.len() > MAX_ARGS {
        return Err(invalid(format!("{field}: at most {MAX_ARGS} arguments")));
    }
    if args.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
        return Err(invalid(format!(
            "{field}: at most {MAX_COMMAND_BYTES} bytes in total"
        )));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(invalid(format!("{field}: must not contain NUL bytes")));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if env.len() > MAX_ENV {
        return Err(invalid(format!("env: at most {MAX_ENV} entries")));
    }
    for (k, v) in env {
        EnvEntry::parse(k, v).map_err(|e| invalid(format!("env: {e}")))?;
    }
    Ok(())
}

fn check_cwd(cwd: &str) -> Result<(), ValidationError> {
    if !cwd.starts_with('/') {
        return Err(invalid("cwd: must be an absolute path"));
    }
    if cwd.contains('\0') {
        return Err(invalid("cwd: must not contain NUL bytes"));
    }
    if cwd.len() > MAX_CWD_BYTES {
        return Err(invalid(format!("cwd: at most {MAX_CWD_BYTES} bytes")));
    }
    if cwd.split('/').any(|c| c == "..") {
        return Err(invalid("cwd: must not contain '..'"));
    }
    Ok(())
}

/// An image name: like a sandbox name, and `:` allowed after the first character (`debian:12`).
pub fn check_image_name(name: &str) -> Result<(), ValidationError> {
    let bytes = name.as_bytes();
    let ok = (1..=128).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'));
    if !ok {
        return Err(invalid(
            "image: name must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
        ));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ValidationError> {
    let bytes = name.as_bytes();
    let ok = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(invalid(
            "name: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        ));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(invalid("name: must not be a UUID"));
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!("labels: at most {MAX_LABELS} entries")));
    }
    for (k, v) in labels {
        let key_ok = (1..=63).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'));
        if !key_ok {
            return Err(invalid(format!(
                "labels: key {k:?} must be 1-63 characters of [A-Za-z0-9_.-/]"
            )));
        }
        if v.chars().count() > MAX_LABEL_VALUE || v.contains('\0') {
            return Err(invalid(format!(
                "labels: value of {k} must be at most {MAX_LABEL_VALUE} characters without NUL"
            )));
        }
    }
    Ok(())
}

/// Check an exec request (`POST /v1/sandboxes/{id}/execs`) like a create request's fields.
pub fn check_exec(spec: &sandboxd_api::CreateExec) -> Result<(), ValidationError> {
    check_command(&spec.command)?;
    check_env(&spec.env)?;
    if let Some(cwd) = &spec.cwd {
        check_cwd(cwd)?;
    }
    check_terminal(spec.tty, spec.cols, spec.rows)
}

/// `cols`/`rows`: at least 1, and only with `tty`.
fn check_terminal(tty: bool, cols: Option<u16>, rows: Option<u16>) -> Result<(), ValidationError> {
    for (field, n) in [("cols", cols), ("rows", rows)] {
        if n == Some(0) {
            return Err(invalid(format!("{field}: must be at least 1")));
        }
    }
    if !tty && (cols.is_some() || rows.is_some()) {
        return Err(invalid("cols, rows: only with tty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<ValidCreate, ValidationError> {
        ValidCreate::parse(serde_json::from_value(json).unwrap())
    }

    fn check(json: serde_json::Value, field: Option<&str>) {
        match (spec(json.clone()), field) {
            (Ok(_), None) => {}
            (Err(e), Some(f)) => assert!(e.0.starts_with(f), "{json}: {e}"),
            (r, f) => panic!("{json}: expected {f:?}, got {r:?}"),
        }
    }

    #[test]
    fn fields_are_checked() {
        use serde_json::json;
        check(json!({"command": ["true"]}), None);
        check(json!({"command": []}), Some("command"));
        check(json!({"command": ["a\u{0}b"]}), Some("command"));
        check(json!({"command": ["x"], "env": {"1A": "x"}}), Some("env"));
        check(json!({"command": ["x"], "env": {"A_1": "x"}}), None);
        for field in ["memory_bytes", "pids", "disk_bytes", "output_bytes"] {
            check(
                json!({"command": ["x"], "limits": {field: 9_223_372_036_854_775_808u64}}),
                Some(&format!("limits.{field}")),
            );
        }
        // The helper takes at most 4096 arguments in all: entrypoint and command together.
        let half: Vec<String> = (0..2100).map(|i| i.to_string()).collect();
        check(
            json!({"entrypoint": half, "command": half}),
            Some("entrypoint and command"),
        );
        check(json!({"command": ["x"], "cwd": "rel"}), Some("cwd"));
        check(json!({"command": ["x"], "cwd": "/a/../b"}), Some("cwd"));
        check(
            json!({"command": ["x"], "hostname": "-a"}),
            Some("hostname"),
        );
        check(json!({"command": ["x"], "hostname": "a.b-c"}), None);
        check(json!({"command": ["x"], "name": "_a"}), Some("name"));
        check(
            json!({"command": ["x"], "name": Uuid::nil().to_string()}),
            Some("name"),
        );
        check(json!({"command": ["x"], "name": "a_b.c"}), None);
        check(
            json!({"command": ["x"], "labels": {"": "v"}}),
            Some("labels"),
        );
        check(json!({"command": ["x"], "labels": {"k/x": "v"}}), None);
        check(
            json!({"command": ["x"], "limits": {"timeout_secs": 0}}),
            Some("limits.timeout_secs"),
        );
        for (limits, field) in [
            (json!({"memory_bytes": 1_048_575}), "limits.memory_bytes"),
            (json!({"cpus": 0}), "limits.cpus"),
            (json!({"cpus": -1}), "limits.cpus"),
            (json!({"cpus": 1025}), "limits.cpus"),
            (json!({"pids": 0}), "limits.pids"),
            (json!({"pids": 4_194_305}), "limits.pids"),
            (json!({"output_bytes": 1023}), "limits.output_bytes"),
        ] {
            check(json!({"command": ["x"], "limits": limits}), Some(field));
        }
        check(
            json!({"command": ["x"], "limits": {"memory_bytes": 1_048_576, "cpus": 0.5, "pids": 1, "output_bytes": 1024}}),
            None,
        );
        check(json!({"command": ["x"], "ttl_secs": 0}), Some("ttl_secs"));
        check(
            json!({"command": ["x"], "ttl_secs": MAX_LIFETIME_SECS + 1}),
            Some("ttl_secs"),
        );
        check(
            json!({"command": ["x"], "remove_after_exit_secs": 0}),
            Some("remove_after_exit_secs"),
        );
        check(
            json!({"command": ["x"], "ttl_secs": 1, "remove_after_exit_secs": MAX_LIFETIME_SECS}),
            None,
        );
    }

    #[test]
    fn defaults_fill_hostname_and_env() {
        let id = Uuid::parse_str("0123abcd-0000-0000-0000-000000000000").unwrap();
        let v = spec(serde_json::json!({"command": ["x"], "name": "a_b"})).unwrap();
        assert_eq!(v.hostname_for(id), "sbx-0123abcd");
        assert_eq!(v.launch(None, "h").unwrap().cwd, "/work");
        let v = spec(serde_json::json!({"command": ["x"], "name": "web", "env": {"HOME": "/h"}}))
            .unwrap();
        assert_eq!(v.hostname_for(id), "web");
        let env = v.launch(None, "web").unwrap().env;
        assert!(env.contains(&("HOME".into(), "/h".into())));
        assert!(env.contains(&("HOSTNAME".into(), "web".into())));
        assert!(env.iter().any(|(k, _)| k == "PATH"));
    }

    #[test]
    fn requests_combine_with_image_configs_as_docker_does() {
        let image = ImageConfig {
            env: vec!["PATH=/opt/bin".into(), "MODE=image".into(), "KEEP=1".into()],
            entrypoint: Some(vec!["/entry".into(), "-e".into()]),
            cmd: Some(vec!["default".into()]),
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
        };
        let launch = |req: serde_json::Value, image: Option<&ImageConfig>| {
            let mut req = req;
            req["rootfs"] = serde_json::json!({"image": "i"});
            spec(req).expect("valid").launch(image, "h")
        };
        let cases: &[(serde_json::Value, &[&str])] = &[
            (serde_json::json!({}), &["/entry", "-e", "default"]),
            (
                serde_json::json!({"command": ["mine"]}),
                &["/entry", "-e", "mine"],
            ),
            (serde_json::json!({"entrypoint": ["/other"]}), &["/other"]),
            (
                serde_json::json!({"entrypoint": ["/other"], "command": ["a"]}),
                &["/other", "a"],
            ),
            (
                serde_json::json!({"entrypoint": [], "command": ["sh"]}),
                &["sh"],
            ),
        ];
        for (req, want) in cases {
            let got = launch(req.clone(), Some(&image)).expect("a command");
            assert_eq!(got.command, *want, "{req}");
        }
        assert_eq!(
            launch(serde_json::json!({"entrypoint": []}), Some(&image)),
            Err(LaunchError::NoCommand)
        );
        assert_eq!(
            launch(serde_json::json!({}), None),
            Err(LaunchError::NoCommand)
        );
        let got = launch(
            serde_json::json!({"env": {"MODE": "request"}, "cwd": "/tmp"}),
            Some(&image),
        )
        .expect("a command");
        let env = |k: &str| {
            got.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(env("MODE"), Some("request"));
        assert_eq!(env("KEEP"), Some("1"));
        assert_eq!(env("PATH"), Some("/opt/bin"));
        assert_eq!(env("HOME"), Some("/"));
        assert_eq!(env("HOSTNAME"), Some("h"));
        assert_eq!(got.env.iter().filter(|(n, _)| n == "MODE").count(), 1);
        assert_eq!(got.cwd, "/tmp");
        assert_eq!(got.user.as_deref(), Some("app"));
        let got = launch(serde_json::json!({"user": "0:0"}), Some(&image)).expect("a command");
        assert_eq!(got.cwd, "/srv");
        assert_eq!(got.user.as_deref(), Some("0:0"));
        assert!(got.env.contains(&("HOME".into(), "/root".into())));
        // What the image contributes is checked like a request's field.
        let bad = ImageConfig {
            working_dir: Some("relative".into()),
            ..image.clone()
        };
        assert!(matches!(
            launch(serde_json::json!({}), Some(&bad)),
            Err(LaunchError::ImageConfig(_))
        ));
        // Without an image the request must name a program; `user` must parse.
        assert!(spec(serde_json::json!({"entrypoint": []})).is_err());
        assert!(spec(serde_json::json!({"entrypoint": ["/bin/sh"]})).is_ok());
        assert!(spec(serde_json::json!({"command": ["x"], "user": "a b"})).is_err());
        assert!(spec(serde_json::json!({"command": ["x"], "user": "1000:1000"})).is_ok());
    }
}
