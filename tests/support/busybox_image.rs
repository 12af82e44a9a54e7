//! A busybox-static image for the containerd tests: pushed to the test registry and
//! converted by `petrel convert`.

use super::containerd::{containerd_available, Containerd};
use super::*;

pub fn busybox_layer() -> Vec<u8> {
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

pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether registry tools, FUSE, containerd and busybox are all here.
pub fn can_run() -> bool {
    registry_tools_available()
        && fuse_available()
        && containerd_available()
        && std::path::Path::new("/bin/busybox").exists()
}

/// Whether `ctr-remote` (Debian's stargz-snapshotter package) is here.
pub fn ctr_remote_available() -> bool {
    let ok = std::process::Command::new("ctr-remote")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        petrel_fixtures::report_skip("needs ctr-remote (scripts/install-deps.sh)");
    }
    ok
}

/// Converts the busybox image and returns the converted manifest as JSON.
pub fn converted_busybox(registry: &TestRegistry, containerd: &Containerd, tag: &str) -> serde_json::Value {
    convert_busybox(registry, containerd, "busy", tag, &[]);
    let client = petrel_registry::RegistryClient::new(&registry.addr, &Default::default()).unwrap();
    let (bytes, ..) = client.get_manifest("busy", tag).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Pushes the busybox image as `repo:v1`, converts it to `repo:tag` (with `extra`
/// arguments) and returns what `petrel convert` printed.
pub fn convert_busybox(
    registry: &TestRegistry,
    containerd: &Containerd,
    repo: &str,
    tag: &str,
    extra: &[&str],
) -> Vec<u8> {
    let layout = containerd.path(&format!("layout-{repo}-{tag}"));
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[busybox_layer()]).unwrap();
    registry.push_layout(&layout, repo, "v1");
    let out = petrel()
        .arg("convert")
        .arg(format!("docker://{}/{repo}:v1", registry.addr))
        .arg(format!("docker://{}/{repo}:{tag}", registry.addr))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    out.stdout
}
