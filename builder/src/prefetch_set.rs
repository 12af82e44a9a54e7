//! The files a prefetch profile names, told apart while a layer's tar streams in:
//! a chunk of one of them is held back from the blobs sealed or streamed mid-build
//! and stored once, in the prefetch region of the blob `finish` writes. The region
//! itself is laid out from the finished tree (`emit`); a chunk this set does not
//! foresee (a file reached by another name, a chunk first seen in another file)
//! still gets there, from the build's own copy.

use crate::tree::clean_path;
use petrel_format::profile::{glob_match, merge_ranges, wildcards, ProfileEntry, MAX_EXPANSIONS, MAX_WILDCARDS};
use std::collections::HashMap;

/// The profile's entries, by cleaned path.
#[derive(Debug, Default)]
pub struct PrefetchSet {
    /// Files and directories (a directory stands for every file below it), with
    /// the byte ranges wanted, sorted and disjoint (None: all).
    paths: HashMap<Vec<u8>, Option<Vec<[u64; 2]>>>,
    /// `*`, `?` and `**` patterns over file paths.
    patterns: Vec<Vec<u8>>,
}

/// What of one file the profile wants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Wanted {
    #[default]
    Nothing,
    All,
    /// Sorted and disjoint.
    Ranges(Vec<[u64; 2]>),
}

impl Wanted {
    /// Whether bytes `start..start + length` of the file are wanted.
    pub fn covers(&self, start: u64, length: u64) -> bool {
        let end = start.saturating_add(length);
        match self {
            Wanted::Nothing => false,
            Wanted::All => true,
            Wanted::Ranges(ranges) => {
                // Asked for every chunk of the file: a search, not a scan of
                // however many ranges a stranger's profile lists.
                let first_ending_after = ranges.partition_point(|&[_, b]| b <= start);
                ranges.get(first_ending_after).is_some_and(|&[a, _]| a < end)
            }
        }
    }

    fn merge(&mut self, ranges: &Option<Vec<[u64; 2]>>) {
        match (&mut *self, ranges) {
            (Wanted::All, _) => {}
            (_, None) => *self = Wanted::All,
            (Wanted::Nothing, Some(more)) => *self = Wanted::Ranges(more.clone()),
            (Wanted::Ranges(have), Some(more)) => {
                have.extend_from_slice(more);
                *have = merge_ranges(std::mem::take(have));
            }
        }
    }
}

impl PrefetchSet {
    /// The set `entries` name, as `emit` reads them.
    pub fn new(entries: &[ProfileEntry]) -> Self {
        let mut set = PrefetchSet::default();
        for entry in entries {
            let Some(raw) = entry.path_bytes() else { continue };
            let path = raw.strip_prefix(b"/").unwrap_or(&raw);
            if wildcards(path) > 0 {
                // Bounded as `emit` bounds them: each is matched against every file.
                if wildcards(path) <= MAX_WILDCARDS && set.patterns.len() < MAX_EXPANSIONS {
                    set.patterns.push(path.to_vec());
                }
                continue;
            }
            let key = clean_path(path).join(&b'/');
            match set.paths.get_mut(&key) {
                Some(Some(have)) => match &entry.ranges {
                    Some(more) => have.extend_from_slice(more),
                    None => *set.paths.get_mut(&key).expect("present") = None,
                },
                Some(None) => {}
                None => {
                    set.paths.insert(key, entry.ranges.clone());
                }
            }
        }
        for ranges in set.paths.values_mut().flatten() {
            *ranges = merge_ranges(std::mem::take(ranges));
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.patterns.is_empty()
    }

    /// What the profile wants of the file at `components` (cleaned): its own
    /// entry's ranges, all of it below a directory entry, all of it where a
    /// pattern matches.
    pub fn wanted(&self, components: &[Vec<u8>]) -> Wanted {
        let mut wanted = Wanted::Nothing;
        if self.is_empty() || components.is_empty() {
            return wanted;
        }
        let path = components.join(&b'/');
        let mut end = path.len();
        loop {
            if let Some(ranges) = self.paths.get(&path[..end]) {
                wanted.merge(ranges);
            }
            match path[..end].iter().rposition(|&b| b == b'/') {
                Some(slash) => end = slash,
                None => break,
            }
        }
        if wanted != Wanted::All && self.patterns.iter().any(|p| glob_match(p, &path)) {
            wanted = Wanted::All;
        }
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn components(path: &str) -> Vec<Vec<u8>> {
        clean_path(path.as_bytes())
    }

    #[test]
    fn files_directories_patterns_and_ranges_are_told_apart() {
        let set = PrefetchSet::new(&[
            ProfileEntry::new(b"/usr/bin/python3", Some(vec![[0, 4096]])),
            ProfileEntry::new(b"usr/lib/python3/dist-packages/numpy", None),
            ProfileEntry::new(b"/etc/*.conf", None),
            ProfileEntry::new(b"./app//main.py", None),
        ]);
        let python = set.wanted(&components("usr/bin/python3"));
        assert_eq!(python, Wanted::Ranges(vec![[0, 4096]]));
        assert!(python.covers(4000, 200) && !python.covers(4096, 100));
        assert_eq!(
            set.wanted(&components("usr/lib/python3/dist-packages/numpy/core/x.so")),
            Wanted::All
        );
        assert_eq!(
            set.wanted(&components("usr/lib/python3/dist-packages/numpyx")),
            Wanted::Nothing
        );
        assert_eq!(set.wanted(&components("etc/ld.so.conf")), Wanted::All);
        assert_eq!(set.wanted(&components("etc/ld.so.conf.d/x.conf")), Wanted::Nothing);
        assert_eq!(set.wanted(&components("app/main.py")), Wanted::All);
        assert_eq!(set.wanted(&components("usr/bin/python3.11")), Wanted::Nothing);
        assert!(PrefetchSet::new(&[]).is_empty());
    }

    #[test]
    fn an_entry_for_the_whole_file_outweighs_ranges_of_it() {
        let set = PrefetchSet::new(&[
            ProfileEntry::new(b"lib/a.so", Some(vec![[0, 10]])),
            ProfileEntry::new(b"lib/a.so", None),
            ProfileEntry::new(b"lib/b.so", Some(vec![[0, 10]])),
            ProfileEntry::new(b"lib/b.so", Some(vec![[100, 110]])),
        ]);
        assert_eq!(set.wanted(&components("lib/a.so")), Wanted::All);
        let b = set.wanted(&components("lib/b.so"));
        assert!(b.covers(105, 1) && b.covers(0, 1) && !b.covers(50, 10));
        // Unsorted, overlapping, empty: kept sorted and disjoint, searched.
        let many: Vec<[u64; 2]> = (0..10_000u64)
            .rev()
            .map(|i| [i * 100, i * 100 + 60])
            .chain([[5, 5], [30, 250]])
            .collect();
        let c = PrefetchSet::new(&[ProfileEntry::new(b"lib/c.so", Some(many))]).wanted(&components("lib/c.so"));
        let Wanted::Ranges(ranges) = &c else { panic!("{c:?}") };
        assert!(ranges.windows(2).all(|w| w[0][1] < w[1][0]), "sorted and disjoint");
        assert!(c.covers(70, 1) && c.covers(999_940, 10) && !c.covers(260, 40) && !c.covers(1_000_000, 5));
    }
}
