//! Blobs uploaded while the build writes them: a big layer's new chunks go into
//! blobs as they come ([`petrel_builder::pipeline::StreamPlan`]), and each blob
//! goes up in a chunked upload from the moment it opens, so that pushing keeps
//! pace with pulling instead of waiting for whole blobs to fill.

use crate::error::{ConvertError, Result};
use crate::progress;
use crate::source::Source;
use crate::target::Target;
use petrel_builder::growing_blob::{BlobEnd, GrowingBlob};
use petrel_registry::oci::{Descriptor, DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR};
use std::sync::Arc;
use std::time::Instant;

/// Layers smaller than this (as stored) are sealed whole at their end (in blobs
/// of at least 16 MiB), their chunks depth first across the whole layer: a
/// directory's files stay together even where the tar scatters them, and one
/// request reads them ahead. Streamed from 8 MiB, a 12 MiB layer became four
/// blobs (with blobs of at least 1 MiB) or two (at least 4 MiB): the directory
/// readahead of `tests/registry.rs` then took four requests, and three nodes
/// warming the image through a cold pull-through mirror cost the origin 1.8 to 2
/// copies instead of one. Streaming such layers saved the synthetic registry
/// image 6 % over 100 Mbit/s (1.03x `skopeo copy` against 1.09x); a sealed
/// layer under 32 MiB leaves at most about a second of pushing at that speed,
/// and only the conversion's tail leaves it after the pull (`STREAM_TAIL_FROM`).
pub const STREAM_FROM: u64 = 32 << 20;

/// A smaller layer streams too when it is the conversion's tail (the layers
/// after it store less than [`TAIL_AFTER`] together), into one blob for all of
/// it that the layer's first megabyte foretells ([`petrel_builder::pipeline::TAIL_SHARE`]): sealed, its whole blob
/// went up after the pull ended. The synthetic registry image ends with a 15 MB
/// layer (a model file) and a config file: sealed, that layer's blob left 1.1 s
/// of pushing at 100 Mbit/s after the last byte came in, and the conversion took
/// 1.11 times `skopeo copy`'s time; streamed, 1.05 (what its startup fetches, in
/// bytes and requests, did not change). A three-layer Python service whose pip
/// layer (numpy and Flask, 19 MB) comes last but for its code: 1.09, then 1.03.
pub const STREAM_TAIL_FROM: u64 = 4 << 20;
/// What the layers after a tail layer may store together.
pub const TAIL_AFTER: u64 = 1 << 20;

/// For each of `layers` (their stored sizes), whether it streams, and whether as
/// the conversion's tail. A big layer's blobs halve as it goes whatever follows
/// it: its last blobs are small, and so is what an estimate too high pads.
pub fn stream_plans(layers: &[u64]) -> Vec<Option<Tail>> {
    let mut plans = vec![None; layers.len()];
    let mut after = 0u64;
    for (plan, &size) in plans.iter_mut().zip(layers).rev() {
        *plan = if size >= STREAM_FROM {
            Some(Tail(false))
        } else if after < TAIL_AFTER && size >= STREAM_TAIL_FROM {
            Some(Tail(true))
        } else {
            None
        };
        // Sizes a stranger's manifest states: they do not overflow the sum.
        after = after.saturating_add(size);
    }
    plans
}

/// Whether a streaming layer is the conversion's tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail(pub bool);

/// How long `layer` is uncompressed, where that is cheap to learn: its size when
/// stored as a plain tar, else the length a gzip layer's trailer states (ISIZE,
/// modulo 4 GiB, of its last member only), fetched with one Range request. It
/// decides only how long blobs are, never what is read, so a wrong or missing
/// answer costs some push overlap (or zeros at a blob's end), nothing else.
pub fn plain_size(source: &Source, layer: &Descriptor) -> Option<u64> {
    let (digest, size) = (layer.digest().as_ref(), layer.size());
    let media_type = layer.media_type().to_string();
    if media_type == OCI_LAYER_TAR {
        return Some(size);
    }
    if media_type != OCI_LAYER_GZIP && media_type != DOCKER_LAYER_GZIP {
        return None;
    }
    let tail = match source.blob_tail(digest, size, 4) {
        Ok(tail) => tail,
        Err(e) => {
            tracing::debug!("layer {digest}: no gzip trailer ({e:#}); its blobs are sealed whole");
            return None;
        }
    };
    let isize = u64::from(u32::from_le_bytes(tail.try_into().ok()?));
    // Less than half the gzip length means the stream has several members
    // (eStargz) or its length wrapped past 4 GiB: unknown. A length too small
    // only makes blobs smaller; one too big (a hostile trailer) is capped by the
    // layer's own size (`StreamPlan::layer_size`).
    (isize >= size / 2 && size < 1 << 32).then_some(isize)
}

/// A blob pushed while the build went on.
pub struct PushedBlob {
    pub digest: String,
    pub size: u64,
    /// False: the target had it already.
    pub uploaded: bool,
}

impl PushedBlob {
    /// A blob whose push started at `started` is up: its bar ends, the push is
    /// logged, and its file (which the build no longer needs) is removed.
    pub fn done(
        digest: String,
        size: u64,
        uploaded: bool,
        started: Instant,
        path: &std::path::Path,
        bar: Option<progress::PushBar>,
    ) -> Self {
        if let Some(bar) = bar {
            bar.finish();
        }
        tracing::info!(
            "blob {digest} ({size} bytes) {} in {:.1}s",
            if uploaded { "pushed" } else { "already there" },
            started.elapsed().as_secs_f64()
        );
        let _ = std::fs::remove_file(path);
        PushedBlob { digest, size, uploaded }
    }
}

/// Uploads `blob` while the build writes it; if that fails, uploads the complete
/// file the usual way. Removes the file once it is up.
pub fn upload_growing(
    target: &Target,
    blob: &Arc<GrowingBlob>,
    mount_from: Option<&str>,
    bars: Option<&indicatif::MultiProgress>,
) -> Result<PushedBlob> {
    let size = blob.len();
    let bar = bars.map(|bars| progress::PushBar::new("blob", size, bars));
    let started = Instant::now();
    let streamed = match target {
        Target::Registry { client, image } => {
            let ended = Arc::clone(blob);
            client
                .push_blob_stream(
                    &image.repository,
                    blob.reader(),
                    size,
                    move || match ended.wait_end() {
                        BlobEnd::Done { digest, .. } => Some(format!("sha256:{}", hex::encode(digest))),
                        BlobEnd::Abandoned(_) => None,
                    },
                    bar.as_ref().map(progress::PushBar::on_bytes),
                )
                .map_err(|e| e.to_string())
        }
        Target::Layout { .. } => Err("an OCI layout takes whole blobs".to_string()),
    };
    let (digest, path) = match blob.wait_end() {
        BlobEnd::Done { digest, path } => (format!("sha256:{}", hex::encode(digest)), path),
        BlobEnd::Abandoned(why) => return Err(ConvertError::Invalid(format!("a blob was not completed: {why}"))),
    };
    let uploaded = match streamed {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!("blob {digest}: not uploaded while it was written ({why}); uploading the file");
            target.put_blob_file_reporting(&digest, &path, mount_from, None)?
        }
    };
    Ok(PushedBlob::done(digest, size, uploaded, started, &path, bar))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_layers_stream_and_so_does_a_smaller_last_one() {
        const MIB: u64 = 1 << 20;
        // A base, a mid-sized layer, a 15 MiB model, a config file.
        assert_eq!(
            stream_plans(&[200 * MIB, 15 * MIB, 15 * MIB, 124]),
            [Some(Tail(false)), None, Some(Tail(true)), None],
            "big: halving blobs; more comes after it: sealed whole; the tail; too small to stream"
        );
        // A layer under 4 MiB is sealed even last; so is one with a megabyte after it.
        assert_eq!(stream_plans(&[3 * MIB]), [None]);
        assert_eq!(stream_plans(&[8 * MIB, MIB]), [None, None]);
        assert_eq!(stream_plans(&[8 * MIB, MIB - 1]), [Some(Tail(true)), None]);
        assert_eq!(stream_plans(&[40 * MIB]), [Some(Tail(false))]);
        assert_eq!(stream_plans(&[]), []);
        // Sizes a stranger's manifest states do not overflow the sum.
        assert_eq!(
            stream_plans(&[8 * MIB, u64::MAX, u64::MAX]),
            [None, Some(Tail(false)), Some(Tail(false))]
        );
    }
}
