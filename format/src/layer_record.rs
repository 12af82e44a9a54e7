//! Layer records (`format-spec.md` §16): what one source layer put into a petrel
//! image, entry by entry in the layer's order, with each file's data as pieces
//! of chunks named by digest. A later conversion whose image shares the layer
//! applies its record instead of fetching and reading the layer again.
//!
//! A record is zstd-compressed; [`LayerRecord::decode`] bounds what it inflates
//! and checks every field before anything uses it.

use crate::chunker::{ChunkerParams, MAX_CHUNK_SIZE};
use crate::error::{FormatError, Result};
use crate::reader::is_valid_name;

/// The first bytes of an (inflated) layer record.
pub const RECORD_MAGIC: [u8; 8] = *b"PTRLLAYR";
/// The version this crate reads and writes.
pub const RECORD_VERSION: u32 = 1;
/// A piece that reads as zeros (as in the chunk ref table).
pub const RECORD_HOLE: u32 = u32::MAX;
/// Longest path in a record (Linux PATH_MAX).
pub const MAX_RECORD_PATH: usize = 4096;
/// Longest symlink or hardlink target.
pub const MAX_RECORD_TARGET: usize = 4096;
/// The zstd level records are written at (9 stores 7 % less for 5 times the CPU).
const RECORD_ZSTD_LEVEL: i32 = 3;

/// How the image the record belongs to cut and compressed its chunks: a record
/// is only applied by a build with the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordEncoding {
    pub chunker: ChunkerParams,
    pub small_file_limit: u32,
    pub compression_level: u32,
}

/// A chunk a record's pieces name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordChunk {
    /// blake3 of the chunk's plain bytes.
    pub digest: [u8; 32],
    pub uncompressed_size: u32,
}

/// Metadata of an entry, as the builder keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordMeta {
    /// Permission bits including setuid, setgid and sticky.
    pub permissions: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Sorted by name, no repeats.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RecordMeta {
    /// What containerd gives a parent directory a layer did not list: 0755 root:root.
    pub fn implicit_dir() -> Self {
        RecordMeta {
            permissions: 0o755,
            ..RecordMeta::default()
        }
    }
}

/// A piece of a regular file: `length` bytes at `chunk_offset` in chunk `chunk`
/// of the record's chunk table, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPiece {
    pub file_offset: u64,
    pub chunk: u32,
    pub chunk_offset: u32,
    pub length: u32,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    Directory(RecordMeta),
    Regular {
        meta: RecordMeta,
        size: u64,
        pieces: Vec<RecordPiece>,
    },
    Symlink {
        meta: RecordMeta,
        target: Vec<u8>,
    },
    /// Another name for the entry at `target` (a cleaned path).
    Hardlink {
        target: Vec<u8>,
    },
    CharDevice {
        meta: RecordMeta,
        major: u32,
        minor: u32,
    },
    BlockDevice {
        meta: RecordMeta,
        major: u32,
        minor: u32,
    },
    Fifo(RecordMeta),
    /// A whiteout or opaque marker: its path ends in the `.wh.` name.
    Whiteout,
}

/// One entry: a cleaned path (components joined by `/`; empty for the root) and
/// what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordEntry {
    pub path: Vec<u8>,
    pub body: RecordBody,
}

/// One source layer's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub encoding: RecordEncoding,
    pub chunks: Vec<RecordChunk>,
    pub entries: Vec<RecordEntry>,
}

const KIND_DIRECTORY: u8 = 1;
const KIND_REGULAR: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const KIND_HARDLINK: u8 = 4;
const KIND_CHAR: u8 = 5;
const KIND_BLOCK: u8 = 6;
const KIND_FIFO: u8 = 7;
const KIND_WHITEOUT: u8 = 8;

/// Bytes of the fixed header.
const HEADER_LEN: usize = 48;
/// Bytes of a chunk table record.
const CHUNK_LEN: usize = 36;
/// Bytes of a piece.
const PIECE_LEN: usize = 20;

impl LayerRecord {
    /// The record, inflated (the bytes §16 describes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&RECORD_MAGIC);
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        let (kind, min, avg, max) = self.encoding.chunker.to_raw();
        for v in [
            kind,
            min,
            avg,
            max,
            self.encoding.small_file_limit,
            self.encoding.compression_level,
            self.chunks.len() as u32,
            self.entries.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0u8; 4]);
        debug_assert_eq!(out.len(), HEADER_LEN);
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.digest);
            out.extend_from_slice(&chunk.uncompressed_size.to_le_bytes());
        }
        for entry in &self.entries {
            encode_entry(entry, &mut out);
        }
        out
    }

    /// The record as it travels: zstd-compressed.
    pub fn encode(&self) -> Vec<u8> {
        zstd::bulk::compress(&self.to_bytes(), RECORD_ZSTD_LEVEL).expect("zstd compresses into a vector")
    }

    /// Inflates (at most `max_bytes`) and validates a record.
    pub fn decode(compressed: &[u8], max_bytes: usize) -> Result<Self> {
        use std::io::Read;
        let bad = |reason: String| FormatError::BadRecord { offset: 0, reason };
        let decoder = zstd::stream::read::Decoder::new(compressed).map_err(|e| bad(format!("not zstd: {e}")))?;
        let mut bytes = Vec::new();
        decoder
            .take(max_bytes as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("does not inflate: {e}")))?;
        if bytes.len() > max_bytes {
            return Err(bad(format!("inflates to more than {max_bytes} bytes")));
        }
        Self::from_bytes(&bytes)
    }

    /// Parses and validates an inflated record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Cursor { bytes, at: 0 };
        if r.take(8)? != RECORD_MAGIC {
            return Err(r.bad("bad magic: not a petrel layer record"));
        }
        let version = r.u32()?;
        if version != RECORD_VERSION {
            return Err(r.bad(format!("version {version}; this reader reads {RECORD_VERSION}")));
        }
        let (kind, min, avg, max) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let chunker = ChunkerParams::from_raw(kind, min, avg, max)?;
        let small_file_limit = r.u32()?;
        let compression_level = r.u32()?;
        let chunk_count = r.u32()? as usize;
        let entry_count = r.u32()? as usize;
        r.take(4)?;
        if chunk_count.saturating_mul(CHUNK_LEN) > r.left() {
            return Err(r.bad(format!("{chunk_count} chunks do not fit in the record")));
        }
        let mut chunks = Vec::with_capacity(chunk_count);
        for _ in 0..chunk_count {
            let digest: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
            let uncompressed_size = r.u32()?;
            if uncompressed_size == 0 || uncompressed_size > MAX_CHUNK_SIZE {
                return Err(r.bad(format!("chunk size {uncompressed_size} outside 1..={MAX_CHUNK_SIZE}")));
            }
            chunks.push(RecordChunk {
                digest,
                uncompressed_size,
            });
        }
        // Every entry takes at least 3 bytes: no count can make us reserve more
        // than the record holds.
        if entry_count.saturating_mul(3) > r.left() {
            return Err(r.bad(format!("{entry_count} entries do not fit in the record")));
        }
        let mut entries = Vec::with_capacity(entry_count);
        for _ in 0..entry_count {
            entries.push(decode_entry(&mut r, &chunks)?);
        }
        if r.left() != 0 {
            return Err(r.bad(format!("{} bytes after the last entry", r.left())));
        }
        Ok(LayerRecord {
            encoding: RecordEncoding {
                chunker,
                small_file_limit,
                compression_level,
            },
            chunks,
            entries,
        })
    }
}

fn encode_entry(entry: &RecordEntry, out: &mut Vec<u8>) {
    let kind = match &entry.body {
        RecordBody::Directory(_) => KIND_DIRECTORY,
        RecordBody::Regular { .. } => KIND_REGULAR,
        RecordBody::Symlink { .. } => KIND_SYMLINK,
        RecordBody::Hardlink { .. } => KIND_HARDLINK,
        RecordBody::CharDevice { .. } => KIND_CHAR,
        RecordBody::BlockDevice { .. } => KIND_BLOCK,
        RecordBody::Fifo(_) => KIND_FIFO,
        RecordBody::Whiteout => KIND_WHITEOUT,
    };
    out.push(kind);
    put_short_bytes(out, &entry.path);
    match &entry.body {
        RecordBody::Directory(meta) | RecordBody::Fifo(meta) => encode_meta(meta, out),
        RecordBody::Regular { meta, size, pieces } => {
            encode_meta(meta, out);
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
            for piece in pieces {
                out.extend_from_slice(&piece.file_offset.to_le_bytes());
                out.extend_from_slice(&piece.chunk.to_le_bytes());
                out.extend_from_slice(&piece.chunk_offset.to_le_bytes());
                out.extend_from_slice(&piece.length.to_le_bytes());
            }
        }
        RecordBody::Symlink { meta, target } => {
            encode_meta(meta, out);
            put_short_bytes(out, target);
        }
        RecordBody::Hardlink { target } => put_short_bytes(out, target),
        RecordBody::CharDevice { meta, major, minor } | RecordBody::BlockDevice { meta, major, minor } => {
            encode_meta(meta, out);
            out.extend_from_slice(&major.to_le_bytes());
            out.extend_from_slice(&minor.to_le_bytes());
        }
        RecordBody::Whiteout => {}
    }
}

fn put_short_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn encode_meta(meta: &RecordMeta, out: &mut Vec<u8>) {
    for v in [meta.permissions, meta.uid, meta.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&meta.mtime_sec.to_le_bytes());
    out.extend_from_slice(&meta.mtime_nsec.to_le_bytes());
    out.extend_from_slice(&(meta.xattrs.len() as u16).to_le_bytes());
    for (name, value) in &meta.xattrs {
        put_short_bytes(out, name);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
}

/// Longest extended attribute name and value (Linux XATTR_NAME_MAX, XATTR_SIZE_MAX).
const MAX_XATTR_NAME: usize = 255;
const MAX_XATTR_VALUE: usize = 64 << 10;

fn decode_entry(r: &mut Cursor<'_>, chunks: &[RecordChunk]) -> Result<RecordEntry> {
    let kind = r.u8()?;
    let path = r.short_bytes()?.to_vec();
    check_path(r, &path)?;
    if path.is_empty() && kind != KIND_DIRECTORY {
        return Err(r.bad("only a directory may name the root"));
    }
    let body = match kind {
        KIND_DIRECTORY => RecordBody::Directory(decode_meta(r)?),
        KIND_REGULAR => {
            let meta = decode_meta(r)?;
            let size = r.u64()?;
            let count = r.u32()? as usize;
            if count.saturating_mul(PIECE_LEN) > r.left() {
                return Err(r.bad(format!("{count} pieces do not fit in the record")));
            }
            let mut pieces = Vec::with_capacity(count);
            let mut next = 0u64;
            for _ in 0..count {
                let piece = RecordPiece {
                    file_offset: r.u64()?,
                    chunk: r.u32()?,
                    chunk_offset: r.u32()?,
                    length: r.u32()?,
                };
                if piece.file_offset != next || piece.length == 0 {
                    return Err(r.bad("a file's pieces do not tile it in order"));
                }
                if piece.chunk != RECORD_HOLE {
                    let chunk = chunks
                        .get(piece.chunk as usize)
                        .ok_or_else(|| r.bad(format!("piece names chunk {} of {}", piece.chunk, chunks.len())))?;
                    if u64::from(piece.chunk_offset) + u64::from(piece.length) > u64::from(chunk.uncompressed_size) {
                        return Err(r.bad("piece runs past the end of its chunk"));
                    }
                }
                next += u64::from(piece.length);
                pieces.push(piece);
            }
            if next != size {
                return Err(r.bad(format!("pieces cover {next} bytes of a {size}-byte file")));
            }
            RecordBody::Regular { meta, size, pieces }
        }
        KIND_SYMLINK => {
            let meta = decode_meta(r)?;
            let target = r.short_bytes()?.to_vec();
            if target.is_empty() || target.len() > MAX_RECORD_TARGET || target.contains(&0) {
                return Err(r.bad("bad symlink target"));
            }
            RecordBody::Symlink { meta, target }
        }
        KIND_HARDLINK => {
            let target = r.short_bytes()?.to_vec();
            check_path(r, &target)?;
            if target.is_empty() {
                return Err(r.bad("a hardlink to the root"));
            }
            RecordBody::Hardlink { target }
        }
        KIND_CHAR | KIND_BLOCK => {
            let meta = decode_meta(r)?;
            let (major, minor) = (r.u32()?, r.u32()?);
            if kind == KIND_CHAR {
                RecordBody::CharDevice { meta, major, minor }
            } else {
                RecordBody::BlockDevice { meta, major, minor }
            }
        }
        KIND_FIFO => RecordBody::Fifo(decode_meta(r)?),
        KIND_WHITEOUT => {
            let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
            if !name.starts_with(b".wh.") {
                return Err(r.bad("a whiteout whose name does not start with .wh."));
            }
            RecordBody::Whiteout
        }
        other => return Err(r.bad(format!("unknown entry kind {other}"))),
    };
    Ok(RecordEntry { path, body })
}

fn decode_meta(r: &mut Cursor<'_>) -> Result<RecordMeta> {
    let (permissions, uid, gid) = (r.u32()?, r.u32()?, r.u32()?);
    let mtime_sec = r.u64()? as i64;
    let mtime_nsec = r.u32()?;
    if permissions > 0o7777 || mtime_nsec >= 1_000_000_000 {
        return Err(r.bad("bad permissions or mtime"));
    }
    let count = r.u16()? as usize;
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count.min(r.left() / 6));
    for _ in 0..count {
        let name = r.short_bytes()?.to_vec();
        let len = r.u32()? as usize;
        let value = r.take(len)?.to_vec();
        if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) || value.len() > MAX_XATTR_VALUE {
            return Err(r.bad("bad extended attribute"));
        }
        if xattrs.last().is_some_and(|(last, _)| *last >= name) {
            return Err(r.bad("extended attributes not sorted by name"));
        }
        xattrs.push((name, value));
    }
    Ok(RecordMeta {
        permissions,
        uid,
        gid,
        mtime_sec,
        mtime_nsec,
        xattrs,
    })
}

/// A cleaned path: valid names joined by `/` (or empty: the root).
fn check_path(r: &Cursor<'_>, path: &[u8]) -> Result<()> {
    if path.len() > MAX_RECORD_PATH {
        return Err(r.bad("path longer than PATH_MAX"));
    }
    if !path.is_empty() && !path.split(|&b| b == b'/').all(is_valid_name) {
        return Err(r.bad(format!("bad path {:?}", String::from_utf8_lossy(path))));
    }
    Ok(())
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bad(&self, reason: impl Into<String>) -> FormatError {
        FormatError::BadRecord {
            offset: self.at as u64,
            reason: reason.into(),
        }
    }
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.bad("ends early"));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn short_bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.u16()? as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerRecord {
        let meta = RecordMeta {
            permissions: 0o644,
            uid: 1000,
            gid: 1000,
            mtime_sec: -5,
            mtime_nsec: 7,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec()), (b"user.b".to_vec(), vec![])],
        };
        LayerRecord {
            encoding: RecordEncoding {
                chunker: ChunkerParams::default(),
                small_file_limit: 64 << 10,
                compression_level: 3,
            },
            chunks: vec![RecordChunk {
                digest: [7; 32],
                uncompressed_size: 100,
            }],
            entries: vec![
                RecordEntry {
                    path: Vec::new(),
                    body: RecordBody::Directory(RecordMeta::default()),
                },
                RecordEntry {
                    path: b"etc/app.conf".to_vec(),
                    body: RecordBody::Regular {
                        meta: meta.clone(),
                        size: 150,
                        pieces: vec![
                            RecordPiece {
                                file_offset: 0,
                                chunk: 0,
                                chunk_offset: 10,
                                length: 90,
                            },
                            RecordPiece {
                                file_offset: 90,
                                chunk: RECORD_HOLE,
                                chunk_offset: 0,
                                length: 60,
                            },
                        ],
                    },
                },
                RecordEntry {
                    path: b"etc/link".to_vec(),
                    body: RecordBody::Hardlink {
                        target: b"etc/app.conf".to_vec(),
                    },
                },
                RecordEntry {
                    path: b"usr/.wh..wh..opq".to_vec(),
                    body: RecordBody::Whiteout,
                },
                RecordEntry {
                    path: b"dev/null".to_vec(),
                    body: RecordBody::CharDevice {
                        meta: meta.clone(),
                        major: 1,
                        minor: 3,
                    },
                },
                RecordEntry {
                    path: b"bin/sh".to_vec(),
                    body: RecordBody::Symlink {
                        meta,
                        target: b"/bin/bash".to_vec(),
                    },
                },
            ],
        }
    }

    #[test]
    fn a_record_round_trips() {
        let record = sample();
        assert_eq!(LayerRecord::decode(&record.encode(), 1 << 20).unwrap(), record);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_an_error_or_a_valid_record() {
        let bytes = sample().to_bytes();
        for len in 0..bytes.len() {
            assert!(LayerRecord::from_bytes(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0xff;
            // Never a panic; whatever parses is a record that passed every check.
            let _ = LayerRecord::from_bytes(&flipped);
        }
    }

    #[test]
    fn a_record_that_inflates_past_the_bound_is_refused() {
        let encoded = sample().encode();
        let error = LayerRecord::decode(&encoded, 64).unwrap_err().to_string();
        assert!(error.contains("more than 64 bytes"), "{error}");
    }

    #[test]
    fn lying_counts_and_pieces_are_refused_by_name() {
        let mut record = sample();
        if let RecordBody::Regular { size, .. } = &mut record.entries[1].body {
            *size = 151;
        }
        let error = LayerRecord::from_bytes(&record.to_bytes()).unwrap_err().to_string();
        assert!(error.contains("pieces cover 150 bytes of a 151-byte file"), "{error}");
        let mut bytes = sample().to_bytes();
        bytes[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = LayerRecord::from_bytes(&bytes).unwrap_err().to_string();
        assert!(error.contains("entries do not fit"), "{error}");
        let mut record = sample();
        record.entries[2].path = b"etc/../x".to_vec();
        let error = LayerRecord::from_bytes(&record.to_bytes()).unwrap_err().to_string();
        assert!(error.contains("bad path"), "{error}");
    }
}
