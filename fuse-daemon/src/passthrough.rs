//! FUSE passthrough (Linux 6.9+) for files whose chunks are all cached: the file is
//! materialized once as a file pack of the chunk store (`ChunkStore::adopt_file`),
//! linked from `<cache>/files/` under a digest of its content description (so
//! identical files of different images share it), and opens of it are answered with
//! that file as the backing file. The kernel then reads, and maps, it directly: no
//! FUSE round trip, no decompression, native speed. The file pack is the cache's
//! only copy of the file's whole chunks: a fully read image is stored once.
//!
//! Only files used again are materialized, and never on the read path: an open
//! that finds a file's chunks all cached, of a file this mount opened before, is
//! served through FUSE (its bytes are in the cache already) and queues the copy
//! for one background thread at the lowest CPU priority; a later open gets the
//! backing file. A file read once (most of a container's startup, a scan of every
//! file) is never copied. Measured reading every file of the Python image once,
//! cold, from a local blob: copying during the open 2.95 s, copying in the
//! background every file found cached 2.87 s, only files opened again 2.08 s (no
//! passthrough at all: 2.13 s).
//!
//! A file pack is written from verified chunks through a synced temporary file and a
//! rename, like chunks; the store's GC evicts it like any pack. A file being
//! materialized while a chunk is evicted is simply not materialized, and the open
//! goes through FUSE as before.
//!
//! A materialized file found on disk (an earlier daemon's, another image's) is
//! checked against its chunks' digests before this daemon first hands it to the
//! kernel (small files during the open, large ones in the background while the
//! open goes through FUSE); one that does not match is removed and made again.

use crate::cache::ChunkCache;
use crate::error::{DaemonError, Result};
use crate::image::MappedImage;
use crate::job_queue::{JobQueue, Take};
use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use petrel_format::reader::{FileSegment, SegmentSource};
use petrel_format::{Bootstrap, Inode};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Files smaller than this are not worth a backing file (one FUSE read serves them).
pub const MIN_FILE_BYTES: u64 = 64 << 10;
/// A materialized file found on disk up to this size is checked during the open
/// that finds it; a larger one in the background.
pub const CHECK_NOW_BYTES: u64 = 32 << 20;
/// How long the background thread waits for a file's fetched chunks to be stored.
const LANDING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Files up to this size are materialized.
pub const MAX_FILE_BYTES: u64 = 8 << 30;
/// Files waiting to be materialized or checked at most (beyond, a file waits for a
/// later open).
const MAX_QUEUED: usize = 4096;

/// Backing files of one mount and the opens that use them.
///
/// The kernel does not let an inode be open with and without a backing file at the
/// same time (the second kind of open fails with ETXTBSY), so every open of an
/// eligible inode is counted, and while an inode has opens, new ones take the same
/// mode: a file first opened before all its chunks were cached stays on FUSE reads
/// until its last open is released.
#[derive(Debug)]
pub struct Passthrough {
    /// The read path's owner: which chunks are ready, and the store they are in.
    fetcher: Arc<crate::fetch::Fetcher>,
    dir: PathBuf,
    enabled: AtomicBool,
    next_handle: AtomicU64,
    state: Mutex<Opens>,
    /// Content keys queued or being materialized or checked in the background.
    in_progress: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Content keys whose file this daemon made or checked.
    checked: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Work for the background thread (started with the first job).
    jobs: Arc<JobQueue<Job>>,
    worker: std::sync::Once,
}

/// Work for the materializing thread: a file's segments, computed there.
struct Job {
    image: Arc<MappedImage>,
    cache: Arc<ChunkCache>,
    ino: u32,
    size: u64,
    key: String,
    work: Box<FileWork>,
}

/// What is done with a file on the background thread: given its segments and
/// content key.
type FileWork = dyn FnOnce(&Bootstrap<'_>, &[FileSegment], &ChunkCache, &str) -> Result<()> + Send;

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("ino", &self.ino)
            .field("key", &self.key)
            .finish()
    }
}

#[derive(Debug, Default)]
struct Opens {
    /// Per inode: open handles, and the backing file they share (none: FUSE reads).
    inodes: HashMap<u32, (u32, Option<Arc<BackingId>>)>,
    /// Per handle: its inode.
    handles: HashMap<u64, u32>,
    /// Inodes opened since the mount (at most the image's inode count).
    opened: std::collections::HashSet<u32>,
}

impl Passthrough {
    /// Backing files live in `cache_dir/files`; their bytes come from the chunks
    /// `fetcher` made ready.
    pub fn new(cache_dir: &Path, fetcher: Arc<crate::fetch::Fetcher>) -> Self {
        Passthrough {
            fetcher,
            dir: cache_dir.join("files"),
            enabled: AtomicBool::new(true),
            next_handle: AtomicU64::new(1),
            state: Mutex::new(Opens::default()),
            in_progress: Arc::default(),
            checked: Arc::default(),
            // Never drops a job: `in_progress` bounds what is queued.
            jobs: Arc::new(JobQueue::new(MAX_QUEUED + 1, Take::Oldest)),
            worker: std::sync::Once::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// Turns passthrough off for new files (the kernel does not offer it, or refused a
    /// backing file).
    pub fn disable(&self, why: &str) {
        if self.enabled.swap(false, Relaxed) {
            tracing::warn!("FUSE passthrough off: {why}; every read stays on FUSE");
        }
    }

    /// Answers the open of a regular file: with its backing file when it has one (or
    /// can have one now), otherwise as an ordinary cached open. True for a backing file.
    pub fn open(&self, image: &Arc<MappedImage>, inode: &Inode<'_>, reply: ReplyOpen) -> bool {
        let cache = self.fetcher.cache();
        // A chunk not cached yet that was fetched and is being stored.
        let landing = |chunk| self.fetcher.is_landing(chunk);
        let landing: &dyn Fn(u32) -> bool = &landing;
        let ordinary = |reply: ReplyOpen, handle: u64| {
            reply.opened(FileHandle(handle), FopenFlags::FOPEN_KEEP_CACHE);
            false
        };
        if !(MIN_FILE_BYTES..=MAX_FILE_BYTES).contains(&inode.size()) {
            return ordinary(reply, 0);
        }
        let ino = inode.ino();
        let (already_open, opened_before) = {
            let mut state = self.state.lock().expect("opens lock");
            (state.inodes.contains_key(&ino), !state.opened.insert(ino))
        };
        // Checked outside the lock (it may read megabytes); decided under it.
        let file = match (already_open, self.enabled()) {
            (false, true) => self
                .materialized(image, inode, cache, landing, opened_before)
                .unwrap_or_else(|e| {
                    tracing::warn!(ino, "no backing file: {e}");
                    None
                }),
            _ => None,
        };
        let mut state = self.state.lock().expect("opens lock");
        let backing = match state.inodes.get(&ino) {
            Some((_, backing)) => backing.clone(),
            None => file.and_then(|file| match reply.open_backing(&file) {
                Ok(id) => Some(Arc::new(id)),
                Err(e) => {
                    self.disable(&format!("the kernel refused a backing file: {e}"));
                    None
                }
            }),
        };
        let handle = self.next_handle.fetch_add(1, Relaxed);
        let entry = state.inodes.entry(ino).or_insert((0, backing.clone()));
        entry.0 += 1;
        state.handles.insert(handle, ino);
        drop(state);
        match backing {
            Some(id) => {
                reply.opened_passthrough(FileHandle(handle), FopenFlags::empty(), &id);
                true
            }
            None => ordinary(reply, handle),
        }
    }

    /// Ends an open; the inode's backing file is let go with its last open.
    pub fn release(&self, handle: u64) {
        let mut state = self.state.lock().expect("opens lock");
        let Some(ino) = state.handles.remove(&handle) else {
            return;
        };
        if let Some(entry) = state.inodes.get_mut(&ino) {
            entry.0 -= 1;
            if entry.0 == 0 {
                state.inodes.remove(&ino);
            }
        }
    }

    /// The plain copy of the file if it exists. Otherwise, when every chunk is cached
    /// and the file was `opened_before` in this mount, the file is materialized on
    /// the background thread (this open goes through FUSE, a later one gets the
    /// backing file).
    fn materialized(
        &self,
        image: &Arc<MappedImage>,
        inode: &Inode<'_>,
        cache: &Arc<ChunkCache>,
        landing: &dyn Fn(u32) -> bool,
        opened_before: bool,
    ) -> Result<Option<File>> {
        let bootstrap = image.bootstrap();
        let segments = bootstrap.segments(inode, 0, inode.size())?;
        let key = content_key(&bootstrap, inode.size(), &segments)?;
        let path = self.dir.join(&key);
        if let Ok(file) = File::open(&path) {
            crate::store::touch_if_stale(&file);
            if self.checked.lock().expect("checked lock").contains(&key) {
                return Ok(Some(file));
            }
            if inode.size() <= CHECK_NOW_BYTES {
                if check_materialized(&file, &bootstrap, &segments, cache)? {
                    self.checked.lock().expect("checked lock").insert(key);
                    return Ok(Some(file));
                }
                drop_corrupt(&path, cache);
            } else {
                let checked = Arc::clone(&self.checked);
                self.in_background(image, inode, cache, key, move |bootstrap, segments, cache, key| {
                    if check_materialized(&file, bootstrap, segments, cache)? {
                        checked.lock().expect("checked lock").insert(key.to_string());
                    } else {
                        drop_corrupt(&path, cache);
                    }
                    Ok(())
                });
                return Ok(None);
            }
        }
        // A file read whole just before may still have chunks on their way to the
        // cache: the background thread waits for them. A first open looks no further.
        let all_there = || {
            segments.iter().all(|s| match s.source {
                SegmentSource::Hole => true,
                SegmentSource::Chunk { index, .. } => cache.is_ready(index) || landing(index),
            })
        };
        if !opened_before || !all_there() {
            return Ok(None);
        }
        let (dir, checked, size) = (self.dir.clone(), Arc::clone(&self.checked), inode.size());
        self.in_background(image, inode, cache, key, move |bootstrap, segments, cache, key| {
            if !all_cached_soon(segments, cache) {
                return Ok(());
            }
            if materialize(&dir, bootstrap, segments, size, cache, &path)? {
                checked.lock().expect("checked lock").insert(key.to_string());
            }
            Ok(())
        });
        Ok(None)
    }

    /// Queues `work` on the file's segments for the background thread, once per
    /// content key at a time.
    fn in_background(
        &self,
        image: &Arc<MappedImage>,
        inode: &Inode<'_>,
        cache: &Arc<ChunkCache>,
        key: String,
        work: impl FnOnce(&Bootstrap<'_>, &[FileSegment], &ChunkCache, &str) -> Result<()> + Send + 'static,
    ) {
        {
            let mut in_progress = self.in_progress.lock().expect("progress lock");
            if in_progress.len() >= MAX_QUEUED || !in_progress.insert(key.clone()) {
                return;
            }
        }
        self.worker.call_once(|| {
            let (jobs, in_progress) = (Arc::clone(&self.jobs), Arc::clone(&self.in_progress));
            let spawned = std::thread::Builder::new()
                .name("petrel-materialize".into())
                .spawn(move || materialize_jobs(&jobs, &in_progress));
            if let Err(e) = spawned {
                tracing::warn!("no thread to materialize files for passthrough: {e}");
            }
        });
        self.jobs.push([Job {
            image: Arc::clone(image),
            cache: Arc::clone(cache),
            ino: inode.ino(),
            size: inode.size(),
            key,
            work: Box::new(work),
        }]);
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.jobs.close();
    }
}

/// The background thread: runs queued jobs, one at a time, at the lowest CPU
/// priority (it competes with nothing a reader waits for).
fn materialize_jobs(jobs: &JobQueue<Job>, in_progress: &Mutex<std::collections::HashSet<String>>) {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!("materializing at normal priority: {e}");
    }
    while let Some(job) = jobs.next() {
        let bootstrap = job.image.bootstrap();
        let done = bootstrap
            .inode(job.ino)
            .and_then(|inode| bootstrap.segments(&inode, 0, job.size))
            .map_err(DaemonError::from)
            .and_then(|segments| (job.work)(&bootstrap, &segments, &job.cache, &job.key));
        if let Err(e) = done {
            tracing::warn!(ino = job.ino, "backing file: {e}");
        }
        in_progress.lock().expect("progress lock").remove(&job.key);
    }
}

/// Whether every chunk of `segments` is cached, waiting (at most `LANDING_WAIT`)
/// for chunks still being stored.
fn all_cached_soon(segments: &[FileSegment], cache: &ChunkCache) -> bool {
    let deadline = std::time::Instant::now() + LANDING_WAIT;
    loop {
        let all = segments.iter().all(|s| match s.source {
            SegmentSource::Hole => true,
            SegmentSource::Chunk { index, .. } => cache.is_ready(index),
        });
        if all || std::time::Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Removes a materialized file that does not match its chunks.
fn drop_corrupt(path: &Path, cache: &ChunkCache) {
    tracing::warn!(path = %path.display(), "a materialized file does not match its chunks; removing it");
    cache.store().remove_materialized(path);
    cache.note_corrupt();
}

/// Whether the materialized `file` holds the bytes its segments name: whole chunks
/// by their digests, parts of chunks against the (verified) cached chunks, holes as
/// zeros. False when a part cannot be checked (its chunk is no longer cached).
pub fn check_materialized(
    file: &File,
    bootstrap: &Bootstrap<'_>,
    segments: &[FileSegment],
    cache: &ChunkCache,
) -> Result<bool> {
    check_file_against(file, bootstrap, segments, &|index, offset, buf| {
        cache.read(index, offset, buf).is_ok()
    })
}

/// `check_materialized`, with `read_chunk(index, offset, buf)` giving trusted bytes
/// of a chunk (false when it cannot).
pub fn check_file_against(
    file: &File,
    bootstrap: &Bootstrap<'_>,
    segments: &[FileSegment],
    read_chunk: &dyn Fn(u32, u32, &mut [u8]) -> bool,
) -> Result<bool> {
    /// Holes are checked this much at a time (a hole may be gigabytes).
    const HOLE_PIECE: u64 = 1 << 20;
    let mut actual = Vec::new();
    let mut expected = Vec::new();
    let mut total = 0u64;
    for segment in segments {
        total = total.max(segment.file_offset + u64::from(segment.length));
        if let SegmentSource::Hole = segment.source {
            let mut at = segment.file_offset;
            while at < segment.file_offset + u64::from(segment.length) {
                let piece = HOLE_PIECE.min(segment.file_offset + u64::from(segment.length) - at);
                actual.resize(piece as usize, 0);
                if file.read_exact_at(&mut actual, at).is_err() || actual.iter().any(|&b| b != 0) {
                    return Ok(false);
                }
                at += piece;
            }
            continue;
        }
        // A chunk segment is at most one chunk (bounded by the format).
        actual.resize(segment.length as usize, 0);
        if file.read_exact_at(&mut actual, segment.file_offset).is_err() {
            return Ok(false);
        }
        let good = match segment.source {
            SegmentSource::Hole => true,
            SegmentSource::Chunk { index, chunk_offset } => {
                let chunk = bootstrap.chunk(index)?;
                if chunk_offset == 0 && segment.length == chunk.uncompressed_size {
                    petrel_format::codec::chunk_digest(&actual) == chunk.digest
                } else {
                    expected.resize(segment.length as usize, 0);
                    read_chunk(index, chunk_offset, &mut expected) && expected == actual
                }
            }
        };
        if !good {
            return Ok(false);
        }
    }
    Ok(file.metadata().is_ok_and(|m| m.len() == total))
}

/// Writes the file's bytes from cached chunks into a file pack (temporary file,
/// sync, rename: `ChunkStore::adopt_file`), which becomes the cache's copy of its
/// whole chunks, and links `path` to it. False when a chunk was evicted meanwhile.
fn materialize(
    dir: &Path,
    bootstrap: &Bootstrap<'_>,
    segments: &[FileSegment],
    size: u64,
    cache: &ChunkCache,
    path: &Path,
) -> Result<bool> {
    let store = cache.store();
    let temp = store.temp_file()?;
    let mut buffer = Vec::new();
    let mut chunks = Vec::new();
    for segment in segments {
        if let SegmentSource::Chunk { index, chunk_offset } = segment.source {
            buffer.resize(segment.length as usize, 0);
            match cache.read(index, chunk_offset, &mut buffer) {
                Ok(()) => {}
                Err(DaemonError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
            temp.as_file()
                .write_all_at(&buffer, segment.file_offset)
                .map_err(DaemonError::io("write", temp.path()))?;
            let chunk = bootstrap.chunk(index)?;
            if chunk_offset == 0 && segment.length == chunk.uncompressed_size {
                chunks.push((chunk.digest, segment.file_offset, segment.length));
            }
        }
    }
    let file = temp.as_file();
    file.set_len(size).map_err(DaemonError::io("size", temp.path()))?;
    // Only the daemon opens it (the kernel then uses that open); image content from a
    // private registry must not become readable by other local users.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o400))
        .map_err(DaemonError::io("chmod", temp.path()))?;
    file.sync_data().map_err(DaemonError::io("sync", temp.path()))?;
    let pack = store.adopt_file(temp, &chunks)?;
    let name = pack.file_name().expect("a pack has a name");
    link_atomically(&Path::new("../packs").join(name), dir, path)?;
    Ok(true)
}

/// Makes `path` (in `dir`) a symbolic link to `target`, replacing what was there.
fn link_atomically(target: &Path, dir: &Path, path: &Path) -> Result<()> {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(DaemonError::io("create", &tmp))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(DaemonError::io("chmod", dir))?;
    let temp = tmp.join(format!("{}.{}", std::process::id(), crate::pack::new_pack_id()));
    std::os::unix::fs::symlink(target, &temp).map_err(DaemonError::io("link", &temp))?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        DaemonError::io("rename to", path)(e)
    })
}

/// Where the materialized copy of `inode` lives (whether or not it exists yet).
pub fn materialized_path(cache_dir: &Path, bootstrap: &Bootstrap<'_>, inode: &Inode<'_>) -> Result<PathBuf> {
    let segments = bootstrap.segments(inode, 0, inode.size())?;
    Ok(cache_dir
        .join("files")
        .join(content_key(bootstrap, inode.size(), &segments)?))
}

/// Names a file's content: its size and, piece by piece, where its bytes come from
/// (chunk digest and offset, or a hole). Equal names mean equal bytes.
fn content_key(bootstrap: &Bootstrap<'_>, size: u64, segments: &[FileSegment]) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"petrel file v1");
    hasher.update(&size.to_le_bytes());
    for segment in segments {
        hasher.update(&segment.file_offset.to_le_bytes());
        hasher.update(&segment.length.to_le_bytes());
        match segment.source {
            SegmentSource::Hole => {
                hasher.update(&[0]);
            }
            SegmentSource::Chunk { index, chunk_offset } => {
                hasher.update(&[1]);
                hasher.update(&bootstrap.chunk(index)?.digest);
                hasher.update(&chunk_offset.to_le_bytes());
            }
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}
