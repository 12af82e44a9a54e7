//! Parallel hashing and compression of chunks with a bounded number in flight.
//!
//! The reading thread submits chunks in order; worker threads hash and compress
//! them; one collector takes results back in submission order, deduplicates by
//! digest and appends new chunks' stored bytes to a spool file. The final blob is
//! assembled from the spool once the tree (and so the chunk order) is known.

use crate::dict::ChunkDict;
use crate::error::{BuildError, Result};
use petrel_format::codec::{chunk_digest, encode_chunk, EncodedChunk};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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
}

struct Job {
    seq: u64,
    data: Vec<u8>,
}

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    jobs: Option<SyncSender<Job>>,
    tokens: SyncSender<()>,
    workers: Vec<JoinHandle<()>>,
    collector: Option<JoinHandle<Result<Collected>>>,
    next_seq: u64,
}

impl Pipeline {
    /// Starts `threads` workers (at least 1) spooling into `spool`; chunks found in
    /// `dict` are neither compressed nor spooled unless `copy_dict_chunks` (then
    /// they are both, as [`OwnCopy`]s, and still referenced from the dictionary).
    pub fn start(
        threads: usize,
        spool: File,
        dict: Arc<ChunkDict>,
        copy_dict_chunks: bool,
        progress: Arc<BuildProgress>,
    ) -> Self {
        let threads = threads.max(1);
        let capacity = threads * IN_FLIGHT_PER_WORKER;
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(capacity);
        let (tokens_tx, tokens_rx) = sync_channel::<()>(capacity);
        let (results_tx, results_rx) = channel::<(u64, EncodedChunk)>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let workers = (0..threads)
            .map(|i| {
                let jobs_rx = Arc::clone(&jobs_rx);
                let results_tx = results_tx.clone();
                let dict = Arc::clone(&dict);
                std::thread::Builder::new()
                    .name(format!("petrel-chunk-{i}"))
                    .spawn(move || worker(&jobs_rx, &results_tx, &dict, copy_dict_chunks))
                    .expect("spawn chunk worker")
            })
            .collect();
        drop(results_tx);
        let collector = std::thread::Builder::new()
            .name("petrel-collect".into())
            .spawn(move || collect(results_rx, tokens_rx, spool, &dict, &progress))
            .expect("spawn collector");
        Pipeline {
            jobs: Some(jobs_tx),
            tokens: tokens_tx,
            workers,
            collector: Some(collector),
            next_seq: 0,
        }
    }

    /// Submits one chunk; blocks while too many are in flight. Returns its sequence number.
    pub fn submit(&mut self, data: Vec<u8>) -> Result<u64> {
        let seq = self.next_seq;
        let broken = || BuildError::Invalid("chunk pipeline stopped unexpectedly".into());
        self.tokens.send(()).map_err(|_| broken())?;
        self.jobs
            .as_ref()
            .ok_or_else(broken)?
            .send(Job { seq, data })
            .map_err(|_| broken())?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Waits for every submitted chunk and returns the result.
    pub fn finish(mut self) -> Result<Collected> {
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

fn worker(
    jobs: &Mutex<Receiver<Job>>,
    results: &std::sync::mpsc::Sender<(u64, EncodedChunk)>,
    dict: &ChunkDict,
    copy_dict_chunks: bool,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let digest = chunk_digest(&job.data);
        let encoded = if !copy_dict_chunks && dict.chunks.contains_key(&digest) {
            // Already stored elsewhere: no need to compress it.
            EncodedChunk {
                digest,
                flags: 0,
                uncompressed_size: job.data.len() as u32,
                stored: Vec::new(),
            }
        } else {
            encode_chunk(&job.data)
        };
        if results.send((job.seq, encoded)).is_err() {
            return;
        }
    }
}

fn collect(
    results: Receiver<(u64, EncodedChunk)>,
    tokens: Receiver<()>,
    spool: File,
    dict: &ChunkDict,
    progress: &BuildProgress,
) -> Result<Collected> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut writer = BufWriter::with_capacity(1 << 20, spool);
    let mut pending: BTreeMap<u64, EncodedChunk> = BTreeMap::new();
    let mut by_digest: HashMap<[u8; 32], u32> = HashMap::new();
    let mut chunks = Vec::new();
    let mut chunk_of_submission = Vec::new();
    let mut spool_len = 0u64;
    let mut failure = None;
    for (seq, encoded) in results {
        pending.insert(seq, encoded);
        while let Some(encoded) = pending.remove(&(chunk_of_submission.len() as u64)) {
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
                            if failure.is_none() {
                                if let Err(e) = writer.write_all(&encoded.stored) {
                                    failure = Some(e);
                                }
                            }
                            let place = ChunkPlace::Spool { offset: spool_len };
                            spool_len += encoded.stored.len() as u64;
                            progress.stored_bytes.fetch_add(encoded.stored.len() as u64, Relaxed);
                            SpooledChunk {
                                digest: encoded.digest,
                                flags: encoded.flags,
                                place,
                                stored_size: encoded.stored.len() as u32,
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
        }
    }
    let spool_error = |source| BuildError::Io {
        action: "write chunk spool",
        path: "<spool>".into(),
        source,
    };
    if let Some(e) = failure {
        return Err(spool_error(e));
    }
    let spool = writer.into_inner().map_err(|e| spool_error(e.into_error()))?;
    Ok(Collected {
        chunks,
        chunk_of_submission,
        spool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_in_submission_order() {
        let spool = tempfile::tempfile().unwrap();
        let progress = Arc::new(BuildProgress::default());
        let mut pipeline = Pipeline::start(3, spool, Arc::default(), false, Arc::clone(&progress));
        let inputs: Vec<Vec<u8>> = (0..50).map(|i| vec![(i % 7) as u8; 10_000 + (i % 7)]).collect();
        for data in &inputs {
            pipeline.submit(data.clone()).unwrap();
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
