//! OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/`).

use crate::error::{RegistryError, Result};
use crate::oci::{annotation, canonical_json_pretty, empty_index, set_annotation, sha256_digest, Descriptor, Index};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Annotation that names a manifest's tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

fn digest_hex(digest: &str) -> Result<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| RegistryError::BadContent {
            what: format!("digest {digest:?}"),
            reason: "not sha256:<64 hex>".into(),
        })
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<Self> {
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            return Err(RegistryError::BadContent {
                what: dir.display().to_string(),
                reason: "not an OCI image layout (no oci-layout file)".into(),
            });
        }
        Ok(OciLayout { dir: dir.to_path_buf() })
    }

    /// Opens a layout, creating an empty one if the directory has none.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(RegistryError::io("create", dir))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(RegistryError::io("write", &marker))?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            std::fs::write(&index, canonical_json_pretty(&empty_index()))
                .map_err(RegistryError::io("write", &index))?;
        }
        Ok(OciLayout { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn index(&self) -> Result<Index> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).map_err(RegistryError::io("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadContent {
            what: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The manifest (or index) descriptor tagged `tag`, or the only one when no tag is given.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.index()?;
        let found = match tag {
            Some(tag) => index
                .manifests()
                .iter()
                .find(|d| annotation(d, REF_NAME) == Some(tag))
                .cloned(),
            None if index.manifests().len() == 1 => index.manifests().first().cloned(),
            None => None,
        };
        found.ok_or_else(|| RegistryError::BadContent {
            what: self.dir.display().to_string(),
            reason: match tag {
                Some(tag) => format!("no manifest tagged {tag:?} in index.json"),
                None => format!(
                    "index.json lists {} manifests; name one with oci:DIR:TAG",
                    index.manifests().len()
                ),
            },
        })
    }

    /// A blob read whole and checked against its digest.
    pub fn read_blob(&self, digest: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let size = std::fs::metadata(&path)
            .map_err(RegistryError::io("stat", &path))?
            .len();
        if size > max_bytes {
            return Err(RegistryError::BadContent {
                what: path.display().to_string(),
                reason: format!("larger than {max_bytes} bytes"),
            });
        }
        let bytes = std::fs::read(&path).map_err(RegistryError::io("read", &path))?;
        crate::oci::verify_digest("blob", digest, &bytes)?;
        Ok(bytes)
    }

    /// Stores bytes as a blob; returns the digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        if !path.exists() {
            self.publish(&path, |temp| temp.write_all(bytes))?;
        }
        Ok(digest)
    }

    /// Copies a file in as blob `digest` (the caller computed it).
    pub fn add_blob_file(&self, digest: &str, source: &Path) -> Result<bool> {
        let path = self.blob_path(digest)?;
        if path.exists() {
            return Ok(false);
        }
        self.publish(&path, |temp| {
            std::io::copy(&mut std::fs::File::open(source)?, temp).map(|_| ())
        })?;
        Ok(true)
    }

    /// Writes a blob under `path` whole or not at all: into a temporary file beside
    /// it, then renamed (a reader, a concurrent writer of the same blob or a crash
    /// never sees part of it under its digest).
    fn publish(&self, path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
        let dir = path.parent().unwrap_or(&self.dir);
        let mut temp =
            tempfile::NamedTempFile::new_in(dir).map_err(RegistryError::io("create temporary file in", dir))?;
        write(temp.as_file_mut()).map_err(RegistryError::io("write", path))?;
        // Readable like a file `std::fs::write` makes (a temporary file is 0600).
        use std::os::unix::fs::PermissionsExt;
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(RegistryError::io("chmod", path))?;
        temp.persist(path)
            .map_err(|e| RegistryError::io("rename to", path)(e.error))?;
        Ok(())
    }

    /// Points `tag` at `descriptor` in `index.json` (replacing an older entry).
    pub fn set_tag(&self, descriptor: &Descriptor, tag: Option<&str>) -> Result<()> {
        let mut index = self.index()?;
        let mut descriptor = descriptor.clone();
        let mut manifests = index.manifests().clone();
        if let Some(tag) = tag {
            set_annotation(&mut descriptor, REF_NAME, tag);
            manifests.retain(|d| annotation(d, REF_NAME) != Some(tag));
        } else {
            manifests.retain(|d| d.digest() != descriptor.digest());
        }
        manifests.push(descriptor);
        index.set_manifests(manifests);
        let path = self.dir.join("index.json");
        std::fs::write(&path, canonical_json_pretty(&index)).map_err(RegistryError::io("write", &path))
    }
}
