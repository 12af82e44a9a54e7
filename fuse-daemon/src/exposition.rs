//! The Prometheus exposition (OpenMetrics text, encoded by `prometheus-client`) of
//! mount daemons' counters: one family per metric, one sample per image. A daemon
//! serves its own (`petrel stats --prometheus`, the control socket's `metrics`); the
//! snapshotter encodes every daemon's at once from their `stats` answers, with its
//! own gauge of lazy mounts.

use crate::stats::StatsSnapshot;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The HTTP content type of `encode`'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A counter: name (without `_total`, which the encoding adds), help, value.
type CounterDef = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);

const COUNTERS: &[CounterDef] = &[
    ("petrel_backend_requests", "Range requests sent to the backend", |s| {
        s.backend_requests
    }),
    ("petrel_backend_bytes", "Bytes received from the backend", |s| {
        s.backend_bytes
    }),
    ("petrel_backend_errors", "Failed backend requests", |s| s.backend_errors),
    ("petrel_chunks_fetched", "Chunks fetched and verified", |s| {
        s.chunks_fetched
    }),
    (
        "petrel_chunks_failed_verification",
        "Chunks whose digest did not match",
        |s| s.chunks_failed_verification,
    ),
    ("petrel_cache_hits", "Chunk reads served from the local cache", |s| {
        s.cache_hits
    }),
    ("petrel_cache_misses", "Chunk reads that needed a fetch", |s| {
        s.cache_misses
    }),
    ("petrel_reads", "FUSE read requests", |s| s.reads),
    ("petrel_read_errors", "FUSE reads answered with an error", |s| {
        s.read_errors
    }),
    ("petrel_bytes_served", "Bytes returned to readers", |s| s.bytes_served),
    (
        "petrel_reads_waited_on_inflight",
        "Reads that waited for an in-flight fetch",
        |s| s.waited_on_inflight,
    ),
    (
        "petrel_prefetch_requests",
        "Range requests sent by the background prefetcher",
        |s| s.prefetch_requests,
    ),
    (
        "petrel_prefetch_bytes",
        "Bytes the background prefetcher received",
        |s| s.prefetch_bytes,
    ),
    (
        "petrel_readahead_requests",
        "Range requests of the on-demand readahead (directories, ELF files, sequential reads)",
        |s| s.readahead_requests,
    ),
    (
        "petrel_readahead_bytes",
        "Bytes the on-demand readahead received",
        |s| s.readahead_bytes,
    ),
    (
        "petrel_prefetch_hits",
        "Chunk reads served by data the prefetcher or the readahead fetched",
        |s| s.prefetch_hits,
    ),
    (
        "petrel_cache_corrupt_dropped",
        "Cached chunks or files that failed their digest on first use and were dropped",
        |s| s.cache_corrupt_dropped,
    ),
    (
        "petrel_cache_put_failures",
        "Batches of fetched chunks the cache could not store (full or failing disk); their reads were served",
        |s| s.cache_put_failures,
    ),
    (
        "petrel_passthrough_opens",
        "Opens served by a backing file (FUSE passthrough), whose reads bypass these counters",
        |s| s.passthrough_opens,
    ),
    (
        "petrel_daemon_opens",
        "Opens of files the daemon was asked about (none once the kernel opens files alone)",
        |s| s.daemon_opens,
    ),
];

/// Gauges, as counters are.
const GAUGES: &[CounterDef] = &[(
    "petrel_cache_uncommitted_bytes",
    "Bytes the daemon stored in the node cache that are not yet durable (a crash now loses them; they are fetched again)",
    |s| s.cache_uncommitted_bytes,
)];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabel {
    /// Escaped by the encoder (quotes, backslashes, newlines).
    image: String,
}

/// One counter's value per image.
#[derive(Debug)]
struct PerImageCounter(Vec<(ImageLabel, u64)>);

impl EncodeMetric for PerImageCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (label, value) in &self.0 {
            encoder
                .encode_family(label)?
                .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(value, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// One gauge's value per image.
#[derive(Debug)]
struct PerImageGauge(Vec<(ImageLabel, u64)>);

impl EncodeMetric for PerImageGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (label, value) in &self.0 {
            encoder.encode_family(label)?.encode_gauge(&(*value as i64))?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// One image's read latency histogram: sum (seconds), count, and per-bucket counts by
/// upper bound (seconds; the last is infinity).
#[derive(Debug)]
struct Latency {
    label: ImageLabel,
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// The read latency histogram per image.
#[derive(Debug)]
struct PerImageHistogram(Vec<Latency>);

impl EncodeMetric for PerImageHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for latency in &self.0 {
            encoder
                .encode_family(&latency.label)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    latency.sum,
                    latency.count,
                    &latency.buckets,
                    None,
                )?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The exposition of `images` (name, counters), with the snapshotter's gauge of lazy
/// mounts when given.
pub fn encode(images: &[(String, StatsSnapshot)], lazy_mounts: Option<usize>) -> String {
    let mut registry = Registry::default();
    if let Some(mounts) = lazy_mounts {
        registry.register(
            "petrel_snapshotter_lazy_mounts",
            "Lazy image mounts the snapshotter serves",
            ConstGauge::new(mounts as i64),
        );
    }
    let label = |image: &str| ImageLabel {
        image: image.to_string(),
    };
    for (name, help, value) in COUNTERS {
        let samples = images.iter().map(|(image, s)| (label(image), value(s))).collect();
        registry.register(*name, *help, PerImageCounter(samples));
    }
    for (name, help, value) in GAUGES {
        let samples = images.iter().map(|(image, s)| (label(image), value(s))).collect();
        registry.register(*name, *help, PerImageGauge(samples));
    }
    let latency = images
        .iter()
        .map(|(image, s)| {
            let buckets: Vec<(f64, u64)> = s
                .read_latency_buckets_us
                .iter()
                .map(|&(bound, count)| {
                    let seconds = if bound == u64::MAX {
                        f64::INFINITY
                    } else {
                        bound as f64 / 1e6
                    };
                    (seconds, count)
                })
                .collect();
            Latency {
                label: label(image),
                sum: s.read_latency_sum_us as f64 / 1e6,
                count: buckets.iter().map(|(_, c)| c).sum(),
                buckets,
            }
        })
        .collect();
    registry.register(
        "petrel_read_latency_seconds",
        "FUSE read latency",
        PerImageHistogram(latency),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn every_image_is_a_sample_of_one_family_and_names_are_escaped() {
        let stats = Stats::default();
        stats.backend_bytes.fetch_add(10, Relaxed);
        stats.record_read(std::time::Duration::from_micros(700), 10, true);
        let a = stats.snapshot();
        stats.backend_bytes.fetch_add(10, Relaxed);
        let b = stats.snapshot();
        let text = encode(&[("a".into(), a), ("docker://r/x\"y\\z".into(), b)], Some(2));
        assert_eq!(text.matches("# TYPE petrel_backend_bytes counter").count(), 1, "{text}");
        assert!(text.contains("petrel_backend_bytes_total{image=\"a\"} 10\n"), "{text}");
        assert!(
            text.contains("petrel_backend_bytes_total{image=\"docker://r/x\\\"y\\\\z\"} 20\n"),
            "{text}"
        );
        assert!(text.contains("petrel_snapshotter_lazy_mounts 2\n"), "{text}");
        assert!(text.contains("# TYPE petrel_cache_uncommitted_bytes gauge"), "{text}");
        assert!(
            text.contains("petrel_cache_uncommitted_bytes{image=\"a\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("petrel_read_latency_seconds_bucket{le=\"0.001\",image=\"a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("petrel_read_latency_seconds_bucket{le=\"+Inf\",image=\"a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("petrel_read_latency_seconds_count{image=\"a\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let no_mounts = encode(&[], None);
        assert!(!no_mounts.contains("lazy_mounts") && no_mounts.contains("# TYPE petrel_reads counter"));
    }
}
