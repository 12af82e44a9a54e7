//! Timing and peak memory of a command, measured by GNU time.

use anyhow::{bail, Context};
use std::process::Command;
use std::time::Instant;

/// Wall time, peak RSS and CPU time of one command run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub seconds: f64,
    pub peak_rss_mib: f64,
    /// User and system CPU seconds of the command and the children it waited for.
    pub cpu_seconds: f64,
}

/// Runs `sh -c script` under `/usr/bin/time` and returns its wall time and peak RSS
/// (the largest of the shell's children).
/// The median of `values` (0 for none): the upper one of an even count.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

pub fn run_shell(script: &str) -> anyhow::Result<Run> {
    let rss_file = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%M %U %S", "-o"])
        .arg(rss_file.path())
        .args(["sh", "-c", script])
        .status()
        .context("running /usr/bin/time (apt-get install time)")?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{script:?} failed: {status}");
    }
    let text = std::fs::read_to_string(rss_file.path())?;
    // The format's line is the last (GNU time writes a line on a failed exit before it).
    let fields: Vec<f64> = text
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    Ok(Run {
        seconds,
        peak_rss_mib: field(0) / 1024.0,
        cpu_seconds: field(1) + field(2),
    })
}

/// Drops the page cache so every run reads its input from disk alike.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Syncs, then waits (at most a minute) until the disks have written and discarded
/// nothing for two seconds: a cold read timed right after gigabytes were written or removed
/// (writeback, `discard`) runs at a fraction of the disk's speed, whoever reads.
pub fn quiet_disks() {
    let _ = Command::new("sync").status();
    let written = || -> u64 {
        // /proc/diskstats, fields from 1: 10 is sectors written, 12 the I/Os in
        // flight, 17 (Linux 4.18+) sectors discarded; whole disks and partitions
        // alike, so the sum only has to stop changing. A removal's discards go on
        // after `sync` returns and slow reads as much as writeback does.
        std::fs::read_to_string("/proc/diskstats")
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                [9, 11, 16]
                    .iter()
                    .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    };
    let started = std::time::Instant::now();
    let (mut last, mut quiet_since) = (written(), std::time::Instant::now());
    while quiet_since.elapsed() < std::time::Duration::from_secs(2)
        && started.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let now = written();
        if now != last {
            (last, quiet_since) = (now, std::time::Instant::now());
        }
    }
}

/// Total bytes of regular files below `dir`.
pub fn tree_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            // A file removed meanwhile (the cache evicting or compacting) counts as gone.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}
