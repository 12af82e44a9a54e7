//! Moving chunks between packs: file packs that make a materialized file the cache's
//! only copy of its chunks, compaction of packs whose bytes are mostly no longer
//! named, and the removal of a pack (eviction) with the chunks it must keep.
//!
//! A chunk moves by appending its bytes to a new place, then writing a tombstone for
//! the old place and a record for the new one (in that order, in one index file), and
//! only then removing the old pack. Every process reading the index files therefore
//! sees the chunk in one place or the other, never missing; a process that still
//! reads a removed pack notices (link count 0), reads the index again and finds the
//! chunk's new place.

use super::{ChunkStore, Location, PackFile};
use crate::error::{DaemonError, Result};
use crate::pack::{is_file_pack, new_file_pack_id, parse_file_name, Entry, RECORD_BYTES};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a pass that found packs being written waits before it looks again.
const COMPACT_RETRY: Duration = Duration::from_secs(30);
/// Dead bytes (in packs of chunks) are compacted away while they exceed this share
/// of the store (1/20: the cache stays within 1.05× of what it names, plus packs too
/// young to touch), and any pack at least half dead is compacted.
const DEAD_SHARE_DIVISOR: u64 = 20;
/// Temporary files in the packs directory start with this (never a pack name).
const TEMP_PREFIX: &str = ".tmp-";
/// Leftovers of a writer killed mid-write are removed after this long.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);
/// A file pack is linked under `files/` right after it is written; one still not
/// linked after this long never will be.
const LINK_GRACE: Duration = Duration::from_secs(60);

/// What one compaction pass did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CompactReport {
    pub packs_compacted: u64,
    pub chunks_moved: u64,
    pub bytes_freed: u64,
    /// Packs worth compacting left for later (being written, or too recently).
    pub packs_deferred: u64,
}

/// What removing one pack did.
pub(super) struct Removed {
    /// Chunks it held that are now gone.
    pub dropped: u64,
    /// Chunks moved to another pack first, and their bytes.
    pub moved: u64,
    pub moved_bytes: u64,
}

impl ChunkStore {
    /// A temporary file in the packs directory, for `adopt_file`.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.root)
            .map_err(DaemonError::io("create temporary file in", &self.root))
    }

    /// Turns `temp` (a file's whole bytes in file order, durable: the caller synced
    /// it) into a file pack whose index names `chunks` (digest, offset, length: whole
    /// chunks of the file at their offsets). Chunks stored in packs of chunks move
    /// here (their old bytes are compacted away later), so the file is their only
    /// copy; chunks another file pack already holds stay there. Returns the pack's
    /// path, to be handed to the kernel as a backing file.
    pub fn adopt_file(
        self: &Arc<Self>,
        temp: tempfile::NamedTempFile,
        chunks: &[([u8; 32], u64, u32)],
    ) -> Result<PathBuf> {
        let id = new_file_pack_id();
        let (path, index_path) = (self.pack_path(id), self.index_path(id));
        let mut index_file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&index_path)
            .map_err(DaemonError::io("create pack index", &index_path))?;
        self.own_packs.lock().expect("own packs lock").insert(id);
        self.index.write().expect("index lock").applied.insert(id, 0);
        let size = temp.as_file().metadata().map(|m| m.len()).unwrap_or(0);
        if let Err(e) = temp.persist_noclobber(&path) {
            let _ = std::fs::remove_file(&index_path);
            self.forget_pack(id);
            return Err(DaemonError::io("rename to", &path)(e.error));
        }
        let mut entries = Vec::new();
        let mut records = Vec::new();
        {
            let index = self.index.read().expect("index lock");
            let mut seen = HashSet::new();
            for &(digest, offset, length) in chunks {
                if !seen.insert(digest) {
                    continue;
                }
                match index.chunks.get(&digest) {
                    Some(old) if is_file_pack(old.pack) => continue,
                    Some(old) => entries.push(Entry {
                        tombstone: true,
                        pack: old.pack,
                        offset: old.offset,
                        length: old.length,
                        digest,
                    }),
                    None => {}
                }
                records.push(Entry {
                    tombstone: false,
                    pack: id,
                    offset,
                    length,
                    digest,
                });
            }
        }
        entries.extend(records);
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
        index_file
            .write_all(&bytes)
            .map_err(DaemonError::io("write pack index", &index_path))?;
        {
            let mut index = self.index.write().expect("index lock");
            for entry in entries {
                index.apply(entry);
            }
            index.applied.insert(id, bytes.len() as u64);
        }
        self.count_stored(size);
        self.compact_soon();
        Ok(path)
    }

    /// Moves `chunks` (sorted by offset) of the pack open as `file` into this
    /// process's pack, each checked against its digest on the way (one that fails is
    /// left behind); returns how many moved and their bytes.
    fn move_chunks(&self, file: &File, chunks: &[([u8; 32], Location)]) -> Result<(u64, u64)> {
        if chunks.is_empty() {
            return Ok((0, 0));
        }
        let total: u64 = chunks.iter().map(|(_, l)| u64::from(l.length)).sum();
        let claim = self.claim(total, chunks.len() * 2)?;
        let mut entries = Vec::with_capacity(chunks.len() * 2);
        let mut at = 0u64;
        for window in windows(chunks) {
            let start = window[0].1.offset;
            let last = window[window.len() - 1].1;
            let mut bytes = vec![0u8; (last.offset + u64::from(last.length) - start) as usize];
            if file.read_exact_at(&mut bytes, start).is_err() {
                continue;
            }
            let mut out = Vec::with_capacity(bytes.len());
            for (digest, old) in window {
                let from = (old.offset - start) as usize;
                let chunk = &bytes[from..from + old.length as usize];
                if blake3::hash(chunk).as_bytes() != digest {
                    continue;
                }
                entries.push(Entry {
                    tombstone: true,
                    pack: old.pack,
                    offset: old.offset,
                    length: old.length,
                    digest: *digest,
                });
                entries.push(Entry {
                    tombstone: false,
                    pack: claim.id,
                    offset: claim.base + at + out.len() as u64,
                    length: old.length,
                    digest: *digest,
                });
                out.extend_from_slice(chunk);
            }
            self.write_claimed(&claim, at, &out)?;
            at += out.len() as u64;
        }
        if !self.commit(&claim, &entries)? {
            return Err(DaemonError::Invalid(
                "the pack they were moved into was removed meanwhile".into(),
            ));
        }
        Ok((entries.len() as u64 / 2, at))
    }

    /// Removes `pack` after moving the chunks `keep` selects (and that still match
    /// their digests) to this process's pack. None when it could not be removed.
    pub(super) fn remove_pack(&self, pack: &PackFile, keep: impl Fn(&[u8; 32]) -> bool) -> Option<Removed> {
        if self.writer.lock().expect("writer lock").as_ref().map(|w| w.id) == Some(pack.id) {
            self.seal_writer();
        }
        if self.own_packs.lock().expect("own packs lock").contains(&pack.id) {
            // Chunks put into it but not yet recorded are recorded first, so they
            // are found below (moved if pinned, forgotten otherwise).
            self.flush(Duration::from_secs(60));
        }
        let path = self.pack_path(pack.id);
        let file = File::open(&path).ok()?;
        let mut members = self.members_of(pack.id);
        // Read in pack order, a window at a time: one sequential pass, not a random
        // read per chunk.
        members.sort_by_key(|(_, l)| l.offset);
        let kept: Vec<([u8; 32], Location)> = members.iter().filter(|(d, _)| keep(d)).copied().collect();
        // Moved before the pack goes (no reader finds them missing in between), with
        // one `fdatasync` for all of them.
        // A pack whose chunks could not be moved (a full disk) stays: a pinned chunk
        // must not be lost, and compaction gains nothing then.
        let (moved, moved_bytes) = match self.move_chunks(&file, &kept) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!("keeping a pack whose {} chunks could not be moved: {e}", kept.len());
                return None;
            }
        };
        let digests: Vec<[u8; 32]> = members.iter().map(|(d, _)| *d).collect();
        let removed = self.remove_pack_files(pack.id, Some(&digests));
        removed.then_some(Removed {
            dropped: members.len() as u64 - moved,
            moved,
            moved_bytes,
        })
    }

    /// The chunks the index names in pack `id`. Found from the records of the pack's
    /// own index file (every chunk put into a pack is recorded there), looked up a
    /// batch at a time: a scan of the whole index held its lock long enough (tens of
    /// ms at 1M chunks) for a reader to wait behind a writer waiting for the scan.
    /// Without that file, the whole index is scanned.
    fn members_of(&self, id: u64) -> Vec<([u8; 32], Location)> {
        let Ok(records) = std::fs::read(self.index_path(id)) else {
            let index = self.index.read().expect("index lock");
            return index
                .chunks
                .iter()
                .filter(|(_, l)| l.pack == id)
                .map(|(d, l)| (*d, *l))
                .collect();
        };
        let recorded: Vec<Entry> = records
            .chunks_exact(RECORD_BYTES)
            .filter_map(Entry::decode)
            .filter(|e| !e.tombstone && e.pack == id)
            .collect();
        let mut members = Vec::with_capacity(recorded.len());
        for batch in recorded.chunks(super::FORGET_BATCH) {
            let index = self.index.read().expect("index lock");
            members.extend(batch.iter().filter_map(|e| {
                let at = index.chunks.get(&e.digest)?;
                (at.pack == id && at.offset == e.offset).then_some((e.digest, *at))
            }));
        }
        members
    }

    /// Removes pack `id` and its index; whether the pack was removed. Tombstones its
    /// index holds for chunks of other packs still there are recorded again in this
    /// process's index first: a moved chunk's old copy must not come back.
    fn remove_pack_files(&self, id: u64, members: Option<&[[u8; 32]]>) -> bool {
        let index_path = self.index_path(id);
        let carried: Vec<Entry> = std::fs::read(&index_path)
            .unwrap_or_default()
            .chunks_exact(RECORD_BYTES)
            .filter_map(Entry::decode)
            .filter(|e| e.tombstone && e.pack != id && self.pack_path(e.pack).exists())
            .collect();
        if !carried.is_empty() {
            self.record_tombstones(&carried);
        }
        let _ = std::fs::remove_file(&index_path);
        let removed = std::fs::remove_file(self.pack_path(id)).is_ok();
        self.forget_pack_members(id, members);
        removed
    }

    /// Removes the materialized file at `link` (under `<cache>/files/`): the link and,
    /// when it names a file pack, the pack (and with it the chunks only it held).
    /// Whether the link was there.
    pub fn remove_materialized(&self, link: &Path) -> bool {
        let name = std::fs::read_link(link)
            .ok()
            .and_then(|target| target.file_name().map(|n| n.to_string_lossy().to_string()));
        if let Some((id, false)) = name.as_deref().and_then(parse_file_name) {
            if is_file_pack(id) {
                self.remove_pack_files(id, None);
            }
        }
        std::fs::remove_file(link).is_ok()
    }

    /// Asks the background thread for a compaction pass now.
    pub(super) fn compact_soon(&self) {
        *self.compact_due.lock().expect("compact lock") = Some(Instant::now());
    }

    /// Runs a compaction pass when one is due and no GC runs (on the background
    /// refresh thread); a pass that had to leave packs for later is repeated then.
    pub(super) fn compact_if_due(self: &Arc<Self>) {
        let due = self
            .compact_due
            .lock()
            .expect("compact lock")
            .is_some_and(|at| at <= Instant::now());
        if !due || self.gc_running.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.compact_due.lock().expect("compact lock") = None;
        let report = self.compact();
        if report.packs_compacted > 0 {
            tracing::info!(
                packs = report.packs_compacted,
                moved = report.chunks_moved,
                freed = report.bytes_freed,
                "cache compaction"
            );
        }
        if report.packs_deferred > 0 {
            let mut due = self.compact_due.lock().expect("compact lock");
            let later = Instant::now() + COMPACT_RETRY;
            *due = Some(due.map_or(later, |at| at.min(later)));
        }
        self.gc_running.store(false, Ordering::SeqCst);
    }

    /// Rewrites packs of chunks whose bytes are mostly no longer named (chunks moved
    /// into file packs, removed, or stored twice by two processes at once): their
    /// named chunks move to a new pack, and the pack goes. File packs are left alone,
    /// and so are packs a writer (of any process) still holds locked.
    pub fn compact(&self) -> CompactReport {
        let _pass = self.maintenance.lock().expect("maintenance lock");
        self.compact_now()
    }

    /// `compact`, the maintenance lock held.
    pub(super) fn compact_now(&self) -> CompactReport {
        let mut report = CompactReport::default();
        // Locked first, then the index read: a writer records what it appended before
        // it lets go, so every chunk of a locked pack is known below.
        let mut locked: HashMap<u64, File> = HashMap::new();
        let own_writer = self
            .writer
            .lock()
            .expect("writer lock")
            .as_ref()
            .map(|w| (w.id, w.cursor));
        // This process's own pack is let go of when part of it is dead already.
        if let Some((id, written)) = own_writer {
            if self.live_bytes().get(&id).copied().unwrap_or(0) < written {
                self.seal_writer();
            }
        }
        let own_writer = self.writer.lock().expect("writer lock").as_ref().map(|w| w.id);
        for pack in self.packs() {
            if is_file_pack(pack.id) || pack.data_bytes == 0 {
                continue;
            }
            let Ok(file) = File::open(self.pack_path(pack.id)) else {
                continue;
            };
            let free = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok();
            match free {
                true => {
                    locked.insert(pack.id, file);
                }
                false if Some(pack.id) == own_writer => {}
                false => report.packs_deferred += 1,
            }
        }
        self.refresh();
        let packs = self.packs();
        let live = self.live_bytes();
        let dead_of = |p: &PackFile| p.data_bytes.saturating_sub(live.get(&p.id).copied().unwrap_or(0));
        let total: u64 = packs.iter().map(|p| p.bytes).sum();
        let mut dead_total: u64 = packs.iter().filter(|p| !is_file_pack(p.id)).map(dead_of).sum();
        let mut candidates: Vec<(u64, PackFile)> = packs
            .iter()
            .filter(|p| locked.contains_key(&p.id))
            .map(|p| (dead_of(p), *p))
            .filter(|(dead, _)| *dead > 0)
            .collect();
        candidates.sort_by_key(|(dead, p)| std::cmp::Reverse(*dead * 1024 / p.data_bytes.max(1)));
        // A file pack no link names (its writer was killed before linking it, or
        // another daemon materialized the same file at the same time) is folded
        // into a pack of chunks.
        let linked = self.linked_file_packs();
        for pack in packs.iter().filter(|p| is_file_pack(p.id) && !linked.contains(&p.id)) {
            if pack.changed.elapsed().unwrap_or_default() < LINK_GRACE {
                continue;
            }
            if let Some(removed) = self.remove_pack(pack, |_| true) {
                report.packs_compacted += 1;
                report.chunks_moved += removed.moved;
                report.bytes_freed += pack.bytes.saturating_sub(removed.moved_bytes);
            }
        }
        self.remove_leftovers();
        for (dead, pack) in candidates {
            let mostly_dead = dead * 2 >= pack.data_bytes;
            if !mostly_dead && dead_total * DEAD_SHARE_DIVISOR <= total {
                continue;
            }
            let Some(removed) = self.remove_pack(&pack, |_| true) else {
                continue;
            };
            report.packs_compacted += 1;
            report.chunks_moved += removed.moved;
            let freed = pack
                .bytes
                .saturating_sub(removed.moved_bytes + removed.moved * RECORD_BYTES as u64);
            report.bytes_freed += freed;
            dead_total = dead_total.saturating_sub(dead);
            let _ = self
                .approx_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(freed)));
        }
        report
    }

    /// File packs that a link under `files/` names.
    fn linked_file_packs(&self) -> HashSet<u64> {
        std::fs::read_dir(self.files_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|target| parse_file_name(&target.file_name()?.to_string_lossy()))
            .filter(|(id, is_index)| !is_index && is_file_pack(*id))
            .map(|(id, _)| id)
            .collect()
    }

    /// Bytes of each pack that the index names.
    fn live_bytes(&self) -> HashMap<u64, u64> {
        let mut live: HashMap<u64, u64> = HashMap::new();
        for location in self.index.read().expect("index lock").chunks.values() {
            *live.entry(location.pack).or_insert(0) += u64::from(location.length);
        }
        live
    }

    /// Removes what writers killed mid-write left (old temporary files) and links to
    /// materialized files whose pack was evicted.
    pub(super) fn remove_leftovers(&self) {
        let files = self.files_dir();
        let old = |path: &Path| {
            std::fs::symlink_metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > LEFTOVER_AGE)
        };
        let temps = std::fs::read_dir(files.join("tmp")).into_iter().flatten().flatten();
        let pack_temps = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX));
        for entry in temps.chain(pack_temps) {
            if old(&entry.path()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for entry in std::fs::read_dir(&files).into_iter().flatten().flatten() {
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if is_link && !entry.path().exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Refreshes a file pack's recency (at most once a minute) when it backs an open:
/// reads by passthrough never reach the store.
pub fn touch_if_stale(file: &File) {
    let stale = file
        .metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() > super::TOUCH_INTERVAL);
    if stale {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Bytes read from a pack at once when chunks are moved out of it.
const MOVE_WINDOW_BYTES: u64 = 16 << 20;

/// `chunks` (sorted by offset) in runs that each span at most `MOVE_WINDOW_BYTES`
/// of the pack (or one chunk).
fn windows(chunks: &[([u8; 32], Location)]) -> impl Iterator<Item = &[([u8; 32], Location)]> {
    let mut rest = chunks;
    std::iter::from_fn(move || {
        let first = rest.first()?.1.offset;
        let count = rest
            .iter()
            .take_while(|(_, l)| l.offset + u64::from(l.length) - first <= MOVE_WINDOW_BYTES)
            .count()
            .max(1);
        let (window, tail) = rest.split_at(count);
        rest = tail;
        Some(window)
    })
}
