//! A petrel image pulled without the snapshotter labels (`ctr images pull`):
//! containerd downloads and unpacks every layer as it would for any image, and the
//! snapshotter serves the image from the unpacked blobs on local disk.

mod support;

use support::busybox_image::*;
use support::containerd::Containerd;
use support::*;

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
    assert_eq!(containerd.lazy_mount_count(), 1, "the unpacked bootstrap is mounted");

    // The container sees the image's tree, not petrel's layer files.
    let run = |name: &str| containerd.run_container("default", &image, name, &["/bin/sh", "-c", "cat /etc/motd; ls /"]);
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
    let pids = containerd.mount_daemon_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    containerd.wait_caches_durable();
    containerd.kill_mount_daemon(pids[0]);
    let out = run("unpacked-2");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log()
    );
    assert_eq!(containerd.lazy_mount_count(), 1);
    // Its chunks were all cached by the first run, and the container opens busybox
    // for `sh`, `cat` and `ls`: a file used again is materialized in the background,
    // and a later open of it (this run's or the next's) is served to the container's
    // overlay through a backing file (passthrough), which the snapshotter's metrics
    // report.
    let daemon_log = || {
        std::fs::read_dir(root.join("run"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    let passthrough_opens = || {
        let metrics = containerd.metrics();
        metrics
            .lines()
            .find(|l| l.starts_with("petrel_passthrough_opens_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{metrics}"))
    };
    // The materialization runs in the background, so on a busy machine it may take
    // a few runs (each pausing a moment) before an open finds the file done.
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut again = 3;
    while passthrough_opens() == 0
        && !daemon_log().contains("FUSE passthrough off")
        && std::time::Instant::now() < give_up
    {
        let out = run(&format!("unpacked-{again}"));
        assert!(out.status.success(), "{}", text(&out));
        again += 1;
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(
        passthrough_opens() > 0 || daemon_log().contains("FUSE passthrough off"),
        "{}\n{}",
        containerd.metrics(),
        daemon_log()
    );

    // Removing the image releases the mount, its daemon and its blob links.
    let out = containerd.ctr(&["images", "rm", "--sync", &image]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(containerd.wait_lazy_mounts_gone(), 0, "snapshotter log:\n{}", log());
    let snapshots = text(&containerd.ctr(&["snapshots", "--snapshotter", "petrel", "ls"]));
    assert_eq!(
        snapshots.lines().count(),
        1,
        "only the header line is left: {snapshots}"
    );
    let links = std::fs::read_dir(root.join("unpacked")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(links, 0, "blob links of removed mounts are gone");

    // A manifest that lists the bootstrap but none of the blobs it names: containerd
    // unpacks it, and the Commit of the bootstrap layer fails naming the missing blob,
    // so the pull fails and nothing is mounted.
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let bootstrap = manifest["layers"].as_array().unwrap().last().unwrap().clone();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&client.get_blob_verified("busy", config_digest, 1 << 20).unwrap()).unwrap();
    // The bootstrap layer is gzipped: its diff_id is the config's last one.
    let bootstrap_diff_id = config["rootfs"]["diff_ids"].as_array().unwrap().last().unwrap().clone();
    config["rootfs"]["diff_ids"] = serde_json::json!([bootstrap_diff_id]);
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let mut broken = manifest.clone();
    broken["config"]["digest"] = client.push_blob_bytes("busy", &config_bytes).unwrap().into();
    broken["config"]["size"] = config_bytes.len().into();
    broken["layers"] = serde_json::json!([bootstrap]);
    client
        .put_manifest(
            "busy",
            "broken",
            petrel_registry::oci::OCI_MANIFEST,
            &serde_json::to_vec(&broken).unwrap(),
        )
        .unwrap();
    let broken_image = format!("{}/busy:broken", registry.addr);
    let out = containerd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "petrel",
        &broken_image,
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let blob = manifest["layers"][0]["digest"].as_str().unwrap();
    assert!(
        text(&out).contains(&format!("needs blob {blob}, which no layer below it holds")),
        "{}",
        text(&out)
    );
    assert_eq!(containerd.lazy_mount_count(), 0);
}
