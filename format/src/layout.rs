//! On-disk records of bootstrap format v1, byte for byte as in `format-spec.md`.
//!
//! Every record is `#[repr(C)]`, unaligned and little-endian, so a table is a plain
//! `&[Record]` cast over the mapped bytes. Fields are raw: enums, flags and
//! indexes are decoded and checked by the reader, never trusted.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First eight bytes of every bootstrap.
pub const MAGIC: [u8; 8] = *b"PTRLBOOT";
/// Major version written by this code; a reader refuses any other major.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version written by this code; newer minors are readable.
pub const VERSION_MINOR: u16 = 0;
/// Number of entries in the superblock's section table.
pub const SECTION_COUNT: usize = 8;
/// Inode number of the root directory.
pub const ROOT_INO: u32 = 1;
/// `ChunkRefRecord::chunk_index` value for a hole: the range reads as zeros.
pub const HOLE_CHUNK: u32 = u32::MAX;

/// Where a table lives in the bootstrap.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SectionRecord {
    /// Byte offset from the start of the bootstrap.
    pub offset: U64,
    /// Length in bytes.
    pub length: U64,
}

/// Fixed header at offset 0 (256 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SuperblockRecord {
    pub magic: [u8; 8],
    pub version_major: U16,
    pub version_minor: U16,
    /// Size of this record; readers use it to find where tables may start.
    pub superblock_size: U32,
    pub compat_features: U64,
    pub ro_compat_features: U64,
    pub incompat_features: U64,
    /// 1 = fixed-size, 2 = FastCDC 2020 (see `ChunkerKind`).
    pub chunker_kind: U32,
    pub chunk_min_size: U32,
    pub chunk_avg_size: U32,
    pub chunk_max_size: U32,
    pub inode_count: U32,
    pub root_ino: U32,
    /// Files smaller than this were packed into shared chunks (0: none).
    pub small_file_limit: U32,
    /// zstd level the chunks were compressed with (informative).
    pub compression_level: U32,
    /// Indexed by `Section`.
    pub sections: [SectionRecord; SECTION_COUNT],
    pub reserved: [u8; 24],
    /// blake3 of bytes `[0, 224)` followed by bytes `[256, len)`.
    pub digest: [u8; 32],
}

/// One inode (72 bytes). Inode number N is the record at index N - 1.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct InodeRecord {
    /// `S_IFMT` type bits and the 12 permission bits.
    pub mode: U32,
    pub uid: U32,
    pub gid: U32,
    pub nlink: U32,
    /// Regular file: bytes. Symlink: target length. Others: 0.
    pub size: U64,
    pub mtime_sec: I64,
    pub mtime_nsec: U32,
    /// Reserved, written as 0.
    pub flags: U32,
    pub rdev_major: U32,
    pub rdev_minor: U32,
    /// Directory: first dirent. Regular file: first chunk ref.
    /// Symlink: offset of the target in the string heap.
    pub data_index: U64,
    /// Directory: entries. Regular file: chunk refs. Symlink: target length.
    pub data_count: U32,
    /// Directory: inode of its parent (the root is its own parent). Others: 0.
    pub parent_ino: U32,
    pub xattr_index: U32,
    pub xattr_count: U32,
}

/// One directory entry (12 bytes); a directory's entries are sorted by name bytes.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct DirentRecord {
    pub ino: U32,
    pub name_offset: U32,
    pub name_len: U16,
    pub reserved: U16,
}

/// A piece of a regular file (20 bytes): `length` bytes at `file_offset` are bytes
/// `[chunk_offset, chunk_offset + length)` of chunk `chunk_index`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ChunkRefRecord {
    pub file_offset: U64,
    /// Index in the chunk table, or `HOLE_CHUNK`.
    pub chunk_index: U32,
    pub chunk_offset: U32,
    pub length: U32,
}

/// One unique chunk (56 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ChunkRecord {
    /// blake3 of the uncompressed bytes.
    pub digest: [u8; 32],
    pub blob_index: U32,
    /// Bit 0: zstd-compressed; clear: stored raw.
    pub flags: U32,
    pub compressed_offset: U64,
    pub compressed_size: U32,
    pub uncompressed_size: U32,
}

/// One data blob (64 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct BlobRecord {
    /// sha256 of the blob file: its digest as an OCI layer.
    pub digest: [u8; 32],
    pub compressed_size: U64,
    pub uncompressed_size: U64,
    pub chunk_count: U32,
    /// 1 = independently zstd-compressed chunks.
    pub compressor: U32,
    /// Where the prefetch region ends: the chunks stored before this offset.
    pub prefetch_end: U64,
}

/// One extended attribute (16 bytes); name and value live in the string heap.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct XattrRecord {
    pub name_offset: U32,
    pub value_offset: U32,
    pub value_len: U32,
    pub name_len: U16,
    pub reserved: U16,
}

/// One prefetch table entry (4 bytes): an inode number.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct PrefetchRecord {
    pub ino: U32,
}

/// Size of the superblock in bytes.
pub const SUPERBLOCK_SIZE: usize = 256;
/// Offset of `SuperblockRecord::digest`.
pub const DIGEST_OFFSET: usize = 224;

const _: () = assert!(size_of::<SectionRecord>() == 16);
const _: () = assert!(size_of::<SuperblockRecord>() == SUPERBLOCK_SIZE);
const _: () = assert!(std::mem::offset_of!(SuperblockRecord, digest) == DIGEST_OFFSET);
const _: () = assert!(size_of::<InodeRecord>() == 72);
const _: () = assert!(size_of::<DirentRecord>() == 12);
const _: () = assert!(size_of::<ChunkRefRecord>() == 20);
const _: () = assert!(size_of::<ChunkRecord>() == 56);
const _: () = assert!(size_of::<BlobRecord>() == 64);
const _: () = assert!(size_of::<XattrRecord>() == 16);
const _: () = assert!(size_of::<PrefetchRecord>() == 4);

/// The tables of the bootstrap, in section-table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Inodes = 0,
    Dirents = 1,
    ChunkRefs = 2,
    Chunks = 3,
    Blobs = 4,
    Xattrs = 5,
    Prefetch = 6,
    Strings = 7,
}

impl Section {
    pub const ALL: [Section; SECTION_COUNT] = [
        Section::Inodes,
        Section::Dirents,
        Section::ChunkRefs,
        Section::Chunks,
        Section::Blobs,
        Section::Xattrs,
        Section::Prefetch,
        Section::Strings,
    ];

    /// Size of one record of this table (1 for the byte heap).
    pub fn record_size(self) -> usize {
        match self {
            Section::Inodes => size_of::<InodeRecord>(),
            Section::Dirents => size_of::<DirentRecord>(),
            Section::ChunkRefs => size_of::<ChunkRefRecord>(),
            Section::Chunks => size_of::<ChunkRecord>(),
            Section::Blobs => size_of::<BlobRecord>(),
            Section::Xattrs => size_of::<XattrRecord>(),
            Section::Prefetch => size_of::<PrefetchRecord>(),
            Section::Strings => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Section::Inodes => "inode table",
            Section::Dirents => "dirent table",
            Section::ChunkRefs => "chunk ref table",
            Section::Chunks => "chunk table",
            Section::Blobs => "blob table",
            Section::Xattrs => "xattr table",
            Section::Prefetch => "prefetch table",
            Section::Strings => "string heap",
        }
    }
}
