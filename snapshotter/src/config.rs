//! `petrel snapshotter --config FILE`: a TOML file. `docs/config.md` is the reference
//! (a test keeps it in step with these types).
//!
//! ```toml
//! root = "/var/lib/petrel/snapshotter"
//! address = "/run/petrel/snapshotter.sock"
//! cache_max_bytes = "10GiB"            # bound on the node chunk cache (optional; bytes or with a unit)
//! metrics_address = "127.0.0.1:9864"   # Prometheus text of every lazy mount (optional)
//!
//! [[registry]]                          # how to reach a registry (all optional)
//! host = "registry.example.com"
//! username = "puller"                   # credentials for on-demand fetches
//! password = "…"
//! mirrors = ["http://127.0.0.1:4001"]   # tried first for reads (e.g. a dfdaemon)
//! plain_http = false                    # http:// (loopback: unless ca_file is set)
//! ca_file = "/etc/petrel/registry-ca.pem"
//!
//! hosts_dir = "/etc/containerd/certs.d"  # containerd's hosts.toml files (optional)
//!
//! [daemon]                              # every lazy mount's daemon (all optional;
//! retries = 6                           # unset keys keep `petrel mount`'s defaults)
//! retry_seconds = 60.0
//! amplify_bytes = 262144
//! fuse_threads = 4
//! fetch_threads = 8
//! prefetch = "table"                    # off, table or all
//! prefetch_request_bytes = 8388608
//! prefetch_parallel = 2
//! prefetch_bandwidth = 10485760         # bytes per second (unset: unlimited)
//! readahead_dir_bytes = 2097152        # a directory's small files, on a miss (0: off)
//! readahead_file_max_bytes = 67108864   # files read front to back: largest window (0: off)
//! profile_lookup = true                 # prefetch a profile published for the image (a referrer)
//! record_first_start_seconds = 30       # none published: record the image's first start here
//! publish_profiles = false              # and publish it for the image (needs push access)
//! passthrough = true
//! file_opens = "auto"                   # auto, daemon or kernel: who opens files
//! log_level = "warn"                    # warn, info or debug
//! ```
//!
//! Credentials reach mount daemons through their environment, never their command
//! line, and are never logged. Mirrors, plain HTTP and the CA file are used by the
//! snapshotter itself and by every mount daemon it starts.

use crate::error::{Result, SnapshotError};
use petrel_fuse_daemon::prefetch::PrefetchMode;
use petrel_fuse_daemon::spec::{DaemonSpec, LogLevel as SpecLogLevel, RegistrySpec};
use std::path::{Path, PathBuf};

/// How to reach one registry host.
#[derive(Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryHost {
    pub host: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Mirrors (base URLs) tried first for reads; a mirror that fails is skipped
    /// while it stays down.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Speak plain HTTP to this host (what a host on loopback gets unless ca_file is set).
    #[serde(default)]
    pub plain_http: bool,
    /// Extra CA certificates (PEM) for this host and its mirrors; with them, a host on
    /// loopback is reached over TLS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryHost")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("mirrors", &self.mirrors)
            .field("plain_http", &self.plain_http)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The snapshotter's configuration.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_root")]
    pub root: PathBuf,
    #[serde(default = "default_address")]
    pub address: PathBuf,
    #[serde(default, deserialize_with = "petrel_fuse_daemon::byte_size::deserialize_option")]
    pub cache_max_bytes: Option<u64>,
    #[serde(default)]
    pub metrics_address: Option<String>,
    #[serde(default)]
    pub registry: Vec<RegistryHost>,
    /// containerd's registry `config_path` (e.g. `/etc/containerd/certs.d`): each
    /// host's `hosts.toml` adds its mirrors, plain HTTP and CA (`crate::hosts_toml`).
    #[serde(default)]
    pub hosts_dir: Option<PathBuf>,
    #[serde(default)]
    pub daemon: DaemonSettings,
}

/// Settings of every mount daemon the snapshotter starts; unset ones keep the
/// daemon spec's defaults (`petrel_fuse_daemon::spec`, defined there, once).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    pub retries: Option<u32>,
    pub retry_seconds: Option<f64>,
    #[serde(default, deserialize_with = "petrel_fuse_daemon::byte_size::deserialize_option")]
    pub amplify_bytes: Option<u64>,
    pub fuse_threads: Option<usize>,
    pub fetch_threads: Option<usize>,
    pub prefetch: Option<PrefetchSetting>,
    #[serde(default, deserialize_with = "petrel_fuse_daemon::byte_size::deserialize_option")]
    pub prefetch_request_bytes: Option<u64>,
    pub prefetch_parallel: Option<usize>,
    #[serde(default, deserialize_with = "petrel_fuse_daemon::byte_size::deserialize_option")]
    pub prefetch_bandwidth: Option<u64>,
    #[serde(default, deserialize_with = "petrel_fuse_daemon::byte_size::deserialize_option")]
    pub readahead_dir_bytes: Option<u64>,
    #[serde(default, deserialize_with = "petrel_fuse_daemon::byte_size::deserialize_option")]
    pub readahead_file_max_bytes: Option<u64>,
    pub profile_lookup: Option<bool>,
    pub record_first_start_seconds: Option<f64>,
    pub publish_profiles: Option<bool>,
    pub passthrough: Option<bool>,
    pub file_opens: Option<petrel_fuse_daemon::file_opens::FileOpens>,
    pub log_level: Option<LogLevel>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchSetting {
    Off,
    Table,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Warn,
    Info,
    Debug,
}

impl DaemonSettings {
    /// Sets what is configured in `spec` (the one place these settings reach a daemon).
    pub fn apply(&self, spec: &mut DaemonSpec) {
        let tuning = &mut spec.tuning;
        let registry = &mut spec.registry;
        set(&mut registry.retries, self.retries);
        set(&mut registry.retry_seconds, self.retry_seconds);
        set(&mut tuning.amplify_bytes, self.amplify_bytes);
        set(&mut tuning.fuse_threads, self.fuse_threads);
        set(&mut tuning.fetch_threads, self.fetch_threads);
        set(&mut tuning.passthrough, self.passthrough);
        set(&mut tuning.file_opens, self.file_opens);
        set(&mut tuning.readahead_dir_bytes, self.readahead_dir_bytes);
        set(&mut tuning.readahead_file_max_bytes, self.readahead_file_max_bytes);
        set(&mut spec.profile_lookup, self.profile_lookup);
        set(&mut spec.publish_profile, self.publish_profiles);
        if self.record_first_start_seconds.is_some() {
            spec.record_first_start_seconds = self.record_first_start_seconds;
        }
        set(
            &mut tuning.prefetch.mode,
            self.prefetch.map(|p| match p {
                PrefetchSetting::Off => PrefetchMode::Off,
                PrefetchSetting::Table => PrefetchMode::Table,
                PrefetchSetting::All => PrefetchMode::All,
            }),
        );
        set(&mut tuning.prefetch.request_bytes, self.prefetch_request_bytes);
        set(&mut tuning.prefetch.parallel, self.prefetch_parallel);
        if self.prefetch_bandwidth.is_some() {
            tuning.prefetch.bandwidth = self.prefetch_bandwidth;
        }
        set(
            &mut spec.log_level,
            self.log_level.map(|l| match l {
                LogLevel::Warn => SpecLogLevel::Warn,
                LogLevel::Info => SpecLogLevel::Info,
                LogLevel::Debug => SpecLogLevel::Debug,
            }),
        );
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

fn default_root() -> PathBuf {
    "/var/lib/petrel/snapshotter".into()
}

fn default_address() -> PathBuf {
    "/run/petrel/snapshotter.sock".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: default_root(),
            address: default_address(),
            cache_max_bytes: None,
            metrics_address: None,
            registry: Vec::new(),
            hosts_dir: None,
            daemon: DaemonSettings::default(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(SnapshotError::io("read", path))?;
        toml::from_str(&text)
            .map_err(|e| SnapshotError::InvalidArgument(format!("{}: {}", path.display(), e.message())))
    }

    /// `user:password` for a registry host, if configured.
    pub fn credentials_for(&self, host: &str) -> Option<String> {
        let registry = self.registry.iter().find(|r| r.host == host)?;
        Some(format!(
            "{}:{}",
            registry.username.as_ref()?,
            registry.password.as_ref()?
        ))
    }

    /// How `host` is reached: its `[[registry]]` entry, then its hosts.toml (whose
    /// mirrors come after the entry's), then the `[daemon]` retry settings.
    pub fn registry_spec_for(&self, host: &str) -> Result<RegistrySpec> {
        let mut spec = RegistrySpec::default();
        if let Some(registry) = self.registry.iter().find(|r| r.host == host) {
            spec.mirrors = registry.mirrors.clone();
            spec.plain_http = registry.plain_http;
            spec.ca_file = registry.ca_file.clone();
        }
        if let Some(dir) = &self.hosts_dir {
            if let Some(hosts) = crate::hosts_toml::load(dir, host)? {
                for mirror in hosts.mirrors {
                    if !spec.mirrors.contains(&mirror) {
                        spec.mirrors.push(mirror);
                    }
                }
                spec.plain_http |= hosts.plain_http;
                spec.ca_file = spec.ca_file.or(hosts.ca_file);
            }
        }
        set(&mut spec.retries, self.daemon.retries);
        set(&mut spec.retry_seconds, self.daemon.retry_seconds);
        Ok(spec)
    }

    /// How the snapshotter's own registry client reaches `host` (as its daemons do).
    pub fn client_options_for(&self, host: &str) -> Result<petrel_registry::ClientOptions> {
        let spec = DaemonSpec {
            registry: self.registry_spec_for(host)?,
            ..DaemonSpec::new("-", "-")
        };
        Ok(spec.client_options(
            self.credentials_for(host)
                .and_then(|c| petrel_registry::Credentials::parse(&c)),
        ))
    }

    /// The node cache every mount daemon shares.
    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.root.join("cache")
    }

    /// The spec of the daemon that mounts `image` at `mountpoint`, with the node
    /// cache and run directory under `root` (the one place the snapshotter's
    /// configuration becomes a daemon's). Credentials travel in its environment.
    pub fn daemon_spec(&self, image: &str, mountpoint: &Path) -> Result<DaemonSpec> {
        let host = image
            .strip_prefix("docker://")
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        let mut spec = DaemonSpec {
            cache_dir: self.cache_dir(),
            runtime_dir: self.root.join("run"),
            cache_max_bytes: self.cache_max_bytes,
            registry: if host.is_empty() {
                RegistrySpec::default()
            } else {
                self.registry_spec_for(host)?
            },
            ..DaemonSpec::new(image, mountpoint)
        };
        self.daemon.apply(&mut spec);
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let config: Config = toml::from_str("root = \"/r\"\ncache_max_bytes = 5\n[[registry]]\nhost = \"h:5000\"\nusername = \"u\"\npassword = \"p4ss\"\n").unwrap();
        assert_eq!(config.root, PathBuf::from("/r"));
        assert_eq!(config.credentials_for("h:5000").as_deref(), Some("u:p4ss"));
        assert!(!format!("{config:?}").contains("p4ss"));
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
    }

    #[test]
    fn byte_sizes_take_units() {
        let config: Config = toml::from_str(
            "cache_max_bytes = \"10GiB\"\n[daemon]\namplify_bytes = \"512KiB\"\nprefetch_bandwidth = 1000\n",
        )
        .unwrap();
        assert_eq!(config.cache_max_bytes, Some(10 << 30));
        assert_eq!(config.daemon.amplify_bytes, Some(512 << 10));
        assert_eq!(config.daemon.prefetch_bandwidth, Some(1000));
        assert_eq!(config.daemon.readahead_dir_bytes, None);
        let error = toml::from_str::<Config>("cache_max_bytes = \"lots\"\n").unwrap_err();
        assert!(error.message().contains("not a byte size"), "{error}");
    }

    #[test]
    fn daemon_settings_and_registry_hosts_make_the_daemon_spec() {
        let config: Config = toml::from_str(
            "root = \"/r\"\ncache_max_bytes = 9\n[daemon]\nretries = 2\nprefetch = \"all\"\nprefetch_parallel = 3\npassthrough = false\nlog_level = \"info\"\n[[registry]]\nhost = \"h\"\nmirrors = [\"http://m\"]\nplain_http = true\n",
        )
        .unwrap();
        let spec = config
            .daemon_spec("docker://h/app:1", Path::new("/r/mounts/x"))
            .unwrap();
        let mut expected = DaemonSpec {
            cache_dir: "/r/cache".into(),
            runtime_dir: "/r/run".into(),
            cache_max_bytes: Some(9),
            log_level: SpecLogLevel::Info,
            ..DaemonSpec::new("docker://h/app:1", "/r/mounts/x")
        };
        expected.registry.mirrors = vec!["http://m".into()];
        expected.registry.plain_http = true;
        expected.registry.retries = 2;
        expected.tuning.passthrough = false;
        expected.tuning.prefetch.mode = PrefetchMode::All;
        expected.tuning.prefetch.parallel = 3;
        assert_eq!(spec, expected);
        let other = config.daemon_spec("docker://other/app:1", Path::new("/m")).unwrap();
        assert!(other.registry.mirrors.is_empty() && !other.registry.plain_http);
        assert!(config.credentials_for("h").is_none());
        assert!(
            toml::from_str::<Config>("[daemon]\nthreads = 1\n").is_err(),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<Config>("[daemon]\nprefetch = \"some\"\n").is_err());
    }
}
