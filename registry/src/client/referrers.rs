//! OCI 1.1 referrers: artifacts that point at an image manifest with `subject`
//! (signatures, SBOMs, and petrel's prefetch profiles). Looked up with the referrers
//! API (`GET /v2/<name>/referrers/<digest>`) and, for registries without it (Docker
//! Distribution 2.x, Debian's docker-registry), with the tag schema fallback: an
//! index tagged `sha256-<hex>` listing the referrers. Pushing sets `subject` and,
//! when the registry does not answer the referrers API, updates that index too.

use super::RegistryClient;
use crate::error::{RegistryError, Result};
use crate::oci::{
    annotation, canonical_json, descriptor, empty_index, image_manifest, is_media_type, sha256_digest, Descriptor,
    Index, Manifest, MediaType, OCI_INDEX, OCI_MANIFEST,
};
use std::collections::BTreeMap;

/// The artifact type of a petrel prefetch profile.
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.dev.petrel.profile.v1+json";
/// OCI's empty config (`{}`) of artifact manifests.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// When an artifact was made (RFC 3339); the newest of several referrers wins.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// The fallback tag of a subject digest: `sha256:abc…` → `sha256-abc…`.
pub fn fallback_tag(subject: &str) -> String {
    subject.replacen(':', "-", 1)
}

/// What a client knows of its registry's referrers API (`RegistryClient::referrers_api`).
pub(crate) const API_UNKNOWN: u8 = 0;
const API_PRESENT: u8 = 1;
const API_ABSENT: u8 = 2;

fn not_found(error: &RegistryError) -> bool {
    matches!(error, RegistryError::Status { status: 404, .. })
}

/// `+` and `/` of a media type, escaped for a query string.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl RegistryClient {
    /// A small JSON document at `path`.
    pub(crate) fn get_small_json(&self, path: &str, accept: &str) -> Result<Vec<u8>> {
        self.get_small(path, accept, path).map(|(bytes, _)| bytes)
    }

    /// Manifests of artifact type `artifact_type` whose `subject` is the manifest
    /// `subject` (a digest) in `repository`: by the referrers API, else by the tag
    /// schema fallback. None found is an empty list, not an error.
    pub fn referrers(&self, repository: &str, subject: &str, artifact_type: &str) -> Result<Vec<Descriptor>> {
        let bad = |what: String, e: serde_json::Error| RegistryError::BadContent {
            what,
            reason: e.to_string(),
        };
        let api = format!(
            "/v2/{repository}/referrers/{subject}?artifactType={}",
            query_escape(artifact_type)
        );
        let tag = fallback_tag(subject);
        let from_tag = || match self.get_manifest(repository, &tag) {
            Ok((bytes, _, _)) => serde_json::from_slice::<Index>(&bytes)
                .map(Some)
                .map_err(|e| bad(format!("referrers tag {repository}:{tag}"), e)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        };
        // A registry this client found without the API is asked by the tag
        // only; otherwise both are asked at once (one round trip, not two).
        let index: Option<Index> = if self.referrers_api.load(std::sync::atomic::Ordering::Relaxed) == API_ABSENT {
            from_tag()?
        } else {
            let (by_api, by_tag) = std::thread::scope(|scope| {
                let by_tag = scope.spawn(from_tag);
                (
                    self.get_small_json(&api, OCI_INDEX),
                    by_tag.join().unwrap_or_else(|_| Ok(None)),
                )
            });
            match by_api {
                Ok(bytes) => {
                    self.referrers_api
                        .store(API_PRESENT, std::sync::atomic::Ordering::Relaxed);
                    Some(
                        serde_json::from_slice(&bytes)
                            .map_err(|e| bad(format!("referrers of {repository}@{subject}"), e))?,
                    )
                }
                // Without the API (404, or 400/405 from some registries): the fallback tag.
                Err(RegistryError::Status {
                    status: 400 | 404 | 405,
                    ..
                }) => {
                    self.referrers_api
                        .store(API_ABSENT, std::sync::atomic::Ordering::Relaxed);
                    by_tag?
                }
                Err(e) => return Err(e),
            }
        };
        let Some(index) = index else {
            return Ok(Vec::new());
        };
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                is_media_type(d.artifact_type(), artifact_type)
                    && *d.digest().algorithm() == oci_spec::image::DigestAlgorithm::Sha256
            })
            .cloned()
            .collect())
    }

    /// The newest referrer of `artifact_type` (by its created annotation; the last
    /// listed of equals), if any.
    pub fn newest_referrer(&self, repository: &str, subject: &str, artifact_type: &str) -> Result<Option<Descriptor>> {
        let mut found = self.referrers(repository, subject, artifact_type)?;
        found.sort_by(|a, b| annotation(a, ANNOTATION_CREATED).cmp(&annotation(b, ANNOTATION_CREATED)));
        Ok(found.pop())
    }

    /// The manifest of artifact `digest`.
    pub fn artifact_manifest(&self, repository: &str, digest: &str) -> Result<Manifest> {
        let (bytes, _, _) = self.get_manifest(repository, digest)?;
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadContent {
            what: format!("artifact {repository}@{digest}"),
            reason: e.to_string(),
        })
    }

    /// The single blob of artifact manifest `digest` (at most `max_bytes`, verified).
    pub fn artifact_content(&self, repository: &str, digest: &str, max_bytes: u64) -> Result<(Manifest, Vec<u8>)> {
        let manifest = self.artifact_manifest(repository, digest)?;
        let [layer] = manifest.layers().as_slice() else {
            return Err(RegistryError::BadContent {
                what: format!("artifact {repository}@{digest}"),
                reason: format!("{} blobs, expected one", manifest.layers().len()),
            });
        };
        if layer.size() > max_bytes {
            return Err(RegistryError::BadContent {
                what: format!("artifact {repository}@{digest}"),
                reason: format!("its blob of {} bytes is larger than {max_bytes}", layer.size()),
            });
        }
        let content = self.get_blob_verified(repository, layer.digest().as_ref(), layer.size())?;
        Ok((manifest, content))
    }

    /// Pushes `content` as an artifact of `artifact_type` (one blob of media type
    /// `artifact_type`) that refers to `subject`; returns the artifact manifest's
    /// digest. See [`Self::push_artifact`].
    pub fn push_referrer(
        &self,
        repository: &str,
        subject: &Descriptor,
        artifact_type: &str,
        content: &[u8],
        annotations: BTreeMap<String, String>,
    ) -> Result<String> {
        let layers = || -> Result<Vec<Descriptor>> {
            let blob = self.push_blob_bytes(repository, content)?;
            Ok(vec![descriptor(artifact_type, &blob, content.len() as u64)?])
        };
        self.push_artifact(repository, subject, artifact_type, layers, annotations)
    }

    /// Pushes an artifact of `artifact_type` referring to `subject` (which need
    /// not be pushed yet), whose blobs `layers` pushes and names; returns the
    /// artifact manifest's digest. While `layers` runs, the empty config goes up
    /// and the registry is asked whether it has the referrers API and what its
    /// fallback index holds. Registries without the API get the fallback index
    /// updated (read, extended, written back: two nodes pushing at once may lose
    /// one entry, never corrupt the index).
    pub fn push_artifact(
        &self,
        repository: &str,
        subject: &Descriptor,
        artifact_type: &str,
        layers: impl FnOnce() -> Result<Vec<Descriptor>> + Send,
        annotations: BTreeMap<String, String>,
    ) -> Result<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let tag = fallback_tag(subject.digest().as_ref());
        let api = format!("/v2/{repository}/referrers/{}", subject.digest());
        let fallback_index = || match self.get_manifest(repository, &tag) {
            Ok((bytes, _, _)) => serde_json::from_slice::<Index>(&bytes).map_err(|e| RegistryError::BadContent {
                what: format!("referrers tag {repository}:{tag}"),
                reason: e.to_string(),
            }),
            Err(e) if not_found(&e) => Ok(empty_index()),
            Err(e) => Err(e),
        };
        let (layers, empty, api_present, index) = std::thread::scope(|scope| {
            let empty = scope.spawn(|| self.push_blob_bytes(repository, b"{}"));
            let api_present = scope.spawn(|| match self.referrers_api.load(Relaxed) {
                API_PRESENT => true,
                API_ABSENT => false,
                _ => {
                    // A registry with the API lists a manifest under its subject
                    // as it is pushed; one without answers 404 (or 400, 405).
                    let present = self.get_small_json(&api, OCI_INDEX).is_ok();
                    self.referrers_api
                        .store(if present { API_PRESENT } else { API_ABSENT }, Relaxed);
                    present
                }
            });
            let index = (self.referrers_api.load(Relaxed) != API_PRESENT).then(|| scope.spawn(fallback_index));
            let layers = layers();
            let joined = |what| RegistryError::BadContent {
                what,
                reason: "its thread panicked".into(),
            };
            (
                layers,
                empty.join().unwrap_or_else(|_| Err(joined("the empty config".into()))),
                api_present.join().unwrap_or(false),
                index.map(|i| i.join().unwrap_or_else(|_| Err(joined(format!("referrers tag {tag}"))))),
            )
        });
        let mut manifest = image_manifest(descriptor(EMPTY_MEDIA_TYPE, &empty?, 2)?, layers?);
        manifest.set_artifact_type(Some(MediaType::from(artifact_type)));
        manifest.set_subject(Some(Descriptor::new(
            subject.media_type().clone(),
            subject.size(),
            subject.digest().clone(),
        )));
        manifest.set_annotations(crate::oci::annotations(annotations.clone()));
        let bytes = canonical_json(&manifest);
        let digest = sha256_digest(&bytes);
        self.put_manifest(repository, &digest, OCI_MANIFEST, &bytes)?;
        if !api_present {
            let mut index = match index {
                Some(index) => index?,
                None => fallback_index()?,
            };
            let mut entry = descriptor(OCI_MANIFEST, &digest, bytes.len() as u64)?;
            entry.set_artifact_type(Some(MediaType::from(artifact_type)));
            entry.set_annotations(crate::oci::annotations(annotations));
            let mut manifests: Vec<Descriptor> = index
                .manifests()
                .iter()
                .filter(|d| d.digest().as_ref() != digest)
                .cloned()
                .collect();
            manifests.push(entry);
            index.set_manifests(manifests);
            let index_bytes = canonical_json(&index);
            self.put_manifest(repository, &tag, OCI_INDEX, &index_bytes)?;
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fallback_tags_and_escaped_types() {
        assert_eq!(super::fallback_tag("sha256:ab12"), "sha256-ab12");
        assert_eq!(
            super::query_escape(super::PROFILE_ARTIFACT_TYPE),
            "application%2Fvnd.dev.petrel.profile.v1%2Bjson"
        );
    }
}
