//! `petrel unpack`: writes an image's tree back to a directory or a tar, emitting
//! only bytes that pass their chunk digests.
//!
//! Writes stay inside the target: names come from validated dirents (no `/`, `.`,
//! `..`), every entry is created new (never opened through an existing path), and
//! no entry is ever written below a symlink because only directories have children.

use crate::error::{BuildError, Result};
use crate::image::LocalImage;
use petrel_format::reader::WalkEntry;
use petrel_format::{Bootstrap, FileKind, Inode};
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What unpack did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnpackReport {
    pub entries: u64,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

/// Writes the tree into `target`, which must be missing or an empty directory.
pub fn unpack_to_dir(image: &LocalImage, target: &Path) -> Result<UnpackReport> {
    match fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BuildError::Invalid(format!("{} is not empty", target.display())));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(target).map_err(BuildError::io("create", target))?;
        }
        Err(e) => return Err(BuildError::io("open", target)(e)),
    }
    let bootstrap = image.bootstrap();
    let mut report = UnpackReport::default();
    let mut first_path_of: HashMap<u32, PathBuf> = HashMap::new();
    let mut directories: Vec<(PathBuf, Inode<'_>)> = Vec::new();
    for entry in bootstrap.walk() {
        let WalkEntry { path, inode, .. } = entry?;
        report.entries += 1;
        let dest = target.join(OsStr::from_bytes(&path));
        let kind = inode.kind()?;
        if kind == FileKind::Directory {
            if !path.is_empty() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dest)
                    .map_err(BuildError::io("create directory", &dest))?;
            }
            directories.push((dest, inode));
            continue;
        }
        if let Some(first) = first_path_of.get(&inode.ino()) {
            fs::hard_link(first, &dest).map_err(BuildError::io("hardlink", &dest))?;
            continue;
        }
        match kind {
            FileKind::Regular => report.bytes += write_file(image, &inode, &dest)?,
            FileKind::Symlink => {
                let link = bootstrap.symlink_target(&inode)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(link), &dest)
                    .map_err(BuildError::io("create symlink", &dest))?;
            }
            FileKind::CharDevice | FileKind::BlockDevice | FileKind::Fifo => {
                let file_type = match kind {
                    FileKind::CharDevice => FileType::CharacterDevice,
                    FileKind::BlockDevice => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let (major, minor) = inode.rdev();
                rustix::fs::mknodat(
                    CWD,
                    &dest,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|e| BuildError::io("mknod", &dest)(e.into()))?;
            }
            FileKind::Directory => unreachable!("handled above"),
        }
        apply_metadata(&bootstrap, &inode, &dest, &mut report.warnings)?;
        if inode.nlink() > 1 {
            first_path_of.insert(inode.ino(), dest);
        }
    }
    // Directories last and deepest first, so read-only modes and mtimes stick.
    for (dest, inode) in directories.iter().rev() {
        apply_metadata(&bootstrap, inode, dest, &mut report.warnings)?;
    }
    Ok(report)
}

fn write_file(image: &LocalImage, inode: &Inode<'_>, dest: &Path) -> Result<u64> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .mode(0o600)
        .open(dest)
        .map_err(BuildError::io("create", dest))?;
    image.for_each_piece(inode, |segment, bytes| {
        if segment.source == petrel_format::reader::SegmentSource::Hole {
            // Leave holes as holes: skip ahead, set_len below extends the file.
            file.seek(SeekFrom::Current(bytes.len() as i64))
                .map_err(BuildError::io("seek", dest))?;
            return Ok(());
        }
        file.write_all(bytes).map_err(BuildError::io("write", dest))
    })?;
    file.set_len(inode.size()).map_err(BuildError::io("truncate", dest))?;
    Ok(inode.size())
}

/// Owner, mode, xattrs and mtime, in that order (chown clears setuid bits).
fn apply_metadata(bootstrap: &Bootstrap<'_>, inode: &Inode<'_>, dest: &Path, warnings: &mut Vec<String>) -> Result<()> {
    let is_symlink = inode.kind()? == FileKind::Symlink;
    if let Err(e) = std::os::unix::fs::lchown(dest, Some(inode.uid()), Some(inode.gid())) {
        warnings.push(format!(
            "{}: cannot set owner {}:{}: {e}",
            dest.display(),
            inode.uid(),
            inode.gid()
        ));
    }
    if !is_symlink {
        fs::set_permissions(dest, fs::Permissions::from_mode(inode.permissions()))
            .map_err(BuildError::io("chmod", dest))?;
    }
    for (name, value) in bootstrap.xattrs(inode)? {
        let c_name = std::ffi::CString::new(name).map_err(|e| BuildError::Invalid(e.to_string()))?;
        if let Err(e) = rustix::fs::lsetxattr(dest, c_name.as_c_str(), value, rustix::fs::XattrFlags::empty()) {
            warnings.push(format!(
                "{}: cannot set xattr {}: {e}",
                dest.display(),
                String::from_utf8_lossy(name)
            ));
        }
    }
    let (sec, nsec) = inode.mtime();
    let time = Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec),
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, dest, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| BuildError::io("set mtime of", dest)(e.into()))?;
    Ok(())
}

/// Writes the tree as a tar stream (PAX records for xattrs and exact mtimes).
pub fn unpack_to_tar(image: &LocalImage, out: impl Write) -> Result<UnpackReport> {
    let bootstrap = image.bootstrap();
    let mut report = UnpackReport::default();
    let mut builder = tar::Builder::new(out);
    let mut first_path_of: HashMap<u32, Vec<u8>> = HashMap::new();
    let tar_io = |e| BuildError::io("write", "tar output")(e);
    for entry in bootstrap.walk() {
        let WalkEntry { path, inode, .. } = entry?;
        report.entries += 1;
        let kind = inode.kind()?;
        let name: Vec<u8> = if path.is_empty() {
            b"./".to_vec()
        } else if kind == FileKind::Directory {
            [&path[..], b"/"].concat()
        } else {
            path.clone()
        };
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for (key, value) in bootstrap.xattrs(&inode)? {
            pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(key)), value.to_vec()));
        }
        let (sec, nsec) = inode.mtime();
        if sec < 0 || nsec != 0 || sec > 0o77777777777 {
            pax.push(("mtime".into(), format_pax_time(sec, nsec).into_bytes()));
        }
        if !pax.is_empty() {
            builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(tar_io)?;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(inode.permissions());
        header.set_uid(u64::from(inode.uid()));
        header.set_gid(u64::from(inode.gid()));
        header.set_mtime(sec.max(0) as u64);
        header.set_size(0);
        let hardlink_to = if kind != FileKind::Directory {
            first_path_of.get(&inode.ino()).cloned()
        } else {
            None
        };
        if let Some(target) = hardlink_to {
            header.set_entry_type(tar::EntryType::Link);
            builder
                .append_link(&mut header, OsStr::from_bytes(&name), OsStr::from_bytes(&target))
                .map_err(tar_io)?;
            continue;
        }
        if inode.nlink() > 1 && kind != FileKind::Directory {
            first_path_of.insert(inode.ino(), name.clone());
        }
        match kind {
            FileKind::Regular => {
                // Streamed chunk by chunk: no file is ever held whole.
                report.bytes += inode.size();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(inode.size());
                let content = image.file_reader(&inode)?;
                builder
                    .append_data(&mut header, OsStr::from_bytes(&name), content)
                    .map_err(|e| match e.downcast::<BuildError>() {
                        Ok(e) => e,
                        Err(e) => tar_io(e),
                    })?;
            }
            FileKind::Symlink => {
                header.set_entry_type(tar::EntryType::Symlink);
                let target = bootstrap.symlink_target(&inode)?;
                builder
                    .append_link(&mut header, OsStr::from_bytes(&name), OsStr::from_bytes(target))
                    .map_err(tar_io)?;
            }
            other => {
                header.set_entry_type(match other {
                    FileKind::Directory => tar::EntryType::Directory,
                    FileKind::CharDevice => tar::EntryType::Char,
                    FileKind::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                if matches!(other, FileKind::CharDevice | FileKind::BlockDevice) {
                    let (major, minor) = inode.rdev();
                    header.set_device_major(major).map_err(tar_io)?;
                    header.set_device_minor(minor).map_err(tar_io)?;
                }
                builder
                    .append_data(&mut header, OsStr::from_bytes(&name), std::io::empty())
                    .map_err(tar_io)?;
            }
        }
    }
    builder.into_inner().map_err(tar_io)?.flush().map_err(tar_io)?;
    Ok(report)
}

/// Formats seconds and nanoseconds as a PAX time (`-1.25` for (-2, 750000000)).
pub fn format_pax_time(sec: i64, nsec: u32) -> String {
    if nsec == 0 {
        return sec.to_string();
    }
    let (whole, fraction) = if sec < 0 {
        (sec + 1, 1_000_000_000 - nsec)
    } else {
        (sec, nsec)
    };
    let sign = if sec < 0 && whole == 0 { "-" } else { "" };
    let digits = format!("{fraction:09}");
    format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::format_pax_time;
    use crate::layer::parse_pax_time;

    #[test]
    fn pax_time_round_trips() {
        for (s, n) in [
            (0, 0),
            (5, 1),
            (-1, 0),
            (-2, 750_000_000),
            (-1, 500_000_000),
            (1_700_000_000, 123_456_789),
            (-86_401, 999_999_999),
        ] {
            let text = format_pax_time(s, n);
            assert_eq!(parse_pax_time(&text), Some((s, n)), "{text}");
        }
    }
}
