//! `sbx doctor`: what the daemon's host provides for its mode, and how to fix what is missing.

use clap::Args;
use sandboxd_api::Info;
use sandboxd_client::Client;

use super::output::{print_json, println_checked};
use super::CliError;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON (the `preflight` of `GET /v1/info`).
    #[arg(long)]
    json: bool,
}

/// Exit status 0 when every check holds, 1 when something is missing.
pub async fn run(client: &Client, args: DoctorArgs) -> Result<u8, CliError> {
    let info = client.info().await?;
    if args.json {
        print_json(&info.preflight)?;
    } else {
        println_checked(&format_doctor(&info))?;
    }
    Ok(u8::from(info.preflight.iter().any(|c| !c.ok)))
}

fn format_doctor(info: &Info) -> String {
    let mut out = format!("sandboxd {} ({} mode)\n", info.version, info.mode);
    if info.preflight.is_empty() {
        out.push_str("this daemon reports no checks (older than sbx doctor)\n");
    }
    for c in &info.preflight {
        out.push_str(&format!(
            "{} {:<17} {}\n",
            if c.ok { "ok     " } else { "MISSING" },
            c.name,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("        {:<17} fix: {fix}\n", ""));
        }
    }
    let missing = info.preflight.iter().filter(|c| !c.ok).count();
    out.push_str(&if missing == 0 {
        "everything this mode needs is in place".to_owned()
    } else {
        format!("{missing} missing; the daemon runs without them (see each fix)")
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_api::PreflightCheck;

    #[test]
    fn missing_pieces_are_marked_with_their_fix() {
        let info: Info = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "mode": "rootless", "user_namespaces": true,
            "namespaces": [], "cgroup": {"version": "v2", "controllers": []},
            "overlayfs": true, "network_modes": ["none"],
            "uid_ranges": {"base": 0, "size": 1, "slots": 0},
        }))
        .unwrap();
        let info = Info {
            preflight: vec![
                PreflightCheck {
                    name: "pasta".into(),
                    ok: false,
                    detail: "not installed".into(),
                    fix: Some("apt-get install passt".into()),
                },
                PreflightCheck {
                    name: "newuidmap".into(),
                    ok: true,
                    detail: "found".into(),
                    fix: None,
                },
            ],
            ..info
        };
        let text = format_doctor(&info);
        assert!(text.contains("MISSING pasta"), "{text}");
        assert!(text.contains("fix: apt-get install passt"), "{text}");
        assert!(text.contains("ok      newuidmap"), "{text}");
        assert!(text.ends_with("1 missing; the daemon runs without them (see each fix)"));
    }
}
