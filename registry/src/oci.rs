//! The OCI image types petrel reads and writes: `oci-spec`'s descriptors, manifests,
//! indexes and platforms (every field of image spec 1.1, Docker's media types as
//! `MediaType::Other`), petrel's media types and annotations, and helpers that keep
//! call sites short. Documents are written with `canonical_json`, so the same
//! document is always the same bytes and digest. Image configs are not typed: they
//! pass through conversion as JSON, unchanged but for `rootfs` and `history`.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

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

pub use oci_spec::image::{
    Arch, Descriptor, Digest, ImageIndex as Index, ImageManifest as Manifest, MediaType, Os, Platform,
};

/// The platform of this machine, in OCI terms.
pub fn host_platform() -> Platform {
    let mut platform = Platform::default();
    platform.set_architecture(Arch::from(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }));
    platform.set_os(Os::from(std::env::consts::OS));
    platform
}

/// A platform from its parts (`os`, `architecture`, optional `variant`).
pub fn platform(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
    let mut platform = Platform::default();
    platform.set_os(Os::from(os));
    platform.set_architecture(Arch::from(architecture));
    platform.set_variant(variant.map(str::to_string));
    platform
}

/// `os/architecture[/variant]`, as docker and containerd write a platform.
pub fn platform_text(platform: &Platform) -> String {
    let mut text = format!("{}/{}", platform.os(), platform.architecture());
    if let Some(variant) = platform.variant() {
        text.push('/');
        text.push_str(variant);
    }
    text
}

/// A descriptor of `size` bytes of `media_type` named by `digest`; an error names a
/// digest that is not one (`algorithm:hex`).
pub fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor, crate::RegistryError> {
    Ok(Descriptor::new(
        MediaType::from(media_type),
        size,
        parse_digest(digest)?,
    ))
}

/// A digest string checked (`sha256:` and 64 lowercase hex digits, or another
/// algorithm the image spec registers).
pub fn parse_digest(digest: &str) -> Result<Digest, crate::RegistryError> {
    digest
        .parse()
        .map_err(|e: oci_spec::OciSpecError| crate::RegistryError::BadContent {
            what: format!("digest {digest:?}"),
            reason: e.to_string(),
        })
}

/// The value of annotation `key` of a descriptor.
pub fn annotation<'a>(descriptor: &'a Descriptor, key: &str) -> Option<&'a str> {
    descriptor.annotations().as_ref()?.get(key).map(String::as_str)
}

/// Sets annotation `key` of a descriptor to `value`.
pub fn set_annotation(descriptor: &mut Descriptor, key: &str, value: &str) {
    let mut annotations = descriptor.annotations().clone().unwrap_or_default();
    annotations.insert(key.to_string(), value.to_string());
    descriptor.set_annotations(Some(annotations));
}

/// Annotations as the OCI types hold them (none when empty).
pub fn annotations(pairs: BTreeMap<String, String>) -> Option<HashMap<String, String>> {
    (!pairs.is_empty()).then(|| pairs.into_iter().collect())
}

/// The value of annotation `key` of a manifest.
pub fn manifest_annotation<'a>(manifest: &'a Manifest, key: &str) -> Option<&'a str> {
    manifest.annotations().as_ref()?.get(key).map(String::as_str)
}

/// JSON of an OCI document with every object's keys in order: the same document is
/// always the same bytes, so a manifest written twice has one digest (the OCI types
/// hold annotations in hash maps, whose order changes from run to run).
pub fn canonical_json(document: &impl Serialize) -> Vec<u8> {
    let value = serde_json::to_value(document).expect("OCI documents serialize");
    serde_json::to_vec(&value).expect("JSON values serialize")
}

/// The same, indented (OCI layouts, for people who read them).
pub fn canonical_json_pretty(document: &impl Serialize) -> Vec<u8> {
    let value = serde_json::to_value(document).expect("OCI documents serialize");
    serde_json::to_vec_pretty(&value).expect("JSON values serialize")
}

/// Whether an optional media type (an `artifactType`) is `expected`.
pub fn is_media_type(media_type: &Option<MediaType>, expected: &str) -> bool {
    media_type.as_ref().is_some_and(|m| m.as_ref() == expected)
}

/// An image manifest (schema 2, OCI media type) of `config` and `layers`.
pub fn image_manifest(config: Descriptor, layers: Vec<Descriptor>) -> Manifest {
    let mut manifest = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .config(config)
        .layers(layers)
        .build()
        .expect("every required field is set");
    manifest.set_media_type(Some(MediaType::ImageManifest));
    manifest
}

/// An empty index (schema 2, OCI media type).
pub fn empty_index() -> Index {
    let mut index = Index::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index
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
    manifest
        .layers()
        .iter()
        .find(|l| petrel_role(l) == Some(ROLE_BOOTSTRAP))
}

/// The petrel role of a layer (`blob`, `bootstrap`), if it is a petrel layer.
pub fn petrel_role(layer: &Descriptor) -> Option<&str> {
    annotation(layer, ANNOTATION_LAYER)
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
