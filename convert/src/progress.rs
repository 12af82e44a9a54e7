//! Progress bars of `petrel convert` on a terminal: per layer, bytes in with the
//! build's chunk counters (chunks, deduplicated, bytes stored); per blob, bytes out.

use petrel_builder::pipeline::BuildProgress;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Bytes read between updates of a bar's counters.
const MESSAGE_EVERY: u64 = 1 << 20;

/// A layer streaming in.
pub struct LayerBar {
    bar: indicatif::ProgressBar,
    build: Arc<BuildProgress>,
    label: String,
    since_message: u64,
}

impl LayerBar {
    pub fn new(
        index: usize,
        count: usize,
        size: u64,
        build: Arc<BuildProgress>,
        bars: &indicatif::MultiProgress,
    ) -> Self {
        let bar = bars.add(indicatif::ProgressBar::new(size));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "layer {prefix} [{bar:24}] {bytes}/{total_bytes} in, {bytes_per_sec}, eta {eta} | {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{count}", index + 1));
        let mut layer = LayerBar {
            bar,
            build,
            label: String::new(),
            since_message: 0,
        };
        layer.update_message();
        layer
    }

    /// `n` more bytes read.
    pub fn read(&mut self, n: u64) {
        self.bar.inc(n);
        self.since_message += n;
        if self.since_message >= MESSAGE_EVERY {
            self.since_message = 0;
            self.update_message();
        }
    }

    fn update_message(&mut self) {
        let (chunks, deduplicated, stored) = (
            self.build.chunks.load(Relaxed),
            self.build.deduplicated.load(Relaxed),
            self.build.stored_bytes.load(Relaxed),
        );
        self.label = format!(
            "{chunks} chunks, {deduplicated} deduplicated, {} out",
            indicatif::HumanBytes(stored)
        );
        self.bar.set_message(self.label.clone());
    }

    pub fn finish(mut self) {
        self.update_message();
        self.bar.finish_and_clear();
    }
}

/// A blob being pushed.
pub struct PushBar {
    bar: indicatif::ProgressBar,
}

impl PushBar {
    pub fn new(what: &str, size: u64, bars: &indicatif::MultiProgress) -> Self {
        let bar = bars.add(indicatif::ProgressBar::new(size));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "push {prefix} [{bar:24}] {bytes}/{total_bytes} out, {bytes_per_sec}, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        PushBar { bar }
    }

    /// The callback that advances this bar.
    pub fn on_bytes(&self) -> petrel_registry::client::OnBytes {
        let bar = self.bar.clone();
        Arc::new(move |n| bar.inc(n))
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
