//! `petrel cache verify [--repair]`: re-hashes the whole node cache. Every chunk
//! against the digest it is stored under, every cached bootstrap against its own
//! digest (and the name it is kept under), and every materialized passthrough file
//! against the chunks its image says it holds. What is bad is reported and, with
//! `repair`, removed: a daemon then fetches it again instead of serving it.

use crate::error::{DaemonError, Result};
use crate::store::ChunkStore;
use petrel_format::{Bootstrap, FileKind};
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

/// How many bad paths a report lists (the counts are always complete).
const MAX_LISTED: usize = 100;

/// What a verification found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub chunks_bad: u64,
    pub bootstraps_checked: u64,
    pub bootstraps_bad: u64,
    pub files_checked: u64,
    pub files_bad: u64,
    /// Materialized files no cached bootstrap names.
    pub files_orphaned: u64,
    /// Paths removed (with `repair`).
    pub removed: u64,
    /// The first bad paths found.
    pub bad: Vec<PathBuf>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.chunks_bad + self.bootstraps_bad + self.files_bad == 0
    }

    /// Counts `path` bad; with `repair` removes it (a materialized file with its pack).
    fn bad(&mut self, path: PathBuf, repair: bool, store: &ChunkStore) {
        if repair && store.remove_materialized(&path) {
            self.removed += 1;
        }
        if self.bad.len() < MAX_LISTED {
            self.bad.push(path);
        }
    }
}

/// Whether a stored chunk hashes to its digest; None when it is no longer
/// stored: daemons keep evicting chunks while a verify runs (a read of a chunk
/// whose pack was removed already looks again, `ChunkStore::verify`).
fn verify_chunk(store: &ChunkStore, digest: &[u8; 32]) -> Option<bool> {
    match store.verify(digest) {
        Ok(good) => Some(good),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => Some(false),
    }
}

/// Verifies the node cache at `cache_dir`; with `repair`, removes what is bad (and
/// materialized files nothing names).
pub fn verify_cache(cache_dir: &Path, repair: bool) -> Result<VerifyReport> {
    let store = ChunkStore::open(cache_dir, None)?;
    let mut report = VerifyReport::default();
    let mut bad_chunks = HashSet::new();
    // In pack order: one sequential pass over each pack, not a random read per chunk.
    type Placed = (Option<(PathBuf, u64, u32)>, [u8; 32]);
    let mut chunks: Vec<Placed> = store
        .list()
        .into_iter()
        .map(|(digest, _, _)| (store.chunk_location(&digest), digest))
        .collect();
    chunks.sort();
    for (_, digest) in chunks {
        let Some(good) = verify_chunk(&store, &digest) else {
            continue;
        };
        report.chunks_checked += 1;
        if !good {
            report.chunks_bad += 1;
            bad_chunks.insert(digest);
            // A chunk lives in a pack among others: named by its place, removed by
            // a tombstone (its bytes go with the pack).
            let place = store
                .chunk_location(&digest)
                .map(|(pack, offset, _)| PathBuf::from(format!("{}@{offset}", pack.display())))
                .unwrap_or_default();
            if repair {
                store.remove(&digest);
                report.removed += 1;
            }
            if report.bad.len() < MAX_LISTED {
                report.bad.push(place);
            }
        }
    }
    let mut named_files = HashSet::new();
    let bootstraps = std::fs::read_dir(cache_dir.join("bootstraps"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file());
    for path in bootstraps {
        report.bootstraps_checked += 1;
        let file = File::open(&path).map_err(DaemonError::io("open", &path))?;
        let map = crate::image::map_read_only(&file).map_err(DaemonError::io("map", &path))?;
        let bootstrap = match Bootstrap::open(&map) {
            Ok(b)
                if path
                    .file_name()
                    .is_some_and(|n| *n == *hex::encode(b.superblock().digest)) =>
            {
                b
            }
            _ => {
                report.bootstraps_bad += 1;
                report.bad(path, repair, &store);
                continue;
            }
        };
        check_files(
            cache_dir,
            &bootstrap,
            &store,
            &bad_chunks,
            repair,
            &mut named_files,
            &mut report,
        )?;
    }
    let files = std::fs::read_dir(cache_dir.join("files"))
        .into_iter()
        .flatten()
        .flatten();
    for entry in files.filter(|e| e.path().is_file()) {
        if !named_files.contains(&entry.path()) {
            report.files_orphaned += 1;
            if repair && store.remove_materialized(&entry.path()) {
                report.removed += 1;
            }
        }
    }
    Ok(report)
}

/// Checks the materialized files of one image's regular files.
fn check_files(
    cache_dir: &Path,
    bootstrap: &Bootstrap<'_>,
    store: &ChunkStore,
    bad_chunks: &HashSet<[u8; 32]>,
    repair: bool,
    named: &mut HashSet<PathBuf>,
    report: &mut VerifyReport,
) -> Result<()> {
    for entry in bootstrap.walk() {
        let inode = entry?.inode;
        if inode.kind()? != FileKind::Regular {
            continue;
        }
        let path = crate::passthrough::materialized_path(cache_dir, bootstrap, &inode)?;
        let Ok(file) = File::open(&path) else { continue };
        if !named.insert(path.clone()) {
            continue;
        }
        report.files_checked += 1;
        let segments = bootstrap.segments(&inode, 0, inode.size())?;
        let trusted = |index: u32, offset: u32, buf: &mut [u8]| {
            bootstrap
                .chunk(index)
                .is_ok_and(|c| !bad_chunks.contains(&c.digest) && store.read_quietly(&c.digest, offset, buf).is_ok())
        };
        if !crate::passthrough::check_file_against(&file, bootstrap, &segments, &trusted)? {
            report.files_bad += 1;
            report.bad(path, repair, store);
        }
    }
    Ok(())
}
