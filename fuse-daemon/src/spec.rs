//! One typed specification of a mount daemon: what it mounts, where, from which
//! registry endpoints, with which cache bound and tuning. `petrel mount` builds one
//! from its options, the snapshotter builds one from `snapshotter.toml`, and a
//! systemd unit names a file holding one (`petrel mount --spec FILE`); the daemon
//! runs from nothing else and answers it on its control socket (`spec`), so what a
//! configuration says can be compared with what a daemon does.
//!
//! ```toml
//! image = "docker://registry.example.com/app@sha256:…"   # or a local image directory
//! mountpoint = "/run/petrel/mounts/app"
//! cache_dir = "/var/lib/petrel/cache"
//! cache_max_bytes = 10737418240
//! log_level = "info"
//!
//! [registry]
//! mirrors = ["http://127.0.0.1:65001"]
//! creds_file = "/etc/petrel/creds"      # USER:PASSWORD (else PETREL_CREDS, the Docker config)
//!
//! [tuning]                              # byte sizes: numbers or "256KiB", "10GiB"
//! fetch_threads = 8
//! prefetch = { mode = "table", request_bytes = 8388608, parallel = 2 }
//! ```
//!
//! Credentials are never part of a spec: they come from `creds_file`, `PETREL_CREDS`
//! or the Docker config, so a spec can be logged and shown.

use crate::prefetch::PrefetchConfig;
use std::path::{Path, PathBuf};

/// Default node cache root.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/petrel/cache";
/// Default directory of control sockets.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/petrel";
pub const DEFAULT_FUSE_THREADS: usize = 4;
pub const DEFAULT_FETCH_THREADS: usize = 8;
/// The largest spec file read.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Everything a mount daemon runs from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSpec {
    /// A local image directory, or `docker://HOST/REPO[:TAG|@DIGEST]`.
    pub image: String,
    pub mountpoint: PathBuf,
    /// Read blobs from this directory's `blobs/sha256/` instead of the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_dir: Option<PathBuf>,
    /// The files in `blob_dir` are unpacked blob layers, not whole layers.
    #[serde(default)]
    pub unpacked_blobs: bool,
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Directory of control sockets.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// Bound on the node's chunk cache (bytes, or `"10GiB"`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::byte_size::deserialize_option"
    )]
    pub cache_max_bytes: Option<u64>,
    /// Record what is read and write the profile here on unmount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<PathBuf>,
    /// A profile (`petrel record`) whose files' ranges are prefetched first, on any
    /// petrel image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<PathBuf>,
    /// Without `profile`: look for a profile published for the image in its registry
    /// (an OCI referrer) and prefetch it once found (the mount does not wait).
    #[serde(default = "default_true")]
    pub profile_lookup: bool,
    /// When no profile is published for the image: record this many seconds from
    /// the first read (the image's first start on this node), keep the profile in
    /// the cache (`profiles/`), and with `publish_profile` publish it for the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_first_start_seconds: Option<f64>,
    /// Publish a first-start profile in the image's registry (needs push access).
    #[serde(default)]
    pub publish_profile: bool,
    #[serde(default)]
    pub log_level: LogLevel,
    #[serde(default)]
    pub registry: RegistrySpec,
    #[serde(default)]
    pub tuning: Tuning,
}

fn default_true() -> bool {
    true
}

/// How a daemon reaches its registry (the image's host).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySpec {
    /// Base URLs tried first for reads; a mirror that fails is skipped while it stays down.
    pub mirrors: Vec<String>,
    /// Speak plain HTTP (what a registry on loopback gets unless `ca_file` is set).
    pub plain_http: bool,
    /// Extra CA certificates (PEM) for the registry and its mirrors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A file holding USER:PASSWORD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// Attempts per registry request.
    pub retries: u32,
    /// Seconds a registry request may keep retrying.
    pub retry_seconds: f64,
}

impl Default for RegistrySpec {
    fn default() -> Self {
        let retry = petrel_registry::RetryPolicy::default();
        RegistrySpec {
            mirrors: Vec::new(),
            plain_http: false,
            ca_file: None,
            creds_file: None,
            retries: retry.max_attempts,
            retry_seconds: retry.max_elapsed.as_secs_f64(),
        }
    }
}

/// How a daemon reads, fetches and prefetches.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    /// Stored bytes a fetch may extend over following missing chunks.
    #[serde(deserialize_with = "crate::byte_size::deserialize")]
    pub amplify_bytes: u64,
    /// Threads reading FUSE requests.
    pub fuse_threads: usize,
    /// Threads serving reads that wait for fetches.
    pub fetch_threads: usize,
    /// Open fully cached files by FUSE passthrough where the kernel offers it.
    pub passthrough: bool,
    /// Who opens files: `auto`, `daemon` (every open a request; passthrough
    /// possible) or `kernel` (no request per open or close; no passthrough).
    pub file_opens: crate::file_opens::FileOpens,
    pub prefetch: PrefetchConfig,
    /// Stored bytes of a directory's small files read ahead when one of them misses
    /// the cache (0: off).
    #[serde(deserialize_with = "crate::byte_size::deserialize")]
    pub readahead_dir_bytes: u64,
    /// Largest window a file read front to back is fetched ahead by (0: off).
    #[serde(deserialize_with = "crate::byte_size::deserialize")]
    pub readahead_file_max_bytes: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            amplify_bytes: crate::fetch::DEFAULT_AMPLIFY_BYTES,
            fuse_threads: DEFAULT_FUSE_THREADS,
            fetch_threads: DEFAULT_FETCH_THREADS,
            passthrough: true,
            file_opens: crate::file_opens::FileOpens::Auto,
            prefetch: PrefetchConfig::default(),
            readahead_dir_bytes: crate::readahead::DEFAULT_DIR_BYTES,
            readahead_file_max_bytes: crate::sequential::DEFAULT_MAX_WINDOW,
        }
    }
}

/// A daemon's log level (`PETREL_LOG` in its environment overrides it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    #[default]
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    /// The level of `-v` given `count` times.
    pub fn from_verbosity(count: u8) -> Self {
        match count {
            0 => LogLevel::Warn,
            1 => LogLevel::Info,
            _ => LogLevel::Debug,
        }
    }

    /// How many `-v` give this level.
    pub fn verbosity(self) -> u8 {
        self as u8
    }
}

fn default_cache_dir() -> PathBuf {
    DEFAULT_CACHE_DIR.into()
}

fn default_runtime_dir() -> PathBuf {
    DEFAULT_RUNTIME_DIR.into()
}

/// A spec that cannot be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading the daemon spec {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the daemon spec {path} is over {MAX_SPEC_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the daemon spec {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl DaemonSpec {
    /// A spec with every setting at its default.
    pub fn new(image: impl Into<String>, mountpoint: impl Into<PathBuf>) -> Self {
        DaemonSpec {
            image: image.into(),
            mountpoint: mountpoint.into(),
            blob_dir: None,
            unpacked_blobs: false,
            cache_dir: default_cache_dir(),
            runtime_dir: default_runtime_dir(),
            cache_max_bytes: None,
            record: None,
            profile: None,
            profile_lookup: true,
            record_first_start_seconds: None,
            publish_profile: false,
            log_level: LogLevel::default(),
            registry: RegistrySpec::default(),
            tuning: Tuning::default(),
        }
    }

    /// Parses TOML; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, SpecError> {
        let spec: DaemonSpec = toml::from_str(text).map_err(|e| SpecError::Invalid {
            path: origin.to_path_buf(),
            message: e.message().to_string(),
        })?;
        spec.validate().map_err(|message| SpecError::Invalid {
            path: origin.to_path_buf(),
            message,
        })?;
        Ok(spec)
    }

    /// Reads a spec from `path`, or from standard input when `path` is `-`.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let read = |reader: &mut dyn std::io::Read| -> std::io::Result<Vec<u8>> {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(reader, MAX_SPEC_BYTES + 1), &mut bytes)?;
            Ok(bytes)
        };
        let bytes = if path == Path::new("-") {
            read(&mut std::io::stdin().lock())
        } else {
            std::fs::File::open(path).and_then(|mut f| read(&mut f))
        }
        .map_err(|source| SpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.len() as u64 > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| SpecError::Invalid {
            path: path.to_path_buf(),
            message: "not UTF-8".into(),
        })?;
        Self::from_toml(&text, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a daemon spec serializes")
    }

    /// Settings no daemon can run with.
    fn validate(&self) -> Result<(), String> {
        if self.image.is_empty() {
            return Err("image is empty".into());
        }
        if self.unpacked_blobs && self.blob_dir.is_none() {
            return Err("unpacked_blobs needs blob_dir".into());
        }
        let tuning = &self.tuning;
        if tuning.fuse_threads == 0 || tuning.fetch_threads == 0 || tuning.prefetch.parallel == 0 {
            return Err("fuse_threads, fetch_threads and prefetch.parallel must be at least 1".into());
        }
        if !(self.registry.retry_seconds.is_finite() && self.registry.retry_seconds >= 0.0) {
            return Err("registry.retry_seconds must be a number of seconds".into());
        }
        if self
            .record_first_start_seconds
            .is_some_and(|s| !(s.is_finite() && s > 0.0 && s <= 3600.0))
        {
            return Err("record_first_start_seconds must be between 0 and 3600".into());
        }
        Ok(())
    }

    /// The mount's configuration (its control socket included).
    pub fn mount_config(&self) -> crate::MountConfig {
        crate::MountConfig {
            amplify_bytes: self.tuning.amplify_bytes,
            fuse_threads: self.tuning.fuse_threads,
            fetch_threads: self.tuning.fetch_threads,
            control_socket: Some(crate::control::socket_path(&self.runtime_dir, &self.mountpoint)),
            blob_dir: self.blob_dir.clone(),
            prefetch: self.tuning.prefetch,
            record: self.record.clone(),
            cache_max_bytes: self.cache_max_bytes,
            passthrough: self.tuning.passthrough,
            file_opens: self.tuning.file_opens,
            spec: Some(self.clone()),
            readahead_dir_bytes: self.tuning.readahead_dir_bytes,
            readahead_file_max_bytes: self.tuning.readahead_file_max_bytes,
            record_first_start: self
                .record_first_start_seconds
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| std::time::Duration::from_secs_f64(s.min(3600.0))),
            ..crate::MountConfig::new(&self.image, &self.mountpoint, &self.cache_dir)
        }
    }

    /// Registry client options (credentials are the caller's: see the module notes).
    pub fn client_options(&self, credentials: Option<petrel_registry::Credentials>) -> petrel_registry::ClientOptions {
        let registry = &self.registry;
        petrel_registry::ClientOptions {
            plain_http: registry.plain_http,
            ca_file: registry.ca_file.clone(),
            credentials,
            mirrors: registry.mirrors.clone(),
            retry: petrel_registry::RetryPolicy {
                max_attempts: registry.retries.max(1),
                max_elapsed: std::time::Duration::from_secs_f64(registry.retry_seconds),
                ..petrel_registry::RetryPolicy::default()
            },
            ..petrel_registry::ClientOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_round_trips_and_fills_defaults() {
        let spec = DaemonSpec::from_toml(
            "image = \"docker://h/r:t\"\nmountpoint = \"/m\"\n[tuning.prefetch]\nmode = \"all\"\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(spec.tuning.prefetch.mode, crate::prefetch::PrefetchMode::All);
        assert_eq!(spec.tuning.prefetch.parallel, PrefetchConfig::default().parallel);
        assert_eq!(spec.tuning.fetch_threads, DEFAULT_FETCH_THREADS);
        assert_eq!(spec.cache_dir, PathBuf::from(DEFAULT_CACHE_DIR));
        assert_eq!(DaemonSpec::from_toml(&spec.to_toml(), Path::new("t")).unwrap(), spec);
    }

    #[test]
    fn bad_specs_are_refused_with_their_origin() {
        for (text, expected) in [
            ("image = \"x\"\n", "missing field `mountpoint`"),
            (
                "image = \"x\"\nmountpoint = \"/m\"\nthreads = 2\n",
                "unknown field `threads`",
            ),
            (
                "image = \"x\"\nmountpoint = \"/m\"\n[tuning]\nfetch_threads = 0\n",
                "at least 1",
            ),
            (
                "image = \"x\"\nmountpoint = \"/m\"\nunpacked_blobs = true\n",
                "needs blob_dir",
            ),
            (
                "image = \"x\"\nmountpoint = \"/m\"\nlog_level = \"loud\"\n",
                "unknown variant",
            ),
        ] {
            let error = DaemonSpec::from_toml(text, Path::new("/etc/petrel/m.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("/etc/petrel/m.toml") && error.contains(expected),
                "{error}"
            );
        }
    }

    #[test]
    fn log_levels_follow_the_verbosity_count() {
        for count in 0..=2 {
            assert_eq!(LogLevel::from_verbosity(count).verbosity(), count);
        }
        assert_eq!(LogLevel::from_verbosity(7), LogLevel::Debug);
    }
}
