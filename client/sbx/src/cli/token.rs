//! `sbx token`: create, list and revoke API tokens (admin only).

use clap::{Args, Subcommand, ValueEnum};
use sandboxd_client::Client;

use super::output::{print_json, println_checked};
use super::CliError;

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret (shown this once).
    Create(CreateArgs),
    /// List tokens (never their secrets).
    Ls(LsArgs),
    /// Revoke a token: it stops working at once.
    Revoke(RevokeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    User,
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Tenant the token acts for.
    #[arg(long)]
    tenant: String,
    /// `user` sees only its tenant's sandboxes; `admin` manages tokens and sees everything.
    #[arg(long, value_enum, default_value = "user")]
    role: Role,
    /// Lifetime: seconds, or a number with s, m, h or d (30d); no expiry by default.
    #[arg(long, value_parser = parse_ttl)]
    ttl: Option<u64>,
    /// Print the whole answer as JSON instead of only the secret.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// Id of the token (as `sbx token ls` shows it).
    id: String,
}

pub async fn run(client: &Client, args: TokenArgs) -> Result<u8, CliError> {
    match args.command {
        TokenCommand::Create(args) => {
            let token = client
                .create_token(&args.tenant, args.role.as_str(), args.ttl)
                .await?;
            if args.json {
                print_json(&token)?;
            } else {
                println_checked(&token.token)?;
                eprintln!(
                    "sbx: token {} for tenant {} ({}); the secret above is shown only once",
                    token.id, token.tenant, token.role
                );
            }
        }
        TokenCommand::Ls(args) => {
            let tokens = client.list_tokens().await?;
            if args.json {
                print_json(&tokens)?;
            } else {
                let mut out = format!("{:<38} {:<20} {:<6} EXPIRES", "ID", "TENANT", "ROLE");
                for t in &tokens {
                    out.push_str(&format!(
                        "\n{:<38} {:<20} {:<6} {}",
                        t.id,
                        t.tenant,
                        t.role,
                        t.expires_at.as_deref().unwrap_or("never")
                    ));
                }
                println_checked(&out)?;
            }
        }
        TokenCommand::Revoke(args) => {
            client.revoke_token(&args.id).await?;
            println_checked(&args.id)?;
        }
    }
    Ok(0)
}

/// `30d`, `12h`, `90m`, `45s` or plain seconds.
pub fn parse_ttl(arg: &str) -> Result<u64, String> {
    let arg = arg.trim();
    let (number, unit) = match arg.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => arg.split_at(at),
        None => (arg, "s"),
    };
    let multiplier = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{arg:?}: use seconds or a number with s, m, h or d"
            ))
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{arg:?}: use seconds or a number with s, m, h or d"))?;
    if n == 0 {
        return Err("the ttl must be positive".into());
    }
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("{arg:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400));
        assert_eq!(parse_ttl("12h"), Ok(12 * 3600));
        assert_eq!(parse_ttl("90m"), Ok(5400));
        assert_eq!(parse_ttl("45s"), Ok(45));
        assert_eq!(parse_ttl("7"), Ok(7));
        for bad in ["", "0", "d", "3w", "-1", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
