//! petrel's snapshotter under a real containerd 1.6 + runc: an ordinary OCI image
//! pulls (containerd applies its layers into our snapshots), runs, survives a
//! snapshotter restart, and its snapshots are gone once it is removed.

mod support;

use support::busybox_image::*;
use support::containerd::Containerd;
use support::cri::*;
use support::*;

/// Runs a CRI-namespace container of `image` that prints its /etc/motd.
fn cat_motd(containerd: &Containerd, image: &str, name: &str) -> std::process::Output {
    containerd.run_container("k8s.io", image, name, &["/bin/busybox", "cat", "/etc/motd"])
}

#[test]
fn an_ordinary_image_pulls_runs_and_is_cleaned_up() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let mut containerd = Containerd::start();
    let layout = containerd.path("layout");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[busybox_layer()]).unwrap();
    registry.push_layout(&layout, "busy", "v1");
    let image = format!("{}/busy:v1", registry.addr);

    let out = containerd.ctr(&["images", "pull", "--plain-http", "--snapshotter", "petrel", &image]);
    assert!(out.status.success(), "pull: {}", text(&out));
    let out = containerd.ctr(&["snapshots", "--snapshotter", "petrel", "ls"]);
    assert!(text(&out).contains("Committed"), "{}", text(&out));

    // Metadata survives a restart of the snapshotter.
    containerd.restart_snapshotter();
    let out = containerd.run_container("default", &image, "petrel-e2e", &["/bin/busybox", "cat", "/etc/motd"]);
    assert!(out.status.success(), "run: {}", text(&out));
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}",
        text(&out)
    );

    let out = containerd.ctr(&["images", "rm", "--sync", &image]);
    assert!(out.status.success(), "rm: {}", text(&out));
    let started = std::time::Instant::now();
    loop {
        let listing = text(&containerd.ctr(&["snapshots", "--snapshotter", "petrel", "ls"]));
        if !listing.contains("Committed") {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "snapshots left: {listing}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = std::fs::read_dir(containerd.snapshotter_root().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "snapshot directories are removed");
}

/// Whether `pid` runs (a zombie waiting for its reaper counts as gone).
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_petrel_image_pulled_through_cri_runs_lazily_without_downloading_its_blobs() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    let converted = convert_busybox(&registry, &containerd, "busy", "petrel", &["--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&converted).unwrap();
    let blob = summary["manifests"][0]["blobs"][0][0].as_str().unwrap().to_string();

    let image = format!("{}/busy:petrel", registry.addr);
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap_or_else(|e| {
        panic!(
            "CRI pull: {e}\nsnapshotter log:\n{}",
            std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
        )
    });
    let content = text(&containerd.ctr(&["-n", "k8s.io", "content", "ls"]));
    let stored: Vec<&str> = content.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(
        !stored.contains(&blob.as_str()),
        "the petrel blob was never downloaded into containerd:\n{content}"
    );
    assert!(stored.len() >= 2, "manifest and config only: {content}");
    let out = cat_motd(&containerd, &image, "lazy-e2e");
    assert!(
        out.status.success(),
        "run: {}\nsnapshotter log:\n{}",
        text(&out),
        std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
    );
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}",
        text(&out)
    );

    // A running container keeps reading its lazy files across a snapshotter restart.
    let mut containerd = containerd;
    let out = containerd.ctr(&[
        "-n",
        "k8s.io",
        "run",
        "-d",
        "--snapshotter",
        "petrel",
        &image,
        "lazy-bg",
        "/bin/busybox",
        "sleep",
        "60",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out));
    containerd.restart_snapshotter();
    let out = containerd.ctr(&[
        "-n",
        "k8s.io",
        "task",
        "exec",
        "--exec-id",
        "read",
        "lazy-bg",
        "/bin/busybox",
        "cat",
        "/etc/motd",
    ]);
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "exec after restart: {}",
        text(&out)
    );
    let _ = containerd.ctr(&["-n", "k8s.io", "task", "kill", "-s", "SIGKILL", "lazy-bg"]);
    let started = std::time::Instant::now();
    while !containerd
        .ctr(&["-n", "k8s.io", "task", "delete", "lazy-bg"])
        .status
        .success()
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "task did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(containerd
        .ctr(&["-n", "k8s.io", "containers", "delete", "lazy-bg"])
        .status
        .success());

    // The snapshotter's Prometheus endpoint reports the lazy mount's counters, and
    // an idle connection (a stuck scraper, a local user) does not hold up a scrape.
    let _idle = std::net::TcpStream::connect(containerd.metrics_address()).unwrap();
    let metrics = containerd.metrics();
    assert!(
        metrics.contains("petrel_snapshotter_lazy_mounts 1") && metrics.contains("petrel_backend_bytes_total"),
        "{metrics}"
    );
    assert!(
        metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"),
        "{metrics}"
    );
    // OpenMetrics, as prometheus-client encodes it: the snapshotter encodes every
    // daemon's counters once (from their stats), it does not splice their texts.
    assert!(
        metrics
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text")
            && metrics.trim_end().ends_with("# EOF")
            && metrics.matches("# TYPE petrel_backend_bytes counter").count() == 1,
        "{metrics}"
    );
    // Scrapes run concurrently, over HTTP/1.1 as well; other paths are not metrics.
    let scrape = |request: &'static [u8]| {
        let address = containerd.metrics_address();
        std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            std::io::Write::write_all(&mut stream, request).unwrap();
            let mut answer = String::new();
            std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
            answer
        })
    };
    let scrapes: Vec<_> = (0..4)
        .map(|_| scrape(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"))
        .collect();
    for answer in scrapes.into_iter().map(|s| s.join().unwrap()) {
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("petrel_reads_total"),
            "{answer}"
        );
    }
    let other = scrape(b"GET /secrets HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .join()
        .unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    // A mount daemon that dies is remounted when the snapshotter starts again.
    let run_dir = containerd.snapshotter_root().join("run");
    let pid_file = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "pid"))
        .expect("daemon pid file");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let _ = containerd.ctr(&["-n", "k8s.io", "task", "kill", "-s", "SIGKILL", "lazy-bg"]);
    // Only the daemon this test's snapshotter started.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let started = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    containerd.restart_snapshotter();
    let started = std::time::Instant::now();
    while !petrel_fuse_daemon::mount::is_mounted(
        &run_dir
            .parent()
            .unwrap()
            .join("mounts")
            .join(pid_file.file_stem().unwrap()),
    ) {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let logs: String = std::fs::read_dir(&run_dir)
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect();
            panic!(
                "not remounted; daemon log:\n{logs}\nsnapshotter log:\n{}",
                std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // containerd may refuse to reach a restarted snapshotter for a moment: retry the real call.
    let started = std::time::Instant::now();
    let out = loop {
        let out = cat_motd(&containerd, &image, "after-remount");
        if out.status.success()
            || !text(&out).contains("unavailable")
            || started.elapsed() > std::time::Duration::from_secs(20)
        {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "after the daemon died: {}\nsnapshotter log:\n{}",
        text(&out),
        std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
    );

    let remounted_pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(process_alive(remounted_pid), "the remounted daemon runs");

    // The lazy mount belongs to the image and stays while containerd references it.
    let root = containerd.snapshotter_root().to_string_lossy().to_string();
    let lazy_mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root) && l.contains(" - fuse petrel:"))
        .count();
    assert_eq!(lazy_mounts, 1, "one lazy mount (one daemon) for the image");

    // A mixed stack: an ordinary layer committed on top of the lazy image (what a
    // build on a lazy base does), then a snapshot of both sees the files of each.
    let lazy_top = text(&containerd.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "petrel", "ls"]))
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 3 && f[2] == "Committed")
        .map(|f| f[0].to_string())
        .expect("the image's top layer");
    let snapshots = |args: &[&str]| {
        let out = containerd.ctr(&[&["-n", "k8s.io", "snapshots", "--snapshotter", "petrel"], args].concat());
        assert!(out.status.success(), "snapshots {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mount_snapshot = |key: &str, target: &std::path::Path| {
        std::fs::create_dir_all(target).unwrap();
        let command = snapshots(&["mounts", &target.to_string_lossy(), key]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(command.trim())
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}: {}", text(&out));
    };
    let unmount = |target: &std::path::Path| {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty()).unwrap();
    };
    snapshots(&["prepare", "mixed-build", &lazy_top]);
    let build = containerd.path("mixed-build");
    mount_snapshot("mixed-build", &build);
    std::fs::write(build.join("added-by-build"), "a plain layer on a lazy one\n").unwrap();
    unmount(&build);
    snapshots(&["commit", "mixed-layer", "mixed-build"]);
    snapshots(&["prepare", "mixed-run", "mixed-layer"]);
    let run = containerd.path("mixed-run");
    mount_snapshot("mixed-run", &run);
    let lazy_file = std::fs::read_to_string(run.join("etc/motd"));
    let plain_file = std::fs::read_to_string(run.join("added-by-build"));
    unmount(&run);
    assert!(lazy_file.unwrap().contains("served through petrel's snapshotter"));
    assert_eq!(plain_file.unwrap(), "a plain layer on a lazy one\n");
    snapshots(&["rm", "mixed-run"]);
    snapshots(&["rm", "mixed-layer"]);

    // A lazy mount no snapshot owns (as a crash between a Remove's metadata change and
    // its unmount leaves behind): Cleanup, which containerd's GC calls, releases it.
    let snapshotter_root = containerd.snapshotter_root();
    let orphan = snapshotter_root.join("mounts").join("orphan000000");
    // containerd's GC may run Cleanup at any moment, even while this mount starts: retry.
    let mut attempts = 0;
    let orphan_pid: i32 = loop {
        attempts += 1;
        std::fs::create_dir_all(&orphan).unwrap();
        let out = petrel()
            .arg("mount")
            .arg(format!("docker://{image}"))
            .arg(&orphan)
            .arg("--daemon")
            .arg("--cache-dir")
            .arg(snapshotter_root.join("cache"))
            .arg("--runtime-dir")
            .arg(&run_dir)
            .arg("--pid-file")
            .arg(run_dir.join("orphan000000.pid"))
            .arg("--log-file")
            .arg(run_dir.join("orphan000000.log"))
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        }
        assert!(attempts < 5, "orphan mount: {}", text(&out));
    };

    // Removing the image releases its snapshots, its lazy mount and its daemon.
    cri_remove(&containerd.path("containerd.sock"), &image).unwrap();
    let started = std::time::Instant::now();
    loop {
        let snapshots = text(&containerd.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "petrel", "ls"]));
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&root))
            .count();
        if snapshots.lines().count() <= 1 && mounted == 0 {
            break;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            panic!(
                "after removing the image: {mounted} mounts left, snapshots:\n{snapshots}\ncontent:\n{}\nleases:\n{}\nimages:\n{}",
                text(&containerd.ctr(&["-n", "k8s.io", "content", "ls"])),
                text(&containerd.ctr(&["-n", "k8s.io", "leases", "ls"])),
                text(&containerd.ctr(&["-n", "k8s.io", "images", "ls"])),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!orphan.exists(), "the orphan mount is unmounted and its directory gone");
    assert!(std::fs::read_to_string(containerd.path("snapshotter.log"))
        .unwrap()
        .contains("cleanup: unmounting an orphan"));
    let started = std::time::Instant::now();
    while process_alive(remounted_pid) || process_alive(orphan_pid) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the daemon {remounted_pid} exits once its image is removed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let daemons_left = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .count();
    assert_eq!(daemons_left, 0, "no daemon pid files left in {}", run_dir.display());
}

#[test]
fn bad_bootstraps_and_a_registry_that_is_down_fail_cleanly() {
    if !can_run() {
        return;
    }
    let mut registry = TestRegistry::start(false);
    let mut containerd = Containerd::start_with(Some(&registry.addr));
    let good = converted_busybox(&registry, &containerd, "petrel");
    let socket = containerd.path("containerd.sock");
    let lazy_mounts = |root: &str| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(root) && l.contains(" - fuse petrel:"))
            .count()
    };
    let root = containerd.snapshotter_root().to_string_lossy().to_string();

    // A manifest whose bootstrap layer holds garbage: the pull fails, nothing is mounted.
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let garbage = b"not a bootstrap, but a valid blob of its own digest ".repeat(8);
    let digest = client.push_blob_bytes("busy", &garbage).unwrap();
    let mut bad = good.clone();
    let last = bad["layers"].as_array().unwrap().len() - 1;
    bad["layers"][last]["digest"] = digest.clone().into();
    bad["layers"][last]["size"] = garbage.len().into();
    // An honest config for it (diff_ids are the digests of uncompressed layers), so the
    // garbage reaches the mount daemon instead of failing the snapshotter's chain check.
    publish_with_config(&client, "busy", "bad", bad, |config| {
        config["rootfs"]["diff_ids"][last] = digest.into();
    });
    let err = cri_pull(&socket, &format!("{}/busy:bad", registry.addr)).unwrap_err();
    assert!(err.contains("magic") || err.contains("bootstrap"), "{err}");
    assert_eq!(lazy_mounts(&root), 0);

    // The registry serves bytes that do not match the bootstrap's digest (storage
    // tampered with behind its back): the pull fails naming the digest, nothing is mounted.
    let bootstrap = good["layers"][last]["digest"].as_str().unwrap().to_string();
    let stored = registry.blob_data_path(&bootstrap);
    let original = std::fs::read(&stored).unwrap();
    let mut tampered = original.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x40;
    std::fs::write(&stored, &tampered).unwrap();
    let err = cri_pull(&socket, &format!("{}/busy:petrel", registry.addr)).unwrap_err();
    assert!(
        err.contains("does not match its digest") && err.contains(bootstrap.trim_start_matches("sha256:")),
        "{err}"
    );
    assert_eq!(lazy_mounts(&root), 0);
    std::fs::write(&stored, &original).unwrap();

    // The registry is down at pull time: a clean error; once it is back, the pull works.
    registry.stop();
    let err = cri_pull(&socket, &format!("{}/busy:petrel", registry.addr)).unwrap_err();
    assert!(!err.is_empty());
    registry.restart();
    containerd.wait_ready();
    cri_pull(&socket, &format!("{}/busy:petrel", registry.addr)).unwrap();
    assert_eq!(lazy_mounts(&root), 1);
    let _ = &mut containerd;
}

#[test]
fn a_private_image_is_fetched_lazily_with_the_snapshotter_credentials() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(true);
    let creds = registry.creds_file().unwrap();
    let containerd = Containerd::start_configured(
        Some(&registry.addr),
        &format!(
            "[[registry]]\nhost = \"{}\"\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
            registry.addr
        ),
    );
    convert_busybox(&registry, &containerd, "private", "petrel", &["--creds", &creds]);

    // CRI fetches the manifest with the pull secret; the mount daemon fetches the
    // bootstrap and chunks with the snapshotter's [[registry]] credentials.
    let image = format!("{}/private:petrel", registry.addr);
    let socket = containerd.path("containerd.sock");
    cri_pull_as(&socket, &image, Some((USER, PASSWORD))).unwrap_or_else(|e| {
        panic!(
            "CRI pull: {e}\nsnapshotter log:\n{}",
            std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
        )
    });
    let out = cat_motd(&containerd, &image, "private-e2e");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "run: {}\nsnapshotter log:\n{}",
        text(&out),
        std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
    );

    // The password is in no log and on no daemon's command line.
    let run_dir = containerd.snapshotter_root().join("run");
    let mut places = vec![std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()];
    for entry in std::fs::read_dir(&run_dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            places.push(std::fs::read_to_string(&path).unwrap_or_default());
        }
        if path.extension().is_some_and(|e| e == "pid") {
            let pid = std::fs::read_to_string(&path).unwrap();
            places.push(std::fs::read_to_string(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default());
        }
    }
    assert!(places.len() >= 3, "snapshotter log, daemon log and daemon command line");
    for place in places {
        assert!(!place.contains(PASSWORD), "password leaked: {place}");
    }
}

#[test]
fn an_ordinary_private_image_pulls_through_cri_without_snapshotter_credentials() {
    if !can_run() {
        return;
    }
    // The snapshotter knows no credentials for this registry; containerd has the pull
    // secret. An ordinary layer must not make the snapshotter call the registry.
    let registry = TestRegistry::start(true);
    let containerd = Containerd::start_with(Some(&registry.addr));
    let layout = containerd.path("layout-plain");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[busybox_layer()]).unwrap();
    registry.push_layout(&layout, "plain", "v1");
    let image = format!("{}/plain:v1", registry.addr);
    let socket = containerd.path("containerd.sock");
    cri_pull_as(&socket, &image, Some((USER, PASSWORD))).unwrap_or_else(|e| {
        panic!(
            "CRI pull: {e}\nsnapshotter log:\n{}",
            std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
        )
    });
    let out = cat_motd(&containerd, &image, "plain-private");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}",
        text(&out)
    );
    assert_eq!(
        containerd.lazy_mount_count(),
        0,
        "an ordinary image is not mounted lazily"
    );
}

/// Edge autonomy under containerd: the registry goes away and the mount daemon is
/// killed (an OOM kill, a power cut); the snapshotter remounts the warmed image from
/// the node cache and a new container reads its files.
#[test]
fn a_warmed_lazy_image_restarts_with_the_registry_gone() {
    if !can_run() {
        return;
    }
    let mut registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    convert_busybox(&registry, &containerd, "busy", "petrel", &[]);
    let image = format!("{}/busy:petrel", registry.addr);
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap();
    let out = petrel()
        .args(["warm", &format!("docker://{image}"), "--all", "--cache-dir"])
        .arg(containerd.snapshotter_root().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    registry.stop();
    for pid in containerd.mount_daemon_pids() {
        containerd.kill_mount_daemon(pid);
    }
    let log = |c: &Containerd| std::fs::read_to_string(c.path("snapshotter.log")).unwrap_or_default();
    let out = cat_motd(&containerd, &image, "offline");
    assert!(
        out.status.success() && text(&out).contains("served through petrel's snapshotter"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log(&containerd)
    );

    // Then the whole node goes down (containerd, snapshotter, daemons: kill -9) and
    // comes back with the registry still gone.
    let mut containerd = containerd;
    containerd.kill_everything_and_restart();
    let out = cat_motd(&containerd, &image, "offline-after-power-cut");
    assert!(
        out.status.success() && text(&out).contains("served through petrel's snapshotter"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log(&containerd)
    );
    registry.restart();
}

/// What the snapshotter's config says is what its mount daemons use: `[[registry]]`
/// mirrors (the daemon's reads go through the mirror), `[daemon]` settings (threads,
/// window, passthrough, log level: the daemon logs at debug level), and the cache
/// bound: the daemon's spec says it, and the cache stays within it after a container
/// read five times as much.
#[test]
fn the_snapshotters_registry_and_daemon_settings_reach_its_daemons() {
    if !can_run() {
        return;
    }
    use std::sync::atomic::Ordering::SeqCst;
    let registry = TestRegistry::start(false);
    let mirror = support::fault_proxy::FaultProxy::start(&registry.addr);
    let containerd = Containerd::start_configured(
        Some(&registry.addr),
        &format!(
            "cache_max_bytes = 400000\n\n[[registry]]\nhost = \"{}\"\nmirrors = [\"http://{}\"]\n\n[daemon]\nfetch_threads = 3\namplify_bytes = 0\npassthrough = false\nlog_level = \"debug\"\n",
            registry.addr, mirror.addr
        ),
    );
    convert_busybox(&registry, &containerd, "busy", "petrel", &[]);
    let image = format!("{}/busy:petrel", registry.addr);
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap();
    let out = cat_motd(&containerd, &image, "through-mirror");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}",
        text(&out)
    );
    assert!(
        mirror.state.blob_requests.load(SeqCst) > 0,
        "the daemon read through the mirror"
    );
    // The running daemon's own answer: the spec it mounted with.
    let spec = containerd.daemon_spec();
    for expected in [
        format!("mirrors = [\"http://{}\"]", mirror.addr),
        "cache_max_bytes = 400000".into(),
        "fetch_threads = 3".into(),
        "amplify_bytes = 0".into(),
        "passthrough = false".into(),
        "log_level = \"debug\"".into(),
        // Pinned by the manifest digest containerd resolved, not by the tag.
        format!("image = \"docker://{}/busy@sha256:", registry.addr),
    ] {
        assert!(
            spec.contains(&expected),
            "{expected} missing from the daemon's spec:\n{spec}"
        );
    }
    let out = containerd.run_container(
        "k8s.io",
        &image,
        "read-all",
        &["/bin/busybox", "md5sum", "/bin/busybox"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // Eviction runs in the background once a put crosses the bound.
    let chunks = containerd.snapshotter_root().join("cache/packs");
    let started = std::time::Instant::now();
    let mut cached = u64::MAX;
    while started.elapsed() < std::time::Duration::from_secs(20) {
        cached = dir_bytes(&chunks);
        if cached <= 400_000 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        cached <= 400_000,
        "the configured 400 kB bound holds: {cached} bytes cached"
    );
    let daemon_logs: String = std::fs::read_dir(containerd.snapshotter_root().join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        daemon_logs.contains("DEBUG"),
        "the daemon logs at debug level:\n{daemon_logs}"
    );
}

/// When the snapshotter cannot reach the registry that containerd pulls from (here:
/// its CA file for that registry is missing), a petrel image is pulled the ordinary
/// way, verified by containerd, and runs from its unpacked layers.
#[test]
fn a_lazy_pull_falls_back_to_an_ordinary_pull_when_the_snapshotter_cannot_reach_the_registry() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_configured(
        Some(&registry.addr),
        &format!(
            "[[registry]]\nhost = \"{}\"\nca_file = \"/nonexistent/petrel-test-ca.pem\"\n",
            registry.addr
        ),
    );
    convert_busybox(&registry, &containerd, "busy", "petrel", &[]);
    let image = format!("{}/busy:petrel", registry.addr);
    let log = || std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default();
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap_or_else(|e| panic!("{e}\n{}", log()));
    assert!(log().contains("the ordinary way"), "{}", log());
    let out = cat_motd(&containerd, &image, "fallen-back");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}\n{}",
        text(&out),
        log()
    );
}

/// A lazy image that was not warmed, with the registry gone and its daemon killed:
/// the container starts (the remount works from the cache), reads what was cached,
/// gets EIO for what was not (after the retry budget), and reads it once the
/// registry is back.
#[test]
fn an_unwarmed_lazy_image_fails_only_uncached_reads_while_the_registry_is_gone() {
    if !can_run() {
        return;
    }
    let mut registry = TestRegistry::start(false);
    // No read extends over its neighbours (amplify_bytes = 0), no directory is read
    // ahead and nothing is prefetched: exactly what was read is cached.
    let containerd = Containerd::start_configured(
        Some(&registry.addr),
        "[daemon]\nretries = 2\nretry_seconds = 2.0\namplify_bytes = 0\nreadahead_dir_bytes = 0\nprefetch = \"off\"\n",
    );
    let mut data = petrel_fixtures::layer_writer::LayerWriter::new();
    data.dir("data/", &petrel_fixtures::layer_writer::EntryMeta::mode(0o755));
    data.file(
        "data/read-before",
        &Default::default(),
        &b"read before the uplink went\n".repeat(3000),
    );
    data.file(
        "data/read-after",
        &Default::default(),
        &b"read after the uplink came back\n".repeat(3000),
    );
    let layout = containerd.path("layout-data");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[busybox_layer(), data.finish()]).unwrap();
    registry.push_layout(&layout, "data", "v1");
    let out = petrel()
        .arg("convert")
        .arg(format!("docker://{}/data:v1", registry.addr))
        .arg(format!("docker://{}/data:petrel", registry.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let image = format!("{}/data:petrel", registry.addr);
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap();
    let cat = |name: &str, file: &str| containerd.run_container("k8s.io", &image, name, &["/bin/busybox", "cat", file]);
    let out = cat("before", "/data/read-before");
    assert!(text(&out).starts_with("read before the uplink went"), "{}", text(&out));

    registry.stop();
    // Killed once what it fetched is durable (it is made so once fetching pauses).
    containerd.wait_caches_durable();
    for pid in containerd.mount_daemon_pids() {
        containerd.kill_mount_daemon(pid);
    }
    let out = cat("cached", "/data/read-before");
    assert!(
        out.status.success() && text(&out).starts_with("read before"),
        "{}",
        text(&out)
    );
    let out = cat("uncached", "/data/read-after");
    assert!(
        !out.status.success(),
        "an uncached read fails while the registry is gone: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("I/O error") || text(&out).contains("Input/output error"),
        "{}",
        text(&out)
    );

    registry.restart();
    let out = cat("recovered", "/data/read-after");
    assert!(
        out.status.success() && text(&out).starts_with("read after the uplink came back"),
        "{}",
        text(&out)
    );
}

/// A plain-HTTP registry that is not on localhost (an edge site's own registry):
/// the containerd `hosts.toml` that tells containerd to speak HTTP tells petrel too
/// (`hosts_dir`), and the image is pulled lazily instead of falling back to an
/// ordinary pull after trying HTTPS.
#[test]
fn a_plain_http_registry_off_localhost_is_pulled_lazily_through_its_hosts_toml() {
    if !can_run() {
        return;
    }
    let Some(ip) = non_loopback_ipv4() else {
        petrel_fixtures::report_skip("this machine has no IPv4 address outside loopback");
        return;
    };
    let registry = TestRegistry::start_on(&ip);
    let certs = tempfile::tempdir().unwrap();
    let host_dir = certs.path().join(&registry.addr);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{0}\"\n\n[host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            registry.addr
        ),
    )
    .unwrap();
    let containerd = Containerd::start_configured(Some(&registry.addr), &format!("hosts_dir = {:?}\n", certs.path()));
    convert_busybox(&registry, &containerd, "busy", "petrel", &["--plain-http"]);
    let image = format!("{}/busy:petrel", registry.addr);
    let log = || std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default();
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap_or_else(|e| panic!("{e}\n{}", log()));
    let out = cat_motd(&containerd, &image, "plain-http");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}\n{}",
        text(&out),
        log()
    );
    assert_eq!(containerd.lazy_mount_count(), 1, "pulled lazily:\n{}", log());
    assert!(!log().contains("the ordinary way"), "{}", log());
}

/// Bytes of the regular files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&e.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The sum of a counter over every image in the snapshotter's metrics.
fn counter_total(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A profile published for an image in the registry (`petrel profile push`: a
/// referrer, through the tag schema on Debian's docker-registry, which has no
/// referrers API) is found by the snapshotter's mount daemon after a CRI pull and
/// prefetched before any container reads the image; a container then runs the
/// profiled program without a single fetch.
#[test]
fn a_profile_published_for_an_image_is_prefetched_by_the_snapshotters_mount() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    convert_busybox(&registry, &containerd, "busy", "petrel", &[]);
    let image = format!("{}/busy:petrel", registry.addr);
    let profile = containerd.path("profile.json");
    std::fs::write(
        &profile,
        r#"{"petrel_profile": 1, "entries": [{"path": "bin/busybox"}]}"#,
    )
    .unwrap();
    let out = petrel()
        .args(["profile", "push", &format!("docker://{image}")])
        .arg(&profile)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    cri_pull(&containerd.path("containerd.sock"), &image).unwrap();
    let log = || std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default();
    let started = std::time::Instant::now();
    let metrics = loop {
        let metrics = containerd.metrics();
        // The image has no prefetch region: whatever was prefetched is the profile's.
        if counter_total(&metrics, "petrel_prefetch_bytes_total") >= 100_000 {
            break metrics;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the published profile was never prefetched:\n{metrics}\nsnapshotter log:\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let requests = counter_total(&metrics, "petrel_backend_requests_total");
    let out = containerd.run_container("k8s.io", &image, "profiled", &["/bin/busybox", "true"]);
    assert!(out.status.success(), "run: {}\n{}", text(&out), log());
    assert_eq!(
        counter_total(&containerd.metrics(), "petrel_backend_requests_total"),
        requests,
        "running the profiled program needed no fetch"
    );
}
