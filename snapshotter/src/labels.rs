//! What containerd's clients tell a snapshotter about a layer being pulled, and
//! whether that layer belongs to a petrel image.
//!
//! Two sets of labels name the image:
//! - CRI (and `ctr-remote image rpull --use-containerd-labels`): image reference,
//!   manifest digest and layer digest under `containerd.io/snapshot/cri.`;
//! - `ctr-remote image rpull` without that flag (stargz-snapshotter's own labels):
//!   image reference and layer digest under `containerd.io/snapshot/remote/stargz.`,
//!   but no manifest digest. The reference is resolved once, and the manifest it
//!   names must list the layer, so the lazy mount is pinned to that manifest digest.
//!
//! A layer's role comes from its `containerd.io/snapshot/petrel.layer` annotation,
//! which both pass on.

use crate::error::{Result, SnapshotError};
use petrel_registry::oci::{ANNOTATION_SNAPSHOT_LAYER, ROLE_BLOB, ROLE_BOOTSTRAP};
use petrel_registry::{ImageRef, RegistryClient};
use std::collections::BTreeMap;

pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
pub const STARGZ_IMAGE_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_LAYER: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Set by the snapshotter on a lazy bootstrap snapshot: the pinned image it mounts
/// (`docker://HOST/REPO@sha256:…`), to remount it from.
pub const PETREL_IMAGE: &str = "containerd.io/snapshot/petrel.image";

/// What a layer being pulled is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteLayer {
    /// A petrel chunk blob: nothing to unpack.
    Blob,
    /// The bootstrap: the whole image is served lazily from this pinned image.
    Bootstrap { image: String },
}

/// Decides from the labels whether a layer is part of a petrel image. No image
/// labels, or no petrel role: `None` (an ordinary pull). Converted layers carry their
/// role as an annotation, which containerd passes on with the image labels, so an
/// ordinary layer costs no registry call (and needs no credentials here).
///
/// A petrel layer is verified before it is classified (`crate::provenance`): the
/// snapshot name containerd asks for (`target`, on top of `parent`) must be the chain
/// ID of the layer digests, and the layer must be what its role says in the manifest.
pub fn classify(
    labels: &BTreeMap<String, String>,
    target: &str,
    parent: Option<&str>,
    settings: &crate::config::Config,
    manifests: &ManifestCache,
) -> Result<Option<RemoteLayer>> {
    let (image, manifest_digest, layer) = match (
        labels.get(CRI_IMAGE_REF),
        labels.get(CRI_MANIFEST),
        labels.get(CRI_LAYER),
        labels.get(STARGZ_IMAGE_REF),
        labels.get(STARGZ_LAYER),
    ) {
        (Some(image), Some(manifest), Some(layer), ..) => (image, Some(manifest), layer),
        (.., Some(image), Some(layer)) => (image, None, layer),
        _ => return Ok(None),
    };
    let Some(role) = labels.get(ANNOTATION_SNAPSHOT_LAYER) else {
        return Ok(None);
    };
    if role != ROLE_BLOB && role != ROLE_BOOTSTRAP {
        return Err(SnapshotError::FailedPrecondition(format!(
            "layer {layer} of {image} has petrel role {role:?}, which this snapshotter does not know"
        )));
    }
    let unavailable = |e: petrel_registry::RegistryError| registry_failure(format!("cannot resolve {image}"), e);
    let image_ref = ImageRef::parse(image).map_err(unavailable)?;
    let client = RegistryClient::new(&image_ref.registry, &settings.client_options_for(&image_ref.registry)?)
        .map_err(unavailable)?;
    // By the digest containerd resolved (CRI), else by the reference, which must then
    // list the layer (the tag may have moved during the pull).
    let reference = manifest_digest.map_or(image_ref.reference(), String::as_str);
    let key = format!("{}/{}@{reference}", image_ref.registry, image_ref.repository);
    let (manifest, pinned) = match manifests.get(&key) {
        Some(found) => found,
        None => {
            let fetched = client
                .get_image_manifest(&image_ref.repository, reference, &petrel_registry::oci::host_platform())
                .map_err(unavailable)?;
            // Only what a digest names is immutable, so only that is kept.
            if reference.starts_with("sha256:") {
                manifests.put(key, fetched.clone());
            }
            fetched
        }
    };
    if manifest_digest.is_none() && !manifest.layers().iter().any(|l| l.digest().as_ref() == layer) {
        return Err(SnapshotError::FailedPrecondition(format!(
            "{image}: manifest {pinned} does not list layer {layer} (did the tag move during the pull?)"
        )));
    }
    let downloads = settings.cache_dir().join("downloads");
    crate::provenance::verify_remote_layer(
        &client,
        &image_ref.repository,
        &manifest,
        crate::provenance::PulledLayer {
            digest: layer,
            role,
            target,
            parent,
        },
        &downloads,
        &manifests.checked_blobs,
    )?;
    Ok(Some(if role == ROLE_BLOB {
        RemoteLayer::Blob
    } else {
        RemoteLayer::Bootstrap {
            image: format!("docker://{}/{}@{pinned}", image_ref.registry, image_ref.repository),
        }
    }))
}

/// A registry failure while verifying a pull: the registry cannot be reached
/// (`Unavailable`: the layer is then pulled the ordinary way) or it refused or
/// answered wrongly (`FailedPrecondition`).
pub fn registry_failure(doing: String, e: petrel_registry::RegistryError) -> SnapshotError {
    use petrel_registry::RegistryError::{GaveUp, Io, Status, Transport};
    let reason = format!("{doing}: {e}");
    match e {
        Transport { .. } | GaveUp { .. } | Io { .. } => SnapshotError::Unavailable(reason),
        Status { status, .. } if status >= 500 => SnapshotError::Unavailable(reason),
        _ => SnapshotError::FailedPrecondition(reason),
    }
}

/// Manifests fetched by digest during pulls (each layer of a pull needs its image's
/// manifest; fetched once, not once per layer). A digest names immutable bytes, which
/// were checked against it, so an entry never goes stale. Bounded by the manifests'
/// size, oldest dropped first: a registry's manifests may be up to 8 MiB each.
#[derive(Debug, Default)]
pub struct ManifestCache {
    entries: std::sync::Mutex<std::collections::VecDeque<(String, CachedManifest, usize)>>,
    /// Blob layers (`registry/repository@digest`) whose wrapping was checked: a
    /// digest names immutable bytes, so a check holds for good.
    pub checked_blobs: crate::provenance::CheckedBlobs,
}

type CachedManifest = (petrel_registry::oci::Manifest, String);

/// The most bytes (of the manifests' JSON) a `ManifestCache` keeps.
const CACHED_MANIFEST_BYTES: usize = 16 << 20;

impl ManifestCache {
    fn get(&self, key: &str) -> Option<CachedManifest> {
        let entries = self.entries.lock().ok()?;
        entries.iter().find(|(k, ..)| k == key).map(|(_, v, _)| v.clone())
    }

    fn put(&self, key: String, value: CachedManifest) {
        let bytes = serde_json::to_vec(&value.0).map_or(usize::MAX, |json| json.len() + key.len());
        if bytes > CACHED_MANIFEST_BYTES {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            while entries.iter().map(|(.., b)| b).sum::<usize>() + bytes > CACHED_MANIFEST_BYTES {
                entries.pop_front();
            }
            entries.push_back((key, value, bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(annotation_bytes: usize) -> CachedManifest {
        let manifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "c", "digest": petrel_registry::oci::sha256_digest(b"c"), "size": 1},
            "layers": [],
            "annotations": {"pad": "x".repeat(annotation_bytes)},
        }))
        .unwrap();
        (manifest, "sha256:m".into())
    }

    #[test]
    fn the_manifest_cache_is_bounded_by_bytes() {
        let cache = ManifestCache::default();
        for i in 0..40 {
            cache.put(format!("k{i}"), manifest(1 << 20));
        }
        let held: usize = cache.entries.lock().unwrap().iter().map(|(.., b)| b).sum();
        assert!(held <= CACHED_MANIFEST_BYTES, "{held}");
        assert!(
            cache.get("k39").is_some() && cache.get("k0").is_none(),
            "oldest dropped first"
        );
        cache.put("huge".into(), manifest(CACHED_MANIFEST_BYTES + 1));
        assert!(
            cache.get("huge").is_none(),
            "a manifest larger than the bound is not kept"
        );
    }
}
