//! Where a conversion reads from: a registry, an OCI layout, or an archive of
//! either kind (unpacked into a temporary directory first).

use crate::error::{bail, Context, Result};
use petrel_registry::layout::OciLayout;
use petrel_registry::oci::{
    canonical_json, descriptor, image_manifest, is_index, Descriptor, Index, Manifest, MediaType, Platform,
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST,
};
use petrel_registry::{ImageRef, Location, RegistryClient};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest config or index blob read into memory.
const MAX_SMALL_BLOB: u64 = 16 << 20;

/// A manifest to convert.
#[derive(Debug, Clone)]
pub struct SourceManifest {
    pub manifest: Manifest,
    pub digest: String,
    /// Its media type and size: the converted image's `subject` points at it.
    pub media_type: String,
    pub size: u64,
    pub platform: Option<Platform>,
}

/// An open source of images.
#[derive(Debug)]
pub enum Source {
    Registry {
        client: Box<RegistryClient>,
        image: ImageRef,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
        _temp: Option<tempfile::TempDir>,
    },
}

impl Source {
    pub fn open(location: &Location, client: impl Fn(&ImageRef) -> Result<RegistryClient>) -> Result<Self> {
        Ok(match location {
            Location::Registry(image) => Source::Registry {
                client: Box::new(client(image)?),
                image: image.clone(),
            },
            Location::OciLayout { dir, tag } => Source::Layout {
                layout: OciLayout::open(dir)?,
                tag: tag.clone(),
                _temp: None,
            },
            Location::OciArchive(path) => {
                let temp = unpack_archive(path)?;
                Source::Layout {
                    layout: OciLayout::open(temp.path())?,
                    tag: None,
                    _temp: Some(temp),
                }
            }
            Location::DockerArchive(path) => {
                let temp = unpack_archive(path)?;
                let layout = docker_archive_as_layout(temp.path())?;
                Source::Layout {
                    layout,
                    tag: None,
                    _temp: Some(temp),
                }
            }
        })
    }

    /// A short name for logs and annotations.
    pub fn describe(&self) -> String {
        match self {
            Source::Registry { image, .. } => format!("docker://{image}"),
            Source::Layout { layout, tag, .. } => format!(
                "oci:{}{}",
                layout.dir().display(),
                tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()
            ),
        }
    }

    /// The registry repository of the source, if it is one (for cross-repo mounts).
    pub fn registry_repository(&self) -> Option<(&str, &str)> {
        match self {
            Source::Registry { client, image } => Some((client.registry(), image.repository.as_str())),
            Source::Layout { .. } => None,
        }
    }

    pub(crate) fn fetch_manifest(&self, reference: Option<&str>) -> Result<(Vec<u8>, String, String)> {
        match self {
            Source::Registry { client, image } => {
                Ok(client.get_manifest(&image.repository, reference.unwrap_or(image.reference()))?)
            }
            Source::Layout { layout, tag, .. } => {
                let (digest, declared) = match reference {
                    Some(digest) => (digest.to_string(), None),
                    None => {
                        let descriptor = layout.resolve(tag.as_deref())?;
                        (
                            descriptor.digest().to_string(),
                            Some(descriptor.media_type().to_string()),
                        )
                    }
                };
                let bytes = layout.read_blob(&digest, MAX_SMALL_BLOB)?;
                let media_type = petrel_registry::oci::manifest_media_type(&bytes, declared.as_deref());
                Ok((bytes, media_type, digest))
            }
        }
    }

    /// The manifests to convert: the image's own, or from an index the host's
    /// platform (or every platform).
    pub fn manifests(&self, all_platforms: bool, platform: &Platform) -> Result<(Vec<SourceManifest>, bool)> {
        let (bytes, media_type, digest) = self.fetch_manifest(None)?;
        if !is_index(&media_type) {
            let manifest: Manifest = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing manifest {digest} of {}", self.describe()))?;
            return Ok((
                vec![SourceManifest {
                    manifest,
                    digest,
                    media_type,
                    size: bytes.len() as u64,
                    platform: None,
                }],
                false,
            ));
        }
        let index: Index =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing index {digest} of {}", self.describe()))?;
        let chosen: Vec<&Descriptor> = index
            .manifests()
            .iter()
            // Attestation manifests (BuildKit's provenance and SBOMs) are listed for
            // platform unknown/unknown.
            .filter(|d| d.platform().as_ref().is_none_or(|p| p.os().to_string() != "unknown"))
            .filter(|d| {
                all_platforms
                    || d.platform()
                        .as_ref()
                        .is_some_and(|p| p.os() == platform.os() && p.architecture() == platform.architecture())
            })
            .collect();
        if chosen.is_empty() {
            return Err(petrel_registry::RegistryError::NoPlatform {
                reference: self.describe(),
                platform: petrel_registry::oci::platform_text(platform),
            }
            .into());
        }
        let mut out = Vec::new();
        for descriptor in chosen.into_iter().take(if all_platforms { usize::MAX } else { 1 }) {
            let (bytes, media_type, digest) = self.fetch_manifest(Some(descriptor.digest().as_ref()))?;
            if digest != descriptor.digest().as_ref() {
                bail!(
                    "manifest {} of {} does not match its digest",
                    descriptor.digest(),
                    self.describe()
                );
            }
            let manifest: Manifest =
                serde_json::from_slice(&bytes).with_context(|| format!("parsing manifest {digest}"))?;
            out.push(SourceManifest {
                manifest,
                digest,
                media_type,
                size: bytes.len() as u64,
                platform: descriptor.platform().clone(),
            });
        }
        Ok((out, true))
    }

    /// A small blob, verified.
    pub fn small_blob(&self, digest: &str) -> Result<Vec<u8>> {
        self.blob(digest, MAX_SMALL_BLOB)
    }

    /// A blob of at most `max_bytes`, read whole and verified.
    pub fn blob(&self, digest: &str, max_bytes: u64) -> Result<Vec<u8>> {
        Ok(match self {
            Source::Registry { client, image } => client.get_blob_verified(&image.repository, digest, max_bytes)?,
            Source::Layout { layout, .. } => layout.read_blob(digest, max_bytes)?,
        })
    }

    /// The last `len` bytes of a blob of `size` bytes, unverified (a gzip layer's
    /// trailer, which says how long the layer is uncompressed).
    pub fn blob_tail(&self, digest: &str, size: u64, len: u64) -> Result<Vec<u8>> {
        let offset = size.checked_sub(len).context("blob shorter than its tail")?;
        Ok(match self {
            Source::Registry { client, image } => client.get_blob_range(&image.repository, digest, offset, len)?,
            Source::Layout { layout, .. } => {
                use std::io::{Seek, SeekFrom};
                let path = layout.blob_path(digest)?;
                let mut file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                file.seek(SeekFrom::Start(offset))?;
                let mut tail = vec![0u8; len as usize];
                file.read_exact(&mut tail)
                    .with_context(|| format!("reading the end of {}", path.display()))?;
                tail
            }
        })
    }

    /// A stream of a layer's bytes as stored (compressed or not), unverified.
    pub fn layer(&self, digest: &str) -> Result<Box<dyn Read + Send>> {
        Ok(match self {
            Source::Registry { client, image } => Box::new(client.blob_reader(&image.repository, digest)?),
            Source::Layout { layout, .. } => {
                let path = layout.blob_path(digest)?;
                Box::new(std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?)
            }
        })
    }
}

/// Unpacks a tar archive into a new temporary directory (the tar crate refuses
/// entries that would land outside it).
fn unpack_archive(path: &Path) -> Result<tempfile::TempDir> {
    let temp = tempfile::tempdir()?;
    let file = std::fs::File::open(path).with_context(|| format!("opening archive {}", path.display()))?;
    let mut archive = tar::Archive::new(petrel_builder::layer::decompressed(file)?);
    archive
        .unpack(temp.path())
        .with_context(|| format!("unpacking archive {}", path.display()))?;
    Ok(temp)
}

/// Turns an unpacked `docker save` archive (manifest.json + files) into an OCI
/// layout in the same directory.
fn docker_archive_as_layout(dir: &Path) -> Result<OciLayout> {
    if dir.join("oci-layout").exists() && dir.join("index.json").exists() {
        return Ok(OciLayout::open(dir)?);
    }
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read(&manifest_path).context("docker-archive without manifest.json")?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&text).context("parsing docker-archive manifest.json")?;
    let entry = entries.first().context("docker-archive manifest.json lists no image")?;
    let layout = OciLayout::create(dir)?;
    let config_file = entry["Config"]
        .as_str()
        .context("docker-archive entry without Config")?;
    let config = std::fs::read(safe_join(dir, config_file)?)?;
    let config_digest = layout.write_blob(&config)?;
    let mut layers = Vec::new();
    for layer in entry["Layers"]
        .as_array()
        .context("docker-archive entry without Layers")?
    {
        let path = safe_join(dir, layer.as_str().context("layer path is not a string")?)?;
        let digest = sha256_file(&path)?;
        layout.add_blob_file(&digest, &path)?;
        let size = std::fs::metadata(&path)?.len();
        layers.push(descriptor(DOCKER_LAYER_GZIP, &digest, size)?);
    }
    let mut manifest = image_manifest(descriptor(DOCKER_CONFIG, &config_digest, config.len() as u64)?, layers);
    manifest.set_media_type(Some(MediaType::from(DOCKER_MANIFEST)));
    let bytes = canonical_json(&manifest);
    let digest = layout.write_blob(&bytes)?;
    layout.set_tag(&descriptor(DOCKER_MANIFEST, &digest, bytes.len() as u64)?, None)?;
    Ok(layout)
}

/// `dir/relative`, refusing paths that climb out of `dir`.
fn safe_join(dir: &Path, relative: &str) -> Result<PathBuf> {
    let path = Path::new(relative);
    if path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        bail!("archive names a file outside itself: {relative:?}");
    }
    Ok(dir.join(path))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}
