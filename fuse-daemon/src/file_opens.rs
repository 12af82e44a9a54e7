//! Who opens a file: the daemon, or the kernel alone.
//!
//! Every `open` and `close` of a file in a FUSE mount is a round trip to the daemon
//! (OPEN, then RELEASE), even when every byte is in the page cache. The daemon only
//! needs OPEN to hand the kernel a backing file (FUSE passthrough). When it answers
//! the first OPEN with ENOSYS, the kernel stops sending OPEN and RELEASE for the
//! rest of the mount (FUSE "zero-message open", `FUSE_NO_OPEN_SUPPORT`), and
//! keeps each file's page cache across opens as `FOPEN_KEEP_CACHE` would.
//!
//! Measured on this machine, every file of the Python image (12,269 files, 395 MB)
//! read three times with the page cache warm: the daemon opening files 0.90–1.27 s a
//! pass, the kernel alone 0.54–0.64 s, plain disk 0.55–0.61 s. Cold, from a local
//! blob: 2.94 s against 2.33 s (medians of 5; plain disk 2.14 s). An open and a
//! close cost about 35 µs together.
//!
//! What passthrough saves instead: a 1 GiB file read with the page cache warm took
//! 0.27 s through FUSE and 0.13 s by passthrough, about 0.13 ns a byte. So for an
//! image whose files are read once per open, passthrough pays when its files of
//! `MIN_FILE_BYTES` and more hold, on average per regular file, more than about
//! 35 µs / 0.13 ns ≈ 270 KB: a model or a big binary, not a Python or Java tree.
//! `FileOpens::Auto` applies that rule to the image being mounted.

use petrel_format::{Bootstrap, FileKind};

/// Bytes in passthrough-sized files, per regular file, above which the daemon keeps
/// opening files (for passthrough); at or below, the kernel opens them alone.
pub const PASSTHROUGH_BYTES_PER_FILE: u64 = 256 << 10;

/// Who opens files in a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileOpens {
    /// The kernel, unless passthrough is on and the image's big files make it pay
    /// (`PASSTHROUGH_BYTES_PER_FILE`).
    #[default]
    Auto,
    /// The daemon: every open and close is a request; fully cached files can be
    /// opened by passthrough.
    Daemon,
    /// The kernel alone: no request per open or close, no passthrough.
    Kernel,
}

impl std::str::FromStr for FileOpens {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(FileOpens::Auto),
            "daemon" => Ok(FileOpens::Daemon),
            "kernel" => Ok(FileOpens::Kernel),
            other => Err(format!("file opens {other:?}: use auto, daemon or kernel")),
        }
    }
}

impl FileOpens {
    /// Whether the kernel opens files alone in a mount of `bootstrap`, with
    /// passthrough possible or not.
    pub fn by_kernel(self, bootstrap: &Bootstrap<'_>, passthrough: bool) -> bool {
        match self {
            FileOpens::Kernel => true,
            FileOpens::Daemon => false,
            FileOpens::Auto => !passthrough || !passthrough_pays(bootstrap),
        }
    }
}

/// Whether the image's files of passthrough size hold more than
/// `PASSTHROUGH_BYTES_PER_FILE` per regular file: an image of big files (a model),
/// not a tree of small ones (an interpreter's, a JVM's).
pub fn passthrough_pays(bootstrap: &Bootstrap<'_>) -> bool {
    let (mut files, mut big_bytes) = (0u64, 0u64);
    for ino in 1..=bootstrap.inode_count() {
        let Ok(inode) = bootstrap.inode(ino) else { continue };
        if inode.kind().ok() != Some(FileKind::Regular) {
            continue;
        }
        files += 1;
        if inode.size() >= crate::passthrough::MIN_FILE_BYTES {
            big_bytes = big_bytes.saturating_add(inode.size());
        }
    }
    big_bytes > files.saturating_mul(PASSTHROUGH_BYTES_PER_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of files of these sizes, mapped as a mount maps it.
    fn image_of(files: &[(&str, usize)]) -> (tempfile::TempDir, crate::image::MappedImage) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        for (name, size) in files {
            std::fs::write(tree.join(name), vec![7u8; *size]).unwrap();
        }
        let image = dir.path().join("image");
        petrel_builder::build_paths(&[tree], &image, petrel_builder::BuildOptions::default()).unwrap();
        let mapped = crate::image::MappedImage::open(&image.join("bootstrap"), &dir.path().join("cache"), "t").unwrap();
        (dir, mapped)
    }

    #[test]
    fn an_image_of_small_files_is_opened_by_the_kernel_and_a_model_by_the_daemon() {
        let (_dir, tree) = image_of(&[("a.py", 3_000), ("b.py", 90_000), ("lib.so", 500_000), ("c.pyc", 9_000)]);
        assert!(FileOpens::Auto.by_kernel(&tree.bootstrap(), true));

        let (_dir, model) = image_of(&[("config.json", 2_000), ("model.bin", 4 << 20)]);
        let bootstrap = model.bootstrap();
        assert!(!FileOpens::Auto.by_kernel(&bootstrap, true));
        assert!(
            FileOpens::Auto.by_kernel(&bootstrap, false),
            "no passthrough: nothing to open for"
        );
        assert!(FileOpens::Kernel.by_kernel(&bootstrap, true));
        assert!(!FileOpens::Daemon.by_kernel(&bootstrap, false));
    }
}
