//! Chunk dictionaries: chunks that already exist in the blobs of other petrel
//! images (an earlier release, a base image). A chunk found here is not stored
//! again; the new bootstrap points into the existing blob instead.

use petrel_format::{Bootstrap, FormatError};
use std::collections::HashMap;

/// Where a known chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DictChunk {
    /// Index into `ChunkDict::blobs`.
    pub blob: u32,
    pub flags: u32,
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_size: u32,
}

/// A blob that dictionary chunks live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DictBlob {
    pub digest: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

/// Chunks by blake3 digest, from one or more bootstraps.
#[derive(Debug, Default, Clone)]
pub struct ChunkDict {
    pub blobs: Vec<DictBlob>,
    pub chunks: HashMap<[u8; 32], DictChunk>,
}

impl ChunkDict {
    /// Adds every chunk of a bootstrap (validated on the way).
    pub fn add_bootstrap(&mut self, bytes: &[u8]) -> Result<usize, FormatError> {
        let bootstrap = Bootstrap::open(bytes)?;
        let mut blob_index = Vec::new();
        for blob in bootstrap.blobs() {
            let blob = blob?;
            let index = match self.blobs.iter().position(|b| b.digest == blob.digest) {
                Some(i) => i,
                None => {
                    self.blobs.push(DictBlob {
                        digest: blob.digest,
                        compressed_size: blob.compressed_size,
                        uncompressed_size: blob.uncompressed_size,
                    });
                    self.blobs.len() - 1
                }
            };
            blob_index.push(index as u32);
        }
        let before = self.chunks.len();
        for index in 0..bootstrap.chunk_count() {
            let chunk = bootstrap.chunk(index)?;
            self.chunks.entry(chunk.digest).or_insert(DictChunk {
                blob: blob_index[chunk.blob_index as usize],
                flags: if chunk.compressed {
                    petrel_format::features::CHUNK_FLAG_ZSTD
                } else {
                    0
                },
                compressed_offset: chunk.compressed_offset,
                compressed_size: chunk.compressed_size,
                uncompressed_size: chunk.uncompressed_size,
            });
        }
        Ok(self.chunks.len() - before)
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}
