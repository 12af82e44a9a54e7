//! The snapshot store behaves like containerd's overlayfs snapshotter: chains of
//! committed layers mount as overlays (checked with real mounts), metadata
//! survives reopening, Remove refuses snapshots with children, Update cannot
//! change parent or kind, and Walk implements containerd's filters.

use petrel_snapshotter::{Kind, Mount, SnapshotError, SnapshotStore};
use std::collections::BTreeMap;
use std::path::Path;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Performs a mount the way containerd would (root only).
fn mount_at(mounts: &[Mount], target: &Path) -> bool {
    if !rustix::process::geteuid().is_root() {
        petrel_fixtures::report_skip("mounting needs root");
        return false;
    }
    let m = &mounts[0];
    let (flags, data) = if m.kind == "bind" {
        (
            rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::REC,
            String::new(),
        )
    } else {
        (rustix::mount::MountFlags::empty(), m.options.join(","))
    };
    let data = std::ffi::CString::new(data).unwrap();
    let fstype = if m.kind == "bind" { "none" } else { "overlay" };
    rustix::mount::mount(m.source.as_str(), target, fstype, flags, data.as_c_str()).unwrap();
    if m.options.iter().any(|o| o == "ro") {
        rustix::mount::mount_remount(
            target,
            rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
            "",
        )
        .unwrap();
    }
    true
}

fn unmount(target: &Path) {
    rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH).unwrap();
}

#[test]
fn layers_stack_as_overlays_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(&dir.path().join("root")).unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();

    // Layer 1: a bind mount of an empty directory, written by the "applier".
    let mounts = store.prepare("extract-1", None, BTreeMap::new()).unwrap();
    assert_eq!(mounts[0].kind, "bind");
    std::fs::write(Path::new(&mounts[0].source).join("a.txt"), b"layer one").unwrap();
    store
        .commit(
            "layer-1",
            "extract-1",
            labels(&[("containerd.io/snapshot.ref", "sha256:one")]),
        )
        .unwrap();
    assert!(matches!(store.stat("extract-1"), Err(SnapshotError::NotFound(_))));

    // Layer 2 on top: an overlay; what it writes lands in its own directory.
    let mounts = store.prepare("extract-2", Some("layer-1"), BTreeMap::new()).unwrap();
    assert_eq!(mounts[0].kind, "overlay");
    if mount_at(&mounts, &target) {
        assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"layer one");
        std::fs::write(target.join("b.txt"), b"layer two").unwrap();
        unmount(&target);
    }
    store.commit("layer-2", "extract-2", BTreeMap::new()).unwrap();

    // A read-only view of the stack sees both layers and cannot write.
    let mounts = store.view("view-1", Some("layer-2"), BTreeMap::new()).unwrap();
    assert!(
        mounts[0]
            .options
            .iter()
            .any(|o| o.starts_with("lowerdir=") && o.contains(':')),
        "{mounts:?}"
    );
    if mount_at(&mounts, &target) {
        assert_eq!(std::fs::read(target.join("b.txt")).unwrap(), b"layer two");
        assert!(
            std::fs::write(target.join("c.txt"), b"x").is_err(),
            "views are read-only"
        );
        unmount(&target);
    }

    // A container rootfs: active on top; its usage excludes the parents.
    store
        .prepare("/containers/c1/rootfs", Some("layer-2"), BTreeMap::new())
        .unwrap();
    assert_eq!(store.usage("/containers/c1/rootfs").unwrap().inodes, 0);
    assert!(store.usage("layer-1").unwrap().size > 0);

    // Everything survives reopening the database.
    drop(store);
    let store = SnapshotStore::open(&dir.path().join("root")).unwrap();
    let info = store.stat("layer-2").unwrap();
    assert_eq!((info.kind, info.parent.as_deref()), (Kind::Committed, Some("layer-1")));
    assert_eq!(info.created, info.updated);
    assert_eq!(store.mounts("view-1").unwrap(), mounts);
    assert!(!dir.path().join("root/containers").exists(), "keys are never paths");
}

#[test]
fn remove_update_walk_and_cleanup_follow_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(dir.path()).unwrap();
    store.prepare("a", None, BTreeMap::new()).unwrap();
    store
        .commit("base", "a", labels(&[("containerd.io/snapshot.ref", "sha256:base")]))
        .unwrap();
    store.prepare("b", Some("base"), BTreeMap::new()).unwrap();
    store
        .commit("top", "b", labels(&[("containerd.io/snapshot.ref", "sha256:top")]))
        .unwrap();

    let err = store.remove("base").unwrap_err().to_string();
    assert!(err.contains("remove"), "{err}");
    assert!(matches!(
        store.prepare("top", None, BTreeMap::new()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert!(matches!(
        store.prepare("x", Some("missing"), BTreeMap::new()),
        Err(SnapshotError::NotFound(_))
    ));

    let mut info = store.stat("top").unwrap();
    info.labels.insert("team".into(), "edge".into());
    let updated = store.update(info.clone(), &["labels.team".into()]).unwrap();
    assert_eq!(updated.labels["team"], "edge");
    assert_eq!(updated.labels["containerd.io/snapshot.ref"], "sha256:top");
    assert!(updated.updated > updated.created);
    // As containerd: the kind and parent in an Update are ignored (containerd always
    // sends Committed, and `ctr snapshots label` of an active snapshot must work), and
    // a field path other than labels is refused.
    let mut moved = info.clone();
    moved.parent = Some("elsewhere".into());
    moved.kind = Kind::Active;
    moved.labels.insert("moved".into(), "yes".into());
    let updated = store.update(moved, &["labels.moved".into()]).unwrap();
    assert_eq!(
        (updated.kind, updated.parent.as_deref()),
        (Kind::Committed, Some("base"))
    );
    assert_eq!(updated.labels["moved"], "yes");
    store.prepare("active", Some("top"), BTreeMap::new()).unwrap();
    let mut active = store.stat("active").unwrap();
    active.kind = Kind::Committed;
    active.labels.insert("team".into(), "edge".into());
    let updated = store.update(active.clone(), &["labels.team".into()]).unwrap();
    assert_eq!((updated.kind, updated.labels["team"].as_str()), (Kind::Active, "edge"));
    for path in ["parent", "kind", "name", "labelsx"] {
        assert!(
            matches!(
                store.update(active.clone(), &[path.into()]),
                Err(SnapshotError::InvalidArgument(_))
            ),
            "{path}"
        );
    }
    store.remove("active").unwrap();
    assert!(matches!(
        store.prepare("", None, BTreeMap::new()),
        Err(SnapshotError::InvalidArgument(_))
    ));

    let names = |filters: &[&str]| {
        let mut n: Vec<String> = store
            .walk(&filters.iter().map(|f| f.to_string()).collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&[r#"labels."containerd.io/snapshot.ref"==sha256:top,parent==base"#]),
        ["top"]
    );
    assert_eq!(names(&[r#"parent!="""#]), ["top"]);
    assert_eq!(names(&["name==base", "name==top"]), ["base", "top"]);
    assert_eq!(names(&[]), ["base", "top"]);
    assert!(store.walk(&[r#"labels."unterminated"#.to_string()]).is_err());

    store.remove("top").unwrap();
    store.remove("base").unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots/999/fs")).unwrap();
    assert_eq!(store.cleanup().unwrap(), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("snapshots")).unwrap().count(), 0);
}

/// A Remove of a parent racing a Prepare on it: never both succeed (no orphan child).
#[test]
fn remove_and_prepare_of_a_child_never_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SnapshotStore::open(dir.path()).unwrap());
    for round in 0..100 {
        let (key, parent) = (format!("a{round}"), format!("base{round}"));
        store.prepare(&key, None, BTreeMap::new()).unwrap();
        store.commit(&parent, &key, BTreeMap::new()).unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (s, b, p) = (store.clone(), barrier.clone(), parent.clone());
        let remover = std::thread::spawn(move || {
            b.wait();
            s.remove(&p).is_ok()
        });
        barrier.wait();
        let child = format!("child{round}");
        let prepared = store.prepare(&child, Some(&parent), BTreeMap::new()).is_ok();
        let removed = remover.join().unwrap();
        assert!(
            !(prepared && removed),
            "round {round}: both the Remove and the Prepare succeeded"
        );
        assert!(prepared || removed);
        if prepared {
            assert_eq!(store.stat(&child).unwrap().parent.as_deref(), Some(parent.as_str()));
            store.remove(&child).unwrap();
            store.remove(&parent).unwrap();
        }
    }
    assert!(store.walk(&[]).unwrap().is_empty());
}

/// containerd's GC calls Cleanup whenever it likes, also while a Prepare is
/// creating its directory or a Remove deleting one: Cleanup never removes a
/// directory under a Prepare, and neither call fails for the other.
#[test]
fn cleanup_racing_prepares_never_removes_their_directories() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SnapshotStore::open(dir.path()).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, halt) = (store.clone(), stop.clone());
    let cleaner = std::thread::spawn(move || {
        let mut runs = 0;
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            s.cleanup().unwrap();
            runs += 1;
        }
        runs
    });
    for round in 0..60 {
        let key = format!("active{round}");
        let mounts = store
            .prepare(&key, None, BTreeMap::new())
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(Path::new(&mounts[0].source).is_dir(), "round {round}: {mounts:?}");
        store.remove(&key).unwrap();
        store.cleanup().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(cleaner.join().unwrap() > 0);
}
