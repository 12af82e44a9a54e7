//! The node-wide chunk cache: images that share chunks fetch them once; a cache
//! bound far below the image stays correct under 64 concurrent readers while
//! eviction runs; kill -9 during appends, compaction and GC leaves only correct
//! data; ls and rm.

mod support;

use petrel_fixtures::rng::Rng;
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use support::*;

fn build(dir: &Path, name: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    for (path, data) in files {
        std::fs::write(src.join(path), data).unwrap();
    }
    let image = dir.join(name);
    let out = petrel().arg("build").arg("-o").arg(&image).arg(&src).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    image
}

fn file(i: u64) -> (String, Vec<u8>) {
    (format!("f{i}.bin"), Rng::new(500 + i).bytes(2 << 20))
}

/// Reads every file through `mount` and checks its bytes.
fn reads_every_file(mount: &MountProcess, files: &[(String, Vec<u8>)]) {
    for (path, data) in files {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data, "{path}");
    }
}

/// `petrel cache verify` of `cache`: it exits 0 (nothing bad); its report.
fn verify_clean(cache: &Path) -> serde_json::Value {
    let out = petrel()
        .args(["cache", "verify", "--cache-dir"])
        .arg(cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
}

fn chunk_digests(image: &Path) -> Vec<([u8; 32], u64)> {
    let bytes = std::fs::read(image.join("bootstrap")).unwrap();
    let bootstrap = petrel_format::Bootstrap::open(&bytes).unwrap();
    (0..bootstrap.chunk_count())
        .map(|i| bootstrap.chunk(i).unwrap())
        .map(|c| (c.digest, u64::from(c.compressed_size)))
        .collect()
}

#[test]
fn two_images_sharing_chunks_fetch_each_shared_chunk_once() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let a_files: Vec<_> = (0..4).map(file).collect();
    let b_files: Vec<_> = (2..6).map(file).collect();
    let (a, b) = (build(work.path(), "a", &a_files), build(work.path(), "b", &b_files));
    let a_chunks: HashSet<[u8; 32]> = chunk_digests(&a).into_iter().map(|(d, _)| d).collect();
    let b_only = chunk_digests(&b)
        .into_iter()
        .filter(|(d, _)| !a_chunks.contains(d))
        .count() as u64;
    let cache = work.path().join("cache");
    let args = ["--amplify-bytes", "0", "--prefetch", "off"];
    let mount_a = MountProcess::start(a.to_str().unwrap(), &work.path().join("mnt-a"), &cache, &args);
    let mount_b = MountProcess::start(
        b.to_str().unwrap(),
        &work.path().join("mnt-b"),
        &cache.with_file_name("cache"),
        &args,
    );
    for (path, data) in &a_files {
        assert_eq!(&std::fs::read(mount_a.mountpoint.join(path)).unwrap(), data);
    }
    // A's reads were answered before its chunks were stored: wait until they are.
    let started = std::time::Instant::now();
    loop {
        let out = petrel()
            .args(["cache", "ls", "--json", "--cache-dir"])
            .arg(&cache)
            .output()
            .unwrap();
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if listing["chunks"].as_u64().unwrap_or(0) >= a_chunks.len() as u64 {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{listing}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for (path, data) in &b_files {
        assert_eq!(&std::fs::read(mount_b.mountpoint.join(path)).unwrap(), data);
    }
    let b_stats = stats(&mount_b.mountpoint, &cache.with_extension("run"));
    assert_eq!(
        b_stats["chunks_fetched"].as_u64().unwrap(),
        b_only,
        "B fetched only what A had not: {b_stats}"
    );
}

/// 64 readers over two images that share chunks, two daemons on one cache bounded
/// to 1 MiB (far below either image): every byte read is right while eviction and
/// compaction run under them.
#[test]
fn a_cache_smaller_than_the_image_stays_correct_under_concurrent_readers() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..6).map(file).collect();
    let other_files: Vec<_> = (3..9).map(file).collect();
    let image = build(work.path(), "big", &files);
    let other_image = build(work.path(), "other", &other_files);
    let cache = work.path().join("cache");
    let limit = 1u64 << 20;
    let args = ["--cache-max-bytes", &limit.to_string(), "--prefetch", "off"];
    let mount = MountProcess::start(image.to_str().unwrap(), &work.path().join("mnt"), &cache, &args);
    let other_mount = MountProcess::start(
        other_image.to_str().unwrap(),
        &work.path().join("mnt-other"),
        &cache,
        &args,
    );
    let (root, other_root) = (mount.mountpoint.clone(), other_mount.mountpoint.clone());
    std::thread::scope(|scope| {
        for t in 0..64u64 {
            let (root, files) = match t % 2 {
                0 => (&root, &files),
                _ => (&other_root, &other_files),
            };
            scope.spawn(move || {
                let mut rng = Rng::new(t);
                for _ in 0..30 {
                    let (path, data) = &files[rng.below(files.len() as u64) as usize];
                    let offset = rng.below(data.len() as u64 - 1);
                    let mut buf = vec![0u8; (1 + rng.below(200_000)) as usize];
                    let got = std::fs::File::open(root.join(path))
                        .unwrap()
                        .read_at(&mut buf, offset)
                        .unwrap();
                    assert_eq!(
                        &buf[..got],
                        &data[offset as usize..offset as usize + got],
                        "{path} at {offset}"
                    );
                }
            });
        }
    });
    drop(other_mount);
    // Eviction runs in the background: the bound holds once it has caught up.
    let image_bytes: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let stored = || cache_bytes(&cache);
    let started = std::time::Instant::now();
    while stored() >= image_bytes / 3 && started.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stored = stored();
    assert!(
        stored < image_bytes / 3,
        "the bound holds roughly: {stored} of {image_bytes}"
    );
    drop(mount);
}

/// The bytes of the cache's packs, from `petrel cache ls`.
fn cache_bytes(cache: &Path) -> u64 {
    let out = petrel()
        .args(["cache", "ls", "--json", "--cache-dir"])
        .arg(cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listing["bytes"].as_u64().unwrap()
}

/// A bounded daemon keeps the bound over what other processes store too: here a
/// `petrel warm` that filled the cache with a whole image and exited (a daemon that
/// stopped before its own eviction caught up leaves the same). The daemon then still
/// reads its own files right.
#[test]
fn a_bounded_daemon_evicts_what_another_process_stored() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..2).map(file).collect();
    let other_files: Vec<_> = (10..14).map(file).collect();
    let image = build(work.path(), "bounded", &files);
    let other_image = build(work.path(), "filler", &other_files);
    let cache = work.path().join("cache");
    let limit = 1u64 << 20;
    let mount = MountProcess::start(
        image.to_str().unwrap(),
        &work.path().join("mnt"),
        &cache,
        &["--cache-max-bytes", &limit.to_string(), "--prefetch", "off"],
    );
    let out = petrel()
        .arg("warm")
        .arg(&other_image)
        .arg("--all")
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let filled = cache_bytes(&cache);
    assert!(filled >= 6 << 20, "warm stored the other image: {filled} bytes");
    // The daemon looks at the cache in the background, every few seconds.
    let started = std::time::Instant::now();
    let mut stored = filled;
    while stored > 2 * limit && started.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        stored = cache_bytes(&cache);
    }
    assert!(
        stored <= 2 * limit,
        "the daemon brought {filled} bytes other processes stored down to its bound {limit}: {stored} left"
    );
    reads_every_file(&mount, &files);
    verify_clean(&cache);
}

#[test]
fn kill_9_during_gc_leaves_only_correct_data_and_rm_removes_an_image() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..5).map(file).collect();
    let image = build(work.path(), "img", &files);
    let cache = work.path().join("cache");
    for attempt in 0..3u64 {
        let out = petrel()
            .arg("warm")
            .arg(&image)
            .arg("--all")
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        let mut gc = petrel()
            .args(["cache", "gc", "--max-bytes", "0", "--cache-dir"])
            .arg(&cache)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5 * attempt));
        let _ = gc.kill();
        let _ = gc.wait();
        let mount = MountProcess::start(
            image.to_str().unwrap(),
            &work.path().join("mnt"),
            &cache,
            &["--prefetch", "off"],
        );
        reads_every_file(&mount, &files);
    }
    let out = petrel()
        .args(["cache", "ls", "--json", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = listing["images"][0]["bootstrap"].as_str().unwrap().to_string();
    assert_eq!(
        listing["images"][0]["chunks_cached"], listing["images"][0]["chunks"],
        "{listing}"
    );
    let materialized = || {
        std::fs::read_dir(cache.join("files"))
            .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
            .unwrap_or(0)
    };
    // Read again, twice: every chunk is cached now and the files are used again, so
    // (with kernel passthrough) they are materialized.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut version = release.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let passthrough_kernel = (version.next().unwrap_or(0), version.next().unwrap_or(0)) >= (6, 9);
    {
        let mount = MountProcess::start(
            image.to_str().unwrap(),
            &work.path().join("mnt"),
            &cache,
            &["--prefetch", "off"],
        );
        reads_every_file(&mount, &files);
        reads_every_file(&mount, &files);
        let started = std::time::Instant::now();
        while passthrough_kernel && materialized() == 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "no materialized files"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let out = petrel()
        .args(["cache", "rm", &name[..12], "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let out = petrel()
        .args(["cache", "ls", "--json", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listing["images"].as_array().unwrap().len(), 0);
    assert_eq!(listing["chunks"], 0, "{listing}");
    // Files the mounts materialized for passthrough went with the image.
    assert_eq!(materialized(), 0, "materialized files left behind");
}

/// kill -9 while a warm appends chunks, and while GC moves the chunks a pinned image
/// needs out of the packs it removes (compaction): after each, `cache verify`
/// re-hashes every cached chunk and finds nothing bad (a torn append leaves
/// unreferenced bytes, never an index entry for bytes that are not there), the
/// pinned image stays whole, and both images read right from what is left.
#[test]
fn kill_9_during_appends_and_compaction_leaves_a_cache_that_verifies() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    // The loose image (16 MiB) shares three files with the pinned one.
    let loose_files: Vec<_> = (3..11).map(file).collect();
    let pinned_files: Vec<_> = (0..6).map(file).collect();
    let loose = build(work.path(), "loose", &loose_files);
    let pinned = build(work.path(), "pinned", &pinned_files);
    let cache = work.path().join("cache");
    let run = |args: &[&str]| {
        let out = petrel().args(args).arg("--cache-dir").arg(&cache).output().unwrap();
        assert!(out.status.success(), "petrel {args:?}: {}", output_text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    // Killed once `started` holds (polled every 200 µs) and then `delay` has passed,
    // or once it exits of itself.
    let killed_after = |args: &[&str], started: &dyn Fn() -> bool, delay: std::time::Duration| {
        let mut child = petrel()
            .args(args)
            .arg("--cache-dir")
            .arg(&cache)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while !started() && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
    };
    let (loose_path, pinned_path) = (loose.to_str().unwrap(), pinned.to_str().unwrap());
    let cached_chunks = || {
        let listing: serde_json::Value = serde_json::from_str(&run(&["cache", "ls", "--json"])).unwrap();
        listing["chunks"].as_u64().unwrap()
    };
    let loose_chunks = chunk_digests(&loose).len() as u64;
    let (mut moved, mut torn_warms) = (0, 0);
    let rounds = 6u64;
    for round in 0..rounds {
        // Killed once its first bytes are appended, or a little later: a warm of
        // the loose image appends for about 40 ms in a debug build.
        let delay = std::time::Duration::from_millis(3 * round);
        // The loose image's pack ends up holding the shared files' chunks.
        killed_after(&["warm", loose_path, "--all"], &|| pack_bytes(&cache) > 0, delay);
        let report = verify_clean(&cache);
        assert_eq!(report["chunks_bad"], 0, "after a warm killed at {delay:?}: {report}");
        let chunks = cached_chunks();
        // Bytes appended, not all of them named yet (or at all): a torn append.
        torn_warms += u64::from(pack_bytes(&cache) > 0 && chunks < loose_chunks);
        // A GC takes about 20 ms, most of it starting up.
        let delay = std::time::Duration::from_millis(4 + 3 * round);
        run(&["warm", loose_path, "--all"]);
        run(&["warm", pinned_path, "--all", "--pin"]);
        // GC to nothing removes the loose pack, moving the pinned chunks out first.
        killed_after(&["cache", "gc", "--max-bytes", "0"], &|| true, delay);
        let report = verify_clean(&cache);
        assert_eq!(report["chunks_bad"], 0, "after a GC killed at {delay:?}: {report}");
        let gc: serde_json::Value = serde_json::from_str(&run(&["cache", "gc", "--max-bytes", "0"])).unwrap();
        moved += gc["pinned_kept"].as_u64().unwrap();
        let report = verify_clean(&cache);
        assert!(report["chunks_checked"].as_u64().unwrap() > 0, "{report}");
        let listing: serde_json::Value = serde_json::from_str(&run(&["cache", "ls", "--json"])).unwrap();
        let images = listing["images"].as_array().unwrap();
        let kept = images
            .iter()
            .find(|i| i["pinned"] == true)
            .expect("the pinned image is listed");
        assert_eq!(
            kept["chunks_cached"], kept["chunks"],
            "the pinned image is whole: {listing}"
        );
        if round + 1 < rounds {
            // Released, so that the next round's loose pack holds the shared chunks again.
            run(&["cache", "rm", &kept["bootstrap"].as_str().unwrap()[..16]]);
            run(&["cache", "gc", "--max-bytes", "0"]);
        }
    }
    assert!(moved > 0, "GC never moved a pinned chunk: compaction went untested");
    assert!(torn_warms > 0, "no warm was killed while it appended");
    for (image, files) in [(pinned_path, &pinned_files), (loose_path, &loose_files)] {
        let mount = MountProcess::start(image, &work.path().join("mnt"), &cache, &["--prefetch", "off"]);
        reads_every_file(&mount, files);
    }
    let report = verify_clean(&cache);
    assert_eq!(report["chunks_bad"], 0, "{report}");
}

/// `petrel warm --pin` keeps an image's chunks whatever the cache bound (GC to zero
/// leaves them), `cache ls` says so, and `cache rm` releases them.
#[test]
fn a_pinned_warm_survives_gc_until_it_is_removed() {
    let work = tempfile::tempdir().unwrap();
    let pinned = build(work.path(), "pinned", &[file(1), file(2)]);
    let loose = build(work.path(), "loose", &[file(3)]);
    let cache = work.path().join("cache");
    let petrel_cache = |args: &[&str]| {
        let out = petrel()
            .arg("cache")
            .args(args)
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    for (image, extra) in [(&pinned, &["--pin"][..]), (&loose, &[][..])] {
        let out = petrel()
            .arg("warm")
            .arg(image)
            .args(["--all", "--cache-dir"])
            .arg(&cache)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let listing: serde_json::Value = serde_json::from_str(&petrel_cache(&["ls", "--json"])).unwrap();
    let images = listing["images"].as_array().unwrap();
    assert_eq!(images.iter().filter(|i| i["pinned"] == true).count(), 1, "{listing}");
    let pinned_image = images.iter().find(|i| i["pinned"] == true).unwrap()["bootstrap"]
        .as_str()
        .unwrap()
        .to_string();

    petrel_cache(&["gc", "--max-bytes", "0"]);
    let listing: serde_json::Value = serde_json::from_str(&petrel_cache(&["ls", "--json"])).unwrap();
    for image in listing["images"].as_array().unwrap() {
        let cached = image["chunks_cached"].as_u64().unwrap();
        if image["bootstrap"] == pinned_image.as_str() {
            assert_eq!(
                cached,
                image["chunks"].as_u64().unwrap(),
                "the pinned image is whole: {listing}"
            );
        } else {
            assert_eq!(cached, 0, "the other image was evicted: {listing}");
        }
    }
    let said = petrel_cache(&["rm", &pinned_image[..16]]);
    assert!(said.contains("released its pin"), "{said}");
    petrel_cache(&["gc", "--max-bytes", "0"]);
    let listing: serde_json::Value = serde_json::from_str(&petrel_cache(&["ls", "--json"])).unwrap();
    assert_eq!(listing["chunks"], 0, "{listing}");
}

/// Bytes of the pack files under `cache/packs` (chunk and file packs alike).
fn pack_bytes(cache: &Path) -> u64 {
    std::fs::read_dir(cache.join("packs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes of every file under `dir` (links not followed).
fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((std::fs::symlink_metadata(e.path()).ok()?, e.path())))
        .map(|(meta, path)| match meta.is_dir() {
            true => tree_bytes(&path),
            false if meta.is_file() => meta.len(),
            false => 0,
        })
        .sum()
}

/// Materialized files under `cache/files` that resolve to a file.
fn materialized_files(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("files"))
        .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0)
}

/// A file read and opened again is materialized for passthrough as a file pack, the
/// cache's only copy of its chunks: what it replaced is compacted away (the cache
/// stays within 1.1x the image's data), and both the chunks compaction moved (read
/// through FUSE) and the backing files serve a new daemon the right bytes. A daemon
/// killed with SIGKILL at any moment of that (materializing, compacting) leaves a
/// cache that `cache verify` finds clean and that serves the right bytes.
#[test]
fn a_materialized_file_is_the_only_copy_of_its_chunks_and_compaction_keeps_every_byte() {
    if !fuse_available() {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut version = release.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    if (version.next().unwrap_or(0), version.next().unwrap_or(0)) < (6, 9) {
        petrel_fixtures::report_skip("needs FUSE passthrough (Linux 6.9+)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    // Large files (materialized) between small ones (kept in chunk packs), so the
    // packs the large files' chunks leave also hold chunks that must move.
    let files: Vec<(String, Vec<u8>)> = (0..12u64)
        .map(|i| {
            let size = if i % 3 == 1 { 3 << 20 } else { 40 << 10 };
            (format!("f{i:02}.bin"), Rng::new(900 + i).bytes(size))
        })
        .collect();
    let image = build(work.path(), "img", &files);
    let data: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let large = files.iter().filter(|(_, d)| d.len() > 1 << 20).count();
    let read_all = |mount: &MountProcess| reads_every_file(mount, &files);
    let args = ["--prefetch", "off", "--readahead-dir-bytes", "0"];
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "{what}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let cache = work.path().join("cache");
    {
        let mount = MountProcess::start(image.to_str().unwrap(), &work.path().join("mnt"), &cache, &args);
        read_all(&mount);
        // (A reader is answered before its fetch is stored.)
        wait_for("every chunk is stored once read", &|| pack_bytes(&cache) >= data);
        // Opened again, every chunk cached: materialized in the background.
        read_all(&mount);
        wait_for("materializing the large files", &|| materialized_files(&cache) == large);
        wait_for(
            &format!(
                "compaction: a {} byte cache for {data} bytes of files",
                tree_bytes(&cache)
            ),
            &|| tree_bytes(&cache) * 10 <= data * 11,
        );
    }
    let mount = MountProcess::start(image.to_str().unwrap(), &work.path().join("mnt"), &cache, &args);
    read_all(&mount);
    let stats = stats(&mount.mountpoint, &cache.with_extension("run"));
    assert_eq!(stats["backend_requests"], 0, "nothing fetched again: {stats}");
    drop(mount);
    let report = verify_clean(&cache);
    assert_eq!(report["files_checked"], large as u64, "{report}");

    for (attempt, delay) in [0u64, 30, 150, 600].into_iter().enumerate() {
        let cache = work.path().join(format!("cache-{attempt}"));
        let mount = MountProcess::start(image.to_str().unwrap(), &work.path().join("mnt"), &cache, &args);
        read_all(&mount);
        read_all(&mount);
        std::thread::sleep(std::time::Duration::from_millis(delay));
        mount.kill_9();
        verify_clean(&cache);
        let mount = MountProcess::start(image.to_str().unwrap(), &work.path().join("mnt"), &cache, &args);
        read_all(&mount);
        read_all(&mount);
        drop(mount);
        let report = verify_clean(&cache);
        assert_eq!(report["chunks_bad"], 0, "{report}");
    }
}

/// Unmounts (lazily) a file system this test mounted, when dropped.
struct MountedTmpfs(PathBuf);

impl MountedTmpfs {
    fn new(at: &Path, options: &std::ffi::CStr) -> Self {
        std::fs::create_dir_all(at).unwrap();
        rustix::mount::mount("tmpfs", at, "tmpfs", rustix::mount::MountFlags::empty(), options).unwrap();
        MountedTmpfs(at.to_path_buf())
    }
}

impl Drop for MountedTmpfs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// A cache disk that fills up (ENOSPC in the middle of appending a batch, of writing
/// a file pack) costs caching, never a read: every byte is still right, the daemon
/// says why it could not cache, and what the cache does hold verifies clean.
#[test]
fn a_full_cache_disk_fails_caching_never_a_read() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..6).map(file).collect();
    let image = build(work.path(), "img", &files);
    // 3 MiB for a 12 MiB image; the daemon's log and runtime directory live beside it.
    let cache = work.path().join("cache");
    let _disk = MountedTmpfs::new(&cache, c"size=3m");
    {
        let mount = MountProcess::start(
            image.to_str().unwrap(),
            &work.path().join("mnt"),
            &cache,
            &["--prefetch", "off"],
        );
        for _ in 0..2 {
            reads_every_file(&mount, &files);
        }
        let stats = stats(&mount.mountpoint, &cache.with_extension("run"));
        assert!(stats["cache_put_failures"].as_u64().unwrap() > 0, "{stats}");
    }
    let log = std::fs::read_to_string(cache.with_extension("log")).unwrap();
    assert!(
        log.contains("could not cache") && log.contains("No space left on device"),
        "{log}"
    );
    let out = petrel()
        .args(["cache", "verify", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["chunks_checked"].as_u64().unwrap() > 0, "{report}");
}
