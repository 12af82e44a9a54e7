//! Touches every part of a bootstrap through the public reader API. The fuzz
//! target and the corruption property tests call it: any input may give an error,
//! none may panic, loop or read out of bounds.

use super::{Bootstrap, FileKind, OpenOptions};
use crate::error::Result;

/// Counts of what [`read_everything`] visited.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Visited {
    pub entries: u64,
    pub segments: u64,
    pub xattrs: u64,
}

/// Opens `bytes` (digest check as given) and reads every table through the tree,
/// plus every chunk, blob and prefetch entry directly.
pub fn read_everything(bytes: &[u8], verify_digest: bool) -> Result<Visited> {
    let bootstrap = Bootstrap::open_with(bytes, OpenOptions { verify_digest })?;
    let mut visited = Visited::default();
    for entry in bootstrap.walk() {
        let entry = entry?;
        visited.entries += 1;
        let inode = entry.inode;
        visited.xattrs += bootstrap.xattrs(&inode)?.len() as u64;
        let _ = inode.mtime();
        match inode.kind()? {
            FileKind::Regular => {
                visited.segments += bootstrap.segments(&inode, 0, inode.size())?.len() as u64;
                // A read in the middle, as the daemon does.
                bootstrap.segments(&inode, inode.size() / 3, 4096)?;
            }
            FileKind::Symlink => {
                bootstrap.symlink_target(&inode)?;
            }
            FileKind::Directory => {
                for child in bootstrap.dir_entries(&inode)? {
                    let child = child?;
                    bootstrap.lookup(&inode, child.name)?;
                }
            }
            _ => {}
        }
    }
    for index in 0..bootstrap.chunk_count() {
        bootstrap.chunk(index)?;
    }
    for blob in bootstrap.blobs() {
        blob?;
    }
    for ino in bootstrap.prefetch() {
        bootstrap.inode(ino)?;
    }
    Ok(visited)
}
