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
    /// Where the blob's prefetch region ends (0: none).
    pub prefetch_end: u64,
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
                        prefetch_end: blob.prefetch_end,
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

/// What `build_dictionary` selected.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DictionaryReport {
    pub candidate_chunks: u64,
    pub chunks: u64,
    /// Plain bytes of the selected chunks.
    pub bytes: u64,
}

/// A standalone dictionary from several images' bootstraps: the chunks most images
/// share first (then larger first), up to `max_bytes` of plain data. The result is
/// a bootstrap with an empty root, the selected chunks and the blobs they live in,
/// usable wherever `--chunk-dict` takes an image.
pub fn build_dictionary(bootstraps: &[Vec<u8>], max_bytes: u64) -> Result<(Vec<u8>, DictionaryReport), FormatError> {
    use petrel_format::layout::*;
    let mut dict = ChunkDict::default();
    let mut holders: HashMap<[u8; 32], u32> = HashMap::new();
    for bytes in bootstraps {
        dict.add_bootstrap(bytes)?;
        let bootstrap = Bootstrap::open(bytes)?;
        let mut seen = std::collections::HashSet::new();
        for index in 0..bootstrap.chunk_count() {
            let digest = bootstrap.chunk(index)?.digest;
            if seen.insert(digest) {
                *holders.entry(digest).or_default() += 1;
            }
        }
    }
    let mut ranked: Vec<(&[u8; 32], &DictChunk)> = dict.chunks.iter().collect();
    ranked.sort_by_key(|(digest, chunk)| {
        (
            std::cmp::Reverse(holders[*digest]),
            std::cmp::Reverse(chunk.uncompressed_size),
            **digest,
        )
    });
    let mut report = DictionaryReport {
        candidate_chunks: ranked.len() as u64,
        ..DictionaryReport::default()
    };
    let mut chosen = Vec::new();
    for (digest, chunk) in ranked {
        if report.bytes + u64::from(chunk.uncompressed_size) > max_bytes {
            continue;
        }
        report.bytes += u64::from(chunk.uncompressed_size);
        chosen.push((*digest, *chunk));
    }
    report.chunks = chosen.len() as u64;
    // Blob order of first use; chunks grouped by blob in offset order.
    chosen.sort_by_key(|(_, c)| (c.blob, c.compressed_offset));
    let mut writer = petrel_format::BootstrapWriter::default();
    let mut blob_slot: HashMap<u32, u32> = HashMap::new();
    for (_, chunk) in &chosen {
        let next = writer.blobs.len() as u32;
        if let std::collections::hash_map::Entry::Vacant(entry) = blob_slot.entry(chunk.blob) {
            entry.insert(next);
            let blob = &dict.blobs[chunk.blob as usize];
            writer.blobs.push(BlobRecord {
                digest: blob.digest,
                compressed_size: blob.compressed_size.into(),
                uncompressed_size: blob.uncompressed_size.into(),
                chunk_count: 0.into(),
                compressor: petrel_format::features::BLOB_COMPRESSOR_ZSTD_CHUNKS.into(),
                prefetch_end: 0.into(),
            });
        }
        let slot = blob_slot[&chunk.blob];
        let count = writer.blobs[slot as usize].chunk_count.get();
        writer.blobs[slot as usize].chunk_count.set(count + 1);
    }
    for (digest, chunk) in &chosen {
        writer.chunks.push(ChunkRecord {
            digest: *digest,
            blob_index: blob_slot[&chunk.blob].into(),
            flags: chunk.flags.into(),
            compressed_offset: chunk.compressed_offset.into(),
            compressed_size: chunk.compressed_size.into(),
            uncompressed_size: chunk.uncompressed_size.into(),
        });
    }
    let mut root = InodeRecord::default();
    root.mode.set(petrel_format::reader::mode_bits::S_IFDIR | 0o755);
    root.nlink.set(2);
    root.parent_ino.set(ROOT_INO);
    writer.inodes.push(root);
    let params = petrel_format::SuperblockParams {
        chunker: petrel_format::ChunkerParams::default(),
        small_file_limit: 0,
        compression_level: petrel_format::codec::ZSTD_LEVEL as u32,
    };
    Ok((writer.finish(params)?, report))
}
