//! A validated, zero-copy reader over bootstrap bytes (usually an mmap).
//!
//! [`Bootstrap::open`] checks the superblock and that every table lies inside the
//! bytes, in time independent of the number of files (plus the digest, which is
//! linear in the bootstrap size). Every later access checks its own indexes, so no
//! input can make the reader panic or read out of bounds.

mod dir;
mod exercise;
mod file;
mod inode;
mod validated;
mod walk;

pub use dir::{is_valid_name, DirEntries, DirEntry, NAME_MAX};
pub use exercise::{read_everything, Visited};
pub use file::{FileSegment, SegmentSource};
pub use inode::{mode_bits, FileKind, Inode};
pub use validated::ValidatedBootstrap;
pub use walk::{TreeWalk, WalkEntry};

use crate::chunker::{ChunkerParams, MAX_CHUNK_SIZE};
use crate::error::{FormatError, Result};
use crate::features::*;
use crate::layout::*;
use zerocopy::FromBytes;

/// A bootstrap opened for reading.
#[derive(Debug, Clone, Copy)]
pub struct Bootstrap<'a> {
    superblock: &'a SuperblockRecord,
    chunker: ChunkerParams,
    inodes: &'a [InodeRecord],
    dirents: &'a [DirentRecord],
    chunk_refs: &'a [ChunkRefRecord],
    chunks: &'a [ChunkRecord],
    blobs: &'a [BlobRecord],
    xattrs: &'a [XattrRecord],
    prefetch: &'a [PrefetchRecord],
    strings: &'a [u8],
}

/// What `open` checks beyond structure.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Recompute the blake3 digest and compare it with the superblock's. Skip only
    /// when the bytes were already verified against a digest from a trusted source.
    pub verify_digest: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { verify_digest: true }
    }
}

/// A decoded, bounds-checked chunk table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    pub index: u32,
    pub digest: [u8; 32],
    pub blob_index: u32,
    pub compressed: bool,
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_size: u32,
}

/// A decoded blob table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    pub index: u32,
    /// sha256 digest of the blob (its OCI layer digest).
    pub digest: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub chunk_count: u32,
    pub prefetch_end: u64,
}

impl BlobInfo {
    /// `sha256:<hex>`, as in an OCI descriptor.
    pub fn oci_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }
}

/// Computes the digest a superblock records for these bootstrap bytes.
pub fn compute_digest(bytes: &[u8]) -> Option<[u8; 32]> {
    let head = bytes.get(..DIGEST_OFFSET)?;
    let tail = bytes.get(SUPERBLOCK_SIZE..)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(head);
    hasher.update(tail);
    Some(*hasher.finalize().as_bytes())
}

impl<'a> Bootstrap<'a> {
    /// Opens and fully validates the header and table bounds, including the digest.
    pub fn open(bytes: &'a [u8]) -> Result<Self> {
        Self::open_with(bytes, OpenOptions::default())
    }

    /// Opens with explicit options.
    pub fn open_with(bytes: &'a [u8], options: OpenOptions) -> Result<Self> {
        let (superblock, _) = SuperblockRecord::ref_from_prefix(bytes).map_err(|_| FormatError::TooShort {
            len: bytes.len(),
            needed: SUPERBLOCK_SIZE,
        })?;
        if superblock.magic != MAGIC {
            return Err(FormatError::BadMagic {
                found: superblock.magic,
            });
        }
        let (major, minor) = (superblock.version_major.get(), superblock.version_minor.get());
        if major != VERSION_MAJOR {
            return Err(FormatError::UnsupportedVersion {
                major,
                minor,
                supported: VERSION_MAJOR,
            });
        }
        let unknown = superblock.incompat_features.get() & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatFeatures { bits: unknown });
        }
        let header_len = superblock.superblock_size.get() as usize;
        if header_len < SUPERBLOCK_SIZE || header_len > bytes.len() {
            return Err(FormatError::corrupt(
                "superblock",
                0u64,
                "superblock_size is smaller than 256 or past the end",
            ));
        }
        let chunker = ChunkerParams::from_raw(
            superblock.chunker_kind.get(),
            superblock.chunk_min_size.get(),
            superblock.chunk_avg_size.get(),
            superblock.chunk_max_size.get(),
        )?;
        if options.verify_digest {
            let actual = compute_digest(bytes).expect("length checked above");
            if actual != superblock.digest {
                return Err(FormatError::DigestMismatch {
                    expected: hex::encode(superblock.digest),
                    actual: hex::encode(actual),
                });
            }
        }
        let section = |s: Section| section_bytes(bytes, header_len, superblock, s);
        let reader = Bootstrap {
            superblock,
            chunker,
            inodes: cast_table(section(Section::Inodes)?, Section::Inodes)?,
            dirents: cast_table(section(Section::Dirents)?, Section::Dirents)?,
            chunk_refs: cast_table(section(Section::ChunkRefs)?, Section::ChunkRefs)?,
            chunks: cast_table(section(Section::Chunks)?, Section::Chunks)?,
            blobs: cast_table(section(Section::Blobs)?, Section::Blobs)?,
            xattrs: cast_table(section(Section::Xattrs)?, Section::Xattrs)?,
            prefetch: cast_table(section(Section::Prefetch)?, Section::Prefetch)?,
            strings: section(Section::Strings)?,
        };
        if reader.inodes.len() != superblock.inode_count.get() as usize {
            return Err(FormatError::corrupt(
                "superblock",
                0u64,
                "inode_count does not match the inode table length",
            ));
        }
        if superblock.root_ino.get() != ROOT_INO || reader.inodes.is_empty() {
            return Err(FormatError::corrupt("superblock", 0u64, "root inode must be 1"));
        }
        if reader.inode(ROOT_INO)?.kind()? != FileKind::Directory {
            return Err(FormatError::corrupt("inode", ROOT_INO, "root is not a directory"));
        }
        Ok(reader)
    }

    /// The raw superblock.
    pub fn superblock(&self) -> &'a SuperblockRecord {
        self.superblock
    }

    /// The chunker that cut this image's data.
    pub fn chunker(&self) -> ChunkerParams {
        self.chunker
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count`.
    pub fn inode_count(&self) -> u32 {
        self.inodes.len() as u32
    }

    /// Number of chunk table entries.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Number of blob table entries.
    pub fn blob_count(&self) -> u32 {
        self.blobs.len() as u32
    }

    /// Number of chunk refs over all files.
    pub fn chunk_ref_count(&self) -> usize {
        self.chunk_refs.len()
    }

    /// Total bootstrap size in bytes as recorded by its sections.
    pub fn section(&self, section: Section) -> (u64, u64) {
        let s = &self.superblock.sections[section as usize];
        (s.offset.get(), s.length.get())
    }

    /// The inode with number `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode<'a>> {
        let record = ino
            .checked_sub(1)
            .and_then(|i| self.inodes.get(i as usize))
            .ok_or_else(|| FormatError::corrupt("inode", ino, "inode number out of range"))?;
        Ok(Inode { ino, record })
    }

    /// Chunk table entry `index`, with its bounds checked against its blob.
    pub fn chunk(&self, index: u32) -> Result<ChunkInfo> {
        let record = self
            .chunks
            .get(index as usize)
            .ok_or_else(|| FormatError::corrupt("chunk", index, "chunk index out of range"))?;
        let flags = record.flags.get();
        if flags & !CHUNK_FLAGS_KNOWN != 0 {
            return Err(FormatError::corrupt("chunk", index, "unknown chunk flags"));
        }
        let blob = self.blob(record.blob_index.get())?;
        let (uncompressed, compressed) = (record.uncompressed_size.get(), record.compressed_size.get());
        if uncompressed == 0 || uncompressed > MAX_CHUNK_SIZE {
            return Err(FormatError::corrupt(
                "chunk",
                index,
                "uncompressed size is 0 or above 16 MiB",
            ));
        }
        let compressed_flag = flags & CHUNK_FLAG_ZSTD != 0;
        let size_ok = if compressed_flag {
            compressed > 0 && compressed <= max_compressed_size(uncompressed)
        } else {
            compressed == uncompressed
        };
        if !size_ok {
            return Err(FormatError::corrupt(
                "chunk",
                index,
                "compressed size impossible for its uncompressed size",
            ));
        }
        let end = record.compressed_offset.get().checked_add(u64::from(compressed));
        if end.is_none_or(|end| end > blob.compressed_size) {
            return Err(FormatError::corrupt(
                "chunk",
                index,
                "chunk extends past the end of its blob",
            ));
        }
        Ok(ChunkInfo {
            index,
            digest: record.digest,
            blob_index: record.blob_index.get(),
            compressed: compressed_flag,
            compressed_offset: record.compressed_offset.get(),
            compressed_size: compressed,
            uncompressed_size: uncompressed,
        })
    }

    /// Blob table entry `index`.
    pub fn blob(&self, index: u32) -> Result<BlobInfo> {
        let record = self
            .blobs
            .get(index as usize)
            .ok_or_else(|| FormatError::corrupt("blob", index, "blob index out of range"))?;
        if record.compressor.get() != BLOB_COMPRESSOR_ZSTD_CHUNKS {
            return Err(FormatError::corrupt("blob", index, "unknown compressor"));
        }
        if record.prefetch_end.get() > record.compressed_size.get() {
            return Err(FormatError::corrupt(
                "blob",
                index,
                "prefetch region larger than the blob",
            ));
        }
        Ok(BlobInfo {
            index,
            digest: record.digest,
            compressed_size: record.compressed_size.get(),
            uncompressed_size: record.uncompressed_size.get(),
            chunk_count: record.chunk_count.get(),
            prefetch_end: record.prefetch_end.get(),
        })
    }

    /// All blobs, in table order.
    pub fn blobs(&self) -> impl Iterator<Item = Result<BlobInfo>> + 'a {
        let this = *self;
        (0..self.blob_count()).map(move |i| this.blob(i))
    }

    /// The prefetch table: inode numbers in the order they should be fetched.
    pub fn prefetch(&self) -> impl Iterator<Item = u32> + 'a {
        self.prefetch.iter().map(|p| p.ino.get())
    }

    /// Number of prefetch table entries.
    pub fn prefetch_len(&self) -> usize {
        self.prefetch.len()
    }

    /// Bytes `[offset, offset + len)` of the string heap.
    pub(crate) fn string(&self, offset: u32, len: usize, what: &'static str, index: u64) -> Result<&'a [u8]> {
        let start = offset as usize;
        start
            .checked_add(len)
            .and_then(|end| self.strings.get(start..end))
            .ok_or_else(|| FormatError::corrupt(what, index, "string reference outside the string heap"))
    }

    /// A walk over the whole tree from the root, parents before children.
    pub fn walk(&self) -> TreeWalk<'a> {
        TreeWalk::new(*self)
    }
}

/// The largest compressed size a valid zstd frame of `uncompressed` bytes can have
/// (`ZSTD_compressBound`).
pub fn max_compressed_size(uncompressed: u32) -> u32 {
    let n = uncompressed as usize;
    let margin = if n < (128 << 10) { ((128 << 10) - n) >> 11 } else { 0 };
    (n + (n >> 8) + margin) as u32
}

fn section_bytes<'a>(
    bytes: &'a [u8],
    header_len: usize,
    superblock: &SuperblockRecord,
    section: Section,
) -> Result<&'a [u8]> {
    let record = &superblock.sections[section as usize];
    let (offset, length) = (record.offset.get(), record.length.get());
    let bad = |reason| FormatError::BadSection {
        section: section.name(),
        offset,
        length,
        reason,
    };
    if length == 0 {
        return Ok(&[]);
    }
    if offset < header_len as u64 {
        return Err(bad("overlaps the superblock"));
    }
    let end = offset
        .checked_add(length)
        .ok_or_else(|| bad("offset + length overflows"))?;
    if end > bytes.len() as u64 {
        return Err(bad("extends past the end of the bootstrap"));
    }
    if length % section.record_size() as u64 != 0 {
        return Err(bad("length is not a whole number of records"));
    }
    if section != Section::Strings && length / section.record_size() as u64 > u64::from(u32::MAX) {
        return Err(bad("more than 2^32 records"));
    }
    Ok(&bytes[offset as usize..end as usize])
}

fn cast_table<T: FromBytes + zerocopy::Immutable + zerocopy::KnownLayout + zerocopy::Unaligned>(
    bytes: &[u8],
    section: Section,
) -> Result<&[T]> {
    <[T]>::ref_from_bytes(bytes).map_err(|_| FormatError::BadSection {
        section: section.name(),
        offset: 0,
        length: bytes.len() as u64,
        reason: "not a whole number of records",
    })
}
