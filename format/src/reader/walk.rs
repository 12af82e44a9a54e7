//! A depth-first walk of the whole tree that cannot loop: each directory may be
//! reached once, so a crafted cycle is reported as corruption.

use super::{Bootstrap, FileKind, Inode};
use crate::error::{FormatError, Result};

/// One entry reached by a walk.
#[derive(Debug, Clone)]
pub struct WalkEntry<'a> {
    /// Path from the root, components joined by `/`; empty for the root.
    pub path: Vec<u8>,
    pub inode: Inode<'a>,
    /// The directory holding this entry (the root's parent is itself).
    pub parent_ino: u32,
}

/// Iterator over the tree, parents before children, entries in name order.
#[derive(Debug)]
pub struct TreeWalk<'a> {
    bootstrap: Bootstrap<'a>,
    visited_dirs: Vec<u64>,
    /// Directories still to expand: (path, inode number).
    stack: Vec<(Vec<u8>, u32)>,
    pending: std::vec::IntoIter<WalkEntry<'a>>,
    started: bool,
    failed: bool,
}

impl<'a> TreeWalk<'a> {
    pub(crate) fn new(bootstrap: Bootstrap<'a>) -> Self {
        let words = (bootstrap.inode_count() as usize).div_ceil(64);
        TreeWalk {
            bootstrap,
            visited_dirs: vec![0; words],
            stack: Vec::new(),
            pending: Vec::new().into_iter(),
            started: false,
            failed: false,
        }
    }

    /// Marks a directory visited; false if it was already.
    fn first_visit(&mut self, ino: u32) -> bool {
        let bit = (ino - 1) as usize;
        let (word, mask) = (bit / 64, 1u64 << (bit % 64));
        let fresh = self.visited_dirs[word] & mask == 0;
        self.visited_dirs[word] |= mask;
        fresh
    }

    fn expand(&mut self, path: Vec<u8>, dir_ino: u32) -> Result<()> {
        let dir = self.bootstrap.inode(dir_ino)?;
        let mut children = Vec::new();
        let mut previous: Option<&[u8]> = None;
        for entry in self.bootstrap.dir_entries(&dir)? {
            let entry = entry?;
            if previous.is_some_and(|p| p >= entry.name) {
                return Err(FormatError::corrupt(
                    "inode",
                    dir_ino,
                    "directory entries not sorted or duplicated",
                ));
            }
            previous = Some(entry.name);
            let inode = self.bootstrap.inode(entry.ino)?;
            let mut child_path = path.clone();
            if !child_path.is_empty() {
                child_path.push(b'/');
            }
            child_path.extend_from_slice(entry.name);
            if inode.kind()? == FileKind::Directory {
                if !self.first_visit(entry.ino) {
                    return Err(FormatError::corrupt(
                        "inode",
                        entry.ino,
                        "directory reached twice (cycle or shared directory)",
                    ));
                }
                if inode.parent() != dir_ino {
                    return Err(FormatError::corrupt(
                        "inode",
                        entry.ino,
                        "directory's parent field does not match",
                    ));
                }
            }
            children.push(WalkEntry {
                path: child_path,
                inode,
                parent_ino: dir_ino,
            });
        }
        // Push subdirectories in reverse so they are expanded in name order.
        for child in children.iter().rev() {
            if child.inode.kind()? == FileKind::Directory {
                self.stack.push((child.path.clone(), child.inode.ino()));
            }
        }
        self.pending = children.into_iter();
        Ok(())
    }
}

impl<'a> Iterator for TreeWalk<'a> {
    type Item = Result<WalkEntry<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if !self.started {
            self.started = true;
            self.first_visit(1);
            self.stack.push((Vec::new(), 1));
            return Some(self.bootstrap.inode(1).map(|inode| WalkEntry {
                path: Vec::new(),
                inode,
                parent_ino: 1,
            }));
        }
        loop {
            if let Some(entry) = self.pending.next() {
                return Some(Ok(entry));
            }
            let (path, ino) = self.stack.pop()?;
            if let Err(e) = self.expand(path, ino) {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }
}
