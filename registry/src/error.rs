//! Registry errors. They name the registry, repository and object, never credentials.

/// What went wrong talking to a registry or reading a layout.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: &'static str },
    #[error("{method} {url}: HTTP {status}{detail}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{method} {url}: {source}")]
    Transport {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: the registry's TLS certificate is refused ({reason}); a private CA is given with --ca-file (ca_file in snapshotter.toml)")]
    CertificateRefused {
        method: &'static str,
        url: String,
        reason: String,
    },
    #[error("{method} {url}: gave up after {attempts} attempts in {seconds:.1}s; last error: {last}")]
    GaveUp {
        method: &'static str,
        url: String,
        attempts: u32,
        seconds: f64,
        last: String,
    },
    #[error("authentication to {registry} failed: {reason}")]
    Auth { registry: String, reason: String },
    #[error("{what} {digest}: content does not match its digest (got {actual})")]
    DigestMismatch {
        what: &'static str,
        digest: String,
        actual: String,
    },
    #[error("{what}: {reason}")]
    BadContent { what: String, reason: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no manifest for platform {platform} in index {reference}")]
    NoPlatform { reference: String, platform: String },
}

impl RegistryError {
    pub fn io(
        action: &'static str,
        path: impl Into<std::path::PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> RegistryError {
        let path = path.into();
        move |source| RegistryError::Io { action, path, source }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
