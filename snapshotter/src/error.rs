//! Snapshot errors, each mapping to one gRPC status code at the service edge.

/// What a snapshot operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("cannot remove snapshot {key}: it has {children} children")]
    HasChildren { key: String, children: usize },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The registry could not be reached or read (a lazy pull can fall back to a
    /// normal one, which containerd verifies).
    #[error("{0}")]
    Unavailable(String),
    #[error("metadata database: {0}")]
    Database(String),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub fn io(
        action: &'static str,
        path: impl Into<std::path::PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.into();
        move |source| SnapshotError::Io { action, path, source }
    }
}

macro_rules! database_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for SnapshotError {
            fn from(e: $t) -> Self {
                SnapshotError::Database(e.to_string())
            }
        }
    )*};
}
database_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
