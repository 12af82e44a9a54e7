//! The snapshotter's Prometheus endpoint: every mount daemon's counters, asked over
//! its control socket as structured `stats` and encoded once by
//! `petrel_fuse_daemon::exposition` (one family per metric, one sample per image),
//! never by merging texts.

use petrel_fuse_daemon::stats::StatsSnapshot;

/// The image name and counters of a daemon's `stats` answer; none when it is not one.
pub fn parse_stats_answer(answer: &str) -> Option<(String, StatsSnapshot)> {
    #[derive(serde::Deserialize)]
    struct Answer {
        image: String,
        stats: StatsSnapshot,
    }
    let answer: Answer = serde_json::from_str(answer.trim()).ok()?;
    Some((answer.image, answer.stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemons_stats_answer_is_read_and_anything_else_is_not() {
        let stats = petrel_fuse_daemon::stats::Stats::default().snapshot();
        let answer = serde_json::json!({"image": "img", "stats": stats}).to_string() + "\n";
        let (image, parsed) = parse_stats_answer(&answer).unwrap();
        assert_eq!((image.as_str(), parsed), ("img", stats));
        assert!(parse_stats_answer("# HELP x\n").is_none());
    }

    #[test]
    fn daemons_are_samples_of_one_family_with_the_gauge_of_mounts() {
        let stats = petrel_fuse_daemon::stats::Stats::default().snapshot();
        let text = petrel_fuse_daemon::exposition::encode(&[("a".into(), stats.clone()), ("b".into(), stats)], Some(2));
        assert_eq!(text.matches("# TYPE petrel_backend_bytes counter").count(), 1, "{text}");
        assert!(text.contains("petrel_backend_bytes_total{image=\"a\"} 0"), "{text}");
        assert!(text.contains("petrel_backend_bytes_total{image=\"b\"} 0"), "{text}");
        assert!(text.contains("petrel_snapshotter_lazy_mounts 2"), "{text}");
    }
}
