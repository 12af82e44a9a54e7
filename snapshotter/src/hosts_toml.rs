//! containerd's registry host configuration (`config_path`, usually
//! `/etc/containerd/certs.d`): `<dir>/<host>/hosts.toml`, else
//! `<dir>/_default/hosts.toml`. One file configures both containerd's pulls and
//! petrel's lazy reads.
//!
//! ```toml
//! server = "http://registry.internal:5000"      # http:// means plain HTTP
//! ca = "/etc/certs/registry.pem"                # CA of the server
//!
//! [host."http://127.0.0.1:65001"]               # mirrors, tried in order
//!   capabilities = ["pull", "resolve"]
//! ```
//!
//! petrel reads `server`, `ca` and each `[host."URL"]` with the `pull` capability
//! (all capabilities when unset). It never skips TLS verification: a host with
//! `skip_verify = true` is refused, and so is `override_path`, whose URL petrel
//! cannot map to a registry's `/v2/` API.

use crate::error::{Result, SnapshotError};
use std::path::{Path, PathBuf};

/// The largest hosts.toml read.
const MAX_HOSTS_FILE: u64 = 256 << 10;

/// What a hosts.toml says about reaching one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostsConfig {
    /// Mirror base URLs, in the file's order.
    pub mirrors: Vec<String>,
    /// The server speaks plain HTTP.
    pub plain_http: bool,
    /// A CA file (the server's, else the first mirror's).
    pub ca_file: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    ca: Option<CaFiles>,
    #[serde(default)]
    skip_verify: bool,
    #[serde(default)]
    host: toml::Table,
}

#[derive(serde::Deserialize, Default)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    ca: Option<CaFiles>,
    #[serde(default)]
    skip_verify: bool,
    #[serde(default)]
    override_path: bool,
}

#[derive(serde::Deserialize, Clone)]
#[serde(untagged)]
enum CaFiles {
    One(PathBuf),
    Several(Vec<PathBuf>),
}

impl CaFiles {
    fn first(&self) -> Option<PathBuf> {
        match self {
            CaFiles::One(path) => Some(path.clone()),
            CaFiles::Several(paths) => paths.first().cloned(),
        }
    }
}

/// The hosts.toml for `host` under `dir`, if there is one.
pub fn load(dir: &Path, host: &str) -> Result<Option<HostsConfig>> {
    if host.is_empty() || host.contains('/') || host.starts_with('.') {
        return Ok(None);
    }
    for candidate in [
        dir.join(host).join("hosts.toml"),
        dir.join("_default").join("hosts.toml"),
    ] {
        let file = match std::fs::File::open(&candidate) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SnapshotError::io("open", &candidate)(e)),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_HOSTS_FILE + 1), &mut text)
            .map_err(SnapshotError::io("read", &candidate))?;
        if text.len() as u64 > MAX_HOSTS_FILE {
            return Err(invalid(&candidate, format!("over {MAX_HOSTS_FILE} bytes")));
        }
        return parse(&text, &candidate).map(Some);
    }
    Ok(None)
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::InvalidArgument(format!("{}: {message}", path.display()))
}

/// Parses a hosts.toml (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<HostsConfig> {
    let file: HostsFile = toml::from_str(text).map_err(|e| invalid(path, e.message()))?;
    if file.skip_verify {
        return Err(invalid(
            path,
            "skip_verify: petrel never skips TLS verification; give the CA in `ca`",
        ));
    }
    let mut config = HostsConfig {
        plain_http: file.server.as_deref().is_some_and(|s| s.starts_with("http://")),
        ca_file: file.ca.as_ref().and_then(CaFiles::first),
        mirrors: Vec::new(),
    };
    for (url, entry) in &file.host {
        let entry: HostEntry = entry
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| invalid(path, format!("host {url:?}: {}", e.message())))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(path, format!("host {url:?} is not an http:// or https:// URL")));
        }
        if entry.skip_verify {
            return Err(invalid(
                path,
                format!("host {url:?}: petrel never skips TLS verification"),
            ));
        }
        if entry.override_path {
            return Err(invalid(
                path,
                format!("host {url:?}: override_path is not supported; give the mirror's base URL"),
            ));
        }
        let pulls = entry
            .capabilities
            .as_ref()
            .is_none_or(|caps| caps.iter().any(|c| c == "pull"));
        if !pulls || Some(url.as_str()) == file.server.as_deref() {
            continue;
        }
        if config.ca_file.is_none() {
            config.ca_file = entry.ca.as_ref().and_then(CaFiles::first);
        }
        config.mirrors.push(url.trim_end_matches('/').to_string());
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_mirrors_and_cas_are_read_in_order() {
        let config = parse(
            "server = \"http://reg.internal:5000\"\n\
             [host.\"http://b-mirror:1\"]\ncapabilities = [\"pull\", \"resolve\"]\nca = [\"/m.pem\"]\n\
             [host.\"http://a-mirror:2/\"]\n\
             [host.\"http://push-only:3\"]\ncapabilities = [\"push\"]\n",
            Path::new("h.toml"),
        )
        .unwrap();
        assert!(config.plain_http);
        assert_eq!(config.mirrors, ["http://b-mirror:1", "http://a-mirror:2"]);
        assert_eq!(config.ca_file, Some(PathBuf::from("/m.pem")));
    }

    #[test]
    fn what_petrel_cannot_honour_is_refused_by_name() {
        for (text, expected) in [
            ("skip_verify = true\n", "never skips TLS verification"),
            ("[host.\"https://m\"]\nskip_verify = true\n", "never skips"),
            ("[host.\"https://m/v2\"]\noverride_path = true\n", "override_path"),
            ("[host.\"ftp://m\"]\n", "not an http"),
            ("server = 5\n", "invalid type"),
        ] {
            let error = parse(text, Path::new("/etc/containerd/certs.d/h/hosts.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("certs.d/h/hosts.toml") && error.contains(expected),
                "{error}"
            );
        }
    }

    #[test]
    fn the_host_directory_then_default_is_used() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "reg:5000").unwrap(), None);
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "[host.\"http://d\"]\n").unwrap();
        std::fs::create_dir_all(dir.path().join("reg:5000")).unwrap();
        std::fs::write(dir.path().join("reg:5000/hosts.toml"), "server = \"http://reg:5000\"\n").unwrap();
        assert!(load(dir.path(), "reg:5000").unwrap().unwrap().plain_http);
        assert_eq!(load(dir.path(), "other").unwrap().unwrap().mirrors, ["http://d"]);
        assert_eq!(load(dir.path(), "../etc").unwrap(), None);
    }
}
