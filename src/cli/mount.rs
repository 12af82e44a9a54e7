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
        "no_passthrough", "file_opens", "readahead_dir_bytes", "readahead_file_max_bytes", "profile", "no_profile_lookup", "record_first_start", "publish_profile", "PrefetchArgs", "RegistryArgs",
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
    /// Prefetch what this profile (`petrel record`) reads first, on any petrel image,
    /// optimized for it or not.
    #[arg(long, conflicts_with = "record")]
    profile: Option<PathBuf>,
    /// Do not look for a profile published for the image in its registry (an OCI
    /// referrer, `petrel profile push`); by default one is looked for after mounting
    /// and prefetched once found.
    #[arg(long)]
    no_profile_lookup: bool,
    /// When no profile is published for the image, record this many seconds from the
    /// first read (its first start here) and keep the profile in the cache
    /// (`<cache>/profiles/<manifest>.json`).
    #[arg(long, value_name = "SECONDS", conflicts_with_all = ["record", "profile"])]
    record_first_start: Option<f64>,
    /// Publish the first-start profile for the image in its registry (an OCI referrer;
    /// needs push access), where every other node's mounts find it.
    #[arg(long, requires = "record_first_start")]
    publish_profile: bool,
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
    /// Who opens files: auto (the kernel alone, unless passthrough is on and the
    /// image's big files make it pay), daemon (every open and close is a request, so
    /// that fully cached files can be opened by passthrough) or kernel (no request
    /// per open or close, no passthrough).
    #[arg(long, default_value = "auto")]
    file_opens: petrel_fuse_daemon::file_opens::FileOpens,
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
                profile: self.profile.clone(),
                profile_lookup: !self.no_profile_lookup,
                record_first_start_seconds: self.record_first_start,
                publish_profile: self.publish_profile,
                registry: self.registry.registry_spec(),
                tuning: Tuning {
                    amplify_bytes: self.amplify_bytes,
                    fuse_threads: self.fuse_threads,
                    fetch_threads: self.fetch_threads,
                    passthrough: !self.no_passthrough,
                    file_opens: self.file_opens,
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

/// Where a registry image's referrers (a published profile) are looked up.
pub struct ReferrerSource {
    pub client: std::sync::Arc<petrel_registry::RegistryClient>,
    pub repository: String,
    pub manifest_digest: String,
}

pub fn resolve_image(
    image: &str,
    cache_dir: &std::path::Path,
    source: &ImageSource<'_>,
) -> anyhow::Result<(std::sync::Arc<dyn petrel_fuse_daemon::Backend>, PathBuf, String)> {
    let resolved = resolve_image_with_referrers(image, cache_dir, source)?;
    Ok((resolved.backend, resolved.bootstrap, resolved.name))
}

/// A resolved image: where its blobs come from, its bootstrap file, its display
/// name, and for a registry image where its referrers are.
pub struct ResolvedImage {
    pub backend: std::sync::Arc<dyn petrel_fuse_daemon::Backend>,
    pub bootstrap: PathBuf,
    pub name: String,
    pub referrers: Option<ReferrerSource>,
}

/// `resolve_image`, and for a registry image where its referrers are.
pub fn resolve_image_with_referrers(
    image: &str,
    cache_dir: &std::path::Path,
    source: &ImageSource<'_>,
) -> anyhow::Result<ResolvedImage> {
    petrel_fuse_daemon::store::create_cache_dir(cache_dir)?;
    if let Some(reference) = image.strip_prefix("docker://") {
        let image_ref = petrel_registry::ImageRef::parse(reference)?;
        let client = std::sync::Arc::new(petrel_registry::RegistryClient::new(
            &image_ref.registry,
            &source.client_options,
        )?);
        let platform = petrel_registry::oci::host_platform();
        let remote =
            petrel_fuse_daemon::remote::resolve(std::sync::Arc::clone(&client), &image_ref, cache_dir, &platform)
                .with_context(|| format!("resolving {image}"))?;
        tracing::info!(manifest = %remote.manifest_digest, "image resolved in the registry");
        let referrers = ReferrerSource {
            client,
            repository: image_ref.repository.clone(),
            manifest_digest: remote.manifest_digest.clone(),
        };
        Ok(ResolvedImage {
            backend: remote.backend,
            bootstrap: remote.bootstrap_path,
            name: image_ref.to_string(),
            referrers: Some(referrers),
        })
    } else {
        let dir = PathBuf::from(image);
        let blobs = source.blob_dir.map(PathBuf::from).unwrap_or_else(|| dir.clone());
        let backend = std::sync::Arc::new(if source.unpacked_blobs {
            petrel_fuse_daemon::LocalBackend::unpacked(blobs)
        } else {
            petrel_fuse_daemon::LocalBackend::new(blobs)
        });
        Ok(ResolvedImage {
            backend,
            bootstrap: petrel_format::image_dir::ImageDir::new(&dir).bootstrap_path(),
            name: image.to_string(),
            referrers: None,
        })
    }
}

/// Reads and parses the profile at `path` (bounded: a profile may come from anywhere).
pub fn read_profile(path: &std::path::Path) -> anyhow::Result<petrel_format::profile::Profile> {
    let file = std::fs::File::open(path).with_context(|| format!("opening profile {}", path.display()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, petrel_fuse_daemon::profile_prefetch::MAX_PROFILE_BYTES + 1),
        &mut bytes,
    )?;
    if bytes.len() as u64 > petrel_fuse_daemon::profile_prefetch::MAX_PROFILE_BYTES {
        bail!(
            "profile {} is larger than {} bytes",
            path.display(),
            petrel_fuse_daemon::profile_prefetch::MAX_PROFILE_BYTES
        );
    }
    petrel_format::profile::Profile::parse(&bytes).map_err(|e| anyhow::anyhow!("profile {}: {e}", path.display()))
}

/// The recording of an image's first start on this node (`--record-first-start`).
struct FirstStart {
    recorder: Option<std::sync::Arc<petrel_fuse_daemon::record::Recorder>>,
    cache_dir: PathBuf,
    /// The image's manifest digest (or name): the profile's file name.
    name: String,
    /// Where to publish it: client, repository, manifest digest.
    publish_to: Option<(std::sync::Arc<petrel_registry::RegistryClient>, String, String)>,
}

impl FirstStart {
    fn cancel(&mut self) {
        if let Some(recorder) = self.recorder.take() {
            recorder.stop();
            tracing::info!("a profile is published for the image: first start not recorded");
        }
    }

    /// Once the window after the first read is over: keeps the profile in the cache
    /// and publishes it (in the background) if asked to.
    fn finish_when_due(&mut self, mounted: &petrel_fuse_daemon::mount::Mounted) {
        if self.recorder.as_ref().is_some_and(|r| r.window_is_over()) {
            self.finish(mounted);
        }
    }

    /// At unmount before the window is over: keeps what was recorded in the cache
    /// (not published: a start cut short says little).
    fn finish_at_unmount(&mut self, mounted: &petrel_fuse_daemon::mount::Mounted) {
        self.publish_to = None;
        self.finish(mounted);
    }

    fn finish(&mut self, mounted: &petrel_fuse_daemon::mount::Mounted) {
        let Some(recorder) = self.recorder.take() else { return };
        recorder.stop();
        if recorder.is_empty() {
            return;
        }
        let profile = mounted.profile_of(&recorder);
        let dir = self.cache_dir.join("profiles");
        let path = dir.join(format!("{}.json", self.name.replace([':', '/'], "_")));
        let text = serde_json::to_vec_pretty(&profile).expect("serializable");
        match petrel_fuse_daemon::store::create_private_dir(&dir).map(|()| std::fs::write(&path, &text)) {
            Ok(Ok(())) => tracing::info!(path = %path.display(), files = profile.entries.len(), "first start recorded"),
            Ok(Err(e)) => tracing::warn!(path = %path.display(), "cannot keep the first-start profile: {e}"),
            Err(e) => tracing::warn!("cannot keep the first-start profile: {e}"),
        }
        let Some((client, repository, manifest)) = self.publish_to.take() else {
            return;
        };
        std::thread::spawn(move || {
            let subject = client
                .get_manifest(&repository, &manifest)
                .and_then(|(bytes, media_type, digest)| {
                    petrel_registry::oci::descriptor(&media_type, &digest, bytes.len() as u64)
                });
            let pushed = subject.and_then(|subject| {
                let annotations = [(
                    petrel_registry::client::referrers::ANNOTATION_CREATED.to_string(),
                    crate::cli::profile::now_rfc3339(),
                )]
                .into();
                client.push_referrer(
                    &repository,
                    &subject,
                    petrel_registry::client::referrers::PROFILE_ARTIFACT_TYPE,
                    &text,
                    annotations,
                )
            });
            match pushed {
                Ok(digest) => tracing::info!(%digest, "first-start profile published for the image"),
                Err(e) => tracing::warn!("cannot publish the first-start profile: {e}"),
            }
        });
    }
}

/// Looks for a profile published for the image, in the background: the mount never
/// waits for it. Sends it once found.
fn look_up_profile(
    referrers: ReferrerSource,
    bootstrap: PathBuf,
    found: std::sync::mpsc::Sender<Option<petrel_format::profile::Profile>>,
) {
    let _ = std::thread::Builder::new()
        .name("petrel-profile-lookup".into())
        .spawn(move || {
            let digest = match std::fs::read(&bootstrap)
                .ok()
                .and_then(|b| petrel_format::Bootstrap::open(&b).ok().map(|b| b.superblock().digest))
            {
                Some(digest) => digest,
                None => return,
            };
            match petrel_fuse_daemon::remote::find_profile(
                &referrers.client,
                &referrers.repository,
                &referrers.manifest_digest,
                &digest,
            ) {
                Ok(Some((artifact, profile))) => {
                    tracing::info!(%artifact, files = profile.entries.len(), "found a profile published for the image");
                    let _ = found.send(Some(profile));
                }
                Ok(None) => {
                    tracing::info!("no profile is published for the image");
                    let _ = found.send(None);
                }
                Err(e) => {
                    tracing::warn!("looking for a published profile: {e}");
                    let _ = found.send(None);
                }
            }
        });
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    mountpoint: PathBuf,
    /// Detach now even if busy (MNT_DETACH).
    #[arg(long)]
    lazy: bool,
    /// Where the daemon's control socket is (as given to `mount`): found there, the
    /// daemon is waited for.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// Return once unmounted, without waiting for the daemon to finish storing what
    /// it fetched.
    #[arg(long)]
    no_wait: bool,
}

/// How long `petrel umount` waits for the daemon to exit.
const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(60);

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
    let mut config = spec.mount_config();
    if let Some(path) = &spec.profile {
        config.profile = Some(std::sync::Arc::new(read_profile(path)?));
    }
    let source = ImageSource {
        client_options: spec.client_options(credentials),
        blob_dir: spec.blob_dir.as_deref(),
        unpacked_blobs: spec.unpacked_blobs,
    };
    let ResolvedImage {
        backend,
        bootstrap,
        name,
        referrers,
    } = resolve_image_with_referrers(&spec.image, &spec.cache_dir, &source)?;
    let mut mounted = petrel_fuse_daemon::mount::mount_with_backend(&config, backend, &bootstrap, &name)
        .with_context(|| format!("mounting {} at {}", spec.image, spec.mountpoint.display()))?;
    tracing::info!(mountpoint = %spec.mountpoint.display(), "mounted");
    let (profile_tx, profile_rx) = std::sync::mpsc::channel();
    let publish_to = referrers.as_ref().filter(|_| spec.publish_profile).map(|r| {
        (
            std::sync::Arc::clone(&r.client),
            r.repository.clone(),
            r.manifest_digest.clone(),
        )
    });
    let manifest = referrers.as_ref().map(|r| r.manifest_digest.clone());
    if let Some(referrers) =
        referrers.filter(|_| spec.profile.is_none() && spec.profile_lookup && spec.record.is_none())
    {
        look_up_profile(referrers, bootstrap.clone(), profile_tx);
    }
    let mut first_start = FirstStart {
        recorder: mounted.first_start().cloned(),
        cache_dir: spec.cache_dir.clone(),
        name: manifest.unwrap_or_else(|| name.clone()),
        publish_to,
    };
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = signal_tx.send("signal");
        }
    });
    loop {
        if let Ok(Some(profile)) = profile_rx.try_recv() {
            let (files, ranges) = mounted.prefetch_profile(&profile);
            tracing::info!(files, ranges, "prefetching the published profile");
            // Someone recorded this image already: no first-start recording.
            first_start.cancel();
        }
        first_start.finish_when_due(&mounted);
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(_) => break,
            Err(_) if mounted.is_finished() => {
                tracing::info!("unmounted from outside");
                break;
            }
            Err(_) => {}
        }
    }
    first_start.finish_at_unmount(&mounted);
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
    let socket = control::socket_path(&args.runtime_dir, &args.mountpoint);
    unmount(&args.mountpoint, args.lazy).with_context(|| format!("unmounting {}", args.mountpoint.display()))?;
    // The daemon goes on after the unmount until what it fetched is durable in the
    // node cache, then exits (its control socket goes last): waited for, so that a
    // `cache verify`, `cache gc` or mount that follows finds all of it. A socket
    // nothing answers on is a killed daemon's.
    let started = Instant::now();
    let alive = || socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_ok();
    while !args.no_wait && alive() {
        if started.elapsed() > DAEMON_EXIT_WAIT {
            tracing::warn!(
                "unmounted {}; its daemon is still finishing after {} s",
                args.mountpoint.display(),
                DAEMON_EXIT_WAIT.as_secs()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
