//! Which name a petrel layer may be committed under.
//!
//! containerd names a layer's snapshot by the chain ID it computes from the image
//! config's `rootfs.diff_ids`, and skips every later layer whose chain ID already
//! exists. For a remote snapshot nothing is ever unpacked, so nothing checks those
//! diff_ids: the image author chooses the names. An image claiming another image's
//! diff_ids would then be committed under that image's names, and a later pull of the
//! victim (or of any image sharing the claimed base layer) would run the attacker's
//! files.
//!
//! So the snapshotter commits a petrel layer only under the chain ID it derives from
//! what it verified itself: petrel layers are uncompressed tars, so each layer's
//! manifest digest is its diff_id. The manifest is fetched by its pinned digest (and
//! checked against it), the layer must be listed in it with its petrel role and an
//! uncompressed media type, and:
//! - a blob layer must be petrel's exact one-entry tar (its header and trailer are read
//!   by two small Range requests), so a real layer's digest cannot be committed as an
//!   empty petrel blob;
//! - a bootstrap layer must be the manifest's bootstrap, the one the mount daemon
//!   verifies byte for byte against that digest before it serves anything.

use crate::error::{Result, SnapshotError};
use petrel_format::layer_tar;
use petrel_registry::oci::{self, Descriptor, Manifest, ROLE_BLOB, ROLE_BOOTSTRAP};
use petrel_registry::RegistryClient;

/// Media types whose digest is the diff_id (the layer is not compressed).
const UNCOMPRESSED_LAYER_TYPES: [&str; 2] = [oci::OCI_LAYER_TAR, "application/vnd.docker.image.rootfs.diff.tar"];

/// containerd's chain ID (`identity.ChainID`): the first layer's diff_id, then
/// `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(parent) => oci::sha256_digest(format!("{parent} {diff_id}").as_bytes()),
    }
}

/// The chain ID a snapshot name stands for. containerd's metadata store names the
/// snapshots it commits `<namespace>/<id>/<chain ID>`; remote layers are committed
/// under the bare chain ID (`containerd.io/snapshot.ref`). Chain IDs hold no `/`.
pub fn chain_id_of(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// Refuses `target` (the name containerd asks for) unless it names the chain ID of
/// `parent` (a snapshot committed under a verified name) and `diff_id`.
pub fn check_chain_id(target: &str, parent: Option<&str>, diff_id: &str, what: &str) -> Result<()> {
    let derived = chain_id(parent.map(chain_id_of), diff_id);
    if derived == chain_id_of(target) {
        return Ok(());
    }
    Err(SnapshotError::FailedPrecondition(format!(
        "refusing {what}: containerd names its snapshot {target}, but the chain ID of its layer digests is {derived}; \
         the image config's rootfs.diff_ids do not match its layers"
    )))
}

/// The descriptor of `layer` in `manifest`, which must carry petrel role `role` and an
/// uncompressed media type.
pub fn petrel_layer<'m>(manifest: &'m Manifest, layer: &str, role: &str, image: &str) -> Result<&'m Descriptor> {
    let refuse =
        |reason: String| SnapshotError::FailedPrecondition(format!("refusing layer {layer} of {image}: {reason}"));
    let descriptor = manifest
        .layers()
        .iter()
        .find(|d| d.digest().as_ref() == layer)
        .ok_or_else(|| refuse("the image's manifest does not list it".into()))?;
    if oci::petrel_role(descriptor) != Some(role) {
        return Err(refuse(format!(
            "its manifest entry has petrel role {:?}, not {role:?}",
            oci::petrel_role(descriptor)
        )));
    }
    // A gzipped bootstrap's diff_id is learnt by fetching it (`verify_remote_layer`).
    let media_type = descriptor.media_type().as_ref();
    let gzipped_bootstrap = role == ROLE_BOOTSTRAP && media_type == oci::OCI_LAYER_GZIP;
    if !gzipped_bootstrap && !UNCOMPRESSED_LAYER_TYPES.contains(&media_type) {
        return Err(refuse(format!(
            "media type {media_type:?} is not an uncompressed tar, so its digest is not its diff_id"
        )));
    }
    if role == ROLE_BOOTSTRAP && oci::bootstrap_layer(manifest).map(|d| d.digest().as_ref()) != Some(layer) {
        return Err(refuse("it is not the bootstrap the image's manifest mounts".into()));
    }
    Ok(descriptor)
}

/// Checks by two Range requests that blob layer `descriptor` is petrel's exact
/// one-entry tar of `petrel/blob`: its header announces the size the descriptor
/// implies, and the bytes after the data are zero.
pub fn check_blob_wrapping(client: &RegistryClient, repository: &str, descriptor: &Descriptor) -> Result<()> {
    let (digest, layer_size) = (descriptor.digest().as_ref(), descriptor.size());
    let refuse = |reason: String| {
        SnapshotError::FailedPrecondition(format!("refusing blob layer {digest} of {repository}: {reason}"))
    };
    let fetch = |offset: u64, len: u64| {
        client
            .get_blob_range(repository, digest, offset, len)
            .map_err(|e| SnapshotError::Unavailable(format!("reading blob layer {digest}: {e}")))
    };
    if layer_size < layer_tar::layer_len(0) {
        return Err(refuse(format!("{layer_size} bytes is too short for a petrel blob")));
    }
    // Header and tail in parallel (one round trip): whatever the data size, the
    // padding and end-of-archive blocks lie in the layer's last 1535 bytes.
    let tail_len = MAX_TRAILER.min(layer_size);
    let tail_start = layer_size - tail_len;
    let (header, tail) = std::thread::scope(|scope| {
        let tail = scope.spawn(|| fetch(tail_start, tail_len));
        let header = fetch(0, layer_tar::DATA_OFFSET);
        (header, tail.join().expect("the tail fetch does not panic"))
    });
    let size = layer_tar::data_size(layer_tar::BLOB_ENTRY, &header?).map_err(|e| refuse(e.to_string()))?;
    if layer_tar::layer_len(size) != layer_size {
        return Err(refuse(format!(
            "its header announces {size} bytes, so the layer must be {} bytes, but the manifest says {layer_size}",
            layer_tar::layer_len(size),
        )));
    }
    let zeros_from = (layer_tar::DATA_OFFSET + size).saturating_sub(tail_start) as usize;
    if tail?.get(zeros_from..).is_none_or(|t| t.iter().any(|b| *b != 0)) {
        return Err(refuse("bytes after the blob are not zero".into()));
    }
    Ok(())
}

/// The most bytes after a blob's data: padding to a block, then two zero blocks.
const MAX_TRAILER: u64 = 511 + 1024;

/// A layer containerd is pulling: its digest and petrel role, and the snapshot name
/// containerd asks for (`target`, on top of `parent`).
#[derive(Debug, Clone, Copy)]
pub struct PulledLayer<'a> {
    pub digest: &'a str,
    pub role: &'a str,
    pub target: &'a str,
    pub parent: Option<&'a str>,
}

/// Verifies a petrel layer being pulled: `target` must be its chain ID, and the layer
/// must be what its role says in `manifest` (pinned by digest). A gzipped bootstrap
/// layer is fetched into `downloads` (where its mount daemon will find it) to learn
/// its diff_id.
pub fn verify_remote_layer(
    client: &RegistryClient,
    repository: &str,
    manifest: &Manifest,
    layer: PulledLayer,
    downloads: &std::path::Path,
    checked: &CheckedBlobs,
) -> Result<()> {
    let PulledLayer {
        digest,
        role,
        target,
        parent,
    } = layer;
    let image = format!("{}/{repository}", client.registry());
    let descriptor = petrel_layer(manifest, digest, role, &image)?;
    let what = format!("{role} layer {digest} of {image}");
    if descriptor.media_type().as_ref() == oci::OCI_LAYER_GZIP {
        let fetched = petrel_fuse_daemon::bootstrap_fetch::fetch(client, repository, descriptor, downloads).map_err(
            |e| match e {
                petrel_fuse_daemon::error::DaemonError::Registry(e) => {
                    crate::labels::registry_failure(format!("fetching {what}"), e)
                }
                other => SnapshotError::FailedPrecondition(format!("refusing {what}: {other}")),
            },
        )?;
        check_chain_id(target, parent, &fetched.diff_id, &what)?;
    } else {
        check_chain_id(target, parent, digest, &what)?;
    }
    if role == ROLE_BLOB {
        checked.check(client, repository, manifest, descriptor)?;
    }
    Ok(())
}

/// Blob layers whose wrapping was checked (`registry/repository@digest`). The first
/// blob layer of a manifest checked has every blob layer of that manifest checked
/// at once, in parallel, so that a pull of an image of many blobs pays about one
/// round trip for them all, not one per layer. Bounded: beyond
/// [`MAX_CHECKED_BLOBS`] entries the set starts again.
#[derive(Debug, Default)]
pub struct CheckedBlobs {
    checked: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Most blob layers remembered as checked.
pub const MAX_CHECKED_BLOBS: usize = 100_000;
/// Other blob layers of a manifest checked ahead with the first (a stranger's
/// manifest may list thousands; the rest are checked at their own Prepare).
const MAX_CHECKED_AHEAD: usize = 64;
/// Blob layers checked at once.
const PARALLEL_CHECKS: usize = 8;

impl CheckedBlobs {
    fn key(client: &RegistryClient, repository: &str, digest: &str) -> String {
        format!("{}/{repository}@{digest}", client.registry())
    }

    fn is_checked(&self, key: &str) -> bool {
        self.checked.lock().is_ok_and(|c| c.contains(key))
    }

    /// Checks `descriptor` (a blob layer of `manifest`), and with it every blob
    /// layer of `manifest` not checked yet.
    pub fn check(
        &self,
        client: &RegistryClient,
        repository: &str,
        manifest: &Manifest,
        descriptor: &Descriptor,
    ) -> Result<()> {
        if self.is_checked(&Self::key(client, repository, descriptor.digest().as_ref())) {
            return Ok(());
        }
        let mut pending: Vec<&Descriptor> = vec![descriptor];
        pending.extend(
            manifest
                .layers()
                .iter()
                .filter(|d| {
                    d.digest() != descriptor.digest()
                        && oci::petrel_role(d) == Some(ROLE_BLOB)
                        && UNCOMPRESSED_LAYER_TYPES.contains(&d.media_type().as_ref())
                        && !self.is_checked(&Self::key(client, repository, d.digest().as_ref()))
                })
                .take(MAX_CHECKED_AHEAD),
        );
        pending.dedup_by(|a, b| a.digest() == b.digest());
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            pending
                .chunks(PARALLEL_CHECKS)
                .flat_map(|batch| {
                    let handles: Vec<_> = batch
                        .iter()
                        .map(|d| scope.spawn(move || check_blob_wrapping(client, repository, d)))
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err(SnapshotError::Unavailable("a blob check panicked".into())))
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        });
        if let Ok(mut checked) = self.checked.lock() {
            if checked.len() + pending.len() > MAX_CHECKED_BLOBS {
                checked.clear();
            }
            for (d, result) in pending.iter().zip(&results) {
                if result.is_ok() {
                    checked.insert(Self::key(client, repository, d.digest().as_ref()));
                }
            }
        }
        results.into_iter().next().expect("the layer itself was checked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest named by `name` (the OCI types take real digests only).
    fn digest(name: &str) -> String {
        oci::sha256_digest(name.as_bytes())
    }

    fn descriptor(name: &str, role: &str, media_type: &str) -> Descriptor {
        let mut descriptor = oci::descriptor(media_type, &digest(name), 2048).unwrap();
        descriptor.set_annotations(oci::annotations(oci::petrel_layer_annotations(role)));
        descriptor
    }

    fn manifest(layers: Vec<Descriptor>) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": oci::OCI_CONFIG, "digest": digest("c"), "size": 2},
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn chain_ids_are_containerds() {
        let a = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
        let b = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
        assert_eq!(chain_id(None, a), a);
        assert_eq!(chain_id(Some(a), b), oci::sha256_digest(format!("{a} {b}").as_bytes()));
        assert!(check_chain_id(a, None, a, "x").is_ok());
        let err = check_chain_id(b, None, a, "blob layer x").unwrap_err().to_string();
        assert!(err.contains("rootfs.diff_ids do not match") && err.contains(b), "{err}");
        assert!(check_chain_id(&chain_id(Some(a), b), Some(b), b, "x").is_err());
        // containerd's own commits are named <namespace>/<id>/<chain ID>.
        let committed = format!("k8s.io/7/{}", chain_id(Some(a), b));
        assert!(check_chain_id(&committed, Some(&format!("k8s.io/6/{a}")), b, "x").is_ok());
        assert!(check_chain_id(&committed, Some("k8s.io/6/sha256:other"), b, "x").is_err());
    }

    #[test]
    fn a_layer_must_be_listed_with_its_role_and_uncompressed() {
        let m = manifest(vec![
            descriptor("blob", ROLE_BLOB, oci::OCI_LAYER_TAR),
            descriptor("gz", ROLE_BLOB, oci::OCI_LAYER_GZIP),
            descriptor("boot", ROLE_BOOTSTRAP, oci::OCI_LAYER_TAR),
            descriptor("boot2", ROLE_BOOTSTRAP, oci::OCI_LAYER_TAR),
        ]);
        assert!(petrel_layer(&m, &digest("blob"), ROLE_BLOB, "i").is_ok());
        assert!(petrel_layer(&m, &digest("boot"), ROLE_BOOTSTRAP, "i").is_ok());
        let refused = |layer: &str, role: &str| petrel_layer(&m, &digest(layer), role, "i").unwrap_err().to_string();
        assert!(refused("none", ROLE_BLOB).contains("does not list"));
        assert!(refused("blob", ROLE_BOOTSTRAP).contains("role"));
        assert!(refused("gz", ROLE_BLOB).contains("not an uncompressed tar"));
        assert!(refused("boot2", ROLE_BOOTSTRAP).contains("not the bootstrap"));
        let mut no_role = descriptor("plain", ROLE_BLOB, oci::OCI_LAYER_TAR);
        no_role.set_annotations(None);
        let m = manifest(vec![no_role]);
        assert!(petrel_layer(&m, &digest("plain"), ROLE_BLOB, "i").is_err());
    }
}
