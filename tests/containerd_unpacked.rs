//! A petrel image pulled without the snapshotter labels (`ctr images pull`):
//! containerd downloads and unpacks every layer as it would for any image, and the
//! snapshotter serves the image from the unpacked blobs on local disk.

mod support;

use support::busybox_image::*;
use support::containerd::Containerd;
use support::*;

fn petrel_mounts_under(root: &std::path::Path) -> usize {
    let root = root.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root) && l.contains(" - fuse petrel:"))
        .count()
}

fn daemon_pids(run_dir: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir(run_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_petrel_image_pulled_without_labels_is_unpacked_and_runs_from_local_disk() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    let manifest = converted_busybox(&registry, &containerd, "petrel");
    let image = format!("{}/busy:petrel", registry.addr);
    let root = containerd.snapshotter_root();
    let log = || std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default();

    // A plain pull: containerd passes no image labels, downloads every layer and
    // unpacks it (petrel layers are one-entry tars) into petrel's snapshots.
    let out = containerd.ctr(&["images", "pull", "--plain-http", "--snapshotter", "petrel", &image]);
    assert!(out.status.success(), "{}\nsnapshotter log:\n{}", text(&out), log());
    let content = text(&containerd.ctr(&["content", "ls", "-q"]));
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert!(
            content.contains(digest),
            "a normal pull downloads layer {digest}: {content}"
        );
    }
    assert_eq!(petrel_mounts_under(&root), 1, "the unpacked bootstrap is mounted");

    // The container sees the image's tree, not petrel's layer files.
    let run = |name: &str| {
        containerd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "petrel",
            &image,
            name,
            "/bin/sh",
            "-c",
            "cat /etc/motd; ls /",
        ])
    };
    let out = run("unpacked-1");
    let listing = text(&out);
    assert!(out.status.success(), "{listing}\nsnapshotter log:\n{}", log());
    assert!(listing.contains("served through petrel's snapshotter"), "{listing}");
    assert!(listing.contains("bin") && listing.contains("etc"), "{listing}");
    assert!(
        !listing.contains("petrel\n"),
        "petrel's layer files leaked into the rootfs: {listing}"
    );

    // The mount's daemon dies: the next container's Prepare remounts the image from
    // the unpacked layers.
    let pids = daemon_pids(&root.join("run"));
    assert_eq!(pids.len(), 1, "{pids:?}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pids[0]).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", pids[0])).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = run("unpacked-2");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log()
    );
    assert_eq!(petrel_mounts_under(&root), 1);

    // Removing the image releases the mount, its daemon and its blob links.
    let out = containerd.ctr(&["images", "rm", "--sync", &image]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while petrel_mounts_under(&root) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(petrel_mounts_under(&root), 0, "snapshotter log:\n{}", log());
    let snapshots = text(&containerd.ctr(&["snapshots", "--snapshotter", "petrel", "ls"]));
    assert_eq!(
        snapshots.lines().count(),
        1,
        "only the header line is left: {snapshots}"
    );
    let links = std::fs::read_dir(root.join("unpacked")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(links, 0, "blob links of removed mounts are gone");
}
