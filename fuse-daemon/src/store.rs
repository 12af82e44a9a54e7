//! The node-wide chunk store: verified plain chunk bytes, one file per blake3
//! digest under `<cache>/chunks/ab/cdef…`, shared by every image and daemon on the
//! node, so a chunk is stored and fetched once whichever image asks for it.
//!
//! Crash safety: a chunk file is written to a temporary name, `fdatasync`ed (a
//! batch in parallel, so the journal commits it at once) and
//! renamed into place, so a file under its digest always holds complete bytes that
//! passed verification; a kill -9 at any point leaves at worst a stray temporary
//! file (removed by GC). Eviction (`gc`) only unlinks files: a reader that already
//! opened one finishes its read, and a reader that finds it gone fetches again.
//! Recency is the file's mtime, refreshed at most once a minute per chunk.

use crate::error::{DaemonError, Result};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often one chunk's recency is refreshed at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(60);

/// The store; cheap to share.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    /// Size bound (bytes of chunk files); none: unbounded.
    max_bytes: Option<u64>,
    /// Approximate bytes stored (exact after a scan or GC).
    approx_bytes: AtomicU64,
    touched: Mutex<(Instant, HashSet<[u8; 32]>)>,
    gc_running: AtomicBool,
}

/// What a GC pass did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GcReport {
    pub chunks_before: u64,
    pub bytes_before: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub pinned_kept: u64,
    /// Materialized files (passthrough backing files) removed; they go first.
    pub files_removed: u64,
}

fn hex_name(digest: &[u8; 32]) -> String {
    hex::encode(digest)
}

/// Creates the node cache directory `cache_dir` (and its parents) and makes it private
/// to its owner (0700), as containerd keeps its snapshot roots since CVE-2021-41103.
/// Cached bootstraps name every chunk's digest, and chunks and materialized files are
/// image content, so no other local user may list or read any of it.
pub fn create_cache_dir(cache_dir: &Path) -> Result<()> {
    create_private_dir(cache_dir)
}

/// Creates `dir` (and missing parents) with mode 0700, tightening it if it exists.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(DaemonError::io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(DaemonError::io("chmod", dir))
}

impl ChunkStore {
    /// Opens the store under `cache_dir/chunks` (creating it, private: `create_cache_dir`).
    pub fn open(cache_dir: &Path, max_bytes: Option<u64>) -> Result<Arc<Self>> {
        create_cache_dir(cache_dir)?;
        let root = cache_dir.join("chunks");
        create_private_dir(&root.join("tmp"))?;
        create_private_dir(&root)?;
        let store = ChunkStore {
            root,
            max_bytes,
            approx_bytes: AtomicU64::new(0),
            touched: Mutex::new((Instant::now(), HashSet::new())),
            gc_running: AtomicBool::new(false),
        };
        let store = Arc::new(store);
        if max_bytes.is_some() {
            // The first measure of the cache scans every chunk file: in the
            // background, so a mount never waits for it (puts meanwhile add up on top).
            let weak = Arc::downgrade(&store);
            let _ = std::thread::Builder::new()
                .name("petrel-cache-usage".into())
                .spawn(move || {
                    let Some(store) = weak.upgrade() else { return };
                    let (_, bytes) = store.usage();
                    let total = store.approx_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    if store.max_bytes.is_some_and(|max| total > max) {
                        store.gc_in_background();
                    }
                });
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let name = hex_name(digest);
        self.root.join(&name[..2]).join(&name[2..])
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.path(digest).exists()
    }

    /// Whether the stored chunk's bytes hash to `digest` (false when they do not;
    /// `NotFound` when it is not stored). Reads at most `MAX_CHUNK_FILE` bytes.
    pub fn verify(&self, digest: &[u8; 32]) -> std::io::Result<bool> {
        verify_chunk_file(&self.path(digest), digest)
    }

    /// Reads `buf.len()` bytes at `offset` of a stored chunk. `NotFound` when it was
    /// never stored or was evicted.
    pub fn read(&self, digest: &[u8; 32], offset: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let file = File::open(self.path(digest))?;
        file.read_exact_at(buf, u64::from(offset))?;
        self.touch(digest, &file);
        Ok(())
    }

    fn touch(&self, digest: &[u8; 32], file: &File) {
        let mut touched = self.touched.lock().expect("touch lock");
        if touched.0.elapsed() > TOUCH_INTERVAL {
            *touched = (Instant::now(), HashSet::new());
        }
        if touched.1.insert(*digest) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Stores verified chunks durably (temporary file, fdatasync, rename).
    pub fn put(self: &Arc<Self>, chunks: &[([u8; 32], &[u8])]) -> Result<()> {
        let tmp_dir = self.root.join("tmp");
        let mut staged = Vec::new();
        for (digest, bytes) in chunks {
            let path = self.path(digest);
            if path.exists() {
                continue;
            }
            let mut temp = tempfile::NamedTempFile::new_in(&tmp_dir)
                .map_err(DaemonError::io("create temporary chunk in", &tmp_dir))?;
            temp.write_all(bytes).map_err(DaemonError::io("write", temp.path()))?;
            staged.push((path, temp, bytes.len() as u64));
        }
        sync_all_data(staged.iter().map(|(_, temp, _)| temp))?;
        let mut added = 0;
        for (path, temp, len) in staged {
            let dir = path.parent().expect("two-level path");
            std::fs::create_dir_all(dir).map_err(DaemonError::io("create", dir))?;
            temp.persist(&path)
                .map_err(|e| DaemonError::io("rename chunk to", &path)(e.error))?;
            added += len;
        }
        let total = self.approx_bytes.fetch_add(added, Ordering::Relaxed) + added;
        if self.max_bytes.is_some_and(|max| total > max) {
            self.gc_in_background();
        }
        Ok(())
    }

    /// Removes one chunk (its bytes turned out unusable).
    pub fn remove(&self, digest: &[u8; 32]) {
        let _ = std::fs::remove_file(self.path(digest));
    }

    /// Every stored chunk: (digest, size, mtime).
    pub fn list(&self) -> Vec<([u8; 32], u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(shards) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for shard in shards.flatten() {
            let prefix = shard.file_name().to_string_lossy().to_string();
            if prefix.len() != 2 {
                continue;
            }
            for entry in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(&name, &mut digest).is_err() {
                    continue;
                }
                if let Ok(meta) = entry.metadata() {
                    out.push((digest, meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                }
            }
        }
        out
    }

    /// (chunks, bytes) stored.
    pub fn usage(&self) -> (u64, u64) {
        let list = self.list();
        (list.len() as u64, list.iter().map(|(_, size, _)| size).sum())
    }

    /// Counts bytes of files derived from chunks (materialized passthrough files)
    /// towards the bound.
    pub fn add_derived_bytes(self: &Arc<Self>, bytes: u64) {
        let total = self.approx_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if self.max_bytes.is_some_and(|max| total > max) {
            self.gc_in_background();
        }
    }

    fn files_dir(&self) -> PathBuf {
        self.root.parent().expect("cache root").join("files")
    }

    /// Materialized files: (path, bytes, last modified), oldest first.
    fn derived_files(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut files: Vec<(PathBuf, u64, SystemTime)> = std::fs::read_dir(self.files_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                Some((e.path(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
            })
            .collect();
        files.sort_by_key(|f| f.2);
        files
    }

    /// Evicts materialized files (derived, so first), then least recently used chunks,
    /// never pinned ones, until at most `max_bytes` remain. Also removes stray
    /// temporary files of dead writers. A mount that has a removed file open keeps
    /// reading it; the next open goes through FUSE.
    pub fn gc(&self, max_bytes: u64) -> GcReport {
        let pinned = live_pins(self.root.parent().expect("cache root"));
        let mut chunks = self.list();
        let files = self.derived_files();
        let mut report = GcReport {
            chunks_before: chunks.len() as u64,
            bytes_before: chunks.iter().map(|c| c.1).sum::<u64>() + files.iter().map(|f| f.1).sum::<u64>(),
            ..GcReport::default()
        };
        chunks.sort_by_key(|c| c.2);
        let mut total = report.bytes_before;
        for (path, size, _) in files {
            if total <= max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                report.files_removed += 1;
                report.bytes_removed += size;
            }
        }
        for (digest, size, _) in chunks {
            if total <= max_bytes {
                break;
            }
            if pinned.contains(&digest) {
                report.pinned_kept += 1;
                continue;
            }
            if std::fs::remove_file(self.path(&digest)).is_ok() {
                total -= size;
                report.chunks_removed += 1;
                report.bytes_removed += size;
            }
        }
        let temporaries = [self.root.join("tmp"), self.files_dir().join("tmp")];
        for entry in temporaries
            .iter()
            .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600));
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        report
    }

    /// Starts a GC pass on a thread of its own (one at a time): the reader or
    /// fetcher that crossed the bound never waits for the scan.
    fn gc_in_background(self: &Arc<Self>) {
        let Some(max) = self.max_bytes else { return };
        if self.gc_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("petrel-cache-gc".into())
            .spawn(move || {
                // Puts during a pass count from zero on top of what the pass left, and
                // a pass that leaves the cache over its bound (puts came in meanwhile)
                // is followed by another, unless it could remove nothing (all pinned).
                loop {
                    store.approx_bytes.store(0, Ordering::Relaxed);
                    let report = store.gc(max);
                    let left = report.bytes_before - report.bytes_removed;
                    let now = store.approx_bytes.fetch_add(left, Ordering::Relaxed) + left;
                    tracing::info!(
                        removed = report.chunks_removed,
                        bytes = report.bytes_removed,
                        "cache GC"
                    );
                    if now <= max || report.bytes_removed == 0 {
                        break;
                    }
                }
                store.gc_running.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.gc_running.store(false, Ordering::SeqCst);
        }
    }
}

/// Pin files: `<cache>/pins/<pid>.<name>` hold 32-byte digests a live daemon wants kept.
pub fn write_pins(cache_dir: &Path, name: &str, digests: &[[u8; 32]]) -> Result<PathBuf> {
    let dir = cache_dir.join("pins");
    std::fs::create_dir_all(&dir).map_err(DaemonError::io("create", &dir))?;
    let path = dir.join(format!("{}.{name}", std::process::id()));
    let bytes: Vec<u8> = digests.iter().flatten().copied().collect();
    std::fs::write(&path, bytes).map_err(DaemonError::io("write", &path))?;
    Ok(path)
}

/// Prefix of a pin that outlives its writer (`petrel warm --pin`), named by the
/// image's bootstrap digest.
const KEPT_PIN_PREFIX: &str = "kept.";

/// Pins `digests` for the image whose bootstrap digest is `bootstrap_hex` until
/// `unpin_image`: eviction never removes them, whatever the cache bound.
pub fn pin_image(cache_dir: &Path, bootstrap_hex: &str, digests: &[[u8; 32]]) -> Result<PathBuf> {
    let dir = cache_dir.join("pins");
    create_private_dir(&dir)?;
    let path = dir.join(format!("{KEPT_PIN_PREFIX}{bootstrap_hex}"));
    let mut temp = tempfile::NamedTempFile::new_in(&dir).map_err(DaemonError::io("create temporary file in", &dir))?;
    let bytes: Vec<u8> = digests.iter().flatten().copied().collect();
    std::io::Write::write_all(&mut temp, &bytes).map_err(DaemonError::io("write", &path))?;
    temp.persist(&path)
        .map_err(|e| DaemonError::io("rename to", &path)(e.error))?;
    Ok(path)
}

/// Whether the image with bootstrap digest `bootstrap_hex` is pinned.
pub fn is_pinned(cache_dir: &Path, bootstrap_hex: &str) -> bool {
    cache_dir
        .join("pins")
        .join(format!("{KEPT_PIN_PREFIX}{bootstrap_hex}"))
        .exists()
}

/// Removes the pin of `bootstrap_hex`; whether there was one.
pub fn unpin_image(cache_dir: &Path, bootstrap_hex: &str) -> bool {
    std::fs::remove_file(cache_dir.join("pins").join(format!("{KEPT_PIN_PREFIX}{bootstrap_hex}"))).is_ok()
}

/// Digests pinned by images kept with `pin_image` and by daemons that are still
/// alive (pins of dead daemons are removed).
fn live_pins(cache_dir: &Path) -> HashSet<[u8; 32]> {
    let mut pinned = HashSet::new();
    for entry in std::fs::read_dir(cache_dir.join("pins"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = name.split('.').next().unwrap_or("");
        let kept = name.starts_with(KEPT_PIN_PREFIX);
        if !kept && (!pid.bytes().all(|b| b.is_ascii_digit()) || !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        if let Ok(bytes) = std::fs::read(entry.path()) {
            for chunk in bytes.chunks_exact(32) {
                pinned.insert(chunk.try_into().expect("32 bytes"));
            }
        }
    }
    pinned
}

/// Per-image summary for `petrel cache ls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedImage {
    pub bootstrap: String,
    pub chunks: u64,
    pub chunks_cached: u64,
    pub bytes_cached: u64,
    pub last_use: Option<u64>,
    /// Kept against eviction (`petrel warm --pin`).
    pub pinned: bool,
}

/// Images whose bootstraps are in the cache, with how much of each is cached.
pub fn cached_images(cache_dir: &Path, store: &ChunkStore) -> Vec<CachedImage> {
    let stored: HashMap<[u8; 32], (u64, SystemTime)> = store.list().into_iter().map(|(d, s, t)| (d, (s, t))).collect();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(cache_dir.join("bootstraps"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(bootstrap) = petrel_format::Bootstrap::open(&bytes) else {
            continue;
        };
        let mut image = CachedImage {
            bootstrap: entry.file_name().to_string_lossy().to_string(),
            chunks: u64::from(bootstrap.chunk_count()),
            chunks_cached: 0,
            bytes_cached: 0,
            last_use: None,
            pinned: is_pinned(cache_dir, &entry.file_name().to_string_lossy()),
        };
        let mut last: Option<SystemTime> = None;
        for index in 0..bootstrap.chunk_count() {
            if let Some((size, time)) = bootstrap.chunk(index).ok().and_then(|c| stored.get(&c.digest)) {
                image.chunks_cached += 1;
                image.bytes_cached += size;
                last = Some(last.map_or(*time, |l| l.max(*time)));
            }
        }
        image.last_use = last
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        out.push(image);
    }
    out
}

/// Threads that sync one batch's chunk files at once.
const SYNC_THREADS: usize = 8;

/// `fdatasync`s every file, from several threads at once: the filesystem's journal
/// then commits them together rather than one commit per file in turn, and no other
/// process's dirty data is flushed (as `syncfs` would).
fn sync_all_data<'a>(files: impl Iterator<Item = &'a tempfile::NamedTempFile>) -> Result<()> {
    let files: Vec<&tempfile::NamedTempFile> = files.collect();
    if files.len() <= 1 {
        for file in files {
            file.as_file()
                .sync_data()
                .map_err(DaemonError::io("sync", file.path()))?;
        }
        return Ok(());
    }
    let per_thread = files.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(per_thread)
            .map(|group| {
                scope.spawn(move || -> Result<()> {
                    for file in group {
                        file.as_file()
                            .sync_data()
                            .map_err(DaemonError::io("sync", file.path()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(DaemonError::Invalid("a chunk sync thread panicked".into())))
        })
    })
}

/// The largest chunk file hashed (a chunk's plain size is bounded by the format).
const MAX_CHUNK_FILE: u64 = 64 << 20;

/// Whether the file at `path` holds bytes whose BLAKE3 is `digest`.
pub fn verify_chunk_file(path: &Path, digest: &[u8; 32]) -> std::io::Result<bool> {
    let file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let read = std::io::copy(&mut std::io::Read::take(file, MAX_CHUNK_FILE + 1), &mut hasher)?;
    Ok(read <= MAX_CHUNK_FILE && hasher.finalize().as_bytes() == digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_reads_evicts_and_keeps_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let chunks: Vec<([u8; 32], Vec<u8>)> = (0..4u8).map(|i| ([i; 32], vec![i; 1000])).collect();
        let refs: Vec<([u8; 32], &[u8])> = chunks.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        store.put(&refs).unwrap();
        let mut buf = [0u8; 10];
        store.read(&[2; 32], 990, &mut buf).unwrap();
        assert_eq!(buf, [2; 10]);
        assert_eq!(store.usage(), (4, 4000));
        let pins = write_pins(dir.path(), "test", &[[0; 32]]).unwrap();
        let report = store.gc(1500);
        assert_eq!(
            (report.chunks_removed, report.pinned_kept),
            (3, 1),
            "the oldest chunk is pinned and kept"
        );
        assert!(store.contains(&[0; 32]), "pinned by a live process");
        assert_eq!(
            store.read(&[1; 32], 0, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_file(pins).unwrap();
        store.gc(0);
        assert_eq!(store.usage(), (0, 0));
    }
}
