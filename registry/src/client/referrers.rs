//! OCI 1.1 referrers: artifacts that point at an image manifest with `subject`
//! (signatures, SBOMs, and petrel's prefetch profiles). Looked up with the referrers
//! API (`GET /v2/<name>/referrers/<digest>`) and, for registries without it (Docker
//! Distribution 2.x, Debian's docker-registry), with the tag schema fallback: an
//! index tagged `sha256-<hex>` listing the referrers. Pushing sets `subject` and,
//! when the registry does not answer the referrers API, updates that index too.

use super::RegistryClient;
use crate::error::{RegistryError, Result};
use crate::oci::{sha256_digest, Descriptor, Index, Manifest, OCI_INDEX, OCI_MANIFEST};
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
        let index: Index = match self.get_small_json(&api, OCI_INDEX) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("referrers of {repository}@{subject}"), e))?
            }
            // Without the API (404, or 400/405 from some registries): the fallback tag.
            Err(RegistryError::Status {
                status: 400 | 404 | 405,
                ..
            }) => match self.get_manifest(repository, &fallback_tag(subject)) {
                Ok((bytes, _, _)) => serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("referrers tag {repository}:{}", fallback_tag(subject)), e))?,
                Err(e) if not_found(&e) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        Ok(index
            .manifests
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(artifact_type) && d.digest.starts_with("sha256:"))
            .collect())
    }

    /// The newest referrer of `artifact_type` (by its created annotation; the last
    /// listed of equals), if any.
    pub fn newest_referrer(&self, repository: &str, subject: &str, artifact_type: &str) -> Result<Option<Descriptor>> {
        let mut found = self.referrers(repository, subject, artifact_type)?;
        found.sort_by(|a, b| {
            a.annotations
                .get(ANNOTATION_CREATED)
                .cmp(&b.annotations.get(ANNOTATION_CREATED))
        });
        Ok(found.pop())
    }

    /// The single blob of artifact manifest `digest` (at most `max_bytes`, verified).
    pub fn artifact_content(&self, repository: &str, digest: &str, max_bytes: u64) -> Result<(Manifest, Vec<u8>)> {
        let (bytes, _, _) = self.get_manifest(repository, digest)?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadContent {
            what: format!("artifact {repository}@{digest}"),
            reason: e.to_string(),
        })?;
        let [layer] = manifest.layers.as_slice() else {
            return Err(RegistryError::BadContent {
                what: format!("artifact {repository}@{digest}"),
                reason: format!("{} blobs, expected one", manifest.layers.len()),
            });
        };
        if layer.size > max_bytes {
            return Err(RegistryError::BadContent {
                what: format!("artifact {repository}@{digest}"),
                reason: format!("its blob of {} bytes is larger than {max_bytes}", layer.size),
            });
        }
        let content = self.get_blob_verified(repository, &layer.digest, layer.size)?;
        Ok((manifest, content))
    }

    /// Pushes `content` as an artifact of `artifact_type` (one blob of media type
    /// `artifact_type`) that refers to `subject`; returns the artifact manifest's
    /// digest. Registries without the referrers API also get the fallback index
    /// updated (read, extended, written back: two nodes pushing at once may lose one
    /// entry, never corrupt the index).
    pub fn push_referrer(
        &self,
        repository: &str,
        subject: &Descriptor,
        artifact_type: &str,
        content: &[u8],
        annotations: BTreeMap<String, String>,
    ) -> Result<String> {
        let blob = self.push_blob_bytes(repository, content)?;
        let empty = self.push_blob_bytes(repository, b"{}")?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            artifact_type: Some(artifact_type.into()),
            config: Descriptor {
                media_type: EMPTY_MEDIA_TYPE.into(),
                digest: empty,
                size: 2,
                ..Default::default()
            },
            layers: vec![Descriptor {
                media_type: artifact_type.into(),
                digest: blob,
                size: content.len() as u64,
                ..Default::default()
            }],
            subject: Some(Descriptor {
                media_type: subject.media_type.clone(),
                digest: subject.digest.clone(),
                size: subject.size,
                ..Default::default()
            }),
            annotations: annotations.clone(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("serializable");
        let digest = sha256_digest(&bytes);
        self.put_manifest(repository, &digest, OCI_MANIFEST, &bytes)?;
        let api = format!("/v2/{repository}/referrers/{}", subject.digest);
        let listed_by_api = match self.get_small_json(&api, OCI_INDEX) {
            Ok(bytes) => {
                serde_json::from_slice::<Index>(&bytes).is_ok_and(|i| i.manifests.iter().any(|d| d.digest == digest))
            }
            Err(_) => false,
        };
        if !listed_by_api {
            let tag = fallback_tag(&subject.digest);
            let mut index = match self.get_manifest(repository, &tag) {
                Ok((bytes, _, _)) => {
                    serde_json::from_slice::<Index>(&bytes).map_err(|e| RegistryError::BadContent {
                        what: format!("referrers tag {repository}:{tag}"),
                        reason: e.to_string(),
                    })?
                }
                Err(e) if not_found(&e) => Index {
                    schema_version: 2,
                    media_type: Some(OCI_INDEX.into()),
                    manifests: Vec::new(),
                    annotations: BTreeMap::new(),
                },
                Err(e) => return Err(e),
            };
            index.manifests.retain(|d| d.digest != digest);
            index.manifests.push(Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: digest.clone(),
                size: bytes.len() as u64,
                artifact_type: Some(artifact_type.into()),
                annotations,
                ..Default::default()
            });
            let index_bytes = serde_json::to_vec(&index).expect("serializable");
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
