//! Command-line interface: argument parsing and one module per command.

pub mod build;
mod cache;
mod convert;
mod image_tools;
mod manuals;
pub mod mount;
pub mod profile;
mod record;
pub mod registry_args;
mod sandbox;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Lazy-loading container image filesystem.
#[derive(Debug, Parser)]
#[command(name = "petrel", version, about)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). PETREL_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as text (with level and time) or as JSON objects, one a line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert an OCI image (registry, OCI layout or archive) into a petrel image.
    Convert(convert::ConvertArgs),
    /// Build a petrel image from directories, tars or OCI layer tars (lowest first).
    Build(build::BuildArgs),
    /// Show a summary of an image and, with --tree, every entry.
    Inspect(image_tools::InspectArgs),
    /// Verify the bootstrap, every chunk and every blob of an image.
    Check(image_tools::CheckArgs),
    /// Write an image's tree to a directory or a tar file.
    Unpack(image_tools::UnpackArgs),
    /// Mount an image read-only through FUSE; data is fetched as it is read.
    Mount(mount::MountArgs),
    /// Run a command against a mounted image and record what it reads (a prefetch profile).
    Record(record::RecordArgs),
    /// Rebuild a local image with a profile's data at the front of the blob.
    Optimize(record::OptimizeArgs),
    /// Publish a profile for an image in its registry (`push`), or fetch it (`pull`).
    Profile(profile::ProfileArgs),
    /// Fill the node cache for an image (its prefetch region, or --all) without mounting it.
    Warm(cache::WarmArgs),
    /// Chunk dictionaries: `petrel dict build IMAGE... -o DICT`.
    Dict(build::DictArgs),
    /// The node cache: list images, collect garbage, remove an image.
    Cache(cache::CacheArgs),
    /// Serve containerd's snapshots API (proxy plugin) on a unix socket.
    Snapshotter(SnapshotterArgs),
    /// Unmount a petrel mount.
    Umount(mount::UmountArgs),
    /// Show a mount's counters (JSON, or Prometheus text).
    Stats(mount::StatsArgs),
    /// Write a man page for petrel and each subcommand into a directory.
    Manpages(manuals::ManpagesArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(manuals::CompletionsArgs),
    /// (internal) PID 1 of `petrel record`'s sandbox.
    #[command(name = "__record-sandbox-init", hide = true)]
    RecordSandboxInit(record::SandboxInitArgs),
}

#[derive(Debug, clap::Args)]
pub struct SnapshotterArgs {
    /// TOML configuration (root, address, cache_max_bytes, metrics_address, `[[registry]]` credentials).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Root of the snapshotter's state (default /var/lib/petrel/snapshotter); overrides the config.
    #[arg(long)]
    root: Option<std::path::PathBuf>,
    /// Unix socket containerd's proxy plugin connects to (default /run/petrel/snapshotter.sock).
    #[arg(long)]
    address: Option<std::path::PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn,fuser=error",
        1 => "info,fuser=error",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PETREL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal: log files and journals get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Convert(args) => convert::run(args),
        Command::Build(args) => build::run(args),
        Command::Inspect(args) => image_tools::inspect(args),
        Command::Check(args) => image_tools::check(args),
        Command::Unpack(args) => image_tools::unpack(args),
        Command::Mount(args) => mount::run_mount(args, cli.verbose, cli.log_format),
        Command::Umount(args) => mount::run_umount(args),
        Command::Warm(args) => cache::run_warm(args),
        Command::Cache(args) => cache::run_cache(args),
        Command::Snapshotter(args) => {
            let mut settings = match &args.config {
                Some(path) => petrel_snapshotter::config::Config::load(path)?,
                None => petrel_snapshotter::config::Config::default(),
            };
            if let Some(root) = args.root {
                settings.root = root;
            }
            if let Some(address) = args.address {
                settings.address = address;
            }
            petrel_snapshotter::service::serve(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dict(args) => build::run_dict(args),
        Command::Record(args) => record::run_record(args),
        Command::RecordSandboxInit(args) => sandbox::run_init(&args.root, &args.workload),
        Command::Optimize(args) => record::run_optimize(args),
        Command::Profile(args) => profile::run_profile(args),
        Command::Stats(args) => mount::run_stats(args),
        Command::Manpages(args) => manuals::run_manpages(args),
        Command::Completions(args) => manuals::run_completions(args),
    }
}
