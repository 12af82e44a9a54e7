//! What registry references resolved to, kept in the node cache with the bootstraps
//! so that a mount can start again with the registry gone (an edge node that lost
//! its uplink, a daemon restarted after an OOM kill or a power cut).
//!
//! A record is written only after a resolution succeeded online and its bootstrap was
//! verified. With the registry unreachable, a reference by digest always finds its
//! record; a tag finds the digest it last resolved to (logged as not refreshed).
//! Records live in `<cache>/resolved/` (0700, like the rest of the cache).

use crate::error::{DaemonError, Result};
use petrel_registry::oci::Platform;
use petrel_registry::ImageRef;
use std::path::{Path, PathBuf};

/// One resolution of a reference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resolution {
    /// The reference as resolved (`host/repo:tag` or `host/repo@digest`).
    pub reference: String,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// The bootstrap layer's digest (its bootstrap is in `<cache>/downloads/`).
    pub bootstrap_digest: String,
    /// When (seconds since the epoch).
    pub resolved_at: u64,
}

/// The most bytes a record may have (they are small; anything larger is not ours).
const MAX_RECORD_BYTES: u64 = 64 << 10;

fn key(image: &ImageRef, reference: &str, platform: &Platform) -> String {
    format!(
        "{}/{}@{reference}#{}",
        image.registry,
        image.repository,
        petrel_registry::oci::platform_text(platform)
    )
}

fn record_path(cache_dir: &Path, key: &str) -> PathBuf {
    let digest = petrel_format::codec::chunk_digest(key.as_bytes());
    cache_dir
        .join("resolved")
        .join(format!("{}.json", hex::encode(&digest[..16])))
}

/// Remembers `resolution` for the reference `image` was given as and for its
/// manifest digest.
pub fn remember(cache_dir: &Path, image: &ImageRef, platform: &Platform, resolution: &Resolution) -> Result<()> {
    let dir = cache_dir.join("resolved");
    crate::store::create_private_dir(&dir)?;
    let bytes = serde_json::to_vec_pretty(resolution).expect("serializable");
    for reference in [image.reference(), resolution.manifest_digest.as_str()] {
        let path = record_path(cache_dir, &key(image, reference, platform));
        let mut temp =
            tempfile::NamedTempFile::new_in(&dir).map_err(DaemonError::io("create temporary file in", &dir))?;
        std::io::Write::write_all(&mut temp, &bytes).map_err(DaemonError::io("write", &path))?;
        temp.persist(&path)
            .map_err(|e| DaemonError::io("rename to", &path)(e.error))?;
    }
    Ok(())
}

/// The last resolution of `image` on this node, if any.
pub fn recall(cache_dir: &Path, image: &ImageRef, platform: &Platform) -> Option<Resolution> {
    let path = record_path(cache_dir, &key(image, image.reference(), platform));
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_RECORD_BYTES), &mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolution_is_found_by_its_reference_and_its_digest() {
        let cache = tempfile::tempdir().unwrap();
        let image = ImageRef::parse("reg.example:5000/team/app:v1").unwrap();
        let platform = petrel_registry::oci::host_platform();
        assert_eq!(recall(cache.path(), &image, &platform), None);
        let resolution = Resolution {
            reference: image.to_string(),
            manifest_digest: format!("sha256:{}", "a".repeat(64)),
            bootstrap_digest: format!("sha256:{}", "b".repeat(64)),
            resolved_at: 1,
        };
        remember(cache.path(), &image, &platform, &resolution).unwrap();
        assert_eq!(recall(cache.path(), &image, &platform).as_ref(), Some(&resolution));
        let pinned = ImageRef::parse(&format!("reg.example:5000/team/app@sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(recall(cache.path(), &pinned, &platform), Some(resolution));
        let other = ImageRef::parse("reg.example:5000/team/app:v2").unwrap();
        assert_eq!(recall(cache.path(), &other, &platform), None);
    }
}
