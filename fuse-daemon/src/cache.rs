//! One image's view of the node-wide chunk store: chunk index → digest → stored
//! bytes, with an in-memory bitset remembering which chunks were seen stored (a
//! chunk evicted since is noticed when its read finds no file, and refetched).
//!
//! A chunk this daemon did not store itself (left by an earlier run, another
//! daemon, `petrel warm`) is re-hashed the first time this daemon finds it: one
//! flipped byte on disk makes it dropped and fetched again, never served. Chunks
//! fetched here were verified on the way in. The cost is one read and one BLAKE3
//! pass per chunk per daemon lifetime (measured in `scripts/bench.sh mount`).

use crate::error::{DaemonError, Result};
use crate::image::MappedImage;
use crate::stats::Stats;
use crate::store::ChunkStore;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The chunks of one image in the node's store.
#[derive(Debug)]
pub struct ChunkCache {
    image: Arc<MappedImage>,
    store: Arc<ChunkStore>,
    seen: Vec<AtomicU64>,
    stats: Arc<Stats>,
}

impl ChunkCache {
    pub fn new(image: Arc<MappedImage>, store: Arc<ChunkStore>, stats: Arc<Stats>) -> Self {
        let words = (image.bootstrap().chunk_count() as usize).div_ceil(64);
        ChunkCache {
            image,
            store,
            seen: (0..words).map(|_| AtomicU64::new(0)).collect(),
            stats,
        }
    }

    /// Counts a cached chunk or file dropped for failing its digest.
    pub fn note_corrupt(&self) {
        self.stats.cache_corrupt_dropped.fetch_add(1, Relaxed);
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    fn digest(&self, index: u32) -> Option<[u8; 32]> {
        self.image.bootstrap().chunk(index).ok().map(|c| c.digest)
    }

    fn mark(&self, index: u32, on: bool) {
        if let Some(word) = self.seen.get(index as usize / 64) {
            let bit = 1u64 << (index % 64);
            if on {
                word.fetch_or(bit, Relaxed);
            } else {
                word.fetch_and(!bit, Relaxed);
            }
        }
    }

    /// Whether chunk `index` is in the store.
    pub fn is_ready(&self, index: u32) -> bool {
        let Some(word) = self.seen.get(index as usize / 64) else {
            return false;
        };
        if word.load(Relaxed) & (1 << (index % 64)) != 0 {
            return true;
        }
        let Some(digest) = self.digest(index) else {
            return false;
        };
        // First sight of a chunk stored by someone else: check its bytes once.
        let present = match self.store.verify(&digest) {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    chunk = index,
                    digest = %hex::encode(digest),
                    "a cached chunk does not match its digest; dropping it to fetch it again"
                );
                self.store.remove(&digest);
                self.note_corrupt();
                false
            }
            Err(_) => false,
        };
        if present {
            self.mark(index, true);
        }
        present
    }

    /// Whether chunk `index` is in the store, after looking at what other processes
    /// stored just now (a fetch is about to be spent on it otherwise).
    pub fn is_ready_now(&self, index: u32) -> bool {
        if self.is_ready(index) {
            return true;
        }
        self.store.refresh();
        self.is_ready(index)
    }

    /// Number of this image's chunks in the store.
    pub fn ready_count(&self) -> u64 {
        (0..self.image.bootstrap().chunk_count())
            .filter(|&i| self.is_ready(i))
            .count() as u64
    }

    /// Reads plain bytes at `offset` of chunk `index`. An `Io` error of kind
    /// `NotFound` means the chunk was evicted: call `forget` and fetch it again.
    pub fn read(&self, index: u32, offset: u32, buf: &mut [u8]) -> Result<()> {
        let digest = self
            .digest(index)
            .ok_or_else(|| DaemonError::Invalid(format!("chunk {index} out of range")))?;
        self.store
            .read(&digest, offset, buf)
            .map_err(DaemonError::io("read cached chunk", self.store.root()))
    }

    /// Forgets that chunk `index` was stored (it was evicted).
    pub fn forget(&self, index: u32) {
        self.mark(index, false);
    }

    /// Stores verified chunks; they are then ready here, and durable (known to other
    /// daemons) shortly after: `ChunkStore::put_readable`.
    pub fn put(&self, chunks: &[(u32, &[u8])]) -> Result<()> {
        let by_digest: Vec<([u8; 32], &[u8])> = chunks
            .iter()
            .filter_map(|(i, b)| Some((self.digest(*i)?, *b)))
            .collect();
        self.store.put_readable(&by_digest)?;
        for (index, _) in chunks {
            self.mark(*index, true);
        }
        Ok(())
    }
}
