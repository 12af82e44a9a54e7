//! The bootstrap of a mounted image, memory-mapped read-only.
//!
//! The daemon never maps a file it does not own. On first sight a bootstrap is
//! copied into `<cache>/bootstraps/<blake3 digest>` through a temporary file, fully
//! verified (digest and structure), made read-only and renamed into place; it is
//! never written again. Later mounts of the same bootstrap map that copy after an
//! O(1) check, so mounting does no work proportional to the image.

use crate::error::{DaemonError, Result};
use petrel_format::layout::{SuperblockRecord, SUPERBLOCK_SIZE};
use petrel_format::{Bootstrap, OpenOptions};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A bootstrap mapped from the daemon's own verified copy.
#[derive(Debug)]
pub struct MappedImage {
    name: String,
    digest: [u8; 32],
    /// The mapped copy, its structure checked once (at open).
    bootstrap: petrel_format::reader::ValidatedBootstrap<memmap2::Mmap>,
}

/// The digest recorded in a bootstrap's superblock, read from its first bytes.
fn superblock_digest(head: &[u8]) -> Result<[u8; 32]> {
    let (record, _) = <SuperblockRecord as zerocopy::FromBytes>::ref_from_prefix(head)
        .map_err(|_| DaemonError::Invalid("bootstrap shorter than its superblock".into()))?;
    if record.magic != petrel_format::layout::MAGIC {
        return Err(petrel_format::FormatError::BadMagic { found: record.magic }.into());
    }
    Ok(record.digest)
}

impl MappedImage {
    /// Maps the bootstrap at `source` (copying and verifying it into
    /// `<cache_root>/bootstraps/` the first time it is seen).
    pub fn open(source: &Path, cache_root: &Path, name: &str) -> Result<Self> {
        let mut head = vec![0u8; SUPERBLOCK_SIZE];
        File::open(source)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(DaemonError::io("read superblock of", source))?;
        let digest = superblock_digest(&head)?;
        let dir = cache_root.join("bootstraps");
        let cached = dir.join(hex::encode(digest));
        if !cached.exists() {
            import_bootstrap(source, &dir, &cached, &digest)?;
        }
        Self::map_owned(&cached, digest, name)
    }

    /// Maps a bootstrap copy the daemon owns and verified before (see the module doc).
    fn map_owned(path: &Path, digest: [u8; 32], name: &str) -> Result<Self> {
        let file = File::open(path).map_err(DaemonError::io("open", path))?;
        let map = map_read_only(&file).map_err(DaemonError::io("map", path))?;
        let bootstrap = petrel_format::reader::ValidatedBootstrap::new(map, OpenOptions { verify_digest: false })?;
        if bootstrap.get().superblock().digest != digest {
            return Err(DaemonError::Invalid(format!(
                "{} does not hold bootstrap {}",
                path.display(),
                hex::encode(digest)
            )));
        }
        Ok(MappedImage {
            name: name.to_string(),
            digest,
            bootstrap,
        })
    }

    /// The bootstrap, structure-checked once at open (not again here).
    pub fn bootstrap(&self) -> Bootstrap<'_> {
        self.bootstrap.get()
    }

    /// The superblock digest (names the image in the cache).
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// A name for logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Copies `source` into the cache as `cached`, verifying it completely first: the
/// copy is streamed into a temporary file, mapped, checked (digest and structure),
/// and renamed into place; the bootstrap is never read into memory.
fn import_bootstrap(source: &Path, dir: &Path, cached: &PathBuf, digest: &[u8; 32]) -> Result<()> {
    crate::store::create_private_dir(dir)?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(DaemonError::io("create temporary file in", dir))?;
    let mut input = File::open(source).map_err(DaemonError::io("open", source))?;
    std::io::copy(&mut input, temp.as_file_mut()).map_err(DaemonError::io("copy", source))?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o444))
        .map_err(DaemonError::io("chmod", dir))?;
    temp.as_file().sync_all().map_err(DaemonError::io("sync", dir))?;
    {
        let map = map_read_only(temp.as_file()).map_err(DaemonError::io("map", temp.path()))?;
        let bootstrap = Bootstrap::open(&map)?;
        if bootstrap.superblock().digest != *digest {
            return Err(DaemonError::Invalid(format!(
                "{} changed while it was read",
                source.display()
            )));
        }
        petrel_format::reader::read_everything(&map, false)?;
    }
    temp.persist(cached)
        .map_err(|e| DaemonError::io("rename to", cached)(e.error))?;
    Ok(())
}

#[allow(unsafe_code)]
pub(crate) fn map_read_only(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the file is the daemon's own copy of a bootstrap: a temporary file it
    // created (O_EXCL, in its 0700 cache) and finished writing before mapping it,
    // made 0444 and renamed into place by content digest, and never opened for
    // writing again, so the mapped bytes cannot change under us. Every
    // access through `Bootstrap` is bounds-checked, so even a changed file could
    // only give errors, not out-of-bounds reads.
    unsafe { memmap2::Mmap::map(file) }
}
