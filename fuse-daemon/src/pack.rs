//! Pack files of the node-wide chunk store (`<cache>/packs/`). Chunks are appended
//! to large pack files instead of one file per chunk: no inode, `open`, `rename` or
//! `fdatasync` per 64 KiB chunk, and one `fdatasync` per stored batch.
//!
//! Every process that stores chunks appends to packs of its own, so several daemons
//! share a cache without locking each other: `<id>.pack` holds plain chunk bytes,
//! `<id>.idx` one 64-byte `IndexRecord` per chunk (or per tombstone), appended only
//! after the chunk bytes it names are durable. A crash leaves at worst bytes that no
//! record names, or a torn last record that fails its check and is ignored; never a
//! record naming bytes that are not there. Another process's GC may remove a pack
//! still being written: its writer sees the unlinked file (link count 0) after the
//! append and starts a new pack, and what it appended there is fetched again.
//!
//! ```text
//! IndexRecord (64 bytes, little-endian)
//! 0  magic   u32  "PKI1"
//! 4  kind    u32  1: chunk, 2: tombstone (the chunk at pack/offset is gone)
//! 8  pack    u64  pack id holding the bytes (a chunk's own pack)
//! 16 offset  u64  where its bytes start in the pack
//! 24 length  u32  plain bytes
//! 28 check   u32  first 4 bytes of BLAKE3 over bytes 0..28 and the digest
//! 32 digest  [u8; 32]  BLAKE3 of the chunk's plain bytes
//! ```

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `"PKI1"` read as a little-endian u32.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"PKI1");
pub const KIND_CHUNK: u32 = 1;
pub const KIND_TOMBSTONE: u32 = 2;

/// One entry of a pack's index file.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct IndexRecord {
    pub magic: U32,
    pub kind: U32,
    pub pack: U64,
    pub offset: U64,
    pub length: U32,
    pub check: U32,
    pub digest: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<IndexRecord>() == 64);

/// Bytes of one index record.
pub const RECORD_BYTES: usize = std::mem::size_of::<IndexRecord>();

/// A decoded, checked index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tombstone: bool,
    pub pack: u64,
    pub offset: u64,
    pub length: u32,
    pub digest: [u8; 32],
}

/// The first 4 bytes of the BLAKE3 hash of `head` then `digest`. Hashed in one
/// call from a buffer on the stack: a `blake3::Hasher` per record (it clears about
/// 2 KB) was a tenth of opening a store of 1M chunks.
fn check_of(head: &[u8; 28], digest: &[u8; 32]) -> u32 {
    let mut bytes = [0u8; 60];
    bytes[..28].copy_from_slice(head);
    bytes[28..].copy_from_slice(digest);
    let hash = blake3::hash(&bytes);
    u32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes"))
}

impl Entry {
    /// The record's 64 bytes.
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut record = IndexRecord {
            magic: RECORD_MAGIC.into(),
            kind: if self.tombstone { KIND_TOMBSTONE } else { KIND_CHUNK }.into(),
            pack: self.pack.into(),
            offset: self.offset.into(),
            length: self.length.into(),
            check: 0.into(),
            digest: self.digest,
        };
        record.check = check_of(record.as_bytes()[..28].try_into().expect("28 bytes"), &self.digest).into();
        let mut out = [0u8; RECORD_BYTES];
        out.copy_from_slice(record.as_bytes());
        out
    }

    /// The entry in `bytes`, if they are a whole, intact record.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let record = IndexRecord::read_from_bytes(bytes).ok()?;
        if record.magic.get() != RECORD_MAGIC
            || record.check.get() != check_of(bytes[..28].try_into().expect("28 bytes"), &record.digest)
        {
            return None;
        }
        let tombstone = match record.kind.get() {
            KIND_CHUNK => false,
            KIND_TOMBSTONE => true,
            _ => return None,
        };
        Some(Entry {
            tombstone,
            pack: record.pack.get(),
            offset: record.offset.get(),
            length: record.length.get(),
            digest: record.digest,
        })
    }
}

/// `<id>.pack`.
pub fn pack_file_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

/// `<id>.idx`.
pub fn index_file_name(id: u64) -> String {
    format!("{id:016x}.idx")
}

/// The pack id of `<id>.pack` or `<id>.idx`, and whether it is the index.
pub fn parse_file_name(name: &str) -> Option<(u64, bool)> {
    let (stem, index) = match (name.strip_suffix(".pack"), name.strip_suffix(".idx")) {
        (Some(stem), _) => (stem, false),
        (_, Some(stem)) => (stem, true),
        _ => return None,
    };
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok().map(|id| (id, index))
}

/// The id bit that marks a file pack: a regular file's bytes in file order, written
/// whole when the file was materialized for passthrough and then never changed. Its
/// whole chunks are indexed like any pack's, so the backing file is the cache's only
/// copy of them; it is never compacted (its unindexed bytes are the file's too),
/// only evicted or removed with its file.
pub const FILE_PACK_BIT: u64 = 1 << 63;

/// Whether pack `id` is a file pack.
pub fn is_file_pack(id: u64) -> bool {
    id & FILE_PACK_BIT != 0
}

/// A fresh id for a pack of chunks, unlikely to meet another process's.
pub fn new_pack_id() -> u64 {
    random_id() & !FILE_PACK_BIT
}

/// A fresh id for a file pack.
pub fn new_file_pack_id() -> u64 {
    random_id() | FILE_PACK_BIT
}

fn random_id() -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.update(&now.as_nanos().to_le_bytes());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    hasher.update(&COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
    u64::from_le_bytes(hasher.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let entry = Entry {
            tombstone: false,
            pack: 0x1234_5678_9abc_def0,
            offset: 1 << 33,
            length: 65_536,
            digest: [7; 32],
        };
        let bytes = entry.encode();
        assert_eq!(Entry::decode(&bytes), Some(entry));
        for at in [0, 5, 9, 20, 26, 30, 40, 63] {
            let mut bad = bytes;
            bad[at] ^= 1;
            assert_eq!(Entry::decode(&bad), None, "a flipped bit at {at}");
        }
        assert_eq!(Entry::decode(&bytes[..63]), None, "a torn record");
        assert_eq!(Entry::decode(&[0u8; 64]), None, "zeros");
        let tomb = Entry {
            tombstone: true,
            ..entry
        };
        assert_eq!(Entry::decode(&tomb.encode()), Some(tomb));
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_file_name(&pack_file_name(42)), Some((42, false)));
        assert_eq!(parse_file_name(&index_file_name(u64::MAX)), Some((u64::MAX, true)));
        assert_eq!(parse_file_name("zz.pack"), None);
        assert_eq!(parse_file_name("00000000000000ag.idx"), None);
        assert_eq!(parse_file_name("tmp"), None);
        assert!(is_file_pack(new_file_pack_id()) && !is_file_pack(new_pack_id()));
    }
}
