//! Reading a conversion's source layers into the builder while their blobs go up:
//! each layer streamed through the builder and checked against its digest, the
//! next opened as the one before ends, layers a record stands for applied from it,
//! and the blobs sealed mid-build handed to the pushers.

use crate::error::{bail, Context};
use crate::streamed::PushedBlob;
use crate::{next_layer, progress, streamed, ConvertOptions, Hashing, Result, Source, Target};
use petrel_builder::ImageBuilder;
use petrel_registry::oci::Manifest;
use sha2::Digest;
use std::io::Read;
use std::time::Instant;

/// A layer whose blobs cannot stream (its uncompressed length unknown, or under
/// [`streamed::STREAM_ONE_BLOB_FROM`]) is cut into about this many blobs, within
/// [`MIN_SEALED_BLOB`] and [`MAX_SEALED_BLOB`] bytes each. Smaller sealed blobs
/// would start pushing sooner, but a reader's request cannot span two blobs: 8
/// MiB blobs made the Python service take 71 requests instead of 46 to prefetch
/// its profile at mount. And since petrel pushes about what it reads, a push link
/// waiting for any blob to fill falls behind for good (cutting only a big layer's
/// ends small gained nothing); streamed blobs, uploaded while written, do not wait.
const SEALED_BLOBS_PER_LAYER: u64 = 4;
const MIN_SEALED_BLOB: u64 = 16 << 20;
const MAX_SEALED_BLOB: u64 = 512 << 20;
/// Sealed blobs pushed at once: one upload's round trips (exists?, start,
/// finish) overlap another's data.
pub(crate) const PUSHERS: usize = 3;

pub(crate) fn push_sealed(
    target: &Target,
    sealed: &petrel_builder::pipeline::SealedBlob,
    mount_from: Option<&str>,
    bars: Option<&indicatif::MultiProgress>,
) -> Result<PushedBlob> {
    let digest = format!("sha256:{}", hex::encode(sealed.blob.digest));
    let size = sealed.blob.compressed_size;
    let bar = bars.map(|bars| progress::PushBar::new("blob", size, bars));
    let started = Instant::now();
    let uploaded = target.put_blob_file_reporting(
        &digest,
        &sealed.path,
        mount_from,
        bar.as_ref().map(progress::PushBar::on_bytes),
    )?;
    Ok(PushedBlob::done(digest, size, uploaded, started, &sealed.path, bar))
}

/// The next blob to push from a queue that several pushers share (None: the
/// build is done); the lock is held only while taking it.
pub(crate) fn next_sealed<T>(queue: &std::sync::Mutex<std::sync::mpsc::Receiver<T>>) -> Option<T> {
    let next = queue.lock().ok()?.recv().ok();
    next
}

/// Streams every layer of `manifest` from `source` through `builder`, checking
/// each against its digest; the new chunks of every layer are sealed into blobs
/// handed to `sealed`, but for the last layer's rest and, in a build with a
/// prefetch profile, the chunks of the files it names, which go into the blob
/// `finish` writes (its prefetch region first). Returns the bytes read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_layers(
    builder: &mut ImageBuilder,
    source: &Source,
    manifest: &Manifest,
    replay: &[Option<petrel_format::layer_record::LayerRecord>],
    options: &ConvertOptions,
    bars: Option<&indicatif::MultiProgress>,
    sealed: &std::sync::mpsc::Sender<petrel_builder::Result<petrel_builder::pipeline::SealedBlob>>,
    opened: Option<&std::sync::mpsc::Sender<std::sync::Arc<petrel_builder::growing_blob::GrowingBlob>>>,
) -> Result<u64> {
    let mut source_bytes = 0;
    let count = manifest.layers().len();
    let sizes: Vec<u64> = manifest.layers().iter().map(|layer| layer.size()).collect();
    let plans = streamed::stream_plans(&sizes);
    std::thread::scope(|scope| -> Result<u64> {
        // The next layer read, opened once the one before nears its end; the
        // first at once, while the layers before it are applied from their records.
        let mut ahead = (0..count).find(|&j| replay[j].is_none()).map(|first| {
            let (layer, streams) = (&manifest.layers()[first], plans[first]);
            (
                first,
                scope.spawn(move || Some(next_layer::open(source, layer, streams))),
            )
        });
        for (i, layer) in manifest.layers().iter().enumerate() {
            let (digest, size) = (layer.digest().as_ref(), layer.size());
            let layer_started = Instant::now();
            if let Some(record) = &replay[i] {
                // Nothing new to store, so nothing to seal or push.
                builder
                    .add_recorded_layer(record)
                    .with_context(|| format!("applying the record of layer {} ({digest})", i + 1))?;
                tracing::info!(
                    "layer {}/{count} {digest}: applied from its record ({} entries), not fetched",
                    i + 1,
                    record.entries.len()
                );
                continue;
            }
            let layer_stream = match ahead.take() {
                Some((j, opening)) if j == i => match std::thread::ScopedJoinHandle::join(opening) {
                    Ok(Some(layer_stream)) => layer_stream,
                    _ => return Err(next_layer::not_opened(digest)),
                },
                _ => next_layer::open(source, layer, plans[i]),
            };
            let (near_end, told) = std::sync::mpsc::channel();
            if let Some(j) = (i + 1..count).find(|&j| replay[j].is_none()) {
                let (next, streams) = (&manifest.layers()[j], plans[j]);
                ahead = Some((
                    j,
                    scope.spawn(move || next_layer::open_when_near_end(source, next, streams, told)),
                ));
            }
            // A layer's new chunks go into blobs as they come, each uploaded while
            // it grows; without its uncompressed length, they are sealed into a few
            // blobs. Either way where blobs end depends on this layer (and the chunks
            // earlier layers already hold) only, so an unchanged layer of a new
            // release gives the same blobs, which the registry then has.
            let plan = layer_stream.plain.zip(plans[i]);
            let streaming = match plan {
                Some((layer_plain, streams)) => {
                    builder.stream_blobs(petrel_builder::pipeline::StreamPlan {
                        layer_plain,
                        layer_size: size,
                        sealed: sealed.clone(),
                        opened: opened.cloned(),
                        one_blob: streams == streamed::Streams::OneBlob,
                    })?;
                    true
                }
                None => false,
            };
            if !streaming {
                builder.auto_seal(
                    (size / SEALED_BLOBS_PER_LAYER).clamp(MIN_SEALED_BLOB, MAX_SEALED_BLOB),
                    sealed.clone(),
                )?;
            }
            let progress = bars.map(|bars| progress::LayerBar::new(i, count, size, builder.progress(), bars));
            // Never more than the manifest says (and one byte to tell): a source that
            // streams on costs no more than the layer it names.
            let mut stream = Hashing {
                inner: next_layer::NearEnd::new(layer_stream.reader?.take(size.saturating_add(1)), size, near_end),
                hasher: sha2::Sha256::new(),
                bytes: 0,
                progress,
            };
            builder
                .add_layer(&mut stream)
                .with_context(|| format!("converting layer {} ({digest})", i + 1))?;
            std::io::copy(&mut stream, &mut std::io::sink())
                .with_context(|| format!("reading the rest of layer {digest}"))?;
            let actual = format!("sha256:{}", hex::encode(stream.hasher.finalize_reset()));
            if actual != digest {
                bail!(
                    "layer {} ({digest}) of {}: content hashes to {actual}; refusing to convert",
                    i + 1,
                    source.describe()
                );
            }
            // (Longer than it says, it hashes to something else, above.)
            if stream.bytes != size {
                bail!(
                    "layer {} ({digest}) of {}: the manifest says {size} bytes, the layer has {}; refusing to convert",
                    i + 1,
                    source.describe(),
                    stream.bytes
                );
            }
            if let Some(p) = stream.progress.take() {
                p.finish();
            }
            if !options.progress {
                tracing::info!(
                    "layer {}/{count} {digest} {} bytes in {:.1}s",
                    i + 1,
                    stream.bytes,
                    layer_started.elapsed().as_secs_f64()
                );
            }
            source_bytes += stream.bytes;
            // The last layer's rest goes into the blob `finish` writes, with the small
            // files it packs then.
            if i + 1 < count {
                if let Some(blob) = builder
                    .seal()
                    .with_context(|| format!("sealing the chunks of layer {}", i + 1))?
                {
                    let _ = sealed.send(Ok(blob));
                }
            }
        }
        Ok(source_bytes)
    })
}
