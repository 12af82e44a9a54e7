//! The issue's own path: `ctr-remote image rpull --snapshotter petrel` pulls a petrel
//! image without containerd downloading a single layer, and `ctr run` runs it lazily.
//! Debian's ctr-remote (stargz-snapshotter 0.12) has no `--use-containerd-labels`, so
//! it passes stargz-snapshotter's labels, which name the image and the layer but not
//! the manifest; the snapshotter pins the manifest it resolves.

mod support;

use support::busybox_image::*;
use support::containerd::Containerd;
use support::*;

#[test]
fn a_petrel_image_pulled_with_ctr_remote_runs_lazily_without_downloading_a_layer() {
    if !can_run() || !ctr_remote_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    let manifest = converted_busybox(&registry, &containerd, "petrel");
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let (_, _, manifest_digest) = client.get_manifest("busy", "petrel").unwrap();
    let image = format!("{}/busy:petrel", registry.addr);
    let log = || std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default();

    let out = std::process::Command::new("ctr-remote")
        .arg("--address")
        .arg(containerd.path("containerd.sock"))
        .args(["images", "rpull", "--plain-http", "--snapshotter", "petrel", &image])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\nsnapshotter log:\n{}", text(&out), log());

    // containerd's content store holds the manifest and config, no layer.
    let content = text(&containerd.ctr(&["content", "ls", "-q"]));
    assert!(content.contains(&manifest_digest), "{content}");
    assert!(
        content.contains(manifest["config"]["digest"].as_str().unwrap()),
        "{content}"
    );
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert!(!content.contains(digest), "layer {digest} was downloaded: {content}");
    }
    assert_eq!(containerd.lazy_mount_count(), 1);
    // The daemon mounts the manifest digest the reference resolved to, not the tag.
    let pids = containerd.mount_daemon_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let spec = containerd.daemon_spec();
    assert!(spec.contains(&format!("busy@{manifest_digest}\"")), "{spec}");

    let run = |name: &str| containerd.run_container("default", &image, name, &["/bin/busybox", "cat", "/etc/motd"]);
    let out = run("rpull-1");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log()
    );

    // The tag moves to another image and the daemon dies: the remount still serves
    // the pulled image, from its pinned digest.
    let (plain, media_type, _) = client.get_manifest("busy", "v1").unwrap();
    client.put_manifest("busy", "petrel", &media_type, &plain).unwrap();
    containerd.wait_caches_durable();
    containerd.kill_mount_daemon(pids[0]);
    let out = run("rpull-2");
    assert!(
        text(&out).contains("served through petrel's snapshotter"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log()
    );

    let out = containerd.ctr(&["images", "rm", "--sync", &image]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(containerd.wait_lazy_mounts_gone(), 0, "snapshotter log:\n{}", log());
    assert!(containerd.mount_daemon_pids().is_empty());
}
