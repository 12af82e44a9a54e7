//! The snapshotter's Prometheus endpoint: one exposition merged from every mount
//! daemon's. Each daemon describes the same metric families, and the text format
//! allows one `# HELP`/`# TYPE` per family with all of its samples together, so the
//! daemons' texts are regrouped by family rather than concatenated.

use std::collections::BTreeMap;

/// One metric family: its description lines and samples, in the order first seen.
#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Merges Prometheus text expositions, family by family, and adds the snapshotter's
/// own gauge of lazy mounts.
pub fn merge_expositions(texts: &[String], lazy_mounts: usize) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut histograms: Vec<String> = Vec::new();
    for text in texts {
        for line in text.lines() {
            let (name, slot) = if let Some(rest) = line.strip_prefix("# HELP ") {
                (first_word(rest), 0)
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = first_word(rest);
                if rest.split_whitespace().nth(1) == Some("histogram") {
                    histograms.push(name.clone());
                }
                (name, 1)
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                (family_of(&metric_name(line), &histograms), 2)
            };
            let family = families.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                Family::default()
            });
            match slot {
                0 => {
                    family.help.get_or_insert_with(|| line.to_string());
                }
                1 => {
                    family.kind.get_or_insert_with(|| line.to_string());
                }
                _ => family.samples.push(line.to_string()),
            }
        }
    }
    let mut out = format!(
        "# HELP petrel_snapshotter_lazy_mounts Lazy image mounts the snapshotter serves\n\
         # TYPE petrel_snapshotter_lazy_mounts gauge\npetrel_snapshotter_lazy_mounts {lazy_mounts}\n"
    );
    for name in order {
        let family = &families[&name];
        for line in family.help.iter().chain(&family.kind).chain(&family.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn first_word(text: &str) -> String {
    text.split_whitespace().next().unwrap_or_default().to_string()
}

/// The metric name of a sample line (`name{labels} value` or `name value`).
fn metric_name(line: &str) -> String {
    line.split(['{', ' ']).next().unwrap_or_default().to_string()
}

/// A histogram's `_bucket`, `_sum` and `_count` samples belong to its family.
fn family_of(name: &str, histograms: &[String]) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.iter().any(|h| h == base) {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(image: &str, bytes: u64) -> String {
        format!(
            "# HELP petrel_backend_bytes_total Bytes received from the backend\n# TYPE petrel_backend_bytes_total counter\n\
             petrel_backend_bytes_total{{image=\"{image}\"}} {bytes}\n\
             # HELP petrel_read_latency_seconds FUSE read latency\n# TYPE petrel_read_latency_seconds histogram\n\
             petrel_read_latency_seconds_bucket{{image=\"{image}\",le=\"0.001\"}} 3\n\
             petrel_read_latency_seconds_bucket{{image=\"{image}\",le=\"+Inf\"}} 4\n\
             petrel_read_latency_seconds_sum{{image=\"{image}\"}} 0.5\n\
             petrel_read_latency_seconds_count{{image=\"{image}\"}} 4\n"
        )
    }

    #[test]
    fn families_are_described_once_with_their_samples_together() {
        let merged = merge_expositions(&[daemon("a", 10), daemon("b", 20)], 2);
        let lines: Vec<&str> = merged.lines().collect();
        for family in ["petrel_backend_bytes_total", "petrel_read_latency_seconds"] {
            let help = format!("# HELP {family} ");
            let kind = format!("# TYPE {family} ");
            assert_eq!(lines.iter().filter(|l| l.starts_with(&help)).count(), 1, "{merged}");
            assert_eq!(lines.iter().filter(|l| l.starts_with(&kind)).count(), 1, "{merged}");
            // Every sample of the family sits in one run right after its TYPE line.
            let start = lines.iter().position(|l| l.starts_with(&kind)).unwrap() + 1;
            let run = lines[start..]
                .iter()
                .take_while(|l| !l.starts_with('#'))
                .filter(|l| l.starts_with(family))
                .count();
            let all = lines
                .iter()
                .filter(|l| !l.starts_with('#') && l.starts_with(family))
                .count();
            assert_eq!(run, all, "{merged}");
        }
        assert!(merged.contains("petrel_backend_bytes_total{image=\"a\"} 10"));
        assert!(merged.contains("petrel_backend_bytes_total{image=\"b\"} 20"));
        assert!(merged.contains("petrel_read_latency_seconds_count{image=\"b\"} 4"));
        assert!(merged.contains("petrel_snapshotter_lazy_mounts 2"));
    }

    #[test]
    fn no_daemons_still_reports_the_gauge() {
        assert_eq!(
            merge_expositions(&[], 0).lines().last(),
            Some("petrel_snapshotter_lazy_mounts 0")
        );
    }
}
