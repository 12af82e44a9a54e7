//! Chunk encoding: blake3 digest of the plain bytes, then zstd when it helps.

use crate::error::{FormatError, Result};
use crate::features::CHUNK_FLAG_ZSTD;
use crate::reader::ChunkInfo;

/// zstd level chunks are compressed with by default (output bytes, and so blob
/// digests, depend on it: a build at one level is reproducible).
pub const ZSTD_LEVEL: i32 = 3;
/// The highest level a build may choose (`encode_digested_chunk_at`): beyond it,
/// each step costs several times the CPU for a fraction of a percent.
pub const MAX_ZSTD_LEVEL: i32 = 19;

/// A chunk ready to be stored.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub digest: [u8; 32],
    pub flags: u32,
    pub uncompressed_size: u32,
    /// The bytes to store: a zstd frame, or the plain bytes when zstd does not shrink them.
    pub stored: Vec<u8>,
}

/// Digest of a chunk's plain bytes.
pub fn chunk_digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Hashes and compresses one chunk.
pub fn encode_chunk(data: &[u8]) -> EncodedChunk {
    encode_digested_chunk(data, chunk_digest(data))
}

/// Compresses one chunk whose digest (`chunk_digest(data)`) the caller computed
/// already, e.g. to look it up in a dictionary first: hashing it again would cost
/// a tenth of what compressing it does.
pub fn encode_digested_chunk(data: &[u8], digest: [u8; 32]) -> EncodedChunk {
    encode_digested_chunk_at(data, digest, ZSTD_LEVEL)
}

/// `encode_digested_chunk` at zstd level `level` (clamped to 1..=`MAX_ZSTD_LEVEL`).
/// A chunk decodes the same whatever level encoded it.
pub fn encode_digested_chunk_at(data: &[u8], digest: [u8; 32], level: i32) -> EncodedChunk {
    debug_assert_eq!(digest, chunk_digest(data), "the digest of other bytes");
    let compressed = compress(data, level.clamp(1, MAX_ZSTD_LEVEL)).ok();
    let (flags, stored) = match compressed {
        Some(c) if c.len() < data.len() => (CHUNK_FLAG_ZSTD, c),
        _ => (0, data.to_vec()),
    };
    EncodedChunk {
        digest,
        flags,
        uncompressed_size: data.len() as u32,
        stored,
    }
}

thread_local! {
    /// One zstd compression context per thread, reused for every chunk it encodes
    /// (a new context allocates and clears its tables for each chunk). The output is
    /// the same bytes as a fresh context's: every chunk is one frame of its own.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-encodes `data` at `level` with this thread's context (set to `level` first
/// when it was last used at another).
fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        match slot.as_mut() {
            Some((at, compressor)) if *at != level => {
                compressor.set_compression_level(level)?;
                *at = level;
            }
            Some(_) => {}
            None => *slot = Some((level, zstd::bulk::Compressor::new(level)?)),
        }
        slot.as_mut().expect("set above").1.compress(data)
    })
}

thread_local! {
    /// One zstd decompression context per thread, reused for every chunk it decodes
    /// (creating one costs about as much as decoding a 64 KiB chunk).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-decodes `stored` into at most `capacity` bytes with this thread's context.
fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("set above").decompress(stored, capacity)
    })
}

/// Decodes the stored bytes of a chunk and checks them against its digest.
/// Never returns bytes that fail the check.
pub fn decode_chunk(chunk: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>> {
    decode(chunk, std::borrow::Cow::Borrowed(stored))
}

/// `decode_chunk` taking the stored bytes by value: a chunk stored plain is checked
/// and handed back in the same buffer, never copied (a fetch of big, incompressible
/// files moves each byte once fewer).
pub fn decode_chunk_owned(chunk: &ChunkInfo, stored: Vec<u8>) -> Result<Vec<u8>> {
    decode(chunk, std::borrow::Cow::Owned(stored))
}

fn decode(chunk: &ChunkInfo, stored: std::borrow::Cow<'_, [u8]>) -> Result<Vec<u8>> {
    check_stored_size(chunk, &stored)?;
    let plain = if chunk.compressed {
        decompress_chunk(chunk, &stored)?
    } else {
        stored.into_owned()
    };
    check_digest(chunk, plain)
}

fn bad_chunk(chunk: &ChunkInfo, reason: String) -> FormatError {
    FormatError::BadChunk {
        index: u64::from(chunk.index),
        reason,
    }
}

fn check_stored_size(chunk: &ChunkInfo, stored: &[u8]) -> Result<()> {
    if stored.len() != chunk.compressed_size as usize {
        return Err(bad_chunk(
            chunk,
            format!("got {} stored bytes, expected {}", stored.len(), chunk.compressed_size),
        ));
    }
    Ok(())
}

fn decompress_chunk(chunk: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>> {
    let plain = decompress(stored, chunk.uncompressed_size as usize)
        .map_err(|e| bad_chunk(chunk, format!("zstd decode failed: {e}")))?;
    if plain.len() != chunk.uncompressed_size as usize {
        return Err(bad_chunk(
            chunk,
            format!("decoded {} bytes, expected {}", plain.len(), chunk.uncompressed_size),
        ));
    }
    Ok(plain)
}

fn check_digest(chunk: &ChunkInfo, plain: Vec<u8>) -> Result<Vec<u8>> {
    let actual = chunk_digest(&plain);
    if actual != chunk.digest {
        return Err(bad_chunk(
            chunk,
            format!(
                "digest mismatch: expected blake3:{}, got blake3:{}",
                hex::encode(chunk.digest),
                hex::encode(actual)
            ),
        ));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(enc: &EncodedChunk) -> ChunkInfo {
        ChunkInfo {
            index: 7,
            digest: enc.digest,
            blob_index: 0,
            compressed: enc.flags & CHUNK_FLAG_ZSTD != 0,
            compressed_offset: 0,
            compressed_size: enc.stored.len() as u32,
            uncompressed_size: enc.uncompressed_size,
        }
    }

    #[test]
    fn compressible_and_random_round_trip() {
        let text = b"hello petrel ".repeat(1000);
        let enc = encode_chunk(&text);
        assert_eq!(enc.flags, CHUNK_FLAG_ZSTD);
        assert!(enc.stored.len() < text.len());
        assert_eq!(decode_chunk(&info(&enc), &enc.stored).unwrap(), text);

        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let enc = encode_chunk(&noise);
        assert_eq!(decode_chunk(&info(&enc), &enc.stored).unwrap(), noise);
    }

    #[test]
    fn a_chunk_digested_beforehand_is_stored_as_the_same_bytes() {
        for data in [
            b"hello petrel ".repeat(1000),
            (0..4096u32).map(|i| ((i * 7919) >> 3) as u8).collect(),
        ] {
            let whole = encode_chunk(&data);
            let digested = encode_digested_chunk(&data, chunk_digest(&data));
            assert_eq!(
                (
                    digested.digest,
                    digested.flags,
                    digested.uncompressed_size,
                    digested.stored
                ),
                (whole.digest, whole.flags, whole.uncompressed_size, whole.stored)
            );
        }
    }

    #[test]
    fn tampered_chunk_is_refused() {
        let text = b"abc".repeat(5000);
        let enc = encode_chunk(&text);
        let mut stored = enc.stored.clone();
        let last = stored.len() - 5;
        stored[last] ^= 0xff;
        assert!(decode_chunk(&info(&enc), &stored).is_err());
        let mut wrong = info(&enc);
        wrong.digest[0] ^= 1;
        let err = decode_chunk(&wrong, &enc.stored).unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        let mut short = info(&enc);
        short.uncompressed_size -= 1;
        assert!(decode_chunk(&short, &enc.stored).is_err());
    }

    #[test]
    fn an_owned_plain_chunk_comes_back_in_its_own_buffer_and_is_still_checked() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..70_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let enc = encode_chunk(&noise);
        assert_eq!(enc.flags, 0, "noise is stored plain");
        let stored = enc.stored.clone();
        let at = stored.as_ptr();
        let plain = decode_chunk_owned(&info(&enc), stored).unwrap();
        assert_eq!(plain, noise);
        assert_eq!(plain.as_ptr(), at, "no copy");

        let mut flipped = enc.stored.clone();
        flipped[100] ^= 1;
        let err = decode_chunk_owned(&info(&enc), flipped).unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        let err = decode_chunk_owned(&info(&enc), enc.stored[1..].to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("stored bytes"), "{err}");

        let text = b"hello petrel ".repeat(1000);
        let enc = encode_chunk(&text);
        assert_eq!(decode_chunk_owned(&info(&enc), enc.stored.clone()).unwrap(), text);
    }

    #[test]
    fn a_reused_compression_context_gives_the_bytes_a_fresh_one_gives() {
        // Big, small, repetitive and mixed chunks in turn on one thread's context:
        // each must come out as `zstd::bulk::compress` alone makes it (blob digests
        // depend on it).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut mixed = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if i % 3 == 0 {
                        (state >> 40) as u8
                    } else {
                        b"petrel"[i % 6]
                    }
                })
                .collect()
        };
        let inputs = [
            mixed(256 << 10),
            b"x".repeat(100),
            mixed(70_000),
            b"hello petrel ".repeat(20_000),
            mixed(3000),
            mixed(1 << 20),
            b"tail".to_vec(),
        ];
        for data in &inputs {
            let fresh = zstd::bulk::compress(data, ZSTD_LEVEL).unwrap();
            let enc = encode_chunk(data);
            if fresh.len() < data.len() {
                assert_eq!(enc.stored, fresh, "{} bytes", data.len());
            } else {
                assert_eq!(&enc.stored, data);
            }
        }
    }

    #[test]
    fn a_context_switching_levels_encodes_as_a_fresh_one_at_each_and_every_level_decodes() {
        let data = b"petrel chunk at some level, ".repeat(4000);
        let digest = chunk_digest(&data);
        for level in [3, 9, 1, 19, 3, 0, 40] {
            let enc = encode_digested_chunk_at(&data, digest, level);
            let fresh = zstd::bulk::compress(&data, level.clamp(1, MAX_ZSTD_LEVEL)).unwrap();
            assert_eq!(enc.stored, fresh, "level {level}");
            let back = zstd::bulk::decompress(&enc.stored, data.len()).unwrap();
            assert_eq!(back, data, "level {level}");
        }
    }
}
