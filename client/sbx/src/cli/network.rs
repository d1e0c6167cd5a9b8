//! `--net`, `--group` and `-p` of `sbx run`: the sandbox's `network`.

use sandboxd_api::{NetworkMode, NetworkSpec, PortSpec};

/// `none` or `bridge`.
pub fn parse_mode(s: &str) -> Result<NetworkMode, String> {
    match s {
        "none" => Ok(NetworkMode::None),
        "bridge" => Ok(NetworkMode::Bridge),
        _ => Err(format!("{s:?}: expected none or bridge")),
    }
}

/// `SANDBOX_PORT:HOST_PORT` (host 0 picks a free port) or just `SANDBOX_PORT` (same as `:0`).
pub fn parse_port(s: &str) -> Result<PortSpec, String> {
    let (sandbox, host) = s.split_once(':').unwrap_or((s, "0"));
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{s:?}: expected SANDBOX_PORT:HOST_PORT, like 8080:0"))
    };
    Ok(PortSpec {
        sandbox: port(sandbox)?,
        host: port(host)?,
    })
}

/// The `network` of the request; `None` when no flag asked for one (the daemon's default).
pub fn spec(
    mode: Option<NetworkMode>,
    group: &Option<String>,
    ports: &[PortSpec],
) -> Option<NetworkSpec> {
    if mode.is_none() && group.is_none() && ports.is_empty() {
        return None;
    }
    // A group or a published port only makes sense bridged: imply it.
    Some(NetworkSpec {
        mode: mode.unwrap_or(NetworkMode::Bridge),
        group: group.clone(),
        ports: ports.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_modes_parse() {
        assert_eq!(
            parse_port("8080:0").unwrap(),
            PortSpec {
                sandbox: 8080,
                host: 0
            }
        );
        assert_eq!(
            parse_port("80").unwrap(),
            PortSpec {
                sandbox: 80,
                host: 0
            }
        );
        assert!(parse_port("80:x").is_err());
        assert!(parse_mode("host").is_err());
        assert_eq!(spec(None, &None, &[]), None);
        assert_eq!(
            spec(None, &Some("g".into()), &[]).unwrap().mode,
            NetworkMode::Bridge
        );
    }
}
