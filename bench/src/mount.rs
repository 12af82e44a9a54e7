//! Mount and read benchmarks, each beside a baseline from the same run: mount time
//! and daemon RSS as the tree grows (vs the smallest tree), reads through the mount
//! vs `cat` of the same file on local disk, `find | stat` vs the same tree on disk,
//! and startup-style random reads (bytes fetched vs bytes needed).

use crate::measure::{drop_caches, run_shell};
use crate::trees::{mixed_tree, small_files_tree};
use anyhow::{bail, Context};
use petrel_fixtures::rng::Rng;
use petrel_fuse_daemon::mount::is_mounted;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

fn petrel_build(out: &Path, input: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(bin("petrel"))
        .arg("build")
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(input)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("petrel build {} failed", input.display());
    }
    Ok(())
}

/// A foreground daemon of ours, unmounted when dropped.
struct Daemon {
    child: Child,
    mountpoint: PathBuf,
    runtime: PathBuf,
}

impl Daemon {
    fn start(
        image: &Path,
        mountpoint: &Path,
        cache: &Path,
        runtime: &Path,
        extra: &[&str],
    ) -> anyhow::Result<(Self, Duration)> {
        std::fs::create_dir_all(mountpoint)?;
        let started = Instant::now();
        let child = Command::new(bin("petrel"))
            .arg("mount")
            .arg(image)
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--runtime-dir")
            .arg(runtime)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()?;
        while !is_mounted(mountpoint) {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("mount of {} did not appear", image.display());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = started.elapsed();
        Ok((
            Daemon {
                child,
                mountpoint: mountpoint.to_path_buf(),
                runtime: runtime.to_path_buf(),
            },
            elapsed,
        ))
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(bin("petrel"))
            .arg("stats")
            .arg(&self.mountpoint)
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .output()?;
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?["stats"].clone())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new(bin("petrel")).arg("umount").arg(&self.mountpoint).status();
        let _ = self.child.wait();
    }
}

/// A layer tar of `count` empty files in 1,000 directories, written to `path`.
fn many_files_layer(path: &Path, count: usize) -> anyhow::Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut builder = tar::Builder::new(file);
    for i in 0..count {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, format!("d{:03}/file{i:07}", i % 1000), std::io::empty())?;
    }
    builder.into_inner()?;
    Ok(())
}

fn seconds(script: &str) -> anyhow::Result<f64> {
    Ok(run_shell(script)?.seconds)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut scale = 1.0f64;
    let mut skip_million = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--scale" => {
                scale = args.get(i + 1).context("--scale F")?.parse()?;
                i += 1;
            }
            "--skip-1m" => skip_million = true,
            other => bail!("unknown argument {other}"),
        }
        i += 1;
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    let w = work.path();
    let mut lines = Vec::new();

    // 1. Mount time and RSS after mount as the tree grows.
    let sizes: Vec<usize> = if skip_million {
        vec![1_000, 100_000]
    } else {
        vec![1_000, 100_000, 1_000_000]
    };
    let mut mount_rows = Vec::new();
    for &count in &sizes {
        let layer = w.join(format!("many-{count}.tar"));
        many_files_layer(&layer, count)?;
        let image = w.join(format!("many-{count}"));
        petrel_build(&image, &layer, &[])?;
        std::fs::remove_file(&layer)?;
        let bootstrap = std::fs::metadata(image.join("bootstrap"))?.len();
        let cache = w.join("cache-many");
        let (first, first_time) = Daemon::start(&image, &w.join("mnt-many"), &cache, &w.join("run"), &[])?;
        drop(first);
        let (daemon, warm_time) = Daemon::start(&image, &w.join("mnt-many"), &cache, &w.join("run"), &[])?;
        let rss = daemon.rss_mib();
        drop(daemon);
        mount_rows.push((count, bootstrap, first_time, warm_time, rss));
    }
    let (_, _, base_first, base_warm, base_rss) = mount_rows[0];
    lines.push("mount (daemon start to mounted; first = bootstrap imported and verified into the cache, warm = already cached)".to_string());
    lines.push(
        "| files | bootstrap MiB | first mount ms | warm mount ms | warm / 1k | RSS after mount MiB | RSS / 1k |"
            .into(),
    );
    lines.push("|---:|---:|---:|---:|---:|---:|---:|".into());
    for (count, bootstrap, first, warm, rss) in &mount_rows {
        lines.push(format!(
            "| {count} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} |",
            *bootstrap as f64 / (1 << 20) as f64,
            first.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
            warm.as_secs_f64() / base_warm.as_secs_f64(),
            rss,
            rss / base_rss
        ));
    }
    let _ = base_first;

    // 2. Sequential read of a large file: cold and warm, vs cat from local disk.
    let big_dir = w.join("big");
    std::fs::create_dir_all(&big_dir)?;
    let big_bytes = (scale * (1u64 << 30) as f64) as usize;
    let mut rng = Rng::new(21);
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(big_dir.join("big.bin"))?);
        let mut left = big_bytes;
        while left > 0 {
            let n = left.min(8 << 20);
            f.write_all(&rng.mixed(n))?;
            left -= n;
        }
    }
    let big_image = w.join("big-image");
    petrel_build(&big_image, &big_dir, &[])?;
    let original = big_dir.join("big.bin");
    drop_caches();
    let disk_cold = seconds(&format!("cat {} > /dev/null", original.display()))?;
    let disk_warm = seconds(&format!("cat {} > /dev/null", original.display()))?;
    let cache = w.join("cache-big");
    // Through FUSE only, so these rows measure the read path itself.
    let (daemon, _) = Daemon::start(
        &big_image,
        &w.join("mnt-big"),
        &cache,
        &w.join("run"),
        &["--no-passthrough"],
    )?;
    let through = daemon.mountpoint.join("big.bin");
    drop_caches();
    let petrel_cold = seconds(&format!("cat {} > /dev/null", through.display()))?;
    let fetched = daemon.stats()?;
    drop_caches();
    let petrel_cache_warm = seconds(&format!("cat {} > /dev/null", through.display()))?;
    let petrel_page_warm = seconds(&format!("cat {} > /dev/null", through.display()))?;
    drop(daemon);
    // A new daemon on the full cache: it hashes each chunk once before first trusting
    // it (chunks it did not store itself), which is what this row costs over the last.
    let (daemon, _) = Daemon::start(
        &big_image,
        &w.join("mnt-big"),
        &cache,
        &w.join("run"),
        &["--no-passthrough"],
    )?;
    drop_caches();
    let petrel_new_daemon = seconds(&format!("cat {} > /dev/null", through.display()))?;
    drop(daemon);
    // The same cache with passthrough: an open of the fully cached file materializes
    // it (in the background at this size); once an open gets the backing file, time it.
    let (daemon, _) = Daemon::start(&big_image, &w.join("mnt-big"), &cache, &w.join("run"), &[])?;
    let started = Instant::now();
    while daemon.stats()?["passthrough_opens"].as_u64().unwrap_or(0) == 0 {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("no open got a backing file");
        }
        drop(std::fs::File::open(&through)?);
        std::thread::sleep(Duration::from_millis(200));
    }
    drop_caches();
    let passthrough_cold = seconds(&format!("cat {} > /dev/null", through.display()))?;
    let passthrough_warm = seconds(&format!("cat {} > /dev/null", through.display()))?;
    drop(daemon);
    let mib = big_bytes as f64 / (1 << 20) as f64;
    lines.push(String::new());
    lines.push(format!(
        "sequential read of a {mib:.0} MiB file (cat > /dev/null); baseline = cat of the same file on local disk"
    ));
    lines.push("| case | petrel MiB/s | disk MiB/s | petrel / disk |".into());
    lines.push("|---|---:|---:|---:|".into());
    for (name, p, d) in [
        (
            "cold: petrel cache empty (local backend), page cache dropped",
            petrel_cold,
            disk_cold,
        ),
        ("petrel cache full, page cache dropped", petrel_cache_warm, disk_cold),
        (
            "petrel cache full, new daemon (re-hashes each chunk on first use), page cache dropped",
            petrel_new_daemon,
            disk_cold,
        ),
        ("page cache warm", petrel_page_warm, disk_warm),
        (
            "passthrough (materialized backing file), page cache dropped",
            passthrough_cold,
            disk_cold,
        ),
        ("passthrough, page cache warm", passthrough_warm, disk_warm),
    ] {
        lines.push(format!("| {name} | {:.0} | {:.0} | {:.2} |", mib / p, mib / d, d / p));
    }
    lines.push(format!(
        "cold read fetched {} MiB in {} backend requests",
        fetched["backend_bytes"].as_u64().unwrap_or(0) >> 20,
        fetched["backend_requests"]
    ));
    std::fs::remove_dir_all(&big_dir)?;

    // 3. find | stat over a 100k-file tree vs the same tree on disk.
    let tree = w.join("tree100k");
    let count = (scale * 100_000.0) as usize;
    small_files_tree(&tree, count)?;
    let tree_image = w.join("tree-image");
    petrel_build(&tree_image, &tree, &[])?;
    let (daemon, _) = Daemon::start(
        &tree_image,
        &w.join("mnt-tree"),
        &w.join("cache-tree"),
        &w.join("run"),
        &[],
    )?;
    let walk = |root: &Path| format!("find {} -type f -print0 | xargs -0 stat > /dev/null", root.display());
    drop_caches();
    let disk_walk = seconds(&walk(&tree))?;
    drop_caches();
    let petrel_walk = seconds(&walk(&daemon.mountpoint))?;
    let disk_walk_warm = seconds(&walk(&tree))?;
    let petrel_walk_warm = seconds(&walk(&daemon.mountpoint))?;
    drop(daemon);
    lines.push(String::new());
    lines.push(format!(
        "find -type f | xargs stat over {count} files; baseline = the same tree on local disk"
    ));
    lines.push("| caches | petrel s | disk s | petrel / disk (time) |".into());
    lines.push("|---|---:|---:|---:|".into());
    lines.push(format!(
        "| dropped | {petrel_walk:.2} | {disk_walk:.2} | {:.2} |",
        petrel_walk / disk_walk
    ));
    lines.push(format!(
        "| warm | {petrel_walk_warm:.2} | {disk_walk_warm:.2} | {:.2} |",
        petrel_walk_warm / disk_walk_warm
    ));
    std::fs::remove_dir_all(&tree)?;

    // 4. Startup-style random reads: 5% of the chunks of a 300 MiB image, random order.
    let app = w.join("app");
    mixed_tree(&app, (scale * (300u64 << 20) as f64) as u64)?;
    let app_image = w.join("app-image");
    petrel_build(&app_image, &app, &[])?;
    let bytes = std::fs::read(app_image.join("bootstrap"))?;
    let bootstrap = petrel_format::Bootstrap::open(&bytes)?;
    // (path, file offset, chunk) of one 4 KiB read inside each chosen chunk.
    let mut candidates = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in bootstrap.walk() {
        let entry = entry?;
        if entry.inode.kind()? != petrel_format::FileKind::Regular {
            continue;
        }
        for s in bootstrap.segments(&entry.inode, 0, entry.inode.size())? {
            if let petrel_format::reader::SegmentSource::Chunk { index, .. } = s.source {
                if seen.insert(index) {
                    candidates.push((String::from_utf8_lossy(&entry.path).into_owned(), s.file_offset, index));
                }
            }
        }
    }
    let mut rng = Rng::new(5);
    let wanted = (candidates.len() / 20).max(1);
    let mut chosen = Vec::new();
    while chosen.len() < wanted {
        let pick = candidates.swap_remove(rng.below(candidates.len() as u64) as usize);
        chosen.push(pick);
    }
    let needed: u64 = chosen
        .iter()
        .map(|(_, _, c)| u64::from(bootstrap.chunk(*c).map(|c| c.compressed_size).unwrap_or(0)))
        .sum();
    // Each with a cache of its own; the stats are read once background readahead is
    // quiet, so what it fetched counts.
    let random_reads = |name: &str, extra: &[&str]| -> anyhow::Result<(serde_json::Value, Duration)> {
        let (daemon, _) = Daemon::start(
            &app_image,
            &w.join(format!("mnt-{name}")),
            &w.join(format!("cache-{name}")),
            &w.join("run"),
            extra,
        )?;
        let started = Instant::now();
        for (path, offset, _) in &chosen {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(daemon.mountpoint.join(path))?;
            let mut buf = vec![0u8; 4096];
            let _ = file.read_at(&mut buf, *offset)?;
        }
        let elapsed = started.elapsed();
        let mut stats = daemon.stats()?;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = daemon.stats()?;
            if now["backend_bytes"] == stats["backend_bytes"] {
                break;
            }
            stats = now;
        }
        Ok((stats, elapsed))
    };
    let runs = [
        ("default", random_reads("app", &[])?),
        (
            "--readahead-dir-bytes 0",
            random_reads("app-no-readahead", &["--readahead-dir-bytes", "0"])?,
        ),
    ];
    lines.push(String::new());
    lines.push(format!(
        "random reads: one 4 KiB read in each of {wanted} chunks (5% of {}) of a {:.0} MiB image, random order",
        seen.len(),
        scale * 300.0
    ));
    lines.push("| mount | bytes needed (chunks touched) | bytes fetched | fetched / needed | backend requests | chunks touched | time s |".into());
    lines.push("|---|---:|---:|---:|---:|---:|---:|".into());
    for (label, (stats, elapsed)) in &runs {
        let fetched = stats["backend_bytes"].as_u64().unwrap_or(0);
        lines.push(format!(
            "| {label} | {needed} | {fetched} | {:.2} | {} | {wanted} | {:.2} |",
            fetched as f64 / needed.max(1) as f64,
            stats["backend_requests"],
            elapsed.as_secs_f64()
        ));
    }
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
