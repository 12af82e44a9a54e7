//! An image author who forges `rootfs.diff_ids` cannot take over another image's
//! root filesystem through petrel's snapshotter (docs/security.md, "Images cannot
//! impersonate each other").
//!
//! The attacker converts a busybox image of their own to petrel and rewrites its
//! config so that its diff_ids are a victim's. containerd names the snapshots of
//! remote layers by the chain IDs of those diff_ids, and nothing unpacks a remote
//! layer, so without the snapshotter's own check the attacker's lazy mount would be
//! committed under the victim's names. Pulled first, the forged image must fail; then
//! (a) the victim it claims and (b) a plain image that shares only the claimed base
//! layer both run their own files, through CRI and through `ctr-remote rpull`.

mod support;

use petrel_fixtures::layer_writer::{EntryMeta, LayerWriter};
use support::busybox_image::*;
use support::containerd::Containerd;
use support::cri::*;
use support::*;

fn base_layer() -> Vec<u8> {
    let mut w = LayerWriter::new();
    w.dir("bin/", &EntryMeta::mode(0o755));
    w.file(
        "bin/busybox",
        &EntryMeta::mode(0o755),
        &std::fs::read("/bin/busybox").unwrap(),
    );
    w.symlink("bin/sh", "busybox");
    w.finish()
}

fn motd_layer(text: &str) -> Vec<u8> {
    let mut w = LayerWriter::new();
    w.dir("etc/", &EntryMeta::mode(0o755));
    w.file("etc/motd", &Default::default(), text.as_bytes());
    w.finish()
}

const VICTIM_MOTD: &str = "the victim's own motd\n";
const NEIGHBOUR_MOTD: &str = "a neighbour sharing only the base layer\n";
const ATTACKER_MOTD: &str = "owned by the attacker\n";

/// The victims (plain OCI, two layers each), and the attacker's petrel image whose
/// config claims the victim's diff_ids. Returns the forged image's reference.
fn publish_images(registry: &TestRegistry, containerd: &Containerd) -> String {
    let (base, top) = (base_layer(), motd_layer(VICTIM_MOTD));
    let victim_diff_ids = [
        petrel_registry::oci::sha256_digest(&base),
        petrel_registry::oci::sha256_digest(&top),
    ];
    for (repo, layers) in [
        ("victim", vec![base.clone(), top]),
        ("neighbour", vec![base, motd_layer(NEIGHBOUR_MOTD)]),
    ] {
        let layout = containerd.path(&format!("layout-{repo}"));
        petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &layers).unwrap();
        registry.push_layout(&layout, repo, "v1");
    }

    let layout = containerd.path("layout-attacker");
    let mut attacker = LayerWriter::new();
    attacker.dir("bin/", &EntryMeta::mode(0o755));
    attacker.file(
        "bin/busybox",
        &EntryMeta::mode(0o755),
        &std::fs::read("/bin/busybox").unwrap(),
    );
    attacker.symlink("bin/sh", "busybox");
    attacker.dir("etc/", &EntryMeta::mode(0o755));
    attacker.file("etc/motd", &Default::default(), ATTACKER_MOTD.as_bytes());
    let attacker = attacker.finish();
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[attacker]).unwrap();
    registry.push_layout(&layout, "attacker", "v1");
    let out = petrel()
        .arg("convert")
        .arg(format!("docker://{}/attacker:v1", registry.addr))
        .arg(format!("docker://{}/attacker:petrel", registry.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // The forgery: the same petrel layers (blob, bootstrap), the victim's diff_ids.
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let (bytes, ..) = client.get_manifest("attacker", "petrel").unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2, "{manifest}");
    publish_with_config(&client, "attacker", "forged", manifest, |config| {
        config["rootfs"]["diff_ids"] = serde_json::json!(victim_diff_ids);
    });
    format!("{}/attacker:forged", registry.addr)
}

fn snapshotter_log(containerd: &Containerd) -> String {
    std::fs::read_to_string(containerd.path("snapshotter.log")).unwrap_or_default()
}

fn assert_refused(result: Result<String, String>, containerd: &Containerd) {
    let err = result.expect_err(&format!(
        "the forged image must not pull\nsnapshotter log:\n{}",
        snapshotter_log(containerd)
    ));
    assert!(
        err.contains("rootfs.diff_ids do not match its layers"),
        "{err}\nsnapshotter log:\n{}",
        snapshotter_log(containerd)
    );
    assert_eq!(
        containerd.lazy_mount_count(),
        0,
        "nothing is mounted for the forged image"
    );
}

fn assert_runs_own_motd(containerd: &Containerd, namespace: &str, image: &str, name: &str, motd: &str) {
    // The short pause keeps `ctr run` from losing the output of a process that
    // exits at once (containerd/containerd#770: its stdout fifo can close first).
    let out = containerd.run_container(
        namespace,
        image,
        name,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /etc/motd; /bin/busybox sleep 0.3",
        ],
    );
    assert!(
        out.status.success(),
        "{}\nsnapshotter log:\n{}",
        text(&out),
        snapshotter_log(containerd)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), motd, "{image}");
}

#[test]
fn a_forged_diff_ids_image_pulled_through_cri_cannot_take_over_other_images() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    let forged = publish_images(&registry, &containerd);
    let socket = containerd.path("containerd.sock");

    assert_refused(cri_pull(&socket, &forged), &containerd);
    for (repo, motd) in [("victim", VICTIM_MOTD), ("neighbour", NEIGHBOUR_MOTD)] {
        let image = format!("{}/{repo}:v1", registry.addr);
        cri_pull(&socket, &image).unwrap_or_else(|e| panic!("{image}: {e}"));
        assert_runs_own_motd(&containerd, "k8s.io", &image, &format!("{repo}-cri"), motd);
    }
    // In the other order, containerd finds the victim's chain IDs already there and
    // asks the snapshotter nothing: the forged image gets the victim's files, never
    // the other way round, and no lazy mount is made.
    let _ = cri_pull(&socket, &forged);
    assert_eq!(containerd.lazy_mount_count(), 0);
    assert_runs_own_motd(
        &containerd,
        "k8s.io",
        &format!("{}/victim:v1", registry.addr),
        "victim-cri-again",
        VICTIM_MOTD,
    );
}

#[test]
fn a_forged_diff_ids_image_pulled_with_ctr_remote_cannot_take_over_other_images() {
    if !can_run() || !ctr_remote_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    let forged = publish_images(&registry, &containerd);
    let rpull = |image: &str| -> Result<String, String> {
        let out = std::process::Command::new("ctr-remote")
            .arg("--address")
            .arg(containerd.path("containerd.sock"))
            .args(["images", "rpull", "--plain-http", "--snapshotter", "petrel", image])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(text(&out))
        } else {
            Err(text(&out))
        }
    };

    assert_refused(rpull(&forged), &containerd);
    for (repo, motd) in [("victim", VICTIM_MOTD), ("neighbour", NEIGHBOUR_MOTD)] {
        let image = format!("{}/{repo}:v1", registry.addr);
        rpull(&image).unwrap_or_else(|e| panic!("{image}: {e}"));
        assert_runs_own_motd(&containerd, "default", &image, &format!("{repo}-rpull"), motd);
    }
}

/// The digest of a real layer (the victim's base, uploaded uncompressed, so its digest
/// is its diff_id and the chain ID checks out) claimed as a petrel blob: committed
/// as an empty petrel blob, it would hide the victim's base layer. The snapshotter
/// reads the layer's header and tail and refuses it.
#[test]
fn a_real_layer_claimed_as_a_petrel_blob_is_refused() {
    if !can_run() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    publish_images(&registry, &containerd);
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let base = base_layer();
    let base_digest = client.push_blob_bytes("attacker", &base).unwrap();
    let (bytes, ..) = client.get_manifest("attacker", "petrel").unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    manifest["layers"][0]["digest"] = base_digest.clone().into();
    manifest["layers"][0]["size"] = base.len().into();
    publish_with_config(&client, "attacker", "blob-claim", manifest, |config| {
        config["rootfs"]["diff_ids"][0] = base_digest.into();
    });
    let socket = containerd.path("containerd.sock");
    let err = cri_pull(&socket, &format!("{}/attacker:blob-claim", registry.addr)).unwrap_err();
    assert!(
        err.contains("not petrel's one-entry tar") || err.contains("not petrel's header"),
        "{err}\nsnapshotter log:\n{}",
        snapshotter_log(&containerd)
    );
    let victim = format!("{}/victim:v1", registry.addr);
    cri_pull(&socket, &victim).unwrap();
    assert_runs_own_motd(&containerd, "k8s.io", &victim, "victim-after-blob-claim", VICTIM_MOTD);
}
