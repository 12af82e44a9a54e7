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

/// Layers from this size (as stored) stream into blobs that halve as the layer
/// goes (each half of what the layer is expected to store from then on), whatever
/// follows them: their last blobs are small, and so is what an estimate too high
/// pads.
pub const STREAM_FROM: u64 = 32 << 20;

/// Smaller layers from this size stream into one blob for all of it, as the
/// layer's first megabyte foretells it
/// ([`petrel_builder::pipeline::ONE_BLOB_SHARE`]); what the estimate misses is
/// sealed at the layer's end (the last layer's, into the blob the build ends
/// with). Sealed whole at their end instead, such layers' blobs went up after
/// their pull, one after the other: the synthetic registry image (four layers: a
/// 61 MiB base, 14 MiB of packages, a 15 MB model file, a config file) left the
/// push link idle while its second layer came in and converted in 1.03 to 1.05
/// times `skopeo copy`'s time over 100 Mbit/s, streamed in 0.99 to 1.01 (with
/// the next layer opened early, `next_layer`); the model alone streamed (the
/// conversion's tail, then the only one of them that did) had taken it from 1.11
/// to 1.05. One blob keeps a directory's readahead one request; halving blobs cut a
/// 12 MiB layer into four, and three nodes warming the image through a cold
/// pull-through mirror then cost the origin 1.8 to 2 copies instead of one.
pub const STREAM_ONE_BLOB_FROM: u64 = 4 << 20;

/// For each of `layers` (their stored sizes), whether and how it streams.
pub fn stream_plans(layers: &[u64]) -> Vec<Option<Streams>> {
    layers
        .iter()
        .map(|&size| {
            if size >= STREAM_FROM {
                Some(Streams::Halving)
            } else if size >= STREAM_ONE_BLOB_FROM {
                Some(Streams::OneBlob)
            } else {
                None
            }
        })
        .collect()
}

/// How a streaming layer's chunks go into blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streams {
    /// Blobs that halve as the layer goes.
    Halving,
    /// One blob for all of it.
    OneBlob,
}

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
    fn big_layers_halve_smaller_ones_stream_into_one_blob_and_small_ones_are_sealed() {
        const MIB: u64 = 1 << 20;
        use Streams::{Halving, OneBlob};
        // A base, a mid-sized layer, a 15 MiB model, a config file.
        assert_eq!(
            stream_plans(&[200 * MIB, 15 * MIB, 15 * MIB, 124]),
            [Some(Halving), Some(OneBlob), Some(OneBlob), None]
        );
        assert_eq!(stream_plans(&[4 * MIB - 1, 4 * MIB]), [None, Some(OneBlob)]);
        assert_eq!(stream_plans(&[32 * MIB - 1, 32 * MIB]), [Some(OneBlob), Some(Halving)]);
        assert_eq!(stream_plans(&[u64::MAX]), [Some(Halving)]);
        assert_eq!(stream_plans(&[]), []);
    }
}
