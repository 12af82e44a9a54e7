//! A registry image's bootstrap layer, fetched into the node cache's `downloads/`.
//!
//! The layer is streamed to disk and checked against the sha256 the manifest pins,
//! gunzipped when its media type says gzip (bounded: a small layer cannot expand
//! without limit), unwrapped from petrel's one-entry tar (header, length and
//! trailer checked), and kept as the bare bootstrap under the layer's digest. So it
//! is fetched once per node: the snapshotter fetches it to learn a gzipped layer's
//! diff_id, and the mount daemon it then starts finds it there, as does a remount.
//! Nothing here maps or trusts the bootstrap's content; the caller validates it.

use crate::error::{DaemonError, Result};
use petrel_format::layer_tar;
use petrel_registry::oci::{Descriptor, OCI_LAYER_GZIP, OCI_LAYER_TAR};
use petrel_registry::RegistryClient;
use sha2::Digest;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Largest bootstrap accepted from a registry (and largest bootstrap layer).
pub const MAX_BOOTSTRAP_BYTES: u64 = 4 << 30;

/// A bootstrap on local disk and the diff_id of the layer it came in.
#[derive(Debug, Clone)]
pub struct FetchedBootstrap {
    pub path: PathBuf,
    /// sha256 of the uncompressed layer: what an image config's `rootfs.diff_ids`
    /// must name, and what containerd's chain IDs are made of.
    pub diff_id: String,
}

/// The bootstrap of layer `layer` (of `repository`) in `downloads`, fetched if not
/// there yet.
pub fn fetch(
    client: &RegistryClient,
    repository: &str,
    layer: &Descriptor,
    downloads: &Path,
) -> Result<FetchedBootstrap> {
    let digest = layer.digest().to_string();
    let size = layer.size();
    let invalid = |reason: String| DaemonError::Invalid(format!("bootstrap layer {digest} of {repository}: {reason}"));
    let gzipped = match layer.media_type().as_ref() {
        OCI_LAYER_GZIP => true,
        OCI_LAYER_TAR => false,
        other => {
            return Err(invalid(format!(
                "media type {other:?} is neither {OCI_LAYER_TAR} nor {OCI_LAYER_GZIP}"
            )))
        }
    };
    if size > MAX_BOOTSTRAP_BYTES {
        return Err(invalid(format!("{size} bytes is larger than {MAX_BOOTSTRAP_BYTES}")));
    }
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| invalid("its digest is not sha256:<64 hex digits>".into()))?;
    crate::store::create_private_dir(downloads)?;
    let path = downloads.join(hex);
    if path.exists() {
        let diff_id = if gzipped {
            wrapped_digest(&path)?
        } else {
            digest.clone()
        };
        return Ok(FetchedBootstrap { path, diff_id });
    }
    let temp =
        || tempfile::NamedTempFile::new_in(downloads).map_err(DaemonError::io("create temporary file in", downloads));
    let mut download = temp()?;
    client.download_blob(repository, &digest, size, download.as_file_mut())?;
    let (mut tar, diff_id) = if gzipped {
        let mut tar = temp()?;
        let mut compressed = download.reopen().map_err(DaemonError::io("open", download.path()))?;
        compressed
            .seek(SeekFrom::Start(0))
            .map_err(DaemonError::io("seek", download.path()))?;
        let limit = layer_tar::layer_len(MAX_BOOTSTRAP_BYTES);
        let (_, diff_id) = layer_tar::gunzip_layer(layer_tar::BOOTSTRAP_ENTRY, compressed, tar.as_file_mut(), limit)
            .map_err(|e| invalid(e.to_string()))?;
        (tar, format!("sha256:{}", hex::encode(diff_id)))
    } else {
        (download, digest.clone())
    };
    let (offset, length) = bootstrap_in_layer(tar.as_file(), gzipped).map_err(invalid)?;
    let mut content = temp()?;
    let source = tar.as_file_mut();
    source
        .seek(SeekFrom::Start(offset))
        .map_err(DaemonError::io("seek", &path))?;
    std::io::copy(&mut Read::take(&mut *source, length), content.as_file_mut())
        .map_err(DaemonError::io("write", &path))?;
    content.as_file_mut().flush().map_err(DaemonError::io("write", &path))?;
    // Durable before it is named: a later mount trusts what it finds under the name.
    content.as_file().sync_all().map_err(DaemonError::io("sync", &path))?;
    content
        .persist(&path)
        .map_err(|e| DaemonError::io("rename to", &path)(e.error))?;
    Ok(FetchedBootstrap { path, diff_id })
}

/// The digest of petrel's tar wrapping of the bootstrap at `path` (the diff_id of
/// the layer it was unwrapped from), hashed without writing the wrapping out.
pub fn wrapped_digest(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(DaemonError::io("open", path))?;
    let size = file.metadata().map_err(DaemonError::io("stat", path))?.len();
    let mut hasher = sha2::Sha256::new();
    hasher.update(layer_tar::header(layer_tar::BOOTSTRAP_ENTRY, size));
    let hashed = std::io::copy(&mut file, &mut hasher).map_err(DaemonError::io("read", path))?;
    if hashed != size {
        return Err(DaemonError::Invalid(format!(
            "{} changed while it was hashed",
            path.display()
        )));
    }
    hasher.update(vec![0u8; layer_tar::trailer_len(size) as usize]);
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Where the bootstrap lies in its (uncompressed) layer `file`: petrel's exact tar
/// wrapping (its header and trailer checked), or, in an uncompressed layer of an
/// image converted before bootstrap layers were tars, the bare bootstrap,
/// recognised by its magic.
fn bootstrap_in_layer(file: &std::fs::File, gzipped: bool) -> std::result::Result<(u64, u64), String> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
    let mut header = vec![0u8; (layer_tar::DATA_OFFSET as usize).min(len as usize)];
    file.read_exact_at(&mut header, 0).map_err(|e| e.to_string())?;
    if !gzipped && header.starts_with(&petrel_format::layout::MAGIC) {
        return Ok((0, len));
    }
    let size = layer_tar::data_size(layer_tar::BOOTSTRAP_ENTRY, &header).map_err(|e| e.to_string())?;
    if layer_tar::layer_len(size) != len {
        return Err(format!(
            "the layer's header announces {size} bytes, so it must be {} bytes, not {len}",
            layer_tar::layer_len(size)
        ));
    }
    let mut trailer = vec![0u8; layer_tar::trailer_len(size) as usize];
    file.read_exact_at(&mut trailer, layer_tar::DATA_OFFSET + size)
        .map_err(|e| e.to_string())?;
    if trailer.iter().any(|b| *b != 0) {
        return Err("bytes after the bootstrap in its layer are not zero".into());
    }
    Ok((layer_tar::DATA_OFFSET, size))
}
