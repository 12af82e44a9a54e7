//! `petrel mount`, `petrel umount` and `petrel stats`. A mount daemon runs from one
//! typed spec (`petrel_fuse_daemon::spec`): built here from the options, or read
//! from `--spec FILE` (a systemd unit's, the snapshotter's); `--daemon` hands the
//! spec to its child on standard input.

use anyhow::{bail, Context};
use petrel_fuse_daemon::control;
use petrel_fuse_daemon::mount::{is_mounted, unmount};
use petrel_fuse_daemon::prefetch::{PrefetchConfig, PrefetchMode};
use petrel_fuse_daemon::spec::{self, DaemonSpec, LogLevel, Tuning};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub use petrel_fuse_daemon::spec::{DEFAULT_CACHE_DIR, DEFAULT_RUNTIME_DIR};
/// How long `--daemon` waits for the mount to appear.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// Image: a local image directory, or `docker://HOST/REPO:TAG` to mount from a registry.
    #[arg(required_unless_present = "spec")]
    image: Option<String>,
    /// Where to mount it.
    #[arg(required_unless_present = "spec")]
    mountpoint: Option<PathBuf>,
    /// Run from this daemon spec (TOML; `-` reads standard input) instead of options:
    /// image, mountpoint, cache, registry and tuning all come from it.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "image", "mountpoint", "blob_dir", "unpacked_blobs", "cache_dir", "runtime_dir",
        "amplify_bytes", "fuse_threads", "fetch_threads", "record", "cache_max_bytes",
        "no_passthrough", "readahead_dir_bytes", "readahead_file_max_bytes", "PrefetchArgs", "RegistryArgs",
    ])]
    spec: Option<PathBuf>,
    /// Read blobs from this directory's `blobs/sha256/` (e.g. an OCI image layout)
    /// instead of the image directory's.
    #[arg(long)]
    blob_dir: Option<PathBuf>,
    /// The files in --blob-dir are unpacked blob layers (each layer's `petrel/blob`
    /// entry, as `tar -x` or containerd leaves it), not whole layers.
    #[arg(long, requires = "blob_dir")]
    unpacked_blobs: bool,
    /// Node cache root (verified bootstraps and chunk caches).
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Directory of control sockets (for petrel stats).
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// Stored bytes a fetch may extend over following missing chunks.
    #[arg(long, default_value_t = petrel_fuse_daemon::fetch::DEFAULT_AMPLIFY_BYTES, value_parser = petrel_fuse_daemon::byte_size::parse)]
    amplify_bytes: u64,
    /// Threads reading FUSE requests.
    #[arg(long, default_value_t = spec::DEFAULT_FUSE_THREADS)]
    fuse_threads: usize,
    /// Threads serving reads that wait for fetches.
    #[arg(long, default_value_t = spec::DEFAULT_FETCH_THREADS)]
    fetch_threads: usize,
    #[command(flatten)]
    prefetch: PrefetchArgs,
    /// Record what is read and write the profile here on unmount.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Bound the node's chunk cache: least recently used chunks no mount pins are evicted.
    #[arg(long, value_parser = petrel_fuse_daemon::byte_size::parse)]
    cache_max_bytes: Option<u64>,
    /// Stored bytes of a directory's small files read ahead in the background when
    /// one of them misses the cache (0: off).
    #[arg(long, default_value_t = petrel_fuse_daemon::readahead::DEFAULT_DIR_BYTES, value_parser = petrel_fuse_daemon::byte_size::parse)]
    readahead_dir_bytes: u64,
    /// Largest window a file read front to back is fetched ahead by, in several
    /// requests at once (0: off).
    #[arg(long, default_value_t = petrel_fuse_daemon::sequential::DEFAULT_MAX_WINDOW, value_parser = petrel_fuse_daemon::byte_size::parse)]
    readahead_file_max_bytes: u64,
    /// Serve every read through FUSE, never through a backing file (by default, files
    /// whose chunks are all cached are opened with FUSE passthrough where the kernel
    /// offers it).
    #[arg(long)]
    no_passthrough: bool,
    /// Run in the background: return once mounted.
    #[arg(long)]
    daemon: bool,
    /// With --daemon: write the daemon's pid here.
    #[arg(long, requires = "daemon")]
    pid_file: Option<PathBuf>,
    #[command(flatten)]
    registry: crate::cli::registry_args::RegistryArgs,
    /// With --daemon: append the daemon's log here (default: `<cache-dir>/daemon.log`).
    #[arg(long, requires = "daemon")]
    log_file: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PrefetchArgs {
    /// Background prefetch: off, table (the prefetch region) or all (the whole image).
    /// (`--prefetch` is the old spelling, kept for one release.)
    #[arg(long = "prefetch-mode", alias = "prefetch", default_value = "table")]
    mode: PrefetchMode,
    /// Stored bytes per prefetch range request.
    #[arg(long, default_value_t = PrefetchConfig::default().request_bytes, value_parser = petrel_fuse_daemon::byte_size::parse)]
    prefetch_request_bytes: u64,
    /// Prefetch range requests in flight at once.
    #[arg(long, default_value_t = PrefetchConfig::default().parallel)]
    prefetch_parallel: usize,
    /// Cap prefetch traffic at this many bytes per second.
    #[arg(long, value_parser = petrel_fuse_daemon::byte_size::parse)]
    prefetch_bandwidth: Option<u64>,
}

impl PrefetchArgs {
    fn config(&self) -> PrefetchConfig {
        PrefetchConfig {
            mode: self.mode,
            request_bytes: self.prefetch_request_bytes,
            parallel: self.prefetch_parallel,
            bandwidth: self.prefetch_bandwidth,
        }
    }
}

impl MountArgs {
    /// The daemon spec: `--spec`'s file, or the options; `-v` raises its log level.
    pub fn spec(&self, verbose: u8) -> anyhow::Result<DaemonSpec> {
        let mut spec = match (&self.spec, &self.image, &self.mountpoint) {
            (Some(path), _, _) => DaemonSpec::load(path)?,
            (None, Some(image), Some(mountpoint)) => DaemonSpec {
                blob_dir: self.blob_dir.clone(),
                unpacked_blobs: self.unpacked_blobs,
                cache_dir: self.cache_dir.clone(),
                runtime_dir: self.runtime_dir.clone(),
                cache_max_bytes: self.cache_max_bytes,
                record: self.record.clone(),
                registry: self.registry.registry_spec(),
                tuning: Tuning {
                    amplify_bytes: self.amplify_bytes,
                    fuse_threads: self.fuse_threads,
                    fetch_threads: self.fetch_threads,
                    passthrough: !self.no_passthrough,
                    prefetch: self.prefetch.config(),
                    readahead_dir_bytes: self.readahead_dir_bytes,
                    readahead_file_max_bytes: self.readahead_file_max_bytes,
                },
                ..DaemonSpec::new(image.clone(), mountpoint.clone())
            },
            _ => bail!("give an image and a mountpoint, or --spec FILE"),
        };
        spec.log_level = spec.log_level.max(LogLevel::from_verbosity(verbose));
        Ok(spec)
    }
}

/// The image's source: a registry client's options, or a local blob directory.
pub struct ImageSource<'a> {
    pub client_options: petrel_registry::ClientOptions,
    pub blob_dir: Option<&'a std::path::Path>,
    pub unpacked_blobs: bool,
}

impl ImageSource<'_> {
    pub fn registry(args: &crate::cli::registry_args::RegistryArgs) -> anyhow::Result<Self> {
        Ok(ImageSource {
            client_options: args.client_options()?,
            blob_dir: None,
            unpacked_blobs: false,
        })
    }
}

pub fn resolve_image(
    image: &str,
    cache_dir: &std::path::Path,
    source: &ImageSource<'_>,
) -> anyhow::Result<(std::sync::Arc<dyn petrel_fuse_daemon::Backend>, PathBuf, String)> {
    petrel_fuse_daemon::store::create_cache_dir(cache_dir)?;
    if let Some(reference) = image.strip_prefix("docker://") {
        let image_ref = petrel_registry::ImageRef::parse(reference)?;
        let client = std::sync::Arc::new(petrel_registry::RegistryClient::new(
            &image_ref.registry,
            &source.client_options,
        )?);
        let platform = petrel_registry::oci::Platform::host();
        let remote = petrel_fuse_daemon::remote::resolve(client, &image_ref, cache_dir, &platform)
            .with_context(|| format!("resolving {image}"))?;
        tracing::info!(manifest = %remote.manifest_digest, "image resolved in the registry");
        Ok((remote.backend, remote.bootstrap_path, image_ref.to_string()))
    } else {
        let dir = PathBuf::from(image);
        let blobs = source.blob_dir.map(PathBuf::from).unwrap_or_else(|| dir.clone());
        let backend = std::sync::Arc::new(if source.unpacked_blobs {
            petrel_fuse_daemon::LocalBackend::unpacked(blobs)
        } else {
            petrel_fuse_daemon::LocalBackend::new(blobs)
        });
        Ok((
            backend,
            petrel_format::image_dir::ImageDir::new(&dir).bootstrap_path(),
            image.to_string(),
        ))
    }
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    mountpoint: PathBuf,
    /// Detach now even if busy (MNT_DETACH).
    #[arg(long)]
    lazy: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// A mountpoint; with --dedup, images (local directories or docker://…).
    #[arg(required = true)]
    targets: Vec<String>,
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// Print Prometheus text instead of JSON.
    #[arg(long)]
    prometheus: bool,
    /// Print the daemon spec the mount runs from (TOML) instead.
    #[arg(long, conflicts_with = "prometheus")]
    spec: bool,
    /// Compare images' chunks: unique and shared bytes, and overlap between each pair.
    #[arg(long)]
    dedup: bool,
    #[command(flatten)]
    registry: crate::cli::registry_args::RegistryArgs,
}

/// `petrel mount`: sets up logging at the spec's level (which may come from a file),
/// then mounts in the foreground, or in a child with `--daemon`.
pub fn run_mount(args: MountArgs, verbose: u8, log_format: crate::cli::LogFormat) -> anyhow::Result<ExitCode> {
    let spec = args.spec(verbose)?;
    crate::cli::init_logging(spec.log_level.verbosity(), log_format);
    if args.daemon {
        return spawn_daemon(&args, &spec, log_format);
    }
    let credentials = crate::cli::registry_args::read_credentials(spec.registry.creds_file.as_deref())?;
    let config = spec.mount_config();
    let source = ImageSource {
        client_options: spec.client_options(credentials),
        blob_dir: spec.blob_dir.as_deref(),
        unpacked_blobs: spec.unpacked_blobs,
    };
    let (backend, bootstrap, name) = resolve_image(&spec.image, &spec.cache_dir, &source)?;
    let mounted = petrel_fuse_daemon::mount::mount_with_backend(&config, backend, &bootstrap, &name)
        .with_context(|| format!("mounting {} at {}", spec.image, spec.mountpoint.display()))?;
    tracing::info!(mountpoint = %spec.mountpoint.display(), "mounted");
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = signal_tx.send("signal");
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(_) => break,
            Err(_) if mounted.is_finished() => {
                tracing::info!("unmounted from outside");
                break;
            }
            Err(_) => {}
        }
    }
    mounted.unmount()?;
    Ok(ExitCode::SUCCESS)
}

/// Starts `petrel mount --spec -` detached, hands it `spec` on standard input, and
/// waits for the mount.
fn spawn_daemon(args: &MountArgs, spec: &DaemonSpec, log_format: crate::cli::LogFormat) -> anyhow::Result<ExitCode> {
    // Credentials that cannot be read fail here, not in a detached child.
    crate::cli::registry_args::read_credentials(spec.registry.creds_file.as_deref())?;
    let exe = std::env::current_exe()?;
    petrel_fuse_daemon::store::create_cache_dir(&spec.cache_dir)?;
    let log_path = args
        .log_file
        .clone()
        .unwrap_or_else(|| spec.cache_dir.join("daemon.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let mut command = Command::new(exe);
    command
        .arg("--log-format")
        .arg(match log_format {
            crate::cli::LogFormat::Text => "text",
            crate::cli::LogFormat::Json => "json",
        })
        .args(["mount", "--spec", "-"])
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().context("starting the daemon")?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child that died at once closes the pipe; its log says why (below).
        let _ = stdin.write_all(spec.to_toml().as_bytes());
    }
    let started = Instant::now();
    while !is_mounted(&spec.mountpoint) {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last: Vec<&str> = log
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "the daemon exited with {status} before mounting: {} (log: {})",
                last.join(" / "),
                log_path.display()
            );
        }
        if started.elapsed() > DAEMON_START_TIMEOUT {
            bail!(
                "the daemon did not mount within {DAEMON_START_TIMEOUT:?}; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("writing {}", pid_file.display()))?;
    }
    outln!("{}", child.id());
    Ok(ExitCode::SUCCESS)
}

pub fn run_umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    unmount(&args.mountpoint, args.lazy).with_context(|| format!("unmounting {}", args.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    if args.dedup {
        return run_dedup_stats(&args);
    }
    let [mountpoint] = args.targets.as_slice() else {
        anyhow::bail!("give one mountpoint (or --dedup with images)");
    };
    let socket = control::socket_path(&args.runtime_dir, std::path::Path::new(mountpoint));
    let request = match (args.prometheus, args.spec) {
        (true, _) => "metrics",
        (_, true) => "spec",
        _ => "stats",
    };
    let answer = control::request(&socket, request)
        .with_context(|| format!("asking the daemon of {mountpoint} ({})", socket.display()))?;
    out!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// Chunk digests and plain sizes of each image, compared.
fn run_dedup_stats(args: &StatsArgs) -> anyhow::Result<ExitCode> {
    let cache = tempfile::tempdir()?;
    let mut images: Vec<(String, std::collections::HashMap<[u8; 32], u64>)> = Vec::new();
    for target in &args.targets {
        let (_, bootstrap_path, name) = resolve_image(target, cache.path(), &ImageSource::registry(&args.registry)?)?;
        let bytes = std::fs::read(&bootstrap_path).with_context(|| format!("reading {}", bootstrap_path.display()))?;
        let bootstrap = petrel_format::Bootstrap::open(&bytes).with_context(|| format!("bootstrap of {target}"))?;
        let mut chunks = std::collections::HashMap::new();
        for index in 0..bootstrap.chunk_count() {
            let chunk = bootstrap.chunk(index)?;
            chunks.insert(chunk.digest, u64::from(chunk.uncompressed_size));
        }
        images.push((name, chunks));
    }
    let mut holders: std::collections::HashMap<[u8; 32], (u64, usize)> = std::collections::HashMap::new();
    for (_, chunks) in &images {
        for (digest, size) in chunks {
            holders.entry(*digest).or_insert((*size, 0)).1 += 1;
        }
    }
    let unique: u64 = holders.values().map(|(s, _)| s).sum();
    let shared: u64 = holders.values().filter(|(_, n)| *n > 1).map(|(s, _)| s).sum();
    let total: u64 = images.iter().map(|(_, c)| c.values().sum::<u64>()).sum();
    let per_image: Vec<serde_json::Value> = images
        .iter()
        .map(|(name, chunks)| {
            let bytes: u64 = chunks.values().sum();
            let shared_bytes: u64 = chunks.iter().filter(|(d, _)| holders[*d].1 > 1).map(|(_, s)| s).sum();
            let overlap: serde_json::Map<String, serde_json::Value> = images
                .iter()
                .filter(|(other, _)| other != name)
                .map(|(other, other_chunks)| {
                    let common: u64 = chunks
                        .iter()
                        .filter(|(d, _)| other_chunks.contains_key(*d))
                        .map(|(_, s)| s)
                        .sum();
                    (other.clone(), serde_json::json!(common))
                })
                .collect();
            serde_json::json!({"image": name, "bytes": bytes, "shared_bytes": shared_bytes, "overlap_bytes": overlap})
        })
        .collect();
    let summary =
        serde_json::json!({"unique_bytes": unique, "shared_bytes": shared, "total_bytes": total, "images": per_image});
    outln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}
