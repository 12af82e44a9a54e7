//! Parallel hashing and compression of chunks with a bounded number in flight.
//!
//! The reading thread submits chunks in order; worker threads hash and compress
//! them; one collector takes results back in submission order, deduplicates by
//! digest and appends new chunks' stored bytes to a spool file. The final blob is
//! assembled from the spool once the tree (and so the chunk order) is known.

use crate::dict::ChunkDict;
use crate::error::{BuildError, Result};
use crate::sink::ChunkKey;
use petrel_format::codec::{chunk_digest, encode_digested_chunk_at, EncodedChunk};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

mod region;
mod streaming;
pub use streaming::{StreamPlan, FIRST_WINDOW, MAX_BLOB, MIN_BLOB, ONE_BLOB_SHARE, WINDOW};

/// Counters of a running build, readable from another thread (progress bars).
#[derive(Debug, Default)]
pub struct BuildProgress {
    /// Chunks collected, duplicates included.
    pub chunks: std::sync::atomic::AtomicU64,
    /// Of those, chunks already seen in this build or found in the dictionary.
    pub deduplicated: std::sync::atomic::AtomicU64,
    /// Bytes of new chunks stored for the new blob (compressed).
    pub stored_bytes: std::sync::atomic::AtomicU64,
}

/// Chunks per worker that may be in flight (read but not yet collected).
const IN_FLIGHT_PER_WORKER: usize = 4;

/// Where a unique chunk's stored bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPlace {
    /// In the spool, to be copied into the new blob.
    Spool { offset: u64 },
    /// Held in memory by a streaming layer's window (see `streaming`), until the
    /// window goes into a blob or, what no blob takes, into the spool. Never left
    /// once the pipeline is finished.
    Window,
    /// Already in a dictionary blob (index into `ChunkDict::blobs`); with this
    /// build's own encoding in the spool too when the build keeps copies of
    /// dictionary chunks (a prefetch region is laid out in the new blob).
    Dict {
        blob: u32,
        offset: u64,
        own_copy: Option<OwnCopy>,
    },
}

/// A dictionary chunk as this build encoded and spooled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnCopy {
    pub spool_offset: u64,
    pub flags: u32,
    pub stored_size: u32,
}

/// A unique chunk of the build.
#[derive(Debug, Clone)]
pub struct SpooledChunk {
    pub digest: [u8; 32],
    pub flags: u32,
    pub place: ChunkPlace,
    pub stored_size: u32,
    pub uncompressed_size: u32,
}

/// What the pipeline produced.
#[derive(Debug)]
pub struct Collected {
    /// Unique chunks in first-seen order.
    pub chunks: Vec<SpooledChunk>,
    /// For each submission, the index of its unique chunk.
    pub chunk_of_submission: Vec<u32>,
    /// The spool file holding every unique chunk's stored bytes.
    pub spool: File,
    /// Blobs sealed mid-build, in order: dictionary blobs
    /// `ChunkDict::blobs.len()` and up.
    pub sealed: Vec<crate::dict::DictBlob>,
}

struct Job {
    seq: u64,
    work: Work,
}

enum Work {
    /// A chunk's data to hash and compress, where its file lies in the tree,
    /// where its data ends in the layer's tar stream, and whether it is held back
    /// for the prefetch region (see [`Pipeline::submit`]).
    Chunk(Vec<u8>, Option<ChunkKey>, u64, bool),
    /// Chunks a dictionary holds, named by digest and plain size (a layer
    /// record's), in submission order: nothing to hash or compress.
    Known(Vec<([u8; 32], u32)>),
    /// Seal the chunks spooled so far into a blob (see [`Pipeline::seal`]).
    Seal(std::sync::mpsc::Sender<Result<Option<SealedBlob>>>),
    /// From now on, seal whenever this many bytes are spooled unsealed.
    AutoSeal(u64, std::sync::mpsc::Sender<Result<SealedBlob>>),
    /// From now on, write the layer's new chunks into blobs as they come.
    Stream(StreamPlan),
}

/// What a worker hands the collector, in submission order.
enum Done {
    Chunk(EncodedChunk, Option<ChunkKey>, u64, bool),
    Known(Vec<([u8; 32], u32)>),
    Seal(std::sync::mpsc::Sender<Result<Option<SealedBlob>>>),
    AutoSeal(u64, std::sync::mpsc::Sender<Result<SealedBlob>>),
    Stream(StreamPlan),
}

/// A blob written mid-build from the chunks spooled since the previous one (a
/// one-entry tar, like the final blob), so that it can be pushed while later
/// layers are still read. Its chunks are referenced where they lie, like a
/// dictionary blob's: arrival order, and chunks later layers delete stay in it.
#[derive(Debug, Clone)]
pub struct SealedBlob {
    pub blob: crate::dict::DictBlob,
    pub path: std::path::PathBuf,
    /// Written while the layer streamed in and handed out as it grew (see
    /// [`StreamPlan::opened`]): whoever took it then uploads it.
    pub streamed: bool,
}

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    jobs: Option<SyncSender<Job>>,
    tokens: SyncSender<()>,
    workers: Vec<JoinHandle<()>>,
    collector: Option<JoinHandle<Result<Collected>>>,
    next_seq: u64,
    next_submission: u64,
    /// Known chunks submitted but not yet sent: they go as one job (a layer
    /// record names thousands, each a cross-thread hop otherwise).
    known: Vec<([u8; 32], u32)>,
}

/// Known chunks sent as one job, at most.
const KNOWN_BATCH: usize = 4096;

impl Pipeline {
    /// Starts `threads` workers (at least 1) spooling into `spool`; chunks found in
    /// `dict` are neither compressed nor spooled unless `keep_own_copies` and
    /// they are held (see [`Self::submit`]): then they are both, as
    /// [`OwnCopy`]s, and still referenced from the dictionary. With
    /// `keep_own_copies`, chunks that go into blobs mid-build keep their stored
    /// bytes in the spool too: a build with a prefetch profile lays its region out
    /// from them, whichever blob a chunk first went into.
    pub fn start(
        threads: usize,
        spool: File,
        dict: Arc<ChunkDict>,
        compression_level: i32,
        keep_own_copies: bool,
        progress: Arc<BuildProgress>,
        blobs_dir: std::path::PathBuf,
    ) -> Self {
        let threads = threads.max(1);
        let capacity = threads * IN_FLIGHT_PER_WORKER;
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(capacity);
        let (tokens_tx, tokens_rx) = sync_channel::<()>(capacity);
        let (results_tx, results_rx) = channel::<(u64, Done)>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let workers = (0..threads)
            .map(|i| {
                let jobs_rx = Arc::clone(&jobs_rx);
                let results_tx = results_tx.clone();
                let dict = Arc::clone(&dict);
                std::thread::Builder::new()
                    .name(format!("petrel-chunk-{i}"))
                    .spawn(move || worker(&jobs_rx, &results_tx, &dict, compression_level, keep_own_copies))
                    .expect("spawn chunk worker")
            })
            .collect();
        drop(results_tx);
        let collector = std::thread::Builder::new()
            .name("petrel-collect".into())
            .spawn(move || {
                collect(
                    results_rx,
                    tokens_rx,
                    spool,
                    &dict,
                    keep_own_copies,
                    &progress,
                    &blobs_dir,
                )
            })
            .expect("spawn collector");
        Pipeline {
            jobs: Some(jobs_tx),
            tokens: tokens_tx,
            workers,
            collector: Some(collector),
            next_seq: 0,
            next_submission: 0,
            known: Vec::new(),
        }
    }

    /// Submits one chunk; blocks while too many are in flight. Returns its
    /// submission number (0, 1, … in submission order).
    /// `position` is where the chunk's data ends in its layer's tar stream (0
    /// when not known: blobs are then not streamed, see [`Self::stream`]).
    /// A `held` chunk (of a file a prefetch profile names), if new, stays in the
    /// spool for the blob `finish` writes: no blob sealed or streamed mid-build
    /// takes it.
    pub fn submit(&mut self, data: Vec<u8>, key: Option<ChunkKey>, position: u64, held: bool) -> Result<u64> {
        self.tokens.send(()).map_err(|_| broken())?;
        self.send(Work::Chunk(data, key, position, held))?;
        self.next_submission += 1;
        Ok(self.next_submission - 1)
    }

    /// Submits a chunk a dictionary holds by its digest and plain size (see
    /// [`crate::record`]); like [`Self::submit`] otherwise. The build fails if the
    /// dictionary does not hold it.
    pub fn submit_known(&mut self, digest: [u8; 32], uncompressed_size: u32) -> Result<u64> {
        self.known.push((digest, uncompressed_size));
        self.next_submission += 1;
        if self.known.len() >= KNOWN_BATCH {
            self.flush_known()?;
        }
        Ok(self.next_submission - 1)
    }

    /// Sends the known chunks submitted so far as one job (one in-flight slot).
    fn flush_known(&mut self) -> Result<()> {
        if self.known.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.known);
        self.tokens.send(()).map_err(|_| broken())?;
        self.send_now(Work::Known(batch))
    }

    /// Waits for every chunk submitted so far and writes those spooled since the
    /// previous seal into a blob in the blobs directory the pipeline was started
    /// with (None: nothing new since). Later duplicates of its chunks are
    /// deduplicated against it.
    pub fn seal(&mut self) -> Result<Option<SealedBlob>> {
        let (reply, answer) = channel();
        self.send(Work::Seal(reply))?;
        answer.recv().map_err(|_| broken())?
    }

    /// From the chunks submitted next on, seals a blob ([`Self::seal`]) whenever
    /// `every` bytes are spooled unsealed, handing each to `to` (at chunk
    /// boundaries, so where blobs end depends on the chunks only).
    pub fn auto_seal(&mut self, every: u64, to: std::sync::mpsc::Sender<Result<SealedBlob>>) -> Result<()> {
        self.send(Work::AutoSeal(every.max(1), to))
    }

    /// From the chunks submitted next on (one layer's), writes new chunks into
    /// blobs while they come, as [`StreamPlan`] says; [`Self::seal`] at the
    /// layer's end completes the last one and seals the rest.
    pub fn stream(&mut self, plan: StreamPlan) -> Result<()> {
        self.send(Work::Stream(plan))
    }

    /// Sends a job after the known chunks submitted before it.
    fn send(&mut self, work: Work) -> Result<()> {
        self.flush_known()?;
        self.send_now(work)
    }

    fn send_now(&mut self, work: Work) -> Result<()> {
        let seq = self.next_seq;
        self.jobs
            .as_ref()
            .ok_or_else(broken)?
            .send(Job { seq, work })
            .map_err(|_| broken())?;
        self.next_seq += 1;
        Ok(())
    }

    /// Waits for every submitted chunk and returns the result.
    pub fn finish(mut self) -> Result<Collected> {
        self.flush_known()?;
        self.jobs = None;
        for worker in self.workers.drain(..) {
            worker
                .join()
                .map_err(|_| BuildError::Invalid("chunk worker panicked".into()))?;
        }
        let collector = self.collector.take().expect("finish runs once");
        collector
            .join()
            .map_err(|_| BuildError::Invalid("chunk collector panicked".into()))?
    }
}

fn broken() -> BuildError {
    BuildError::Invalid("chunk pipeline stopped unexpectedly".into())
}

fn worker(
    jobs: &Mutex<Receiver<Job>>,
    results: &std::sync::mpsc::Sender<(u64, Done)>,
    dict: &ChunkDict,
    compression_level: i32,
    keep_own_copies: bool,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let (data, key, position, held) = match job.work {
            Work::Chunk(data, key, position, held) => (data, key, position, held),
            Work::Known(batch) => {
                if results.send((job.seq, Done::Known(batch))).is_err() {
                    return;
                }
                continue;
            }
            Work::Seal(reply) => {
                if results.send((job.seq, Done::Seal(reply))).is_err() {
                    return;
                }
                continue;
            }
            Work::AutoSeal(every, to) => {
                if results.send((job.seq, Done::AutoSeal(every, to))).is_err() {
                    return;
                }
                continue;
            }
            Work::Stream(plan) => {
                if results.send((job.seq, Done::Stream(plan))).is_err() {
                    return;
                }
                continue;
            }
        };
        let digest = chunk_digest(&data);
        let encoded = if !(keep_own_copies && held) && dict.chunks.contains_key(&digest) {
            // Already stored elsewhere, and not wanted in a prefetch region: no
            // need to compress it.
            EncodedChunk {
                digest,
                flags: 0,
                uncompressed_size: data.len() as u32,
                stored: Vec::new(),
            }
        } else {
            encode_digested_chunk_at(&data, digest, compression_level)
        };
        if results
            .send((job.seq, Done::Chunk(encoded, key, position, held)))
            .is_err()
        {
            return;
        }
    }
}

fn collect(
    results: Receiver<(u64, Done)>,
    tokens: Receiver<()>,
    spool: File,
    dict: &ChunkDict,
    keep_own_copies: bool,
    progress: &BuildProgress,
    blobs_dir: &std::path::Path,
) -> Result<Collected> {
    use std::sync::atomic::Ordering::Relaxed;
    let spool_error = |source| BuildError::Io {
        action: "write chunk spool",
        path: "<spool>".into(),
        source,
    };
    let mut writer = BufWriter::with_capacity(1 << 20, spool);
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut by_digest: HashMap<[u8; 32], u32> = HashMap::new();
    let mut chunks = Vec::new();
    let mut chunk_of_submission = Vec::new();
    let mut spool_len = 0u64;
    let mut failure = None;
    // A chunk submitted as known that no dictionary holds (as large).
    let mut unknown: Option<[u8; 32]> = None;
    let mut next_seq = 0u64;
    let mut sealer = Sealer {
        keys: HashMap::new(),
        held: HashSet::new(),
        unsealable: 0,
        keep_own_copies,
        sealed: Vec::new(),
        sealed_up_to: 0,
        first_blob: dict.blobs.len(),
        blobs_dir,
        streaming: None,
        stream_failure: None,
        region: region::RegionPieces::default(),
    };
    let mut auto_seal: Option<(u64, std::sync::mpsc::Sender<Result<SealedBlob>>)> = None;
    for (seq, done) in results {
        pending.insert(seq, done);
        while let Some(done) = pending.remove(&next_seq) {
            next_seq += 1;
            if let Some((every, to)) = &auto_seal {
                if spool_len - sealer.sealed_up_to - sealer.unsealable >= *every {
                    let answer = match failure.take() {
                        Some(e) => Err(spool_error(e)),
                        None => sealer.seal(&mut writer, &mut chunks, &mut spool_len),
                    };
                    if let Some(answer) = answer.transpose() {
                        let _ = to.send(answer);
                    }
                }
            }
            let (mut encoded, key, position, held) = match done {
                Done::Chunk(encoded, key, position, held) => (encoded, key, position, held),
                Done::Seal(reply) => {
                    let answer = match failure.take() {
                        Some(e) => Err(spool_error(e)),
                        None => sealer.seal(&mut writer, &mut chunks, &mut spool_len),
                    };
                    let _ = reply.send(answer);
                    continue;
                }
                Done::AutoSeal(every, to) => {
                    sealer.end_streaming(&mut writer, &mut chunks, &mut spool_len);
                    sealer.region.send_to(&to);
                    auto_seal = Some((every, to));
                    continue;
                }
                Done::Stream(plan) => {
                    sealer.end_streaming(&mut writer, &mut chunks, &mut spool_len);
                    auto_seal = None;
                    sealer.region.send_to(&plan.sealed);
                    sealer.streaming = Some(streaming::Streaming::new(plan));
                    continue;
                }
                Done::Known(batch) => {
                    let _ = tokens.recv();
                    for (digest, uncompressed_size) in batch {
                        progress.chunks.fetch_add(1, Relaxed);
                        progress.deduplicated.fetch_add(1, Relaxed);
                        let index = match by_digest.get(&digest) {
                            Some(&index) => index,
                            None => match dict.chunks.get(&digest) {
                                Some(known) if known.uncompressed_size == uncompressed_size => {
                                    chunks.push(SpooledChunk {
                                        digest,
                                        flags: known.flags,
                                        place: ChunkPlace::Dict {
                                            blob: known.blob,
                                            offset: known.compressed_offset,
                                            own_copy: None,
                                        },
                                        stored_size: known.compressed_size,
                                        uncompressed_size,
                                    });
                                    by_digest.insert(digest, chunks.len() as u32 - 1);
                                    chunks.len() as u32 - 1
                                }
                                _ => {
                                    unknown.get_or_insert(digest);
                                    0
                                }
                            },
                        };
                        chunk_of_submission.push(index);
                    }
                    continue;
                }
            };
            // A new chunk's stored bytes, when a streaming layer's window takes them.
            let mut windowed = None;
            // Free one in-flight slot for the submitter.
            let _ = tokens.recv();
            progress.chunks.fetch_add(1, Relaxed);
            let index = match by_digest.get(&encoded.digest) {
                Some(&index) => {
                    progress.deduplicated.fetch_add(1, Relaxed);
                    index
                }
                None => {
                    let index = chunks.len() as u32;
                    let chunk = match dict.chunks.get(&encoded.digest) {
                        Some(known) => {
                            progress.deduplicated.fetch_add(1, Relaxed);
                            let own_copy = (!encoded.stored.is_empty()).then(|| {
                                if failure.is_none() {
                                    if let Err(e) = writer.write_all(&encoded.stored) {
                                        failure = Some(e);
                                    }
                                }
                                let copy = OwnCopy {
                                    spool_offset: spool_len,
                                    flags: encoded.flags,
                                    stored_size: encoded.stored.len() as u32,
                                };
                                spool_len += encoded.stored.len() as u64;
                                sealer.unsealable += encoded.stored.len() as u64;
                                copy
                            });
                            SpooledChunk {
                                digest: encoded.digest,
                                flags: known.flags,
                                place: ChunkPlace::Dict {
                                    blob: known.blob,
                                    offset: known.compressed_offset,
                                    own_copy,
                                },
                                stored_size: known.compressed_size,
                                uncompressed_size: known.uncompressed_size,
                            }
                        }
                        None => {
                            let stored_size = encoded.stored.len();
                            let windowing = sealer.streaming.is_some() && !held;
                            // Spooled: where it stays until a seal, or the copy a
                            // streamed chunk keeps for a prefetch region.
                            let spooled = (!windowing || keep_own_copies).then(|| {
                                if failure.is_none() {
                                    if let Err(e) = writer.write_all(&encoded.stored) {
                                        failure = Some(e);
                                    }
                                }
                                spool_len += stored_size as u64;
                                spool_len - stored_size as u64
                            });
                            if held || windowing {
                                sealer.unsealable += spooled.map_or(0, |_| stored_size as u64);
                            }
                            if held {
                                sealer.held.insert(chunks.len() as u32);
                                sealer.region.hold(chunks.len() as u32, key.clone(), stored_size as u64);
                            }
                            let place = match spooled {
                                Some(offset) if !windowing => ChunkPlace::Spool { offset },
                                copy => {
                                    windowed = Some((std::mem::take(&mut encoded.stored), copy));
                                    ChunkPlace::Window
                                }
                            };
                            if let Some(key) = key {
                                sealer.keys.insert(chunks.len() as u32, key);
                            }
                            progress.stored_bytes.fetch_add(stored_size as u64, Relaxed);
                            SpooledChunk {
                                digest: encoded.digest,
                                flags: encoded.flags,
                                place,
                                stored_size: stored_size as u32,
                                uncompressed_size: encoded.uncompressed_size,
                            }
                        }
                    };
                    chunks.push(chunk);
                    by_digest.insert(encoded.digest, index);
                    index
                }
            };
            chunk_of_submission.push(index);
            sealer.stream_chunk(&mut writer, &mut chunks, &mut spool_len, index, windowed, position);
            if failure.is_none() {
                if let Err(e) = sealer.seal_region_piece(&mut writer, &mut chunks, region::PIECE) {
                    sealer.region.fail(e);
                }
            }
        }
    }
    sealer.end_streaming(&mut writer, &mut chunks, &mut spool_len);
    if let Some(e) = failure {
        return Err(spool_error(e));
    }
    if let Some(digest) = unknown {
        return Err(BuildError::Invalid(format!(
            "a layer record names chunk {}, which no chunk dictionary holds",
            hex::encode(digest)
        )));
    }
    if let Some(why) = sealer.stream_failure {
        return Err(BuildError::Invalid(format!(
            "a blob written while its layer streamed in failed: {why}"
        )));
    }
    if let Some(why) = sealer.region.failure() {
        return Err(BuildError::Invalid(format!(
            "a piece of the prefetch region sealed mid-build failed: {why}"
        )));
    }
    let Some(sealed) = sealer.sealed.into_iter().collect::<Option<Vec<_>>>() else {
        return Err(BuildError::Invalid(
            "a blob opened mid-build was never completed".into(),
        ));
    };
    if chunks.iter().any(|c| c.place == ChunkPlace::Window) {
        return Err(BuildError::Invalid(
            "chunks of a streaming layer were left unwritten".into(),
        ));
    }
    let spool = writer.into_inner().map_err(|e| spool_error(e.into_error()))?;
    Ok(Collected {
        chunks,
        chunk_of_submission,
        spool,
        sealed,
    })
}

/// Seals spooled chunks into blobs.
struct Sealer<'a> {
    /// Where the first file of each unsealed chunk lies in the tree.
    keys: HashMap<u32, ChunkKey>,
    /// Chunks spooled since the previous seal that no seal takes (held back for
    /// the prefetch region).
    held: HashSet<u32>,
    /// Bytes spooled since the previous seal that no seal takes: held chunks, and
    /// own copies of chunks that are in blobs already.
    unsealable: u64,
    /// Whether a chunk a seal takes keeps its spooled bytes as its own copy.
    keep_own_copies: bool,
    /// Blobs sealed so far, by index (None: a streamed blob still open).
    sealed: Vec<Option<crate::dict::DictBlob>>,
    /// Spool offset up to which chunks are sealed.
    sealed_up_to: u64,
    /// The dictionary index of the first sealed blob (after the dictionary's own).
    first_blob: usize,
    blobs_dir: &'a std::path::Path,
    /// The layer whose new chunks go into blobs as they come, if one does.
    streaming: Option<streaming::Streaming>,
    /// Why a streamed blob failed, if one did.
    stream_failure: Option<String>,
    /// Held chunks not yet in a piece of the prefetch region.
    region: region::RegionPieces,
}

impl Sealer<'_> {
    /// Seals the chunks spooled since the previous seal (None: there are none).
    fn seal(
        &mut self,
        writer: &mut BufWriter<File>,
        chunks: &mut [SpooledChunk],
        spool_len: &mut u64,
    ) -> Result<Option<SealedBlob>> {
        // A layer streaming into blobs completes its last one first (and spools
        // what no blob took).
        self.end_streaming(writer, chunks, spool_len);
        let spool_len = *spool_len;
        let range = SealRange {
            from: self.sealed_up_to,
            to: spool_len,
        };
        let blob = seal_spool(
            writer,
            range,
            chunks,
            &self.keys,
            &self.held,
            self.keep_own_copies,
            self.first_blob + self.sealed.len(),
            self.blobs_dir,
        )?;
        // What the range holds and the seal did not take (held chunks, copies)
        // stays in the spool for good.
        self.keys.clear();
        self.held.clear();
        self.unsealable = 0;
        self.sealed_up_to = spool_len;
        if let Some(blob) = &blob {
            self.sealed.push(Some(blob.blob.clone()));
        }
        // A layer's held chunks are worth a piece of the region of their own
        // once there are enough of them (the rest waits for later layers').
        self.seal_region_piece(writer, chunks, region::PIECE_AT_LAYER_END)?;
        Ok(blob)
    }

    /// The index the next blob sealed or opened takes.
    fn reserve_blob_index(&mut self) -> usize {
        self.sealed.push(None);
        self.first_blob + self.sealed.len() - 1
    }

    /// Records the blob completed at a reserved index.
    fn fill_blob_index(&mut self, index: usize, blob: crate::dict::DictBlob) {
        self.sealed[index - self.first_blob] = Some(blob);
    }
}

/// Spool offsets of the chunks a seal writes out.
struct SealRange {
    from: u64,
    to: u64,
}

/// Writes the spooled chunks in `range` but the `held` ones as a blob (index
/// `blob` among the dictionary's blobs and those sealed before) and makes them
/// dictionary chunks of it, at their offsets in the blob layer (with their
/// spooled bytes as their own copies when `keep_own_copies`).
#[allow(clippy::too_many_arguments)]
fn seal_spool(
    writer: &mut BufWriter<File>,
    range: SealRange,
    chunks: &mut [SpooledChunk],
    keys: &HashMap<u32, ChunkKey>,
    held: &HashSet<u32>,
    keep_own_copies: bool,
    blob: usize,
    blobs_dir: &std::path::Path,
) -> Result<Option<SealedBlob>> {
    let in_range = |index: u32| {
        matches!(chunks[index as usize].place, ChunkPlace::Spool { offset } if (range.from..range.to).contains(&offset))
            && !held.contains(&index)
    };
    // Chunks a streamed blob took are no longer in the spool's range.
    let mut sealing: Vec<u32> = (0..chunks.len() as u32).filter(|&c| in_range(c)).collect();
    if sealing.is_empty() {
        return Ok(None);
    }
    // The chunks in the range, depth first by their first file's path (a
    // package's files together, as in the final blob), else in arrival order.
    sealing.sort_by(|a, b| keys.get(a).cmp(&keys.get(b)));
    write_spooled_blob(writer, &sealing, chunks, keep_own_copies, blob, blobs_dir, false).map(Some)
}

/// Writes the spooled chunks `sealing`, in this order, as a blob (index `blob`)
/// and makes them dictionary chunks of it (see [`seal_spool`]); with `region`,
/// all of it is a prefetch region.
fn write_spooled_blob(
    writer: &mut BufWriter<File>,
    sealing: &[u32],
    chunks: &mut [SpooledChunk],
    keep_own_copies: bool,
    blob: usize,
    blobs_dir: &std::path::Path,
    region: bool,
) -> Result<SealedBlob> {
    use petrel_format::layer_tar;
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    writer.flush().map_err(BuildError::io("write", "chunk spool"))?;
    std::fs::create_dir_all(blobs_dir).map_err(BuildError::io("create", blobs_dir))?;
    let data_size: u64 = sealing.iter().map(|&c| u64::from(chunks[c as usize].stored_size)).sum();
    let temp =
        tempfile::NamedTempFile::new_in(blobs_dir).map_err(BuildError::io("create temporary blob in", blobs_dir))?;
    let mut out = BufWriter::with_capacity(1 << 20, temp);
    let mut hasher = sha2::Sha256::new();
    let header = layer_tar::header(layer_tar::BLOB_ENTRY, data_size);
    hasher.update(header);
    out.write_all(&header).map_err(BuildError::io("write", blobs_dir))?;
    let mut buffer = Vec::new();
    let mut at = layer_tar::DATA_OFFSET;
    let mut uncompressed = 0u64;
    for &index in sealing {
        let chunk = &mut chunks[index as usize];
        let ChunkPlace::Spool { offset } = chunk.place else {
            return Err(BuildError::Invalid(format!(
                "chunk {index} sealed into a blob is not in the spool"
            )));
        };
        buffer.resize(chunk.stored_size as usize, 0);
        writer
            .get_ref()
            .read_exact_at(&mut buffer, offset)
            .map_err(BuildError::io("read", "chunk spool"))?;
        hasher.update(&buffer);
        out.write_all(&buffer).map_err(BuildError::io("write", blobs_dir))?;
        chunk.place = ChunkPlace::Dict {
            blob: blob as u32,
            offset: at,
            own_copy: keep_own_copies.then_some(OwnCopy {
                spool_offset: offset,
                flags: chunk.flags,
                stored_size: chunk.stored_size,
            }),
        };
        at += u64::from(chunk.stored_size);
        uncompressed += u64::from(chunk.uncompressed_size);
    }
    let trailer = vec![0u8; layer_tar::trailer_len(data_size) as usize];
    hasher.update(&trailer);
    out.write_all(&trailer).map_err(BuildError::io("write", blobs_dir))?;
    let temp = out
        .into_inner()
        .map_err(|e| BuildError::io("write", blobs_dir)(e.into_error()))?;
    let digest: [u8; 32] = hasher.finalize().into();
    let path = blobs_dir.join(hex::encode(digest));
    temp.persist(&path)
        .map_err(|e| BuildError::io("rename blob to", &path)(e.error))?;
    Ok(SealedBlob {
        blob: crate::dict::DictBlob {
            digest,
            compressed_size: layer_tar::layer_len(data_size),
            uncompressed_size: uncompressed,
            prefetch_end: if region { at } else { 0 },
        },
        path,
        streamed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_in_submission_order() {
        let spool = tempfile::tempfile().unwrap();
        let progress = Arc::new(BuildProgress::default());
        let blobs = tempfile::tempdir().unwrap();
        let mut pipeline = Pipeline::start(
            3,
            spool,
            Arc::default(),
            petrel_format::codec::ZSTD_LEVEL,
            false,
            Arc::clone(&progress),
            blobs.path().to_path_buf(),
        );
        let inputs: Vec<Vec<u8>> = (0..50).map(|i| vec![(i % 7) as u8; 10_000 + (i % 7)]).collect();
        for data in &inputs {
            pipeline.submit(data.clone(), None, 0, false).unwrap();
        }
        let collected = pipeline.finish().unwrap();
        assert_eq!(collected.chunks.len(), 7);
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(
            (progress.chunks.load(Relaxed), progress.deduplicated.load(Relaxed)),
            (50, 43)
        );
        for (i, &chunk) in collected.chunk_of_submission.iter().enumerate() {
            assert_eq!(chunk as usize, i % 7, "first-seen order keeps chunk ids stable");
        }
    }
}
