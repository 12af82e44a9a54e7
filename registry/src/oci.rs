//! The OCI image types petrel reads and writes: descriptors, manifests, indexes,
//! and the image config's `rootfs`. Fields petrel does not use are kept as they
//! came (`extra`), so a config passes through conversion unchanged but for rootfs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Media type of petrel's layers (blobs and the bootstrap). It is a standard
/// layer type because containerd only passes annotations of layer types on to a
/// snapshotter; the role is in the annotations below.
pub const PETREL_LAYER: &str = OCI_LAYER_TAR;
/// Layer annotation naming the petrel role of a layer (`blob` or `bootstrap`).
pub const ANNOTATION_LAYER: &str = "dev.petrel.layer";
/// The same role under the prefix containerd passes to snapshotters as a label.
pub const ANNOTATION_SNAPSHOT_LAYER: &str = "containerd.io/snapshot/petrel.layer";
/// Role of a petrel chunk blob layer.
pub const ROLE_BLOB: &str = "blob";
/// Role of the petrel bootstrap layer.
pub const ROLE_BOOTSTRAP: &str = "bootstrap";
/// Bootstrap layer annotation: the blake3 digest in its superblock (hex).
pub const ANNOTATION_BOOTSTRAP_BLAKE3: &str = "dev.petrel.bootstrap.blake3";
/// Manifest annotation: the petrel format version.
pub const ANNOTATION_FORMAT: &str = "dev.petrel.format";
/// Manifest annotation: the prefetch profile the image was laid out with (compact
/// JSON, see `petrel_format::profile`), so the next release's conversion can reuse it.
pub const ANNOTATION_PROFILE: &str = "dev.petrel.prefetch.profile";
/// Largest profile carried in an annotation.
pub const MAX_ANNOTATED_PROFILE: usize = 256 << 10;
/// Manifest annotation: the digest of the manifest this image was converted from.
pub const ANNOTATION_SOURCE: &str = "dev.petrel.source.digest";

/// Accept header for manifest requests (indexes and manifests, OCI and Docker).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in OCI terms.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            architecture: architecture.into(),
            os: std::env::consts::OS.into(),
            variant: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// The type of an artifact this descriptor points at (OCI 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// The content itself, base64 (small content embedded in the descriptor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Set on artifact manifests (OCI 1.1), e.g. a petrel profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to (OCI 1.1 referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Checks that `bytes` hash to `digest` (what names the content in the error).
pub fn verify_digest(what: &'static str, digest: &str, bytes: &[u8]) -> Result<(), crate::RegistryError> {
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(crate::RegistryError::DigestMismatch {
            what,
            digest: digest.into(),
            actual,
        });
    }
    Ok(())
}

/// Whether a media type is an index (OCI or Docker list).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// The media type of manifest bytes: the declared one, else guessed from the fields.
pub fn manifest_media_type(bytes: &[u8], declared: Option<&str>) -> String {
    if let Some(d) = declared.filter(|d| !d.is_empty() && *d != "application/json" && *d != "text/plain") {
        return d.split(';').next().unwrap_or(d).trim().to_string();
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(m) = value.get("mediaType").and_then(|m| m.as_str()) {
        return m.to_string();
    }
    if value.get("manifests").is_some() {
        OCI_INDEX.into()
    } else {
        OCI_MANIFEST.into()
    }
}

/// Whether an image manifest is a petrel image (has a bootstrap layer).
pub fn bootstrap_layer(manifest: &Manifest) -> Option<&Descriptor> {
    manifest.layers.iter().find(|l| petrel_role(l) == Some(ROLE_BOOTSTRAP))
}

/// The petrel role of a layer (`blob`, `bootstrap`), if it is a petrel layer.
pub fn petrel_role(layer: &Descriptor) -> Option<&str> {
    layer.annotations.get(ANNOTATION_LAYER).map(String::as_str)
}

/// Annotations of a petrel layer with `role`.
pub fn petrel_layer_annotations(role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ANNOTATION_LAYER.to_string(), role.to_string()),
        (ANNOTATION_SNAPSHOT_LAYER.to_string(), role.to_string()),
    ])
}

/// `YYYY-MM-DDTHH:MM:SSZ` of now.
pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// `YYYY-MM-DDTHH:MM:SSZ` of `secs` after the Unix epoch.
pub fn rfc3339(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
