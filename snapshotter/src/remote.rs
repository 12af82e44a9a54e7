//! Remote petrel layers. During a pull, containerd prepares each layer with the
//! target chain ID in `containerd.io/snapshot.ref` and labels naming the
//! image and layer (`crate::labels`). A layer of a petrel image is never downloaded: blob
//! layers become empty committed snapshots, and the bootstrap layer becomes a
//! committed snapshot whose contents are a lazy `petrel mount` of the image.
//!
//! One daemon per image: each lazy mount is its own `petrel mount --daemon`
//! process, detached from the snapshotter, so restarting the snapshotter never
//! breaks running containers; on start the snapshotter remounts any mount whose
//! daemon is gone.

use crate::error::{Result, SnapshotError};
use petrel_fuse_daemon::DaemonSpec;
use petrel_registry::ImageRef;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use crate::labels::{classify, PETREL_IMAGE, TARGET_REF};
use crate::labels::{CRI_IMAGE_REF, CRI_MANIFEST};
/// `statfs` type of a FUSE mount.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

pub use crate::labels::RemoteLayer;

/// Where lazy mounts, their cache and their daemons' files live.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The `petrel` binary that runs mount daemons.
    pub petrel: PathBuf,
    pub root: PathBuf,
    pub settings: crate::config::Config,
}

impl RemoteConfig {
    pub fn mountpoint(&self, target: &str) -> PathBuf {
        let digest = petrel_registry::oci::sha256_digest(target.as_bytes());
        self.root.join("mounts").join(&digest[7..19])
    }

    /// Where the links to the unpacked blobs of the image mounted at `mountpoint` live.
    pub fn unpacked_blob_dir(&self, mountpoint: &Path) -> PathBuf {
        let name = mountpoint.file_name().unwrap_or(std::ffi::OsStr::new("none"));
        self.root.join("unpacked").join(name)
    }
}

/// Whether a live FUSE filesystem answers at `mountpoint`.
pub fn is_live(mountpoint: &Path) -> bool {
    rustix::fs::statfs(mountpoint).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC)
}

/// Starts a mount daemon for registry image `image` at `mountpoint` (returns once mounted).
pub fn mount(config: &RemoteConfig, image: &str, mountpoint: &Path) -> Result<()> {
    let host = image
        .strip_prefix("docker://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    let credentials = config.settings.credentials_for(host);
    let spec = config.settings.daemon_spec(image, mountpoint)?;
    run_mount_daemon(config, &spec, credentials)
}

/// Starts the daemon `spec` describes (`petrel mount --spec FILE --daemon`), its
/// spec, pid and log files in the run directory; returns once it has mounted.
pub(crate) fn run_mount_daemon(config: &RemoteConfig, spec: &DaemonSpec, credentials: Option<String>) -> Result<()> {
    let mountpoint = spec.mountpoint.as_path();
    crate::store::private_dir(mountpoint)?;
    let name = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let run = config.root.join("run");
    crate::store::private_dir(&run)?;
    let spec_path = run.join(format!("{name}.spec.toml"));
    std::fs::write(&spec_path, spec.to_toml()).map_err(SnapshotError::io("write", &spec_path))?;
    let mut command = Command::new(&config.petrel);
    if let Some(credentials) = credentials {
        command.env("PETREL_CREDS", credentials);
    }
    if config.settings.daemon.log_level.is_some() {
        // The configured level, not the snapshotter's own PETREL_LOG, sets the daemon's.
        command.env_remove("PETREL_LOG");
    }
    let out = command
        .arg("mount")
        .arg("--spec")
        .arg(&spec_path)
        .arg("--daemon")
        .arg("--pid-file")
        .arg(run.join(format!("{name}.pid")))
        .arg("--log-file")
        .arg(run.join(format!("{name}.log")))
        .output()
        .map_err(SnapshotError::io("run", &config.petrel))?;
    if !out.status.success() {
        return Err(SnapshotError::FailedPrecondition(format!(
            "mounting {}: {}",
            spec.image,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Remounts a lazy layer whose daemon is gone: an unpacked image from its layers,
/// a registry image from its labels.
pub fn ensure_mounted(config: &RemoteConfig, layer: &crate::store::LazyLayer) -> Result<()> {
    let mountpoint = layer.mountpoint.as_path();
    if is_live(mountpoint) {
        return Ok(());
    }
    let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
    if let Some(image) = &layer.unpacked {
        tracing::info!(mountpoint = %mountpoint.display(), "remounting an unpacked image");
        return crate::unpacked::mount(config, image, mountpoint);
    }
    let labels = &layer.info.labels;
    if let Some(image) = labels.get(PETREL_IMAGE) {
        tracing::info!(image = %image, mountpoint = %mountpoint.display(), "remounting a lazy image");
        return mount(config, image, mountpoint);
    }
    let (Some(image), Some(manifest)) = (labels.get(CRI_IMAGE_REF), labels.get(CRI_MANIFEST)) else {
        return Err(SnapshotError::FailedPrecondition(format!(
            "lazy layer at {} has no image labels to remount from",
            mountpoint.display()
        )));
    };
    let image_ref = ImageRef::parse(image).map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))?;
    tracing::info!(image = %image, mountpoint = %mountpoint.display(), "remounting a lazy image");
    mount(
        config,
        &format!("docker://{}/{}@{manifest}", image_ref.registry, image_ref.repository),
        mountpoint,
    )
}

/// Unmounts a lazy layer; its daemon exits when the mount goes. Its pid and log files
/// go too, so a later reconcile never trusts a pid the kernel may have reused.
pub fn unmount(config: &RemoteConfig, mountpoint: &Path) {
    let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(mountpoint);
    if let Some(name) = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy())
        .filter(|n| !n.is_empty())
    {
        let run = config.root.join("run");
        for extension in ["pid", "log", "spec.toml"] {
            let _ = std::fs::remove_file(run.join(format!("{name}.{extension}")));
        }
        let _ = std::fs::remove_dir_all(config.unpacked_blob_dir(mountpoint));
    }
}

/// Unmounts lazy mounts no snapshot owns (left by a crash between a Remove's metadata
/// change and its unmount); returns how many. `keep` is compared by mount name, so a
/// root spelled differently since the mounts were recorded cannot make them orphans.
pub fn unmount_orphans(config: &RemoteConfig, keep: &std::collections::HashSet<PathBuf>) -> usize {
    let Ok(entries) = std::fs::read_dir(config.root.join("mounts")) else {
        return 0;
    };
    let kept: std::collections::HashSet<&std::ffi::OsStr> = keep.iter().filter_map(|k| k.file_name()).collect();
    let mut released = 0;
    for mountpoint in entries.flatten().map(|e| e.path()) {
        if mountpoint.file_name().is_some_and(|name| !kept.contains(name)) {
            tracing::info!(mountpoint = %mountpoint.display(), "cleanup: unmounting an orphan lazy mount");
            unmount(config, &mountpoint);
            released += 1;
        }
    }
    released
}

/// Evicts chunks beyond the configured bound (after a layer was removed).
pub fn collect_garbage(config: &RemoteConfig) {
    let Some(max) = config.settings.cache_max_bytes else {
        return;
    };
    match petrel_fuse_daemon::store::ChunkStore::open(&config.root.join("cache"), Some(max)) {
        Ok(store) => {
            let report = store.gc(max);
            tracing::debug!(?report, "cache garbage collected");
        }
        Err(error) => tracing::warn!(%error, "cannot collect the cache's garbage"),
    }
}

/// The Prometheus text of every live lazy mount: each daemon's counters (its control
/// socket's `stats`, asked in-process with a timeout) encoded together, one family
/// per metric and one sample per image, with the gauge of lazy mounts.
pub fn metrics(config: &RemoteConfig, mountpoints: &[PathBuf]) -> String {
    let run = config.root.join("run");
    let images: Vec<(String, petrel_fuse_daemon::stats::StatsSnapshot)> = mountpoints
        .iter()
        .filter_map(|mountpoint| {
            let socket = petrel_fuse_daemon::control::socket_path(&run, mountpoint);
            let answer = petrel_fuse_daemon::control::request(&socket, "stats").ok()?;
            crate::metrics::parse_stats_answer(&answer)
        })
        .collect();
    petrel_fuse_daemon::exposition::encode(&images, Some(mountpoints.len()))
}
