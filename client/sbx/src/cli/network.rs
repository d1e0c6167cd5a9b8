//! `--net`, `--group`, `-p`, `--egress` and `--egress-deny` of `sbx run`: the sandbox's
//! `network`; and `sbx network set` / `sbx network denials`: a running sandbox's egress.

use clap::{Args, Subcommand};
use sandboxd_api::egress::{EgressPolicy, EgressRule};
use sandboxd_api::{NetworkMode, NetworkSpec, PortSpec};
use sandboxd_client::Client;

use super::output::{print_json, println_checked};
use super::{resolve, CliError};

/// An egress rule, parsed as the daemon parses it (an error before anything is sent).
pub fn parse_rule(s: &str) -> Result<EgressRule, String> {
    s.parse::<EgressRule>().map_err(|e| e.to_string())
}

/// The policy of `--egress` and `--egress-deny`; `None` when neither was given.
pub fn policy(allow: &[EgressRule], deny: &[EgressRule]) -> Option<EgressPolicy> {
    if allow.is_empty() && deny.is_empty() {
        return None;
    }
    Some(EgressPolicy {
        allow: allow.to_vec(),
        deny: deny.to_vec(),
    })
}

#[derive(Debug, Args)]
pub struct NetworkArgs {
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Replace a sandbox's egress policy (a running one's at once: open connections the new
    /// policy no longer allows are cut). Without any --egress, nothing beyond its group.
    Set(SetArgs),
    /// List a sandbox's most recent egress denials, newest first.
    Denials(DenialsArgs),
}

#[derive(Debug, Args)]
struct SetArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
    /// Allow a destination (repeatable): a name (pypi.org), a wildcard (*.npmjs.org), an address
    /// or CIDR (203.0.113.7, 198.51.100.0/24), each with an optional :PORT, or '*'.
    #[arg(long = "egress", value_name = "RULE", value_parser = parse_rule)]
    egress: Vec<EgressRule>,
    /// Deny a destination (repeatable; wins over --egress).
    #[arg(long = "egress-deny", value_name = "RULE", value_parser = parse_rule)]
    egress_deny: Vec<EgressRule>,
}

#[derive(Debug, Args)]
struct DenialsArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
    /// How many (1-1000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// One JSON array instead of one line per denial.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: NetworkArgs) -> Result<u8, CliError> {
    match args.command {
        NetworkCommand::Set(a) => {
            let id = resolve(client, &a.id).await?.id.to_string();
            let policy = EgressPolicy {
                allow: a.egress,
                deny: a.egress_deny,
            };
            let info = client.set_egress(&id, &policy).await?;
            print_json(&info)?;
        }
        NetworkCommand::Denials(a) => {
            let id = resolve(client, &a.id).await?.id.to_string();
            let denials = client.egress_denials(&id, a.limit).await?;
            if a.json {
                print_json(&denials)?;
            } else {
                for d in &denials {
                    println_checked(&denial_line(d))?;
                }
            }
        }
    }
    Ok(0)
}

/// `2026-12-03T18:00:00Z tcp 203.0.113.20:443 pypi.org name_mismatch`.
pub fn denial_line(d: &sandboxd_api::egress::EgressDenial) -> String {
    let at =
        d.at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
    let dest = match (d.address, d.port) {
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "-".to_owned(),
    };
    let reason = serde_json::to_value(d.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "{at} {} {dest} {} {reason}",
        d.protocol,
        d.name.as_deref().unwrap_or("-")
    )
}

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
    egress: Option<EgressPolicy>,
) -> Option<NetworkSpec> {
    if mode.is_none() && group.is_none() && ports.is_empty() && egress.is_none() {
        return None;
    }
    // A group, a published port or egress only makes sense bridged: imply it.
    Some(NetworkSpec {
        mode: mode.unwrap_or(NetworkMode::Bridge),
        group: group.clone(),
        ports: ports.to_vec(),
        egress,
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
        assert_eq!(spec(None, &None, &[], None), None);
        assert_eq!(
            spec(None, &Some("g".into()), &[], None).unwrap().mode,
            NetworkMode::Bridge
        );
    }

    #[test]
    fn egress_flags_parse_like_the_daemon_and_imply_bridge() {
        assert!(parse_rule("pypi.org").is_ok());
        assert!(parse_rule("*.pythonhosted.org:443").is_ok());
        assert!(parse_rule("*").is_ok());
        let e = parse_rule("http://pypi.org").unwrap_err();
        assert!(e.contains("http://pypi.org"), "{e}");
        assert!(parse_rule("::1").unwrap_err().contains("IPv6"));
        assert_eq!(policy(&[], &[]), None);
        let p = policy(
            &[parse_rule("pypi.org").unwrap()],
            &[parse_rule("203.0.113.9").unwrap()],
        );
        let net = spec(None, &None, &[], p.clone()).unwrap();
        assert_eq!(net.mode, NetworkMode::Bridge);
        assert_eq!(
            serde_json::to_value(&net.egress).unwrap(),
            serde_json::json!({"allow": ["pypi.org"], "deny": ["203.0.113.9"]})
        );
    }
}
