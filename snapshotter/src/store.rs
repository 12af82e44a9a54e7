//! Snapshot metadata and directories with the semantics of containerd's overlayfs
//! snapshotter. Metadata lives in a redb database (`<root>/metadata.redb`), so
//! anything committed survives a crash or restart; directories live under
//! `<root>/snapshots/<id>/{fs,work}` with short numeric ids, so overlay mount
//! options stay short even for deep layer stacks. Keys are never used as paths.

use crate::error::{Result, SnapshotError};
use crate::filter::{Fields, Filter};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// containerd's snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What containerd knows of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: u128,
    pub updated: u128,
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [field] if field == "name" => Some(self.name.clone()),
            [field] if field == "parent" => Some(self.parent.clone().unwrap_or_default()),
            [field] if field == "kind" => Some(self.kind.name().into()),
            [labels, key] if labels == "labels" => self.labels.get(key).cloned(),
            _ => None,
        }
    }
}

/// A stored snapshot: its info, directory id, and for a remote (lazy) layer the
/// mountpoint that stands in for its directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    id: u64,
    info: Info,
    #[serde(default)]
    lazy_mount: Option<PathBuf>,
    /// A layer of a petrel image that containerd downloaded and unpacked itself.
    #[serde(default)]
    unpacked: Option<Unpacked>,
}

/// What an unpacked petrel layer holds in its directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Unpacked {
    /// `petrel/blob`, the data of the blob layer with this digest.
    Blob { digest: String },
    /// `petrel/bootstrap`: the image, lazily mounted from the blobs below it.
    Bootstrap,
}

/// A lazy mount and what it is mounted from.
#[derive(Debug, Clone)]
pub struct LazyLayer {
    pub info: Info,
    pub mountpoint: PathBuf,
    /// Set for an unpacked petrel image; otherwise the image is in the registry its
    /// labels name.
    pub unpacked: Option<UnpackedImage>,
}

/// An unpacked petrel image: its bootstrap's directory and the unpacked blobs below it.
#[derive(Debug, Clone)]
pub struct UnpackedImage {
    /// Holds `bootstrap` (the snapshot's `fs/petrel`).
    pub image_dir: PathBuf,
    /// Blob layer digest and the file holding its data, nearest layer first.
    pub blobs: Vec<(String, PathBuf)>,
}

/// A mount for containerd to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Disk usage of one snapshot, excluding its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

/// The snapshot store.
#[derive(Debug)]
pub struct SnapshotStore {
    root: PathBuf,
    db: Database,
}

/// Creates `dir` (and its parents) private to root: 0700, as containerd's own
/// snapshotters keep their roots since CVE-2021-41103 (host users ran setuid binaries
/// that containers wrote into their upper dirs). An existing directory is tightened.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(SnapshotError::io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(SnapshotError::io("chmod", dir))
}

fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

impl SnapshotStore {
    pub fn open(root: &Path) -> Result<Self> {
        private_dir(root)?;
        private_dir(&root.join("snapshots"))?;
        let db = Database::create(root.join("metadata.redb"))?;
        std::fs::set_permissions(root.join("metadata.redb"), std::fs::Permissions::from_mode(0o600))
            .map_err(SnapshotError::io("chmod", root.join("metadata.redb")))?;
        let txn = db.begin_write()?;
        {
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(COUNTERS)?;
        }
        txn.commit()?;
        Ok(SnapshotStore {
            root: root.to_path_buf(),
            db,
        })
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn get(&self, key: &str) -> Result<Record> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let value = table.get(key)?.ok_or_else(|| SnapshotError::NotFound(key.into()))?;
        serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(format!("record {key:?}: {e}")))
    }

    fn all(&self) -> Result<Vec<Record>> {
        let txn = self.db.begin_read()?;
        records_of(&txn.open_table(SNAPSHOTS)?)
    }

    /// Directories of the parent chain, nearest first.
    fn parent_dirs(&self, parent: Option<&str>) -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        let mut next = parent.map(str::to_string);
        while let Some(key) = next {
            let record = self.get(&key)?;
            match record.lazy_mount {
                // A lazy mount is a whole image: the layers below it hold its blobs.
                Some(mount) => {
                    dirs.push(mount);
                    break;
                }
                None => dirs.push(self.dir(record.id).join("fs")),
            }
            next = record.info.parent;
        }
        Ok(dirs)
    }

    /// The directory holding a snapshot's files.
    pub fn fs_dir(&self, key: &str) -> Result<PathBuf> {
        Ok(self.dir(self.get(key)?.id).join("fs"))
    }

    /// The parent a snapshot was created on.
    pub fn parent_of(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get(key)?.info.parent)
    }

    /// The unpacked blobs of a chain, from `key` down.
    pub fn unpacked_blobs(&self, key: Option<&str>) -> Result<Vec<(String, PathBuf)>> {
        let mut blobs = Vec::new();
        let mut next = key.map(str::to_string);
        while let Some(key) = next {
            let record = self.get(&key)?;
            if let Some(Unpacked::Blob { digest }) = &record.unpacked {
                blobs.push((
                    digest.clone(),
                    self.dir(record.id).join("fs").join("petrel").join("blob"),
                ));
            }
            next = record.info.parent;
        }
        Ok(blobs)
    }

    fn lazy_layer(&self, record: Record) -> Result<Option<LazyLayer>> {
        let Some(mountpoint) = record.lazy_mount else {
            return Ok(None);
        };
        let unpacked = match record.unpacked {
            Some(Unpacked::Bootstrap) => Some(UnpackedImage {
                image_dir: self.dir(record.id).join("fs").join("petrel"),
                blobs: self.unpacked_blobs(record.info.parent.as_deref())?,
            }),
            _ => None,
        };
        Ok(Some(LazyLayer {
            info: record.info,
            mountpoint,
            unpacked,
        }))
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("a snapshot key cannot be empty".into()));
        }
        // The parent is checked in the same write transaction that adds the child, and
        // Remove counts children in its own: write transactions are serialized, so a
        // Remove of the parent and a Prepare on it cannot both succeed.
        let txn = self.db.begin_write()?;
        let id = {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            if let Some(parent) = parent {
                let value = snapshots
                    .get(parent)?
                    .ok_or_else(|| SnapshotError::NotFound(parent.into()))?;
                let record: Record =
                    serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(e.to_string()))?;
                if record.info.kind != Kind::Committed {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {parent:?} is not committed"
                    )));
                }
            }
            if snapshots.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.into()));
            }
            let mut counters = txn.open_table(COUNTERS)?;
            let id = counters.get("next_id")?.map_or(1, |v| v.value());
            counters.insert("next_id", id + 1)?;
            let time = now();
            let record = Record {
                id,
                info: Info {
                    name: key.into(),
                    parent: parent.map(Into::into),
                    kind,
                    labels,
                    created: time,
                    updated: time,
                },
                lazy_mount: None,
                unpacked: None,
            };
            let bytes = serde_json::to_vec(&record).expect("serializable");
            snapshots.insert(key, bytes.as_slice())?;
            id
        };
        let dir = self.dir(id);
        std::fs::create_dir_all(dir.join("fs")).map_err(SnapshotError::io("create", &dir))?;
        std::fs::create_dir_all(dir.join("work")).map_err(SnapshotError::io("create", &dir))?;
        std::fs::set_permissions(dir.join("fs"), std::fs::Permissions::from_mode(0o755))
            .map_err(SnapshotError::io("chmod", &dir))?;
        txn.commit()?;
        self.mounts(key)
    }

    /// A new active (writable) snapshot on top of `parent`.
    pub fn prepare(&self, key: &str, parent: Option<&str>, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// A new read-only view of `parent`.
    pub fn view(&self, key: &str, parent: Option<&str>, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let record = self.get(key)?;
        let dir = self.dir(record.id);
        let lowers = self.parent_dirs(record.info.parent.as_deref())?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        Ok(match (record.info.kind, lowers.as_slice()) {
            (Kind::Active, []) => vec![Mount {
                kind: "bind".into(),
                source: path(&dir.join("fs")),
                options: vec!["rw".into(), "rbind".into()],
            }],
            (Kind::View, []) => vec![Mount {
                kind: "bind".into(),
                source: path(&dir.join("fs")),
                options: vec!["ro".into(), "rbind".into()],
            }],
            (Kind::View, [only]) => vec![Mount {
                kind: "bind".into(),
                source: path(only),
                options: vec!["ro".into(), "rbind".into()],
            }],
            (Kind::View, many) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!(
                    "lowerdir={}",
                    many.iter().map(|p| path(p)).collect::<Vec<_>>().join(":")
                )],
            }],
            (Kind::Active, many) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", path(&dir.join("work"))),
                    format!("upperdir={}", path(&dir.join("fs"))),
                    format!(
                        "lowerdir={}",
                        many.iter().map(|p| path(p)).collect::<Vec<_>>().join(":")
                    ),
                ],
            }],
            (Kind::Committed, _) => {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is committed; mount a view or an active snapshot of it"
                )))
            }
        })
    }

    /// Commits active snapshot `key` as `name` (same directory).
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        self.commit_unpacked(name, key, labels, None, None)
    }

    /// Commits active snapshot `key` as `name`, recording what petrel layer
    /// containerd unpacked into it and the lazy mount that serves it.
    pub fn commit_unpacked(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        unpacked: Option<Unpacked>,
        lazy_mount: Option<PathBuf>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument("a snapshot name cannot be empty".into()));
        }
        let txn = self.db.begin_write()?;
        {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            if snapshots.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.into()));
            }
            let record: Record = {
                let value = snapshots.get(key)?.ok_or_else(|| SnapshotError::NotFound(key.into()))?;
                serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(e.to_string()))?
            };
            if record.info.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            let time = now();
            let mut merged = record.info.labels.clone();
            merged.extend(labels);
            let committed = Record {
                id: record.id,
                info: Info {
                    name: name.into(),
                    kind: Kind::Committed,
                    labels: merged,
                    created: time,
                    updated: time,
                    parent: record.info.parent,
                },
                lazy_mount: lazy_mount.or(record.lazy_mount),
                unpacked,
            };
            snapshots.remove(key)?;
            let bytes = serde_json::to_vec(&committed).expect("serializable");
            snapshots.insert(name, bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Creates committed snapshot `name` directly: a remote layer containerd will
    /// not download. `lazy_mount` (a petrel FUSE mount) stands in for its contents.
    pub fn commit_remote(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        lazy_mount: Option<PathBuf>,
    ) -> Result<()> {
        self.create(Kind::Active, name, parent, labels)?;
        let txn = self.db.begin_write()?;
        {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let mut record: Record = {
                let value = snapshots
                    .get(name)?
                    .ok_or_else(|| SnapshotError::NotFound(name.into()))?;
                serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(e.to_string()))?
            };
            record.info.kind = Kind::Committed;
            record.lazy_mount = lazy_mount;
            let bytes = serde_json::to_vec(&record).expect("serializable");
            snapshots.insert(name, bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every lazy mount and what it is mounted from (to remount it).
    pub fn lazy_mounts(&self) -> Result<Vec<LazyLayer>> {
        let mut out = Vec::new();
        for record in self.all()? {
            out.extend(self.lazy_layer(record)?);
        }
        Ok(out)
    }

    /// Lazy mounts of a snapshot's parent chain (to check before handing out mounts).
    pub fn lazy_mounts_below(&self, key: &str) -> Result<Vec<LazyLayer>> {
        let mut out = Vec::new();
        let mut next = Some(key.to_string());
        while let Some(k) = next {
            let record = self.get(&k)?;
            next = record.info.parent.clone();
            out.extend(self.lazy_layer(record)?);
        }
        Ok(out)
    }

    /// Removes a snapshot that has no children, and its directory. Returns its lazy
    /// mount, if it had one, for the caller to unmount.
    pub fn remove_returning_mount(&self, key: &str) -> Result<Option<PathBuf>> {
        let mount = self.get(key)?.lazy_mount;
        self.remove(key)?;
        Ok(mount)
    }

    /// Removes a snapshot that has no children, and its directory.
    pub fn remove(&self, key: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let mut record = None;
            let mut children = 0;
            for entry in snapshots.iter()? {
                let (name, value) = entry?;
                let r: Record =
                    serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(e.to_string()))?;
                if name.value() == key {
                    record = Some(r);
                } else if r.info.parent.as_deref() == Some(key) {
                    children += 1;
                }
            }
            let record = record.ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            if children > 0 {
                return Err(SnapshotError::HasChildren {
                    key: key.into(),
                    children,
                });
            }
            snapshots.remove(key)?;
            record
        };
        txn.commit()?;
        let dir = self.dir(record.id);
        remove_dir_if_there(&dir)
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.get(key)?.info)
    }

    /// Updates labels (all, or those named by `labels.<key>` field paths); the
    /// name, parent and kind cannot change, and any other field path is refused.
    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let txn = self.db.begin_write()?;
        let updated = {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let mut record: Record = {
                let value = snapshots
                    .get(info.name.as_str())?
                    .ok_or_else(|| SnapshotError::NotFound(info.name.clone()))?;
                serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(e.to_string()))?
            };
            // As containerd's storage.UpdateInfo: only labels change; the kind and
            // parent in the request are ignored (containerd always sends Committed).
            if fieldpaths.is_empty() {
                record.info.labels = info.labels.clone();
            }
            for path in fieldpaths {
                match path.split_once('.') {
                    Some(("labels", key)) => match info.labels.get(key) {
                        Some(value) => {
                            record.info.labels.insert(key.into(), value.clone());
                        }
                        None => {
                            record.info.labels.remove(key);
                        }
                    },
                    None if path == "labels" => record.info.labels = info.labels.clone(),
                    _ => return Err(SnapshotError::InvalidArgument(format!("cannot update field {path:?}"))),
                }
            }
            record.info.updated = now();
            let bytes = serde_json::to_vec(&record).expect("serializable");
            snapshots.insert(info.name.as_str(), bytes.as_slice())?;
            record.info
        };
        txn.commit()?;
        Ok(updated)
    }

    /// Bytes and inodes of the snapshot's own directory (parents excluded).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.get(key)?;
        let mut usage = Usage::default();
        let mut stack = vec![self.dir(record.id).join("fs")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                usage.inodes += 1;
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    use std::os::unix::fs::MetadataExt;
                    usage.size += meta.blocks() * 512;
                }
            }
        }
        Ok(usage)
    }

    /// Every snapshot matching the filters, collected before returning (no lock
    /// is held while the caller streams them).
    pub fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse(filters)?;
        Ok(self
            .all()?
            .into_iter()
            .map(|r| r.info)
            .filter(|i| filter.matches(i))
            .collect())
    }

    /// Removes directories no snapshot owns (left by a crash between steps).
    ///
    /// A Prepare creates its directory inside its write transaction, before the
    /// record commits. Cleanup therefore holds a write transaction too (redb
    /// serializes them), so it never sees such a directory without its record and
    /// removes it under a Prepare that is about to succeed.
    pub fn cleanup(&self) -> Result<usize> {
        let txn = self.db.begin_write()?;
        let owned: std::collections::HashSet<String> = records_of(&txn.open_table(SNAPSHOTS)?)?
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        let mut removed = 0;
        for entry in std::fs::read_dir(self.root.join("snapshots"))
            .map_err(SnapshotError::io("read", &self.root))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owned.contains(&name) && name.bytes().all(|b| b.is_ascii_digit()) {
                remove_dir_if_there(&entry.path())?;
                removed += 1;
            }
        }
        txn.abort()?;
        Ok(removed)
    }
}

/// Every record of the snapshots table, in a read or a write transaction.
fn records_of(table: &impl redb::ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (_, value) = entry?;
        out.push(serde_json::from_slice(value.value()).map_err(|e| SnapshotError::Database(e.to_string()))?);
    }
    Ok(out)
}

/// Removes a snapshot's directory. A Remove deletes it after its record is gone,
/// so a Cleanup may be deleting it at the same time: whichever ends first, the
/// directory is gone, and that is all either asked for.
fn remove_dir_if_there(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io("remove", dir)(e)),
    }
}
