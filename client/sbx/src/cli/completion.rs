//! `sbx completion bash|zsh|fish`: the shell completion script, generated from the argument
//! definitions by clap_complete (so it knows every verb and option of this build).

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::Shell;

use super::{Cli, CliError};

/// The shells sbx writes completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: ShellArg,
}

/// The script for `shell`.
pub fn script(shell: ShellArg) -> Vec<u8> {
    let shell = match shell {
        ShellArg::Bash => Shell::Bash,
        ShellArg::Zsh => Shell::Zsh,
        ShellArg::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "sbx", &mut out);
    out
}

pub fn run(args: &CompletionArgs) -> Result<u8, CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script(args.shell))
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_the_verbs_and_options() {
        for shell in [ShellArg::Bash, ShellArg::Zsh, ShellArg::Fish] {
            let text = String::from_utf8(script(shell)).expect("utf-8");
            for word in ["sbx", "run", "inspect", "env-file", "publish"] {
                assert!(text.contains(word), "{shell:?} script lacks {word}");
            }
        }
        let bash = String::from_utf8(script(ShellArg::Bash)).expect("utf-8");
        assert!(bash.contains("complete -F"), "not a bash completion script");
    }
}
