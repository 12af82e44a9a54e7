//! Petrel images pulled without the snapshotter labels (`ctr images pull`, or a
//! CRI without snapshot annotations): containerd downloads every layer and unpacks
//! it as a tar, so each blob layer leaves `petrel/blob` and the bootstrap layer
//! `petrel/bootstrap` in its snapshot (spec §14). At Commit the snapshotter notes
//! each blob's layer digest, and mounts the bootstrap from those files, so the
//! image runs like any other: a normal pull, served from local disk.

use crate::error::{Result, SnapshotError};
use crate::remote::RemoteConfig;
use crate::store::UnpackedImage;
use petrel_format::layer_tar;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// What petrel layer, if any, containerd unpacked into the snapshot directory `fs`:
/// exactly one directory `petrel` holding exactly one regular file `blob` or
/// `bootstrap` (a petrel bootstrap by its magic).
pub fn detect(fs: &Path) -> Option<UnpackedKind> {
    let only_entry = |dir: &Path| -> Option<std::ffi::OsString> {
        let mut entries = std::fs::read_dir(dir).ok()?;
        let first = entries.next()?.ok()?;
        entries.next().is_none().then(|| first.file_name())
    };
    if only_entry(fs)? != "petrel" || !std::fs::symlink_metadata(fs.join("petrel")).ok()?.is_dir() {
        return None;
    }
    let name = only_entry(&fs.join("petrel"))?;
    let file = fs.join("petrel").join(&name);
    if !std::fs::symlink_metadata(&file).ok()?.is_file() {
        return None;
    }
    match name.to_str()? {
        "blob" => Some(UnpackedKind::Blob),
        "bootstrap" => {
            let mut magic = [0u8; 8];
            std::fs::File::open(&file).ok()?.read_exact(&mut magic).ok()?;
            (magic == petrel_format::layout::MAGIC).then_some(UnpackedKind::Bootstrap)
        }
        _ => None,
    }
}

/// The petrel layer a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackedKind {
    Blob,
    Bootstrap,
}

/// The digest of the petrel layer of `kind` unpacked in `fs`, which must be committed
/// as `name` on `parent`: `name` must be the chain ID of that digest on `parent`.
pub fn verified_layer_digest(fs: &Path, kind: UnpackedKind, name: &str, parent: Option<&str>) -> Result<String> {
    let entry = match kind {
        UnpackedKind::Blob => layer_tar::BLOB_ENTRY,
        UnpackedKind::Bootstrap => layer_tar::BOOTSTRAP_ENTRY,
    };
    let digest = layer_digest(fs, entry)?;
    crate::provenance::check_chain_id(name, parent, &digest, &format!("unpacked petrel layer {digest}"))?;
    Ok(digest)
}

/// The digest of the petrel layer that unpacked to `fs/<entry>`: the layer is
/// petrel's exact tar wrapping of the file, so it is hashed without rebuilding it.
/// Petrel layers are uncompressed, so this is also the layer's diff_id.
pub fn layer_digest(fs: &Path, entry: &str) -> Result<String> {
    let path = fs.join(entry);
    let mut file = std::fs::File::open(&path).map_err(SnapshotError::io("open", &path))?;
    let size = file.metadata().map_err(SnapshotError::io("stat", &path))?.len();
    let mut hasher = Sha256::new();
    hasher.update(layer_tar::header(entry, size));
    let mut buffer = vec![0u8; 1 << 20];
    let mut hashed = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(SnapshotError::io("read", &path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        hashed += n as u64;
    }
    if hashed != size {
        return Err(SnapshotError::FailedPrecondition(format!(
            "{} changed while it was hashed",
            path.display()
        )));
    }
    hasher.update(vec![0u8; layer_tar::trailer_len(size) as usize]);
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Mounts an unpacked image at `mountpoint`: links its blobs into one directory and
/// starts a daemon reading them. Every blob the bootstrap names must be unpacked below it.
pub fn mount(config: &RemoteConfig, image: &UnpackedImage, mountpoint: &Path) -> Result<()> {
    let bootstrap_path = image.image_dir.join(petrel_format::image_dir::BOOTSTRAP_FILE);
    let bytes = std::fs::read(&bootstrap_path).map_err(SnapshotError::io("read", &bootstrap_path))?;
    let bootstrap = petrel_format::Bootstrap::open(&bytes).map_err(|e| {
        SnapshotError::FailedPrecondition(format!("unpacked bootstrap {}: {e}", bootstrap_path.display()))
    })?;
    let links = config.unpacked_blob_dir(mountpoint);
    let blobs_dir = petrel_format::image_dir::ImageDir::new(&links).blobs_dir();
    let _ = std::fs::remove_dir_all(&links);
    crate::store::private_dir(&blobs_dir)?;
    for blob in bootstrap.blobs() {
        let blob = blob.map_err(|e| SnapshotError::FailedPrecondition(format!("unpacked bootstrap: {e}")))?;
        let digest = blob.oci_digest();
        let Some((_, file)) = image.blobs.iter().find(|(d, _)| *d == digest) else {
            return Err(SnapshotError::FailedPrecondition(format!(
                "the unpacked bootstrap {} needs blob {digest}, which no layer below it holds",
                bootstrap_path.display()
            )));
        };
        let link = blobs_dir.join(digest.trim_start_matches("sha256:"));
        std::os::unix::fs::symlink(file, &link).map_err(SnapshotError::io("link", &link))?;
    }
    let spec = petrel_fuse_daemon::DaemonSpec {
        blob_dir: Some(links),
        unpacked_blobs: true,
        ..config
            .settings
            .daemon_spec(&image.image_dir.to_string_lossy(), mountpoint)?
    };
    crate::remote::run_mount_daemon(config, &spec, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack(layer: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        tar::Archive::new(layer).unpack(dir.path()).unwrap();
        dir
    }

    #[test]
    fn an_unpacked_blob_layer_is_recognised_with_its_layer_digest() {
        for size in [0usize, 1, 700, 1 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let layer = layer_tar::wrap(layer_tar::BLOB_ENTRY, &data);
            let dir = unpack(&layer);
            assert_eq!(detect(dir.path()), Some(UnpackedKind::Blob));
            let expected = petrel_registry::oci::sha256_digest(&layer);
            assert_eq!(
                verified_layer_digest(dir.path(), UnpackedKind::Blob, &expected, None).unwrap(),
                expected
            );
            let wrong = verified_layer_digest(dir.path(), UnpackedKind::Blob, "sha256:other", None);
            assert!(wrong.unwrap_err().to_string().contains("diff_ids do not match"));
        }
    }

    #[test]
    fn only_a_lone_petrel_file_counts() {
        let bootstrap = layer_tar::wrap(layer_tar::BOOTSTRAP_ENTRY, b"PTRLBOOT and the rest");
        assert_eq!(detect(unpack(&bootstrap).path()), Some(UnpackedKind::Bootstrap));
        // Not a bootstrap by its magic: an ordinary layer.
        let other = layer_tar::wrap(layer_tar::BOOTSTRAP_ENTRY, b"#!/bin/sh\n");
        assert_eq!(detect(unpack(&other).path()), None);
        // Anything next to it: an ordinary layer.
        let dir = unpack(&layer_tar::wrap(layer_tar::BLOB_ENTRY, b"data"));
        std::fs::write(dir.path().join("petrel/other"), b"").unwrap();
        assert_eq!(detect(dir.path()), None);
        let dir = unpack(&layer_tar::wrap(layer_tar::BLOB_ENTRY, b"data"));
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        assert_eq!(detect(dir.path()), None);
        assert_eq!(detect(tempfile::tempdir().unwrap().path()), None);
    }
}
