//! Mounting and unmounting: the image, its cache and fetcher, the FUSE session and
//! the control socket, put together.

use crate::backend::{Backend, LocalBackend};
use crate::cache::ChunkCache;
use crate::control::ControlServer;
use crate::error::{DaemonError, Result};
use crate::fetch::{Fetcher, DEFAULT_AMPLIFY_BYTES};
use crate::fs::PetrelFs;
use crate::image::MappedImage;
use crate::prefetch::{PrefetchConfig, Prefetcher};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::ChunkStore;
use fuser::{Config, MountOption, SessionACL};
use petrel_format::image_dir::ImageDir;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Image directory (`bootstrap` + `blobs/sha256/`); also the local backend.
    pub image_dir: PathBuf,
    pub mountpoint: PathBuf,
    /// Node cache root (bootstraps and chunk caches).
    pub cache_dir: PathBuf,
    /// Stored bytes a fetch may extend over following missing chunks.
    pub amplify_bytes: u64,
    /// Threads reading FUSE requests.
    pub fuse_threads: usize,
    /// Threads serving reads that wait for fetches.
    pub fetch_threads: usize,
    /// Control socket for `petrel stats`; none when unset.
    pub control_socket: Option<PathBuf>,
    /// Directory whose `blobs/sha256/` holds the blobs, when not the image directory.
    pub blob_dir: Option<PathBuf>,
    /// Background prefetch after mounting.
    pub prefetch: PrefetchConfig,
    /// Record reads and write the profile here on unmount.
    pub record: Option<PathBuf>,
    /// Bound on the node's chunk store; least recently used chunks are evicted.
    pub cache_max_bytes: Option<u64>,
    /// Open fully cached files with a backing file (FUSE passthrough) when the kernel
    /// offers it. Off while recording, which must see every read.
    pub passthrough: bool,
    /// Who opens files: the kernel alone, or the daemon (for passthrough).
    pub file_opens: crate::file_opens::FileOpens,
    /// The spec this mount runs from, answered on its control socket.
    pub spec: Option<crate::spec::DaemonSpec>,
    /// Stored bytes of a directory's small files read ahead when one of them misses
    /// the cache (`crate::readahead`); 0: off.
    pub readahead_dir_bytes: u64,
    /// Largest window a file read front to back is fetched ahead by
    /// (`crate::sequential`); 0: off.
    pub readahead_file_max_bytes: u64,
    /// A profile whose files' ranges are prefetched first (`crate::profile_prefetch`).
    pub profile: Option<Arc<petrel_format::profile::Profile>>,
    /// Record this long after the first read (a first start; `Mounted::first_start`),
    /// FUSE passthrough staying on.
    pub record_first_start: Option<std::time::Duration>,
}

impl MountConfig {
    pub fn new(image_dir: impl Into<PathBuf>, mountpoint: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        MountConfig {
            image_dir: image_dir.into(),
            mountpoint: mountpoint.into(),
            cache_dir: cache_dir.into(),
            amplify_bytes: DEFAULT_AMPLIFY_BYTES,
            fuse_threads: 4,
            fetch_threads: 8,
            control_socket: None,
            blob_dir: None,
            prefetch: PrefetchConfig::default(),
            record: None,
            cache_max_bytes: None,
            passthrough: true,
            file_opens: crate::file_opens::FileOpens::Auto,
            spec: None,
            readahead_dir_bytes: crate::readahead::DEFAULT_DIR_BYTES,
            readahead_file_max_bytes: crate::sequential::DEFAULT_MAX_WINDOW,
            profile: None,
            record_first_start: None,
        }
    }
}

/// A live mount; dropping it unmounts.
#[derive(Debug)]
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    prefetcher: Option<Prefetcher>,
    /// Prefetch of a profile found after mounting (`prefetch_profile`).
    profile_prefetcher: Option<Prefetcher>,
    image: Arc<MappedImage>,
    fetcher: Arc<Fetcher>,
    prefetch: PrefetchConfig,
    /// The recorder of a first start, if asked for.
    first_start: Option<Arc<crate::record::Recorder>>,
    /// Turns the directory readahead off once a profile is known.
    readahead_off: Option<Arc<std::sync::atomic::AtomicBool>>,
    recording: Option<(Arc<crate::record::Recorder>, Arc<MappedImage>, PathBuf)>,
    /// This mount's pin file (its prefetch region is kept through GC while mounted).
    pins: Option<PathBuf>,
    stats: Arc<Stats>,
    mountpoint: PathBuf,
    _control: Option<ControlServer>,
}

impl Mounted {
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Waits (at most `timeout`) until no fetch is under way; false if one still is.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        self.fetcher.wait_idle(timeout)
    }

    /// Whether the session ended (unmounted from outside).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    /// The profile recorded so far (when recording).
    pub fn profile(&self) -> Option<petrel_format::profile::Profile> {
        self.recording
            .as_ref()
            .map(|(recorder, image, _)| recorder.profile(image))
    }

    /// The recorder of this mount's first start (`MountConfig::record_first_start`).
    pub fn first_start(&self) -> Option<&Arc<crate::record::Recorder>> {
        self.first_start.as_ref()
    }

    /// The profile a recorder of this mount holds.
    pub fn profile_of(&self, recorder: &crate::record::Recorder) -> petrel_format::profile::Profile {
        recorder.profile(&self.image)
    }

    /// Prefetches what `profile` reads (found after mounting, e.g. in the registry),
    /// ahead of the image's own prefetch region, and stops guessing by directory.
    /// Returns the plan's size: (files, chunk ranges).
    pub fn prefetch_profile(&mut self, profile: &petrel_format::profile::Profile) -> (usize, usize) {
        let plan = crate::profile_prefetch::plan(&self.image, profile);
        if let Some(off) = &self.readahead_off {
            off.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let sizes = (plan.files, plan.ranges.len());
        if let Some(old) = self.profile_prefetcher.take() {
            old.stop();
        }
        self.profile_prefetcher = Some(Prefetcher::start_ranges(
            &self.image,
            Arc::clone(&self.fetcher),
            plan.ranges,
            crate::profile_prefetch::prefetch_config(self.prefetch),
        ));
        sizes
    }

    fn stop(&mut self) -> Result<()> {
        for prefetcher in [self.prefetcher.take(), self.profile_prefetcher.take()]
            .into_iter()
            .flatten()
        {
            prefetcher.stop();
        }
        if let Some(pins) = self.pins.take() {
            let _ = std::fs::remove_file(pins);
        }
        if let Some((recorder, image, path)) = self.recording.take() {
            let profile = recorder.profile(&image);
            let text = serde_json::to_vec_pretty(&profile).expect("serializable");
            std::fs::write(&path, text).map_err(DaemonError::io("write profile", &path))?;
            tracing::info!(path = %path.display(), files = profile.entries.len(), "profile written");
        }
        if let Some(session) = self.session.take() {
            if session.guard.is_finished() {
                let _ = session.join();
            } else {
                session
                    .umount_and_join()
                    .map_err(DaemonError::io("unmount", self.mountpoint.clone()))?;
            }
        }
        // The readahead queues closed with the filesystem; fetches already under way
        // (their bytes served to readers, perhaps) are let finish and be cached, so
        // what a container read is there for its next start.
        if !self.fetcher.wait_idle(SHUTDOWN_FETCH_WAIT) {
            tracing::warn!("unmounted with fetches still under way: their chunks are not cached");
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}

/// How long an unmount waits for fetches under way to finish and be cached.
const SHUTDOWN_FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Cleans a mount left by a killed daemon ("Transport endpoint is not connected").
/// `statfs` always reaches the daemon (attributes may be answered from the kernel's
/// cache), so it tells a dead connection from a live one.
pub fn clean_stale_mount(mountpoint: &Path) -> Result<bool> {
    match rustix::fs::statfs(mountpoint) {
        Err(rustix::io::Errno::NOTCONN) => {
            tracing::warn!(mountpoint = %mountpoint.display(), "cleaning a stale mount left by a daemon that died");
            rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)
                .map_err(|e| DaemonError::io("unmount stale", mountpoint)(e.into()))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Whether a petrel FUSE filesystem is mounted at `mountpoint` (per mountinfo).
pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(target) = std::fs::canonicalize(mountpoint) else {
        return false;
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo.lines().any(|line| {
        let at_target = line.split(' ').nth(4).is_some_and(|p| Path::new(p) == target);
        // After the " - " separator: filesystem type, then source.
        let mut after = line.split(" - ").nth(1).unwrap_or("").split(' ');
        let (fs_type, source) = (after.next().unwrap_or(""), after.next().unwrap_or(""));
        at_target && fs_type.starts_with("fuse") && source.starts_with("petrel:")
    })
}

/// Unmounts `mountpoint` (lazily when `lazy`).
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    rustix::mount::unmount(mountpoint, flags).map_err(|e| DaemonError::io("unmount", mountpoint)(e.into()))
}

/// Mounts an image from a local directory.
pub fn mount(config: &MountConfig) -> Result<Mounted> {
    let blobs = config.blob_dir.as_ref().unwrap_or(&config.image_dir);
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(blobs));
    let name = config.image_dir.display().to_string();
    mount_with_backend(
        config,
        backend,
        &ImageDir::new(&config.image_dir).bootstrap_path(),
        &name,
    )
}

/// The storage layer of one image: its mapped bootstrap and a fetcher over its cache.
#[derive(Debug)]
pub struct Storage {
    pub image: Arc<MappedImage>,
    pub fetcher: Arc<Fetcher>,
    pub stats: Arc<Stats>,
}

/// Maps the bootstrap at `bootstrap_path` and opens the node's chunk store under
/// `cache_dir` (bounded to `max_bytes` when given).
pub fn open_storage(
    cache_dir: &Path,
    backend: Arc<dyn Backend>,
    bootstrap_path: &Path,
    name: &str,
    amplify_bytes: u64,
    max_bytes: Option<u64>,
) -> Result<Storage> {
    let image = Arc::new(MappedImage::open(bootstrap_path, cache_dir, name)?);
    let store = ChunkStore::open(cache_dir, max_bytes)?;
    let stats = Arc::new(Stats::watching_cache(store.uncommitted_bytes()));
    let cache = Arc::new(ChunkCache::new(Arc::clone(&image), store, Arc::clone(&stats)));
    let fetcher = Arc::new(Fetcher::new(
        Arc::clone(&image),
        backend,
        cache,
        Arc::clone(&stats),
        amplify_bytes,
    ));
    Ok(Storage { image, fetcher, stats })
}

/// Mounts the bootstrap at `bootstrap_path`, fetching chunks from `backend`.
pub fn mount_with_backend(
    config: &MountConfig,
    backend: Arc<dyn Backend>,
    bootstrap_path: &Path,
    name: &str,
) -> Result<Mounted> {
    clean_stale_mount(&config.mountpoint)?;
    // Blobs on this node: the kernel may read further ahead (`kernel_readahead`).
    let backend_on_this_node = backend.is_on_this_node();
    let Storage { image, fetcher, stats } = open_storage(
        &config.cache_dir,
        backend,
        bootstrap_path,
        name,
        config.amplify_bytes,
        config.cache_max_bytes,
    )?;
    let control = match &config.control_socket {
        Some(path) => Some(
            ControlServer::start(path, Arc::clone(&stats), name.to_string(), config.spec.clone())
                .map_err(DaemonError::io("serve control socket", path))?,
        ),
        None => None,
    };
    let mut fs = PetrelFs::new(
        Arc::clone(&image),
        Arc::clone(&fetcher),
        Arc::clone(&stats),
        config.fetch_threads,
    );
    let recording = config.record.as_ref().map(|path| {
        (
            Arc::new(crate::record::Recorder::default()),
            Arc::clone(&image),
            path.clone(),
        )
    });
    // A recorded profile (a prefetch region this mount streams) knows better than a
    // guess: no directory readahead then.
    let profiled = config.profile.is_some()
        || (config.prefetch.mode != crate::prefetch::PrefetchMode::Off
            && !crate::prefetch::prefetch_ranges(&image, crate::prefetch::PrefetchMode::Table).is_empty());
    let mut readahead_off = None;
    if config.readahead_dir_bytes > 0 && !profiled {
        let readahead = crate::readahead::DirReadahead::start(
            Arc::clone(&image),
            Arc::clone(&fetcher),
            config.readahead_dir_bytes,
            crate::readahead::PARALLEL,
        );
        readahead_off = Some(readahead.off_switch());
        fs = fs.with_readahead(readahead);
    }
    if config.readahead_file_max_bytes > 0 {
        fs = fs.with_sequential_readahead(crate::sequential::SequentialReadahead::start(
            Arc::clone(&image),
            Arc::clone(&fetcher),
            config.readahead_file_max_bytes,
            crate::sequential::PARALLEL,
        ));
    }
    let first_start = config
        .record_first_start
        .filter(|_| recording.is_none())
        .map(|window| Arc::new(crate::record::Recorder::for_first_start(window)));
    if let Some(recorder) = &first_start {
        fs = fs.with_recorder(Arc::clone(recorder));
    }
    if let Some((recorder, ..)) = &recording {
        fs = fs.with_recorder(Arc::clone(recorder));
    } else if config.passthrough {
        fs = fs.with_passthrough(crate::passthrough::Passthrough::new(
            &config.cache_dir,
            Arc::clone(&fetcher),
        ));
    }
    fs = fs.with_file_opens(config.file_opens);
    let mut fuse_config = Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(format!("petrel:{name}")),
        MountOption::Subtype("petrel".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    fuse_config.acl = SessionACL::All;
    fuse_config.n_threads = Some(config.fuse_threads.max(1));
    fuse_config.clone_fd = true;
    let session = fuser::spawn_mount(fs, &config.mountpoint, &fuse_config)
        .map_err(DaemonError::io("mount FUSE at", &config.mountpoint))?;
    let recording_any = recording.is_some() || first_start.is_some();
    if backend_on_this_node && !recording_any && crate::kernel_readahead::pays(&image.bootstrap()) {
        crate::kernel_readahead::raise(&config.mountpoint);
    }
    let pins = if config.prefetch.mode == crate::prefetch::PrefetchMode::Off {
        None
    } else {
        let bootstrap = image.bootstrap();
        let digests: Vec<[u8; 32]> = crate::prefetch::prefetch_ranges(&image, crate::prefetch::PrefetchMode::Table)
            .into_iter()
            .flat_map(|(a, b)| a..b)
            .filter_map(|i| bootstrap.chunk(i).ok().map(|c| c.digest))
            .collect();
        Some(crate::store::write_pins(
            &config.cache_dir,
            &hex::encode(&image.digest()[..8]),
            &digests,
        )?)
    };
    // A profile's ranges first, then the image's own prefetch region.
    let mut ranges = Vec::new();
    if let Some(profile) = &config.profile {
        let plan = crate::profile_prefetch::plan(&image, profile);
        tracing::info!(
            files = plan.files,
            skipped = plan.skipped,
            ranges = plan.ranges.len(),
            "prefetching the profile given at mount"
        );
        ranges = plan.ranges;
    }
    if config.prefetch.mode != crate::prefetch::PrefetchMode::Off {
        ranges.extend(crate::prefetch::prefetch_ranges(&image, config.prefetch.mode));
    }
    let prefetch = match config.profile {
        Some(_) => crate::profile_prefetch::prefetch_config(config.prefetch),
        None => config.prefetch,
    };
    let prefetcher =
        (!ranges.is_empty()).then(|| Prefetcher::start_ranges(&image, Arc::clone(&fetcher), ranges, prefetch));
    Ok(Mounted {
        session: Some(session),
        prefetcher,
        profile_prefetcher: None,
        image,
        fetcher,
        prefetch: config.prefetch,
        first_start,
        readahead_off,
        recording,
        pins,
        stats,
        mountpoint: config.mountpoint.clone(),
        _control: control,
    })
}
