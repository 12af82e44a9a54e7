//! The Grafana dashboard and the Prometheus alert rules in `docs/observability/`
//! use only metrics petrel exports: every `petrel_…` name in a query is checked
//! against the names a mount daemon and the snapshotter actually print.

use std::collections::BTreeSet;

fn docs(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../docs/observability/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// `petrel_…` metric names in a PromQL expression.
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("petrel_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every sample name the snapshotter's endpoint serves.
fn exported() -> BTreeSet<String> {
    let snapshot = petrel_fuse_daemon::stats::Stats::default().snapshot();
    let merged = petrel_fuse_daemon::exposition::encode(&[("img".to_string(), snapshot)], Some(1));
    merged
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[test]
fn the_dashboard_and_the_alerts_use_exported_metrics() {
    let exported = exported();
    assert!(exported.contains("petrel_snapshotter_lazy_mounts"), "{exported:?}");
    let dashboard: serde_json::Value = serde_json::from_str(&docs("grafana-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 5);
    let mut used = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            used.extend(names_in(target["expr"].as_str().unwrap()));
        }
    }
    let rules = docs("alerts.yml");
    let expressions: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).collect();
    assert!(expressions.len() >= 4, "{rules}");
    for expr in expressions {
        used.extend(names_in(expr));
    }
    let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?} (exported: {exported:?})");
}
