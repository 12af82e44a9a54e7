//! Sequential readahead per file. A file read front to back (a model loaded, an
//! archive unpacked, a `cat`) is fetched ahead of its reader in windows that grow
//! while the reads stay sequential (1 MiB, doubling up to the maximum), split into
//! requests of `REQUEST_BYTES` stored bytes that several threads fetch at once. One
//! request at a time, a 20 ms link or a registry's per-request cost caps a reader at
//! a fraction of what the link carries; several large ones in flight keep it full.
//!
//! Reads that jump around never start a stream, so scattered reads fetch what they
//! touch plus the fetcher's amplification window, as before. The kernel's own
//! readahead makes the reads of a sequential reader arrive slightly out of order
//! (several FUSE threads); a read within `SLACK` of where the stream stands
//! continues it.

use crate::fetch::Fetcher;
use crate::image::MappedImage;
use crate::job_queue::{JobQueue, Take};
use petrel_format::reader::SegmentSource;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The default largest window a stream grows to, in file bytes.
pub const DEFAULT_MAX_WINDOW: u64 = 64 << 20;
/// A stream's first window.
const FIRST_WINDOW: u64 = 1 << 20;
/// Bytes read in sequence before readahead starts (a few kernel reads).
const TRIGGER_BYTES: u64 = 512 << 10;
/// How far out of order a read may be and still continue its stream.
const SLACK: u64 = 2 << 20;
/// Stored bytes per readahead request. Measured with a lazy `cat` of a 2 GiB
/// incompressible file from a loopback registry on 2 cores (medians of 4): 4 MiB
/// 3.60 s, 8 MiB 3.27 s, 16 MiB 3.07 s, 32 MiB 3.33 s. docker-registry spends
/// CPU per request (2.66 core-seconds at 4 MiB, 1.71 at 16 MiB), and a larger
/// request holds more decoded bytes while its readers wait.
const REQUEST_BYTES: u64 = 16 << 20;
/// Readahead requests in flight at once (all files together).
pub const PARALLEL: usize = 4;
/// Requests waiting at most; beyond this the oldest are dropped.
const MAX_QUEUED: usize = 256;
/// Files tracked at once; beyond this the table starts over.
const MAX_STREAMS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Where the next sequential read starts.
    next: u64,
    /// Bytes read in sequence so far.
    run: u64,
    /// File offset up to which readahead has been asked for.
    ahead: u64,
    /// The next window's size.
    window: u64,
}

#[derive(Debug)]
struct Shared {
    image: Arc<MappedImage>,
    fetcher: Arc<Fetcher>,
    max_window: u64,
    streams: Mutex<HashMap<u32, Stream>>,
    queue: JobQueue<(u32, u32)>,
}

/// Sequential readahead of one mount; stops its threads when dropped.
#[derive(Debug)]
pub struct SequentialReadahead {
    shared: Arc<Shared>,
}

/// What one read does to its file's stream: the file range to read ahead, if any.
fn advance(stream: Option<Stream>, offset: u64, size: u64, max_window: u64) -> (Stream, Option<(u64, u64)>) {
    let end = offset.saturating_add(size);
    let mut stream = match stream {
        // A read a little behind where the stream stands, or anywhere up to what
        // it has read ahead (the kernel's own readahead runs ahead of the reader).
        Some(s) if offset.saturating_add(SLACK) >= s.next && offset <= s.next.saturating_add(SLACK).max(s.ahead) => {
            Stream {
                next: s.next.max(end),
                run: s.run.saturating_add(size),
                ..s
            }
        }
        _ => Stream {
            next: end,
            run: size,
            ahead: end,
            window: FIRST_WINDOW.min(max_window),
        },
    };
    if stream.run < TRIGGER_BYTES || stream.ahead >= end.saturating_add(stream.window / 2) {
        return (stream, None);
    }
    let from = stream.ahead.max(end);
    let to = end.saturating_add(stream.window);
    stream.ahead = to;
    stream.window = stream.window.saturating_mul(2).min(max_window);
    (stream, Some((from, to)))
}

/// One readahead request being planned: a run of chunks, its stored bytes, and the
/// file offset its first chunk serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    chunks: (u32, u32),
    stored: u64,
    file_offset: u64,
}

/// Leaves a window's last request to the next window when it is small (under half
/// of `REQUEST_BYTES`) and the file goes on past the window (`to < file_end`), so
/// that it is fetched as part of a full request there rather than on its own;
/// returns the file offset the remaining requests cover up to. A window of whole
/// requests never ends on chunk boundaries, so without this every window after
/// the first few costs one extra small request: a third of the requests of a lazy
/// `cat` of a 1 GiB file (44 of 128) were such leftovers of 5 or so chunks.
fn leave_small_tail(jobs: &mut Vec<Request>, to: u64, file_end: u64) -> u64 {
    match jobs.as_slice() {
        [.., _, last] if last.stored < REQUEST_BYTES / 2 && to < file_end => {
            let offset = last.file_offset;
            jobs.pop();
            offset
        }
        _ => to,
    }
}

impl SequentialReadahead {
    /// Readahead with windows up to `max_window` file bytes, `parallel` requests at once.
    pub fn start(image: Arc<MappedImage>, fetcher: Arc<Fetcher>, max_window: u64, parallel: usize) -> Self {
        let shared = Arc::new(Shared {
            image,
            fetcher,
            max_window,
            streams: Mutex::new(HashMap::new()),
            queue: JobQueue::new(MAX_QUEUED, Take::Oldest),
        });
        for _ in 0..parallel.max(1) {
            let shared = Arc::clone(&shared);
            let _ = std::thread::Builder::new()
                .name("petrel-seq-ahead".into())
                .spawn(move || shared.work());
        }
        SequentialReadahead { shared }
    }

    /// File `ino` was read at `offset` for `size` bytes (served from the cache or not).
    pub fn observed(&self, ino: u32, offset: u64, size: u64) {
        let shared = &self.shared;
        let wanted = {
            let mut streams = shared.streams.lock().expect("stream lock");
            if streams.len() >= MAX_STREAMS && !streams.contains_key(&ino) {
                streams.clear();
            }
            let (stream, wanted) = advance(streams.get(&ino).copied(), offset, size, shared.max_window);
            streams.insert(ino, stream);
            wanted
        };
        if let Some((from, to)) = wanted {
            let (jobs, covered_to) = shared.requests(ino, from, to);
            if covered_to < to {
                // The next window starts where these requests stop.
                let mut streams = shared.streams.lock().expect("stream lock");
                if let Some(stream) = streams.get_mut(&ino).filter(|s| s.ahead == to) {
                    stream.ahead = covered_to;
                }
            }
            shared.queue.push(jobs);
        }
    }
}

impl Drop for SequentialReadahead {
    fn drop(&mut self) {
        self.shared.queue.close();
    }
}

impl Shared {
    /// The chunks of file `ino` in `[from, to)` that are not cached, as runs of
    /// consecutive chunks of at most `REQUEST_BYTES` stored bytes each, and the file
    /// offset the runs cover up to (see `leave_small_tail`).
    fn requests(&self, ino: u32, from: u64, to: u64) -> (Vec<(u32, u32)>, u64) {
        let bootstrap = self.image.bootstrap();
        let Ok(inode) = bootstrap.inode(ino) else {
            return (Vec::new(), to);
        };
        let file_end = inode.size();
        let to = to.min(file_end);
        if from >= to {
            return (Vec::new(), to);
        }
        let Ok(segments) = bootstrap.segments(&inode, from, to - from) else {
            return (Vec::new(), to);
        };
        let cache = self.fetcher.cache();
        let mut jobs: Vec<Request> = Vec::new();
        for segment in segments {
            let SegmentSource::Chunk { index, .. } = segment.source else {
                continue;
            };
            if cache.is_ready(index) {
                continue;
            }
            let stored = bootstrap.chunk(index).map_or(0, |c| u64::from(c.compressed_size));
            if let Some(job) = jobs.last_mut() {
                if (job.chunks.0..job.chunks.1).contains(&index) {
                    continue; // the same chunk again (a file may repeat one)
                }
                if job.chunks.1 == index && job.stored + stored <= REQUEST_BYTES {
                    job.chunks.1 = index + 1;
                    job.stored += stored;
                    continue;
                }
            }
            jobs.push(Request {
                chunks: (index, index + 1),
                stored,
                file_offset: segment.file_offset,
            });
        }
        let covered_to = leave_small_tail(&mut jobs, to, file_end);
        (jobs.into_iter().map(|job| job.chunks).collect(), covered_to)
    }

    fn work(&self) {
        while let Some((start, end)) = self.queue.next() {
            self.fetcher.read_ahead(start, end, REQUEST_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_grow_the_window_and_jumps_start_over() {
        let max = 8 << 20;
        let mut stream = None;
        let mut asked = Vec::new();
        for offset in (0..(16u64 << 20)).step_by(128 << 10) {
            let (next, wanted) = advance(stream, offset, 128 << 10, max);
            stream = Some(next);
            asked.extend(wanted);
        }
        // Nothing before the trigger; then contiguous asks, never overlapping, that
        // keep up to the 8 MiB window ahead of the reader: once grown, half a window
        // each time the reader has used up half.
        assert_eq!(asked[0].0, 512 << 10);
        for pair in asked.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "{asked:?}");
        }
        let sizes: Vec<u64> = asked.iter().map(|(a, b)| (b - a) >> 20).collect();
        assert!(sizes.iter().all(|s| *s <= 8), "{sizes:?}");
        assert!(sizes.ends_with(&[4, 4, 4]), "{sizes:?}");
        let (last, now) = (asked.last().unwrap().1, stream.unwrap().next);
        assert!(last > now && last - now <= max, "{last} {now}");

        // A jump far away starts a new stream: no readahead until it runs again.
        let (jumped, wanted) = advance(stream, 900 << 20, 4096, max);
        assert_eq!(wanted, None);
        assert_eq!(jumped.run, 4096);
    }

    #[test]
    fn a_small_last_request_is_left_to_the_next_window_unless_the_file_ends() {
        let request = |first: u32, stored: u64, file_offset: u64| Request {
            chunks: (first, first + 10),
            stored,
            file_offset,
        };
        let full = request(0, REQUEST_BYTES, 0);
        let small = request(10, 400 << 10, REQUEST_BYTES);
        let window_end = REQUEST_BYTES + (500 << 10);

        let mut jobs = vec![full, small];
        assert_eq!(leave_small_tail(&mut jobs, window_end, 1 << 30), REQUEST_BYTES);
        assert_eq!(jobs, vec![full]);

        // The file ends with the window: its tail goes now, there is no next window.
        let mut jobs = vec![full, small];
        assert_eq!(leave_small_tail(&mut jobs, window_end, window_end), window_end);
        assert_eq!(jobs, vec![full, small]);

        // A window of one small request (a stream's first) is fetched as it is.
        let mut jobs = vec![small];
        assert_eq!(leave_small_tail(&mut jobs, window_end, 1 << 30), window_end);
        assert_eq!(jobs, vec![small]);

        // A last request of half a request or more is worth its round trip.
        let big_enough = request(10, REQUEST_BYTES / 2, REQUEST_BYTES);
        let mut jobs = vec![full, big_enough];
        assert_eq!(leave_small_tail(&mut jobs, window_end, 1 << 30), window_end);
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn a_read_within_what_was_read_ahead_continues_the_stream() {
        let stream = Stream {
            next: 100 << 20,
            run: 100 << 20,
            ahead: 132 << 20,
            window: 64 << 20,
        };
        // Beyond the slack but within the readahead: the kernel's own readahead.
        let (continued, _) = advance(Some(stream), 110 << 20, 128 << 10, 64 << 20);
        assert_eq!(continued.run, (100 << 20) + (128 << 10));
        assert_eq!(continued.window, 64 << 20);
        // Beyond the readahead: a jump, the stream starts over.
        let (jumped, wanted) = advance(Some(stream), 140 << 20, 128 << 10, 64 << 20);
        assert_eq!((jumped.run, wanted), (128 << 10, None));
    }

    #[test]
    fn scattered_reads_never_read_ahead() {
        let mut stream = None;
        let mut rng = 12345u64;
        for _ in 0..1000 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let offset = (rng >> 20) % (1 << 34);
            let (next, wanted) = advance(stream, offset, 4096, 64 << 20);
            assert_eq!(wanted, None);
            stream = Some(next);
        }
    }

    #[test]
    fn reads_a_little_out_of_order_continue_the_stream() {
        let mut stream = None;
        let mut asked = 0;
        // Pairs of reads swapped, as two FUSE threads deliver kernel readahead.
        for pair in 0..64u64 {
            for offset in [pair * 2 + 1, pair * 2] {
                let (next, wanted) = advance(stream, offset * (128 << 10), 128 << 10, 64 << 20);
                stream = Some(next);
                asked += usize::from(wanted.is_some());
            }
        }
        assert!(asked >= 3, "{asked}");
    }
}
