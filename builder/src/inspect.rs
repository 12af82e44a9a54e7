//! `petrel inspect`: a summary of an image and a listing of its tree.

use crate::error::Result;
use petrel_format::reader::SegmentSource;
use petrel_format::{Bootstrap, FileKind};
use std::collections::HashSet;
use std::fmt::Write;

/// Numbers that describe an image.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub version: String,
    pub chunker: String,
    /// The zstd level the build compressed its new chunks at (informative).
    pub zstd_level: u32,
    pub inodes: u32,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub other: u64,
    pub hardlinked_inodes: u64,
    pub file_bytes: u64,
    pub hole_bytes: u64,
    pub chunk_refs: u64,
    pub unique_chunks: u32,
    /// Bytes referenced by files over bytes stored in unique chunks.
    pub dedup_ratio: f64,
    pub bootstrap_bytes: u64,
    pub bootstrap_bytes_per_inode: f64,
    pub blobs: Vec<BlobLine>,
    pub prefetch_files: u64,
    pub prefetch_bytes: u64,
}

/// One blob in the summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobLine {
    pub digest: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub chunks: u32,
    pub prefetch_bytes: u64,
}

/// Computes the summary (walks the whole tree).
pub fn summarize(bootstrap: &Bootstrap<'_>, bootstrap_bytes: u64) -> Result<Summary> {
    let sb = bootstrap.superblock();
    let mut s = Summary {
        version: format!("{}.{}", sb.version_major.get(), sb.version_minor.get()),
        chunker: bootstrap.chunker().to_string(),
        zstd_level: sb.compression_level.get(),
        inodes: bootstrap.inode_count(),
        unique_chunks: bootstrap.chunk_count(),
        bootstrap_bytes,
        prefetch_files: bootstrap.prefetch_len() as u64,
        ..Summary::default()
    };
    let mut seen = HashSet::new();
    let mut referenced = 0u64;
    for entry in bootstrap.walk() {
        let entry = entry?;
        let inode = entry.inode;
        if !seen.insert(inode.ino()) {
            continue;
        }
        if inode.nlink() > 1 && inode.kind()? != FileKind::Directory {
            s.hardlinked_inodes += 1;
        }
        match inode.kind()? {
            FileKind::Regular => {
                s.files += 1;
                s.file_bytes += inode.size();
                for segment in bootstrap.segments(&inode, 0, inode.size())? {
                    s.chunk_refs += 1;
                    match segment.source {
                        SegmentSource::Hole => s.hole_bytes += u64::from(segment.length),
                        SegmentSource::Chunk { .. } => referenced += u64::from(segment.length),
                    }
                }
            }
            FileKind::Directory => s.directories += 1,
            FileKind::Symlink => s.symlinks += 1,
            _ => s.other += 1,
        }
    }
    let mut stored = 0u64;
    let mut prefetch_bytes = vec![0u64; bootstrap.blob_count() as usize];
    for index in 0..bootstrap.chunk_count() {
        let chunk = bootstrap.chunk(index)?;
        let blob = bootstrap.blob(chunk.blob_index)?;
        if chunk.compressed_offset < blob.prefetch_end {
            prefetch_bytes[chunk.blob_index as usize] += u64::from(chunk.compressed_size);
        }
    }
    for (blob, prefetch) in bootstrap.blobs().zip(prefetch_bytes) {
        let blob = blob?;
        stored += blob.uncompressed_size;
        s.prefetch_bytes += prefetch;
        s.blobs.push(BlobLine {
            digest: blob.oci_digest(),
            compressed_size: blob.compressed_size,
            uncompressed_size: blob.uncompressed_size,
            chunks: blob.chunk_count,
            prefetch_bytes: prefetch,
        });
    }
    s.dedup_ratio = if stored == 0 {
        1.0
    } else {
        referenced as f64 / stored as f64
    };
    s.bootstrap_bytes_per_inode = bootstrap_bytes as f64 / f64::from(s.inodes.max(1));
    Ok(s)
}

/// One line per entry, `ls -l` style: type+mode, owner, size, mtime, path, target.
pub fn listing(bootstrap: &Bootstrap<'_>) -> Result<String> {
    let mut out = String::new();
    for entry in bootstrap.walk() {
        let entry = entry?;
        let inode = entry.inode;
        let kind = inode.kind()?;
        let path = if entry.path.is_empty() {
            "/".to_string()
        } else {
            format!("/{}", String::from_utf8_lossy(&entry.path))
        };
        let size = match kind {
            FileKind::CharDevice | FileKind::BlockDevice => {
                format!("{},{}", inode.rdev().0, inode.rdev().1)
            }
            _ => inode.size().to_string(),
        };
        let (sec, nsec) = inode.mtime();
        let _ = write!(
            out,
            "{}{:04o} {:>5}:{:<5} {:>10} {}.{:09} ino={} nlink={} {}",
            kind.letter(),
            inode.permissions(),
            inode.uid(),
            inode.gid(),
            size,
            sec,
            nsec,
            inode.ino(),
            inode.nlink(),
            path
        );
        if kind == FileKind::Symlink {
            let _ = write!(
                out,
                " -> {}",
                String::from_utf8_lossy(bootstrap.symlink_target(&inode)?)
            );
        }
        for (name, value) in bootstrap.xattrs(&inode)? {
            let _ = write!(out, " xattr:{}={}", String::from_utf8_lossy(name), hex::encode(value));
        }
        out.push('\n');
    }
    Ok(out)
}
