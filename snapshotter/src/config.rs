//! `petrel snapshotter --config FILE`: a TOML file.
//!
//! ```toml
//! root = "/var/lib/petrel/snapshotter"
//! address = "/run/petrel/snapshotter.sock"
//! cache_max_bytes = 10737418240        # bound on the node chunk cache (optional)
//! metrics_address = "127.0.0.1:9864"   # Prometheus text of every lazy mount (optional)
//!
//! [[registry]]                          # credentials for on-demand fetches (optional)
//! host = "registry.example.com"
//! username = "puller"
//! password = "…"
//! ```
//!
//! Credentials reach mount daemons through their environment, never their command
//! line, and are never logged.

use crate::error::{Result, SnapshotError};
use std::path::{Path, PathBuf};

#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The snapshotter's configuration.
#[derive(Debug, Clone, serde::Deserialize)]
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
    pub registry: Vec<RegistryCredentials>,
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
        self.registry
            .iter()
            .find(|r| r.host == host)
            .map(|r| format!("{}:{}", r.username, r.password))
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
}
