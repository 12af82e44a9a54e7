//! Where a petrel image lives on local disk: `<dir>/bootstrap` and
//! `<dir>/blobs/sha256/<hex digest>` (the blob layout of an OCI image layout).

use std::path::{Path, PathBuf};

/// File name of the bootstrap inside an image directory.
pub const BOOTSTRAP_FILE: &str = "bootstrap";

/// A petrel image directory.
#[derive(Debug, Clone)]
pub struct ImageDir {
    root: PathBuf,
}

impl ImageDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn bootstrap_path(&self) -> PathBuf {
        self.root.join(BOOTSTRAP_FILE)
    }
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }
    /// Path of the blob with this sha256 digest.
    pub fn blob_path(&self, digest: &[u8; 32]) -> PathBuf {
        self.blobs_dir().join(hex::encode(digest))
    }
}
