//! Makes chunks ready: merges neighbouring missing chunks into one range request,
//! extends it over following not-yet-ready chunks up to the amplification window,
//! verifies every chunk, stores it in the cache, and lets every reader waiting for
//! a chunk share one fetch.

use crate::backend::{Backend, ReadPurpose};
use crate::cache::ChunkCache;
use crate::error::{DaemonError, Result};
use crate::image::MappedImage;
use crate::stats::Stats;
use petrel_format::codec::{decode_chunk, decode_chunk_owned};
use petrel_format::reader::{ChunkInfo, FileSegment, SegmentSource};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};

/// Default amplification window: a fetch extends over following missing chunks up
/// to this many stored bytes. Measured with `scripts/bench.sh registry
/// --amplify-only` (startup of the app image, on demand): 256 KiB was the fastest
/// window on 20 Mbit/s + 50 ms, 100 Mbit/s + 20 ms and 1 Gbit/s + 2 ms links (0.70,
/// 0.82 and 0.65 of 1 MiB's time) and fetched half the bytes of 1 MiB.
pub const DEFAULT_AMPLIFY_BYTES: u64 = 256 << 10;
/// Largest window on-demand fetches grow to while misses walk a blob in order
/// (`Fetcher::stream_window`). Measured with `scripts/bench.sh apps --read-all`
/// (every file of the Python image, registry on loopback): 4.50 s without growth,
/// 3.58 s with it (plain disk 1.3 s); the service's startup was unchanged (6.65 s
/// and 6.68 s, 221 and 217 requests). A window only covers chunks that are missing
/// and contiguous, so a miss amid cached chunks still fetches little.
pub const STREAM_MAX_BYTES: u64 = 4 << 20;
/// Largest single range request, whatever the read asked for.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Most decoded bytes one request may produce. Stored bytes say little: a 16 MiB
/// chunk of one repeated byte is ~500 stored bytes, so a request is also bounded by
/// what its chunks decode to (always at least one chunk, at most
/// `petrel_format::chunker::MAX_CHUNK_SIZE`).
pub const MAX_REQUEST_DECODED_BYTES: u64 = 64 << 20;
/// Most runs of chunks apart in the blob one request asks for (a multi-range request).
pub use petrel_registry::client::multi_range::MAX_RANGES;
/// Most decoded bytes a daemon's fetches hold at once; further fetches wait.
pub const MAX_DAEMON_DECODED_BYTES: u64 = 256 << 20;
/// Most stored bytes before a reader's chunks in the blob that its request takes
/// along (see `Fetcher::take_along`): the amplification window.
const ALONG_BEFORE_BYTES: u64 = DEFAULT_AMPLIFY_BYTES;
/// Most fetches handed off by readers running at once; beyond that a reader runs
/// its fetch on its own thread (and waits for all of it, as it did before).
const MAX_HANDED_OFF: usize = 64;

/// The outcome of one chunk's fetch, shared by everyone who waited for it.
type Outcome = std::result::Result<Arc<Vec<u8>>, Arc<DaemonError>>;

#[derive(Debug, Default)]
struct Flight {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

/// Plain bytes of a chunk, either in the cache or just fetched.
#[derive(Debug, Clone)]
pub enum ChunkBytes {
    Cached,
    Fetched(Arc<Vec<u8>>),
}

/// Fetches chunks of one image.
#[derive(Debug)]
pub struct Fetcher {
    image: Arc<MappedImage>,
    backend: Arc<dyn Backend>,
    cache: Arc<ChunkCache>,
    stats: Arc<Stats>,
    amplify_bytes: u64,
    in_flight: Mutex<HashMap<u32, Arc<Flight>>>,
    /// Per blob: the window of the last on-demand fetch (see `stream_window`).
    streams: Mutex<HashMap<u32, u64>>,
    prefetched: ChunkMarks,
    decoded: ByteBudget,
    cache_warning: Throttle,
    /// Threads that run a reader's fetch, so the reader is answered once its own
    /// chunks are in, not once the rest of the request is in and cached.
    handed_off: Arc<crate::workers::Elastic>,
}

/// Chunk ranges a miss may take along in its request (the readahead of its
/// directory and package), and what to do once the request is planned (push the
/// readahead, which then skips what the request took).
#[derive(Default)]
pub struct Along {
    /// The file read (for the log).
    ino: u32,
    ranges: Vec<(u32, u32)>,
    /// Most stored bytes of the ranges taken.
    budget: u64,
    then: Option<Box<dyn FnOnce() + Send>>,
}

impl Along {
    pub fn new(ino: u32, ranges: Vec<(u32, u32)>, budget: u64, then: Box<dyn FnOnce() + Send>) -> Self {
        Along {
            ino,
            ranges,
            budget,
            then: Some(then),
        }
    }

    /// Runs `then`, once.
    fn planned(&mut self) {
        self.ranges.clear();
        if let Some(then) = self.then.take() {
            then();
        }
    }
}

impl Drop for Along {
    /// A read that failed before it planned a request still pushes its readahead.
    fn drop(&mut self) {
        self.planned();
    }
}

impl std::fmt::Debug for Along {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Along")
            .field("ranges", &self.ranges.len())
            .field("budget", &self.budget)
            .finish()
    }
}

/// Lets something happen at most once per interval (a log line that could repeat
/// for every fetch).
#[derive(Debug)]
struct Throttle {
    interval: std::time::Duration,
    last: Mutex<Option<std::time::Instant>>,
}

impl Throttle {
    fn new(interval: std::time::Duration) -> Self {
        Throttle {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True at most once per interval.
    fn due(&self) -> bool {
        let mut last = self.last.lock().expect("throttle lock");
        if last.is_some_and(|at| at.elapsed() < self.interval) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }
}

/// A counting bound on bytes held at once: `take` waits until `amount` fits.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    held: Mutex<u64>,
    freed: Condvar,
}

/// Bytes taken from a `ByteBudget`, given back when dropped.
#[derive(Debug)]
pub struct BudgetGuard<'a> {
    budget: &'a ByteBudget,
    amount: u64,
}

impl ByteBudget {
    pub fn new(limit: u64) -> Self {
        ByteBudget {
            limit,
            held: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Takes `amount` (at most the whole limit) once it fits.
    pub fn take(&self, amount: u64) -> BudgetGuard<'_> {
        let amount = amount.min(self.limit);
        let mut held = self.held.lock().expect("budget lock");
        while *held + amount > self.limit {
            held = self.freed.wait(held).expect("budget lock");
        }
        *held += amount;
        BudgetGuard { budget: self, amount }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        *self.held.lock().expect("budget lock")
    }
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        *self.budget.held.lock().expect("budget lock") -= self.amount;
        self.budget.freed.notify_all();
    }
}

/// One bit per chunk: fetched by the prefetcher and not yet read.
#[derive(Debug)]
struct ChunkMarks(Vec<std::sync::atomic::AtomicU64>);

impl ChunkMarks {
    fn new(chunks: u32) -> Self {
        ChunkMarks(
            (0..(chunks as usize).div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        )
    }
    fn mark(&self, index: u32) {
        if let Some(word) = self.0.get(index as usize / 64) {
            word.fetch_or(1 << (index % 64), Relaxed);
        }
    }
    /// Clears the mark; true if it was set.
    fn take(&self, index: u32) -> bool {
        self.0
            .get(index as usize / 64)
            .is_some_and(|w| w.fetch_and(!(1 << (index % 64)), Relaxed) & (1 << (index % 64)) != 0)
    }
}

thread_local! {
    /// The buffer of this thread's last read, for its next one. A fresh buffer must
    /// be zeroed first: reading a cached 1 GiB file through FUSE, that was 9 % of the
    /// daemon's CPU.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers larger than this are not kept for the next read.
const MAX_RECYCLED_BYTES: usize = 4 << 20;

/// Gives a read's bytes (from [`Fetcher::read_along`]), once answered, back to this
/// thread for its next read.
pub fn recycle(bytes: Vec<u8>) {
    if bytes.capacity() <= MAX_RECYCLED_BYTES {
        READ_BUFFER.with(|b| *b.borrow_mut() = bytes);
    }
}

impl Fetcher {
    pub fn new(
        image: Arc<MappedImage>,
        backend: Arc<dyn Backend>,
        cache: Arc<ChunkCache>,
        stats: Arc<Stats>,
        amplify_bytes: u64,
    ) -> Self {
        let prefetched = ChunkMarks::new(image.bootstrap().chunk_count());
        Fetcher {
            image,
            backend,
            cache,
            stats,
            amplify_bytes,
            in_flight: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            prefetched,
            decoded: ByteBudget::new(MAX_DAEMON_DECODED_BYTES),
            cache_warning: Throttle::new(std::time::Duration::from_secs(10)),
            handed_off: crate::workers::Elastic::new("petrel-fetch-off", MAX_HANDED_OFF),
        }
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Whether every chunk of `segments` is cached (the read can be served at once).
    pub fn is_cached(&self, segments: &[FileSegment]) -> bool {
        segments.iter().all(|s| match s.source {
            SegmentSource::Hole => true,
            SegmentSource::Chunk { index, .. } => self.cache.is_ready(index),
        })
    }

    /// Waits (at most `timeout`) until no fetch is under way: what was fetched is
    /// then stored durably. False when fetches were still running at the deadline.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.in_flight.lock().expect("in-flight lock").is_empty() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // And what they stored is durable, known to other processes.
        self.cache
            .store()
            .flush(deadline.saturating_duration_since(std::time::Instant::now()))
    }

    /// Whether chunk `index` is being fetched (or stored) now.
    pub fn is_in_flight(&self, index: u32) -> bool {
        self.in_flight.lock().expect("in-flight lock").contains_key(&index)
    }

    /// Whether chunk `index` was fetched and verified and is being stored now.
    pub fn is_landing(&self, index: u32) -> bool {
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .get(&index)
            .is_some_and(|flight| matches!(*flight.outcome.lock().expect("flight lock"), Some(Ok(_))))
    }

    /// The bytes of `segments` (one read's worth): cached chunks read from the cache,
    /// missing ones fetched once for every reader that wants them, an evicted one
    /// fetched again. The read path's one entry point.
    pub fn read(self: &Arc<Self>, segments: &[FileSegment]) -> Result<Vec<u8>, Arc<DaemonError>> {
        self.read_along(segments, Along::default())
    }

    /// [`Self::read`], where the first request this read makes also takes chunks of
    /// `along` in the same blob (see `take_along`: one round trip for the read and
    /// its readahead); the reader is answered once its own chunks are in. `along`'s
    /// readahead is pushed once that request is planned (or when the read ends).
    pub fn read_along(
        self: &Arc<Self>,
        segments: &[FileSegment],
        mut along: Along,
    ) -> Result<Vec<u8>, Arc<DaemonError>> {
        let last_chunk = segments
            .iter()
            .rev()
            .find_map(|s| match s.source {
                SegmentSource::Chunk { index, .. } => Some(index),
                SegmentSource::Hole => None,
            })
            .unwrap_or(0);
        let total: usize = segments.iter().map(|s| s.length as usize).sum();
        // This thread's last read's buffer: every byte of it is written below (a
        // hole with zeros), so none of an earlier read's bytes is left in it.
        let mut out = READ_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
        out.resize(total, 0);
        let mut at = 0usize;
        for segment in segments {
            let target = &mut out[at..at + segment.length as usize];
            if segment.source == SegmentSource::Hole {
                target.fill(0);
            }
            if let SegmentSource::Chunk { index, chunk_offset } = segment.source {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match self.ensure_along(index, last_chunk, &mut along)? {
                        ChunkBytes::Cached => match self.cache().read(index, chunk_offset, target) {
                            Ok(()) => break,
                            // Evicted between the check and the read: fetch it again.
                            Err(DaemonError::Io { source, .. })
                                if source.kind() == std::io::ErrorKind::NotFound && attempts < 3 =>
                            {
                                self.cache().forget(index);
                            }
                            Err(e) => return Err(Arc::new(e)),
                        },
                        ChunkBytes::Fetched(bytes) => {
                            let start = chunk_offset as usize;
                            target.copy_from_slice(&bytes[start..start + target.len()]);
                            break;
                        }
                    }
                }
            }
            at += segment.length as usize;
        }
        Ok(out)
    }

    /// Makes chunk `index` ready; `through` is the last chunk the current read needs
    /// (the fetch covers up to it when they are neighbours in the blob).
    pub fn ensure(self: &Arc<Self>, index: u32, through: u32) -> Result<ChunkBytes, Arc<DaemonError>> {
        self.ensure_along(index, through, &mut Along::default())
    }

    fn ensure_along(
        self: &Arc<Self>,
        index: u32,
        through: u32,
        along: &mut Along,
    ) -> Result<ChunkBytes, Arc<DaemonError>> {
        let mut looked_again = false;
        loop {
            // Before a round trip is spent on it: another process (a daemon of an
            // image sharing the chunk) may have stored it a moment ago.
            let mut ready = self.cache.is_ready(index);
            if !ready && !looked_again {
                looked_again = true;
                let in_flight = self.in_flight.lock().expect("in-flight lock").contains_key(&index);
                ready = !in_flight && self.cache.is_ready_now(index);
            }
            if ready {
                self.stats.cache_hits.fetch_add(1, Relaxed);
                self.note_hit(index);
                return Ok(ChunkBytes::Cached);
            }
            let (flight, planned) = {
                let mut in_flight = self.in_flight.lock().expect("in-flight lock");
                let failed = in_flight
                    .get(&index)
                    .is_some_and(|flight| matches!(*flight.outcome.lock().expect("flight lock"), Some(Err(_))));
                if failed {
                    // The fetch failed and is winding down: a reader coming after
                    // the failure fetches again rather than take its error.
                    in_flight.remove(&index);
                }
                if let Some(flight) = in_flight.get(&index) {
                    (Arc::clone(flight), None)
                } else if self.cache.is_ready(index) {
                    continue;
                } else {
                    let mut plan = self.plan(index, through, &in_flight).map_err(Arc::new)?;
                    let own = index..=plan.last().map_or(index, |c| c.index);
                    self.take_along(&mut plan, along, &in_flight);
                    let ahead: Vec<ChunkInfo> = plan.iter().filter(|c| !own.contains(&c.index)).copied().collect();
                    tracing::debug!(
                        ino = along.ino,
                        first = index,
                        own = own.end() - own.start() + 1,
                        along_ranges = along.ranges.len(),
                        taken = ahead.len(),
                        "a miss plans its request"
                    );
                    self.note_ahead(&ahead);
                    let flight = Arc::new(Flight::default());
                    let flights: Vec<(ChunkInfo, Arc<Flight>)> = plan
                        .into_iter()
                        .map(|chunk| {
                            let f = if chunk.index == index {
                                Arc::clone(&flight)
                            } else {
                                Arc::new(Flight::default())
                            };
                            in_flight.insert(chunk.index, Arc::clone(&f));
                            (chunk, f)
                        })
                        .collect();
                    (flight, Some(flights))
                }
            };
            along.planned();
            match planned {
                Some(flights) => {
                    self.stats.cache_misses.fetch_add(1, Relaxed);
                    self.hand_off(flights);
                }
                None => {
                    self.stats.waited_on_inflight.fetch_add(1, Relaxed);
                    self.note_hit(index);
                }
            }
            let mut outcome = flight.outcome.lock().expect("flight lock");
            while outcome.is_none() {
                outcome = flight.done.wait(outcome).expect("flight lock");
            }
            return outcome.clone().expect("set").map(ChunkBytes::Fetched);
        }
    }

    /// Runs a reader's fetch on another thread (the reader waits for its own
    /// chunks' flights only), or here when too many are running.
    fn hand_off(self: &Arc<Self>, flights: Vec<(ChunkInfo, Arc<Flight>)>) {
        let fetcher = Arc::clone(self);
        let job = Box::new(move || fetcher.fetch(&flights, ReadPurpose::Reader));
        if let Err(job) = self.handed_off.try_run(job) {
            job();
        }
    }

    /// Adds to a reader's `plan` the chunks of `along` in its blob that are missing
    /// and not in flight, keeping blob order (the order a multi-range answer comes
    /// in): those after it up to `along.budget` stored bytes, and those before it
    /// when all of them fit in `ALONG_BEFORE_BYTES` (the reader then waits for
    /// them too: about what a second request beside its own would have taken of
    /// the link meanwhile), all within one request's bounds.
    fn take_along(&self, plan: &mut Vec<ChunkInfo>, along: &Along, in_flight: &HashMap<u32, Arc<Flight>>) {
        if along.ranges.is_empty() {
            return;
        }
        let bootstrap = self.image.bootstrap();
        let (Some(&head), Some(&last)) = (plan.first(), plan.last()) else {
            return;
        };
        let end = last.compressed_offset + u64::from(last.compressed_size);
        let mut wanted: Vec<u32> = along.ranges.iter().flat_map(|&(start, end)| start..end).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut before = Vec::new();
        let mut after = Vec::new();
        for index in wanted {
            if (head.index..=last.index).contains(&index)
                || self.cache.is_ready(index)
                || in_flight.contains_key(&index)
            {
                continue;
            }
            let Ok(chunk) = bootstrap.chunk(index) else { continue };
            if chunk.blob_index != head.blob_index {
                continue;
            }
            if chunk.compressed_offset + u64::from(chunk.compressed_size) <= head.compressed_offset {
                before.push(chunk);
            } else if chunk.compressed_offset >= end {
                after.push(chunk);
            }
        }
        let by_offset = |a: &ChunkInfo, b: &ChunkInfo| a.compressed_offset.cmp(&b.compressed_offset);
        before.sort_by(by_offset);
        after.sort_by(by_offset);
        let stored = |chunks: &[ChunkInfo]| chunks.iter().map(|c| u64::from(c.compressed_size)).sum::<u64>();
        if stored(&before) > ALONG_BEFORE_BYTES {
            before.clear();
        }
        let mut taken: Vec<ChunkInfo> = Vec::with_capacity(before.len() + plan.len() + after.len());
        let (mut runs, mut stored_after) = (0usize, 0u64);
        let mut decoded = 0u64;
        let mut push = |chunk: ChunkInfo, taken: &mut Vec<ChunkInfo>| -> bool {
            let joins = taken.last().is_some_and(|l: &ChunkInfo| {
                l.compressed_offset + u64::from(l.compressed_size) == chunk.compressed_offset
            });
            if taken
                .last()
                .is_some_and(|l| l.compressed_offset + u64::from(l.compressed_size) > chunk.compressed_offset)
                || runs + usize::from(!joins) > MAX_RANGES
                || decoded + u64::from(chunk.uncompressed_size) > MAX_REQUEST_DECODED_BYTES
            {
                return false;
            }
            runs += usize::from(!joins);
            decoded += u64::from(chunk.uncompressed_size);
            taken.push(chunk);
            true
        };
        // The reader's own chunks come first in the bounds: what comes before them
        // is dropped whole if they would not fit after it.
        let own_decoded: u64 = plan.iter().map(|c| u64::from(c.uncompressed_size)).sum();
        let before_decoded: u64 = before.iter().map(|c| u64::from(c.uncompressed_size)).sum();
        if own_decoded + before_decoded > MAX_REQUEST_DECODED_BYTES || before.len() + 1 > MAX_RANGES / 2 {
            before.clear();
        }
        for chunk in before.into_iter().chain(plan.iter().copied()) {
            if !push(chunk, &mut taken) {
                // Only a chunk before the reader's can fail here (the reader's own
                // are contiguous and within bounds): take none of those.
                taken.clear();
                break;
            }
        }
        if taken.is_empty() {
            return;
        }
        for chunk in after {
            if stored_after + u64::from(chunk.compressed_size) > along.budget || !push(chunk, &mut taken) {
                break;
            }
            stored_after += u64::from(chunk.compressed_size);
        }
        *plan = taken;
    }

    /// Counts chunks a reader's request takes for readers to come.
    fn note_ahead(&self, chunks: &[ChunkInfo]) {
        if chunks.is_empty() {
            return;
        }
        let bytes: u64 = chunks.iter().map(|c| u64::from(c.compressed_size)).sum();
        self.stats.readahead_bytes.fetch_add(bytes, Relaxed);
        for chunk in chunks {
            self.prefetched.mark(chunk.index);
        }
    }

    /// Chunks to fetch in one request: `first`, then following chunks of the same
    /// blob that are contiguous, missing and not in flight, through `through` and
    /// then on while the request stays within the amplification window.
    fn plan(&self, first: u32, through: u32, in_flight: &HashMap<u32, Arc<Flight>>) -> Result<Vec<ChunkInfo>> {
        let window = self.stream_window(first, in_flight)?;
        self.plan_window(first, through, window, in_flight)
    }

    /// The window of an on-demand fetch starting at chunk `first`: the amplification
    /// window, doubled (up to `STREAM_MAX_BYTES`) each time a miss continues where
    /// the blob's bytes already fetched end (the chunk before it is cached or on its
    /// way): reads walking the blob in its order (a package's files, laid out depth
    /// first) then take fewer, larger requests; a miss anywhere else starts over.
    fn stream_window(&self, first: u32, in_flight: &HashMap<u32, Arc<Flight>>) -> Result<u64> {
        let bootstrap = self.image.bootstrap();
        let head = bootstrap.chunk(first)?;
        let continues = first > 0
            && bootstrap.chunk(first - 1).is_ok_and(|before| {
                before.blob_index == head.blob_index
                    && (in_flight.contains_key(&(first - 1)) || self.cache.is_ready(first - 1))
            });
        let mut streams = self.streams.lock().expect("streams lock");
        let window = streams.entry(head.blob_index).or_insert(self.amplify_bytes);
        *window = if continues {
            (*window * 2).min(STREAM_MAX_BYTES.max(self.amplify_bytes))
        } else {
            self.amplify_bytes
        };
        Ok(*window)
    }

    fn plan_window(
        &self,
        first: u32,
        through: u32,
        window: u64,
        in_flight: &HashMap<u32, Arc<Flight>>,
    ) -> Result<Vec<ChunkInfo>> {
        let bootstrap = self.image.bootstrap();
        let head = bootstrap.chunk(first)?;
        let mut plan = vec![head];
        let mut end = head.compressed_offset + u64::from(head.compressed_size);
        let mut decoded = u64::from(head.uncompressed_size);
        let mut next = first + 1;
        while next < bootstrap.chunk_count() {
            let chunk = bootstrap.chunk(next)?;
            let span = end - head.compressed_offset + u64::from(chunk.compressed_size);
            let wanted = next <= through || span <= window;
            decoded += u64::from(chunk.uncompressed_size);
            if !wanted
                || span > MAX_REQUEST_BYTES
                || decoded > MAX_REQUEST_DECODED_BYTES
                || chunk.blob_index != head.blob_index
                || chunk.compressed_offset != end
                || self.cache.is_ready(next)
                || in_flight.contains_key(&next)
            {
                break;
            }
            end += u64::from(chunk.compressed_size);
            plan.push(chunk);
            next += 1;
        }
        Ok(plan)
    }

    /// Prefetches from chunk `first` on: skips chunks that are ready or in flight,
    /// then fetches up to `window` stored bytes of following missing chunks (never
    /// beyond `end`) in one request, shared with any reader that wants them.
    /// Returns the chunk index to continue from and the bytes fetched.
    pub fn prefetch_from(&self, first: u32, end: u32, window: u64, purpose: ReadPurpose) -> (u32, u64) {
        let mut start = first;
        let flights = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            while start < end && (self.cache.is_ready(start) || in_flight.contains_key(&start)) {
                start += 1;
            }
            if start >= end {
                return (end, 0);
            }
            let Ok(mut plan) = self.plan_window(start, start, window, &in_flight) else {
                return (start + 1, 0);
            };
            plan.retain(|c| c.index < end);
            register(&mut in_flight, plan)
        };
        let next = flights.last().map_or(start + 1, |(c, _)| c.index + 1);
        let bytes = self.fetch_ahead(&flights, purpose);
        (next, bytes)
    }

    /// Fetches the missing chunks of `[start, end)` for readers to come (readahead),
    /// `window` stored bytes per request.
    pub fn read_ahead(&self, start: u32, end: u32, window: u64) {
        let mut at = start;
        while at < end {
            (at, _) = self.prefetch_from(at, end, window, ReadPurpose::Reader);
        }
    }

    /// Fetches the missing chunks of several chunk ranges (a directory's files read
    /// ahead for readers to come, a profile's ranges prefetched): each request takes
    /// up to `request_bytes` stored bytes of missing chunks of one blob, in blob
    /// order, as up to `MAX_RANGES` runs, so ranges apart in the blob cost one round
    /// trip together where the backend serves several ranges at once (a registry
    /// does), and no byte between them is fetched. Returns the stored bytes fetched.
    pub fn fetch_ranges(&self, ranges: &[(u32, u32)], request_bytes: u64, purpose: ReadPurpose) -> u64 {
        let mut fetched = 0;
        let mut wanted: Vec<u32> = ranges.iter().flat_map(|(start, end)| *start..*end).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let bootstrap = self.image.bootstrap();
        let mut at = 0;
        while at < wanted.len() {
            let flights = {
                let mut in_flight = self.in_flight.lock().expect("in-flight lock");
                let mut plan: Vec<ChunkInfo> = Vec::new();
                let (mut stored, mut decoded, mut runs) = (0u64, 0u64, 0usize);
                while let Some(&index) = wanted.get(at) {
                    if self.cache.is_ready(index) || in_flight.contains_key(&index) {
                        at += 1;
                        continue;
                    }
                    let Ok(chunk) = bootstrap.chunk(index) else {
                        at += 1;
                        continue;
                    };
                    let joins = plan.last().is_some_and(|last| {
                        last.index + 1 == index
                            && last.compressed_offset + u64::from(last.compressed_size) == chunk.compressed_offset
                    });
                    let full = stored + u64::from(chunk.compressed_size) > request_bytes
                        || decoded + u64::from(chunk.uncompressed_size) > MAX_REQUEST_DECODED_BYTES
                        || runs + usize::from(!joins) > MAX_RANGES
                        || plan.first().is_some_and(|first| first.blob_index != chunk.blob_index);
                    if full && !plan.is_empty() {
                        break;
                    }
                    stored += u64::from(chunk.compressed_size);
                    decoded += u64::from(chunk.uncompressed_size);
                    runs += usize::from(!joins);
                    plan.push(chunk);
                    at += 1;
                }
                register(&mut in_flight, plan)
            };
            if flights.is_empty() {
                continue;
            }
            fetched += self.fetch_ahead(&flights, purpose);
        }
        fetched
    }

    /// Fetches chunks no reader asked for yet (prefetch in the background, readahead
    /// for readers to come), counted as such; returns their stored bytes.
    fn fetch_ahead(&self, flights: &[(ChunkInfo, Arc<Flight>)], purpose: ReadPurpose) -> u64 {
        let bytes: u64 = flights.iter().map(|(c, _)| u64::from(c.compressed_size)).sum();
        let (requests, stored) = match purpose {
            ReadPurpose::Background => (&self.stats.prefetch_requests, &self.stats.prefetch_bytes),
            ReadPurpose::Reader => (&self.stats.readahead_requests, &self.stats.readahead_bytes),
        };
        requests.fetch_add(1, Relaxed);
        stored.fetch_add(bytes, Relaxed);
        for (chunk, _) in flights {
            self.prefetched.mark(chunk.index);
        }
        self.fetch(flights, purpose);
        bytes
    }

    /// Counts a read served by a chunk the prefetcher brought in.
    pub fn note_hit(&self, index: u32) {
        if self.prefetched.take(index) {
            self.stats.prefetch_hits.fetch_add(1, Relaxed);
        }
    }

    /// Fetches the planned chunks with one range request and publishes each chunk's
    /// outcome to its waiting readers as soon as its bytes are in and verified (a
    /// reader of the first chunk of a large request does not wait for the rest),
    /// then caches them.
    fn fetch(&self, flights: &[(ChunkInfo, Arc<Flight>)], purpose: ReadPurpose) {
        let decoded: u64 = flights.iter().map(|(c, _)| u64::from(c.uncompressed_size)).sum();
        let _held = self.decoded.take(decoded);
        let chunks: Vec<ChunkInfo> = flights.iter().map(|(c, _)| *c).collect();
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(flights.len());
        // Readers wait for the network, not the disk: they get the verified bytes now.
        self.fetch_and_verify(&chunks, purpose, &mut |outcome| {
            let (_, flight) = &flights[outcomes.len()];
            *flight.outcome.lock().expect("flight lock") = Some(outcome.clone());
            flight.done.notify_all();
            outcomes.push(outcome);
        });
        // Then the chunks are made durable. The flights stay registered until they
        // are, so a reader arriving meanwhile takes the bytes from its flight rather
        // than fetching them again.
        let verified: Vec<(u32, &[u8])> = flights
            .iter()
            .zip(&outcomes)
            .filter_map(|((chunk, _), outcome)| outcome.as_ref().ok().map(|b| (chunk.index, b.as_slice())))
            .collect();
        if let Err(e) = self.cache.put(&verified) {
            // The bytes are verified and were served; only the cache missed them. A
            // full disk fails every put: said once every 10 s, with the count.
            self.stats.cache_put_failures.fetch_add(1, Relaxed);
            if self.cache_warning.due() {
                tracing::warn!(
                    failures = self.stats.cache_put_failures.load(Relaxed),
                    "could not cache {} chunks (reads go on, uncached): {e}: {}",
                    verified.len(),
                    e.source_text()
                );
            }
        }
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        for (chunk, flight) in flights {
            // (A failed flight may have been replaced by a reader fetching again.)
            if in_flight.get(&chunk.index).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                in_flight.remove(&chunk.index);
            }
        }
    }

    /// Reads `chunks` (of one blob, in blob order: runs of contiguous chunks) with one
    /// request (several ranges in it when they are apart, where the backend can) and
    /// hands `publish` one outcome per chunk, in order, each as soon as it can be decided.
    fn fetch_and_verify(&self, chunks: &[ChunkInfo], purpose: ReadPurpose, publish: &mut dyn FnMut(Outcome)) {
        let bootstrap = self.image.bootstrap();
        let first = chunks[0];
        let blob = match bootstrap.blob(first.blob_index) {
            Ok(blob) => blob,
            Err(e) => {
                let e = Arc::new(DaemonError::from(e));
                chunks.iter().for_each(|_| publish(Err(Arc::clone(&e))));
                return;
            }
        };
        // Runs of contiguous chunks, as stored ranges (offset, length).
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for chunk in chunks {
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == chunk.compressed_offset => {
                    *len += u64::from(chunk.compressed_size);
                }
                _ => ranges.push((chunk.compressed_offset, u64::from(chunk.compressed_size))),
            }
        }
        let (start, end) = (ranges[0].0, ranges[ranges.len() - 1].0 + ranges[ranges.len() - 1].1);
        self.stats.backend_requests.fetch_add(1, Relaxed);
        tracing::debug!(
            first = first.index,
            chunks = chunks.len(),
            start,
            bytes = ranges.iter().map(|(_, len)| len).sum::<u64>(),
            ranges = ranges.len(),
            ?purpose,
            "fetching"
        );
        // The ranges arrive in order, each in order, so the bytes are the chunks'
        // stored bytes one after another: each is gathered in a buffer of its own
        // size and decoded as soon as it is whole (a plain chunk keeps its buffer),
        // but for a compressed chunk that arrives whole in one piece, decoded there.
        let mut received = 0usize;
        let mut published = 0usize;
        let mut verified = 0u64;
        let mut current: Vec<u8> = Vec::new();
        let mut sink = |_range: usize, mut piece: &[u8]| {
            received += piece.len();
            while let Some(chunk) = chunks.get(published) {
                let size = chunk.compressed_size as usize;
                let decoded = if current.is_empty() && chunk.compressed && piece.len() >= size {
                    // A compressed chunk whole in this piece is decoded from it
                    // where it is: its stored bytes are not copied first.
                    let (stored, rest) = piece.split_at(size);
                    piece = rest;
                    decode_chunk(chunk, stored)
                } else {
                    if current.capacity() == 0 {
                        current.reserve_exact(size);
                    }
                    let take = (size - current.len()).min(piece.len());
                    current.extend_from_slice(&piece[..take]);
                    piece = &piece[take..];
                    if current.len() < size {
                        break;
                    }
                    decode_chunk_owned(chunk, std::mem::take(&mut current))
                };
                published += 1;
                match decoded {
                    Ok(plain) => {
                        verified += 1;
                        publish(Ok(Arc::new(plain)));
                    }
                    Err(source) => {
                        self.stats.chunks_failed_verification.fetch_add(1, Relaxed);
                        let e = DaemonError::BadChunk {
                            image: self.image.name().to_string(),
                            blob: blob.oci_digest(),
                            chunk: chunk.index,
                            offset: chunk.compressed_offset,
                            source,
                        };
                        tracing::error!("{e}: {}", e.source_text());
                        publish(Err(Arc::new(e)));
                    }
                }
            }
        };
        let result = match ranges.as_slice() {
            [(offset, len)] => self
                .backend
                .stream_range(&blob.digest, *offset, *len, purpose, &mut |piece| sink(0, piece)),
            _ => self.backend.stream_ranges(&blob.digest, &ranges, purpose, &mut sink),
        };
        self.stats.backend_bytes.fetch_add(received as u64, Relaxed);
        self.stats.chunks_fetched.fetch_add(verified, Relaxed);
        if published == chunks.len() {
            return;
        }
        // The read failed (or came up short) before these chunks were in.
        self.stats.backend_errors.fetch_add(1, Relaxed);
        let source = match result {
            Ok(()) => std::io::Error::other(format!(
                "got {received} of {} bytes",
                ranges.iter().map(|(_, len)| len).sum::<u64>()
            )),
            Err(source) => source,
        };
        tracing::warn!(blob = %blob.oci_digest(), start, end, error = %source, "backend read failed");
        let e = Arc::new(DaemonError::Backend {
            blob: blob.oci_digest(),
            offset: start,
            end,
            source,
        });
        chunks[published..].iter().for_each(|_| publish(Err(Arc::clone(&e))));
    }
}

/// Registers a flight for each planned chunk (readers wanting one wait for it).
fn register(in_flight: &mut HashMap<u32, Arc<Flight>>, plan: Vec<ChunkInfo>) -> Vec<(ChunkInfo, Arc<Flight>)> {
    plan.into_iter()
        .map(|chunk| {
            let flight = Arc::new(Flight::default());
            in_flight.insert(chunk.index, Arc::clone(&flight));
            (chunk, flight)
        })
        .collect()
}

impl DaemonError {
    /// The innermost cause, for log lines.
    pub fn source_text(&self) -> String {
        let mut text = String::new();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text = s.to_string();
            source = s.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_lets_no_more_than_its_limit_be_held() {
        let budget = Arc::new(ByteBudget::new(100));
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (budget, peak) = (Arc::clone(&budget), Arc::clone(&peak));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _guard = budget.take(30 + i);
                        peak.fetch_max(budget.held(), Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Relaxed) <= 100, "{}", peak.load(Relaxed));
        assert_eq!(budget.held(), 0);
        // More than the limit is taken as the whole limit, never a deadlock.
        drop(budget.take(1_000));
    }
}
