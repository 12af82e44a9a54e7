//! Feature words of the superblock. A reader refuses unknown incompat bits, may read
//! (but never modify) with unknown ro-compat bits, and ignores unknown compat bits.

/// The prefetch table is not empty.
pub const COMPAT_PREFETCH_TABLE: u64 = 1 << 0;
/// Every compat bit this code knows.
pub const COMPAT_KNOWN: u64 = COMPAT_PREFETCH_TABLE;

/// No ro-compat bits are defined in v1.
pub const RO_COMPAT_KNOWN: u64 = 0;

/// Chunk refs may start inside a chunk (small files packed into shared chunks).
pub const INCOMPAT_PACKED_CHUNKS: u64 = 1 << 0;
/// Chunk refs may be holes (`HOLE_CHUNK`): ranges that read as zeros.
pub const INCOMPAT_HOLES: u64 = 1 << 1;
/// Every incompat bit this code knows.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_PACKED_CHUNKS | INCOMPAT_HOLES;

/// Chunk flag: the stored bytes are a zstd frame; clear means stored raw.
pub const CHUNK_FLAG_ZSTD: u32 = 1 << 0;
/// Every chunk flag this code knows.
pub const CHUNK_FLAGS_KNOWN: u32 = CHUNK_FLAG_ZSTD;

/// Blob compressor: a concatenation of independently compressed chunks.
pub const BLOB_COMPRESSOR_ZSTD_CHUNKS: u32 = 1;
