//! Counters of a mount, shown by `petrel stats` as JSON or Prometheus text
//! (`crate::exposition`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (microseconds) of the read latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    10, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

/// Live counters; all updates are relaxed atomics (cheap on the read path).
#[derive(Debug, Default)]
pub struct Stats {
    pub backend_requests: AtomicU64,
    pub backend_bytes: AtomicU64,
    pub backend_errors: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub chunks_failed_verification: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub reads: AtomicU64,
    pub read_errors: AtomicU64,
    pub bytes_served: AtomicU64,
    /// Reads that waited for another reader's (or the prefetcher's) fetch of the same chunk.
    pub waited_on_inflight: AtomicU64,
    pub prefetch_requests: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    /// Requests of the on-demand readahead (directories, whole ELF files, files read
    /// front to back), fetched ahead of readers without a profile.
    pub readahead_requests: AtomicU64,
    pub readahead_bytes: AtomicU64,
    /// Chunk reads served by data the prefetcher or the readahead fetched.
    pub prefetch_hits: AtomicU64,
    /// Opens answered with a backing file (FUSE passthrough): their reads bypass FUSE
    /// and these counters.
    pub passthrough_opens: AtomicU64,
    /// Opens the daemon was asked about (none once the kernel opens files alone,
    /// `crate::file_opens`).
    pub daemon_opens: AtomicU64,
    /// Cached chunks (and materialized files) found not to match their digest when
    /// first used, dropped and fetched again instead of served.
    pub cache_corrupt_dropped: AtomicU64,
    /// Fetched chunks the cache could not store (a full or failing cache disk); the
    /// reads were served all the same.
    pub cache_put_failures: AtomicU64,
    /// Bytes this daemon's node cache holds that are not yet durable
    /// (`ChunkStore::uncommitted_bytes`): a crash now loses them.
    pub cache_uncommitted_bytes: Arc<AtomicU64>,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub backend_requests: u64,
    pub backend_bytes: u64,
    pub backend_errors: u64,
    pub chunks_fetched: u64,
    pub chunks_failed_verification: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub reads: u64,
    pub read_errors: u64,
    pub bytes_served: u64,
    pub waited_on_inflight: u64,
    pub prefetch_requests: u64,
    pub prefetch_bytes: u64,
    #[serde(default)]
    pub readahead_requests: u64,
    #[serde(default)]
    pub readahead_bytes: u64,
    pub prefetch_hits: u64,
    #[serde(default)]
    pub passthrough_opens: u64,
    #[serde(default)]
    pub daemon_opens: u64,
    #[serde(default)]
    pub cache_corrupt_dropped: u64,
    #[serde(default)]
    pub cache_put_failures: u64,
    #[serde(default)]
    pub cache_uncommitted_bytes: u64,
    /// Reads per latency bucket; the last bucket is "above the largest bound".
    pub read_latency_buckets_us: Vec<(u64, u64)>,
    pub read_latency_sum_us: u64,
}

impl Stats {
    /// Counters from zero, with the node cache's gauge of bytes not yet durable.
    pub fn watching_cache(uncommitted_bytes: Arc<AtomicU64>) -> Self {
        Stats {
            cache_uncommitted_bytes: uncommitted_bytes,
            ..Stats::default()
        }
    }

    pub fn record_read(&self, latency: Duration, bytes: usize, ok: bool) {
        self.reads.fetch_add(1, Relaxed);
        if ok {
            self.bytes_served.fetch_add(bytes as u64, Relaxed);
        } else {
            self.read_errors.fetch_add(1, Relaxed);
        }
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let bounds = LATENCY_BUCKETS_US.iter().copied().chain(std::iter::once(u64::MAX));
        StatsSnapshot {
            backend_requests: self.backend_requests.load(Relaxed),
            backend_bytes: self.backend_bytes.load(Relaxed),
            backend_errors: self.backend_errors.load(Relaxed),
            chunks_fetched: self.chunks_fetched.load(Relaxed),
            chunks_failed_verification: self.chunks_failed_verification.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            reads: self.reads.load(Relaxed),
            read_errors: self.read_errors.load(Relaxed),
            bytes_served: self.bytes_served.load(Relaxed),
            waited_on_inflight: self.waited_on_inflight.load(Relaxed),
            prefetch_requests: self.prefetch_requests.load(Relaxed),
            prefetch_bytes: self.prefetch_bytes.load(Relaxed),
            readahead_requests: self.readahead_requests.load(Relaxed),
            readahead_bytes: self.readahead_bytes.load(Relaxed),
            prefetch_hits: self.prefetch_hits.load(Relaxed),
            passthrough_opens: self.passthrough_opens.load(Relaxed),
            daemon_opens: self.daemon_opens.load(Relaxed),
            cache_corrupt_dropped: self.cache_corrupt_dropped.load(Relaxed),
            cache_put_failures: self.cache_put_failures.load(Relaxed),
            cache_uncommitted_bytes: self.cache_uncommitted_bytes.load(Relaxed),
            read_latency_buckets_us: bounds.zip(self.latency.iter().map(|c| c.load(Relaxed))).collect(),
            read_latency_sum_us: self.latency_sum_us.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// The Prometheus (OpenMetrics) text of these counters, labelled `image`.
    pub fn prometheus(&self, image: &str) -> String {
        crate::exposition::encode(&[(image.to_string(), self.clone())], None)
    }
}
