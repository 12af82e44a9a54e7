//! Background prefetch: streams the image's prefetch region (or the whole image)
//! into the cache in large merged range requests, several at once, optionally
//! under a bandwidth cap. It goes through the fetcher, so a reader that wants a
//! chunk being prefetched waits for that fetch instead of starting another, and
//! on-demand reads never wait in a prefetch queue (they do not use one). Chunks
//! already cached are skipped, so a restarted daemon continues where it stopped.

use crate::fetch::Fetcher;
use crate::image::MappedImage;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchMode {
    Off,
    /// The prefetch region at the front of each blob (the prefetch table's data).
    #[default]
    Table,
    /// Every chunk: afterwards the image runs with the registry unreachable.
    All,
}

impl std::str::FromStr for PrefetchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(PrefetchMode::Off),
            "table" => Ok(PrefetchMode::Table),
            "all" => Ok(PrefetchMode::All),
            other => Err(format!("prefetch mode {other:?}: use off, table or all")),
        }
    }
}

/// How to prefetch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    pub mode: PrefetchMode,
    /// Stored bytes per range request.
    #[serde(deserialize_with = "crate::byte_size::deserialize")]
    pub request_bytes: u64,
    /// Range requests in flight at once.
    pub parallel: usize,
    /// Bytes per second across all prefetch requests; none: unlimited.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::byte_size::deserialize_option"
    )]
    pub bandwidth: Option<u64>,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            mode: PrefetchMode::Table,
            request_bytes: 8 << 20,
            parallel: 2,
            bandwidth: None,
        }
    }
}

/// Chunk index ranges to prefetch, in blob order.
pub fn prefetch_ranges(image: &MappedImage, mode: PrefetchMode) -> Vec<(u32, u32)> {
    let bootstrap = image.bootstrap();
    let count = bootstrap.chunk_count();
    match mode {
        PrefetchMode::Off => Vec::new(),
        PrefetchMode::All => vec![(0, count)],
        PrefetchMode::Table => {
            let mut ranges: Vec<(u32, u32)> = Vec::new();
            for index in 0..count {
                let Ok(chunk) = bootstrap.chunk(index) else { continue };
                let Ok(blob) = bootstrap.blob(chunk.blob_index) else {
                    continue;
                };
                if chunk.compressed_offset < blob.prefetch_end {
                    match ranges.last_mut() {
                        Some((_, end)) if *end == index => *end = index + 1,
                        _ => ranges.push((index, index + 1)),
                    }
                }
            }
            ranges
        }
    }
}

/// Stored bytes of the chunks in `ranges`.
pub fn ranges_bytes(image: &MappedImage, ranges: &[(u32, u32)]) -> u64 {
    let bootstrap = image.bootstrap();
    ranges
        .iter()
        .flat_map(|&(a, b)| a..b)
        .filter_map(|i| bootstrap.chunk(i).ok())
        .map(|c| u64::from(c.compressed_size))
        .sum()
}

struct Cursor {
    ranges: Vec<(u32, u32)>,
    range: usize,
    next: u32,
}

/// The running prefetch.
#[derive(Debug)]
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Stored bytes fetched so far by this prefetcher.
    pub fetched: Arc<AtomicU64>,
}

impl Prefetcher {
    pub fn start(image: &Arc<MappedImage>, fetcher: Arc<Fetcher>, config: PrefetchConfig) -> Self {
        Self::start_ranges(image, fetcher, prefetch_ranges(image, config.mode), config)
    }

    /// Prefetches the chunk ranges `ranges` (`[start, end)`, in this order).
    pub fn start_ranges(
        image: &Arc<MappedImage>,
        fetcher: Arc<Fetcher>,
        ranges: Vec<(u32, u32)>,
        config: PrefetchConfig,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let fetched = Arc::new(AtomicU64::new(0));
        let next = ranges.first().map_or(0, |r| r.0);
        let cursor = Arc::new(Mutex::new(Cursor { ranges, range: 0, next }));
        let link_free_at = Arc::new(Mutex::new(Instant::now()));
        let threads = (0..config.parallel.max(1))
            .map(|i| {
                let (image, fetcher, cursor, stop, fetched, link) = (
                    Arc::clone(image),
                    Arc::clone(&fetcher),
                    Arc::clone(&cursor),
                    Arc::clone(&stop),
                    Arc::clone(&fetched),
                    Arc::clone(&link_free_at),
                );
                std::thread::Builder::new()
                    .name(format!("petrel-prefetch-{i}"))
                    .spawn(move || run(&image, &fetcher, &cursor, &stop, &fetched, &link, config))
                    .expect("spawn prefetcher")
            })
            .collect();
        Prefetcher { stop, threads, fetched }
    }

    /// Asks the threads to stop after their current request (does not wait).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits until everything is prefetched (or stopped).
    pub fn wait(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }

    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }
}

/// Stored bytes of ranges apart in the blob that one request gathers (a multi-range
/// request). A profile's ranges are small and scattered: measured on the Python
/// service (`scripts/bench.sh apps`, profile given at mount), one range a request
/// took 184 requests and 2.61 s; 8 MiB of ranges a request 23 requests but 2.96 s,
/// as the first files read waited behind later ones.
const GATHER_BYTES: u64 = 1 << 20;

/// Takes the next windows of chunks (`[start, end)`, in the order of the ranges):
/// one window of up to `bytes` stored bytes, and with it following windows while
/// they add up to at most `GATHER_BYTES` (at most `MAX_RANGES` in all): one
/// request's worth, ranges apart in the blob going in one multi-range request.
fn next_windows(image: &MappedImage, cursor: &Mutex<Cursor>, bytes: u64) -> Vec<(u32, u32)> {
    let bootstrap = image.bootstrap();
    let mut c = cursor.lock().expect("cursor lock");
    let mut windows = Vec::new();
    let mut taken = 0u64;
    let limit = |windows: &Vec<(u32, u32)>| match windows.is_empty() {
        true => bytes,
        false => GATHER_BYTES.min(bytes),
    };
    while c.range < c.ranges.len() && taken < limit(&windows) && windows.len() < crate::fetch::MAX_RANGES {
        let (_, end) = c.ranges[c.range];
        if c.next >= end {
            c.range += 1;
            if let Some(&(start, _)) = c.ranges.get(c.range) {
                c.next = start;
            }
            continue;
        }
        let start = c.next;
        let mut stop_at = start;
        let most = limit(&windows);
        while stop_at < end && (taken == 0 || taken < most) {
            taken += bootstrap.chunk(stop_at).map_or(0, |ch| u64::from(ch.compressed_size));
            stop_at += 1;
        }
        c.next = stop_at;
        windows.push((start, stop_at));
    }
    windows
}

fn run(
    image: &MappedImage,
    fetcher: &Fetcher,
    cursor: &Mutex<Cursor>,
    stop: &AtomicBool,
    fetched: &AtomicU64,
    link_free_at: &Mutex<Instant>,
    config: PrefetchConfig,
) {
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let windows = next_windows(image, cursor, config.request_bytes);
        if windows.is_empty() {
            return;
        }
        let bytes = fetcher.fetch_ranges(&windows, config.request_bytes, crate::backend::ReadPurpose::Background);
        fetched.fetch_add(bytes, Ordering::Relaxed);
        if let Some(rate) = config.bandwidth.filter(|r| *r > 0) {
            let wake = {
                let mut free = link_free_at.lock().expect("link lock");
                *free = (*free).max(Instant::now()) + Duration::from_secs_f64(bytes as f64 / rate as f64);
                *free
            };
            let now = Instant::now();
            if wake > now {
                std::thread::sleep(wake - now);
            }
        }
    }
}
