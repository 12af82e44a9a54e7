//! A profile given at mount (`petrel mount --profile`, or found in the registry as
//! a referrer of the image) on any petrel image, optimized or not: the chunks its
//! files' recorded ranges need, in first-access order, as chunk ranges for the
//! prefetcher. An image built without the profile has those chunks scattered over
//! its blob, so they are taken in waves of `WAVE_BYTES` (first-accessed first),
//! each wave in blob order with small gaps bridged, so a wave is a few merged range
//! requests rather than one per file.
//!
//! A profile may come from a stranger (a registry): its size, its entries, its
//! patterns and how many directories and patterns are expanded are bounded, and
//! paths it names that the image lacks are skipped.

use crate::image::MappedImage;
use petrel_format::profile::{glob_match, wildcards, Profile, MAX_EXPANSIONS, MAX_WILDCARDS};
use petrel_format::reader::SegmentSource;
use petrel_format::FileKind;
use std::collections::{HashMap, HashSet};

/// Largest profile accepted (JSON bytes).
pub const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// Entries of a profile looked at; the rest are ignored.
const MAX_ENTRIES: usize = 200_000;
/// Ranges of one entry looked at.
const MAX_RANGES_PER_ENTRY: usize = 4096;
/// Stored bytes of first-accessed chunks taken together, in blob order.
const WAVE_BYTES: u64 = 4 << 20;

/// Range requests in flight at once for a profile's chunks at least: on an image
/// not optimized for the profile they are scattered, so there are many small
/// requests, each paying a round trip (measured on the Python service over 100 Mbit/s
/// and 20 ms: 225 requests).
pub const PARALLEL: usize = 8;

/// The prefetch settings a profile's chunks are fetched with.
pub fn prefetch_config(base: crate::prefetch::PrefetchConfig) -> crate::prefetch::PrefetchConfig {
    crate::prefetch::PrefetchConfig {
        parallel: base.parallel.max(PARALLEL),
        ..base
    }
}

/// What a profile asks of an image.
#[derive(Debug, Default)]
pub struct ProfilePlan {
    /// Chunk ranges `[start, end)` to prefetch, in order.
    pub ranges: Vec<(u32, u32)>,
    /// Files of the profile found in the image.
    pub files: usize,
    /// Entries naming nothing in the image (or refused).
    pub skipped: usize,
}

/// The chunks `profile` reads in `image`, planned as prefetch ranges.
pub fn plan(image: &MappedImage, profile: &Profile) -> ProfilePlan {
    let bootstrap = image.bootstrap();
    let mut files: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut dirs: HashSet<Vec<u8>> = HashSet::new();
    for entry in bootstrap.walk().flatten() {
        match entry.inode.kind() {
            Ok(FileKind::Regular) => {
                files.insert(entry.path, entry.inode.ino());
            }
            Ok(FileKind::Directory) => {
                dirs.insert(entry.path);
            }
            _ => {}
        }
    }
    let mut plan = ProfilePlan::default();
    let mut wanted: Vec<(u32, Option<&[[u64; 2]]>)> = Vec::new();
    // Files already wanted whole: naming one again (a directory, a pattern) adds nothing.
    let mut whole_files = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut expansions = 0usize;
    for entry in profile.entries.iter().take(MAX_ENTRIES) {
        let Some(raw) = entry.path_bytes() else {
            plan.skipped += 1;
            continue;
        };
        let path = raw.strip_prefix(b"/").unwrap_or(&raw);
        let ranges = entry.ranges.as_deref();
        // Whether the entry names something in the image (that may be wanted already).
        let mut named = false;
        let wildcards = wildcards(path);
        let expands = wildcards > 0 || (!files.contains_key(path) && dirs.contains(path));
        if expands {
            expansions += 1;
        }
        if wildcards > MAX_WILDCARDS || (expands && expansions > MAX_EXPANSIONS) {
            // Refused, not searched: a stranger's patterns must not cost unbounded time.
        } else if wildcards > 0 {
            let mut matched: Vec<(&Vec<u8>, u32)> = files
                .iter()
                .filter(|(p, _)| glob_match(path, p))
                .map(|(p, i)| (p, *i))
                .collect();
            matched.sort();
            named = !matched.is_empty();
            wanted.extend(
                matched
                    .into_iter()
                    .filter(|(_, ino)| whole_files.insert(*ino))
                    .map(|(_, ino)| (ino, None)),
            );
        } else if let Some(&ino) = files.get(path) {
            named = true;
            if ranges.is_some() || whole_files.insert(ino) {
                wanted.push((ino, ranges));
            }
        } else if dirs.contains(path) {
            let mut below: Vec<(&Vec<u8>, u32)> = files
                .iter()
                .filter(|(p, _)| path.is_empty() || (p.starts_with(path) && p.get(path.len()) == Some(&b'/')))
                .map(|(p, i)| (p, *i))
                .collect();
            below.sort();
            named = true;
            wanted.extend(
                below
                    .into_iter()
                    .filter(|(_, ino)| whole_files.insert(*ino))
                    .map(|(_, ino)| (ino, None)),
            );
        }
        if !named {
            plan.skipped += 1;
        }
    }
    let mut order: Vec<u32> = Vec::new();
    let mut seen_chunks = HashSet::new();
    for (ino, ranges) in wanted {
        seen_files.insert(ino);
        let Ok(inode) = bootstrap.inode(ino) else { continue };
        let whole = [[0, inode.size()]];
        for range in ranges.unwrap_or(&whole).iter().take(MAX_RANGES_PER_ENTRY) {
            let (start, end) = (range[0].min(inode.size()), range[1].min(inode.size()));
            if start >= end {
                continue;
            }
            let Ok(segments) = bootstrap.segments(&inode, start, end - start) else {
                continue;
            };
            for segment in segments {
                if let SegmentSource::Chunk { index, .. } = segment.source {
                    if seen_chunks.insert(index) {
                        order.push(index);
                    }
                }
            }
        }
    }
    plan.files = seen_files.len();
    plan.ranges = waves(image, &order);
    plan
}

/// First-accessed chunks in waves of `WAVE_BYTES`, each in blob order and merged
/// across gaps of at most `chunk_ranges::GAP_BYTES` (of the same blob).
fn waves(image: &MappedImage, order: &[u32]) -> Vec<(u32, u32)> {
    let bootstrap = image.bootstrap();
    let mut ranges = Vec::new();
    let mut wave: Vec<u32> = Vec::new();
    let mut wave_bytes = 0u64;
    let mut flush = |wave: &mut Vec<u32>| ranges.extend(crate::chunk_ranges::bridged(image, std::mem::take(wave)));
    for &index in order {
        wave_bytes += bootstrap.chunk(index).map_or(0, |c| u64::from(c.compressed_size));
        wave.push(index);
        if wave_bytes >= WAVE_BYTES {
            flush(&mut wave);
            wave_bytes = 0;
        }
    }
    flush(&mut wave);
    ranges
}
