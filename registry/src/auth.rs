//! Credentials and the registry auth handshake: anonymous, Basic, and Bearer tokens
//! obtained through the `WWW-Authenticate` challenge. Credentials never reach a log
//! line or an error message.

use base64::Engine;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A username and password (or identity token). `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Parses `USER:PASSWORD` (as `--creds` takes it).
    pub fn parse(text: &str) -> Option<Self> {
        let (username, password) = text.split_once(':')?;
        Some(Credentials {
            username: username.into(),
            password: password.into(),
        })
    }

    /// The `Authorization: Basic` value.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    /// Credentials for `registry` from the Docker config (`$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`), as Docker reads it: the host's credential helper
    /// (`credHelpers.<host>`, else `credsStore`: `docker-credential-<name> get`), then
    /// `auths.<host>.auth` (base64 `user:pass`) or `username`/`password`.
    pub fn from_docker_config(registry: &str) -> Option<Self> {
        let path = match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"),
        };
        let text = std::fs::read_to_string(path).ok()?;
        let config: serde_json::Value = serde_json::from_str(&text).ok()?;
        let hub = registry == crate::reference::DOCKER_HUB;
        // Docker names Docker Hub by its v1 index URL towards helpers and in `auths`.
        let server = if hub { "https://index.docker.io/v1/" } else { registry };
        let helper = config
            .get("credHelpers")
            .and_then(|h| h.get(registry).or_else(|| hub.then(|| h.get("docker.io")).flatten()))
            .or_else(|| config.get("credsStore"))
            .and_then(|h| h.as_str());
        if let Some(helper) = helper {
            match crate::cred_helper::get(helper, server) {
                Ok(Some(credentials)) => return Some(credentials),
                Ok(None) => {}
                Err(e) => tracing::warn!(registry, helper, "credential helper: {e}"),
            }
        }
        let auths = config.get("auths")?.as_object()?;
        let hosts = [
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ];
        let entry = hosts.iter().find_map(|h| auths.get(h)).or_else(|| {
            if hub {
                auths
                    .get("https://index.docker.io/v1/")
                    .or_else(|| auths.get("docker.io"))
            } else {
                None
            }
        })?;
        if let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()) {
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
            return Credentials::parse(std::str::from_utf8(&decoded).ok()?);
        }
        Some(Credentials {
            username: entry.get("username")?.as_str()?.into(),
            password: entry.get("password")?.as_str()?.into(),
        })
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, a)| (v, a))
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_string());
        rest = after.trim_start_matches([',', ' ']);
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into())
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="basic-realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = Credentials::parse("alice:s3cret:with:colons").unwrap();
        assert_eq!(c.password, "s3cret:with:colons");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
