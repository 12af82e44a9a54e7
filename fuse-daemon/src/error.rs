//! Errors of the daemon and their one mapping to errno at the FUSE edge.

use petrel_format::FormatError;
use std::path::PathBuf;

/// Everything the daemon's storage layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backend read of blob {blob} bytes {offset}..{end} failed")]
    Backend {
        blob: String,
        offset: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image}: chunk {chunk} of blob {blob} at offset {offset} failed verification")]
    BadChunk {
        image: String,
        blob: String,
        chunk: u32,
        offset: u64,
        #[source]
        source: FormatError,
    },
    #[error("chunk {chunk} is {size} bytes, larger than the cache slot of {slot} bytes")]
    ChunkTooLarge { chunk: u32, size: u32, slot: u64 },
    #[error(transparent)]
    Registry(#[from] petrel_registry::RegistryError),
    #[error("{0}")]
    Invalid(String),
}

impl DaemonError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let path = path.into();
        move |source| DaemonError::Io { action, path, source }
    }

    /// The errno a FUSE request failing with this error gets.
    pub fn errno(&self) -> fuser::Errno {
        match self {
            DaemonError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => fuser::Errno::ENOENT,
            _ => fuser::Errno::EIO,
        }
    }
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;
