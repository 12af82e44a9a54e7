//! The node chunk store at scale, each figure beside a plain-disk baseline from the
//! same run: storing N chunks (vs writing the same bytes to one file with the same
//! number of `fdatasync` calls), opening the store with a cache bound as a mount does
//! (vs `cat` of its index files), GC down to half (vs `rm` of the same pack files),
//! a reader's latency while GC runs (vs the same reader idle), and compaction after
//! a third of the chunks were removed (vs `cp` of the bytes it keeps).

use crate::measure::{drop_caches, run_shell};
use anyhow::Context;
use petrel_fuse_daemon::store::ChunkStore;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks per stored batch (a fetch stores what one range request brought).
const BATCH: usize = 64;

fn chunk(i: u64, bytes: usize) -> ([u8; 32], Vec<u8>) {
    let mut data = vec![0u8; bytes];
    for (at, word) in data.chunks_mut(8).enumerate() {
        let value = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ at as u64).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
    (*blake3::hash(&data).as_bytes(), data)
}

fn fill(store: &Arc<ChunkStore>, count: u64, bytes: usize) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut digests = Vec::with_capacity(count as usize);
    let mut at = 0;
    while at < count {
        let batch: Vec<([u8; 32], Vec<u8>)> = (at..(at + BATCH as u64).min(count)).map(|i| chunk(i, bytes)).collect();
        let refs: Vec<([u8; 32], &[u8])> = batch.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        store.put(&refs)?;
        digests.extend(batch.iter().map(|(d, _)| *d));
        at += BATCH as u64;
    }
    Ok(digests)
}

/// Writes `count` chunks' worth of bytes to one file, one `fdatasync` per batch.
fn plain_writes(path: &Path, count: u64, bytes: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut file = std::fs::File::create(path)?;
    let mut at = 0;
    while at < count {
        let batch: Vec<u8> = (at..(at + BATCH as u64).min(count))
            .flat_map(|i| chunk(i, bytes).1)
            .collect();
        file.write_all(&batch)?;
        file.sync_data()?;
        at += BATCH as u64;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn files_with(dir: &Path, extension: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == extension))
        .collect();
    files.sort();
    files
}

/// Latencies (seconds) of cached chunk reads by one thread until `stop`.
fn read_latencies(
    store: Arc<ChunkStore>,
    digests: Arc<Vec<[u8; 32]>>,
    bytes: usize,
    stop: Arc<AtomicBool>,
) -> Vec<f64> {
    let mut rng = petrel_fixtures::rng::Rng::new(7);
    let mut buf = vec![0u8; bytes];
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let digest = digests[rng.below(digests.len() as u64) as usize];
        let started = Instant::now();
        // Evicted chunks answer NotFound at once: that is a read not blocked either.
        let _ = store.read(&digest, 0, &mut buf);
        latencies.push(started.elapsed().as_secs_f64());
    }
    latencies
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get(((values.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0.0)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut count = 1_000_000u64;
    let mut bytes = 4096usize;
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).context("missing value");
        match args[i].as_str() {
            "--chunks" => count = value()?.parse()?,
            "--chunk-bytes" => bytes = value()?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
        i += 2;
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    let cache = work.path().join("cache");
    println!();
    println!(
        "the node chunk store with {count} chunks of {bytes} bytes ({} MiB)",
        (count * bytes as u64) >> 20
    );
    println!("| operation | petrel | baseline | ratio |");
    println!("|---|---:|---:|---:|");

    let plain = plain_writes(&work.path().join("plain"), count, bytes)?;
    std::fs::remove_file(work.path().join("plain"))?;
    let store = ChunkStore::open(&cache, None)?;
    let started = Instant::now();
    let digests = Arc::new(fill(&store, count, bytes)?);
    let put = started.elapsed().as_secs_f64();
    drop(store);
    println!(
        "| store {count} chunks, {BATCH} per batch | {put:.2} s | {plain:.2} s (one file, same fdatasyncs) | {:.2}x |",
        put / plain
    );

    let packs = cache.join("packs");
    let small = work.path().join("cache-100k");
    if count > 100_000 {
        fill(&ChunkStore::open(&small, None)?, 100_000, bytes)?;
    }
    for dir in [&small, &cache].into_iter().filter(|d| d.exists()) {
        drop_caches();
        let indexes: Vec<String> = files_with(&dir.join("packs"), "idx")
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let cat = run_shell(&format!("cat {} > /dev/null", indexes.join(" ")))?.seconds;
        drop_caches();
        let started = Instant::now();
        let bounded = ChunkStore::open(dir, Some(u64::MAX / 2))?;
        let open = started.elapsed().as_secs_f64();
        let (stored, _) = bounded.usage();
        println!(
            "| open with a cache bound (a mount starting), {stored} chunks | {open:.3} s | {cat:.3} s (`cat` of the index files) | {:.2}x |",
            open / cat.max(1e-4)
        );
    }
    let _ = std::fs::remove_dir_all(&small);

    // GC to half, with a reader running, after the same reader idle; it reads the
    // newest quarter of the chunks, which GC (oldest packs first) keeps.
    let store = ChunkStore::open(&cache, None)?;
    let newest = Arc::new(digests[digests.len() * 3 / 4..].to_vec());
    let stop = Arc::new(AtomicBool::new(false));
    let idle = {
        let (s, d, st) = (Arc::clone(&store), Arc::clone(&newest), Arc::clone(&stop));
        let reader = std::thread::spawn(move || read_latencies(s, d, bytes, st));
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("reader")
    };
    let (_, before) = store.usage();
    let victims: Vec<std::path::PathBuf> = files_with(&packs, "pack");
    let copy = work.path().join("rm-baseline");
    std::fs::create_dir_all(&copy)?;
    let half: Vec<&std::path::PathBuf> = victims.iter().take(victims.len() / 2).collect();
    for path in &half {
        std::fs::copy(path, copy.join(path.file_name().expect("name")))?;
    }
    run_shell("sync")?;
    let rm = run_shell(&format!("rm -f {}/*", copy.display()))?.seconds;
    stop.store(false, Ordering::Relaxed);
    let (s, d, st) = (Arc::clone(&store), Arc::clone(&newest), Arc::clone(&stop));
    let reader = std::thread::spawn(move || read_latencies(s, d, bytes, st));
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let report = store.gc(before / 2);
    let gc = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut during = reader.join().expect("reader");
    let mut idle = idle;
    println!(
        "| GC to half ({} chunks in {} packs removed) | {gc:.2} s | {rm:.2} s (`rm` of as many pack files) | {:.2}x |",
        report.chunks_removed,
        report.packs_removed,
        gc / rm.max(1e-4)
    );
    let (idle99, during99) = (quantile(&mut idle, 0.99), quantile(&mut during, 0.99));
    let (idle_max, during_max) = (quantile(&mut idle, 1.0), quantile(&mut during, 1.0));
    println!(
        "| a reader's p99 / max latency while GC runs | {:.0} / {:.0} us | {:.0} / {:.0} us (the same reader idle) | {:.2}x / {:.2}x |",
        during99 * 1e6,
        during_max * 1e6,
        idle99 * 1e6,
        idle_max * 1e6,
        during99 / idle99.max(1e-9),
        during_max / idle_max.max(1e-9)
    );

    // Compaction after a third of what is left was removed (every third chunk).
    let left: Vec<[u8; 32]> = digests.iter().filter(|d| store.contains(d)).copied().collect();
    for digest in left.iter().step_by(3) {
        store.remove(digest);
    }
    let kept_bytes = (left.len() - left.len().div_ceil(3)) as u64 * bytes as u64;
    let baseline_file = work.path().join("cp-baseline");
    run_shell(&format!(
        "head -c {kept_bytes} /dev/zero > {0} && sync && cp {0} {0}.copy && sync",
        baseline_file.display()
    ))?;
    drop_caches();
    let cp = run_shell(&format!("cp {0} {0}.again && sync", baseline_file.display()))?.seconds;
    drop_caches();
    let started = Instant::now();
    let compaction = store.compact();
    let compact = started.elapsed().as_secs_f64();
    println!(
        "| compaction after a third removed ({} packs, {} chunks moved, {} MiB freed) | {compact:.2} s | {cp:.2} s (`cp` + `sync` of the bytes kept) | {:.2}x |",
        compaction.packs_compacted,
        compaction.chunks_moved,
        compaction.bytes_freed >> 20,
        compact / cp.max(1e-4)
    );
    Ok(())
}
