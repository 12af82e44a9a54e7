//! Errors of building, checking and unpacking images.

use petrel_format::FormatError;
use std::path::PathBuf;

/// What is wrong with one archive entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryProblem {
    #[error("path component {component:?} is not a directory")]
    NotADirectory { component: String },
    #[error("more than 40 symlinks while resolving the parent directory")]
    TooManySymlinks,
    #[error("hardlink target {target:?} does not exist in the tree")]
    HardlinkTargetMissing { target: String },
    #[error("hardlink target {target:?} is a directory")]
    HardlinkToDirectory { target: String },
    #[error("hardlink without a target")]
    HardlinkWithoutTarget,
    #[error("symlink without a target, or a target longer than 4096 bytes")]
    BadSymlinkTarget,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("a path component holds a NUL byte")]
    NulInName,
    #[error("path of {bytes} bytes is longer than {max} (PATH_MAX)")]
    PathTooLong { bytes: usize, max: usize },
    #[error("path of {depth} components is deeper than {max}")]
    PathTooDeep { depth: usize, max: usize },
    #[error("extended attribute {name:?}: {reason}")]
    BadXattr { name: String, reason: String },
    #[error("file data ended after {read} of {expected} bytes")]
    Truncated { read: u64, expected: u64 },
    #[error("unreadable header or data: {0}")]
    Io(#[source] std::io::Error),
}

/// Errors of the builder and the image tools.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `layer` counts from 0; messages count layers from 1, as users do.
    #[error("layer {}, entry {path:?}: {problem}", layer + 1)]
    BadEntry {
        layer: usize,
        path: String,
        problem: EntryProblem,
    },
    #[error("layer {}: cannot read the archive", layer + 1)]
    Archive {
        layer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("chunk {index} (blob {blob} offset {offset})")]
    Chunk {
        index: u32,
        blob: String,
        offset: u64,
        #[source]
        source: FormatError,
    },
    #[error("blob {digest} is missing: {path}")]
    MissingBlob { digest: String, path: PathBuf },
    #[error("image too large: {what}")]
    TooLarge { what: &'static str },
    #[error("{0}")]
    Invalid(String),
}

impl BuildError {
    /// Wraps an I/O error with what was being done to which path.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BuildError {
        let path = path.into();
        move |source| BuildError::Io { action, path, source }
    }
}

pub type Result<T, E = BuildError> = std::result::Result<T, E>;
