//! Big-file benchmark: one multi-GiB model file (fp16-like weights, barely
//! compressible) in an image served by a local docker-registry. Measures:
//! - one sequential `cat` of the file through a lazy mount, against `curl` of the
//!   petrel image's blobs (all the stored bytes of the file) from the same registry
//!   on loopback, and of the stored bytes behind the first `--shaped-mib` over the
//!   shaped link;
//! - the same `cat` once every chunk is cached, against `cat` of the plain file;
//! - scattered small reads: bytes fetched per byte touched.
//!
//! `scripts/bench.sh bigfile [--gib 3] [--rounds 3] [--shaped-mib 256] [--mbit 100] [--rtt-ms 20] [--lazy-only]`
//!
//! `--lazy-only` measures the lazy reads and their baselines only.

use crate::lazy_mount::LazyMount;
use crate::measure::{drop_caches, median, quiet_disks, run_shell};
use crate::registry::Registry;
use crate::relay;
use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MODEL_PATH: &str = "models/model.safetensors";

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

/// Writes `bytes` of fp16-like weights: random signs and mantissas, exponents in a
/// narrow band, as trained weights are (zstd saves a few percent, as on real models).
fn write_weights(path: &Path, bytes: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().expect("parent"))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for pair in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut word = state;
            for half in pair.chunks_exact_mut(2) {
                let mantissa = (word & 0x3ff) as u16;
                let exponent = 12 + ((word >> 10) & 0x3) as u16;
                let sign = ((word >> 12) & 1) as u16;
                half.copy_from_slice(&((sign << 15) | (exponent << 10) | mantissa).to_le_bytes());
                word >>= 16;
            }
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// Seconds `curl` takes to fetch `stored` bytes of `blobs` in order over one
/// connection (whole blobs, then the head of the next): the bytes a reader of the
/// file needs, moved as fast as the registry and link allow.
fn curl_seconds(base: &str, blobs: &[(String, u64)], stored: u64) -> anyhow::Result<f64> {
    let mut command = Command::new("curl");
    let mut left = stored;
    for (digest, size) in blobs {
        if left == 0 {
            break;
        }
        if left != stored {
            command.arg("--next"); // options apply per URL from here (one connection still)
        }
        command.args(["-sf", "-o", "/dev/null"]);
        if left < *size {
            command.args(["-r", &format!("0-{}", left - 1)]);
        }
        command.arg(format!("{base}/v2/model/blobs/{digest}"));
        left = left.saturating_sub(*size);
    }
    let started = Instant::now();
    let status = command.status().context("curl")?;
    if !status.success() {
        bail!("curl of {base}'s blobs: {status}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The petrel image's chunk blobs, in manifest order: (digest, size). The model is
/// spread over all of them, so they are the baseline's bytes.
fn petrel_blobs(addr: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let out = Command::new("curl")
        .args(["-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .arg(format!("http://{addr}/v2/model/manifests/petrel"))
        .output()?;
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let blobs: Vec<(String, u64)> = manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .filter(|l| l["annotations"]["dev.petrel.layer"].as_str() == Some("blob"))
        .filter_map(|l| Some((l["digest"].as_str()?.to_string(), l["size"].as_u64()?)))
        .collect();
    anyhow::ensure!(!blobs.is_empty(), "the petrel image has no blob layers");
    Ok(blobs)
}

struct Cat {
    seconds: f64,
    requests: u64,
    fetched: u64,
}

/// Reads the first `bytes` of the model through a fresh lazy mount of `image`.
fn lazy_cat(petrel: &Path, image: &str, dir: &Path, bytes: u64, extra: &[&str]) -> anyhow::Result<Cat> {
    let _ = std::fs::remove_dir_all(dir);
    let mount = LazyMount::start(petrel, image, dir, extra)?;
    let started = Instant::now();
    run_shell(&format!(
        "head -c {bytes} {} > /dev/null",
        mount.mountpoint.join(MODEL_PATH).display()
    ))?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = mount.stats()?;
    Ok(Cat {
        seconds,
        requests: stats["backend_requests"].as_u64().unwrap_or(0),
        fetched: stats["backend_bytes"].as_u64().unwrap_or(0),
    })
}

/// Scattered reads (`count` reads of `size` bytes at seeded offsets) through a fresh
/// mount: bytes fetched per byte read.
fn scattered(petrel: &Path, image: &str, dir: &Path, file_bytes: u64, count: u64, size: u64) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let _ = std::fs::remove_dir_all(dir);
    let mount = LazyMount::start(petrel, image, dir, &["--prefetch-mode", "off"])?;
    let file = std::fs::File::open(mount.mountpoint.join(MODEL_PATH))?;
    let mut rng = petrel_fixtures::rng::Rng::new(size);
    let mut buffer = vec![0u8; size as usize];
    for _ in 0..count {
        let at = rng.below(file_bytes - size);
        file.read_exact_at(&mut buffer, at)?;
    }
    let fetched = mount.stats()?["backend_bytes"].as_u64().unwrap_or(0);
    Ok(fetched as f64 / (count * size) as f64)
}

/// Waits (at most a minute) until a file under `cache/files` resolves: the model is
/// materialized.
fn wait_materialized(cache: &Path) {
    let started = Instant::now();
    let done = || std::fs::read_dir(cache.join("files")).is_ok_and(|d| d.flatten().any(|e| e.path().is_file()));
    while !done() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Disk blocks the node cache at `cache` takes once the mount's background work has
/// settled: the file materialized (a link under `files/`) and the size unchanged for
/// 4 s (what the file replaced compacted away), waiting at most a minute for each.
fn settled_footprint(cache: &Path) -> anyhow::Result<u64> {
    let used = || -> anyhow::Result<u64> {
        let out = Command::new("du").arg("-s").arg("-B1").arg(cache).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.split_whitespace().next().unwrap_or("0").parse()?)
    };
    wait_materialized(cache);
    let (mut last, mut unchanged) = (used()?, 0);
    let started = Instant::now();
    while unchanged < 8 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        let now = used()?;
        unchanged = if now == last { unchanged + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut gib = 1.0f64;
    let mut rounds = 3usize;
    let mut shaped_mib = 256u64;
    let mut mbit = 100.0f64;
    let mut rtt_ms = 20.0f64;
    let mut lazy_only = false;
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).context("missing value");
        match args[i].as_str() {
            "--lazy-only" => {
                lazy_only = true;
                i += 1;
                continue;
            }
            "--gib" => gib = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--shaped-mib" => shaped_mib = value()?.parse()?,
            "--mbit" => mbit = value()?.parse()?,
            "--rtt-ms" => rtt_ms = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    let file_bytes = (gib * (1u64 << 30) as f64) as u64;
    let shaped_bytes = (shaped_mib << 20).min(file_bytes);
    let work = tempfile::tempdir_in("/var/tmp")?;
    let w = work.path();
    let petrel = bin("petrel");
    let tree = w.join("tree");
    write_weights(&tree.join(MODEL_PATH), file_bytes)?;
    let layer = w.join("layer.tar");
    run_shell(&format!(
        "tar --numeric-owner -C {} -cf {} .",
        tree.display(),
        layer.display()
    ))?;
    petrel_fixtures::oci_layout::write_oci_layout_from_files(&w.join("layout"), "v1", &[&layer])?;
    std::fs::remove_file(&layer)?;
    let registry = Registry::start(&w.join("registry"))?;
    let addr = registry.addr.clone();
    run_shell(&format!(
        "skopeo copy --quiet --dest-tls-verify=false oci:{}:v1 docker://{addr}/model:v1 && \
         {} convert docker://{addr}/model:v1 docker://{addr}/model:petrel > /dev/null",
        w.join("layout").display(),
        petrel.display()
    ))?;
    std::fs::remove_dir_all(w.join("layout"))?;
    let blobs = petrel_blobs(&addr)?;
    let stored_bytes: u64 = blobs.iter().map(|(_, size)| size).sum();
    // The stored bytes behind the first `shaped_bytes` of the file, in proportion.
    let shaped_stored = (stored_bytes as f64 * shaped_bytes as f64 / file_bytes as f64) as u64;
    let link = relay::start(&addr, Duration::from_secs_f64(rtt_ms / 2000.0), mbit * 1e6);
    let plain = tree.join(MODEL_PATH);
    let image = |at: &str| format!("docker://{at}/model:petrel");
    let lazy = ["--prefetch-mode", "off"];

    let (mut curl, mut cat_lazy, mut curl_shaped, mut cat_shaped, mut disk, mut fuse_cached, mut passthrough) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut requests, mut fetched, mut requests_shaped, mut footprints) = (vec![], vec![], vec![], vec![]);
    let (mut disk_warm, mut fuse_warm, mut passthrough_warm) = (vec![], vec![], vec![]);
    // The registry's CPU seconds serving curl's read and petrel's.
    let (mut registry_curl, mut registry_lazy) = (vec![], vec![]);
    let mut disk_fresh = vec![];
    // The same file as a local image (its blob on this disk): the issue's cold read
    // with no network, against the plain file.
    let local_image = w.join("local-image");
    let mut local_cold = vec![];
    if !lazy_only {
        run_shell(&format!(
            "{} build -o {} {} > /dev/null",
            petrel.display(),
            local_image.display(),
            tree.display()
        ))?;
    }
    for round in 0..rounds {
        quiet_disks();
        drop_caches();
        let before = registry.cpu_seconds();
        curl.push(curl_seconds(&format!("http://{addr}"), &blobs, stored_bytes)?);
        registry_curl.push(registry.cpu_seconds() - before);
        drop_caches();
        let before = registry.cpu_seconds();
        let cat = lazy_cat(
            &petrel,
            &image(&addr),
            &w.join(format!("lazy-{round}")),
            file_bytes,
            &lazy,
        )?;
        registry_lazy.push(registry.cpu_seconds() - before);
        cat_lazy.push(cat.seconds);
        requests.push(cat.requests as f64);
        fetched.push(cat.fetched as f64);
        // Cached: the same cache again, through FUSE and by passthrough.
        let dir = w.join(format!("lazy-{round}"));
        let cached_rows = if lazy_only { 0 } else { 2 };
        for (runs, warm, extra) in [
            (
                &mut fuse_cached,
                &mut fuse_warm,
                vec!["--prefetch-mode", "off", "--no-passthrough"],
            ),
            (&mut passthrough, &mut passthrough_warm, vec!["--prefetch-mode", "off"]),
        ]
        .into_iter()
        .take(cached_rows)
        {
            let mount = LazyMount::start(&petrel, &image(&addr), &dir, &extra)?;
            if extra.len() == 2 {
                // An open of a cached file this mount opened before materializes it
                // in the background; the read measured is one by passthrough.
                for _ in 0..2 {
                    run_shell(&format!(
                        "head -c 1 {} > /dev/null",
                        mount.mountpoint.join(MODEL_PATH).display()
                    ))?;
                }
                // Timed once the background work is done (the file materialized, what
                // it replaced compacted away), as on a node some time after the first
                // read; so is the footprint.
                footprints.push(settled_footprint(&dir.join("cache"))? as f64 / file_bytes as f64);
            }
            // One untimed read from disk first. This machine's disk is virtual: a
            // file read before comes from the host's cache even once this guest
            // dropped its own, one never read from the host's disk (the materialized
            // file took 1.36 s on its first read from disk, then 0.51 s). The
            // baselines are read every round, so the cache's files are read once
            // before too, and the rows compare what each path costs here.
            quiet_disks();
            drop_caches();
            run_shell(&format!(
                "cat {} > /dev/null",
                mount.mountpoint.join(MODEL_PATH).display()
            ))?;
            quiet_disks();
            drop_caches();
            let run = run_shell(&format!(
                "cat {} > /dev/null",
                mount.mountpoint.join(MODEL_PATH).display()
            ))?;
            runs.push(run.seconds);
            // Again, the page cache warm (the kernel's copy of the mount's pages).
            let again = run_shell(&format!(
                "cat {} > /dev/null",
                mount.mountpoint.join(MODEL_PATH).display()
            ))?;
            warm.push(again.seconds);
            if extra.len() == 2 {
                let passthrough_opens = mount.stats()?["passthrough_opens"].as_u64().unwrap_or(0);
                anyhow::ensure!(passthrough_opens > 0, "the cached read did not use passthrough");
            }
        }
        if !lazy_only {
            // Nothing cached, from the local image: its blob read once before, untimed
            // (as the plain file is every round; see above), into another cache.
            let dir = w.join(format!("local-{round}"));
            run_shell(&format!("cat {}/blobs/sha256/* > /dev/null", local_image.display()))?;
            quiet_disks();
            drop_caches();
            let local = lazy_cat(&petrel, &local_image.to_string_lossy(), &dir, file_bytes, &lazy)?;
            eprintln!(
                "round {}: nothing cached, local image: {:.2} s ({} requests)",
                round + 1,
                local.seconds,
                local.requests
            );
            local_cold.push(local.seconds);
            let _ = std::fs::remove_dir_all(&dir);
        }
        if !lazy_only {
            // Before the cache goes: removing gigabytes (with `discard`) slows the disk.
            quiet_disks();
            drop_caches();
            disk.push(run_shell(&format!("cat {} > /dev/null", plain.display()))?.seconds);
            disk_warm.push(run_shell(&format!("cat {} > /dev/null", plain.display()))?.seconds);
            // The cache's files were written this round, shortly before they are read:
            // so is this copy, so a disk that reads new data slower shows in both.
            let fresh = w.join("fresh-copy");
            run_shell(&format!("cp {} {}", plain.display(), fresh.display()))?;
            quiet_disks();
            drop_caches();
            disk_fresh.push(run_shell(&format!("cat {} > /dev/null", fresh.display()))?.seconds);
            std::fs::remove_file(&fresh)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        quiet_disks();
        curl_shaped.push(curl_seconds(&format!("http://{link}"), &blobs, shaped_stored)?);
        let cat = lazy_cat(
            &petrel,
            &image(&link),
            &w.join(format!("shaped-{round}")),
            shaped_bytes,
            &lazy,
        )?;
        let _ = std::fs::remove_dir_all(w.join(format!("shaped-{round}")));
        cat_shaped.push(cat.seconds);
        requests_shaped.push(cat.requests as f64);
    }
    let random_4k = scattered(&petrel, &image(&addr), &w.join("scatter-4k"), file_bytes, 256, 4096)?;
    let random_64k = scattered(&petrel, &image(&addr), &w.join("scatter-64k"), file_bytes, 256, 65536)?;

    let mib = |bytes: u64, seconds: f64| bytes as f64 / seconds / (1 << 20) as f64;
    let (curl, cat_lazy, curl_shaped, cat_shaped) = (
        median(&curl),
        median(&cat_lazy),
        median(&curl_shaped),
        median(&cat_shaped),
    );
    let (disk, fuse_cached, passthrough) = (median(&disk), median(&fuse_cached), median(&passthrough));
    println!();
    println!(
        "one {gib} GiB model file ({stored_bytes} stored bytes in {} blobs); medians of {rounds} rounds; page cache dropped before each read",
        blobs.len()
    );
    println!("| read | time | MiB/s | vs baseline |");
    println!("|---|---:|---:|---:|");
    println!(
        "| curl of the blobs, loopback (baseline) | {curl:.2} s | {:.0} | 1.00 |",
        mib(stored_bytes, curl)
    );
    println!(
        "| petrel lazy `cat`, loopback ({:.0} requests, {:.2}x the file fetched) | {cat_lazy:.2} s | {:.0} | {:.2} of curl |",
        median(&requests),
        median(&fetched) / file_bytes as f64,
        mib(file_bytes, cat_lazy),
        curl / cat_lazy
    );
    println!(
        "| curl of the blobs' bytes behind the first {shaped_mib} MiB, {mbit} Mbit/s + {rtt_ms} ms (baseline) | {curl_shaped:.2} s | {:.1} | 1.00 |",
        mib(shaped_stored, curl_shaped)
    );
    println!(
        "| petrel lazy `head -c {shaped_mib}M`, same link ({:.0} requests) | {cat_shaped:.2} s | {:.1} | {:.2} of curl |",
        median(&requests_shaped),
        mib(shaped_bytes, cat_shaped),
        curl_shaped / cat_shaped
    );
    if !lazy_only {
        println!(
            "| `cat` of the plain file on disk (baseline) | {disk:.2} s | {:.0} | 1.00 |",
            mib(file_bytes, disk)
        );
        let local_cold = median(&local_cold);
        println!(
            "| petrel `cat`, nothing cached, local image (its blob on this disk) | {local_cold:.2} s | {:.0} | {:.2}x the time |",
            mib(file_bytes, local_cold),
            local_cold / disk
        );
        let disk_fresh = median(&disk_fresh);
        println!(
            "| `cat` of a copy of the plain file written this round (baseline, as the cache's files are) | {disk_fresh:.2} s | {:.0} | 1.00 |",
            mib(file_bytes, disk_fresh)
        );
        println!(
            "| petrel `cat`, all cached, through FUSE (read once before, as the baselines are) | {fuse_cached:.2} s | {:.0} | {:.2}x the time ({:.2}x the copy's) |",
            mib(file_bytes, fuse_cached),
            fuse_cached / disk,
            fuse_cached / disk_fresh
        );
        println!(
            "| petrel `cat`, all cached, passthrough (read once before, as the baselines are) | {passthrough:.2} s | {:.0} | {:.2}x the time ({:.2}x the copy's) |",
            mib(file_bytes, passthrough),
            passthrough / disk,
            passthrough / disk_fresh
        );
        let (disk_warm, fuse_warm, passthrough_warm) =
            (median(&disk_warm), median(&fuse_warm), median(&passthrough_warm));
        println!(
            "| `cat` of the plain file, page cache warm (baseline) | {disk_warm:.2} s | {:.0} | 1.00 |",
            mib(file_bytes, disk_warm)
        );
        println!(
            "| petrel `cat`, page cache warm, through FUSE | {fuse_warm:.2} s | {:.0} | {:.2}x the time |",
            mib(file_bytes, fuse_warm),
            fuse_warm / disk_warm
        );
        println!(
            "| petrel `cat`, page cache warm, passthrough | {passthrough_warm:.2} s | {:.0} | {:.2}x the time |",
            mib(file_bytes, passthrough_warm),
            passthrough_warm / disk_warm
        );
        println!(
            "| node cache on disk once the file is read and materialized (baseline: the file) | {:.2}x the file |||",
            median(&footprints)
        );
    }
    // Where the loopback read's time goes that curl's does not: docker-registry
    // spends CPU per request, on the same two cores as the reader.
    let (registry_curl, registry_lazy) = (median(&registry_curl), median(&registry_lazy));
    println!();
    println!("| docker-registry serving the loopback read | core-seconds | vs curl's read |");
    println!("|---|---:|---:|");
    println!(
        "| for curl ({} requests, one per blob) | {registry_curl:.2} | 1.00 |",
        blobs.len()
    );
    println!(
        "| for petrel's lazy `cat` ({:.0} requests) | {registry_lazy:.2} | {:.2} |",
        median(&requests),
        registry_lazy / registry_curl.max(0.01)
    );
    println!();
    println!("| scattered reads (256 at seeded offsets) | bytes fetched per byte read |");
    println!("|---|---:|");
    println!("| 4 KiB each | {random_4k:.1} |");
    println!("| 64 KiB each | {random_64k:.1} |");
    Ok(())
}
