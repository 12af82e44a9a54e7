//! Prefetch end to end: a profile recorded from a real workload (busybox in a
//! chroot of the mount) round-trips through optimize; the prefetch region streams
//! on mount while on-demand reads go past it; kill -9 mid-prefetch loses nothing
//! and the next run continues; a registry failing midway leaves no chunk marked
//! ready that is not.

mod support;

use petrel_fixtures::rng::Rng;
use petrel_fixtures::snapshot::{differences, scan};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::fault_proxy::{Fault, FaultProxy};
use support::*;

fn busybox_available() -> bool {
    let ok = Path::new("/bin/busybox").exists();
    if !ok {
        petrel_fixtures::report_skip("needs /bin/busybox (busybox-static, scripts/install-deps.sh)");
    }
    ok
}

fn run_ok(command: &mut std::process::Command) -> String {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{command:?}: {}", output_text(&out));
    output_text(&out)
}

/// A small root filesystem with a real binary and data the workload reads part of.
fn workload_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for d in ["bin", "data", "app"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", src.join("bin/busybox")).unwrap();
    std::fs::write(src.join("data/big.bin"), Rng::new(1).bytes(5 << 20)).unwrap();
    std::fs::write(src.join("data/unused.bin"), Rng::new(2).bytes(3 << 20)).unwrap();
    std::fs::write(src.join("app/config.txt"), b"workers = 4\n").unwrap();
    src
}

#[test]
fn a_recorded_profile_round_trips_through_optimize() {
    if !fuse_available() || !busybox_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = workload_tree(work.path());
    let image = work.path().join("image");
    run_ok(
        petrel()
            .args(["build", "--chunker", "fixed:256K", "--compression-level", "7", "-o"])
            .arg(&image)
            .arg(&src),
    );
    let profile = work.path().join("profile.json");
    let out = run_ok(
        petrel()
            .arg("record")
            .arg(&image)
            .arg("--profile")
            .arg(&profile)
            .arg("--cache-dir")
            .arg(work.path().join("cache"))
            .args(["--ready-line", "READY", "--"])
            .args([
                "/bin/busybox",
                "sh",
                "-c",
                "cat /app/config.txt; head -c 300000 /data/big.bin | wc -c; echo READY; sleep 30",
            ]),
    );
    assert!(
        out.contains("workers = 4") && out.contains("300000") && out.contains("printed its ready line"),
        "{out}"
    );
    let recorded: petrel_format::profile::Profile = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    let paths: Vec<String> = recorded.entries.iter().map(|e| e.path.clone().unwrap()).collect();
    assert_eq!(
        paths,
        ["bin/busybox", "app/config.txt", "data/big.bin"],
        "first-access order"
    );
    let big = &recorded.entries[2].ranges.as_ref().unwrap();
    assert_eq!(big[0][0], 0);
    let big_end = big.last().unwrap()[1];
    assert!(
        (300_000..5 << 20).contains(&big_end),
        "only what was read (plus readahead): {big:?}"
    );

    let optimized = work.path().join("optimized");
    run_ok(
        petrel()
            .arg("optimize")
            .arg(&image)
            .arg("--profile")
            .arg(&profile)
            .arg("-o")
            .arg(&optimized),
    );
    // Same content, byte for byte.
    run_ok(petrel().arg("unpack").arg(&image).arg(work.path().join("a")));
    run_ok(petrel().arg("unpack").arg(&optimized).arg(work.path().join("b")));
    let diffs = differences(
        &scan(&work.path().join("a")).unwrap(),
        &scan(&work.path().join("b")).unwrap(),
    );
    assert!(diffs.is_empty(), "{diffs:?}");
    // The recorded chunks lead the blob; the unread data does not.
    let summary: serde_json::Value =
        serde_json::from_str(&run_ok(petrel().arg("inspect").arg(&optimized).arg("--json"))).unwrap();
    assert_eq!(summary["prefetch_files"], 3);
    assert_eq!(
        (summary["chunker"].as_str(), summary["zstd_level"].as_u64()),
        (Some("fixed 262144"), Some(7)),
        "the image's chunker and zstd level are kept"
    );
    let prefetch = summary["prefetch_bytes"].as_u64().unwrap();
    assert!(prefetch > 300_000 && prefetch < 4 << 20, "{summary}");
    let bootstrap = std::fs::read(optimized.join("bootstrap")).unwrap();
    let reader = petrel_format::Bootstrap::open(&bootstrap).unwrap();
    let root = reader.inode(1).unwrap();
    let bin = reader.lookup(&root, b"bin").unwrap().unwrap();
    let busybox = reader.lookup(&reader.inode(bin).unwrap(), b"busybox").unwrap().unwrap();
    assert_eq!(
        reader.prefetch().next(),
        Some(busybox),
        "prefetch table in first-access order"
    );
}

/// An image whose prefetch region (`data/f0.bin` and `data/f1.bin`, 448 KiB each)
/// lies in one blob: under 1 MiB, it is no piece of its own (format-spec §14) but
/// the head of the blob the conversion ends with, read in one request. The other
/// two files are 3 MiB.
fn region_image(registry: &TestRegistry, work: &Path) -> (String, Vec<(String, Vec<u8>)>) {
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let size = if i < 2 { 448 << 10 } else { 3 << 20 };
            (format!("data/f{i}.bin"), Rng::new(70 + i).bytes(size))
        })
        .collect();
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in &files {
        w.file(path, &Default::default(), data);
    }
    petrel_fixtures::oci_layout::write_oci_layout(&work.join("layout"), "v1", &[w.finish()]).unwrap();
    registry.push_layout(&work.join("layout"), "pf", "v1");
    let list = work.join("prefetch.list");
    std::fs::write(&list, "data/f0.bin\ndata/f1.bin\n").unwrap();
    run_ok(
        petrel()
            .args([
                "convert",
                &format!("docker://{}/pf:v1", registry.addr),
                &format!("docker://{}/pf:petrel", registry.addr),
                "--chunker",
                "fixed:256K",
                "--prefetch",
            ])
            .arg(&list),
    );
    ("pf:petrel".into(), files)
}

#[test]
fn prefetch_streams_while_on_demand_reads_go_past_it() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let (reference, files) = region_image(&registry, work.path());
    let proxy = FaultProxy::start(&registry.addr);
    // The bootstrap download passes; the next blob request is the prefetch.
    proxy.plan(&[Fault::Pass, Fault::Hold]);
    let cache = work.path().join("cache");
    let mount = MountProcess::start(
        &format!("docker://{}/{reference}", proxy.addr),
        &work.path().join("mnt"),
        &cache,
        &[
            "--prefetch",
            "table",
            "--prefetch-parallel",
            "1",
            "--prefetch-request-bytes",
            "16777216",
            "--amplify-bytes",
            "0",
            // Reads must reach FUSE to be counted as prefetch hits.
            "--no-passthrough",
        ],
    );
    let started = Instant::now();
    while proxy.state.held.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the prefetch request never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The prefetch request is provably in flight (held by the proxy); an on-demand
    // read outside the prefetch region is served meanwhile.
    let mut buf = vec![0u8; 4096];
    let file = std::fs::File::open(mount.mountpoint.join(&files[3].0)).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 1 << 20).unwrap();
    assert_eq!(&buf[..], &files[3].1[1 << 20..(1 << 20) + 4096]);
    assert_eq!(proxy.state.held.load(Ordering::SeqCst), 1, "prefetch still in flight");
    proxy.state.release.store(true, Ordering::SeqCst);
    let runtime = cache.with_extension("run");
    let started = Instant::now();
    while stats(&mount.mountpoint, &runtime)["prefetch_bytes"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(started.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = stats(&mount.mountpoint, &runtime);
    for (path, data) in &files[..2] {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data);
    }
    let after = stats(&mount.mountpoint, &runtime);
    assert_eq!(
        after["backend_requests"], before["backend_requests"],
        "prefetched data needs no fetch: {after}"
    );
    assert!(after["prefetch_hits"].as_u64().unwrap() > 0, "{after}");
    assert!(
        after["prefetch_requests"].as_u64().unwrap() <= 2,
        "one large request for the region: {after}"
    );
}

/// Chunks are handed to their readers as their bytes arrive: a reader of a chunk in
/// the first half of a large prefetch request is served while the second half is
/// still held back by the registry, without a request of its own.
#[test]
fn a_reader_of_the_first_chunks_of_a_prefetch_request_does_not_wait_for_the_rest() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let (reference, files) = region_image(&registry, work.path());
    let proxy = FaultProxy::start(&registry.addr);
    // The bootstrap download passes; the next blob request is the prefetch (f0, f1).
    proxy.plan(&[Fault::Pass, Fault::HoldSecondHalf]);
    let cache = work.path().join("cache");
    let mount = MountProcess::start(
        &format!("docker://{}/{reference}", proxy.addr),
        &work.path().join("mnt"),
        &cache,
        &[
            "--prefetch-mode",
            "table",
            "--prefetch-parallel",
            "1",
            "--prefetch-request-bytes",
            "16777216",
            "--amplify-bytes",
            "0",
            "--no-passthrough",
            "--no-profile-lookup",
        ],
    );
    let started = Instant::now();
    while proxy.state.held.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the prefetch request never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let runtime = cache.with_extension("run");
    let before = stats(&mount.mountpoint, &runtime);
    let path = mount.mountpoint.join(&files[0].0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 4096).unwrap();
        let _ = tx.send(buf);
    });
    let served = rx.recv_timeout(Duration::from_secs(15));
    let still_held = proxy.state.held.load(Ordering::SeqCst);
    proxy.state.release.store(true, Ordering::SeqCst);
    let buf = served.expect("the read was served while the rest of the request was held");
    assert_eq!(still_held, 1, "the second half was still held back");
    assert!(buf[..] == files[0].1[4096..8192]);
    let after = stats(&mount.mountpoint, &runtime);
    assert_eq!(
        after["backend_requests"], before["backend_requests"],
        "served from the prefetch request, not a request of its own: {after}"
    );
}

#[test]
fn kill_9_during_prefetch_loses_nothing_and_the_next_run_continues() {
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}.bin"), Rng::new(90 + i).bytes(2 << 20)))
        .collect();
    for (path, data) in &files {
        std::fs::write(src.join(path), data).unwrap();
    }
    let image = work.path().join("image");
    run_ok(
        petrel()
            .args(["build", "--chunker", "fixed:128K", "-o"])
            .arg(&image)
            .arg(&src),
    );
    let cache = work.path().join("cache");
    let image_arg = image.to_str().unwrap().to_string();
    let mount = MountProcess::start(
        &image_arg,
        &work.path().join("mnt"),
        &cache,
        &[
            "--prefetch",
            "all",
            "--prefetch-request-bytes",
            "262144",
            "--prefetch-parallel",
            "1",
            "--prefetch-bandwidth",
            "2000000",
        ],
    );
    let runtime = cache.with_extension("run");
    let started = Instant::now();
    // Killed once a batch of what was fetched is durable (the daemon makes its
    // chunks durable once fetching pauses, or a few seconds after they came).
    let recorded = || {
        std::fs::read_dir(cache.join("packs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "idx") && e.metadata().is_ok_and(|m| m.len() > 0))
    };
    while stats(&mount.mountpoint, &runtime)["prefetch_bytes"]
        .as_u64()
        .unwrap_or(0)
        < 1 << 20
        || !recorded()
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    mount.kill_9();
    // The cache kept what was fetched; warming continues rather than restarting.
    let out = run_ok(
        petrel()
            .arg("warm")
            .arg(&image)
            .arg("--all")
            .arg("--cache-dir")
            .arg(&cache),
    );
    let already: u64 = out
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(already > 0, "{out}");
    // And every byte served from that cache is right.
    let mount = MountProcess::start(&image_arg, &work.path().join("mnt"), &cache, &["--prefetch", "off"]);
    for (path, data) in &files {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data, "{path}");
    }
    assert_eq!(stats(&mount.mountpoint, &runtime)["backend_requests"], 0);
}

#[test]
fn a_registry_failing_midway_leaves_no_chunk_marked_ready_that_is_not() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let (reference, files) = region_image(&registry, work.path());
    let proxy = FaultProxy::start(&registry.addr);
    proxy.state.cut_after.store(3, Ordering::SeqCst);
    let cache = work.path().join("cache");
    let image = format!("docker://{}/{reference}", proxy.addr);
    let out = petrel()
        .arg("warm")
        .arg(&image)
        .args([
            "--all",
            "--request-bytes",
            "524288",
            "--parallel",
            "2",
            "--retries",
            "2",
            "--retry-seconds",
            "2",
            "--cache-dir",
        ])
        .arg(&cache)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the registry failed midway: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("run petrel warm again"),
        "{}",
        output_text(&out)
    );
    // With the registry healthy again, everything read (cached or not) is right.
    proxy.state.cut_after.store(0, Ordering::SeqCst);
    let mount = MountProcess::start(&image, &work.path().join("mnt"), &cache, &["--prefetch", "off"]);
    for (path, data) in &files {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data, "{path}");
    }
}

/// Waits until the mount's prefetcher has fetched at least `bytes` and is quiet.
fn wait_prefetched(mountpoint: &Path, runtime: &Path, bytes: u64) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let now = stats(mountpoint, runtime);
        if now["prefetch_bytes"].as_u64().unwrap_or(0) >= bytes {
            std::thread::sleep(Duration::from_millis(300));
            return stats(mountpoint, runtime);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never prefetched {bytes}: {now}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `count` files of 2 MiB of seeded random bytes, `dir/f<i>.bin`.
fn two_mib_files(count: u64, dir: &str, seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| (format!("{dir}/f{i}.bin"), Rng::new(seed + i).bytes(2 << 20)))
        .collect()
}

/// An image of `files` pushed to `registry` as `repo:v1` and converted there to
/// `repo:petrel`, whose reference it returns.
fn converted_image(registry: &TestRegistry, work: &Path, repo: &str, files: &[(String, Vec<u8>)]) -> String {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in files {
        w.file(path, &Default::default(), data);
    }
    let layout = work.join(format!("layout-{repo}"));
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[w.finish()]).unwrap();
    registry.push_layout(&layout, repo, "v1");
    let image = format!("docker://{}/{repo}:petrel", registry.addr);
    run_ok(petrel().args(["convert", &format!("docker://{}/{repo}:v1", registry.addr), &image]));
    image
}

/// A profile recorded once helps an image that was not converted with it: published
/// to the registry as an OCI referrer of the image (`petrel profile push`; Debian's
/// docker-registry has no referrers API, so through the `sha256-<hex>` tag), found by
/// a plain `petrel mount`, whose reads of the profiled files then need no fetch while
/// the rest of the image stays unfetched. `--no-profile-lookup` turns the lookup off,
/// and `--profile FILE` gives the same profile by hand.
#[test]
fn a_published_profile_is_found_and_prefetched_on_an_image_not_built_for_it() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let files = two_mib_files(8, "data", 300);
    let image = converted_image(&registry, work.path(), "plain", &files);

    let pull = petrel().args(["profile", "pull", &image]).output().unwrap();
    assert_eq!(pull.status.code(), Some(1), "{}", output_text(&pull));
    assert!(
        output_text(&pull).contains("no profile is published"),
        "{}",
        output_text(&pull)
    );

    let profile = work.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"petrel_profile": 1, "entries": [
            {"path": "data/f5.bin"},
            {"path": "data/f2.bin", "ranges": [[0, 524288]]},
            {"path": "not/in/the/image"}]}"#,
    )
    .unwrap();
    let pushed = run_ok(petrel().args(["profile", "push", &image]).arg(&profile));
    assert!(pushed.contains("sha256:"), "{pushed}");
    let pulled: petrel_format::profile::Profile =
        serde_json::from_str(&run_ok(petrel().args(["profile", "pull", &image]))).unwrap();
    assert_eq!(pulled.entries.len(), 3);
    assert_eq!(pulled.entries[1].ranges, Some(vec![[0, 524288]]));
    assert!(pulled.image.is_some(), "the push names the image the profile is for");

    let wanted = (2u64 << 20) + (512 << 10);
    for (name, extra) in [
        ("found", vec!["--prefetch-mode", "off", "--no-passthrough"]),
        (
            "given",
            vec![
                "--prefetch-mode",
                "off",
                "--no-passthrough",
                "--no-profile-lookup",
                "--profile",
                profile.to_str().unwrap(),
            ],
        ),
    ] {
        let cache = work.path().join(format!("cache-{name}"));
        let runtime = cache.with_extension("run");
        let mount = MountProcess::start(&image, &work.path().join(format!("mnt-{name}")), &cache, &extra);
        let before = wait_prefetched(&mount.mountpoint, &runtime, wanted);
        assert!(
            before["backend_bytes"].as_u64().unwrap() < wanted + (2 << 20),
            "{name}: only the profiled files were prefetched: {before}"
        );
        assert_eq!(std::fs::read(mount.mountpoint.join(&files[5].0)).unwrap(), files[5].1);
        let head = std::fs::File::open(mount.mountpoint.join(&files[2].0)).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        std::os::unix::fs::FileExt::read_exact_at(&head, &mut buf, 0).unwrap();
        assert!(buf[..] == files[2].1[..256 << 10]);
        let after = stats(&mount.mountpoint, &runtime);
        assert_eq!(
            after["backend_requests"], before["backend_requests"],
            "{name}: the profiled reads needed no fetch: {after}"
        );
    }

    let cache = work.path().join("cache-off");
    let runtime = cache.with_extension("run");
    let mount = MountProcess::start(
        &image,
        &work.path().join("mnt-off"),
        &cache,
        &["--prefetch-mode", "off", "--no-profile-lookup"],
    );
    assert_eq!(std::fs::read(mount.mountpoint.join(&files[0].0)).unwrap(), files[0].1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stats(&mount.mountpoint, &runtime)["prefetch_requests"],
        0,
        "no lookup, no profile prefetch"
    );
}

/// Where the registry has the referrers API (OCI distribution 1.1), a profile is
/// published as a referrer through it, without the `sha256-<hex>` fallback tag, and
/// a plain `petrel mount` finds it by the API and prefetches what it names.
#[test]
fn a_profile_is_published_and_found_by_the_referrers_api_where_the_registry_has_one() {
    if !registry_tools_available() || !referrers_registry_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start_with_referrers_api();
    let work = tempfile::tempdir().unwrap();
    let files = two_mib_files(6, "data", 700);
    let image = converted_image(&registry, work.path(), "plain", &files);
    let profile = work.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"petrel_profile": 1, "entries": [{"path": "data/f3.bin"}, {"path": "data/f1.bin"}]}"#,
    )
    .unwrap();
    let pushed = run_ok(petrel().args(["profile", "push", &image]).arg(&profile));
    let artifact = pushed.lines().next().unwrap_or_default().trim().to_string();
    assert!(artifact.starts_with("sha256:"), "the artifact's digest: {pushed}");

    // The registry lists the artifact as a referrer of the image; no fallback tag.
    let curl = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-H"])
            .arg("Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
            .arg(format!("http://{}{path}", registry.addr))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (body.to_string(), code.to_string())
    };
    let manifest_sum = run_ok(std::process::Command::new("sh").arg("-c").arg(format!(
        "curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://{}/v2/plain/manifests/petrel | sha256sum",
        registry.addr
    )));
    let digest = format!("sha256:{}", manifest_sum.split_whitespace().next().unwrap());
    let (listed, code) = curl(&format!("/v2/plain/referrers/{digest}"));
    assert_eq!(code, "200", "{listed}");
    assert!(
        listed.contains(&artifact),
        "the referrers API lists {artifact}: {listed}"
    );
    let (_, code) = curl(&format!("/v2/plain/manifests/{}", digest.replace(':', "-")));
    assert_eq!(code, "404", "no fallback tag where the API answers");

    let cache = work.path().join("cache");
    let runtime = cache.with_extension("run");
    let mount = MountProcess::start(
        &image,
        &work.path().join("mnt"),
        &cache,
        &["--prefetch-mode", "off", "--no-passthrough"],
    );
    let wanted = 2 * (2u64 << 20);
    let before = wait_prefetched(&mount.mountpoint, &runtime, wanted);
    for i in [3, 1] {
        assert_eq!(std::fs::read(mount.mountpoint.join(&files[i].0)).unwrap(), files[i].1);
    }
    let after = stats(&mount.mountpoint, &runtime);
    assert_eq!(
        after["backend_requests"], before["backend_requests"],
        "the profiled files needed no fetch: {after}"
    );
}

/// Opt-in, a node records an image's first start and publishes it: the first mount
/// (`--record-first-start 1 --publish-profile`) finds no profile, records the files
/// and ranges read in the second after its first read, keeps the profile in its cache
/// and publishes it as a referrer of the image; a second node's plain mount finds it
/// and prefetches those reads. The profile names paths and ranges, never content.
#[test]
fn a_recorded_first_start_is_published_and_prefetched_by_the_next_node() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let files = two_mib_files(6, "app", 600);
    let image = converted_image(&registry, work.path(), "first", &files);

    let cache = work.path().join("cache-1");
    {
        let mount = MountProcess::start(
            &image,
            &work.path().join("mnt-1"),
            &cache,
            &[
                "--record-first-start",
                "1",
                "--publish-profile",
                "--prefetch-mode",
                "off",
            ],
        );
        // The start: two files whole, the head of a third.
        for (path, data) in &files[1..3] {
            assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data);
        }
        let head = std::fs::File::open(mount.mountpoint.join(&files[4].0)).unwrap();
        let mut buf = vec![0u8; 100_000];
        std::os::unix::fs::FileExt::read_exact_at(&head, &mut buf, 0).unwrap();
        let started = Instant::now();
        loop {
            let pulled = petrel().args(["profile", "pull", &image]).output().unwrap();
            if pulled.status.success() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "never published: {}",
                std::fs::read_to_string(cache.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let kept: Vec<_> = std::fs::read_dir(cache.join("profiles")).unwrap().flatten().collect();
    assert_eq!(kept.len(), 1, "the profile is kept in the node cache");
    let profile: petrel_format::profile::Profile =
        serde_json::from_str(&run_ok(petrel().args(["profile", "pull", &image]))).unwrap();
    let paths: Vec<&str> = profile.entries.iter().filter_map(|e| e.path.as_deref()).collect();
    assert_eq!(paths, ["app/f1.bin", "app/f2.bin", "app/f4.bin"], "{profile:?}");
    let text = serde_json::to_string(&profile).unwrap();
    assert!(text.len() < 4096, "paths and ranges only: {text}");

    let cache = work.path().join("cache-2");
    let runtime = cache.with_extension("run");
    let mount = MountProcess::start(&image, &work.path().join("mnt-2"), &cache, &["--prefetch-mode", "off"]);
    let before = wait_prefetched(&mount.mountpoint, &runtime, 4 << 20);
    for (path, data) in &files[1..3] {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data);
    }
    let after = stats(&mount.mountpoint, &runtime);
    assert_eq!(
        after["backend_requests"], before["backend_requests"],
        "the second node's start was prefetched: {after}"
    );
}
