//! Registry tokens expire while a lazy image runs: the snapshotter's mount daemon
//! gets a new Bearer token on the 401 and keeps serving, without a remount.

mod support;

use sha2::Digest;
use support::busybox_image::*;
use support::containerd::Containerd;
use support::cri::*;
use support::fault_proxy::FaultProxy;
use support::*;

/// 4 MiB that compress badly, so reading its end needs a fetch of its own.
fn big_file() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..4 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn an_expired_token_is_refreshed_by_the_running_mount_daemon() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let proxy = FaultProxy::start(&registry.addr);
    *proxy.state.bearer.lock().unwrap() = Some("token-one".into());
    let containerd = Containerd::start_with(Some(&proxy.addr));

    // The image: busybox plus a big file, converted in the registry (no proxy).
    let big = big_file();
    let mut extra = petrel_fixtures::layer_writer::LayerWriter::new();
    extra.file("data/big", &Default::default(), &big);
    let layout = containerd.path("layout");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[busybox_layer(), extra.finish()]).unwrap();
    registry.push_layout(&layout, "faults", "v1");
    let out = petrel()
        .arg("convert")
        .arg(format!("docker://{}/faults:v1", registry.addr))
        .arg(format!("docker://{}/faults:petrel", registry.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // CRI pulls through the token-guarded proxy; the daemon reads through it too.
    let image = format!("{}/faults:petrel", proxy.addr);
    let socket = containerd.path("containerd.sock");
    let log = || std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default();
    cri_pull(&socket, &image).unwrap_or_else(|e| panic!("CRI pull: {e}\nsnapshotter log:\n{}", log()));
    let run = |name: &str, script: &str| containerd.run_container("k8s.io", &image, name, &["/bin/sh", "-c", script]);
    let out = run("tokens-1", "cat /etc/motd; head -c 4096 /data/big | wc -c");
    assert!(
        text(&out).contains("served through petrel's snapshotter") && text(&out).contains("4096"),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log()
    );
    let pids = containerd.mount_daemon_pids();
    assert_eq!(pids.len(), 1);
    let tokens_before = proxy.state.tokens_issued.load(std::sync::atomic::Ordering::SeqCst);

    // The registry revokes the token: the next uncached read gets a 401, the daemon
    // asks for a new token and the whole file reads back intact.
    *proxy.state.bearer.lock().unwrap() = Some("token-two".into());
    let out = run("tokens-2", "sha256sum /data/big");
    let expected = hex::encode(sha2::Sha256::digest(&big));
    assert!(
        text(&out).contains(&expected),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        log()
    );
    assert!(proxy.state.tokens_issued.load(std::sync::atomic::Ordering::SeqCst) > tokens_before);
    assert_eq!(
        containerd.mount_daemon_pids(),
        pids,
        "the same daemon served it, no remount"
    );
}
