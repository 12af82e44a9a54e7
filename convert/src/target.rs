//! Where a conversion writes: a registry repository or an OCI layout.

use crate::error::{Context, Result};
use petrel_registry::layout::OciLayout;
use petrel_registry::oci::{annotation, descriptor};
use petrel_registry::{ImageRef, RegistryClient};
use std::path::Path;

/// An open target.
#[derive(Debug)]
pub enum Target {
    Registry {
        client: Box<RegistryClient>,
        image: ImageRef,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Target::Registry { image, .. } => format!("docker://{image}"),
            Target::Layout { layout, tag } => format!(
                "oci:{}{}",
                layout.dir().display(),
                tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()
            ),
        }
    }

    /// Stores a blob file; returns whether bytes were uploaded (false: already there).
    pub fn put_blob_file(&self, digest: &str, path: &Path, mount_from: Option<&str>) -> Result<bool> {
        self.put_blob_file_reporting(digest, path, mount_from, None)
    }

    /// [`Self::put_blob_file`], reporting bytes sent to a registry to `on_bytes`.
    pub fn put_blob_file_reporting(
        &self,
        digest: &str,
        path: &Path,
        mount_from: Option<&str>,
        on_bytes: Option<petrel_registry::client::OnBytes>,
    ) -> Result<bool> {
        Ok(match self {
            Target::Registry { client, image } => client
                .push_blob_reporting(&image.repository, digest, path, mount_from, on_bytes)
                .with_context(|| format!("pushing blob {digest}"))?,
            Target::Layout { layout, .. } => layout.add_blob_file(digest, path)?,
        })
    }

    /// Whether the target already holds blob `digest`.
    pub fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(match self {
            Target::Registry { client, image } => client.has_blob(&image.repository, digest)?,
            Target::Layout { layout, .. } => layout.blob_path(digest)?.exists(),
        })
    }

    /// Stores small content; returns its digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        Ok(match self {
            Target::Registry { client, image } => client.push_blob_bytes(&image.repository, bytes)?,
            Target::Layout { layout, .. } => layout.write_blob(bytes)?,
        })
    }

    /// Stores a manifest or index under the target's tag (or only by digest).
    pub fn put_manifest(&self, bytes: &[u8], media_type: &str, tagged: bool) -> Result<String> {
        let digest = petrel_registry::oci::sha256_digest(bytes);
        match self {
            Target::Registry { client, image } => {
                let reference = if tagged {
                    image.tag.clone().unwrap_or_else(|| digest.clone())
                } else {
                    digest.clone()
                };
                client.put_manifest(&image.repository, &reference, media_type, bytes)?;
            }
            Target::Layout { layout, tag } => {
                layout.write_blob(bytes)?;
                if tagged {
                    let descriptor = descriptor(media_type, &digest, bytes.len() as u64)?;
                    layout.set_tag(&descriptor, tag.as_deref())?;
                }
            }
        }
        Ok(digest)
    }

    /// The tags of the target repository (registries list at most
    /// [`petrel_registry::client::tags::MAX_LISTED_TAGS`]).
    pub fn tags(&self) -> Result<Vec<String>> {
        Ok(match self {
            Target::Registry { client, image } => client.list_tags(&image.repository)?,
            Target::Layout { layout, .. } => layout
                .index()?
                .manifests()
                .iter()
                .filter_map(|d| annotation(d, petrel_registry::layout::REF_NAME).map(str::to_string))
                .collect(),
        })
    }

    /// The manifest currently under the target's tag, if any.
    pub fn current_manifest(&self) -> Option<Vec<u8>> {
        match self {
            Target::Registry { client, image } => client
                .get_manifest(&image.repository, image.reference())
                .ok()
                .map(|(b, ..)| b),
            Target::Layout { layout, tag } => {
                let descriptor = layout.resolve(tag.as_deref()).ok()?;
                layout.read_blob(descriptor.digest().as_ref(), 8 << 20).ok()
            }
        }
    }
}
