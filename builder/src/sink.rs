//! Turns file data into pieces: large files are cut by the chunker, all-zero chunks
//! become holes, and small files are packed together into shared chunks.

use crate::error::{BuildError, EntryProblem};
use crate::pipeline::{Collected, Pipeline};
use crate::prefetch_set::{PrefetchSet, Wanted};
use crate::tree::{Piece, PieceSource};
use petrel_format::ChunkerParams;
use std::collections::HashMap;
use std::io::Read;

/// Files smaller than this are packed into shared chunks by default.
pub const DEFAULT_SMALL_FILE_LIMIT: u32 = 64 << 10;

/// Why a file's data could not be taken.
#[derive(Debug)]
pub enum FileDataError {
    /// The input was bad: belongs to the entry being read.
    Input(EntryProblem),
    /// The builder itself failed.
    Build(BuildError),
}

/// Counters of the data path.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct SinkStats {
    pub files: u64,
    pub bytes: u64,
    pub packed_files: u64,
    pub deduplicated_small_files: u64,
    pub hole_bytes: u64,
    /// Of `hole_bytes`, those a sparse map declared: skipped, never read or scanned.
    pub unread_hole_bytes: u64,
}

/// A file that arrives as holes and data regions (a sparse tar entry, read by its
/// sparse map).
pub trait SparseFile {
    /// Passes over the hole at the current position; returns its length (0 when
    /// data, or the end, follows).
    fn skip_hole(&mut self) -> u64;
    /// Data bytes before the next hole or the end.
    fn data_len(&self) -> u64;
    /// Where those data bytes are read from.
    fn data(&mut self) -> &mut dyn Read;
}

/// Longest hole piece (piece lengths are 32-bit).
const MAX_HOLE_PIECE: u64 = 1 << 30;

/// Receives every regular file's data while layers are applied.
#[derive(Debug)]
pub struct ChunkSink {
    pipeline: Pipeline,
    chunker: ChunkerParams,
    small_file_limit: u32,
    batch_target: usize,
    /// Pieces name slots; a slot becomes a submission once its chunk is submitted.
    slot_submission: Vec<u64>,
    batch: Vec<u8>,
    batch_slot: Option<u32>,
    small_files: HashMap<[u8; 32], (u32, u32)>,
    pub stats: SinkStats,
    /// Whether chunks carry their file's place in the tree (for sealed blobs).
    keyed: bool,
    /// The place in the tree of the file being added (see [`depth_first_key`]).
    file_key: Option<ChunkKey>,
    /// The place of the first file in the small-file batch.
    batch_key: Option<ChunkKey>,
    /// Where the data of the file being added starts in its layer's tar stream.
    data_position: u64,
    /// Where the data of the last file in the small-file batch ends there.
    batch_end: u64,
    /// The files a prefetch profile names: their chunks are held back from blobs
    /// sealed mid-build (see [`crate::prefetch_set`]).
    prefetch: PrefetchSet,
    /// What of the file being added the profile wants.
    file_wanted: Wanted,
    /// Whether the small-file batch holds a file the profile wants.
    batch_held: bool,
}

/// Where a chunk's first file lies in the tree, as bytes that sort depth first.
pub type ChunkKey = std::sync::Arc<[u8]>;

/// A path's place in a depth-first walk (a directory's files by name, then its
/// subdirectories' subtrees by name), as bytes that compare in that order: each
/// directory component is `2 name 0`, the file's name is `1 name`.
pub fn depth_first_key(components: &[Vec<u8>]) -> ChunkKey {
    let mut key = Vec::with_capacity(components.iter().map(|c| c.len() + 2).sum());
    if let Some((file, dirs)) = components.split_last() {
        for dir in dirs {
            key.push(2);
            key.extend_from_slice(dir);
            key.push(0);
        }
        key.push(1);
        key.extend_from_slice(file);
    }
    key.into()
}

/// How many bytes of small files are packed into one chunk.
fn batch_target(chunker: ChunkerParams) -> u32 {
    match chunker {
        ChunkerParams::Fixed { size } => size,
        ChunkerParams::FastCdc { avg, .. } => avg,
    }
}

/// The small-file limit a build with `chunker` applies when asked for `limit`:
/// at most half a batch (§8).
pub fn effective_small_file_limit(chunker: ChunkerParams, limit: u32) -> u32 {
    limit.min(batch_target(chunker) / 2)
}

/// A finished sink: unique chunks and, per slot, its unique chunk index.
#[derive(Debug)]
pub struct SinkOutput {
    pub collected: Collected,
    pub chunk_of_slot: Vec<u32>,
    pub stats: SinkStats,
}

const UNFILLED: u64 = u64::MAX;

impl ChunkSink {
    /// A sink cutting file data with `chunker` into `pipeline`, holding back the
    /// chunks of the files `prefetch` names.
    pub fn new(chunker: ChunkerParams, small_file_limit: u32, pipeline: Pipeline, prefetch: PrefetchSet) -> Self {
        let batch_target = batch_target(chunker) as usize;
        ChunkSink {
            pipeline,
            chunker,
            small_file_limit: effective_small_file_limit(chunker, small_file_limit),
            batch_target,
            slot_submission: Vec::new(),
            batch: Vec::new(),
            batch_slot: None,
            small_files: HashMap::new(),
            stats: SinkStats::default(),
            keyed: false,
            file_key: None,
            batch_key: None,
            data_position: 0,
            batch_end: 0,
            prefetch,
            file_wanted: Wanted::Nothing,
            batch_held: false,
        }
    }

    /// The small-file limit in effect (recorded in the superblock).
    /// Seals the chunks submitted so far into a blob ([`Pipeline::seal`]).
    pub fn seal(&mut self) -> Result<Option<crate::pipeline::SealedBlob>, BuildError> {
        self.pipeline.seal()
    }

    /// Seals a blob whenever `every` bytes are spooled unsealed ([`Pipeline::auto_seal`]).
    pub fn auto_seal(
        &mut self,
        every: u64,
        to: std::sync::mpsc::Sender<Result<crate::pipeline::SealedBlob, BuildError>>,
    ) -> Result<(), BuildError> {
        // Sealed blobs lay their chunks out depth first by their files' paths.
        self.keyed = true;
        self.pipeline.auto_seal(every, to)
    }

    /// From the chunks submitted next on (one layer's), writes new chunks into
    /// blobs as they come ([`Pipeline::stream`]).
    pub fn stream(&mut self, plan: crate::pipeline::StreamPlan) -> Result<(), BuildError> {
        self.keyed = true;
        self.pipeline.stream(plan)
    }

    /// Where the data of the file added next starts in its layer's tar stream
    /// (what a streaming layer's blob lengths are estimated from).
    pub fn set_data_position(&mut self, position: u64) {
        self.data_position = position;
    }

    /// The path (cleaned components) of the file whose data comes next.
    pub fn set_path(&mut self, components: &[Vec<u8>]) {
        self.file_key = self.keyed.then(|| depth_first_key(components));
        self.file_wanted = self.prefetch.wanted(components);
    }

    pub fn small_file_limit(&self) -> u32 {
        self.small_file_limit
    }

    /// Reads exactly `size` bytes of one file and returns its pieces.
    pub fn add_file(&mut self, reader: &mut dyn Read, size: u64) -> Result<Vec<Piece>, FileDataError> {
        self.stats.files += 1;
        self.stats.bytes += size;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut limited = reader.take(size);
        if size < u64::from(self.small_file_limit) {
            return self.add_small_file(&mut limited, size);
        }
        self.add_region(&mut limited, 0, size)
    }

    /// Takes a sparse file by its map: holes become hole pieces without a byte of
    /// them read (a few kilobytes of archive may declare gigabytes of hole), data
    /// regions are cut like any file's data.
    pub fn add_sparse_file(&mut self, file: &mut dyn SparseFile, size: u64) -> Result<Vec<Piece>, FileDataError> {
        self.stats.files += 1;
        self.stats.bytes += size;
        let mut pieces = Vec::new();
        let mut offset = 0u64;
        loop {
            let hole = file.skip_hole();
            if hole > size.saturating_sub(offset) {
                return Err(FileDataError::Input(EntryProblem::Io(std::io::Error::other(
                    "sparse map runs past the file size",
                ))));
            }
            let mut left = hole;
            while left > 0 {
                let length = left.min(MAX_HOLE_PIECE);
                pieces.push(Piece {
                    file_offset: offset,
                    length: length as u32,
                    source: PieceSource::Hole,
                });
                offset += length;
                left -= length;
            }
            self.stats.hole_bytes += hole;
            self.stats.unread_hole_bytes += hole;
            let data = file.data_len().min(size - offset);
            if data > 0 {
                pieces.extend(self.add_region(&mut file.data().take(data), offset, data)?);
                offset += data;
            } else if hole == 0 {
                break;
            }
        }
        if offset != size {
            return Err(FileDataError::Input(EntryProblem::Truncated {
                read: offset,
                expected: size,
            }));
        }
        Ok(pieces)
    }

    /// Cuts exactly `size` bytes of `reader`, which start at `base` in their file.
    fn add_region(&mut self, limited: &mut dyn Read, base: u64, size: u64) -> Result<Vec<Piece>, FileDataError> {
        let mut pieces = Vec::new();
        let mut offset = 0u64;
        match self.chunker {
            ChunkerParams::Fixed { size: chunk_size } => loop {
                let mut data = vec![0u8; chunk_size as usize];
                let got = read_full(limited, &mut data).map_err(|e| FileDataError::Input(EntryProblem::Io(e)))?;
                if got == 0 {
                    break;
                }
                data.truncate(got);
                pieces.push(self.add_chunk(base + offset, data)?);
                offset += got as u64;
            },
            ChunkerParams::FastCdc { min, avg, max } => {
                let chunks = fastcdc::v2020::StreamCDC::new(limited, min as usize, avg as usize, max as usize);
                for chunk in chunks {
                    let chunk = chunk.map_err(|e| FileDataError::Input(EntryProblem::Io(e.into())))?;
                    let length = chunk.length as u64;
                    pieces.push(self.add_chunk(base + offset, chunk.data)?);
                    offset += length;
                }
            }
        }
        if offset != size {
            return Err(FileDataError::Input(EntryProblem::Truncated {
                read: offset,
                expected: size,
            }));
        }
        Ok(pieces)
    }

    fn add_chunk(&mut self, file_offset: u64, data: Vec<u8>) -> Result<Piece, FileDataError> {
        let length = data.len() as u32;
        if data.iter().all(|&b| b == 0) {
            self.stats.hole_bytes += u64::from(length);
            return Ok(Piece {
                file_offset,
                length,
                source: PieceSource::Hole,
            });
        }
        let end = self.data_position + file_offset + u64::from(length);
        let held = self.file_wanted.covers(file_offset, u64::from(length));
        let seq = self
            .pipeline
            .submit(data, self.file_key.clone(), end, held)
            .map_err(FileDataError::Build)?;
        let slot = self.new_slot(seq);
        Ok(Piece {
            file_offset,
            length,
            source: PieceSource::Chunk { slot, offset: 0 },
        })
    }

    /// Takes a file a layer record lists (see [`crate::record`]): its pieces name
    /// chunks of `chunks` that a dictionary holds, each submitted once per layer
    /// (`slots`, one per record chunk, remembers the slot it got).
    pub fn add_recorded_file(
        &mut self,
        pieces: &[petrel_format::layer_record::RecordPiece],
        chunks: &[petrel_format::layer_record::RecordChunk],
        slots: &mut [Option<u32>],
        size: u64,
    ) -> Result<Vec<Piece>, BuildError> {
        self.stats.files += 1;
        self.stats.bytes += size;
        let mut out = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let source = if piece.chunk == petrel_format::layer_record::RECORD_HOLE {
                self.stats.hole_bytes += u64::from(piece.length);
                PieceSource::Hole
            } else {
                let index = piece.chunk as usize;
                let slot = match slots[index] {
                    Some(slot) => slot,
                    None => {
                        let chunk = chunks[index];
                        let seq = self.pipeline.submit_known(chunk.digest, chunk.uncompressed_size)?;
                        let slot = self.new_slot(seq);
                        slots[index] = Some(slot);
                        slot
                    }
                };
                PieceSource::Chunk {
                    slot,
                    offset: piece.chunk_offset,
                }
            };
            out.push(Piece {
                file_offset: piece.file_offset,
                length: piece.length,
                source,
            });
        }
        Ok(out)
    }

    fn add_small_file(&mut self, reader: &mut dyn Read, size: u64) -> Result<Vec<Piece>, FileDataError> {
        let mut data = vec![0u8; size as usize];
        let got = read_full(reader, &mut data).map_err(|e| FileDataError::Input(EntryProblem::Io(e)))?;
        if got as u64 != size {
            return Err(FileDataError::Input(EntryProblem::Truncated {
                read: got as u64,
                expected: size,
            }));
        }
        let digest = *blake3::hash(&data).as_bytes();
        let (slot, offset) = match self.small_files.get(&digest) {
            Some(&place) => {
                self.stats.deduplicated_small_files += 1;
                place
            }
            None => {
                if !self.batch.is_empty() && self.batch.len() + data.len() > self.batch_target {
                    self.flush_batch().map_err(FileDataError::Build)?;
                }
                let slot = match self.batch_slot {
                    Some(slot) => slot,
                    None => {
                        let slot = self.new_slot(UNFILLED);
                        self.batch_slot = Some(slot);
                        self.batch_key = self.file_key.clone();
                        slot
                    }
                };
                let offset = self.batch.len() as u32;
                self.batch_held |= self.file_wanted.covers(0, size);
                self.batch.extend_from_slice(&data);
                self.batch_end = self.data_position + size;
                self.small_files.insert(digest, (slot, offset));
                self.stats.packed_files += 1;
                (slot, offset)
            }
        };
        Ok(vec![Piece {
            file_offset: 0,
            length: size as u32,
            source: PieceSource::Chunk { slot, offset },
        }])
    }

    fn new_slot(&mut self, submission: u64) -> u32 {
        self.slot_submission.push(submission);
        (self.slot_submission.len() - 1) as u32
    }

    fn flush_batch(&mut self) -> Result<(), BuildError> {
        if let Some(slot) = self.batch_slot.take() {
            let data = std::mem::take(&mut self.batch);
            let held = std::mem::take(&mut self.batch_held);
            let seq = self
                .pipeline
                .submit(data, self.batch_key.take(), self.batch_end, held)?;
            self.slot_submission[slot as usize] = seq;
        }
        Ok(())
    }

    /// Flushes the last batch and waits for every chunk.
    pub fn finish(mut self) -> Result<SinkOutput, BuildError> {
        self.flush_batch()?;
        let collected = self.pipeline.finish()?;
        let chunk_of_slot = self
            .slot_submission
            .iter()
            .map(|&seq| collected.chunk_of_submission[seq as usize])
            .collect();
        Ok(SinkOutput {
            collected,
            chunk_of_slot,
            stats: self.stats,
        })
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
pub fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod key_tests {
    use super::depth_first_key;

    fn key(path: &str) -> std::sync::Arc<[u8]> {
        let components: Vec<Vec<u8>> = path.split('/').map(|c| c.as_bytes().to_vec()).collect();
        depth_first_key(&components)
    }

    #[test]
    fn keys_sort_depth_first_with_a_directorys_files_before_its_subdirectories() {
        let walk = [
            "numpy/__init__.py",
            "numpy/version.py",
            "numpy/core/__init__.py",
            "numpy/core/multiarray.py",
            "numpy/core/tests/test_a.py",
            "numpy/lib/__init__.py",
            "numpy2/__init__.py",
            "pandas/__init__.py",
        ];
        let mut shuffled: Vec<&str> = walk.iter().rev().copied().collect();
        shuffled.sort_by_key(|p| key(p));
        assert_eq!(shuffled, walk);
    }
}
