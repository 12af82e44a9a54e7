//! petrel against a real registry: convert images registry → registry (with and
//! without auth), mount them from the registry and compare every file with the
//! original image's merged tree; faults injected by a real proxy never yield wrong
//! bytes; bad manifests and bootstraps are refused before anything is mounted.

mod support;

use petrel_fixtures::edge_cases::{edge_case_expected, edge_case_layers};
use petrel_fixtures::layer_spec::{reference_merge, write_layer};
use petrel_fixtures::oci_layout::write_oci_layout;
use petrel_fixtures::sample::sample_layers;
use petrel_fixtures::snapshot::{differences, scan, Snapshot};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use support::fault_proxy::{Fault, FaultProxy};
use support::*;

fn assert_tree(expected: &Snapshot, root: &Path) {
    let diffs = differences(expected, &scan(root).unwrap());
    assert!(diffs.is_empty(), "{} differences:\n{}", diffs.len(), diffs.join("\n"));
}

fn convert(from: &str, to: &str, creds: Option<&str>) -> serde_json::Value {
    let mut command = petrel();
    command.arg("convert").arg(from).arg(to).arg("--json");
    if let Some(creds) = creds {
        command.env("PETREL_CREDS", creds);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "convert {from} -> {to}: {}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn skopeo_inspect(image: &str, creds: Option<&str>) -> serde_json::Value {
    let mut command = std::process::Command::new("skopeo");
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some(creds) = creds {
        command.arg("--creds").arg(creds);
    }
    let out = command.arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn edge_layers() -> Vec<Vec<u8>> {
    edge_case_layers().into_iter().map(|l| l.tar).collect()
}

#[test]
fn edge_cases_convert_and_mount_from_a_registry() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    write_oci_layout(&work.path().join("layout"), "v1", &edge_layers()).unwrap();
    registry.push_layout(&work.path().join("layout"), "edge", "v1");
    let source = format!("docker://{}/edge:v1", registry.addr);
    let target = format!("docker://{}/edge:v1-petrel", registry.addr);
    let summary = convert(&source, &target, None);
    let manifest = skopeo_inspect(&target, None);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.last().unwrap()["annotations"]["dev.petrel.layer"], "bootstrap");
    assert_eq!(
        layers.last().unwrap()["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert!(summary["manifests"][0]["files"].as_u64().unwrap() > 50, "{summary}");

    let mount = MountProcess::start(&target, &work.path().join("mnt"), &work.path().join("cache"), &[]);
    assert_tree(&edge_case_expected(), &mount.mountpoint);
}

#[test]
fn basic_auth_multi_layer_image_converts_mounts_and_reconverts_cheaply() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(true);
    let creds = registry.creds().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layers = sample_layers();
    let tars: Vec<Vec<u8>> = layers.iter().map(|ops| write_layer(ops, "")).collect();
    write_oci_layout(&work.path().join("layout"), "v1", &tars).unwrap();
    registry.push_layout(&work.path().join("layout"), "team/app", "v1");
    let source = format!("docker://{}/team/app:v1", registry.addr);
    let target = format!("docker://{}/team/app:v1-petrel", registry.addr);

    // Without credentials: a clear refusal that names no secret.
    let out = petrel().args(["convert", &source, &target]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = output_text(&out);
    assert!(text.contains("authentication") || text.contains("401"), "{text}");
    // Wrong password: refused, and the password is not printed.
    let out = petrel()
        .args(["convert", &source, &target])
        .env("PETREL_CREDS", "petrel:wrong-password-123")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !output_text(&out).contains("wrong-password-123"),
        "{}",
        output_text(&out)
    );
    // Credentials on the command line (readable by every local user in /proc) are
    // refused, without repeating them.
    let out = petrel()
        .args(["convert", &source, &target, "--creds", "petrel:wrong-password-123"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = output_text(&out);
    assert!(
        said.contains("take a file holding USER:PASSWORD") && !said.contains("wrong-password-123"),
        "{said}"
    );

    let first = convert(&source, &target, Some(&creds));
    let converted = &first["manifests"][0];
    assert!(converted["uploaded_bytes"].as_u64().unwrap() > 1 << 20);
    skopeo_inspect(&target, Some(&creds));

    // The same conversion again is recognised; to another tag it uploads nothing.
    let again = convert(&source, &target, Some(&creds));
    assert_eq!(again["manifests"][0]["reused"], true);
    assert_eq!(again["digest"], first["digest"]);
    let other = convert(
        &source,
        &format!("docker://{}/team/app:v1-copy", registry.addr),
        Some(&creds),
    );
    assert_eq!(other["manifests"][0]["uploaded_bytes"], 0, "{other}");
    assert_eq!(other["digest"], first["digest"], "conversions are deterministic");

    // Mount with credentials, compare with the reference merge.
    let mount = MountProcess::start(
        &target,
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &["--creds", &registry.creds_file().unwrap()],
    );
    assert_tree(&reference_merge(&layers), &mount.mountpoint);
}

#[test]
fn oci_layouts_and_archives_convert() {
    if !registry_tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &edge_layers()).unwrap();
    let out_layout = work.path().join("converted");
    convert(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:v1", out_layout.display()),
        None,
    );
    let manifest = skopeo_inspect(&format!("oci:{}:v1", out_layout.display()), None);
    let roles: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["annotations"]["dev.petrel.layer"].as_str().unwrap())
        .collect();
    let (bootstrap, blobs) = roles.split_last().unwrap();
    assert_eq!(*bootstrap, "bootstrap", "{manifest}");
    assert!(
        !blobs.is_empty() && blobs.len() <= edge_layers().len() && blobs.iter().all(|r| *r == "blob"),
        "at most one blob layer per source layer: {manifest}"
    );
    // An oci-archive (a tar of the layout) converts to the same image.
    let archive = work.path().join("image.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let from_archive = convert(
        &format!("oci-archive:{}", archive.display()),
        &format!("oci:{}:v2", out_layout.display()),
        None,
    );
    let from_layout = convert(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:v3", out_layout.display()),
        None,
    );
    assert_eq!(
        from_archive["manifests"][0]["manifest_digest"],
        from_layout["manifests"][0]["manifest_digest"]
    );
    // --work-dir is created when missing (and left empty after).
    let work_dir = work.path().join("scratch/convert");
    let out = petrel()
        .arg("convert")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci:{}:v4", out_layout.display()))
        .arg("--work-dir")
        .arg(&work_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_dir(&work_dir).unwrap().count(), 0);
}

fn read_all_expecting_eio_or_truth(root: &Path, files: &[(String, Vec<u8>)]) -> usize {
    let mut failures = 0;
    for (path, data) in files {
        match std::fs::read(root.join(path)) {
            Ok(bytes) => assert_eq!(&bytes, data, "{path}: wrong bytes served"),
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(rustix::io::Errno::IO.raw_os_error()),
                    "{path}: {e}"
                );
                failures += 1;
            }
        }
    }
    failures
}

fn big_files() -> Vec<(String, Vec<u8>)> {
    (0..5)
        .map(|i| {
            (
                format!("data/f{i}.bin"),
                petrel_fixtures::rng::Rng::new(40 + i).mixed(1_200_000 + 100_000 * i as usize),
            )
        })
        .collect()
}

fn big_image(registry: &TestRegistry, work: &Path) -> String {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in big_files() {
        w.file(&path, &Default::default(), &data);
    }
    write_oci_layout(&work.join("layout"), "v1", &[w.finish()]).unwrap();
    registry.push_layout(&work.join("layout"), "faults", "v1");
    let target = format!("docker://{}/faults:petrel", registry.addr);
    let mut command = petrel();
    command.args([
        "convert",
        &format!("docker://{}/faults:v1", registry.addr),
        &target,
        "--chunker",
        "fixed:128K",
    ]);
    assert!(command.status().unwrap().success());
    "faults:petrel".into()
}

#[test]
fn transient_faults_are_retried_and_never_serve_wrong_bytes() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&registry, work.path());
    let proxy = FaultProxy::start(&registry.addr);
    let image = format!("docker://{}/{reference}", proxy.addr);
    let mount = MountProcess::start(
        &image,
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &["--amplify-bytes", "0", "--retry-seconds", "20"],
    );
    proxy.plan(&[
        Fault::Status500,
        Fault::TooManyRequests,
        Fault::DropConnection,
        Fault::CutBody,
        Fault::Slow(std::time::Duration::from_millis(1500)),
        Fault::IgnoreRange,
        Fault::Status500,
        Fault::IgnoreRange,
        Fault::CutBody,
    ]);
    let files = big_files();
    assert_eq!(
        read_all_expecting_eio_or_truth(&mount.mountpoint, &files),
        0,
        "transient faults are retried"
    );
    assert!(proxy.state.faults_injected.load(std::sync::atomic::Ordering::SeqCst) >= 9);

    // Corrupted bodies: the read fails (EIO) or is right; a later read is right.
    let work2 = tempfile::tempdir().unwrap();
    let mount2 = MountProcess::start(
        &image,
        &work2.path().join("mnt"),
        &work2.path().join("cache"),
        &["--amplify-bytes", "0"],
    );
    proxy.plan(&[Fault::CorruptBody, Fault::CorruptBody, Fault::CorruptBody]);
    let failed = read_all_expecting_eio_or_truth(&mount2.mountpoint, &files);
    assert!(failed >= 1, "a corrupted chunk gives EIO");
    drop_page_cache();
    assert_eq!(
        read_all_expecting_eio_or_truth(&mount2.mountpoint, &files),
        0,
        "nothing bad was cached"
    );

    // A registry that ignores Range altogether.
    proxy
        .state
        .ignore_range
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let work3 = tempfile::tempdir().unwrap();
    let mount3 = MountProcess::start(&image, &work3.path().join("mnt"), &work3.path().join("cache"), &[]);
    assert_eq!(read_all_expecting_eio_or_truth(&mount3.mountpoint, &files), 0);
}

/// A directory of small files with big files between them in the blob.
fn scattered_small_files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..20u64 {
        let mut rng = petrel_fixtures::rng::Rng::new(700 + i);
        files.push((format!("pkg/m{i:02}.py"), rng.mixed(9_000 + 500 * i as usize)));
        files.push((format!("pkg/m{i:02}z.so"), rng.mixed(1_300_000)));
    }
    files
}

/// Reading one file of a directory reads the directory's other small files ahead.
/// They lie apart in the blob (big files between them), and the registry serves
/// several ranges in one request, so the readahead takes a few requests, not one a
/// file, and fetches none of the big files' bytes. Through a registry that answers
/// with the whole blob instead, the daemon goes back to one range a request, says
/// so, and every byte is right either way.
#[test]
fn a_directorys_files_apart_in_the_blob_are_read_ahead_with_one_multi_range_request() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    use std::sync::atomic::Ordering::SeqCst;
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let files = scattered_small_files();
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in &files {
        w.file(path, &Default::default(), data);
    }
    write_oci_layout(&work.path().join("layout"), "v1", &[w.finish()]).unwrap();
    registry.push_layout(&work.path().join("layout"), "scattered", "v1");
    let mut command = petrel();
    command.args([
        "convert",
        &format!("docker://{}/scattered:v1", registry.addr),
        &format!("docker://{}/scattered:petrel", registry.addr),
        "--chunker",
        "fixed:64K",
    ]);
    assert!(command.status().unwrap().success());
    let small: Vec<&(String, Vec<u8>)> = files.iter().filter(|(p, _)| p.ends_with(".py")).collect();
    let settled = |proxy: &FaultProxy| {
        let mut last = u64::MAX;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = proxy.state.blob_requests.load(SeqCst);
            if now == last {
                return now;
            }
            last = now;
        }
    };
    for ignore_range in [false, true] {
        let proxy = FaultProxy::start(&registry.addr);
        proxy.state.ignore_range.store(ignore_range, SeqCst);
        let run = work.path().join(format!("run-{ignore_range}"));
        let mount = MountProcess::start(
            &format!("docker://{}/scattered:petrel", proxy.addr),
            &run.join("mnt"),
            &run.join("cache"),
            &["--amplify-bytes", "0", "--prefetch", "off", "-v"],
        );
        let before = proxy.state.blob_requests.load(SeqCst);
        let (first, data) = small[0];
        assert_eq!(&std::fs::read(mount.mountpoint.join(first)).unwrap(), data);
        let requests = settled(&proxy) - before;
        for (path, data) in &small {
            assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data, "{path}");
        }
        let stats = stats(&mount.mountpoint, &run.join("cache.run"));
        let log = std::fs::read_to_string(run.join("cache.log")).unwrap();
        if ignore_range {
            assert!(
                log.contains("does not serve several ranges in one request"),
                "the fallback is said:\n{log}"
            );
            continue;
        }
        assert!(
            proxy.state.multi_range_requests.load(SeqCst) >= 1,
            "several ranges were asked for at once"
        );
        // The reader's own file, then the 19 other small files: a few requests.
        assert!(requests <= 2, "{requests} requests for one file and its directory");
        assert!(
            stats["backend_requests"].as_u64().unwrap() <= 2 && stats["cache_hits"].as_u64().unwrap() >= 19,
            "the other small files were read ahead: {stats}"
        );
        let small_bytes: u64 = small.iter().map(|(_, d)| d.len() as u64).sum();
        let fetched = stats["backend_bytes"].as_u64().unwrap();
        assert!(
            fetched < small_bytes + 20 * (64 << 10),
            "no big file's bytes were fetched: {fetched} for {small_bytes}"
        );
    }
}

/// The big image mounted from `registry` through a fault proxy, with a small retry
/// budget and no amplification (each read is its own request).
fn mount_behind_a_fault_proxy(registry: &TestRegistry, work: &Path) -> (FaultProxy, MountProcess) {
    let reference = big_image(registry, work);
    let proxy = FaultProxy::start(&registry.addr);
    let mount = MountProcess::start(
        &format!("docker://{}/{reference}", proxy.addr),
        &work.join("mnt"),
        &work.join("cache"),
        &["--amplify-bytes", "0", "--retries", "3", "--retry-seconds", "2"],
    );
    (proxy, mount)
}

fn drop_page_cache() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn a_registry_that_stays_down_fails_only_uncached_reads_and_recovers() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (registry, work) = (TestRegistry::start(false), tempfile::tempdir().unwrap());
    let (proxy, mount) = mount_behind_a_fault_proxy(&registry, work.path());
    let files = big_files();
    let cached = std::fs::read(mount.mountpoint.join(&files[0].0)).unwrap();
    assert_eq!(cached, files[0].1);

    proxy.state.down.store(true, std::sync::atomic::Ordering::SeqCst);
    drop_page_cache();
    let started = std::time::Instant::now();
    let file = std::fs::File::open(mount.mountpoint.join(&files[1].0)).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = file.read_exact_at(&mut buf, 500_000).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "bounded: {:?}",
        started.elapsed()
    );
    // Cached data is still served while the registry is down.
    assert_eq!(std::fs::read(mount.mountpoint.join(&files[0].0)).unwrap(), files[0].1);

    proxy.state.down.store(false, std::sync::atomic::Ordering::SeqCst);
    file.read_exact_at(&mut buf, 500_000).unwrap();
    assert_eq!(&buf[..], &files[1].1[500_000..504_096]);
}

/// A registry that answers at once but sends its body a byte at a time: every read
/// has one deadline (the retry budget plus the body at a minimum rate), so the read
/// fails with EIO instead of hanging, and succeeds once the registry heals.
#[test]
fn a_trickling_registry_fails_the_read_within_its_deadline_and_recovers() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (registry, work) = (TestRegistry::start(false), tempfile::tempdir().unwrap());
    let (proxy, mount) = mount_behind_a_fault_proxy(&registry, work.path());
    let files = big_files();
    proxy.plan(&[Fault::Trickle(std::time::Duration::from_millis(100)); 200]);
    let started = std::time::Instant::now();
    let file = std::fs::File::open(mount.mountpoint.join(&files[1].0)).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = file.read_exact_at(&mut buf, 500_000).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()));
    // A chunk of ~64 KiB at 10 bytes/s would take almost two hours.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "bounded: {:?}",
        started.elapsed()
    );
    assert!(proxy.state.faults_injected.load(std::sync::atomic::Ordering::SeqCst) > 0);

    proxy.state.plan.lock().unwrap().clear();
    file.read_exact_at(&mut buf, 500_000).unwrap();
    assert_eq!(&buf[..], &files[1].1[500_000..504_096]);

    // The mount goes away (detached from outside) while a read trickles: the read
    // ends at its deadline, and with it the daemon.
    proxy.plan(&[Fault::Trickle(std::time::Duration::from_millis(100)); 200]);
    let reader = {
        let path = mount.mountpoint.join(&files[2].0);
        std::thread::spawn(move || std::fs::read(path).map(|b| b.len()))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(file);
    rustix::mount::unmount(&mount.mountpoint, rustix::mount::UnmountFlags::DETACH).unwrap();
    assert!(reader.join().unwrap().is_err(), "the trickled read fails");
    let mut mount = mount;
    let status = mount.wait_exit(std::time::Duration::from_secs(60));
    assert!(status.is_some(), "the daemon of a mount that is gone exits");
}

/// A mirror that is down costs one failed request, not one per read (it is skipped
/// while it stays down); a background probe finds it healed, and reads go through it
/// again.
#[test]
fn a_dead_mirror_costs_one_failure_and_is_used_again_once_it_heals() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    use std::sync::atomic::Ordering::SeqCst;
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&registry, work.path());
    let mirror = FaultProxy::start(&registry.addr);
    mirror.state.down.store(true, SeqCst);
    let mount = MountProcess::start(
        &format!("docker://{}/{reference}", registry.addr),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &["--amplify-bytes", "0", "--mirror", &format!("http://{}", mirror.addr)],
    );
    let files = big_files();
    for (path, data) in &files[..4] {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data);
    }
    let stats = stats(&mount.mountpoint, &work.path().join("cache").with_extension("run"));
    let requests = stats["backend_requests"].as_u64().unwrap();
    let tried = mirror.state.connections.load(SeqCst);
    assert!(requests > 10, "{stats}");
    // One failed request, and at most a probe or two since, not one per request.
    assert!(
        tried <= 3,
        "the dead mirror was asked {tried} times for {requests} requests"
    );

    mirror.state.down.store(false, SeqCst);
    let started = std::time::Instant::now();
    while mirror.state.forwarded.load(SeqCst) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no probe reached the healed mirror"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (path, data) = &files[4];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), data);
    assert!(
        mirror.state.blob_requests.load(SeqCst) > 0,
        "reads go through the healed mirror"
    );

    // As a dfdaemon may: the mirror answers 5xx (skipped again), then, back, streams
    // whole blobs for Range requests (a cold cache); every byte still reads right.
    let cache_dir = work.path().join("cache");
    let evict = || {
        let out = petrel()
            .args(["cache", "gc", "--max-bytes", "0", "--cache-dir"])
            .arg(&cache_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        drop_page_cache();
    };
    mirror.plan(&[Fault::Status500]);
    evict();
    assert_eq!(&std::fs::read(mount.mountpoint.join(&files[0].0)).unwrap(), &files[0].1);
    let forwarded = mirror.state.forwarded.load(SeqCst);
    mirror.state.ignore_range.store(true, SeqCst);
    let started = std::time::Instant::now();
    while mirror.state.forwarded.load(SeqCst) == forwarded {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no probe found the mirror back: {}",
            std::fs::read_to_string(work.path().join("cache.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    evict();
    let before = mirror.state.blob_requests.load(SeqCst);
    for (path, data) in &files {
        assert_eq!(
            &std::fs::read(mount.mountpoint.join(path)).unwrap(),
            data,
            "{path} through a whole-blob mirror"
        );
    }
    assert!(
        mirror.state.blob_requests.load(SeqCst) > before,
        "the whole-blob mirror served the reads"
    );
}

#[test]
fn bad_manifests_and_bootstraps_are_refused_before_mounting() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let good = {
        write_oci_layout(&work.path().join("layout"), "v1", &edge_layers()).unwrap();
        registry.push_layout(&work.path().join("layout"), "bad", "v1");
        convert(
            &format!("docker://{}/bad:v1", registry.addr),
            &format!("docker://{}/bad:good", registry.addr),
            None,
        );
        let (bytes, ..) = client.get_manifest("bad", "good").unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    // The bootstrap is the last layer (after one blob layer per source layer).
    let last = good["layers"].as_array().unwrap().len() - 1;
    let bootstrap_digest = good["layers"][last]["digest"].as_str().unwrap().to_string();
    // The bootstrap layer travels gzipped; `bootstrap` is the tar inside.
    assert_eq!(good["layers"][last]["mediaType"], petrel_registry::oci::OCI_LAYER_GZIP);
    let bootstrap_gz = client.get_blob_verified("bad", &bootstrap_digest, 1 << 30).unwrap();
    let mut bootstrap = Vec::new();
    let entry = petrel_format::layer_tar::BOOTSTRAP_ENTRY;
    petrel_format::layer_tar::gunzip_layer(entry, &bootstrap_gz[..], &mut bootstrap, 1 << 30).unwrap();
    let gzip = |bytes: &[u8]| {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    };
    let bootstrap_layer = |bytes: &[u8], media_type: &str| {
        let digest = client.push_blob_bytes("bad", bytes).unwrap();
        let mut m = good.clone();
        m["layers"][last]["digest"] = digest.into();
        m["layers"][last]["size"] = bytes.len().into();
        m["layers"][last]["mediaType"] = media_type.into();
        m
    };
    let (tar, gz) = (
        petrel_registry::oci::OCI_LAYER_TAR,
        petrel_registry::oci::OCI_LAYER_GZIP,
    );
    let mut cases: Vec<(&str, serde_json::Value, &str)> = Vec::new();
    // Garbage where the bootstrap should be (its digest matches the garbage).
    let garbage_bytes = b"this is not a bootstrap at all. ".repeat(10);
    let garbage = client.push_blob_bytes("bad", &garbage_bytes).unwrap();
    cases.push((
        "garbage",
        bootstrap_layer(&garbage_bytes, tar),
        "petrel/bootstrap layer is not petrel's one-entry tar",
    ));
    // Garbage in a well-formed bootstrap layer, plain and gzipped.
    let wrapped_bytes = petrel_format::layer_tar::wrap(entry, &garbage_bytes);
    cases.push(("wrapped garbage", bootstrap_layer(&wrapped_bytes, tar), "magic"));
    cases.push((
        "gzipped wrapped garbage",
        bootstrap_layer(&gzip(&wrapped_bytes), gz),
        "magic",
    ));
    // Plain garbage gzipped, and the bare bootstrap gzipped (only tars are gzipped).
    cases.push((
        "gzipped garbage",
        bootstrap_layer(&gzip(&garbage_bytes), gz),
        "one-entry tar",
    ));
    let bare_bootstrap = petrel_format::layer_tar::unwrap(entry, &bootstrap).unwrap().to_vec();
    cases.push((
        "gzipped bare bootstrap",
        bootstrap_layer(&gzip(&bare_bootstrap), gz),
        "one-entry tar",
    ));
    // A gzip stream cut in half, and garbage declared as gzip.
    cases.push((
        "truncated gzip",
        bootstrap_layer(&bootstrap_gz[..bootstrap_gz.len() / 2], gz),
        "does not decompress",
    ));
    cases.push(("not gzip", bootstrap_layer(&garbage_bytes, gz), "does not decompress"));
    // A compression petrel does not write.
    cases.push((
        "zstd",
        bootstrap_layer(&bootstrap_gz, petrel_registry::oci::OCI_LAYER_ZSTD),
        "is neither",
    ));
    // A truncated bootstrap.
    cases.push((
        "truncated",
        bootstrap_layer(&bootstrap[..bootstrap.len() / 2], tar),
        "bootstrap",
    ));
    // The manifest pins a digest the served bytes do not have.
    let mut m = good.clone();
    m["layers"][last]["digest"] = garbage.into();
    m["layers"][last]["size"] = (bootstrap.len() as u64).into();
    cases.push(("wrong size", m, "bootstrap"));
    // The registry serves more bytes than the manifest says: refused as they stream
    // in, before the rest is read.
    let mut m = good.clone();
    m["layers"][last]["size"] = (bootstrap_gz.len() as u64 / 2).into();
    cases.push(("larger than the manifest says", m, "larger than"));
    // No bootstrap layer at all.
    let mut m = good.clone();
    m["layers"].as_array_mut().unwrap().pop();
    cases.push(("no bootstrap", m, "not a petrel image"));
    for (name, manifest, expected) in cases {
        let bytes = serde_json::to_vec(&manifest).unwrap();
        client
            .put_manifest(
                "bad",
                name.replace(' ', "-").as_str(),
                petrel_registry::oci::OCI_MANIFEST,
                &bytes,
            )
            .unwrap();
        let mountpoint = work.path().join(format!("mnt-{}", name.replace(' ', "-")));
        std::fs::create_dir_all(&mountpoint).unwrap();
        let out = petrel()
            .arg("mount")
            .arg(format!("docker://{}/bad:{}", registry.addr, name.replace(' ', "-")))
            .arg(&mountpoint)
            .arg("--cache-dir")
            .arg(work.path().join("cache"))
            .arg("--runtime-dir")
            .arg(work.path().join("run"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {}", output_text(&out));
        assert!(output_text(&out).contains(expected), "{name}: {}", output_text(&out));
        assert!(!is_petrel_mount(&mountpoint), "{name} must not be mounted");
    }
    // Images converted before bootstrap layers were gzipped (an uncompressed tar) or
    // tars at all (the bare bootstrap as the layer) still mount.
    let bare = petrel_format::layer_tar::bootstrap_of_layer(&bootstrap)
        .unwrap()
        .to_vec();
    for (name, layer) in [("bare", &bare), ("plain-tar", &bootstrap)] {
        let m = bootstrap_layer(layer, tar);
        client
            .put_manifest(
                "bad",
                name,
                petrel_registry::oci::OCI_MANIFEST,
                &serde_json::to_vec(&m).unwrap(),
            )
            .unwrap();
        let mountpoint = work.path().join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mountpoint).unwrap();
        let out = petrel()
            .arg("mount")
            .arg(format!("docker://{}/bad:{name}", registry.addr))
            .arg(&mountpoint)
            .arg("--daemon")
            .arg("--cache-dir")
            .arg(work.path().join(format!("cache-{name}")))
            .arg("--runtime-dir")
            .arg(work.path().join("run"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} bootstrap layer: {}", output_text(&out));
        assert!(is_petrel_mount(&mountpoint));
        assert!(std::fs::read_dir(&mountpoint).unwrap().count() > 0);
        let out = petrel().arg("umount").arg(&mountpoint).output().unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
    }

    // Bytes changed on the wire: the sha256 pinned in the manifest catches it.
    let proxy = FaultProxy::start(&registry.addr);
    proxy.plan(&[Fault::CorruptBody]);
    let mountpoint = work.path().join("mnt-corrupt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let out = petrel()
        .arg("mount")
        .arg(format!("docker://{}/bad:good", proxy.addr))
        .arg(&mountpoint)
        .args(["--retries", "1"])
        .arg("--cache-dir")
        .arg(work.path().join("cache2"))
        .arg("--runtime-dir")
        .arg(work.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("does not match its digest"),
        "{}",
        output_text(&out)
    );
}

/// Rewrites a single-image layout into an index of two platforms (same image).
fn make_multi_platform(layout: &Path) {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"][0].clone();
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut entry = manifest.clone();
        entry.as_object_mut().unwrap().remove("annotations");
        entry["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        entries.push(entry);
    }
    let inner = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
    let bytes = serde_json::to_vec(&inner).unwrap();
    let digest = petrel_registry::oci::sha256_digest(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(&digest[7..]), &bytes).unwrap();
    let outer = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&outer).unwrap()).unwrap();
}

#[test]
fn all_platforms_writes_an_index_and_one_platform_is_picked_otherwise() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &edge_layers()).unwrap();
    make_multi_platform(&layout);
    let out = work.path().join("out");
    let all = convert(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:all", out.display()),
        None,
    );
    assert_eq!(
        all["manifests"].as_array().unwrap().len(),
        1,
        "without --all-platforms one platform: {all}"
    );
    let mut command = petrel();
    command
        .arg("convert")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci:{}:multi", out.display()))
        .args(["--all-platforms", "--json"]);
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", output_text(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["manifests"].as_array().unwrap().len(), 2);
    let out_layout = petrel_registry::layout::OciLayout::open(&out).unwrap();
    let tagged = out_layout.resolve(Some("multi")).unwrap();
    let index: petrel_registry::oci::Index =
        serde_json::from_slice(&out_layout.read_blob(tagged.digest().as_ref(), 1 << 20).unwrap()).unwrap();
    let arches: Vec<String> = index
        .manifests()
        .iter()
        .map(|m| m.platform().as_ref().unwrap().architecture().to_string())
        .collect();
    assert_eq!(arches, ["amd64", "arm64"]);
    let out = petrel()
        .arg("convert")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci:{}:x", work.path().join("o2").display()))
        .args(["--platform", "linux/s390x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("no manifest for platform linux/s390x"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn docker_archives_convert_like_the_same_layers() {
    let work = tempfile::tempdir().unwrap();
    let archive_dir = work.path().join("archive");
    std::fs::create_dir_all(&archive_dir).unwrap();
    let mut names = Vec::new();
    for (i, tar) in edge_layers().iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        std::fs::create_dir_all(archive_dir.join(format!("layer{i}"))).unwrap();
        std::fs::write(archive_dir.join(&name), tar).unwrap();
        names.push(name);
    }
    std::fs::write(
        archive_dir.join("config.json"),
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    )
    .unwrap();
    std::fs::write(
        archive_dir.join("manifest.json"),
        serde_json::to_vec(&serde_json::json!([{"Config": "config.json", "RepoTags": ["edge:v1"], "Layers": names}]))
            .unwrap(),
    )
    .unwrap();
    let archive = work.path().join("docker.tar");
    assert!(std::process::Command::new("tar")
        .arg("-C")
        .arg(&archive_dir)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let from_archive = convert(
        &format!("docker-archive:{}", archive.display()),
        &format!("oci:{}:a", work.path().join("out").display()),
        None,
    );
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &edge_layers()).unwrap();
    let from_layout = convert(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:b", work.path().join("out").display()),
        None,
    );
    assert_eq!(
        from_archive["manifests"][0]["bootstrap_digest"],
        from_layout["manifests"][0]["bootstrap_digest"]
    );
    // An archive naming a file outside itself is refused.
    std::fs::write(
        archive_dir.join("manifest.json"),
        br#"[{"Config":"../../etc/passwd","Layers":[]}]"#,
    )
    .unwrap();
    let evil = work.path().join("evil.tar");
    assert!(std::process::Command::new("tar")
        .arg("-C")
        .arg(&archive_dir)
        .arg("-cf")
        .arg(&evil)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let out = petrel()
        .arg("convert")
        .arg(format!("docker-archive:{}", evil.display()))
        .arg(format!("oci:{}:c", work.path().join("out").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(output_text(&out).contains("outside itself"), "{}", output_text(&out));
}

#[test]
fn reads_go_through_a_mirror_when_the_origin_is_unreachable() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&registry, work.path());
    // The image names a registry nobody listens on; the mirror is the real one.
    let dead = format!("127.0.0.1:{}", free_port());
    let mirror = format!("http://{}", registry.addr);
    let mount = MountProcess::start(
        &format!("docker://{dead}/{reference}"),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &["--mirror", &mirror, "--retries", "1"],
    );
    assert_eq!(read_all_expecting_eio_or_truth(&mount.mountpoint, &big_files()), 0);
}

#[test]
fn bearer_tokens_are_fetched_and_refreshed_when_they_expire() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&registry, work.path());
    let proxy = FaultProxy::start(&registry.addr);
    *proxy.state.bearer.lock().unwrap() = Some("token-one".into());
    let mount = MountProcess::start(
        &format!("docker://{}/{reference}", proxy.addr),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &["--amplify-bytes", "0"],
    );
    let files = big_files();
    assert_eq!(std::fs::read(mount.mountpoint.join(&files[0].0)).unwrap(), files[0].1);
    let issued = proxy.state.tokens_issued.load(std::sync::atomic::Ordering::SeqCst);
    assert!(issued >= 1);
    // The token expires mid-run: the next fetch gets a 401, a new token, and succeeds.
    *proxy.state.bearer.lock().unwrap() = Some("token-two".into());
    assert_eq!(std::fs::read(mount.mountpoint.join(&files[1].0)).unwrap(), files[1].1);
    assert!(proxy.state.tokens_issued.load(std::sync::atomic::Ordering::SeqCst) > issued);
    let log = std::fs::read_to_string(work.path().join("cache.log")).unwrap_or_default();
    assert!(
        !log.contains("token-one") && !log.contains("token-two"),
        "tokens stay out of logs"
    );
}

#[test]
fn credentials_come_from_the_docker_config() {
    if !registry_tools_available() {
        return;
    }
    let registry = TestRegistry::start(true);
    let work = tempfile::tempdir().unwrap();
    write_oci_layout(&work.path().join("layout"), "v1", &edge_layers()).unwrap();
    registry.push_layout(&work.path().join("layout"), "cfg", "v1");
    let config_dir = work.path().join("docker");
    std::fs::create_dir_all(&config_dir).unwrap();
    let auth = base64_encode(format!("{USER}:{PASSWORD}").as_bytes());
    std::fs::write(
        config_dir.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let out = petrel()
        .env("DOCKER_CONFIG", &config_dir)
        .args([
            "convert",
            &format!("docker://{}/cfg:v1", registry.addr),
            &format!("docker://{}/cfg:petrel", registry.addr),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
}

/// Credential helpers, as Docker runs them: `credHelpers.<host>` (else
/// `credsStore`) names `docker-credential-<name>`, which gets the server on stdin and
/// answers JSON. It wins over `auths`; a helper without the server falls back to
/// `auths`; a helper that answers nonsense gives a clear refusal.
#[test]
fn credentials_come_from_a_docker_credential_helper() {
    if !registry_tools_available() {
        return;
    }
    let registry = TestRegistry::start(true);
    let work = tempfile::tempdir().unwrap();
    write_oci_layout(&work.path().join("layout"), "v1", &edge_layers()).unwrap();
    registry.push_layout(&work.path().join("layout"), "helped", "v1");
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let asked = work.path().join("asked");
    let helper = |name: &str, body: &str| {
        let path = bin.join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n[ \"$1\" = get ] || exit 3\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    helper(
        "petreltest",
        &format!(
            "cat > {}\necho '{{\"ServerURL\":\"x\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'",
            asked.display()
        ),
    );
    helper("empty", "echo 'credentials not found in native keychain'; exit 1");
    helper("garbage", "echo 'not json'");
    let config_dir = work.path().join("docker");
    std::fs::create_dir_all(&config_dir).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let convert = |config: String, tag: &str| {
        std::fs::write(config_dir.join("config.json"), config).unwrap();
        petrel()
            .env("DOCKER_CONFIG", &config_dir)
            .env("PATH", &path)
            .env_remove("PETREL_CREDS")
            .args([
                "convert",
                &format!("docker://{}/helped:v1", registry.addr),
                &format!("docker://{}/helped:{tag}", registry.addr),
                "--retries",
                "1",
            ])
            .output()
            .unwrap()
    };
    let host = &registry.addr;
    let out = convert(format!(r#"{{"credHelpers":{{"{host}":"petreltest"}}}}"#), "a");
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        std::fs::read_to_string(&asked).unwrap(),
        *host,
        "the helper got the server"
    );
    let out = convert(r#"{"credsStore":"petreltest"}"#.into(), "b");
    assert!(out.status.success(), "credsStore: {}", output_text(&out));
    let auth = base64_encode(format!("{USER}:{PASSWORD}").as_bytes());
    let out = convert(
        format!(r#"{{"credsStore":"empty","auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
        "c",
    );
    assert!(
        out.status.success(),
        "a helper without the server falls back to auths: {}",
        output_text(&out)
    );
    let out = convert(format!(r#"{{"credHelpers":{{"{host}":"garbage"}}}}"#), "d");
    assert!(!out.status.success());
    assert!(!output_text(&out).contains(PASSWORD));
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn the_next_release_reuses_the_profile_kept_with_the_image() {
    let work = tempfile::tempdir().unwrap();
    let layers = sample_layers();
    let tars: Vec<Vec<u8>> = layers.iter().map(|ops| write_layer(ops, "")).collect();
    write_oci_layout(&work.path().join("v1"), "v1", &tars).unwrap();
    // Release 2: one more layer on top.
    let mut next = tars.clone();
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("app/app.py", &Default::default(), b"print('release 3')\n");
    next.push(w.finish());
    write_oci_layout(&work.path().join("v2"), "v1", &next).unwrap();
    let profile = work.path().join("profile.json");
    std::fs::write(
        &profile,
        br#"{"petrel_profile":1,"entries":[{"path":"app/app.py"},{"path":"usr/bin/python3","ranges":[[0,1048576]]}]}"#,
    )
    .unwrap();
    let out = work.path().join("out");
    let mut first = petrel();
    first
        .arg("convert")
        .arg(format!("oci:{}:v1", work.path().join("v1").display()))
        .arg(format!("oci:{}:r1", out.display()))
        .arg("--prefetch")
        .arg(&profile);
    let first_out = first.output().unwrap();
    assert!(first_out.status.success(), "{}", output_text(&first_out));
    let mut second = petrel();
    second
        .arg("convert")
        .arg(format!("oci:{}:v1", work.path().join("v2").display()))
        .arg(format!("oci:{}:r2", out.display()))
        .arg("--prefetch-from")
        .arg(format!("oci:{}:r1", out.display()));
    let second_out = second.output().unwrap();
    assert!(second_out.status.success(), "{}", output_text(&second_out));
    let layout = petrel_registry::layout::OciLayout::open(&out).unwrap();
    let manifest: petrel_registry::oci::Manifest = serde_json::from_slice(
        &layout
            .read_blob(layout.resolve(Some("r2")).unwrap().digest().as_ref(), 1 << 20)
            .unwrap(),
    )
    .unwrap();
    let kept = petrel_registry::oci::manifest_annotation(&manifest, petrel_registry::oci::ANNOTATION_PROFILE).unwrap();
    assert!(kept.contains("usr/bin/python3"), "{kept}");
    // The converted image points at its source with `subject`.
    let source = petrel_registry::layout::OciLayout::open(&work.path().join("v2")).unwrap();
    let source = source.resolve(Some("v1")).unwrap();
    let subject = manifest.subject().as_ref().expect("subject");
    assert_eq!((subject.digest(), subject.size()), (source.digest(), source.size()));
    let bootstrap_gz = layout
        .read_blob(
            petrel_registry::oci::bootstrap_layer(&manifest)
                .unwrap()
                .digest()
                .as_ref(),
            1 << 30,
        )
        .unwrap();
    let mut bootstrap = Vec::new();
    let entry = petrel_format::layer_tar::BOOTSTRAP_ENTRY;
    petrel_format::layer_tar::gunzip_layer(entry, &bootstrap_gz[..], &mut bootstrap, 1 << 30).unwrap();
    let bootstrap = petrel_format::layer_tar::unwrap(entry, &bootstrap).unwrap();
    let reader = petrel_format::Bootstrap::open(bootstrap).unwrap();
    assert_eq!(reader.prefetch_len(), 2, "release 2 laid out with release 1's profile");
}

/// Release N and N+1 of the sample app: N+1 edits the model a little, adds a file.
fn release_pair() -> (
    Vec<Vec<petrel_fixtures::layer_spec::Op>>,
    Vec<Vec<petrel_fixtures::layer_spec::Op>>,
) {
    use petrel_fixtures::layer_spec::Op;
    let release_n = sample_layers();
    let mut next = release_n.clone();
    for op in next[1].iter_mut() {
        if let Op::File { path, data, .. } = op {
            if path == "app/models/weights.bin" {
                // A small patch in the middle of an 8 MiB file.
                for b in &mut data[3_000_000..3_004_000] {
                    *b ^= 0x5a;
                }
            }
        }
    }
    next[2].push(Op::File {
        path: "app/CHANGELOG".into(),
        meta: Default::default(),
        data: b"release N+1\n".to_vec(),
    });
    (release_n, next)
}

/// Pushes release N and N+1 of the sample app as `repository:n` and `:n1`.
fn push_release_pair(
    registry: &TestRegistry,
    dir: &Path,
    repository: &str,
) -> (
    Vec<Vec<petrel_fixtures::layer_spec::Op>>,
    Vec<Vec<petrel_fixtures::layer_spec::Op>>,
) {
    let (release_n, next) = release_pair();
    for (name, layers) in [("n", &release_n), ("n1", &next)] {
        let tars: Vec<Vec<u8>> = layers.iter().map(|ops| write_layer(ops, "")).collect();
        write_oci_layout(&dir.join(name), "v1", &tars).unwrap();
        registry.push_layout(&dir.join(name), repository, name);
    }
    (release_n, next)
}

/// The sizes of the layers of the image an OCI layout holds (its first manifest).
fn layout_layer_sizes(layout: &Path) -> Vec<u64> {
    let read = |path: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap() };
    let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let index = read(layout.join("index.json"));
    let manifest = read(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect()
}

/// Pushes the sample image (layers written under `dir`) as `repository:v1`;
/// returns its layers' tars.
fn push_sample(registry: &TestRegistry, dir: &Path, repository: &str) -> Vec<Vec<u8>> {
    let tars: Vec<Vec<u8>> = sample_layers().iter().map(|ops| write_layer(ops, "")).collect();
    write_oci_layout(&dir.join("layout"), "v1", &tars).unwrap();
    registry.push_layout(&dir.join("layout"), repository, "v1");
    tars
}

#[test]
fn the_next_release_against_a_chunk_dictionary_uploads_only_new_chunks() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let (_, next) = push_release_pair(&registry, work.path(), "app");
    let r = &registry.addr;
    let first = convert(
        &format!("docker://{r}/app:n"),
        &format!("docker://{r}/app:n-petrel"),
        None,
    );
    let first_upload = first["manifests"][0]["uploaded_bytes"].as_u64().unwrap();
    let plain = convert(
        &format!("docker://{r}/app:n1"),
        &format!("docker://{r}/plain:n1-petrel"),
        None,
    );
    let plain_upload = plain["manifests"][0]["uploaded_bytes"].as_u64().unwrap();
    let mut command = petrel();
    command.args([
        "convert",
        &format!("docker://{r}/app:n1"),
        &format!("docker://{r}/app:n1-petrel"),
        "--json",
        "--chunk-dict",
        &format!("docker://{r}/app:n-petrel"),
    ]);
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let with_dict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dict_upload = with_dict["manifests"][0]["uploaded_bytes"].as_u64().unwrap();
    assert!(
        dict_upload * 5 < plain_upload,
        "with the dictionary {dict_upload} bytes, without {plain_upload} (first release {first_upload})"
    );
    // Release N+1 lists its new blobs and release N's blobs it takes chunks from.
    let blobs = |image: &str| -> Vec<(String, u64)> {
        skopeo_inspect(&format!("docker://{r}/{image}"), None)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["annotations"]["dev.petrel.layer"] == "blob")
            .map(|l| (l["digest"].as_str().unwrap().to_string(), l["size"].as_u64().unwrap()))
            .collect()
    };
    let (release_n, release_n1) = (blobs("app:n-petrel"), blobs("app:n1-petrel"));
    let (shared, new): (Vec<_>, Vec<_>) = release_n1.iter().partition(|b| release_n.contains(b));
    assert!(!shared.is_empty(), "release N's blobs are referenced: {release_n1:?}");
    let new_bytes: u64 = new.iter().map(|(_, size)| size).sum();
    assert!(
        new_bytes * 5 < plain_upload,
        "new blobs of {new_bytes} bytes: {release_n1:?}"
    );
    let mount = MountProcess::start(
        &format!("docker://{r}/app:n1-petrel"),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &[],
    );
    assert_tree(&reference_merge(&next), &mount.mountpoint);
}

/// Converting release N+1 with no flag deduplicates against the newest petrel
/// image of the target repository (or the tag it replaces) and says so; the
/// result mounts right; `--no-chunk-dict` opts out.
#[test]
fn the_next_release_converted_without_flags_deduplicates_against_the_repository() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let (_, next) = push_release_pair(&registry, work.path(), "src");
    let r = &registry.addr;
    // Build times (the manifests' created annotation) come from SOURCE_DATE_EPOCH.
    let convert_built_at = |epoch: &str, from: &str, to: &str, flags: &[&str]| {
        let out = petrel()
            .args(["convert", from, to, "--json"])
            .args(flags)
            .env("SOURCE_DATE_EPOCH", epoch)
            .output()
            .unwrap();
        assert!(out.status.success(), "convert {from} -> {to}: {}", output_text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = convert_built_at(
        "2000000000",
        &format!("docker://{r}/src:n"),
        &format!("docker://{r}/app:1.0"),
        &[],
    );
    assert_eq!(
        first["chunk_dicts"],
        serde_json::json!([]),
        "an empty repository: {first}"
    );
    let first_upload = first["manifests"][0]["uploaded_bytes"].as_u64().unwrap();
    let manifest = skopeo_inspect(&format!("docker://{r}/app:1.0"), None);
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.created"],
        "2033-05-18T03:33:20Z"
    );
    // An older build under a tag that sorts last is not the newest (converted on
    // its own: with a dictionary it would be release N's image under another tag).
    convert_built_at(
        "1000000000",
        &format!("docker://{r}/src:n"),
        &format!("docker://{r}/app:9-old"),
        &["--no-chunk-dict"],
    );

    // No flag: release N, the newest petrel image of the repository, is the dictionary.
    let mut command = petrel();
    command.args([
        "convert",
        &format!("docker://{r}/src:n1"),
        &format!("docker://{r}/app:1.1"),
    ]);
    let out = command.output().unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "chunk dictionary: docker://{r}/app:1.0 (the newest petrel image in the target repository"
        )),
        "{text}"
    );
    let uploaded: u64 = text
        .split("uploaded ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no upload count in {text}"));
    assert!(
        uploaded * 5 < first_upload,
        "release N+1 uploaded {uploaded} bytes against release N's {first_upload}"
    );
    let mount = MountProcess::start(
        &format!("docker://{r}/app:1.1"),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &[],
    );
    assert_tree(&reference_merge(&next), &mount.mountpoint);
    drop(mount);

    // Replacing a petrel tag: the image it held is the dictionary.
    let replaced = convert(&format!("docker://{r}/src:n1"), &format!("docker://{r}/app:1.0"), None);
    assert_eq!(replaced["chunk_dicts"][0]["image"], format!("docker://{r}/app:1.0"));
    assert_eq!(replaced["chunk_dicts"][0]["why"], "the tag being replaced");
    assert!(replaced["manifests"][0]["uploaded_bytes"].as_u64().unwrap() * 5 < first_upload);

    // Opting out stores every chunk of the changed layer again.
    let mut command = petrel();
    command.args([
        "convert",
        &format!("docker://{r}/src:n1"),
        &format!("docker://{r}/app:1.1-full"),
        "--json",
        "--no-chunk-dict",
    ]);
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let full: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(full["chunk_dicts"], serde_json::json!([]));
    // Its lower layers are release N's, so their blobs are byte for byte release N's
    // (one blob per source layer) and already there; the changed layer is stored whole.
    assert!(
        full["manifests"][0]["uploaded_bytes"].as_u64().unwrap() > uploaded * 5,
        "{full}"
    );
    assert!(
        full["manifests"][0]["skipped_blobs"].as_u64().unwrap() >= 1,
        "the unchanged first layer's blob was already there: {full}"
    );
}

/// On a terminal, convert shows per layer the bytes in with the chunks seen and
/// deduplicated and the bytes stored, and per blob the bytes pushed.
#[test]
fn convert_on_a_terminal_shows_bytes_in_chunks_deduplicated_and_bytes_out() {
    if !registry_tools_available() {
        return;
    }
    let has_script = std::process::Command::new("sh")
        .args(["-c", "command -v script"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        petrel_fixtures::report_skip("script (bsdutils) is not installed: no terminal to convert on");
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    push_sample(&registry, work.path(), "src");
    let r = &registry.addr;
    let command = format!(
        "{} convert docker://{r}/src:v1 docker://{r}/app:v1",
        env!("CARGO_BIN_EXE_petrel")
    );
    // `script` runs the command on a pseudo-terminal and copies what it drew.
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let drawn = output_text(&out);
    assert!(out.status.success(), "{drawn}");
    for expected in ["layer 1/3", "in,", "chunks,", "deduplicated,", "push blob", "out,"] {
        assert!(drawn.contains(expected), "{expected:?} not drawn: {drawn}");
    }
}

/// Convert pushes each layer's blob while later layers are still being pulled:
/// with the source holding back the last layer, the target already receives the
/// blobs of the layers before it.
#[test]
fn convert_pushes_earlier_layers_while_later_ones_are_pulled() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    let layers = sample_layers();
    let tars = push_sample(&source, work.path(), "src");
    let proxy = FaultProxy::start(&source.addr);
    // Blob GETs: the config, then the layers in order; the last layer is held.
    let mut plan = vec![Fault::Pass; tars.len()];
    plan.push(Fault::Hold);
    proxy.plan(&plan);
    let stored_blobs = || {
        let root = target.dir.path().join("storage/docker/registry/v2/blobs/sha256");
        std::fs::read_dir(&root)
            .map(|prefixes| {
                prefixes
                    .flatten()
                    .flat_map(|p| std::fs::read_dir(p.path()).into_iter().flatten().flatten())
                    .filter(|blob| blob.path().join("data").exists())
                    .count()
            })
            .unwrap_or(0)
    };
    let mut command = petrel();
    command.args([
        "convert",
        &format!("docker://{}/src:v1", proxy.addr),
        &format!("docker://{}/app:v1", target.addr),
        "--json",
    ]);
    let converting = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while proxy.state.held.load(std::sync::atomic::Ordering::SeqCst) == 0 || stored_blobs() < tars.len() - 1 {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pushed_while_held = stored_blobs();
    proxy.state.release.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = converting.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        pushed_while_held,
        tars.len() - 1,
        "the blobs of every layer but the last were pushed before the last layer was read"
    );
    let mount = MountProcess::start(
        &format!("docker://{}/app:v1", target.addr),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &[],
    );
    assert_tree(&reference_merge(&layers), &mount.mountpoint);
}

/// Bytes the registry under `dir` holds for `repository`: its blobs, and the
/// uploads it is receiving.
fn bytes_received(dir: &Path, repository: &str) -> u64 {
    let v2 = dir.join("storage/docker/registry/v2");
    let sizes = |root: PathBuf, depth: usize| -> u64 {
        walkdir_files(&root, depth)
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "data"))
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    sizes(v2.join("blobs/sha256"), 3) + sizes(v2.join("repositories").join(repository).join("_uploads"), 2)
}

/// Files at most `depth` directories below `root`.
fn walkdir_files(root: &Path, depth: usize) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if depth > 0 {
                files.extend(walkdir_files(&path, depth - 1));
            }
        } else {
            files.push(path);
        }
    }
    files
}

/// Mounts `reference` and checks that each of `files` reads back as written.
fn assert_mounted_files(reference: &str, work: &Path, files: &[(String, Vec<u8>)]) {
    let mount = MountProcess::start(reference, &work.join("mnt"), &work.join("cache"), &[]);
    for (path, data) in files {
        assert!(
            std::fs::read(mount.mountpoint.join(path)).unwrap() == *data,
            "{path} reads back as written"
        );
    }
}

/// Runs `petrel convert FROM TO --retries 0`; the test fails if it has not
/// ended within two minutes.
fn convert_ending_within_two_minutes(from: &str, to: &str) -> std::process::Output {
    let mut child = petrel()
        .args(["convert", from, to, "--retries", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the conversion did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Pushes `big:v1`: one layer of 40 MiB that gzip cannot shrink, in 1 MiB files
/// (returned): big enough for its blobs to be uploaded while they are written.
fn push_big_layer(registry: &TestRegistry, work: &Path) -> Vec<(String, Vec<u8>)> {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    let mut files = Vec::new();
    for i in 0..40 {
        let data = petrel_fixtures::rng::Rng::new(900 + i).bytes(1 << 20);
        w.file(&format!("model/part{i:02}.bin"), &Default::default(), &data);
        files.push((format!("model/part{i:02}.bin"), data));
    }
    write_oci_layout(&work.join("layout"), "v1", &[w.finish()]).unwrap();
    registry.push_layout(&work.join("layout"), "big", "v1");
    files
}

/// A registry that fails the uploads of blobs while they are written (a proxy
/// answers every PATCH 500) still gets the image: each blob goes up again from
/// its complete file, and the image reads back.
#[test]
fn a_blob_whose_upload_while_written_fails_goes_up_again_from_its_file() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    let files = push_big_layer(&source, work.path());
    let proxy = FaultProxy::start(&target.addr);
    proxy
        .state
        .refuse_patch
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let out = petrel()
        .args([
            "convert",
            &format!("docker://{}/big:v1", source.addr),
            &format!("docker://{}/big:petrel", proxy.addr),
        ])
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let refused = proxy.state.patches_refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused >= 2, "{refused} uploads while written were refused:\n{text}");
    assert_eq!(
        text.matches("not uploaded while it was written").count() as u64,
        refused,
        "each refused blob is named and uploaded again:\n{text}"
    );
    assert_mounted_files(&format!("docker://{}/big:petrel", target.addr), work.path(), &files);
}

/// A big layer that turns out corrupt while its blobs are being uploaded fails
/// the conversion cleanly: the blob being written is abandoned (its upload ends
/// with an error, not a blob), nothing hangs, and no tag is written.
#[test]
fn a_corrupt_big_layer_fails_the_conversion_while_its_blobs_upload() {
    if !registry_tools_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    push_big_layer(&source, work.path());
    let proxy = FaultProxy::start(&source.addr);
    // Blob GETs: the config, the layer's gzip trailer, then the layer, corrupted.
    proxy.plan(&[Fault::Pass, Fault::Pass, Fault::CorruptBody]);
    let out = convert_ending_within_two_minutes(
        &format!("docker://{}/big:v1", proxy.addr),
        &format!("docker://{}/big:petrel", target.addr),
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("layer 1"), "the error names the layer: {text}");
    // The corrupt header's bytes are not printed raw to the terminal.
    let error = text.lines().find(|l| l.contains("error:")).unwrap_or_default();
    assert!(!error.chars().any(char::is_control) && error.len() < 600, "{error:?}");
    let client = petrel_registry::RegistryClient::new(&target.addr, &Default::default()).unwrap();
    assert!(
        client.get_manifest("big", "petrel").is_err(),
        "no tag for a failed conversion"
    );
}

/// A big layer's blobs go up while the layer is still read: with the source
/// holding back the second half of the only layer, the target already receives
/// megabytes of the converted image, and the image then reads back whole.
#[test]
fn convert_uploads_a_big_layers_blobs_while_the_layer_is_still_read() {
    convert_while_the_second_half_is_held(None);
}

/// The same with a prefetch profile (the release workflow): blobs still go up
/// while the layer is read; the profiled files' chunks are held out of them and
/// stored once, in prefetch regions: pieces that go up while the layer is read
/// (the first half's profiled files, before its second half comes), and the
/// blob the conversion ends with.
#[test]
fn convert_with_a_prefetch_profile_uploads_while_the_layer_is_still_read() {
    // Three files of the first half (a piece of the region before the hold), one
    // of the second, and the head of a third.
    convert_while_the_second_half_is_held(Some(&[
        ("model/part05.bin", None),
        ("model/part06.bin", None),
        ("model/part07.bin", None),
        ("model/part30.bin", None),
        ("model/part33.bin", Some(4096)),
    ]));
}

/// A layer far under 32 MiB streams too: an image of a 20 MiB model, then 2 MiB
/// of data and a config file, pushes the model's layer while it is still read,
/// not after its pull, in one blob for nearly all of it (a directory read ahead
/// stays one request), and the image reads back whole.
#[test]
fn a_layer_under_32_mib_goes_up_while_it_is_still_read() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    let mut files = vec![("etc/os-release".to_string(), b"ID=test\n".to_vec())];
    let mut base = petrel_fixtures::layer_writer::LayerWriter::new();
    base.file(&files[0].0, &Default::default(), &files[0].1);
    let mut model = petrel_fixtures::layer_writer::LayerWriter::new();
    for i in 0..20 {
        let data = petrel_fixtures::rng::Rng::new(700 + i).bytes(1 << 20);
        model.file(&format!("model/part{i:02}.bin"), &Default::default(), &data);
        files.push((format!("model/part{i:02}.bin"), data));
    }
    let mut data = petrel_fixtures::layer_writer::LayerWriter::new();
    let data_bytes = 2u64 << 20;
    let table = petrel_fixtures::rng::Rng::new(799).bytes(data_bytes as usize);
    data.file("data/table.bin", &Default::default(), &table);
    files.push(("data/table.bin".to_string(), table));
    let mut config = petrel_fixtures::layer_writer::LayerWriter::new();
    config.file("etc/app.toml", &Default::default(), b"[app]\n");
    files.push(("etc/app.toml".to_string(), b"[app]\n".to_vec()));
    let layout = work.path().join("layout");
    let layers = [base.finish(), model.finish(), data.finish(), config.finish()];
    write_oci_layout(&layout, "v1", &layers).unwrap();
    source.push_layout(&layout, "tail", "v1");
    let proxy = FaultProxy::start(&source.addr);
    // Blob GETs: the config, the first layer, the model layer's gzip trailer (its
    // length uncompressed), then the model layer, whose second half is held.
    proxy.plan(&[Fault::Pass, Fault::Pass, Fault::Pass, Fault::HoldSecondHalf]);
    let converting = petrel()
        .env("PETREL_LOG", "info,petrel_builder=debug")
        .args([
            "convert",
            &format!("docker://{}/tail:v1", proxy.addr),
            &format!("docker://{}/tail:petrel", target.addr),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert_megabytes_arrive_while_the_second_half_is_held(&proxy, &target, "tail", converting, None);
    assert_mounted_files(&format!("docker://{}/tail:petrel", target.addr), work.path(), &files);
    let bootstrap = petrel_bootstrap(&target, "tail", "petrel");
    let bootstrap = petrel_format::Bootstrap::open(&bootstrap).unwrap();
    let mut blobs: Vec<u64> = bootstrap.blobs().map(|b| b.unwrap().uncompressed_size).collect();
    blobs.sort_unstable();
    let model_bytes = 20u64 << 20;
    assert!(
        blobs.last().is_some_and(|&biggest| biggest >= model_bytes * 7 / 8),
        "one blob holds nearly all of the model layer: {blobs:?}"
    );
    // The model and the data once, and at most the two small files beside them.
    let stored = blobs.iter().sum::<u64>();
    assert!(
        (model_bytes + data_bytes..=model_bytes + data_bytes + 14).contains(&stored),
        "every chunk stored once: {blobs:?}"
    );
}

/// Log lines a service might ship: they compress several times over, and better
/// at higher zstd levels.
fn service_logs(seed: u64, bytes: usize) -> Vec<u8> {
    let mut rng = petrel_fixtures::rng::Rng::new(seed);
    let paths = [
        "/api/v1/items",
        "/api/v1/users",
        "/healthz",
        "/static/app.js",
        "/api/v2/orders",
    ];
    let mut out = Vec::with_capacity(bytes + 200);
    while out.len() < bytes {
        let line = format!(
            "2026-12-02T{:02}:{:02}:{:02}.{:03}Z node-{} GET {}/{}?user={} {} {}ms\n",
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1000),
            rng.below(40),
            paths[rng.below(paths.len() as u64) as usize],
            rng.below(100_000),
            rng.below(5_000),
            [200, 200, 200, 304, 404, 500][rng.below(6) as usize],
            rng.below(900)
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// `--compression-level 9` stores less than the default level 3, the bootstrap
/// names the level, the files read back the same, and a conversion at one level is
/// not taken for one at another: the target's level-3 conversion of the same
/// source is rebuilt at 9, and the level-9 one is then found again.
#[test]
fn a_higher_compression_level_stores_less_and_is_a_conversion_of_its_own() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    let mut layer = petrel_fixtures::layer_writer::LayerWriter::new();
    let mut files = Vec::new();
    for i in 0..3 {
        let data = service_logs(900 + i, 2 << 20);
        layer.file(&format!("var/log/app-{i}.log"), &Default::default(), &data);
        files.push((format!("var/log/app-{i}.log"), data));
    }
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &[layer.finish()]).unwrap();
    source.push_layout(&layout, "logs", "v1");
    let convert = |level: Option<&str>| {
        let mut command = petrel();
        command.args([
            "convert",
            &format!("docker://{}/logs:v1", source.addr),
            &format!("docker://{}/logs:petrel", target.addr),
            "--no-chunk-dict",
            "--json",
        ]);
        if let Some(level) = level {
            command.args(["--compression-level", level]);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bootstrap = petrel_bootstrap(&target, "logs", "petrel");
        let bootstrap = petrel_format::Bootstrap::open(&bootstrap).unwrap();
        let stored: u64 = (0..bootstrap.chunk_count())
            .map(|i| u64::from(bootstrap.chunk(i).unwrap().compressed_size))
            .sum();
        let reused = summary["manifests"][0]["reused"] == true;
        (bootstrap.superblock().compression_level.get(), stored, reused)
    };
    let (level, default_bytes, reused) = convert(None);
    assert_eq!((level, reused), (3, false));
    let (level, level9_bytes, reused) = convert(Some("9"));
    assert_eq!((level, reused), (9, false), "level 9 is not the level-3 conversion");
    assert!(
        level9_bytes < default_bytes,
        "level 9 stored {level9_bytes} bytes, level 3 {default_bytes}"
    );
    assert!(convert(Some("9")).2, "the level-9 conversion is found again");
    assert_mounted_files(&format!("docker://{}/logs:petrel", target.addr), work.path(), &files);
    let out = petrel()
        .args([
            "convert",
            "docker://a/b:c",
            "docker://a/b:d",
            "--compression-level",
            "20",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        output_text(&out).contains("20 is not in 1..=19"),
        "{}",
        output_text(&out)
    );
}

/// Waits until the source (behind `proxy`) holds back the second half of a layer
/// and `target` received 4 MiB of `repository` meanwhile (a minute at most), then
/// lets the layer end and checks that `converting` succeeded and that the
/// megabytes did arrive while the layer was held.
fn assert_megabytes_arrive_while_the_second_half_is_held(
    proxy: &FaultProxy,
    target: &TestRegistry,
    repository: &str,
    converting: std::process::Child,
    arrives_while_held: Option<&[u8]>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let started = std::time::Instant::now();
    let enough = 4 << 20;
    let arrived = || arrives_while_held.is_none_or(|bytes| a_complete_blob_holds(target.dir.path(), bytes));
    while proxy.state.held.load(SeqCst) == 0 || bytes_received(target.dir.path(), repository) < enough || !arrived() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let received_while_held = bytes_received(target.dir.path(), repository);
    let arrived_while_held = arrived();
    let held = proxy.state.held.load(SeqCst);
    proxy.state.release.store(true, SeqCst);
    let out = converting.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(held > 0, "the layer's second half was held");
    assert!(
        received_while_held >= enough,
        "the target received {received_while_held} bytes while half of the layer was still to come:\n{}",
        output_text(&out)
    );
    assert!(
        arrived_while_held,
        "the wanted bytes were in no complete blob of the target while the layer's second half was held:\n{}",
        output_text(&out)
    );
}

/// Whether a blob that a test registry stored in `dir` holds whole contains `bytes`.
fn a_complete_blob_holds(dir: &Path, bytes: &[u8]) -> bool {
    walkdir_files(&dir.join("storage/docker/registry/v2/blobs/sha256"), 2)
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "data"))
        .filter_map(|p| std::fs::read(p).ok())
        .any(|data| data.windows(bytes.len()).any(|w| w == bytes))
}

/// The bootstrap of the petrel image `repository:tag` of `registry`, to open.
fn petrel_bootstrap(registry: &TestRegistry, repository: &str, tag: &str) -> Vec<u8> {
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let (bytes, ..) = client.get_manifest(repository, tag).unwrap();
    let manifest: petrel_registry::oci::Manifest = serde_json::from_slice(&bytes).unwrap();
    let digest = petrel_registry::oci::bootstrap_layer(&manifest)
        .unwrap()
        .digest()
        .to_string();
    let gzipped = client.get_blob_verified(repository, &digest, 1 << 30).unwrap();
    let mut wrapped = Vec::new();
    let entry = petrel_format::layer_tar::BOOTSTRAP_ENTRY;
    petrel_format::layer_tar::gunzip_layer(entry, &gzipped[..], &mut wrapped, 1 << 30).unwrap();
    petrel_format::layer_tar::unwrap(entry, &wrapped).unwrap().to_vec()
}

/// Converts a 40 MiB layer (with a profile of `profiled` files, each whole or
/// its first bytes) while the source holds back its second half.
fn convert_while_the_second_half_is_held(profiled: Option<&[(&str, Option<u64>)]>) {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    let files = push_big_layer(&source, work.path());
    let proxy = FaultProxy::start(&source.addr);
    // Blob GETs: the config, the layer's gzip trailer (its length uncompressed),
    // then the layer, whose second half is held.
    proxy.plan(&[Fault::Pass, Fault::Pass, Fault::HoldSecondHalf]);
    let mut command = petrel();
    command.env("PETREL_LOG", "info,petrel_registry=debug").args([
        "convert",
        &format!("docker://{}/big:v1", proxy.addr),
        &format!("docker://{}/big:petrel", target.addr),
    ]);
    if let Some(profiled) = profiled {
        let entries: Vec<serde_json::Value> = profiled
            .iter()
            .map(|(path, head)| match head {
                Some(len) => serde_json::json!({"path": path, "ranges": [[0, len]]}),
                None => serde_json::json!({"path": path}),
            })
            .collect();
        let profile = work.path().join("profile.json");
        std::fs::write(
            &profile,
            serde_json::to_vec(&serde_json::json!({"petrel_profile": 1, "entries": entries})).unwrap(),
        )
        .unwrap();
        command.arg("--prefetch-profile").arg(&profile);
    }
    let converting = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // With a profile, the first profiled file's bytes (incompressible, so stored
    // as they are) reach the target in a piece of the region while the second
    // half is held.
    let first_profiled = profiled.map(|p| {
        let (_, data) = files.iter().find(|(path, _)| path == p[0].0).unwrap();
        &data[..4096]
    });
    assert_megabytes_arrive_while_the_second_half_is_held(&proxy, &target, "big", converting, first_profiled);
    assert_mounted_files(&format!("docker://{}/big:petrel", target.addr), work.path(), &files);
    if let Some(profiled) = profiled {
        assert_profiled_files_stored_once_in_prefetch_regions(&target, profiled, (files.len() as u64) << 20);
    }
}

/// The image `big:petrel` of `registry` holds the wanted bytes of `profiled` in
/// prefetch regions, the first file's in a piece (a blob that is all region, not
/// the blob the conversion ended with), and its blobs hold the layer's
/// `layer_bytes` (incompressible) once, not the profiled files twice.
fn assert_profiled_files_stored_once_in_prefetch_regions(
    registry: &TestRegistry,
    profiled: &[(&str, Option<u64>)],
    layer_bytes: u64,
) {
    use petrel_format::reader::SegmentSource;
    let bootstrap = petrel_bootstrap(registry, "big", "petrel");
    let bootstrap = petrel_format::Bootstrap::open(&bootstrap).unwrap();
    let blobs: Vec<_> = bootstrap.blobs().map(Result::unwrap).collect();
    assert!(blobs.len() >= 3, "the layer went into several blobs: {}", blobs.len());
    for (i, (path, head)) in profiled.iter().enumerate() {
        let inode = bootstrap
            .walk()
            .map(Result::unwrap)
            .find(|e| e.path == path.as_bytes())
            .unwrap()
            .inode;
        let wanted = head.unwrap_or(inode.size());
        for segment in bootstrap.segments(&inode, 0, wanted).unwrap() {
            if let SegmentSource::Chunk { index, .. } = segment.source {
                let chunk = bootstrap.chunk(index).unwrap();
                let blob = &blobs[chunk.blob_index as usize];
                assert!(
                    chunk.compressed_offset < blob.prefetch_end,
                    "{path}: in a prefetch region"
                );
                if i == 0 {
                    assert_ne!(chunk.blob_index, 0, "{path}: in a piece, not the last blob");
                    assert_eq!(
                        blob.prefetch_end + layer_tail(blob),
                        blob.compressed_size,
                        "{path}: a piece is all region"
                    );
                }
            }
        }
    }
    let stored: u64 = blobs.iter().map(|b| b.uncompressed_size).sum();
    assert_eq!(stored, layer_bytes, "every chunk stored once");
}

/// What a blob (a one-entry tar) holds after its last chunk's stored bytes, if
/// they end at its `prefetch_end`: zeros to a block, and the tar's two zero blocks.
fn layer_tail(blob: &petrel_format::reader::BlobInfo) -> u64 {
    let data = blob.prefetch_end - petrel_format::layer_tar::DATA_OFFSET;
    data.next_multiple_of(512) - data + 1024
}

/// A layer that does not match its digest fails the conversion, after blobs of
/// earlier layers went out: the pushing thread is stopped, the error names the
/// layer, and the target tag is not written.
#[test]
fn a_corrupt_layer_mid_conversion_fails_it_cleanly() {
    if !registry_tools_available() {
        return;
    }
    let (source, target) = (TestRegistry::start(false), TestRegistry::start(false));
    let work = tempfile::tempdir().unwrap();
    push_sample(&source, work.path(), "src");
    let proxy = FaultProxy::start(&source.addr);
    // Blob GETs: the config, the first layer, then the second layer corrupted;
    // before a layer whose blobs stream, its gzip trailer.
    let mut plan = vec![Fault::Pass];
    for (i, size) in layout_layer_sizes(&work.path().join("layout"))
        .into_iter()
        .take(2)
        .enumerate()
    {
        if size >= petrel_convert::STREAM_ONE_BLOB_FROM {
            plan.push(Fault::Pass);
        }
        plan.push(if i == 0 { Fault::Pass } else { Fault::CorruptBody });
    }
    proxy.plan(&plan);
    let out = convert_ending_within_two_minutes(
        &format!("docker://{}/src:v1", proxy.addr),
        &format!("docker://{}/app:v1", target.addr),
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("layer 2"), "{text}");
    eprintln!("{text}");
    let client = petrel_registry::RegistryClient::new(&target.addr, &Default::default()).unwrap();
    assert!(
        client.get_manifest("app", "v1").is_err(),
        "no tag for a failed conversion"
    );
}

#[test]
fn local_builds_reference_a_chunk_dictionary() {
    let work = tempfile::tempdir().unwrap();
    let (release_n, next) = release_pair();
    let write = |name: &str, layers: &[Vec<petrel_fixtures::layer_spec::Op>]| {
        let tars: Vec<Vec<u8>> = layers.iter().map(|ops| write_layer(ops, "")).collect();
        petrel_fixtures::write_layer_files(&work.path().join(name), &tars).unwrap()
    };
    let (n, n1) = (write("n", &release_n), write("n1", &next));
    let base = work.path().join("image-n");
    let mut build = petrel();
    build.arg("build").arg("-o").arg(&base).args(&n);
    assert!(build.status().unwrap().success());
    let image = work.path().join("image-n1");
    let mut build = petrel();
    build
        .arg("build")
        .arg("--json")
        .arg("--chunk-dict")
        .arg(&base)
        .arg("-o")
        .arg(&image)
        .args(&n1);
    let out = build.output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_blob = report["output"]["blob"]["size"].as_u64().unwrap();
    let base_blob = report["output"]["dict_blobs"][0]["size"].as_u64().unwrap();
    assert!(new_blob * 5 < base_blob, "new {new_blob} vs base {base_blob}");
    let check = petrel().arg("check").arg(&image).output().unwrap();
    assert!(check.status.success(), "{}", output_text(&check));
    let target = work.path().join("out");
    assert!(petrel()
        .arg("unpack")
        .arg(&image)
        .arg(&target)
        .status()
        .unwrap()
        .success());
    assert_tree(&reference_merge(&next), &target);
    // The two releases share most of their chunks.
    let out = petrel()
        .arg("stats")
        .arg("--dedup")
        .arg(&base)
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let dedup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (shared, unique) = (
        dedup["shared_bytes"].as_u64().unwrap(),
        dedup["unique_bytes"].as_u64().unwrap(),
    );
    assert!(shared * 10 > unique * 8, "{dedup}");
    let overlap = dedup["images"][1]["overlap_bytes"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_u64()
        .unwrap();
    assert_eq!(overlap, dedup["images"][1]["shared_bytes"].as_u64().unwrap());
}

#[test]
fn a_standalone_dictionary_serves_as_chunk_dict() {
    let work = tempfile::tempdir().unwrap();
    let (release_n, next) = release_pair();
    let tars_n: Vec<Vec<u8>> = release_n.iter().map(|ops| write_layer(ops, "")).collect();
    let tars_n1: Vec<Vec<u8>> = next.iter().map(|ops| write_layer(ops, "")).collect();
    let n = petrel_fixtures::write_layer_files(&work.path().join("n"), &tars_n).unwrap();
    let n1 = petrel_fixtures::write_layer_files(&work.path().join("n1"), &tars_n1).unwrap();
    let base = work.path().join("base");
    assert!(petrel()
        .arg("build")
        .arg("-o")
        .arg(&base)
        .args(&n)
        .status()
        .unwrap()
        .success());
    let dict = work.path().join("dict");
    let out = petrel()
        .args(["dict", "build", "--max-bytes", "30000000", "-o"])
        .arg(&dict)
        .arg(&base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["bytes"].as_u64().unwrap() <= 30_000_000 && report["chunks"].as_u64().unwrap() > 0,
        "{report}"
    );
    let image = work.path().join("image");
    let out = petrel()
        .arg("build")
        .arg("--json")
        .arg("--chunk-dict")
        .arg(&dict)
        .arg("-o")
        .arg(&image)
        .args(&n1)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!built["output"]["dict_blobs"].as_array().unwrap().is_empty(), "{built}");
    let target = work.path().join("out");
    assert!(petrel()
        .arg("unpack")
        .arg(&image)
        .arg(&target)
        .status()
        .unwrap()
        .success());
    assert_tree(&reference_merge(&next), &target);
}

/// Edge autonomy: a node that warmed an image starts it again with the registry
/// gone, by tag (its last resolution, not refreshed) and by digest, and serves every
/// file from its cache; a reference it never resolved fails with a clear error.
#[test]
fn a_warmed_image_mounts_and_reads_with_the_registry_gone() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let mut registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&registry, work.path());
    let cache = work.path().join("cache");
    let image = format!("docker://{}/{reference}", registry.addr);
    let out = petrel()
        .args(["warm", &image, "--all", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let (repository, tag) = reference.split_once(':').unwrap();
    let (_, _, digest) = client.get_manifest(repository, tag).unwrap();

    registry.stop();
    let offline = ["--retries", "2", "--retry-seconds", "2"];
    for (name, reference) in [
        ("by-tag", image.clone()),
        ("by-digest", format!("docker://{}/{repository}@{digest}", registry.addr)),
    ] {
        let mount = MountProcess::start(&reference, &work.path().join(name), &cache, &offline);
        for (path, data) in big_files() {
            assert_eq!(
                std::fs::read(mount.mountpoint.join(&path)).unwrap(),
                data,
                "{name}: {path}"
            );
        }
        let log = std::fs::read_to_string(cache.with_extension("log")).unwrap_or_default();
        if name == "by-tag" {
            assert!(log.contains("tag could not be refreshed"), "{log}");
        }
    }
    let out = petrel()
        .arg("mount")
        .arg(format!("docker://{}/{repository}:never-resolved", registry.addr))
        .arg(work.path().join("never"))
        .arg("--cache-dir")
        .arg(&cache)
        .args(offline)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(output_text(&out).contains("gave up"), "{}", output_text(&out));
    registry.restart();
}

/// Proxies come from the environment, and `NO_PROXY` follows the usual conventions:
/// `localhost` covers the loopback addresses, CIDRs work.
#[test]
fn proxies_from_the_environment_follow_no_proxy_conventions() {
    if !registry_tools_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    write_oci_layout(&work.path().join("layout"), "v1", &edge_layers()).unwrap();
    registry.push_layout(&work.path().join("layout"), "proxied", "v1");
    let dead_proxy = format!("http://127.0.0.1:{}", free_port());
    let convert_via = |no_proxy: Option<&str>, out: &str| {
        let mut command = petrel();
        command
            .arg("convert")
            .arg(format!("docker://{}/proxied:v1", registry.addr))
            .arg(format!("oci:{}", work.path().join(out).display()))
            .args(["--retries", "1", "--retry-seconds", "1"])
            .env("HTTP_PROXY", &dead_proxy)
            .env_remove("http_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        if let Some(list) = no_proxy {
            command.env("NO_PROXY", list);
        }
        command.output().unwrap()
    };
    let out = convert_via(None, "through-the-proxy");
    assert!(
        !out.status.success(),
        "the (dead) proxy was used: {}",
        output_text(&out)
    );
    for (list, out) in [("localhost", "localhost"), ("example.com, 127.0.0.0/8", "cidr")] {
        let result = convert_via(Some(list), out);
        assert!(result.status.success(), "NO_PROXY={list}: {}", output_text(&result));
    }
}

/// Distribution through a real pull-through mirror (docker-registry's proxy mode, the
/// role a node-local dfdaemon plays): three nodes with caches of their own read the
/// whole image through one mirror, and the origin serves each blob to the mirror
/// about once, not once per node.
#[test]
fn nodes_behind_a_pull_through_mirror_fetch_from_the_origin_once() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    use std::sync::atomic::Ordering::SeqCst;
    let origin = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&origin, work.path());
    let counter = FaultProxy::start(&origin.addr);
    let mirror = TestRegistry::start_mirror_of(&counter.addr);
    let files = big_files();
    for node in 0..3 {
        let mount = MountProcess::start(
            &format!("docker://{}/{reference}", origin.addr),
            &work.path().join(format!("mnt{node}")),
            &work.path().join(format!("cache{node}")),
            &["--mirror", &format!("http://{}", mirror.addr), "--prefetch", "off"],
        );
        for (path, data) in &files {
            assert_eq!(
                &std::fs::read(mount.mountpoint.join(path)).unwrap(),
                data,
                "node {node}: {path}"
            );
        }
    }
    // Two blobs (the chunk blob and the bootstrap); the mirror may ask twice while its
    // first copy is still streaming in. Without the mirror it would be hundreds of
    // range requests per node.
    let origin_blob_requests = counter.state.blob_requests.load(SeqCst);
    eprintln!("origin blob requests for 3 nodes behind the mirror: {origin_blob_requests}");
    assert!(
        (1..=6).contains(&origin_blob_requests),
        "the origin served {origin_blob_requests} blob requests for 3 nodes"
    );
}

/// Nodes that warm the same image at once through one cold pull-through mirror
/// (docker-registry in proxy mode) cost the origin about one copy of it, the
/// mirror's own: background reads wait while the mirror fills instead of making it
/// stream the whole blob from the origin once per request (`registry::warmth`).
/// The uplink runs at an edge site's 64 Mbit/s: what the mirror streams for each
/// node's first question before its connection closes grows with the link's rate
/// times the hosts' scheduling delays (at 200 Mbit/s on a busy CI host, up to 2 MB
/// a question, a sixth of this image).
#[test]
fn nodes_warming_at_once_through_a_cold_mirror_cost_the_origin_one_copy() {
    if !registry_tools_available() {
        return;
    }
    let origin = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let mut layer = petrel_fixtures::layer_writer::LayerWriter::new();
    layer.file(
        "data/model.bin",
        &Default::default(),
        &petrel_fixtures::rng::Rng::new(7).bytes(12 << 20),
    );
    write_oci_layout(&work.path().join("layout"), "v1", &[layer.finish()]).unwrap();
    origin.push_layout(&work.path().join("layout"), "model", "v1");
    let out = petrel()
        .arg("convert")
        .arg(format!("docker://{}/model:v1", origin.addr))
        .arg(format!("docker://{}/model:petrel", origin.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let uplink = support::uplink::Uplink::start(&origin.addr, 8 << 20);
    let image = format!("docker://{}/model:petrel", uplink.addr);
    let warm = |cache: &str, mirror: Option<&str>| {
        let mut command = petrel();
        command
            .args(["warm", &image, "--all", "--cache-dir"])
            .arg(work.path().join(cache));
        if let Some(mirror) = mirror {
            command.args(["--mirror", &format!("http://{mirror}")]);
        }
        command.spawn().unwrap()
    };
    assert!(warm("direct", None).wait().unwrap().success());
    let one_copy = uplink.delivered();
    let mirror = TestRegistry::start_mirror_of(&uplink.addr);
    let nodes: Vec<_> = (0..3)
        .map(|node| warm(&format!("node{node}"), Some(&mirror.addr)))
        .collect();
    for mut node in nodes {
        assert!(node.wait().unwrap().success(), "every node warmed (chunks verified)");
    }
    let behind_mirror = uplink.delivered() - one_copy;
    eprintln!("origin bytes: one node direct {one_copy}, three nodes behind the mirror {behind_mirror}");
    assert!(
        (behind_mirror as f64) < 1.5 * one_copy as f64,
        "three nodes behind a cold mirror cost the origin {behind_mirror} bytes; one node alone {one_copy}"
    );
}

/// A node that reaches its registry only through an HTTP proxy (Debian's tinyproxy):
/// `HTTP_PROXY` in the environment carries the resolve and every lazy read of a
/// `--daemon` mount, and the bytes are right.
#[test]
fn a_lazy_mount_reads_through_a_real_http_proxy() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    if std::process::Command::new("tinyproxy").arg("-v").output().is_err() {
        petrel_fixtures::report_skip("needs tinyproxy (apt-get install tinyproxy)");
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let reference = big_image(&registry, work.path());
    let port = free_port();
    let log = work.path().join("tinyproxy.log");
    let config = work.path().join("tinyproxy.conf");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nAllow 127.0.0.1\nLogLevel Info\nLogFile \"{}\"\n",
            log.display()
        ),
    )
    .unwrap();
    let mut proxy = std::process::Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "tinyproxy did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let out = petrel()
        .arg("mount")
        .arg(format!("docker://{}/{reference}", registry.addr))
        .arg(&mountpoint)
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .arg("--runtime-dir")
        .arg(work.path().join("run"))
        .args(["--prefetch", "off", "--daemon"])
        .env("HTTP_PROXY", format!("http://127.0.0.1:{port}"))
        .env_remove("http_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    for (path, data) in big_files() {
        assert_eq!(std::fs::read(mountpoint.join(&path)).unwrap(), data, "{path}");
    }
    let out = petrel().arg("umount").arg(&mountpoint).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let _ = proxy.kill();
    let _ = proxy.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let blob_reads = text
        .lines()
        .filter(|l| l.contains(&format!("GET http://{}/v2/faults/blobs/", registry.addr)))
        .count();
    assert!(
        text.contains(&format!("GET http://{}/v2/faults/manifests/", registry.addr)) && blob_reads >= 2,
        "the manifest and the blobs went through the proxy ({blob_reads} blob requests):\n{text}"
    );
}

/// skopeo's `--src-tls-verify=false` / `--dest-tls-verify=false` on `convert`: plain
/// HTTP to a registry that is not on localhost, each side on its own; without them
/// petrel speaks HTTPS and says so when it fails.
#[test]
fn convert_takes_skopeos_tls_verify_flags_for_each_side() {
    if !registry_tools_available() {
        return;
    }
    let Some(ip) = non_loopback_ipv4() else {
        petrel_fixtures::report_skip("this machine has no IPv4 address outside loopback");
        return;
    };
    let registry = TestRegistry::start_on(&ip);
    let work = tempfile::tempdir().unwrap();
    write_oci_layout(&work.path().join("layout"), "v1", &edge_layers()).unwrap();
    registry.push_layout(&work.path().join("layout"), "insecure", "v1");
    let convert = |flags: &[&str], tag: &str| {
        petrel()
            .args([
                "convert",
                &format!("docker://{}/insecure:v1", registry.addr),
                &format!("docker://{}/insecure:{tag}", registry.addr),
                "--retries",
                "1",
                "--retry-seconds",
                "2",
            ])
            .args(flags)
            .output()
            .unwrap()
    };
    let out = convert(&[], "a");
    assert!(!out.status.success(), "HTTPS by default: {}", output_text(&out));
    assert!(output_text(&out).contains("https://"), "{}", output_text(&out));
    let out = convert(&["--src-tls-verify=false"], "b");
    assert!(
        !out.status.success(),
        "the target still needs HTTPS: {}",
        output_text(&out)
    );
    let out = convert(&["--src-tls-verify=false", "--dest-tls-verify", "false"], "c");
    assert!(out.status.success(), "{}", output_text(&out));
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/insecure:c", registry.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success() && output_text(&out).contains("petrel"),
        "the petrel image is in the registry: {}",
        output_text(&out)
    );
}

/// The blobs of the layer-records artifact that the referrers tag of image
/// `repository:tag` lists (a registry without the referrers API).
fn layer_record_blobs(registry: &TestRegistry, repository: &str, tag: &str) -> Vec<String> {
    let r = &registry.addr;
    let digest = {
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{r}/{repository}:{tag}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&out.stdout))
        )
    };
    let index = skopeo_inspect(
        &format!("docker://{r}/{repository}:{}", digest.replacen(':', "-", 1)),
        None,
    );
    let artifact = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == "application/vnd.dev.petrel.layer-records.v1")
        .unwrap_or_else(|| panic!("no layer records listed: {index}"));
    let artifact = skopeo_inspect(
        &format!("docker://{r}/{repository}@{}", artifact["digest"].as_str().unwrap()),
        None,
    );
    artifact["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], "application/vnd.dev.petrel.layer-record.v1+zstd");
            l["digest"].as_str().unwrap().to_string()
        })
        .collect()
}

/// A new release whose lower layers did not change: they are applied from the
/// records the previous release's image carries and never fetched, and the image
/// is the one reading every layer gives. A record corrupt in the registry only
/// costs its layer's fetch.
#[test]
fn a_new_release_applies_its_unchanged_layers_from_their_records_and_fetches_only_the_changed_one() {
    use petrel_fixtures::layer_spec::Op;
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let r = &registry.addr;
    let app = |release: &str| {
        let main = Op::File {
            path: "app/main.py".into(),
            meta: petrel_fixtures::layer_writer::EntryMeta::mode(0o644),
            data: format!("print('release {release}')\n").into_bytes(),
        };
        write_layer(&[main], "")
    };
    for release in ["1", "2", "3"] {
        let mut tars = edge_layers();
        tars.push(app(release));
        write_oci_layout(&work.path().join(release), "v1", &tars).unwrap();
        registry.push_layout(&work.path().join(release), "src", release);
    }
    let sizes = layout_layer_sizes(&work.path().join("2"));
    let first = convert(&format!("docker://{r}/src:1"), &format!("docker://{r}/app:1"), None);
    let recorded = first["manifests"][0]["recorded_layers"].as_u64().unwrap();
    assert_eq!(first["manifests"][0]["replayed_layers"], 0, "{first}");

    let second = convert(&format!("docker://{r}/src:2"), &format!("docker://{r}/app:2"), None);
    let m = &second["manifests"][0];
    assert_eq!(second["chunk_dicts"][0]["image"], format!("docker://{r}/app:1"));
    // Every layer but the app's has its record, and only the app layer is read.
    assert_eq!(recorded, 4, "{first}");
    assert_eq!(m["replayed_layers"], 3, "{second}");
    assert_eq!(m["source_bytes"].as_u64().unwrap(), sizes[3], "{second}");
    assert_eq!(m["recorded_layers"], 4, "{second}");

    // The same image as reading every layer gives.
    let out = petrel()
        .args(["convert", "--json", "--no-layer-records"])
        .arg(format!("docker://{r}/src:2"))
        .arg(format!("docker://{r}/full:2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let full: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        full["manifests"][0]["source_bytes"].as_u64().unwrap(),
        sizes.iter().sum::<u64>()
    );
    let replayed = MountProcess::start(
        &format!("docker://{r}/app:2"),
        &work.path().join("mnt-replayed"),
        &work.path().join("cache"),
        &[],
    );
    let read = MountProcess::start(
        &format!("docker://{r}/full:2"),
        &work.path().join("mnt-read"),
        &work.path().join("cache"),
        &[],
    );
    assert_tree(&scan(&read.mountpoint).unwrap(), &replayed.mountpoint);
    assert_eq!(
        std::fs::read(replayed.mountpoint.join("app/main.py")).unwrap(),
        b"print('release 2')\n"
    );
    drop((replayed, read));

    // Corrupt records in the registry: their layers are read from the source.
    let blobs = layer_record_blobs(&registry, "app", "2");
    assert_eq!(blobs.len(), 4, "{blobs:?}");
    for blob in &blobs {
        let data = registry.blob_data_path(blob);
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&data, bytes).unwrap();
    }
    let out = petrel()
        .args(["convert", "--json"])
        .arg(format!("docker://{r}/src:3"))
        .arg(format!("docker://{r}/app:3"))
        .arg("--chunk-dict")
        .arg(format!("docker://{r}/app:2"))
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("is not usable"), "{text}");
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["manifests"][0]["replayed_layers"], 0, "{again}");
    assert_eq!(
        again["manifests"][0]["source_bytes"].as_u64().unwrap(),
        layout_layer_sizes(&work.path().join("3")).iter().sum::<u64>()
    );
    let mount = MountProcess::start(
        &format!("docker://{r}/app:3"),
        &work.path().join("mnt-again"),
        &work.path().join("cache2"),
        &[],
    );
    // Release 3's tree is release 2's with its own app/main.py.
    let full = MountProcess::start(
        &format!("docker://{r}/full:2"),
        &work.path().join("mnt-full"),
        &work.path().join("cache3"),
        &[],
    );
    let mut expected = scan(&full.mountpoint).unwrap();
    drop(full);
    expected.get_mut(b"app/main.py".as_slice()).unwrap().kind =
        petrel_fixtures::snapshot::file_kind(b"print('release 3')\n");
    assert_tree(&expected, &mount.mountpoint);
    assert_eq!(
        std::fs::read(mount.mountpoint.join("app/main.py")).unwrap(),
        b"print('release 3')\n"
    );
}

/// With a prefetch profile too: release 2 converted `--prefetch-from` release 1
/// applies its unchanged layers from their records, since the chunks the profile
/// wants of them lie in release 1's prefetch region, which stays one in release 2
/// (where a mount prefetches it); only the changed layer is read.
#[test]
fn a_profiled_release_applies_the_unchanged_layers_whose_profiled_chunks_lie_in_the_region_before() {
    use petrel_fixtures::layer_spec::Op;
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let work = tempfile::tempdir().unwrap();
    let r = &registry.addr;
    for release in ["1", "2"] {
        let main = Op::File {
            path: "app/main.py".into(),
            meta: petrel_fixtures::layer_writer::EntryMeta::mode(0o644),
            data: format!("print('release {release}')\n").into_bytes(),
        };
        let mut tars = edge_layers();
        tars.push(write_layer(&[main], ""));
        write_oci_layout(&work.path().join(release), "v1", &tars).unwrap();
        registry.push_layout(&work.path().join(release), "src", release);
    }
    let profile = work.path().join("profile.json");
    std::fs::write(
        &profile,
        br#"{"petrel_profile":1,"entries":[{"path":"usr/bin/ping"},{"path":"app/main.py"}]}"#,
    )
    .unwrap();
    let out = petrel()
        .args(["convert", "--json", "--prefetch-profile"])
        .arg(&profile)
        .arg(format!("docker://{r}/src:1"))
        .arg(format!("docker://{r}/app:1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let out = petrel()
        .args(["convert", "--json", "--prefetch-from"])
        .arg(format!("docker://{r}/app:1"))
        .arg(format!("docker://{r}/src:2"))
        .arg(format!("docker://{r}/app:2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sizes = layout_layer_sizes(&work.path().join("2"));
    assert_eq!(second["manifests"][0]["replayed_layers"], 3, "{second}");
    assert_eq!(second["manifests"][0]["source_bytes"].as_u64().unwrap(), sizes[3]);
    // Release 2's prefetch set: ping where release 1 laid it out, main.py in
    // its own new region; both regions are regions of release 2.
    let bytes = petrel_bootstrap(&registry, "app", "2");
    let bootstrap = petrel_format::Bootstrap::open(&bytes).unwrap();
    assert_eq!(bootstrap.prefetch_len(), 2);
    let region_of = |path: &[u8]| {
        let entry = bootstrap
            .walk()
            .map(Result::unwrap)
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(path)));
        let segments = bootstrap.segments(&entry.inode, 0, entry.inode.size()).unwrap();
        segments
            .iter()
            .filter_map(|s| match s.source {
                petrel_format::reader::SegmentSource::Chunk { index, .. } => Some(index),
                _ => None,
            })
            .map(|index| {
                let chunk = bootstrap.chunk(index).unwrap();
                let blob = bootstrap.blob(chunk.blob_index).unwrap();
                assert!(chunk.compressed_offset < blob.prefetch_end, "in a region");
                blob.digest
            })
            .collect::<Vec<_>>()
    };
    let (ping, main) = (region_of(b"usr/bin/ping"), region_of(b"app/main.py"));
    assert_ne!(ping[0], main[0], "ping stays in release 1's region");
    let replayed = MountProcess::start(
        &format!("docker://{r}/app:2"),
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &[],
    );
    let out = petrel()
        .args(["convert", "--no-layer-records", "--no-chunk-dict"])
        .arg(format!("docker://{r}/src:2"))
        .arg(format!("docker://{r}/full:2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let read = MountProcess::start(
        &format!("docker://{r}/full:2"),
        &work.path().join("mnt-read"),
        &work.path().join("cache-read"),
        &[],
    );
    assert_tree(&scan(&read.mountpoint).unwrap(), &replayed.mountpoint);
}

/// A registry on loopback that speaks only TLS, under a private CA: given the
/// CA's file, `petrel convert` pulls from it and pushes to it over TLS and
/// `petrel mount` reads the image lazily from it; given another CA's file, the
/// registry's certificate is refused and the error says so (certificates are
/// always checked, `docs/security.md`).
#[test]
fn a_loopback_registry_speaking_tls_is_reached_with_its_ca_and_refused_with_another() {
    if !registry_tools_available() || !fuse_available() {
        return;
    }
    let (Some(ca), Some(other_ca)) = (TestCa::new(), TestCa::new()) else {
        return;
    };
    let registry = TestRegistry::start_tls(&ca.path("server.pem"), &ca.path("server.key"));
    let work = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("srv/file{i}"),
                petrel_fixtures::rng::Rng::new(40 + i).bytes(300_000 + i as usize),
            )
        })
        .collect();
    let mut layer = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in &files {
        layer.file(path, &Default::default(), data);
    }
    write_oci_layout(&work.path().join("layout"), "v1", &[layer.finish()]).unwrap();
    registry.push_layout(&work.path().join("layout"), "tls", "v1");
    let (source, target) = (
        format!("docker://{}/tls:v1", registry.addr),
        format!("docker://{}/tls:petrel", registry.addr),
    );

    let refused = petrel()
        .args(["convert", &source, &target, "--retries", "0", "--ca-file"])
        .arg(other_ca.path("ca.pem"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "another CA's certificate was accepted");
    assert!(
        output_text(&refused).contains("certificate"),
        "the error names the certificate: {}",
        output_text(&refused)
    );

    let ca_file = ca.path("ca.pem");
    let ca_arg = ca_file.to_str().unwrap();
    let converted = petrel()
        .args(["convert", &source, &target, "--ca-file", ca_arg])
        .output()
        .unwrap();
    assert!(converted.status.success(), "{}", output_text(&converted));
    let mount = MountProcess::start(
        &target,
        &work.path().join("mnt"),
        &work.path().join("cache"),
        &["--ca-file", ca_arg],
    );
    for (path, data) in &files {
        assert!(
            std::fs::read(mount.mountpoint.join(path)).unwrap() == *data,
            "{path} reads back over TLS as written"
        );
    }
}
