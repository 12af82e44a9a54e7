//! `petrel check`: the bootstrap's structure, every chunk against its digest, and
//! every blob against its sha256.

use crate::error::BuildError;
use crate::image::LocalImage;
use petrel_format::reader::SegmentSource;
use petrel_format::FileKind;
use sha2::{Digest, Sha256};
use std::io::Read;

/// What a successful check covered.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub inodes: u32,
    pub entries: u64,
    pub chunks: u32,
    pub blobs: u32,
    pub blob_bytes: u64,
}

/// The first bad object found.
#[derive(Debug, thiserror::Error)]
#[error("{object}: {source}")]
pub struct CheckFailure {
    /// What is bad, e.g. `file usr/bin/x: chunk 12 at blob offset 4096`.
    pub object: String,
    #[source]
    pub source: BuildError,
}

/// Checks the whole image; stops at the first bad object.
pub fn check(image: &LocalImage) -> std::result::Result<CheckReport, CheckFailure> {
    let bootstrap = image.bootstrap();
    let structural = |source: BuildError| CheckFailure {
        object: "bootstrap".into(),
        source,
    };
    let mut report = CheckReport {
        inodes: bootstrap.inode_count(),
        chunks: bootstrap.chunk_count(),
        blobs: bootstrap.blob_count(),
        ..CheckReport::default()
    };
    // First file path that uses each chunk, to name it if the chunk is bad.
    let mut user_of_chunk: Vec<Option<String>> = vec![None; bootstrap.chunk_count() as usize];
    for entry in bootstrap.walk() {
        let entry = entry.map_err(|e| structural(e.into()))?;
        report.entries += 1;
        let shown = String::from_utf8_lossy(&entry.path).into_owned();
        let inode = entry.inode;
        let in_file = |source: petrel_format::FormatError| CheckFailure {
            object: format!("file {shown:?}"),
            source: source.into(),
        };
        bootstrap.xattrs(&inode).map_err(in_file)?;
        match inode.kind().map_err(in_file)? {
            FileKind::Regular => {
                for segment in bootstrap.segments(&inode, 0, inode.size()).map_err(in_file)? {
                    if let SegmentSource::Chunk { index, .. } = segment.source {
                        user_of_chunk[index as usize].get_or_insert_with(|| shown.clone());
                    }
                }
            }
            FileKind::Symlink => {
                bootstrap.symlink_target(&inode).map_err(in_file)?;
            }
            _ => {}
        }
    }
    for index in 0..bootstrap.chunk_count() {
        if let Err(source) = image.read_chunk(index) {
            let offset = bootstrap.chunk(index).map(|c| c.compressed_offset).unwrap_or(0);
            let object = match &user_of_chunk[index as usize] {
                Some(path) => format!("file {path:?}: chunk {index} at blob offset {offset}"),
                None => format!("chunk {index} at blob offset {offset} (used by no file)"),
            };
            return Err(CheckFailure { object, source });
        }
    }
    for blob in bootstrap.blobs() {
        let blob = blob.map_err(|e| structural(e.into()))?;
        let path = image.dir().blob_path(&blob.digest);
        let object = format!("blob {}", blob.oci_digest());
        let fail = |source| CheckFailure {
            object: object.clone(),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(|e| fail(BuildError::io("open", &path)(e)))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|e| fail(BuildError::io("read", &path)(e)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        if digest != blob.digest || size != blob.compressed_size {
            return Err(fail(BuildError::Invalid(format!(
                "content is sha256:{} ({size} bytes), expected {} ({} bytes)",
                hex::encode(digest),
                blob.oci_digest(),
                blob.compressed_size
            ))));
        }
        report.blob_bytes += size;
    }
    Ok(report)
}
