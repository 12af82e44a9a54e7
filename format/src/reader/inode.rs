//! Inode records decoded into typed views.

use super::Bootstrap;
use crate::error::{FormatError, Result};
use crate::layout::InodeRecord;

/// `S_IFMT` mask and type values (Linux).
pub mod mode_bits {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFIFO: u32 = 0o010000;
    /// Permission bits including setuid, setgid and sticky.
    pub const PERMISSIONS: u32 = 0o7777;
}

/// The kinds of inode a bootstrap can hold (sockets are never stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        use mode_bits::*;
        match self {
            FileKind::Regular => S_IFREG,
            FileKind::Directory => S_IFDIR,
            FileKind::Symlink => S_IFLNK,
            FileKind::CharDevice => S_IFCHR,
            FileKind::BlockDevice => S_IFBLK,
            FileKind::Fifo => S_IFIFO,
        }
    }

    /// Decodes the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Self> {
        use mode_bits::*;
        Some(match mode & S_IFMT {
            S_IFREG => FileKind::Regular,
            S_IFDIR => FileKind::Directory,
            S_IFLNK => FileKind::Symlink,
            S_IFCHR => FileKind::CharDevice,
            S_IFBLK => FileKind::BlockDevice,
            S_IFIFO => FileKind::Fifo,
            _ => return None,
        })
    }

    /// One letter, as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            FileKind::Regular => '-',
            FileKind::Directory => 'd',
            FileKind::Symlink => 'l',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
            FileKind::Fifo => 'p',
        }
    }
}

/// A view of one inode record.
#[derive(Debug, Clone, Copy)]
pub struct Inode<'a> {
    pub(crate) ino: u32,
    pub(crate) record: &'a InodeRecord,
}

impl<'a> Inode<'a> {
    pub fn ino(&self) -> u32 {
        self.ino
    }
    pub fn record(&self) -> &'a InodeRecord {
        self.record
    }
    /// The inode's type; an unknown type is corruption.
    pub fn kind(&self) -> Result<FileKind> {
        FileKind::from_mode(self.record.mode.get())
            .ok_or_else(|| FormatError::corrupt("inode", self.ino, "unknown file type in mode"))
    }
    /// Permission bits, including setuid, setgid and sticky.
    pub fn permissions(&self) -> u32 {
        self.record.mode.get() & mode_bits::PERMISSIONS
    }
    /// Full mode: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.record.mode.get()
    }
    pub fn uid(&self) -> u32 {
        self.record.uid.get()
    }
    pub fn gid(&self) -> u32 {
        self.record.gid.get()
    }
    pub fn nlink(&self) -> u32 {
        self.record.nlink.get()
    }
    pub fn size(&self) -> u64 {
        self.record.size.get()
    }
    /// Seconds since the epoch (may be negative) and nanoseconds.
    pub fn mtime(&self) -> (i64, u32) {
        (
            self.record.mtime_sec.get(),
            self.record.mtime_nsec.get().min(999_999_999),
        )
    }
    /// Device major and minor numbers (character and block devices).
    pub fn rdev(&self) -> (u32, u32) {
        (self.record.rdev_major.get(), self.record.rdev_minor.get())
    }
    /// For a directory, its parent's inode number.
    pub fn parent(&self) -> u32 {
        self.record.parent_ino.get()
    }

    pub(crate) fn require(&self, kind: FileKind, reason: &'static str) -> Result<()> {
        if self.kind()? == kind {
            Ok(())
        } else {
            Err(FormatError::corrupt("inode", self.ino, reason))
        }
    }
}

impl<'a> Bootstrap<'a> {
    /// The target of a symlink, as stored (never resolved).
    pub fn symlink_target(&self, inode: &Inode<'a>) -> Result<&'a [u8]> {
        inode.require(FileKind::Symlink, "not a symlink")?;
        let (offset, len) = (inode.record.data_index.get(), inode.record.data_count.get());
        let offset = u32::try_from(offset)
            .map_err(|_| FormatError::corrupt("inode", inode.ino, "symlink target offset above 4 GiB"))?;
        if u64::from(len) != inode.size() || len == 0 || len > 4096 {
            return Err(FormatError::corrupt(
                "inode",
                inode.ino,
                "symlink target length invalid",
            ));
        }
        self.string(offset, len as usize, "inode", u64::from(inode.ino))
    }

    /// Extended attributes of an inode: `(name, value)` pairs.
    pub fn xattrs(&self, inode: &Inode<'a>) -> Result<Vec<(&'a [u8], &'a [u8])>> {
        let start = inode.record.xattr_index.get() as usize;
        let count = inode.record.xattr_count.get() as usize;
        let records = start
            .checked_add(count)
            .and_then(|end| self.xattrs.get(start..end))
            .ok_or_else(|| FormatError::corrupt("inode", inode.ino, "xattr range outside the xattr table"))?;
        records
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let index = (start + i) as u64;
                let name = self.string(x.name_offset.get(), usize::from(x.name_len.get()), "xattr", index)?;
                let value = self.string(x.value_offset.get(), x.value_len.get() as usize, "xattr", index)?;
                if name.is_empty() || name.contains(&0) {
                    return Err(FormatError::corrupt("xattr", index, "empty name or NUL in name"));
                }
                Ok((name, value))
            })
            .collect()
    }

    /// Value of one extended attribute.
    pub fn xattr(&self, inode: &Inode<'a>, name: &[u8]) -> Result<Option<&'a [u8]>> {
        Ok(self
            .xattrs(inode)?
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v))
    }
}
