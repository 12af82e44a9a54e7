//! A layer's new chunks written into blobs while they come, so that each blob can
//! be uploaded while it grows (`petrel convert`): the push link then keeps pace
//! with the pull instead of waiting for whole blobs to fill.
//!
//! A blob layer's tar header states its length before its data, so each blob's
//! length is chosen when it opens: half of what the layer is expected to store
//! from then on (its uncompressed length left, times what it stored per byte so
//! far). The blob takes chunks until the next does not fit; the bytes left are
//! zeros. Chunks are taken in windows of [`WINDOW`] stored bytes, each window
//! depth first by path. Near the layer's end, when half of what is left is below
//! [`MIN_BLOB`], no blob opens: the rest is sealed at the layer's end, small.
//! Every choice depends on the layer's chunks and length only, so an unchanged
//! layer gives the same blobs.

use super::{ChunkPlace, OwnCopy, SealedBlob, Sealer, SpooledChunk};
use crate::error::{BuildError, Result};
use crate::growing_blob::{BlobEnd, GrowingBlob};
use petrel_format::layer_tar;
use sha2::Digest;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// How one layer's chunks go into blobs as they come.
#[derive(Debug)]
pub struct StreamPlan {
    /// The length of the layer's tar stream, uncompressed.
    pub layer_plain: u64,
    /// The layer's length as stored (compressed): chunks compressed one by one
    /// store about as many bytes as the layer's own compression of the same data.
    pub layer_size: u64,
    /// Where each blob goes once complete (its digest known).
    pub sealed: Sender<Result<SealedBlob>>,
    /// Where each blob goes when it opens, to be read while it grows (None:
    /// blobs go to `sealed` only, and are not marked streamed).
    pub opened: Option<Sender<Arc<GrowingBlob>>>,
    /// The layer goes into one blob: it takes [`ONE_BLOB_SHARE`] of what the
    /// layer is expected to store instead of half (blobs that halve as it goes).
    pub one_blob: bool,
}

/// The share of what a layer is expected to store from then on that a blob
/// opening in a one-blob layer takes: all of it, so that the layer is one blob (a
/// directory read ahead stays one request, and nodes warming through a cold
/// mirror probe one blob), what the estimate misses sealed at the layer's end,
/// what it overshoots padded with zeros. Taking 15/16 left a sixteenth of the
/// conversion's last layer in a second blob, and three nodes behind a cold mirror then cost
/// the origin 1.4 to 1.6 copies of a 12 MiB image on a busy machine, against 1.1
/// to 1.4 with the layer sealed whole.
pub const ONE_BLOB_SHARE: (u64, u64) = (1, 1);

/// Stored bytes taken into blobs at a time, sorted depth first by path. A blob's
/// upload reads what its windows wrote, so it follows the pull a window or two
/// behind, and that is what is left to push when the pull ends: with 4 MiB
/// windows the Python image (one 124 MiB layer) converted over 100 Mbit/s in 1.02
/// to 1.04 times `skopeo copy`'s time, with 1 MiB in 1.00 to 1.01 (and the
/// three-layer Python service in 1.02 to 1.08, then 1.02 to 1.04).
pub const WINDOW: u64 = 1 << 20;
/// The first window of a layer: enough to estimate what the layer will store,
/// small so that its upload starts soon after the layer does.
pub const FIRST_WINDOW: u64 = WINDOW;
/// No blob smaller than this opens: the layer's rest is sealed at its end.
pub const MIN_BLOB: u64 = 1 << 20;
/// The largest blob that opens.
pub const MAX_BLOB: u64 = 512 << 20;
/// Stored bytes per byte of a gzip layer, at most, as a fraction: zstd level 3
/// on 64 KiB chunks stored 1.07 bytes per byte of the Python app's layer
/// (gzip level 6).
const STORED_PER_COMPRESSED: (u128, u128) = (11, 10);

/// The streaming state of one layer.
#[derive(Debug)]
pub(super) struct Streaming {
    plan: StreamPlan,
    /// Where the latest chunk's data ends in the layer's tar stream.
    position: u64,
    /// Bytes of new chunks the layer stored so far.
    stored: u64,
    /// New chunks not yet taken into a blob, in arrival order, with their
    /// stored bytes (in memory: a chunk a blob takes never touches the spool)
    /// and where the spool keeps a copy of them, if it does (a build with a
    /// prefetch profile).
    window: Vec<(u32, Vec<u8>, Option<u64>)>,
    window_bytes: u64,
    open: Option<OpenBlob>,
}

impl Streaming {
    pub(super) fn new(plan: StreamPlan) -> Self {
        Streaming {
            plan,
            position: 0,
            stored: 0,
            window: Vec::new(),
            window_bytes: 0,
            open: None,
        }
    }

    /// Stored bytes the layer is expected to add after its latest chunk: what it
    /// stored per byte so far, but no more than its own compression ratio (plus
    /// [`STORED_PER_COMPRESSED`]) over what is left: a layer often starts with
    /// binaries that compress worse than the rest.
    fn expected_rest(&self) -> u64 {
        let plain = self.plan.layer_plain;
        if self.position == 0 || self.position >= plain {
            return 0;
        }
        let left = u128::from(plain - self.position);
        let so_far = left * u128::from(self.stored) / u128::from(self.position);
        let (per, of) = STORED_PER_COMPRESSED;
        let whole_layer = left * u128::from(self.plan.layer_size) * per / (u128::from(plain) * of);
        so_far.min(whole_layer).min(u128::from(u64::MAX)) as u64
    }
}

impl Sealer<'_> {
    /// Takes note of a collected chunk (`index`, with its stored bytes and their
    /// copy's place in the spool when it is new and the window holds it) of a
    /// streaming layer, and fills blobs once a window is full.
    pub(super) fn stream_chunk(
        &mut self,
        writer: &mut BufWriter<File>,
        chunks: &mut [SpooledChunk],
        spool_len: &mut u64,
        index: u32,
        stored: Option<(Vec<u8>, Option<u64>)>,
        position: u64,
    ) {
        let Some(streaming) = self.streaming.as_mut() else {
            return;
        };
        streaming.position = streaming.position.max(position);
        if let Some((bytes, copy)) = stored {
            let size = bytes.len() as u64;
            streaming.window.push((index, bytes, copy));
            streaming.window_bytes += size;
            streaming.stored += size;
        }
        let window = if streaming.stored == streaming.window_bytes {
            FIRST_WINDOW
        } else {
            WINDOW
        };
        if streaming.window_bytes >= window {
            if let Err(e) = self.fill_blobs(writer, chunks, spool_len, false) {
                self.stop_streaming(e);
            }
        }
    }

    /// Ends the streaming layer, if any: the last window goes into the open blob
    /// where it fits, and the blob is completed; the chunks left go to the spool.
    pub(super) fn end_streaming(
        &mut self,
        writer: &mut BufWriter<File>,
        chunks: &mut [SpooledChunk],
        spool_len: &mut u64,
    ) {
        if self.streaming.is_none() {
            return;
        }
        let ended = self
            .fill_blobs(writer, chunks, spool_len, true)
            .and_then(|()| self.close_open_blob());
        match ended {
            Ok(()) => self.streaming = None,
            Err(e) => self.stop_streaming(e),
        }
    }

    /// A failed blob fails the build: the error goes where blobs go, and the
    /// pipeline's result is an error too (chunks may point into the blob).
    fn stop_streaming(&mut self, error: BuildError) {
        self.stream_failure.get_or_insert_with(|| error.to_string());
        if let Some(streaming) = self.streaming.take() {
            let _ = streaming.plan.sealed.send(Err(error));
        }
    }

    fn close_open_blob(&mut self) -> Result<()> {
        let Some(streaming) = self.streaming.as_mut() else {
            return Ok(());
        };
        if let Some(open) = streaming.open.take() {
            let index = open.index as usize;
            let to = streaming.plan.sealed.clone();
            let blob = open.close(self.blobs_dir)?;
            self.fill_blob_index(index, blob.blob.clone());
            let _ = to.send(Ok(blob));
        }
        Ok(())
    }

    /// Takes the window's chunks, depth first, into blobs: the open one, then new
    /// ones while half of what is left is worth a blob (none at the layer's end).
    /// What no blob takes goes to the spool, to be sealed at the layer's end.
    fn fill_blobs(
        &mut self,
        writer: &mut BufWriter<File>,
        chunks: &mut [SpooledChunk],
        spool_len: &mut u64,
        layer_end: bool,
    ) -> Result<()> {
        let Some(streaming) = self.streaming.as_mut() else {
            return Ok(());
        };
        if streaming.window.is_empty() {
            return Ok(());
        }
        let mut window = std::mem::take(&mut streaming.window);
        window.sort_by(|(a, ..), (b, ..)| self.keys.get(a).cmp(&self.keys.get(b)));
        let expected = if layer_end { 0 } else { streaming.expected_rest() };
        let mut pending = std::mem::take(&mut streaming.window_bytes);
        for (index, bytes, copy) in window {
            let chunk = &mut chunks[index as usize];
            let size = bytes.len() as u64;
            let mut taken = false;
            loop {
                if self.streaming.as_ref().is_some_and(|s| s.open.is_none()) {
                    self.open_blob(pending, expected, size, layer_end)?;
                }
                let streaming = self.streaming.as_mut().expect("checked above");
                let open = match &mut streaming.open {
                    Some(open) => open,
                    None => break,
                };
                if open.written + size > open.data_size {
                    self.close_open_blob()?;
                    continue;
                }
                let own_copy = copy.map(|spool_offset| OwnCopy {
                    spool_offset,
                    flags: chunk.flags,
                    stored_size: chunk.stored_size,
                });
                open.append(chunk, &bytes, own_copy)?;
                taken = true;
                break;
            }
            if !taken {
                let offset = match copy {
                    // Its copy is what the spool holds of it now, to be sealed.
                    Some(offset) => {
                        self.unsealable -= size;
                        offset
                    }
                    None => {
                        writer
                            .write_all(&bytes)
                            .map_err(BuildError::io("write", "chunk spool"))?;
                        *spool_len += size;
                        *spool_len - size
                    }
                };
                chunk.place = ChunkPlace::Spool { offset };
            }
            pending -= size;
        }
        if let Some(open) = self.streaming.as_mut().and_then(|s| s.open.as_mut()) {
            open.announce()?;
        }
        Ok(())
    }

    /// Opens the layer's next blob, if half of what is left (all of it for a
    /// one-blob layer) is worth one, with `pending` stored bytes of the window
    /// still to place and `expected` after it; at least `size` long.
    fn open_blob(&mut self, pending: u64, expected: u64, size: u64, layer_end: bool) -> Result<()> {
        let Some(streaming) = self.streaming.as_ref() else {
            return Ok(());
        };
        let (share, of) = if streaming.plan.one_blob {
            ONE_BLOB_SHARE
        } else {
            (1, 2)
        };
        let wanted = ((pending + expected) / of * share).min(MAX_BLOB);
        if layer_end || wanted < MIN_BLOB {
            return Ok(());
        }
        // Its index is taken now: a piece of a prefetch region may be sealed
        // while it grows.
        let blob = self.reserve_blob_index();
        let streaming = self.streaming.as_mut().expect("checked above");
        tracing::debug!(
            blob,
            size = wanted.max(size),
            position = streaming.position,
            stored = streaming.stored,
            pending,
            expected,
            "streamed blob opens"
        );
        streaming.open = Some(OpenBlob::open(
            wanted.max(size),
            blob as u32,
            self.blobs_dir,
            streaming.plan.opened.as_ref(),
        )?);
        Ok(())
    }
}

/// A blob being written, its length fixed.
#[derive(Debug)]
struct OpenBlob {
    /// Its index among the dictionary's and the sealed blobs.
    index: u32,
    /// The length its tar header states.
    data_size: u64,
    /// Bytes of chunks written so far.
    written: u64,
    uncompressed: u64,
    out: Option<BufWriter<tempfile::NamedTempFile>>,
    hasher: sha2::Sha256,
    growing: Arc<GrowingBlob>,
    /// Whether it was handed out while growing.
    streamed: bool,
}

impl OpenBlob {
    fn open(
        data_size: u64,
        index: u32,
        blobs_dir: &std::path::Path,
        opened: Option<&Sender<Arc<GrowingBlob>>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(blobs_dir).map_err(BuildError::io("create", blobs_dir))?;
        let temp = tempfile::NamedTempFile::new_in(blobs_dir)
            .map_err(BuildError::io("create temporary blob in", blobs_dir))?;
        let reading = temp
            .as_file()
            .try_clone()
            .map_err(BuildError::io("open", temp.path()))?;
        let growing = GrowingBlob::new(reading, layer_tar::layer_len(data_size));
        let mut out = BufWriter::with_capacity(1 << 20, temp);
        let mut hasher = sha2::Sha256::new();
        let header = layer_tar::header(layer_tar::BLOB_ENTRY, data_size);
        hasher.update(header);
        out.write_all(&header).map_err(BuildError::io("write", blobs_dir))?;
        let streamed = opened.is_some_and(|to| to.send(Arc::clone(&growing)).is_ok());
        Ok(OpenBlob {
            index,
            data_size,
            written: 0,
            uncompressed: 0,
            out: Some(out),
            hasher,
            growing,
            streamed,
        })
    }

    fn out(&mut self) -> Result<&mut BufWriter<tempfile::NamedTempFile>> {
        self.out
            .as_mut()
            .ok_or_else(|| BuildError::Invalid("blob written after it was closed".into()))
    }

    /// Writes a window's chunk (its stored bytes) into the blob and points the
    /// chunk at it (keeping `own_copy`, where the spool has one).
    fn append(&mut self, chunk: &mut SpooledChunk, stored: &[u8], own_copy: Option<OwnCopy>) -> Result<()> {
        if chunk.place != ChunkPlace::Window {
            return Err(BuildError::Invalid("a chunk taken into a blob twice".into()));
        }
        self.hasher.update(stored);
        self.out()?
            .write_all(stored)
            .map_err(BuildError::io("write", "streamed blob"))?;
        chunk.place = ChunkPlace::Dict {
            blob: self.index,
            offset: layer_tar::DATA_OFFSET + self.written,
            own_copy,
        };
        self.written += u64::from(chunk.stored_size);
        self.uncompressed += u64::from(chunk.uncompressed_size);
        Ok(())
    }

    /// Makes what is written readable by the blob's reader.
    fn announce(&mut self) -> Result<()> {
        self.out()?.flush().map_err(BuildError::io("write", "streamed blob"))?;
        self.growing.grew_to(layer_tar::DATA_OFFSET + self.written);
        Ok(())
    }

    /// Fills the rest with zeros, ends the tar, and names the file by its digest.
    fn close(mut self, blobs_dir: &std::path::Path) -> Result<SealedBlob> {
        let padding = self.data_size - self.written;
        if padding > 0 {
            tracing::debug!(blob = self.index, padding, "streamed blob ends in zeros");
        }
        let zeros = vec![0u8; 64 << 10];
        let mut left = padding + layer_tar::trailer_len(self.data_size);
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            self.hasher.update(&zeros[..n]);
            self.out()?
                .write_all(&zeros[..n])
                .map_err(BuildError::io("write", "streamed blob"))?;
            left -= n as u64;
        }
        let out = self.out.take().expect("open until closed");
        let temp = out
            .into_inner()
            .map_err(|e| BuildError::io("write", blobs_dir)(e.into_error()))?;
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let path = blobs_dir.join(hex::encode(digest));
        temp.persist(&path)
            .map_err(|e| BuildError::io("rename blob to", &path)(e.error))?;
        self.growing.grew_to(self.growing.len());
        self.growing.end(BlobEnd::Done {
            digest,
            path: path.clone(),
        });
        Ok(SealedBlob {
            blob: crate::dict::DictBlob {
                digest,
                compressed_size: layer_tar::layer_len(self.data_size),
                uncompressed_size: self.uncompressed,
                prefetch_end: 0,
            },
            path,
            streamed: self.streamed,
        })
    }
}

impl Drop for OpenBlob {
    fn drop(&mut self) {
        // A blob not closed is never complete (ending twice keeps the first end).
        self.growing.end(BlobEnd::Abandoned(
            "the build stopped before the blob was complete".into(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming(layer_plain: u64, layer_size: u64, position: u64, stored: u64) -> Streaming {
        let (sealed, _) = std::sync::mpsc::channel();
        let mut streaming = Streaming::new(StreamPlan {
            layer_plain,
            layer_size,
            sealed,
            opened: None,
            one_blob: false,
        });
        streaming.position = position;
        streaming.stored = stored;
        streaming
    }

    #[test]
    fn what_a_layer_is_expected_to_store_is_capped_by_its_own_size_whatever_its_trailer_claims() {
        const MIB: u64 = 1 << 20;
        // 100 MiB uncompressed, 40 MiB as stored; 10 MiB read, 8 MiB stored: the
        // rest is expected at the layer's ratio (1.1 x 0.4 per byte), not 0.8.
        let honest = streaming(100 * MIB, 40 * MIB, 10 * MIB, 8 * MIB).expected_rest();
        assert_eq!(honest, 90 * MIB * 44 / 100);
        // Where the start compressed better than the whole layer, the start decides.
        assert_eq!(
            streaming(100 * MIB, 90 * MIB, 10 * MIB, 2 * MIB).expected_rest(),
            18 * MIB
        );
        // A trailer claiming an enormous length: no more than 1.1 x the layer's size.
        let lying = streaming(u64::MAX / 2, 40 * MIB, 10 * MIB, 8 * MIB).expected_rest();
        assert!(lying <= 44 * MIB, "{lying}");
        // Past the stated length (a trailer too small), nothing more is expected.
        assert_eq!(streaming(10 * MIB, 40 * MIB, 20 * MIB, 8 * MIB).expected_rest(), 0);
    }
}
