//! How far the kernel reads ahead in a mount.
//!
//! A FUSE mount's readahead is its backing device's `read_ahead_kb`, which starts at
//! 128 KiB; the `max_readahead` a daemon answers INIT with only lowers it. So a file
//! read front to back reached the daemon as one 256 KiB request after another (4096
//! requests a GiB), each a round trip through `/dev/fuse` and a wakeup on both sides,
//! however large a request the mount allows (`fs::MAX_READAHEAD`, 1 MiB).
//!
//! A mount of a local image of big files (blobs on this node; a model) has its
//! `read_ahead_kb` raised to [`READ_AHEAD_KB`] once it is mounted (root only;
//! elsewhere the kernel's default stays). Measured on the benchmark's 1 GiB model (6
//! reads each, medians, page cache dropped first): all in the node cache through
//! FUSE 1.42 s at 128 KiB, 1.22 s at 1 MiB, 0.97 s at 4 MiB; nothing cached 1.90 s,
//! 1.78 s, 1.81 s; 4096 FUSE reads, then 1026.
//!
//! Nowhere else, for what it cost:
//! - **Over a thin link.** The same model read lazily from a registry over 100
//!   Mbit/s + 20 ms took 20.59 and 20.77 s with it, 19.77 and 19.72 s without (0.95
//!   against 0.99 of `curl`, interleaved), so a mount from a registry keeps the
//!   kernel's default.
//! - **A tree of small files** (`file_opens::passthrough_pays` decides, as for
//!   passthrough) gains nothing and loses on a start from a profile: the kernel
//!   reads up to 1 MiB past what the profile names (page faults in mapped libraries
//!   read the whole window around them), and each such read misses. The Python app
//!   over 100 Mbit/s + 20 ms, medians of 3: started with the profile given at mount,
//!   45 requests and 27.9 MB became 69 and 32.6 MB (4.21 s, 4.64 s); from the image
//!   optimized with it, 17 and 25.9 MB became 42 and 30.7 MB. It stays at 1 MiB, not
//!   4, for the same reason.
//! - **A mount that records a profile**: the daemon sees the kernel's reads,
//!   readahead included, and a profile should name what the workload reads.
//!
//! Scattered `pread`s are not widened by it (the kernel reads a lone random read as
//! asked).

use std::path::Path;

/// Readahead of a petrel mount, in KiB: as much as one FUSE request carries.
pub const READ_AHEAD_KB: u32 = 1024;

/// `statfs`'s filesystem type of a FUSE mount (`linux/magic.h`).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Whether a local mount of `bootstrap` gets [`READ_AHEAD_KB`]: an image of big files.
pub fn pays(bootstrap: &petrel_format::Bootstrap<'_>) -> bool {
    crate::file_opens::passthrough_pays(bootstrap)
}

/// Raises the readahead of the mount at `mountpoint` to [`READ_AHEAD_KB`], or says
/// why it stays at the kernel's default.
pub fn raise(mountpoint: &Path) {
    match set(mountpoint, READ_AHEAD_KB) {
        Ok(file) => tracing::debug!(file = %file.display(), kb = READ_AHEAD_KB, "kernel readahead of the mount set"),
        Err(e) => tracing::info!("kernel readahead of the mount left at the kernel's default: {e}"),
    }
}

/// Sets the readahead of the FUSE mount at `mountpoint` (already mounted) to `kb`;
/// returns the file written. The mount's answer to INIT cannot undo it: the kernel
/// keeps the smaller of the two, and `fs::MAX_READAHEAD` is not smaller.
///
/// Only a FUSE mount's is set: a mountpoint unmounted from outside names the
/// filesystem below it, whose readahead is not this daemon's to change.
pub fn set(mountpoint: &Path, kb: u32) -> std::io::Result<std::path::PathBuf> {
    if rustix::fs::statfs(mountpoint)?.f_type as i64 != FUSE_SUPER_MAGIC {
        return Err(std::io::Error::other(format!(
            "{} is not a FUSE mount",
            mountpoint.display()
        )));
    }
    let device = rustix::fs::stat(mountpoint)?.st_dev;
    let file = bdi_file(device);
    std::fs::write(&file, format!("{kb}\n"))?;
    Ok(file)
}

/// The readahead of the FUSE mount at `mountpoint`, in KiB.
pub fn get(mountpoint: &Path) -> std::io::Result<u32> {
    let device = rustix::fs::stat(mountpoint)?.st_dev;
    let text = std::fs::read_to_string(bdi_file(device))?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("read_ahead_kb {text:?}: {e}")))
}

/// The sysfs file of the readahead of the device numbered `device`.
fn bdi_file(device: u64) -> std::path::PathBuf {
    let (major, minor) = (rustix::fs::major(device), rustix::fs::minor(device));
    Path::new("/sys/class/bdi").join(format!("{major}:{minor}/read_ahead_kb"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_is_no_fuse_mount_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let error = set(dir.path(), 4096).unwrap_err();
        assert!(error.to_string().contains("is not a FUSE mount"), "{error}");
    }

    #[test]
    fn the_device_numbers_name_the_bdi() {
        let device = rustix::fs::makedev(0, 40);
        assert_eq!(bdi_file(device), Path::new("/sys/class/bdi/0:40/read_ahead_kb"));
        let device = rustix::fs::makedev(259, 3);
        assert_eq!(bdi_file(device), Path::new("/sys/class/bdi/259:3/read_ahead_kb"));
    }
}
