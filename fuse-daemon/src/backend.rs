//! Where blobs come from. The storage layer asks a backend for byte ranges of a
//! blob; the local backend reads image or OCI-layout directories, and the registry
//! backend (later) is one more implementation of the same trait.

use petrel_format::image_dir::ImageDir;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// A source of blob bytes.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Reads `len` bytes at `offset` of the blob with sha256 `digest`. Must return
    /// exactly `len` bytes or an error.
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64) -> std::io::Result<Vec<u8>>;

    /// A short description for logs (`local:/path`, `registry:host/repo`).
    fn describe(&self) -> String;
}

/// Blobs in a local directory laid out as `blobs/sha256/<hex>` (a petrel image
/// directory or an OCI image layout).
#[derive(Debug, Clone)]
pub struct LocalBackend {
    dir: ImageDir,
}

impl LocalBackend {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalBackend {
            dir: ImageDir::new(dir.into()),
        }
    }
}

impl Backend for LocalBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let file = File::open(self.dir.blob_path(digest))?;
        let mut buffer = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut buffer, offset)?;
        Ok(buffer)
    }

    fn describe(&self) -> String {
        format!("local:{}", self.dir.root().display())
    }
}
