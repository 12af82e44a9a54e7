//! Images mounted straight from a registry: the manifest names the bootstrap
//! layer (its sha256 pinned there), which is fetched and verified before it is
//! mapped; chunks are then read with Range requests through the registry client.

use crate::backend::Backend;
use crate::error::{DaemonError, Result};
use petrel_registry::oci::{annotation, bootstrap_layer, Platform, ANNOTATION_BOOTSTRAP_BLAKE3};
use petrel_registry::{ImageRef, RegistryClient};

fn petrel_layer_is_blob(layer: &petrel_registry::oci::Descriptor) -> bool {
    petrel_registry::oci::petrel_role(layer) == Some(petrel_registry::oci::ROLE_BLOB)
}
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::bootstrap_fetch::MAX_BOOTSTRAP_BYTES;

/// Blobs of one repository, read by Range requests.
#[derive(Debug)]
pub struct RegistryBackend {
    client: Arc<RegistryClient>,
    repository: String,
}

impl RegistryBackend {
    pub fn new(client: Arc<RegistryClient>, repository: &str) -> Self {
        RegistryBackend {
            client,
            repository: repository.into(),
        }
    }
}

/// Readers take the fastest source now; background work may wait for a mirror.
fn patience(purpose: crate::backend::ReadPurpose) -> petrel_registry::client::MirrorPatience {
    match purpose {
        crate::backend::ReadPurpose::Reader => petrel_registry::client::MirrorPatience::None,
        crate::backend::ReadPurpose::Background => petrel_registry::client::MirrorPatience::WaitWhileItFills,
    }
}

impl Backend for RegistryBackend {
    fn read_range(
        &self,
        digest: &[u8; 32],
        offset: u64,
        len: u64,
        purpose: crate::backend::ReadPurpose,
    ) -> std::io::Result<Vec<u8>> {
        let digest = format!("sha256:{}", hex::encode(digest));
        self.client
            .get_blob_range_with(&self.repository, &digest, offset, len, patience(purpose))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn stream_range(
        &self,
        digest: &[u8; 32],
        offset: u64,
        len: u64,
        purpose: crate::backend::ReadPurpose,
        sink: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<()> {
        let digest = format!("sha256:{}", hex::encode(digest));
        self.client
            .stream_blob_range(&self.repository, &digest, offset, len, patience(purpose), sink)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn stream_ranges(
        &self,
        digest: &[u8; 32],
        ranges: &[(u64, u64)],
        purpose: crate::backend::ReadPurpose,
        sink: &mut dyn FnMut(usize, &[u8]),
    ) -> std::io::Result<()> {
        let digest = format!("sha256:{}", hex::encode(digest));
        self.client
            .stream_blob_ranges(&self.repository, &digest, ranges, patience(purpose), sink)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn describe(&self) -> String {
        format!("registry:{}/{}", self.client.registry(), self.repository)
    }
}

/// A petrel image resolved in a registry, its bootstrap downloaded and verified.
#[derive(Debug)]
pub struct RemoteImage {
    pub bootstrap_path: PathBuf,
    pub manifest_digest: String,
    pub backend: Arc<RegistryBackend>,
}

impl RegistryBackend {
    /// The client and repository this backend reads from.
    pub fn registry(&self) -> (&Arc<RegistryClient>, &str) {
        (&self.client, &self.repository)
    }
}

/// The newest prefetch profile published for the image manifest `manifest_digest`
/// (an OCI referrer of artifact type `PROFILE_ARTIFACT_TYPE`), fetched, bounded and
/// parsed. A profile recorded on another image (its `image` field names another
/// bootstrap) is refused.
pub fn find_profile(
    client: &RegistryClient,
    repository: &str,
    manifest_digest: &str,
    bootstrap_digest: &[u8; 32],
) -> Result<Option<(String, petrel_format::profile::Profile)>> {
    use petrel_registry::client::referrers::PROFILE_ARTIFACT_TYPE;
    let Some(found) = client.newest_referrer(repository, manifest_digest, PROFILE_ARTIFACT_TYPE)? else {
        return Ok(None);
    };
    let (_, content) = client.artifact_content(
        repository,
        found.digest().as_ref(),
        crate::profile_prefetch::MAX_PROFILE_BYTES,
    )?;
    let bad = |reason: String| DaemonError::Invalid(format!("profile {repository}@{}: {reason}", found.digest()));
    let profile = petrel_format::profile::Profile::parse(&content).map_err(bad)?;
    if profile
        .image
        .as_ref()
        .is_some_and(|image| *image != hex::encode(bootstrap_digest))
    {
        return Err(bad("it was recorded on another image".into()));
    }
    Ok(Some((found.digest().to_string(), profile)))
}

fn invalid(image: &ImageRef, reason: String) -> DaemonError {
    DaemonError::Invalid(format!("{image}: {reason}"))
}

/// Resolves `image` (an index picks `platform`), fetches its bootstrap into
/// `<cache_dir>/downloads/`, and checks it against the manifest before anything maps it.
///
/// A digest reference resolved on this node before starts from the cache without
/// asking the registry. A tag is resolved again; with the registry unreachable, its
/// last resolution kept in the cache (`crate::resolved`) is used when there is one.
/// Either way, reads of chunks not cached fail until the registry is back.
pub fn resolve(
    client: Arc<RegistryClient>,
    image: &ImageRef,
    cache_dir: &Path,
    platform: &Platform,
) -> Result<RemoteImage> {
    // A digest names immutable bytes: once resolved and verified on this node, it
    // needs no registry round trip (remounts are instant, with or without a link).
    if image.digest.is_some() {
        if let Some(cached) = cached_resolution(Arc::clone(&client), image, cache_dir, platform) {
            return Ok(cached);
        }
    }
    match resolve_online(Arc::clone(&client), image, cache_dir, platform) {
        Ok((remote, bootstrap_digest)) => {
            let resolution = crate::resolved::Resolution {
                reference: image.to_string(),
                manifest_digest: remote.manifest_digest.clone(),
                bootstrap_digest,
                resolved_at: crate::resolved::now(),
            };
            if let Err(e) = crate::resolved::remember(cache_dir, image, platform, &resolution) {
                tracing::warn!(image = %image, "cannot keep the resolution for offline restarts: {e}");
            }
            Ok(remote)
        }
        Err(e) if is_unreachable(&e) => match cached_resolution(client, image, cache_dir, platform) {
            Some(cached) => {
                tracing::warn!(
                    image = %image,
                    manifest = %cached.manifest_digest,
                    "the registry is unreachable ({e}): the tag could not be refreshed; starting from its last resolution"
                );
                Ok(cached)
            }
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Whether `error` says the registry could not be reached (rather than refused).
fn is_unreachable(error: &DaemonError) -> bool {
    use petrel_registry::RegistryError;
    match error {
        DaemonError::Registry(RegistryError::Transport { .. } | RegistryError::GaveUp { .. }) => true,
        DaemonError::Registry(RegistryError::Status { status, .. }) => *status >= 500,
        _ => false,
    }
}

/// `image` from its last resolution and the bootstrap cached then, if both are here.
fn cached_resolution(
    client: Arc<RegistryClient>,
    image: &ImageRef,
    cache_dir: &Path,
    platform: &Platform,
) -> Option<RemoteImage> {
    let resolution = crate::resolved::recall(cache_dir, image, platform)?;
    let path = cache_dir
        .join("downloads")
        .join(resolution.bootstrap_digest.trim_start_matches("sha256:"));
    if let Err(e) = crate::image::MappedImage::open(&path, cache_dir, &image.to_string()) {
        tracing::warn!(image = %image, "the cached bootstrap cannot be used: {e}");
        return None;
    }
    Some(RemoteImage {
        bootstrap_path: path,
        manifest_digest: resolution.manifest_digest,
        backend: Arc::new(RegistryBackend::new(client, &image.repository)),
    })
}

/// `resolve` with the registry: the manifest, then the bootstrap, downloaded and
/// verified; also returns the bootstrap layer's digest.
fn resolve_online(
    client: Arc<RegistryClient>,
    image: &ImageRef,
    cache_dir: &Path,
    platform: &Platform,
) -> Result<(RemoteImage, String)> {
    let (manifest, digest) = client
        .get_image_manifest(&image.repository, image.reference(), platform)
        .map_err(|e| match e {
            petrel_registry::RegistryError::BadContent { what, reason } => {
                invalid(image, format!("bad {what}: {reason}"))
            }
            other => other.into(),
        })?;
    let bootstrap = bootstrap_layer(&manifest)
        .ok_or_else(|| invalid(image, "not a petrel image: the manifest has no bootstrap layer".into()))?;
    // Fetched once per node into downloads/, checked against the sha256 pinned in
    // the manifest, gunzipped and unwrapped on disk: never held in memory.
    let fetched = crate::bootstrap_fetch::fetch(&client, &image.repository, bootstrap, &cache_dir.join("downloads"))
        .map_err(|e| match e {
            DaemonError::Invalid(reason) => invalid(image, reason),
            other => other,
        })?;
    let path = fetched.path;
    let mapped = crate::image::MappedImage::open(&path, cache_dir, &image.to_string()).map_err(|e| {
        // Never kept: the next attempt fetches it again.
        let _ = std::fs::remove_file(&path);
        invalid(image, format!("bootstrap {}: {e}", bootstrap.digest()))
    })?;
    let opened = mapped.bootstrap();
    if let Some(expected) = annotation(bootstrap, ANNOTATION_BOOTSTRAP_BLAKE3) {
        if expected != hex::encode(opened.superblock().digest) {
            return Err(invalid(
                image,
                format!(
                    "bootstrap {} does not carry the blake3 digest its annotation names",
                    bootstrap.digest()
                ),
            ));
        }
    }
    let listed: Vec<&str> = manifest
        .layers()
        .iter()
        .filter(|l| petrel_layer_is_blob(l))
        .map(|l| l.digest().as_ref())
        .collect();
    for blob in opened.blobs() {
        let blob = blob?;
        if !listed.contains(&blob.oci_digest().as_str()) {
            return Err(invalid(
                image,
                format!(
                    "bootstrap needs blob {} that the manifest does not list",
                    blob.oci_digest()
                ),
            ));
        }
    }
    Ok((
        RemoteImage {
            bootstrap_path: path,
            manifest_digest: digest,
            backend: Arc::new(RegistryBackend::new(client, &image.repository)),
        },
        bootstrap.digest().to_string(),
    ))
}
