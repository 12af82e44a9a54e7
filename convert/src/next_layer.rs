//! The next layer opened while the current one ends. Learning how long a layer
//! is uncompressed (its gzip trailer, [`streamed::plain_size`]) and opening its
//! stream each take a round trip, which between layers left the pull link idle:
//! about 0.1 s a layer at 20 ms RTT, a third of a second of the synthetic
//! registry image's four. `skopeo copy` pulls its layers side by side; a
//! conversion reads them in order, the next one opened a few megabytes early.

use crate::error::{ConvertError, Result};
use crate::source::Source;
use crate::streamed::{self, Streams};
use petrel_registry::oci::Descriptor;
use std::io::Read;
use std::sync::mpsc::{Receiver, Sender};

/// Bytes before a layer's end at which the next one is opened: about 0.7 s at
/// 100 Mbit/s, two round trips on a link of 100 ms and 500 Mbit/s. What the
/// next layer's registry sends before it is read waits in the connection's
/// buffers and shares the link with the current layer's last bytes; the
/// current one ends a little later, the next one sooner.
pub const LEAD: u64 = 8 << 20;

/// A layer's stream, and its uncompressed length where it streams into blobs.
pub struct OpenedLayer {
    pub plain: Option<u64>,
    pub reader: Result<Box<dyn Read + Send>>,
}

/// Opens `layer` of `source`: its length uncompressed when `streams` says it
/// streams (and the source tells it), and its stream.
pub fn open(source: &Source, layer: &Descriptor, streams: Option<Streams>) -> OpenedLayer {
    let plain = streams.and_then(|_| streamed::plain_size(source, layer));
    OpenedLayer {
        plain,
        reader: source.layer(layer.digest().as_ref()),
    }
}

/// Opens `layer` once `near_end` says the layer before it nears its end; if
/// that layer stopped first (its reader dropped without saying so: the
/// conversion failed), opens nothing.
pub fn open_when_near_end(
    source: &Source,
    layer: &Descriptor,
    streams: Option<Streams>,
    near_end: Receiver<()>,
) -> Option<OpenedLayer> {
    near_end.recv().ok()?;
    Some(open(source, layer, streams))
}

/// A layer's reader that says once, on `near_end`, when fewer than [`LEAD`] of
/// its `size` bytes are left (at once for a layer shorter than that).
pub struct NearEnd<R> {
    inner: R,
    left: u64,
    near_end: Option<Sender<()>>,
}

impl<R> NearEnd<R> {
    pub fn new(inner: R, size: u64, near_end: Sender<()>) -> Self {
        let mut reader = NearEnd {
            inner,
            left: size,
            near_end: Some(near_end),
        };
        reader.tell_if_near();
        reader
    }

    fn tell_if_near(&mut self) {
        if self.left <= LEAD {
            if let Some(near_end) = self.near_end.take() {
                let _ = near_end.send(());
            }
        }
    }
}

impl<R: Read> Read for NearEnd<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.saturating_sub(n as u64);
        self.tell_if_near();
        Ok(n)
    }
}

/// The error of a layer that was to be opened ahead and was not.
pub fn not_opened(digest: &str) -> ConvertError {
    ConvertError::Invalid(format!("layer {digest} was not opened"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_once_when_the_last_megabytes_are_read_and_at_once_for_a_short_layer() {
        let size = LEAD + 1000;
        let (tx, rx) = std::sync::mpsc::channel();
        let data = vec![7u8; size as usize];
        let mut reader = NearEnd::new(&data[..], size, tx);
        let mut buf = vec![0u8; 600];
        reader.read_exact(&mut buf).unwrap();
        assert!(rx.try_recv().is_err(), "more than LEAD left: not yet");
        reader.read_exact(&mut buf).unwrap();
        assert!(rx.try_recv().is_ok(), "LEAD left: now");
        std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
        assert!(rx.try_recv().is_err(), "once");

        let (tx, rx) = std::sync::mpsc::channel();
        let _short = NearEnd::new(&data[..10], 10, tx);
        assert!(rx.try_recv().is_ok(), "a short layer: at once");
    }

    #[test]
    fn a_layer_that_stops_before_its_end_opens_nothing_after_it() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(tx);
        let dir = tempfile::tempdir().unwrap();
        let source = Source::Layout {
            layout: petrel_registry::layout::OciLayout::create(dir.path()).unwrap(),
            tag: None,
            _temp: None,
        };
        let digest = format!("sha256:{}", "0".repeat(64));
        let layer = petrel_registry::oci::descriptor(petrel_registry::oci::OCI_LAYER_GZIP, &digest, 1).unwrap();
        assert!(open_when_near_end(&source, &layer, None, rx).is_none());
    }
}
