//! The local chunk cache of one image: plain (decompressed, verified) chunk bytes
//! in a sparse data file, chunk N at offset N × slot, and a readiness bitmap file.
//!
//! Crash safety: a chunk's bytes are written and `fdatasync`ed before its bit is
//! set, and bits are set with single-byte writes, so after a kill -9 or power loss
//! a set bit always means the bytes are durable. A cleared or lost bit only costs a
//! refetch. Bytes are verified against their blake3 digest before they are written,
//! so the cache never holds bytes that failed verification.
//!
//! Why plain bytes at fixed slots rather than a mirror of the compressed blob: a
//! cached read is one `pread` of exactly the bytes asked for (no decompression, no
//! index), the data file is sparse so unused slot space costs nothing, and the
//! location of a chunk needs no table built at mount time.

use crate::error::{DaemonError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Readiness of every chunk of one image plus its data file.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    data: File,
    bitmap_file: File,
    /// In-memory copy of the bitmap; the file is the durable truth.
    bitmap: Mutex<Vec<u8>>,
    slot: u64,
    chunk_count: u32,
}

impl ChunkCache {
    /// Opens (or creates) the cache in `dir` for `chunk_count` chunks of at most
    /// `slot` bytes each. A bitmap of the wrong size is discarded (all chunks refetched).
    pub fn open(dir: &Path, chunk_count: u32, slot: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(DaemonError::io("create cache directory", dir))?;
        let data_path = dir.join("data");
        let bitmap_path = dir.join("ready");
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(DaemonError::io("open cache file", path))
        };
        let data = open(&data_path)?;
        let bitmap_file = open(&bitmap_path)?;
        let expected_len = (chunk_count as usize).div_ceil(8);
        let mut bitmap = std::fs::read(&bitmap_path).map_err(DaemonError::io("read", &bitmap_path))?;
        if bitmap.len() != expected_len {
            if !bitmap.is_empty() {
                tracing::warn!(path = %bitmap_path.display(), "readiness bitmap has the wrong size; discarding the cache");
            }
            bitmap = vec![0; expected_len];
            bitmap_file
                .set_len(0)
                .map_err(DaemonError::io("truncate", &bitmap_path))?;
            bitmap_file
                .write_all_at(&bitmap, 0)
                .map_err(DaemonError::io("write", &bitmap_path))?;
            data.set_len(0).map_err(DaemonError::io("truncate", &data_path))?;
        }
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            data,
            bitmap_file,
            bitmap: Mutex::new(bitmap),
            slot,
            chunk_count,
        })
    }

    /// Whether chunk `index` is cached.
    pub fn is_ready(&self, index: u32) -> bool {
        if index >= self.chunk_count {
            return false;
        }
        let bitmap = self.bitmap.lock().expect("bitmap lock");
        bitmap[(index / 8) as usize] & (1 << (index % 8)) != 0
    }

    /// Number of cached chunks.
    pub fn ready_count(&self) -> u64 {
        let bitmap = self.bitmap.lock().expect("bitmap lock");
        bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Reads `buf.len()` plain bytes at `offset` inside cached chunk `index`.
    pub fn read(&self, index: u32, offset: u32, buf: &mut [u8]) -> Result<()> {
        let at = u64::from(index) * self.slot + u64::from(offset);
        self.data
            .read_exact_at(buf, at)
            .map_err(DaemonError::io("read cache data", self.dir.join("data")))
    }

    /// Stores verified chunks durably, then marks them ready.
    pub fn store(&self, chunks: &[(u32, &[u8])]) -> Result<()> {
        for (index, bytes) in chunks {
            if bytes.len() as u64 > self.slot {
                return Err(DaemonError::ChunkTooLarge {
                    chunk: *index,
                    size: bytes.len() as u32,
                    slot: self.slot,
                });
            }
            self.data
                .write_all_at(bytes, u64::from(*index) * self.slot)
                .map_err(DaemonError::io("write cache data", self.dir.join("data")))?;
        }
        if chunks.is_empty() {
            return Ok(());
        }
        self.data
            .sync_data()
            .map_err(DaemonError::io("sync cache data", self.dir.join("data")))?;
        let mut bitmap = self.bitmap.lock().expect("bitmap lock");
        for (index, _) in chunks {
            let byte = (index / 8) as usize;
            bitmap[byte] |= 1 << (index % 8);
            self.bitmap_file
                .write_all_at(&bitmap[byte..byte + 1], byte as u64)
                .map_err(DaemonError::io("write readiness bitmap", self.dir.join("ready")))?;
        }
        Ok(())
    }

    /// Clears chunk `index` (its cached bytes turned out bad); it will be refetched.
    pub fn invalidate(&self, index: u32) -> Result<()> {
        let mut bitmap = self.bitmap.lock().expect("bitmap lock");
        let byte = (index / 8) as usize;
        if byte < bitmap.len() {
            bitmap[byte] &= !(1 << (index % 8));
            self.bitmap_file
                .write_all_at(&bitmap[byte..byte + 1], byte as u64)
                .map_err(DaemonError::io("write readiness bitmap", self.dir.join("ready")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_rejects_a_wrong_size_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 20, 4096).unwrap();
        assert!(!cache.is_ready(3));
        cache.store(&[(3, b"three"), (17, b"seventeen")]).unwrap();
        assert!(cache.is_ready(3) && cache.is_ready(17) && !cache.is_ready(4));
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 20, 4096).unwrap();
        assert_eq!(cache.ready_count(), 2);
        let mut buf = [0u8; 4];
        cache.read(17, 5, &mut buf).unwrap();
        assert_eq!(&buf, b"teen");
        cache.invalidate(17).unwrap();
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 21 * 8, 4096).unwrap();
        assert_eq!(cache.ready_count(), 0, "a bitmap of another size is discarded");
        assert!(cache.store(&[(1, &[0u8; 5000])]).is_err(), "larger than a slot");
    }
}
