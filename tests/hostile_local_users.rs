//! Another local user sees nothing and gains nothing (docs/security.md, "Local users
//! see nothing and gain nothing"). The probes run as `nobody` through `setpriv`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use support::busybox_image::*;
use support::containerd::Containerd;
use support::cri::*;
use support::*;

/// Runs `command` as uid/gid 65534 with no supplementary groups.
fn as_nobody(command: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(command)
        .output()
        .unwrap()
}

fn setpriv_available() -> bool {
    let ok = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        petrel_fixtures::report_skip("needs setpriv (util-linux)");
    }
    ok
}

fn assert_denied(path: &Path, probe: &[&str]) {
    let path_text = path.to_string_lossy();
    let mut command: Vec<&str> = probe.to_vec();
    command.push(&path_text);
    let out = as_nobody(&command);
    assert!(
        !out.status.success() && text(&out).contains("Permission denied"),
        "nobody ran {command:?}: {}",
        text(&out)
    );
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file_type = entry.file_type().unwrap();
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

#[test]
fn a_host_user_cannot_read_the_snapshotter_state_nor_run_a_containers_setuid_file() {
    if !can_run() || !setpriv_available() {
        return;
    }
    let registry = TestRegistry::start(false);
    let containerd = Containerd::start_with(Some(&registry.addr));
    convert_busybox(&registry, &containerd, "busy", "petrel", &[]);
    let image = format!("{}/busy:petrel", registry.addr);
    cri_pull(&containerd.path("containerd.sock"), &image).unwrap();

    // A container leaves a setuid-root copy of busybox in its upper dir.
    let out = containerd.ctr(&[
        "-n",
        "k8s.io",
        "run",
        "--snapshotter",
        "petrel",
        &image,
        "suid-writer",
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox cp /bin/busybox /suid && /bin/busybox chmod 4755 /suid",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let root = containerd.snapshotter_root();
    let suid = files_below(&root.join("snapshots"))
        .into_iter()
        .find(|p| p.ends_with("fs/suid"))
        .expect("the container's upper dir holds /suid");
    assert_eq!(std::fs::metadata(&suid).unwrap().permissions().mode() & 0o4000, 0o4000);

    // Every directory of the snapshotter's own is 0700, every file in its state private.
    let mountpoint = std::fs::read_dir(root.join("mounts"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    for dir in [
        "",
        "snapshots",
        "mounts",
        "run",
        "cache",
        "cache/packs",
        "cache/bootstraps",
    ] {
        let mode = std::fs::metadata(root.join(dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", root.join(dir).display());
    }
    assert_eq!(
        std::fs::metadata(root.join("metadata.redb"))
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0
    );

    // As nobody: no listing, no reading, no running the setuid file.
    for dir in [
        root.clone(),
        root.join("snapshots"),
        root.join("cache"),
        mountpoint.clone(),
    ] {
        assert_denied(&dir, &["ls"]);
    }
    assert_denied(&mountpoint.join("etc/motd"), &["cat"]);
    assert_denied(&root.join("metadata.redb"), &["cat"]);
    let bootstraps = files_below(&root.join("cache/bootstraps"));
    assert!(!bootstraps.is_empty());
    for bootstrap in &bootstraps {
        assert_denied(bootstrap, &["cat"]);
    }
    let suid_text = suid.to_string_lossy().to_string();
    let out = as_nobody(&[&suid_text, "id", "-u"]);
    assert!(!out.status.success(), "nobody ran the setuid file: {}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains('0'), "{}", text(&out));

    // Sockets: the snapshotter's (0660, root's) and every mount daemon's control
    // socket (in the 0700 run dir). The harness's own dir is opened for traversal so
    // that only the sockets' and the snapshotter's modes stand in the way.
    std::fs::set_permissions(containerd.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let connect = [
        "python3",
        "-c",
        "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
    ];
    assert_denied(&containerd.path("snapshotter.sock"), &connect);
    let control_sockets: Vec<PathBuf> = std::fs::read_dir(root.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(
        !control_sockets.is_empty(),
        "the lazy mount's daemon has a control socket"
    );
    for socket in &control_sockets {
        assert_denied(socket, &connect);
    }

    let _ = containerd.ctr(&["-n", "k8s.io", "containers", "rm", "suid-writer"]);
}

#[test]
fn a_standalone_mount_keeps_its_cache_private() {
    if !registry_tools_available() || !fuse_available() || !setpriv_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), b"private image content\n".repeat(1000)).unwrap();
    let image = work.path().join("img");
    let out = petrel().arg("build").arg("-o").arg(&image).arg(&tree).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    // The cache dir already exists with a lax mode: it is tightened.
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = petrel()
        .arg("warm")
        .arg(&image)
        .arg("--all")
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
    // The temp dir is 0700 itself; open it so only the cache's own mode stands in the way.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_denied(&cache, &["ls"]);
    for file in files_below(&cache) {
        assert_denied(&file, &["cat"]);
    }
}
