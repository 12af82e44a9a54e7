//! Directory entries: sorted by name, so lookup is a binary search in place.

use super::{Bootstrap, FileKind, Inode};
use crate::error::{FormatError, Result};
use crate::layout::DirentRecord;
use std::cmp::Ordering;

/// Longest name a directory entry may have (Linux NAME_MAX).
pub const NAME_MAX: usize = 255;

/// One entry of a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
}

/// The entries of one directory, each checked as it is read.
#[derive(Debug, Clone)]
pub struct DirEntries<'a> {
    bootstrap: Bootstrap<'a>,
    records: &'a [DirentRecord],
    first_index: u64,
    next: usize,
}

impl<'a> DirEntries<'a> {
    /// Number of entries (without `.` and `..`).
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
    /// Entry at `position`, checked.
    pub fn get(&self, position: usize) -> Result<DirEntry<'a>> {
        let record = self
            .records
            .get(position)
            .ok_or_else(|| FormatError::corrupt("dirent", self.first_index + position as u64, "past the end"))?;
        self.bootstrap.decode_dirent(record, self.first_index + position as u64)
    }
    /// Entries from `position` on (for resumed readdir).
    pub fn skip_to(mut self, position: usize) -> Self {
        self.next = position.min(self.records.len());
        self
    }
}

impl<'a> Iterator for DirEntries<'a> {
    type Item = Result<DirEntry<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.records.len() {
            return None;
        }
        let item = self.get(self.next);
        self.next += 1;
        Some(item)
    }
}

/// Whether `name` is acceptable as one path component.
pub fn is_valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

impl<'a> Bootstrap<'a> {
    /// The entries of directory `dir`.
    pub fn dir_entries(&self, dir: &Inode<'a>) -> Result<DirEntries<'a>> {
        dir.require(FileKind::Directory, "not a directory")?;
        let start = dir.record.data_index.get();
        let count = u64::from(dir.record.data_count.get());
        let records = usize::try_from(start)
            .ok()
            .and_then(|s| s.checked_add(count as usize).map(|e| (s, e)))
            .and_then(|(s, e)| self.dirents.get(s..e))
            .ok_or_else(|| FormatError::corrupt("inode", dir.ino, "dirent range outside the dirent table"))?;
        Ok(DirEntries {
            bootstrap: *self,
            records,
            first_index: start,
            next: 0,
        })
    }

    /// Finds `name` in directory `dir` by binary search.
    pub fn lookup(&self, dir: &Inode<'a>, name: &[u8]) -> Result<Option<u32>> {
        let entries = self.dir_entries(dir)?;
        let (mut low, mut high) = (0usize, entries.len());
        while low < high {
            let mid = low + (high - low) / 2;
            let entry = entries.get(mid)?;
            match entry.name.cmp(name) {
                Ordering::Less => low = mid + 1,
                Ordering::Greater => high = mid,
                Ordering::Equal => return Ok(Some(entry.ino)),
            }
        }
        Ok(None)
    }

    fn decode_dirent(&self, record: &DirentRecord, index: u64) -> Result<DirEntry<'a>> {
        let name = self.string(
            record.name_offset.get(),
            usize::from(record.name_len.get()),
            "dirent",
            index,
        )?;
        if !is_valid_name(name) {
            return Err(FormatError::corrupt(
                "dirent",
                index,
                "invalid name (empty, '.', '..', '/', NUL or too long)",
            ));
        }
        let ino = record.ino.get();
        if ino == 0 || ino > self.inode_count() {
            return Err(FormatError::corrupt("dirent", index, "inode number out of range"));
        }
        Ok(DirEntry { name, ino })
    }
}
