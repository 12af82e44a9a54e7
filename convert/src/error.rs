//! What a conversion can fail with: each error says what was being done (the
//! layer, the blob, the manifest) and keeps its cause.

/// An error of `convert` and its parts.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input is not something petrel converts (a bad reference, a manifest of
    /// an unknown kind, a layer whose digest does not match).
    #[error("{0}")]
    Invalid(String),
    /// `doing` failed because of `source` (shown after it by error-chain printers,
    /// such as `{:#}` of an `anyhow::Error`).
    #[error("{doing}")]
    While {
        doing: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Registry(#[from] petrel_registry::RegistryError),
    #[error(transparent)]
    Build(#[from] petrel_builder::BuildError),
    #[error(transparent)]
    Format(#[from] petrel_format::FormatError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Results of the conversion.
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

/// Says what was being done when a step failed (`.context("pushing the manifest")`).
pub trait Context<T> {
    fn context(self, doing: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, doing: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, doing: impl Into<String>) -> Result<T> {
        self.map_err(|e| ConvertError::While {
            doing: doing.into(),
            source: Box::new(e),
        })
    }

    fn with_context<S: Into<String>>(self, doing: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| ConvertError::While {
            doing: doing().into(),
            source: Box::new(e),
        })
    }
}

impl<T> Context<T> for Option<T> {
    /// None becomes `ConvertError::Invalid` saying what was missing.
    fn context(self, missing: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| ConvertError::Invalid(missing.into()))
    }

    fn with_context<S: Into<String>>(self, missing: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| ConvertError::Invalid(missing().into()))
    }
}

/// Returns early with `ConvertError::Invalid` of a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::ConvertError::Invalid(format!($($arg)*)))
    };
}
pub(crate) use bail;
