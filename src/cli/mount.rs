//! `petrel mount`, `petrel umount` and `petrel stats`.

use anyhow::{bail, Context};
use petrel_fuse_daemon::control;
use petrel_fuse_daemon::mount::{is_mounted, unmount, MountConfig};
use petrel_fuse_daemon::prefetch::{PrefetchConfig, PrefetchMode};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Default node cache root.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/petrel/cache";
/// Default directory of control sockets.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/petrel";
/// How long `--daemon` waits for the mount to appear.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// Image: a local image directory, or `docker://HOST/REPO:TAG` to mount from a registry.
    image: String,
    /// Where to mount it.
    mountpoint: PathBuf,
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
    #[arg(long, default_value_t = petrel_fuse_daemon::fetch::DEFAULT_AMPLIFY_BYTES)]
    amplify_bytes: u64,
    /// Threads reading FUSE requests.
    #[arg(long, default_value_t = 4)]
    fuse_threads: usize,
    /// Threads serving reads that wait for fetches.
    #[arg(long, default_value_t = 8)]
    fetch_threads: usize,
    #[command(flatten)]
    prefetch: PrefetchArgs,
    /// Record what is read and write the profile here on unmount.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Bound the node's chunk cache: least recently used chunks no mount pins are evicted.
    #[arg(long)]
    cache_max_bytes: Option<u64>,
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
    #[arg(long = "prefetch", default_value = "table")]
    mode: PrefetchMode,
    /// Stored bytes per prefetch range request.
    #[arg(long, default_value_t = 8 << 20)]
    prefetch_request_bytes: u64,
    /// Prefetch range requests in flight at once.
    #[arg(long, default_value_t = 2)]
    prefetch_parallel: usize,
    /// Cap prefetch traffic at this many bytes per second.
    #[arg(long)]
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

#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// Image: a local image directory or `docker://HOST/REPO:TAG`.
    image: String,
    /// Node cache root.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Warm the whole image, not only its prefetch region.
    #[arg(long)]
    all: bool,
    /// Stored bytes per range request.
    #[arg(long, default_value_t = 8 << 20)]
    request_bytes: u64,
    /// Range requests in flight at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Keep what was warmed against eviction, whatever the cache bound, until
    /// `petrel cache rm` (an edge node's images that must survive the uplink going).
    #[arg(long)]
    pin: bool,
    #[command(flatten)]
    registry: crate::cli::registry_args::RegistryArgs,
}

/// The backend, bootstrap file and display name of a local or registry image.
pub fn resolve_image(
    image: &str,
    cache_dir: &std::path::Path,
    registry: &crate::cli::registry_args::RegistryArgs,
    blob_dir: Option<&std::path::Path>,
    unpacked_blobs: bool,
) -> anyhow::Result<(std::sync::Arc<dyn petrel_fuse_daemon::Backend>, PathBuf, String)> {
    petrel_fuse_daemon::store::create_cache_dir(cache_dir)?;
    if let Some(reference) = image.strip_prefix("docker://") {
        let image_ref = petrel_registry::ImageRef::parse(reference)?;
        let client = std::sync::Arc::new(petrel_registry::RegistryClient::new(
            &image_ref.registry,
            &registry.client_options()?,
        )?);
        let platform = petrel_registry::oci::Platform::host();
        let remote = petrel_fuse_daemon::remote::resolve(client, &image_ref, cache_dir, &platform)
            .with_context(|| format!("resolving {image}"))?;
        tracing::info!(manifest = %remote.manifest_digest, "image resolved in the registry");
        Ok((remote.backend, remote.bootstrap_path, image_ref.to_string()))
    } else {
        let dir = PathBuf::from(image);
        let blobs = blob_dir.map(PathBuf::from).unwrap_or_else(|| dir.clone());
        let backend = std::sync::Arc::new(if unpacked_blobs {
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

pub fn run_warm(args: WarmArgs) -> anyhow::Result<ExitCode> {
    petrel_fuse_daemon::store::create_cache_dir(&args.cache_dir)?;
    let (backend, bootstrap, name) = resolve_image(&args.image, &args.cache_dir, &args.registry, None, false)?;
    let storage = petrel_fuse_daemon::mount::open_storage(&args.cache_dir, backend, &bootstrap, &name, 0, None)?;
    let mode = if args.all {
        PrefetchMode::All
    } else {
        PrefetchMode::Table
    };
    let ranges = petrel_fuse_daemon::prefetch::prefetch_ranges(&storage.image, mode);
    let total = petrel_fuse_daemon::prefetch::ranges_bytes(&storage.image, &ranges);
    let cached_before = storage.fetcher.cache().ready_count();
    let config = PrefetchConfig {
        mode,
        request_bytes: args.request_bytes,
        parallel: args.parallel,
        bandwidth: None,
    };
    let prefetcher = petrel_fuse_daemon::prefetch::Prefetcher::start(
        &storage.image,
        std::sync::Arc::clone(&storage.fetcher),
        config,
    );
    let bar = indicatif::ProgressBar::new(total);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "warming [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    while !prefetcher.is_finished() {
        bar.set_position(prefetcher.fetched.load(std::sync::atomic::Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetched = prefetcher.fetched.load(std::sync::atomic::Ordering::Relaxed);
    prefetcher.wait();
    bar.finish_and_clear();
    let stats = storage.stats.snapshot();
    let chunks = storage.image.bootstrap().chunk_count();
    let ready = storage.fetcher.cache().ready_count();
    outln!(
        "warmed {name}: fetched {fetched} bytes in {} requests; {ready} of {chunks} chunks cached ({cached_before} were already); {} failed",
        stats.prefetch_requests, stats.backend_errors + stats.chunks_failed_verification
    );
    if stats.backend_errors + stats.chunks_failed_verification > 0 {
        anyhow::bail!("some chunks could not be fetched; run petrel warm again to resume");
    }
    if args.pin {
        let bootstrap = storage.image.bootstrap();
        let digests: Vec<[u8; 32]> = ranges
            .iter()
            .flat_map(|&(start, end)| start..end)
            .filter_map(|i| bootstrap.chunk(i).ok().map(|c| c.digest))
            .collect();
        let hex = hex::encode(storage.image.digest());
        petrel_fuse_daemon::store::pin_image(&args.cache_dir, &hex, &digests)?;
        outln!(
            "pinned {} chunks of {name} (petrel cache rm {} to release them)",
            digests.len(),
            &hex[..16]
        );
    }
    Ok(ExitCode::SUCCESS)
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
    /// Compare images' chunks: unique and shared bytes, and overlap between each pair.
    #[arg(long)]
    dedup: bool,
    #[command(flatten)]
    registry: crate::cli::registry_args::RegistryArgs,
}

pub fn run_mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    if args.daemon {
        return spawn_daemon(&args);
    }
    let socket = control::socket_path(&args.runtime_dir, &args.mountpoint);
    let config = MountConfig {
        amplify_bytes: args.amplify_bytes,
        fuse_threads: args.fuse_threads,
        fetch_threads: args.fetch_threads,
        control_socket: Some(socket),
        blob_dir: args.blob_dir.clone(),
        prefetch: args.prefetch.config(),
        record: args.record.clone(),
        cache_max_bytes: args.cache_max_bytes,
        passthrough: !args.no_passthrough,
        ..MountConfig::new(&args.image, &args.mountpoint, &args.cache_dir)
    };
    let (backend, bootstrap, name) = resolve_image(
        &args.image,
        &args.cache_dir,
        &args.registry,
        args.blob_dir.as_deref(),
        args.unpacked_blobs,
    )?;
    let mounted = petrel_fuse_daemon::mount::mount_with_backend(&config, backend, &bootstrap, &name)
        .with_context(|| format!("mounting {} at {}", args.image, args.mountpoint.display()))?;
    tracing::info!(mountpoint = %args.mountpoint.display(), "mounted");
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

/// The options that only the parent of a `--daemon` acts on.
const PARENT_ONLY_FLAGS: [&str; 1] = ["--daemon"];
const PARENT_ONLY_OPTIONS: [&str; 2] = ["--pid-file", "--log-file"];

/// `arguments` less the parent-only flags and options (with their values).
fn daemon_arguments(arguments: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for argument in arguments {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = argument.to_string_lossy();
        if PARENT_ONLY_FLAGS.contains(&text.as_ref()) {
            continue;
        }
        if PARENT_ONLY_OPTIONS.contains(&text.as_ref()) {
            skip_value = true;
            continue;
        }
        if PARENT_ONLY_OPTIONS.iter().any(|o| text.starts_with(&format!("{o}="))) {
            continue;
        }
        kept.push(argument);
    }
    kept
}

/// Starts this program again in the foreground, detached, and waits for the mount.
fn spawn_daemon(args: &MountArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    petrel_fuse_daemon::store::create_cache_dir(&args.cache_dir)?;
    let log_path = args
        .log_file
        .clone()
        .unwrap_or_else(|| args.cache_dir.join("daemon.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    // The daemon is this very command line, less what only this parent acts on:
    // every option the user (or the snapshotter) gave reaches it, global ones (`-v`)
    // included, instead of an argument list assembled here that forgets the ones
    // added later.
    let mut command = Command::new(exe);
    command
        .args(daemon_arguments(std::env::args_os().skip(1)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(creds) = args.registry.creds()? {
        command.env("PETREL_CREDS", creds);
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().context("starting the daemon")?;
    let started = Instant::now();
    while !is_mounted(&args.mountpoint) {
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
    let request = if args.prometheus { "metrics" } else { "stats" };
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
        let (_, bootstrap_path, name) = resolve_image(target, cache.path(), &args.registry, None, false)?;
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

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
    /// Node cache root.
    #[arg(long, default_value = DEFAULT_CACHE_DIR, global = true)]
    cache_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum CacheCommand {
    /// Images with bootstraps in the cache: chunks cached, bytes, last use.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Evict least recently used chunks (never those a live mount pins) down to a size.
    Gc {
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
    },
    /// Remove an image (its bootstrap digest, or a prefix of it) and the chunks only it uses.
    Rm { image: String },
}

pub fn run_cache(args: CacheArgs) -> anyhow::Result<ExitCode> {
    let store = petrel_fuse_daemon::store::ChunkStore::open(&args.cache_dir, None)?;
    match args.command {
        CacheCommand::Ls { json } => {
            let images = petrel_fuse_daemon::store::cached_images(&args.cache_dir, &store);
            let (chunks, bytes) = store.usage();
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"chunks": chunks, "bytes": bytes, "images": images})
                    )?
                );
            } else {
                outln!("{chunks} chunks, {bytes} bytes in {}", store.root().display());
                for image in images {
                    outln!(
                        "{}  {}/{} chunks  {} bytes  last use {}{}",
                        image.bootstrap,
                        image.chunks_cached,
                        image.chunks,
                        image.bytes_cached,
                        image.last_use.map_or("-".into(), |t| t.to_string()),
                        if image.pinned { "  pinned" } else { "" }
                    );
                }
            }
        }
        CacheCommand::Gc { max_bytes } => {
            let report = store.gc(max_bytes);
            outln!("{}", serde_json::to_string(&report)?);
        }
        CacheCommand::Rm { image } => {
            let dir = args.cache_dir.join("bootstraps");
            let matches: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&image)))
                .collect();
            let [path] = matches.as_slice() else {
                anyhow::bail!(
                    "{} cached images match {image:?}; give more of the digest",
                    matches.len()
                );
            };
            let digests = |p: &std::path::Path| -> anyhow::Result<Vec<[u8; 32]>> {
                let bytes = std::fs::read(p)?;
                let bootstrap = petrel_format::Bootstrap::open(&bytes)?;
                Ok((0..bootstrap.chunk_count())
                    .filter_map(|i| bootstrap.chunk(i).ok().map(|c| c.digest))
                    .collect())
            };
            let mine = digests(path)?;
            let mut others = std::collections::HashSet::new();
            for other in std::fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p != path)
            {
                others.extend(digests(&other).unwrap_or_default());
            }
            let mut removed = 0;
            for digest in mine.iter().filter(|d| !others.contains(*d)) {
                if store.contains(digest) {
                    store.remove(digest);
                    removed += 1;
                }
            }
            // Its materialized (passthrough) files are derived data: they go too.
            let bytes = std::fs::read(path)?;
            let bootstrap = petrel_format::Bootstrap::open(&bytes)?;
            let mut files = 0;
            for entry in bootstrap.walk() {
                let inode = entry?.inode;
                if inode.kind()? != petrel_format::FileKind::Regular {
                    continue;
                }
                let materialized =
                    petrel_fuse_daemon::passthrough::materialized_path(&args.cache_dir, &bootstrap, &inode)?;
                if std::fs::remove_file(materialized).is_ok() {
                    files += 1;
                }
            }
            let unpinned = path
                .file_name()
                .is_some_and(|n| petrel_fuse_daemon::store::unpin_image(&args.cache_dir, &n.to_string_lossy()));
            if unpinned {
                outln!("released its pin");
            }
            std::fs::remove_file(path)?;
            outln!(
                "removed {} and {removed} chunks only it used ({files} materialized files)",
                path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_gets_every_argument_but_the_parents_own() {
        let given = [
            "-v",
            "mount",
            "img",
            "mnt",
            "--daemon",
            "--pid-file",
            "p",
            "--cache-max-bytes",
            "5",
            "--log-file=l",
            "--mirror",
            "http://m",
        ];
        let kept = daemon_arguments(given.iter().map(std::ffi::OsString::from));
        assert_eq!(
            kept,
            [
                "-v",
                "mount",
                "img",
                "mnt",
                "--cache-max-bytes",
                "5",
                "--mirror",
                "http://m"
            ]
            .map(std::ffi::OsString::from)
        );
    }
}
