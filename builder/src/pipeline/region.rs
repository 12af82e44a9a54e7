//! Pieces of a prefetch region sealed while layers are still read.
//!
//! In a build with a prefetch profile, the new chunks of the files it names are
//! held out of the layers' blobs. Kept for the blob the build writes when it
//! finishes, they were pushed after the whole image was read: 26 MB of the
//! Python image's 130, 2 s over 100 Mbit/s, so a conversion with a profile took
//! 1.18 times `skopeo copy`'s time against 1.01 without. Sealed in pieces of
//! [`PIECE`] as they come instead, each a blob that is all prefetch region, they
//! go up while the pull goes on; what is left at the end (under a piece) stays in
//! the finish blob's region. The daemon prefetches every blob's region, pieces in
//! the order the chunk table lists them: by their first-accessed chunk.

use super::{write_spooled_blob, SealedBlob, Sealer, SpooledChunk};
use crate::error::{BuildError, Result};
use crate::sink::ChunkKey;
use std::fs::File;
use std::io::BufWriter;
use std::sync::mpsc::Sender;

/// Stored bytes of held chunks that make a piece mid-layer: about what is left to
/// push when the pull ends (0.17 s at 100 Mbit/s), and big enough that the Python
/// image's 26 MB region is 11 blobs, each one range request. Converting it with
/// its profile over 100 Mbit/s and 20 ms took 1.02 times `skopeo copy`'s time with
/// 4 MiB pieces and 1.01 with 2 MiB (the three-layer service 1.05 and 1.03).
pub const PIECE: u64 = 2 << 20;
/// Stored bytes of a layer's held chunks, at its end, that make a piece of their
/// own: a small layer's few profiled files wait for later layers' instead of
/// becoming a tiny blob each.
pub const PIECE_AT_LAYER_END: u64 = 1 << 20;

/// A piece also holds at least this share of the region sealed before it, so an
/// image has a few dozen pieces at most, whatever its profile names (a profile of
/// `/` holds every chunk: 1 GiB of them makes 43 pieces, not 512): a manifest of
/// thousands of layers is more than containerd or a registry should be asked to
/// take. The Python image's 26 MB region is 2 MiB pieces up to 16 MiB, 11 in all.
const PIECE_GROWTH: (u64, u64) = (1, 8);

/// Held chunks waiting for a piece, and where pieces go.
#[derive(Debug, Default)]
pub(super) struct RegionPieces {
    /// Held chunks not in a piece yet, with their first file's place in the
    /// tree, in arrival order.
    pending: Vec<(u32, Option<ChunkKey>)>,
    pending_bytes: u64,
    /// Stored bytes of the pieces sealed so far.
    sealed_bytes: u64,
    /// Where sealed blobs go (a conversion's pushers); None: nowhere, so the
    /// whole region stays for the finish blob (a local build).
    to: Option<Sender<Result<SealedBlob>>>,
    failure: Option<String>,
}

impl RegionPieces {
    /// Pieces go where the layers' blobs go from now on.
    pub(super) fn send_to(&mut self, to: &Sender<Result<SealedBlob>>) {
        self.to = Some(to.clone());
    }

    /// A new held chunk, spooled, of `stored` bytes.
    pub(super) fn hold(&mut self, index: u32, key: Option<ChunkKey>, stored: u64) {
        self.pending.push((index, key));
        self.pending_bytes += stored;
    }

    /// A piece that failed fails the build, as a failed streamed blob does.
    pub(super) fn fail(&mut self, error: BuildError) {
        self.failure.get_or_insert_with(|| error.to_string());
        if let Some(to) = self.to.take() {
            let _ = to.send(Err(error));
        }
    }

    pub(super) fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
}

impl Sealer<'_> {
    /// Seals the held chunks waiting into a piece of the region when they come
    /// to `at_least` stored bytes (and [`PIECE_GROWTH`] of the pieces before)
    /// and a conversion takes blobs.
    pub(super) fn seal_region_piece(
        &mut self,
        writer: &mut BufWriter<File>,
        chunks: &mut [SpooledChunk],
        at_least: u64,
    ) -> Result<()> {
        let at_least = piece_threshold(at_least, self.region.sealed_bytes);
        if self.region.pending_bytes < at_least || self.region.pending.is_empty() {
            return Ok(());
        }
        let Some(to) = self.region.to.clone() else {
            return Ok(());
        };
        let mut pending = std::mem::take(&mut self.region.pending);
        self.region.sealed_bytes += std::mem::take(&mut self.region.pending_bytes);
        // Depth first by their first file's path, as every sealed blob.
        pending.sort_by(|(_, a), (_, b)| a.cmp(b));
        let sealing: Vec<u32> = pending.into_iter().map(|(index, _)| index).collect();
        let index = self.reserve_blob_index();
        let piece = write_spooled_blob(writer, &sealing, chunks, false, index, self.blobs_dir, true)?;
        tracing::debug!(
            blob = index,
            chunks = sealing.len(),
            size = piece.blob.compressed_size,
            "a piece of the prefetch region is sealed"
        );
        self.fill_blob_index(index, piece.blob.clone());
        let _ = to.send(Ok(piece));
        Ok(())
    }
}

/// Stored bytes that make the next piece, `at_least` or more, once `sealed` bytes
/// of the region are in pieces.
fn piece_threshold(at_least: u64, sealed: u64) -> u64 {
    let (share, of) = PIECE_GROWTH;
    at_least.max(sealed / of * share)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces a region of `region` stored bytes makes, arriving in 64 KiB chunks.
    fn pieces(region: u64) -> u64 {
        let (mut sealed, mut pending, mut count) = (0, 0, 0);
        for _ in 0..region / (64 << 10) {
            pending += 64 << 10;
            if pending >= piece_threshold(PIECE, sealed) {
                sealed += std::mem::take(&mut pending);
                count += 1;
            }
        }
        count
    }

    #[test]
    fn pieces_grow_so_that_a_region_of_any_size_makes_a_few_dozen() {
        assert_eq!(
            pieces(26 << 20),
            12,
            "a startup's region: 2 MiB pieces to 16 MiB, then 1/8 of the region"
        );
        assert!(pieces(1 << 30) <= 45, "{}", pieces(1 << 30));
        assert!(pieces(100 << 30) <= 90, "{}", pieces(100 << 30));
    }
}
