//! Image references: registry references (`host[:port]/repo[:tag][@digest]`) and the
//! skopeo-style transports petrel accepts (`docker://`, `oci:`, `docker-archive:`,
//! `oci-archive:`).

use crate::error::{RegistryError, Result};
use std::path::PathBuf;

/// Docker Hub's registry host, used when a reference names none.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

/// An image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host` or `host:port`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `host[:port]/repo[:tag][@sha256:…]`; a reference without a registry
    /// host means Docker Hub (`library/` added to one-component names).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason| RegistryError::BadReference {
            reference: text.to_string(),
            reason,
        };
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    return Err(bad("digest must be sha256: and 64 lowercase hex digits"));
                }
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((first, path)) if is_registry_host(first) => (first.to_string(), path.to_string()),
            _ => (DOCKER_HUB.to_string(), rest.to_string()),
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p.to_string(), Some(t.to_string())),
            _ => (path, None),
        };
        let repository = if host == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let valid_component = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(bad("repository must be lowercase path components [a-z0-9._-]"));
        }
        if let Some(tag) = &tag {
            if tag.is_empty()
                || tag.len() > 128
                || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad("tag must be 1-128 characters [A-Za-z0-9._-]"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(ImageRef {
            registry: host,
            repository,
            tag,
            digest,
        })
    }

    /// The digest if given, else the tag: what to ask the registry for.
    pub fn reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Whether this registry is on the local machine (plain HTTP allowed).
    pub fn is_local(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, _)| h);
        host == "localhost" || host.starts_with("127.") || host == "[::1]"
    }
}

/// Whether the first path component names a registry host (`host.domain`,
/// `host:port` with a numeric port, or `localhost`), as Docker decides it.
fn is_registry_host(first: &str) -> bool {
    let (host, port) = match first.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (first, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    !host.is_empty() && (host.contains('.') || port.is_some() || host == "localhost")
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Where an image is, in skopeo's transport syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Registry(ImageRef),
    OciLayout { dir: PathBuf, tag: Option<String> },
    DockerArchive(PathBuf),
    OciArchive(PathBuf),
}

impl Location {
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason| RegistryError::BadReference {
            reference: text.to_string(),
            reason,
        };
        if let Some(rest) = text.strip_prefix("docker://") {
            return Ok(Location::Registry(ImageRef::parse(rest)?));
        }
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, Some(tag.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("oci: needs a directory"));
            }
            return Ok(Location::OciLayout { dir: dir.into(), tag });
        }
        if let Some(rest) = text.strip_prefix("docker-archive:") {
            return Ok(Location::DockerArchive(rest.into()));
        }
        if let Some(rest) = text.strip_prefix("oci-archive:") {
            return Ok(Location::OciArchive(rest.into()));
        }
        Err(bad("use docker://, oci:, docker-archive: or oci-archive:"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1"))
        );
        assert!(r.is_local());
        let r = ImageRef::parse("python").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference()),
            (DOCKER_HUB, "library/python", "latest")
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/x@{digest}")).unwrap();
        assert_eq!(r.reference(), digest);
        assert_eq!(r.tag, None);
        for bad in ["UPPER/case", "host:5000/", "x@sha256:abc", "x:bad/tag", "a//b"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_locations() {
        assert!(matches!(
            Location::parse("docker://localhost:5000/a:b").unwrap(),
            Location::Registry(_)
        ));
        assert_eq!(
            Location::parse("oci:/tmp/layout:v2").unwrap(),
            Location::OciLayout {
                dir: "/tmp/layout".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            Location::parse("oci:/tmp/layout").unwrap(),
            Location::OciLayout {
                dir: "/tmp/layout".into(),
                tag: None
            }
        );
        assert!(Location::parse("ftp://x").is_err());
    }
}
