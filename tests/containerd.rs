//! petrel's snapshotter under a real containerd 1.6 + runc: an ordinary OCI image
//! pulls (containerd applies its layers into our snapshots), runs, survives a
//! snapshotter restart, and its snapshots are gone once it is removed.

mod support;

use support::containerd::{containerd_available, Containerd};
use support::*;

fn busybox_layer() -> Vec<u8> {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.dir("bin/", &petrel_fixtures::layer_writer::EntryMeta::mode(0o755));
    w.file(
        "bin/busybox",
        &petrel_fixtures::layer_writer::EntryMeta::mode(0o755),
        &std::fs::read("/bin/busybox").unwrap(),
    );
    w.symlink("bin/sh", "busybox");
    w.file(
        "etc/motd",
        &Default::default(),
        b"served through petrel's snapshotter\n",
    );
    w.finish()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_ordinary_image_pulls_runs_and_is_cleaned_up() {
    if !registry_tools_available()
        || !fuse_available()
        || !containerd_available()
        || !std::path::Path::new("/bin/busybox").exists()
    {
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
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "petrel",
        &image,
        "petrel-e2e",
        "/bin/busybox",
        "cat",
        "/etc/motd",
    ]);
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
