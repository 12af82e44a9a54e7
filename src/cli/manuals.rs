//! `petrel manpages DIR` and `petrel completions SHELL`: the man pages (one per
//! subcommand, `petrel-mount.1` and so on, from the same definitions as `--help`)
//! and shell completions a package installs.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ManpagesArgs {
    /// Directory to write `petrel.1` and `petrel-<subcommand>.1` into (created).
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    shell: clap_complete::Shell,
}

pub fn run_manpages(args: ManpagesArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let command = <crate::cli::Cli as clap::CommandFactory>::command();
    let mut pages = vec![("petrel".to_string(), command.clone())];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("petrel-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in &pages {
        let path = args.dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page.clone()).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    outln!("wrote {} man pages to {}", pages.len(), args.dir.display());
    Ok(ExitCode::SUCCESS)
}

pub fn run_completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut command = <crate::cli::Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut command, "petrel", &mut out);
    out!("{}", String::from_utf8_lossy(&out));
    Ok(ExitCode::SUCCESS)
}
