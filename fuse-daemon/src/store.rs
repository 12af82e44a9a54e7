//! The node-wide chunk store: verified plain chunk bytes by BLAKE3 digest, shared
//! by every image and daemon on the node, so a chunk is stored and fetched once
//! whichever image asks for it.
//!
//! Chunks live in append-only pack files under `<cache>/packs/` (`crate::pack`):
//! each process appends to packs of its own and makes stored batches durable with
//! one `fdatasync` before their index records are written, so a crash leaves at worst
//! bytes no record names (`put` syncs before it returns; `put_readable`, the
//! fetcher's, leaves it to a committer thread: `commit`). Which chunks are stored
//! is answered from memory, loaded from the index files at open and refreshed
//! from them (other processes' packs) when a chunk is not found (at most every
//! 50 ms) and every 2 s in the background: never by a `stat` per chunk.
//!
//! A file materialized for passthrough is a *file pack* (`relocate`): its bytes in
//! file order, whose index names its whole chunks, so the backing file is the only
//! copy of them. Packs of chunks whose bytes are mostly no longer named are compacted
//! on the background thread (their named chunks moved to a new pack, then removed).
//!
//! Eviction (`gc`) removes whole packs, least recently used first (a pack's mtime,
//! refreshed by reads at most once a minute), after moving the chunks that live
//! mounts pin into a new pack; it runs on a thread of its own, never on a reader's.
//! A daemon that still reads a removed pack keeps its open file until it notices,
//! then looks the chunk up again (it may have moved) or fetches it again. A cache directory of the first layout (one file per chunk
//! under `chunks/`) is discarded when a store opens: its chunks are fetched again.

use crate::error::{DaemonError, Result};
use crate::pack::{index_file_name, is_file_pack, new_pack_id, pack_file_name, parse_file_name, Entry, RECORD_BYTES};

mod commit;
mod relocate;
pub use relocate::{touch_if_stale, CompactReport};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often one pack's recency is refreshed at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(60);
/// How often a missing chunk makes the store look for other processes' new chunks
/// (a directory listing and a `stat` per index file).
const REFRESH_INTERVAL: Duration = Duration::from_millis(50);
/// How often a store looks for packs other processes removed, reads or not.
const BACKGROUND_REFRESH: Duration = Duration::from_secs(2);
/// A pack is closed and a new one started beyond this size (smaller under a small
/// cache bound, so eviction stays fine-grained: an eighth of the bound).
const PACK_BYTES: u64 = 256 << 20;
const MIN_PACK_BYTES: u64 = 64 << 10;
/// The largest chunk hashed by `verify` (a chunk's plain size is bounded by the format).
const MAX_CHUNK_BYTES: u32 = 64 << 20;

/// What a GC pass did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GcReport {
    pub chunks_before: u64,
    pub bytes_before: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub pinned_kept: u64,
    /// Materialized files (passthrough backing files: file packs) removed.
    pub files_removed: u64,
    /// Packs removed (file packs among them).
    pub packs_removed: u64,
    /// The compaction that followed.
    pub compaction: CompactReport,
}

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    pack: u64,
    offset: u64,
    length: u32,
}

#[derive(Debug, Default)]
struct Index {
    chunks: HashMap<[u8; 32], Location>,
    /// Per pack: bytes of its index file applied so far.
    applied: HashMap<u64, u64>,
    /// Chunks removed by a tombstone, whichever index file is read first: per pack,
    /// their offsets.
    dead: HashMap<u64, HashSet<u64>>,
}

impl Index {
    fn apply(&mut self, entry: Entry) {
        let location = Location {
            pack: entry.pack,
            offset: entry.offset,
            length: entry.length,
        };
        if entry.tombstone {
            self.dead.entry(entry.pack).or_default().insert(entry.offset);
            if self.chunks.get(&entry.digest) == Some(&location) {
                self.chunks.remove(&entry.digest);
            }
        } else if !self.dead.get(&entry.pack).is_some_and(|d| d.contains(&entry.offset)) {
            self.chunks.entry(entry.digest).or_insert(location);
        }
    }

    /// Forgets everything about `packs` (one pass over the index, whatever their number).
    fn forget_packs(&mut self, packs: &HashSet<u64>) {
        if packs.is_empty() {
            return;
        }
        self.chunks.retain(|_, l| !packs.contains(&l.pack));
        for pack in packs {
            self.forget_records(*pack);
        }
    }

    /// Forgets what was read of `pack`'s index file (its chunks are forgotten);
    /// whether it was known.
    fn forget_records(&mut self, pack: u64) -> bool {
        self.dead.remove(&pack);
        self.applied.remove(&pack).is_some()
    }

    /// Forgets those of `digests` that `pack` holds.
    fn forget_members(&mut self, pack: u64, digests: &[[u8; 32]]) {
        for digest in digests {
            if self.chunks.get(digest).is_some_and(|l| l.pack == pack) {
                self.chunks.remove(digest);
            }
        }
    }
}

/// Chunks forgotten under one hold of the index's write lock: readers looking
/// chunks up wait for a batch, never for a whole pack (forgetting 700k chunks at
/// once held them for 0.3 s).
const FORGET_BATCH: usize = 4096;
/// Pause between two batches.
const FORGET_PAUSE: Duration = Duration::from_micros(100);

/// This process's open pack.
#[derive(Debug)]
struct Writer {
    id: u64,
    pack: Arc<File>,
    /// An exclusive `flock` on the pack, held while it is written (by this writer and
    /// by appends still under way): compaction leaves a locked pack alone.
    lock: Arc<File>,
    index: Arc<Mutex<File>>,
    /// Bytes reserved so far.
    cursor: u64,
    /// Bytes of the index file whose blocks are allocated ahead (see `claim`).
    records_reserved: u64,
}

/// Space reserved at the end of this process's pack, written and then committed.
#[derive(Debug)]
struct Claim {
    id: u64,
    pack: Arc<File>,
    index: Arc<Mutex<File>>,
    base: u64,
    /// The pack's lock, held until the claim is committed.
    _lock: Arc<File>,
}

/// The store; cheap to share.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    /// Size bound (bytes of packs and materialized files); none: unbounded.
    max_bytes: Option<u64>,
    /// Approximate bytes stored (exact after a scan or GC).
    approx_bytes: AtomicU64,
    index: RwLock<Index>,
    writer: Mutex<Option<Writer>>,
    /// Packs open for reading.
    open_packs: Mutex<HashMap<u64, Arc<File>>>,
    /// Packs this process created: their records are applied as they are written.
    own_packs: Mutex<HashSet<u64>>,
    touched: Mutex<(Instant, HashSet<u64>)>,
    last_refresh: Mutex<Option<Instant>>,
    gc_running: AtomicBool,
    /// Held by a GC or compaction pass of this process: two never move the same
    /// chunks at once (the background thread's and a `petrel cache gc`'s).
    maintenance: Mutex<()>,
    /// When the background thread next looks for packs worth compacting.
    compact_due: Mutex<Option<Instant>>,
    /// Makes what `put_readable` wrote durable, off the caller's thread.
    committer: Arc<commit::Committer>,
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        self.committer.close();
    }
}

/// Allocates the blocks of `records` more records at the end of `writer`'s index
/// file without changing its size (`fallocate` with `KEEP_SIZE`: readers still see
/// whole records only). A file system without `fallocate` goes without.
fn reserve_records(writer: &mut Writer, records: usize) -> std::io::Result<()> {
    if records == 0 {
        return Ok(());
    }
    let file = writer.index.lock().expect("pack index lock");
    let end = writer.records_reserved.max(file.metadata()?.len()) + (records * RECORD_BYTES) as u64;
    match rustix::fs::fallocate(&*file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, end) {
        Ok(()) => {
            writer.records_reserved = end;
            Ok(())
        }
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
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

/// Discards a chunk cache of the first layout (`<cache>/chunks/`, one file per chunk)
/// on a background thread: the store does not read it, its chunks are fetched again.
fn discard_first_layout(cache_dir: &Path) {
    let old = cache_dir.join("chunks");
    if !old.is_dir() {
        return;
    }
    // Renamed first, so no other store sees half of it and two do not both remove it.
    let doomed = cache_dir.join(format!("chunks.discarded.{}", std::process::id()));
    if std::fs::rename(&old, &doomed).is_err() {
        return;
    }
    tracing::warn!(
        dir = %old.display(),
        "discarding a chunk cache of petrel's first layout (one file per chunk); its chunks are fetched again as they are read"
    );
    let _ = std::thread::Builder::new()
        .name("petrel-cache-discard".into())
        .spawn(move || {
            let _ = std::fs::remove_dir_all(&doomed);
        });
}

impl ChunkStore {
    /// Opens the store under `cache_dir/packs` (creating it, private: `create_cache_dir`).
    pub fn open(cache_dir: &Path, max_bytes: Option<u64>) -> Result<Arc<Self>> {
        create_cache_dir(cache_dir)?;
        discard_first_layout(cache_dir);
        let root = cache_dir.join("packs");
        create_private_dir(&root)?;
        let store = Arc::new(ChunkStore {
            root,
            max_bytes,
            approx_bytes: AtomicU64::new(0),
            index: RwLock::new(Index::default()),
            writer: Mutex::new(None),
            open_packs: Mutex::new(HashMap::new()),
            own_packs: Mutex::new(HashSet::new()),
            touched: Mutex::new((Instant::now(), HashSet::new())),
            last_refresh: Mutex::new(None),
            gc_running: AtomicBool::new(false),
            maintenance: Mutex::new(()),
            compact_due: Mutex::new(Some(Instant::now())),
            committer: Arc::default(),
        });
        store.refresh();
        // Packs other processes evicted are let go of (their space freed) even when
        // nothing reads them again.
        let weak = Arc::downgrade(&store);
        let _ = std::thread::Builder::new()
            .name("petrel-cache-refresh".into())
            .spawn(move || loop {
                std::thread::sleep(BACKGROUND_REFRESH);
                match weak.upgrade() {
                    Some(store) => {
                        store.refresh();
                        store.collect_if_over_bound();
                        store.compact_if_due();
                    }
                    None => return,
                }
            });
        if max_bytes.is_some() {
            // What is on disk now (the records refresh counted are among it).
            let (_, bytes) = store.usage();
            store.approx_bytes.store(bytes, Ordering::Relaxed);
            store.collect_if_over_bound();
        }
        Ok(store)
    }

    /// The packs directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pack_path(&self, pack: u64) -> PathBuf {
        self.root.join(pack_file_name(pack))
    }

    fn index_path(&self, pack: u64) -> PathBuf {
        self.root.join(index_file_name(pack))
    }

    /// Applies what other processes added to the index files since the last look,
    /// and forgets packs that were removed.
    pub fn refresh(&self) {
        // One refresh at a time: each applies index bytes from where the last stopped.
        let mut last = self.last_refresh.lock().expect("refresh lock");
        *last = Some(Instant::now());
        let mut present = HashSet::new();
        let mut grown: Vec<(u64, Vec<u8>)> = Vec::new();
        let applied: HashMap<u64, u64> = self.index.read().expect("index lock").applied.clone();
        let own = self.own_packs.lock().expect("own packs lock").clone();
        for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let Some((pack, true)) = parse_file_name(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            present.insert(pack);
            if own.contains(&pack) {
                continue;
            }
            let done = applied.get(&pack).copied().unwrap_or(0);
            let Ok(file) = File::open(entry.path()) else { continue };
            let Ok(len) = file.metadata().map(|m| m.len()) else {
                continue;
            };
            let whole = len - len % RECORD_BYTES as u64;
            if whole <= done {
                continue;
            }
            let mut bytes = vec![0u8; (whole - done) as usize];
            if file.read_exact_at(&mut bytes, done).is_ok() {
                grown.push((pack, bytes));
            }
        }
        // Nothing new and nothing gone (most refreshes): the index is left alone, so
        // readers never queue behind a write lock waiting for nothing.
        let gone = |index: &Index| -> HashSet<u64> {
            let known = index.applied.keys().chain(own.iter());
            known.filter(|p| !present.contains(p)).copied().collect()
        };
        if grown.is_empty() && gone(&self.index.read().expect("index lock")).is_empty() {
            return;
        }
        let mut index = self.index.write().expect("index lock");
        let gone = gone(&index);
        // Bytes other processes added, towards this store's bound: chunks the index
        // did not know before (a chunk another process moved out of a pack it
        // removed is not new, and counting it would make bounded daemons answer
        // each other's passes with passes of their own).
        let stored_elsewhere: u64 = match self.max_bytes {
            None => 0,
            Some(_) => grown
                .iter()
                .flat_map(|(_, bytes)| bytes.chunks_exact(RECORD_BYTES))
                .filter_map(Entry::decode)
                .filter(|e| !e.tombstone && !index.chunks.contains_key(&e.digest))
                .map(|e| u64::from(e.length) + RECORD_BYTES as u64)
                .sum(),
        };
        index.forget_packs(&gone);
        let mut closed = Vec::new();
        for pack in &gone {
            closed.extend(self.open_packs.lock().expect("packs lock").remove(pack));
            self.own_packs.lock().expect("own packs lock").remove(pack);
        }
        close_in_background(closed);
        let mut tombstones = false;
        let records: usize = grown.iter().map(|(_, bytes)| bytes.len() / RECORD_BYTES).sum();
        index.chunks.reserve(records);
        for (pack, bytes) in grown {
            let start = index.applied.get(&pack).copied().unwrap_or(0);
            for record in bytes.chunks_exact(RECORD_BYTES) {
                if let Some(entry) = Entry::decode(record) {
                    tombstones |= entry.tombstone;
                    index.apply(entry);
                }
            }
            index.applied.insert(pack, start + bytes.len() as u64);
        }
        tracing::debug!(chunks = index.chunks.len(), packs = present.len(), "store refreshed");
        drop(index);
        drop(last);
        // Other processes' chunks count towards this store's bound too: a daemon that
        // filled the cache may have exited before its own eviction caught up.
        self.approx_bytes.fetch_add(stored_elsewhere, Ordering::Relaxed);
        // Chunks moved or removed elsewhere leave bytes here worth compacting.
        if tombstones {
            self.compact_soon();
        }
    }

    /// Forgets a pack that is gone and closes it.
    fn forget_pack(&self, pack: u64) {
        self.forget_pack_members(pack, None);
    }

    /// `forget_pack` when the chunks it holds are known (otherwise they are looked
    /// for). Readers go on meanwhile: the chunks go a batch at a time, and a reader
    /// that still finds one finds its pack gone, so it looks again or fetches again,
    /// as for a pack another process removed.
    fn forget_pack_members(&self, pack: u64, members: Option<&[[u8; 32]]>) {
        // First, so that a refresh meanwhile does not look for its chunks too; and a
        // pack already forgotten (or being forgotten by another reader that found it
        // gone) is not looked for again.
        let known = self.index.write().expect("index lock").forget_records(pack);
        let found: Vec<[u8; 32]>;
        let members = match members {
            Some(members) => members,
            None if !known => &[],
            None => {
                let index = self.index.read().expect("index lock");
                found = index
                    .chunks
                    .iter()
                    .filter(|(_, l)| l.pack == pack)
                    .map(|(digest, _)| *digest)
                    .collect();
                &found
            }
        };
        for batch in members.chunks(FORGET_BATCH) {
            self.index.write().expect("index lock").forget_members(pack, batch);
            // Readers waiting get in: std's lock would go straight back to this
            // thread (yielding was not enough), and 170 batches of a pack of 700k
            // chunks kept a reader waiting for 90 ms.
            std::thread::sleep(FORGET_PAUSE);
        }
        let closed = self.open_packs.lock().expect("packs lock").remove(&pack);
        self.own_packs.lock().expect("own packs lock").remove(&pack);
        close_in_background(closed.into_iter().collect());
    }

    /// Forgets the pack of `location`, found gone while reading chunk `digest`, and
    /// that chunk there even if its pack's records were not known (put but not yet
    /// recorded when the pack went): it is not looked for there again.
    fn forget_gone(&self, digest: &[u8; 32], location: Location) {
        self.forget_pack(location.pack);
        let mut index = self.index.write().expect("index lock");
        if index.chunks.get(digest) == Some(&location) {
            index.chunks.remove(digest);
        }
    }

    fn location(&self, digest: &[u8; 32]) -> Option<Location> {
        if let Some(found) = self.index.read().expect("index lock").chunks.get(digest) {
            return Some(*found);
        }
        // Maybe another process stored it since: look again, at most every
        // REFRESH_INTERVAL (a refresh under way is waited for).
        let due = self
            .last_refresh
            .lock()
            .expect("refresh lock")
            .is_none_or(|at| at.elapsed() >= REFRESH_INTERVAL);
        if due {
            self.refresh();
        }
        // Looked up again either way: a refresh by another thread may have just
        // finished (it was waited for above).
        self.index.read().expect("index lock").chunks.get(digest).copied()
    }

    /// Whether chunk `digest` is stored.
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.location(digest).is_some()
    }

    /// The pack file and offset holding chunk `digest` (for checks and tests).
    pub fn chunk_location(&self, digest: &[u8; 32]) -> Option<(PathBuf, u64, u32)> {
        self.location(digest)
            .map(|l| (self.pack_path(l.pack), l.offset, l.length))
    }

    fn pack_file(&self, pack: u64) -> std::io::Result<Arc<File>> {
        let mut open = self.open_packs.lock().expect("packs lock");
        if let Some(file) = open.get(&pack) {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(File::open(self.pack_path(pack))?);
        open.insert(pack, Arc::clone(&file));
        Ok(file)
    }

    /// Reads `buf.len()` bytes at `offset` of a stored chunk without refreshing its
    /// recency (checks must not make a chunk look used). `NotFound` when it was
    /// never stored or was evicted.
    pub fn read_quietly(&self, digest: &[u8; 32], offset: u32, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_at(digest, offset, buf).map(|_| ())
    }

    fn read_at(&self, digest: &[u8; 32], offset: u32, buf: &mut [u8]) -> std::io::Result<Location> {
        match self.read_once(digest, offset, buf)? {
            Some(location) => Ok(location),
            // Its pack was removed: evicted, or compacted after the chunk was moved
            // to another pack (which the index, read again, names).
            None => {
                self.refresh();
                self.read_once(digest, offset, buf)?
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "chunk not stored"))
            }
        }
    }

    /// `read_at` without looking again: none when the chunk's pack turned out removed.
    fn read_once(&self, digest: &[u8; 32], offset: u32, buf: &mut [u8]) -> std::io::Result<Option<Location>> {
        let location = self
            .location(digest)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "chunk not stored"))?;
        if u64::from(offset) + buf.len() as u64 > u64::from(location.length) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "read past the end of a chunk",
            ));
        }
        let file = match self.pack_file(location.pack) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget_gone(digest, location);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        file.read_exact_at(buf, location.offset + u64::from(offset))?;
        // Removed by another process meanwhile (the open file still reads): from now
        // on the chunk is looked for elsewhere or fetched again, and the pack's space
        // is let go.
        if std::os::unix::fs::MetadataExt::nlink(&file.metadata()?) == 0 {
            self.forget_gone(digest, location);
            return Ok(None);
        }
        Ok(Some(location))
    }

    /// Reads `buf.len()` bytes at `offset` of a stored chunk. `NotFound` when it was
    /// never stored or was evicted.
    pub fn read(&self, digest: &[u8; 32], offset: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let location = self.read_at(digest, offset, buf)?;
        self.touch(location.pack);
        Ok(())
    }

    fn touch(&self, pack: u64) {
        let mut touched = self.touched.lock().expect("touch lock");
        if touched.0.elapsed() > TOUCH_INTERVAL {
            *touched = (Instant::now(), HashSet::new());
        }
        if touched.1.insert(pack) {
            if let Ok(file) = self.pack_file(pack) {
                let _ = file.set_modified(SystemTime::now());
            }
        }
    }

    /// Whether the stored chunk's bytes hash to `digest` (false when they do not;
    /// `NotFound` when it is not stored).
    pub fn verify(&self, digest: &[u8; 32]) -> std::io::Result<bool> {
        let location = self
            .location(digest)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "chunk not stored"))?;
        if location.length > MAX_CHUNK_BYTES {
            return Ok(false);
        }
        let mut bytes = vec![0u8; location.length as usize];
        match self.read_quietly(digest, 0, &mut bytes) {
            Ok(_) => Ok(blake3::hash(&bytes).as_bytes() == digest),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The pack size to start a new pack beyond.
    fn pack_target(&self) -> u64 {
        self.max_bytes
            .map_or(PACK_BYTES, |max| (max / 8).clamp(MIN_PACK_BYTES, PACK_BYTES))
    }

    /// A new pack of this process's, locked against GC while it is written.
    fn new_writer(&self) -> Result<Writer> {
        let id = new_pack_id();
        let path = self.pack_path(id);
        let pack = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(DaemonError::io("create pack", &path))?;
        let index_path = self.index_path(id);
        let index = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&index_path)
            .map_err(DaemonError::io("create pack index", &index_path))?;
        let lock = File::open(&path).map_err(DaemonError::io("open pack", &path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| DaemonError::io("lock pack", &path)(e.into()))?;
        let pack = Arc::new(pack);
        self.open_packs
            .lock()
            .expect("packs lock")
            .insert(id, Arc::clone(&pack));
        self.index.write().expect("index lock").applied.insert(id, 0);
        self.own_packs.lock().expect("own packs lock").insert(id);
        Ok(Writer {
            id,
            pack,
            lock: Arc::new(lock),
            index: Arc::new(Mutex::new(index)),
            cursor: 0,
            records_reserved: 0,
        })
    }

    /// Closes this process's open pack: the next put starts a new one.
    fn seal_writer(&self) {
        self.writer.lock().expect("writer lock").take();
    }

    /// Stores verified chunks durably: appended to this process's pack in one write,
    /// made durable by one `fdatasync`, then named by index records.
    pub fn put(self: &Arc<Self>, chunks: &[([u8; 32], &[u8])]) -> Result<()> {
        let batch = self.not_stored(chunks);
        let Some((claim, entries, total)) = self.write_batch(&batch)? else {
            return Ok(());
        };
        // (0 kept when another process removed the pack meanwhile.)
        let kept = if self.commit(&claim, &entries)? { total } else { 0 };
        self.count_stored(kept);
        Ok(())
    }

    /// Those of `chunks` not stored yet, each digest once.
    fn not_stored<'a>(&self, chunks: &[([u8; 32], &'a [u8])]) -> Vec<([u8; 32], &'a [u8])> {
        let mut batch = Vec::with_capacity(chunks.len());
        let index = self.index.read().expect("index lock");
        let mut seen = HashSet::new();
        for (digest, bytes) in chunks {
            if !index.chunks.contains_key(digest) && seen.insert(*digest) {
                batch.push((*digest, *bytes));
            }
        }
        batch
    }

    /// Counts `bytes` this process newly stored (chunks, a materialized file);
    /// past the bound, GC starts in the background.
    fn count_stored(self: &Arc<Self>, bytes: u64) {
        self.approx_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.collect_if_over_bound();
    }

    /// Writes `batch` at the end of this process's pack in one system call (not yet
    /// durable, not yet named): the claim, the records naming the chunks, and the
    /// bytes written. None when the batch is empty.
    fn write_batch(&self, batch: &[([u8; 32], &[u8])]) -> Result<Option<(Claim, Vec<Entry>, u64)>> {
        if batch.is_empty() {
            return Ok(None);
        }
        let total: u64 = batch.iter().map(|(_, b)| b.len() as u64).sum();
        let claim = self.claim(total, batch.len())?;
        let mut entries = Vec::with_capacity(batch.len());
        let mut at = claim.base;
        for (digest, chunk) in batch {
            entries.push(Entry {
                tombstone: false,
                pack: claim.id,
                offset: at,
                length: chunk.len() as u32,
                digest: *digest,
            });
            at += chunk.len() as u64;
        }
        // Written from the chunks where they are: one system call, no copy into a
        // buffer of the whole batch first.
        let mut pieces: Vec<std::io::IoSlice<'_>> = batch.iter().map(|(_, b)| std::io::IoSlice::new(b)).collect();
        write_all_vectored_at(&claim.pack, &mut pieces, claim.base)
            .map_err(DaemonError::io("write pack", self.pack_path(claim.id)))?;
        Ok(Some((claim, entries, total)))
    }

    /// Reserves `total` bytes at the end of this process's pack, and disk blocks in
    /// its index file for `records` more records: records are written after their
    /// chunks are durable (for `put_readable`, seconds later), and a disk filled up
    /// by chunk bytes meanwhile must not leave every chunk written unnamed.
    fn claim(&self, total: u64, records: usize) -> Result<Claim> {
        let mut writer = self.writer.lock().expect("writer lock");
        if writer.as_ref().is_some_and(|w| w.cursor >= self.pack_target()) {
            writer.take();
        }
        if writer.is_none() {
            *writer = Some(self.new_writer()?);
        }
        let w = writer.as_mut().expect("set above");
        reserve_records(w, records).map_err(DaemonError::io("reserve space in pack index", self.index_path(w.id)))?;
        let base = w.cursor;
        w.cursor += total;
        Ok(Claim {
            id: w.id,
            pack: Arc::clone(&w.pack),
            index: Arc::clone(&w.index),
            base,
            _lock: Arc::clone(&w.lock),
        })
    }

    /// Writes `bytes` at `at` within `claim`.
    fn write_claimed(&self, claim: &Claim, at: u64, bytes: &[u8]) -> Result<()> {
        claim
            .pack
            .write_all_at(bytes, claim.base + at)
            .map_err(DaemonError::io("write pack", self.pack_path(claim.id)))
    }

    /// Makes what was written in `claim` durable (one `fdatasync`), then writes the
    /// index `entries` naming it (and the tombstones among them) and applies them.
    /// False when another process removed the pack meanwhile: nothing is recorded.
    fn commit(&self, claim: &Claim, entries: &[Entry]) -> Result<bool> {
        if !self.make_durable(claim, entries)? {
            return Ok(false);
        }
        self.apply(entries);
        Ok(true)
    }

    /// Applies `entries` to this process's index.
    fn apply(&self, entries: &[Entry]) {
        let mut index = self.index.write().expect("index lock");
        for entry in entries {
            index.apply(*entry);
        }
    }

    /// Makes what was written in `claim` durable (one `fdatasync`), then writes the
    /// index `entries` naming it, without applying them here. False when another
    /// process removed the pack meanwhile: nothing is recorded.
    fn make_durable(&self, claim: &Claim, entries: &[Entry]) -> Result<bool> {
        let path = self.pack_path(claim.id);
        claim.pack.sync_data().map_err(DaemonError::io("sync pack", &path))?;
        // Another process's GC may have removed the pack being written: these chunks
        // are not kept (they are fetched again when read), and a new pack is started.
        let removed = claim
            .pack
            .metadata()
            .map_or(true, |m| std::os::unix::fs::MetadataExt::nlink(&m) == 0);
        if removed {
            self.end_writer_of(claim.id);
            return Ok(false);
        }
        let records: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
        claim
            .index
            .lock()
            .expect("pack index lock")
            .write_all(&records)
            .map_err(DaemonError::io("write pack index", self.index_path(claim.id)))?;
        Ok(true)
    }

    /// The next put starts a new pack if this process is writing pack `id`.
    fn end_writer_of(&self, id: u64) {
        let mut writer = self.writer.lock().expect("writer lock");
        if writer.as_ref().is_some_and(|w| w.id == id) {
            writer.take();
        }
    }

    /// Removes one chunk (its bytes turned out unusable): a tombstone in this
    /// process's pack index, so every process forgets it.
    pub fn remove(&self, digest: &[u8; 32]) {
        let Some(location) = ({
            let mut index = self.index.write().expect("index lock");
            let location = index.chunks.remove(digest);
            if let Some(l) = location {
                index.dead.entry(l.pack).or_default().insert(l.offset);
            }
            location
        }) else {
            return;
        };
        self.record_tombstones(&[Entry {
            tombstone: true,
            pack: location.pack,
            offset: location.offset,
            length: location.length,
            digest: *digest,
        }]);
    }

    /// Appends tombstones to this process's pack index (already applied here).
    fn record_tombstones(&self, tombstones: &[Entry]) {
        let mut writer = self.writer.lock().expect("writer lock");
        if writer.is_none() {
            match self.new_writer() {
                Ok(w) => *writer = Some(w),
                Err(e) => {
                    tracing::warn!("cannot record removed chunks: {e}");
                    return;
                }
            }
        }
        let index_file = Arc::clone(&writer.as_ref().expect("set above").index);
        drop(writer);
        let bytes: Vec<u8> = tombstones.iter().flat_map(|t| t.encode()).collect();
        let written = index_file.lock().expect("pack index lock").write_all(&bytes);
        if let Err(e) = written {
            tracing::warn!("cannot record removed chunks: {e}");
        }
    }

    /// Every stored chunk: (digest, size, its pack's last use).
    pub fn list(&self) -> Vec<([u8; 32], u64, SystemTime)> {
        self.refresh();
        let times: HashMap<u64, SystemTime> = self.packs().into_iter().map(|p| (p.id, p.modified)).collect();
        let index = self.index.read().expect("index lock");
        index
            .chunks
            .iter()
            .map(|(digest, l)| {
                let time = times.get(&l.pack).copied().unwrap_or(SystemTime::UNIX_EPOCH);
                (*digest, u64::from(l.length), time)
            })
            .collect()
    }

    /// (chunks, bytes on disk) stored: the packs and their index files.
    pub fn usage(&self) -> (u64, u64) {
        self.refresh();
        let chunks = self.index.read().expect("index lock").chunks.len() as u64;
        (chunks, self.packs().iter().map(|p| p.bytes).sum())
    }

    /// Packs on disk, oldest use first.
    fn packs(&self) -> Vec<PackFile> {
        let mut packs: HashMap<u64, PackFile> = HashMap::new();
        for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let Some((id, is_index)) = parse_file_name(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let pack = packs.entry(id).or_insert(PackFile {
                id,
                bytes: 0,
                data_bytes: 0,
                modified: SystemTime::UNIX_EPOCH,
                changed: SystemTime::UNIX_EPOCH,
            });
            pack.bytes += meta.len();
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            pack.changed = pack.changed.max(modified);
            if !is_index {
                pack.data_bytes = meta.len();
                pack.modified = modified;
            }
        }
        let mut packs: Vec<PackFile> = packs.into_values().collect();
        packs.sort_by_key(|p| p.modified);
        packs
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

    /// Evicts plain materialized files of the earlier layout (copies, so first), then
    /// least recently used packs (file packs among them), until at most `max_bytes`
    /// remain. A pack's chunks that a live mount or a kept image pins are first moved
    /// into a new pack. A mount that has a removed file open keeps reading it; the
    /// next open goes through FUSE. A daemon reading or writing a removed pack notices
    /// (its link count is 0) and looks again or fetches again.
    pub fn gc(self: &Arc<Self>, max_bytes: u64) -> GcReport {
        let _one_process = self.gc_lock(true);
        self.gc_locked(max_bytes)
    }

    /// The exclusive lock of eviction across processes (`<cache>/gc.lock`, held while
    /// the file is open): two processes evicting at once would each remove the
    /// oldest packs until the bound holds, twice as much as needed. None when `wait`
    /// is false and another process holds it (or it cannot be opened).
    fn gc_lock(&self, wait: bool) -> Option<File> {
        let path = self.root.parent().expect("cache root").join("gc.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| tracing::warn!("cannot open {}: {e}", path.display()))
            .ok()?;
        let operation = match wait {
            true => rustix::fs::FlockOperation::LockExclusive,
            false => rustix::fs::FlockOperation::NonBlockingLockExclusive,
        };
        rustix::fs::flock(&file, operation).ok()?;
        Some(file)
    }

    /// `gc` once the lock across processes is held.
    fn gc_locked(self: &Arc<Self>, max_bytes: u64) -> GcReport {
        let _pass = self.maintenance.lock().expect("maintenance lock");
        self.refresh();
        let pinned = live_pins(self.root.parent().expect("cache root"));
        let files = self.derived_files();
        let packs = self.packs();
        let mut report = GcReport {
            chunks_before: self.index.read().expect("index lock").chunks.len() as u64,
            bytes_before: packs.iter().map(|p| p.bytes).sum::<u64>() + files.iter().map(|f| f.1).sum::<u64>(),
            ..GcReport::default()
        };
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
        for pack in packs {
            if total <= max_bytes {
                break;
            }
            let Some(removed) = self.remove_pack(&pack, |digest| pinned.contains(digest)) else {
                continue;
            };
            if is_file_pack(pack.id) {
                report.files_removed += 1;
            }
            report.packs_removed += 1;
            report.chunks_removed += removed.dropped;
            report.pinned_kept += removed.moved;
            total = total - pack.bytes + removed.moved_bytes;
            report.bytes_removed += pack.bytes;
        }
        report.compaction = self.compact_now();
        report
    }

    /// Starts a GC pass when the bytes counted (this process's and those other
    /// processes recorded) are over the bound.
    fn collect_if_over_bound(self: &Arc<Self>) {
        if self
            .max_bytes
            .is_some_and(|max| self.approx_bytes.load(Ordering::Relaxed) > max)
        {
            self.gc_in_background();
        }
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
                    // Another process evicting now: the bytes stay counted, so the
                    // next background look starts a pass if that one left too many.
                    let Some(_one_process) = store.gc_lock(false) else {
                        break;
                    };
                    store.approx_bytes.store(0, Ordering::Relaxed);
                    let started = Instant::now();
                    let report = store.gc_locked(max);
                    let left = report
                        .bytes_before
                        .saturating_sub(report.bytes_removed + report.compaction.bytes_freed);
                    let now = store.approx_bytes.fetch_add(left, Ordering::Relaxed) + left;
                    tracing::info!(
                        removed = report.chunks_removed,
                        packs = report.packs_removed,
                        bytes = report.bytes_removed,
                        left,
                        ms = started.elapsed().as_millis() as u64,
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

/// Closes removed packs on a thread of its own. Closing the last descriptor of a
/// removed file frees its blocks then and there: hundreds of ms for a big pack on a
/// slow disk, which a reader (or the lock of open packs) must not wait for.
fn close_in_background(files: Vec<Arc<File>>) {
    if files.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("petrel-pack-close".into())
        .spawn(move || drop(files));
    if let Err(e) = spawned {
        tracing::debug!("closing removed packs here: {e}");
    }
}

/// Writes all of `pieces` at `offset` of `file` (`pwritev`, at most `IOV_MAX` pieces a
/// call, again after a short write).
fn write_all_vectored_at(file: &File, mut pieces: &mut [std::io::IoSlice<'_>], mut offset: u64) -> std::io::Result<()> {
    /// Linux's `IOV_MAX`.
    const MAX_PIECES: usize = 1024;
    while !pieces.is_empty() {
        let take = pieces.len().min(MAX_PIECES);
        let written = rustix::io::pwritev(file, &pieces[..take], offset)?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        offset += written as u64;
        std::io::IoSlice::advance_slices(&mut pieces, written);
    }
    Ok(())
}

/// A pack on disk.
#[derive(Debug, Clone, Copy)]
struct PackFile {
    id: u64,
    /// Bytes of the pack and its index file.
    bytes: u64,
    /// Bytes of the pack alone.
    data_bytes: u64,
    /// Last use (reads refresh it at most once a minute): eviction order.
    modified: SystemTime,
    /// Last write to the pack or its index.
    changed: SystemTime,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8) -> ([u8; 32], Vec<u8>) {
        let bytes = vec![i; 1000];
        (*blake3::hash(&bytes).as_bytes(), bytes)
    }

    #[test]
    fn stores_reads_evicts_and_keeps_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let chunks: Vec<([u8; 32], Vec<u8>)> = (0..4u8).map(chunk).collect();
        // Four puts, each sealed into a pack of its own so eviction can pick.
        for (digest, bytes) in &chunks {
            store.put(&[(*digest, bytes.as_slice())]).unwrap();
            store.seal_writer();
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut buf = [0u8; 10];
        store.read(&chunks[2].0, 990, &mut buf).unwrap();
        assert_eq!(buf, [2; 10]);
        assert_eq!(store.usage().0, 4);
        assert!(store.verify(&chunks[3].0).unwrap());
        // Another store (another process) sees them all from the index files.
        let other = ChunkStore::open(dir.path(), None).unwrap();
        assert!(chunks.iter().all(|(d, _)| other.contains(d)));

        let pins = write_pins(dir.path(), "test", &[chunks[0].0]).unwrap();
        let report = store.gc(1500);
        assert_eq!(report.pinned_kept, 1, "the oldest chunk is pinned: copied, kept");
        assert!(store.contains(&chunks[0].0), "pinned by a live process");
        assert!(store.verify(&chunks[0].0).unwrap());
        assert_eq!(
            store.read(&chunks[1].0, 0, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_file(pins).unwrap();
        store.gc(0);
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn a_bounded_store_counts_the_chunks_others_store_but_not_those_they_move() {
        let dir = tempfile::tempdir().unwrap();
        // A bound no test here reaches: no pass runs, the count is what is checked.
        let watcher = ChunkStore::open(dir.path(), Some(1 << 40)).unwrap();
        let other = ChunkStore::open(dir.path(), None).unwrap();
        let chunks: Vec<([u8; 32], Vec<u8>)> = (0..4u8).map(chunk).collect();
        let refs: Vec<([u8; 32], &[u8])> = chunks.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        let counted = || watcher.approx_bytes.load(Ordering::Relaxed);
        let before = counted();
        other.put(&refs).unwrap();
        watcher.refresh();
        let stored = chunks.iter().map(|(_, b)| b.len() + RECORD_BYTES).sum::<usize>() as u64;
        assert_eq!(counted() - before, stored, "the other process's new chunks count");
        // The other process moves every chunk into a new pack and removes the old
        // one, as GC does with pinned chunks: nothing new to count.
        other.seal_writer();
        for pack in other.packs() {
            other.remove_pack(&pack, |_| true).expect("moved");
        }
        watcher.refresh();
        assert_eq!(counted() - before, stored, "moved chunks are not new bytes");
        let mut buf = [0u8; 10];
        watcher.read(&chunks[3].0, 0, &mut buf).unwrap();
        assert_eq!(buf, [3u8; 10], "and are found where they went");
    }

    #[test]
    fn a_removed_chunk_is_forgotten_by_every_store_and_torn_records_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let (a, b) = (chunk(1), chunk(2));
        store.put(&[(a.0, &a.1), (b.0, &b.1)]).unwrap();
        store.remove(&a.0);
        assert!(!store.contains(&a.0));
        // A torn record at the end of an index file (a crash mid-append) is ignored.
        let index = std::fs::read_dir(store.root())
            .unwrap()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "idx"))
            .unwrap()
            .path();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&index)
            .unwrap()
            .write_all(&[0x50; 40])
            .unwrap();
        let other = ChunkStore::open(dir.path(), None).unwrap();
        assert!(!other.contains(&a.0), "the tombstone reached another store");
        assert!(other.contains(&b.0));
        let mut buf = vec![0u8; 1000];
        other.read(&b.0, 0, &mut buf).unwrap();
        assert_eq!(buf, b.1);
    }

    #[test]
    fn a_pack_removed_by_another_process_is_noticed_by_its_reader_and_writer() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = ChunkStore::open(dir.path(), None).unwrap();
        let (a, b) = (chunk(1), chunk(2));
        daemon.put(&[(a.0, &a.1)]).unwrap();
        // `petrel cache gc --max-bytes 0` in another process removes the open pack.
        let report = ChunkStore::open(dir.path(), None).unwrap().gc(0);
        assert_eq!(report.packs_removed, 1);
        let mut buf = vec![0u8; 10];
        assert_eq!(
            daemon.read(&a.0, 0, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::NotFound,
            "the open file still reads, but the chunk counts as gone"
        );
        // The next put finds its pack unlinked: not kept there; the one after lands
        // in a new pack.
        daemon.put(&[(b.0, &b.1)]).unwrap();
        daemon.put(&[(b.0, &b.1)]).unwrap();
        daemon.read(&b.0, 0, &mut buf).unwrap();
        assert_eq!(buf, b.1[..10]);
        assert!(ChunkStore::open(dir.path(), None).unwrap().contains(&b.0));
    }

    /// A materialized file becomes the only copy of its chunks; the packs they came
    /// from are compacted; another process that still knew the old places reads the
    /// right bytes from the new ones; removing the file removes its pack.
    #[test]
    fn a_file_pack_takes_its_chunks_over_and_compaction_frees_the_old_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let chunks: Vec<([u8; 32], Vec<u8>)> = (0..4u8).map(chunk).collect();
        let refs: Vec<([u8; 32], &[u8])> = chunks.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        store.put(&refs).unwrap();
        let other = ChunkStore::open(dir.path(), None).unwrap();
        let mut buf = vec![0u8; 1000];
        other.read(&chunks[0].0, 0, &mut buf).unwrap();

        // A file of chunks 0, 1 and 2 (and 1 again).
        let temp = store.temp_file().unwrap();
        let mut named = Vec::new();
        for (at, i) in [0usize, 1, 2, 1].into_iter().enumerate() {
            temp.as_file().write_all_at(&chunks[i].1, at as u64 * 1000).unwrap();
            named.push((chunks[i].0, at as u64 * 1000, 1000));
        }
        let file_pack = store.adopt_file(temp, &named).unwrap();
        assert!(is_file_pack(
            parse_file_name(&file_pack.file_name().unwrap().to_string_lossy())
                .unwrap()
                .0
        ));
        let (place, offset, _) = store.chunk_location(&chunks[2].0).unwrap();
        assert_eq!((place.as_path(), offset), (file_pack.as_path(), 2000));

        let report = other.compact();
        assert_eq!(
            (report.packs_compacted, report.packs_deferred),
            (0, 1),
            "a pack its writer still holds is left alone: {report:?}"
        );
        let report = store.compact();
        assert_eq!((report.packs_compacted, report.chunks_moved), (1, 1), "{report:?}");
        let packs: Vec<_> = std::fs::read_dir(store.root()).unwrap().flatten().collect();
        let data: u64 = packs
            .iter()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(data, 4000 + 1000, "the file and the one chunk it does not hold");
        for (digest, bytes) in &chunks {
            other.read(digest, 0, &mut buf).unwrap();
            assert_eq!(&buf, bytes, "read by a process that knew the old places");
            store.read(digest, 0, &mut buf).unwrap();
            assert_eq!(&buf, bytes);
        }
        // A second file holding chunk 2 leaves it with the first.
        let temp = store.temp_file().unwrap();
        temp.as_file().write_all_at(&chunks[2].1, 0).unwrap();
        store.adopt_file(temp, &[(chunks[2].0, 0, 1000)]).unwrap();
        assert_eq!(store.chunk_location(&chunks[2].0).unwrap().0, file_pack);

        let link = dir.path().join("files/f");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(Path::new("../packs").join(file_pack.file_name().unwrap()), &link).unwrap();
        assert!(store.remove_materialized(&link));
        assert!(!file_pack.exists() && !file_pack.with_extension("idx").exists());
        assert_eq!(
            other.read(&chunks[0].0, 0, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::NotFound,
            "its chunks went with it"
        );
        other.read(&chunks[3].0, 0, &mut buf).unwrap();
        assert_eq!(buf, chunks[3].1);
    }

    #[test]
    fn a_batch_of_more_chunks_than_one_system_call_takes_is_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let chunks: Vec<([u8; 32], Vec<u8>)> = (0..3000u32)
            .map(|i| {
                let bytes = i.to_le_bytes().repeat(1 + (i % 7) as usize);
                (*blake3::hash(&bytes).as_bytes(), bytes)
            })
            .collect();
        let refs: Vec<([u8; 32], &[u8])> = chunks.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        store.put(&refs).unwrap();
        for (digest, bytes) in &chunks {
            let mut buf = vec![0u8; bytes.len()];
            store.read(digest, 0, &mut buf).unwrap();
            assert_eq!(&buf, bytes);
        }
    }

    /// On a full disk a pinned chunk cannot be moved out of a pack GC evicts: the
    /// pack stays, and the chunk with it.
    #[test]
    fn a_pinned_chunk_that_cannot_be_moved_keeps_its_pack() {
        if !rustix::process::geteuid().is_root() {
            petrel_fixtures::report_skip("needs root to mount a small tmpfs");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        rustix::mount::mount(
            "tmpfs",
            dir.path(),
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            c"size=1m",
        )
        .unwrap();
        let _unmount = Unmount(dir.path());
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let chunk = |i: u8| {
            let bytes = vec![i; 200_000];
            (*blake3::hash(&bytes).as_bytes(), bytes)
        };
        let (pinned, other) = (chunk(1), chunk(2));
        store.put(&[(pinned.0, &pinned.1)]).unwrap();
        store.seal_writer();
        store.put(&[(other.0, &other.1)]).unwrap();
        store.seal_writer();
        write_pins(dir.path(), "test", &[pinned.0]).unwrap();
        // The pinned chunk's pack is the least recently used: GC meets it first.
        let (pack, _, _) = store.chunk_location(&pinned.0).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        // Fill the disk.
        let mut filler = std::fs::File::create(dir.path().join("filler")).unwrap();
        while filler.write_all(&[0u8; 4096]).is_ok() {}
        drop(filler);

        let report = store.gc(0);
        assert_eq!(report.pinned_kept, 0, "{report:?}");
        let mut buf = vec![0u8; pinned.1.len()];
        store.read(&pinned.0, 0, &mut buf).unwrap();
        assert_eq!(buf, pinned.1, "the pinned chunk is still there");
        assert!(!store.contains(&other.0), "the unpinned one went: {report:?}");
    }

    #[test]
    fn a_cache_of_the_first_layout_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("chunks/ab");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("cdef"), b"old chunk").unwrap();
        let _store = ChunkStore::open(dir.path(), None).unwrap();
        assert!(!dir.path().join("chunks").exists(), "moved aside at once");
        for _ in 0..100 {
            let left = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("chunks"));
            if !left {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the first layout's chunks were not removed");
    }
}
