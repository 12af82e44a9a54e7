//! Errors from reading or writing a bootstrap.

/// Everything that can be wrong with a bootstrap or a chunk.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("bootstrap is {len} bytes, smaller than its {needed}-byte superblock")]
    TooShort { len: usize, needed: usize },
    #[error("bad magic {found:02x?}: not a petrel bootstrap")]
    BadMagic { found: [u8; 8] },
    #[error("bootstrap version {major}.{minor} is not supported (this reader reads {supported}.x)")]
    UnsupportedVersion { major: u16, minor: u16, supported: u16 },
    #[error("bootstrap needs incompat features {bits:#x} that this reader does not know")]
    UnknownIncompatFeatures { bits: u64 },
    #[error("bootstrap digest mismatch: superblock says {expected}, content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{section} at offset {offset} length {length} does not fit: {reason}")]
    BadSection {
        section: &'static str,
        offset: u64,
        length: u64,
        reason: &'static str,
    },
    #[error("corrupt bootstrap: {what} {index}: {reason}")]
    Corrupt {
        what: &'static str,
        index: u64,
        reason: &'static str,
    },
    #[error("invalid chunker parameters: {reason}")]
    BadChunker { reason: String },
    #[error("chunk {index}: {reason}")]
    BadChunk { index: u64, reason: String },
    #[error("layer record, byte {offset}: {reason}")]
    BadRecord { offset: u64, reason: String },
}

impl FormatError {
    pub(crate) fn corrupt(what: &'static str, index: impl Into<u64>, reason: &'static str) -> Self {
        FormatError::Corrupt {
            what,
            index: index.into(),
            reason,
        }
    }
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
