//! `petrel record` and `petrel optimize`: learn what a workload reads at start, and
//! rebuild an image with exactly that data at the front of its blob.

use crate::cli::mount::resolve_image;
use crate::cli::registry_args::RegistryArgs;
use anyhow::{bail, Context};
use petrel_fuse_daemon::mount::{mount_with_backend, MountConfig};
use petrel_fuse_daemon::prefetch::{PrefetchConfig, PrefetchMode};
use rustix::mount::{MountFlags, UnmountFlags};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Image: a local image directory or `docker://HOST/REPO:TAG`.
    image: String,
    /// Where to write the profile.
    #[arg(long)]
    profile: PathBuf,
    /// Stop the workload after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Stop the workload once it prints a line containing this text.
    #[arg(long)]
    ready_line: Option<String>,
    /// Node cache root.
    #[arg(long, default_value = crate::cli::mount::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The workload, run in a sandbox rooted at the image (its own namespaces, /proc,
    /// minimal /dev and /tmp, loopback only, reduced capabilities; see docs/security.md).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Arguments of the sandbox's PID 1 (`crate::cli::sandbox`).
#[derive(Debug, clap::Args)]
pub struct SandboxInitArgs {
    /// The workload's root (a mount point).
    pub root: PathBuf,
    /// The workload.
    #[arg(last = true, required = true)]
    pub workload: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct OptimizeArgs {
    /// Image directory to optimize.
    image: PathBuf,
    /// A profile (petrel record) or a list of paths/globs.
    #[arg(long)]
    profile: PathBuf,
    /// Output image directory.
    #[arg(short, long)]
    output: PathBuf,
}

/// Mounts we made for the workload's root, undone in reverse order.
struct RootMounts {
    mounted: Vec<PathBuf>,
}

impl RootMounts {
    fn push(&mut self, path: &Path, result: rustix::io::Result<()>, what: &str) -> anyhow::Result<()> {
        result.with_context(|| format!("mounting {what} at {}", path.display()))?;
        self.mounted.push(path.to_path_buf());
        Ok(())
    }
}

impl Drop for RootMounts {
    fn drop(&mut self) {
        for path in self.mounted.iter().rev() {
            if let Err(e) = rustix::mount::unmount(path, UnmountFlags::DETACH) {
                tracing::warn!("unmounting {}: {e}", path.display());
            }
        }
    }
}

pub fn run_record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let work = tempfile::tempdir().context("creating a work directory")?;
    let (lower, root, upper, overlay_work) = (
        work.path().join("image"),
        work.path().join("root"),
        work.path().join("upper"),
        work.path().join("work"),
    );
    for dir in [&lower, &root, &upper, &overlay_work] {
        std::fs::create_dir_all(dir)?;
    }
    petrel_fuse_daemon::store::create_cache_dir(&args.cache_dir)?;
    let (backend, bootstrap, name) = resolve_image(
        &args.image,
        &args.cache_dir,
        &crate::cli::mount::ImageSource::registry(&args.registry)?,
    )?;
    let config = MountConfig {
        record: Some(args.profile.clone()),
        prefetch: PrefetchConfig {
            mode: PrefetchMode::Off,
            ..PrefetchConfig::default()
        },
        ..MountConfig::new(&args.image, &lower, &args.cache_dir)
    };
    let mounted =
        mount_with_backend(&config, backend, &bootstrap, &name).with_context(|| format!("mounting {}", args.image))?;
    let status = {
        let mut mounts = RootMounts { mounted: Vec::new() };
        let options = std::ffi::CString::new(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            overlay_work.display()
        ))?;
        // The workload writes into the overlay's upper dir, never into the image;
        // device nodes it creates there do not work (nodev).
        mounts.push(
            &root,
            rustix::mount::mount("overlay", &root, "overlay", MountFlags::NODEV, options.as_c_str()),
            "overlay",
        )?;
        run_workload(&root, &args)?
    };
    mounted.unmount()?;
    let profile = crate::cli::build::read_profile(&args.profile)?;
    outln!(
        "workload {status}; profile {}: {} files",
        args.profile.display(),
        profile.entries.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the command in a sandbox rooted at `root` until it exits, prints the ready
/// line, or times out (then the whole sandbox is killed).
fn run_workload(root: &Path, args: &RecordArgs) -> anyhow::Result<String> {
    let mut child = crate::cli::sandbox::command(root, &args.command)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the workload's sandbox (unshare, from util-linux)")?;
    let stdout = child.stdout.take().expect("piped");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ready_text = args.ready_line.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            outln!("{line}");
            if ready_text.as_deref().is_some_and(|t| line.contains(t)) {
                let _ = ready_tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout.max(0.0));
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(format!("exited with {status}"));
        }
        let why = if ready_rx.try_recv().is_ok() {
            Some("printed its ready line")
        } else if Instant::now() > deadline {
            Some("timed out")
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(why.to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run_optimize(args: OptimizeArgs) -> anyhow::Result<ExitCode> {
    let image = petrel_builder::LocalImage::open(&args.image)
        .with_context(|| format!("opening image {}", args.image.display()))?;
    let profile = crate::cli::build::read_profile(&args.profile)?;
    if args.output.exists() && std::fs::read_dir(&args.output)?.next().is_some() {
        bail!("{} is not empty", args.output.display());
    }
    // The image's chunker and zstd level again (the level clamped to zstd's range).
    let chunker = image.bootstrap().chunker();
    let compression_level = image.bootstrap().superblock().compression_level.get().min(19) as i32;
    let tar = tempfile::NamedTempFile::new()?;
    petrel_builder::unpack::unpack_to_tar(&image, std::io::BufWriter::new(tar.reopen()?))?;
    let options = petrel_builder::BuildOptions {
        chunker,
        prefetch: profile.entries,
        compression_level,
        ..petrel_builder::BuildOptions::default()
    };
    let report = petrel_builder::build_paths(&[tar.path().to_path_buf()], &args.output, options)?;
    for warning in &report.warnings {
        eprintln!("petrel: warning: {warning}");
    }
    outln!(
        "optimized {} -> {}: {} files first, {} bytes of prefetch region",
        args.image.display(),
        args.output.display(),
        report.output.prefetch_files,
        report.output.prefetch_bytes
    );
    Ok(ExitCode::SUCCESS)
}
