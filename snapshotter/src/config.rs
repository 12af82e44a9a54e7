//! `petrel snapshotter --config FILE`: a TOML file. `docs/config.md` is the reference
//! (a test keeps it in step with these types).
//!
//! ```toml
//! root = "/var/lib/petrel/snapshotter"
//! address = "/run/petrel/snapshotter.sock"
//! cache_max_bytes = 10737418240        # bound on the node chunk cache (optional)
//! metrics_address = "127.0.0.1:9864"   # Prometheus text of every lazy mount (optional)
//!
//! [[registry]]                          # how to reach a registry (all optional)
//! host = "registry.example.com"
//! username = "puller"                   # credentials for on-demand fetches
//! password = "…"
//! mirrors = ["http://127.0.0.1:4001"]   # tried first for reads (e.g. a dfdaemon)
//! plain_http = false                    # http:// (always for localhost)
//! ca_file = "/etc/petrel/registry-ca.pem"
//!
//! [daemon]                              # every lazy mount's daemon (all optional;
//! retries = 6                           # unset keys keep `petrel mount`'s defaults)
//! retry_seconds = 60.0
//! amplify_bytes = 262144
//! fuse_threads = 4
//! fetch_threads = 8
//! prefetch = "table"                    # off, table or all
//! passthrough = true
//! log_level = "warn"                    # warn, info or debug
//! ```
//!
//! Credentials reach mount daemons through their environment, never their command
//! line, and are never logged. Mirrors, plain HTTP and the CA file are used by the
//! snapshotter itself and by every mount daemon it starts.

use crate::error::{Result, SnapshotError};
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
    /// Speak plain HTTP to this host (always allowed for localhost).
    #[serde(default)]
    pub plain_http: bool,
    /// Extra CA certificates (PEM) for this host and its mirrors.
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
    #[serde(default)]
    pub cache_max_bytes: Option<u64>,
    #[serde(default)]
    pub metrics_address: Option<String>,
    #[serde(default)]
    pub registry: Vec<RegistryHost>,
    #[serde(default)]
    pub daemon: DaemonSettings,
}

/// Settings of every mount daemon the snapshotter starts; unset ones keep
/// `petrel mount`'s defaults (defined there, once).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    pub retries: Option<u32>,
    pub retry_seconds: Option<f64>,
    pub amplify_bytes: Option<u64>,
    pub fuse_threads: Option<usize>,
    pub fetch_threads: Option<usize>,
    pub prefetch: Option<PrefetchSetting>,
    pub passthrough: Option<bool>,
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
    /// The settings as `petrel mount` options (the one place they are spelled).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut option = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                args.extend([name.into(), value.into()]);
            }
        };
        option("--retries", self.retries.map(|v| v.to_string()));
        option("--retry-seconds", self.retry_seconds.map(|v| v.to_string()));
        option("--amplify-bytes", self.amplify_bytes.map(|v| v.to_string()));
        option("--fuse-threads", self.fuse_threads.map(|v| v.to_string()));
        option("--fetch-threads", self.fetch_threads.map(|v| v.to_string()));
        option(
            "--prefetch",
            self.prefetch.map(|p| {
                match p {
                    PrefetchSetting::Off => "off",
                    PrefetchSetting::Table => "table",
                    PrefetchSetting::All => "all",
                }
                .to_string()
            }),
        );
        if self.passthrough == Some(false) {
            args.push("--no-passthrough".into());
        }
        match self.log_level {
            Some(LogLevel::Info) => args.push("-v".into()),
            Some(LogLevel::Debug) => args.push("-vv".into()),
            _ => {}
        }
        args
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

    /// How the snapshotter's own registry client reaches `host`.
    pub fn client_options_for(&self, host: &str) -> petrel_registry::ClientOptions {
        let registry = self.registry.iter().find(|r| r.host == host);
        petrel_registry::ClientOptions {
            credentials: self
                .credentials_for(host)
                .and_then(|c| petrel_registry::Credentials::parse(&c)),
            mirrors: registry.map(|r| r.mirrors.clone()).unwrap_or_default(),
            plain_http: registry.is_some_and(|r| r.plain_http),
            ca_file: registry.and_then(|r| r.ca_file.clone()),
            ..petrel_registry::ClientOptions::default()
        }
    }

    /// The same, as `petrel mount` options for a mount daemon (credentials travel in
    /// its environment instead).
    pub fn daemon_args_for(&self, host: &str) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if let Some(registry) = self.registry.iter().find(|r| r.host == host) {
            for mirror in &registry.mirrors {
                args.extend(["--mirror".into(), mirror.into()]);
            }
            if registry.plain_http {
                args.push("--plain-http".into());
            }
            if let Some(ca) = &registry.ca_file {
                args.extend(["--ca-file".into(), ca.clone().into_os_string()]);
            }
        }
        args
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
    fn daemon_settings_become_mount_options() {
        let config: Config = toml::from_str(
            "[daemon]\nretries = 2\nprefetch = \"all\"\npassthrough = false\nlog_level = \"info\"\n[[registry]]\nhost = \"h\"\nmirrors = [\"http://m\"]\nplain_http = true\n",
        )
        .unwrap();
        let args: Vec<String> = config
            .daemon
            .to_args()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["--retries", "2", "--prefetch", "all", "--no-passthrough", "-v"]);
        let host: Vec<String> = config
            .daemon_args_for("h")
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(host, ["--mirror", "http://m", "--plain-http"]);
        assert!(config.daemon_args_for("other").is_empty());
        assert!(config.credentials_for("h").is_none());
        assert!(
            toml::from_str::<Config>("[daemon]\nthreads = 1\n").is_err(),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<Config>("[daemon]\nprefetch = \"some\"\n").is_err());
    }
}
