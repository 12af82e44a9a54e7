//! Serialises tables into bootstrap bytes: superblock, tables in section order,
//! string heap last, digest over everything but the digest field.

use crate::chunker::ChunkerParams;
use crate::error::{FormatError, Result};
use crate::features::*;
use crate::layout::*;
use std::collections::HashMap;
use zerocopy::IntoBytes;

/// Byte heap for names, symlink targets and xattrs; identical strings are stored once.
#[derive(Debug, Default)]
pub struct StringHeap {
    bytes: Vec<u8>,
    index: HashMap<Vec<u8>, u32>,
}

impl StringHeap {
    /// Adds `value` (or finds it) and returns its offset.
    pub fn intern(&mut self, value: &[u8]) -> Result<u32> {
        if let Some(&offset) = self.index.get(value) {
            return Ok(offset);
        }
        let offset = u32::try_from(self.bytes.len())
            .ok()
            .filter(|o| o.checked_add(value.len() as u32).is_some() && value.len() <= u32::MAX as usize)
            .ok_or_else(|| FormatError::corrupt("string heap", self.bytes.len() as u64, "string heap exceeds 4 GiB"))?;
        self.bytes.extend_from_slice(value);
        self.index.insert(value.to_vec(), offset);
        Ok(offset)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// All tables of a bootstrap, filled by the builder, then written by [`BootstrapWriter::finish`].
#[derive(Debug, Default)]
pub struct BootstrapWriter {
    pub inodes: Vec<InodeRecord>,
    pub dirents: Vec<DirentRecord>,
    pub chunk_refs: Vec<ChunkRefRecord>,
    pub chunks: Vec<ChunkRecord>,
    pub blobs: Vec<BlobRecord>,
    pub xattrs: Vec<XattrRecord>,
    pub prefetch: Vec<PrefetchRecord>,
    pub strings: StringHeap,
}

/// Superblock fields that the tables do not determine.
#[derive(Debug, Clone, Copy)]
pub struct SuperblockParams {
    pub chunker: ChunkerParams,
    pub small_file_limit: u32,
    pub compression_level: u32,
}

impl BootstrapWriter {
    /// Incompat bits the tables need: holes, and refs into shared chunks.
    fn incompat_features(&self) -> u64 {
        let mut bits = 0;
        for r in &self.chunk_refs {
            match r.chunk_index.get() {
                HOLE_CHUNK => bits |= INCOMPAT_HOLES,
                index => {
                    let whole = self
                        .chunks
                        .get(index as usize)
                        .is_some_and(|c| r.chunk_offset.get() == 0 && r.length.get() == c.uncompressed_size.get());
                    if !whole {
                        bits |= INCOMPAT_PACKED_CHUNKS;
                    }
                }
            }
        }
        bits
    }

    /// Lays out the tables and returns the complete bootstrap bytes.
    pub fn finish(self, params: SuperblockParams) -> Result<Vec<u8>> {
        params.chunker.validate()?;
        let inode_count = u32::try_from(self.inodes.len())
            .map_err(|_| FormatError::corrupt("inode table", 0u64, "more than 2^32 inodes"))?;
        let (kind, min, avg, max) = params.chunker.to_raw();
        let compat = if self.prefetch.is_empty() {
            0
        } else {
            COMPAT_PREFETCH_TABLE
        };
        let incompat = self.incompat_features();
        let tables: [&[u8]; SECTION_COUNT] = [
            self.inodes.as_bytes(),
            self.dirents.as_bytes(),
            self.chunk_refs.as_bytes(),
            self.chunks.as_bytes(),
            self.blobs.as_bytes(),
            self.xattrs.as_bytes(),
            self.prefetch.as_bytes(),
            &self.strings.bytes,
        ];
        let mut sections = [SectionRecord::default(); SECTION_COUNT];
        let mut offset = SUPERBLOCK_SIZE as u64;
        for (section, table) in sections.iter_mut().zip(tables) {
            section.offset.set(offset);
            section.length.set(table.len() as u64);
            offset += table.len() as u64;
        }
        let superblock = SuperblockRecord {
            magic: MAGIC,
            version_major: VERSION_MAJOR.into(),
            version_minor: VERSION_MINOR.into(),
            superblock_size: (SUPERBLOCK_SIZE as u32).into(),
            compat_features: compat.into(),
            ro_compat_features: 0.into(),
            incompat_features: incompat.into(),
            chunker_kind: kind.into(),
            chunk_min_size: min.into(),
            chunk_avg_size: avg.into(),
            chunk_max_size: max.into(),
            inode_count: inode_count.into(),
            root_ino: ROOT_INO.into(),
            small_file_limit: params.small_file_limit.into(),
            compression_level: params.compression_level.into(),
            sections,
            reserved: [0; 24],
            digest: [0; 32],
        };
        let mut out = Vec::with_capacity(offset as usize);
        out.extend_from_slice(superblock.as_bytes());
        for table in tables {
            out.extend_from_slice(table);
        }
        let digest = crate::reader::compute_digest(&out).expect("superblock written");
        out[DIGEST_OFFSET..SUPERBLOCK_SIZE].copy_from_slice(&digest);
        Ok(out)
    }
}
