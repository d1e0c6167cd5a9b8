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

/// `-p HOST_PORT:SANDBOX_PORT` as Docker reads it (host 0 picks a free port), or just
/// `SANDBOX_PORT` (same as `0:SANDBOX_PORT`). A sandbox port of 0 is the old `SANDBOX:HOST` order
/// of sbx: it is refused with the new spelling.
pub fn parse_port(s: &str) -> Result<PortSpec, String> {
    let (host, sandbox) = s.split_once(':').unwrap_or(("0", s));
    let port = |p: &str| {
        p.parse::<u16>().map_err(|_| {
            format!("{s:?}: expected HOST_PORT:SANDBOX_PORT (like 8080:80 or 0:80) or SANDBOX_PORT")
        })
    };
    let (host, sandbox) = (port(host)?, port(sandbox)?);
    if sandbox == 0 {
        return Err(format!(
            "{s:?}: the sandbox port is 0; -p is HOST_PORT:SANDBOX_PORT like Docker's (sbx once read it \
             the other way round): for sandbox port {host} on a free host port write -p 0:{host} or -p {host}"
        ));
    }
    Ok(PortSpec { sandbox, host })
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
        let port = |s| parse_port(s).map(|p| (p.host, p.sandbox));
        // Docker's order: HOST:SANDBOX.
        assert_eq!(port("3000:8080"), Ok((3000, 8080)));
        assert_eq!(port("0:8080"), Ok((0, 8080)));
        assert_eq!(port("8080"), Ok((0, 8080)));
        // The old SANDBOX:HOST spelling `8080:0` is refused with the new one in the message.
        let old = port("8080:0").unwrap_err();
        assert!(old.contains("-p 0:8080"), "{old}");
        assert!(port("80:x").is_err());
        assert!(port("x").is_err());
        assert!(port("1:2:3").is_err());
        assert!(parse_mode("host").is_err());
        assert_eq!(spec(None, &None, &[]), None);
        assert_eq!(
            spec(None, &Some("g".into()), &[]).unwrap().mode,
            NetworkMode::Bridge
        );
    }
}
