//! Applies one OCI layer (a tar stream) to the merged tree.

use crate::error::{BuildError, EntryProblem, Result};
use crate::pax_sparse::{self, MappedSparse};
use crate::record::{apply_op, EntryError, Op, Recorded};
use crate::sink::{ChunkSink, SparseFile};
use crate::tree::{clean_path, Meta, NodeKind, Tree};
use std::io::{BufRead, BufReader, Read};
use tar::EntryType;

/// Prefix of a whiteout file name.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Longest symlink target accepted (Linux PATH_MAX).
pub const MAX_SYMLINK_TARGET: usize = 4096;
/// Longest entry path accepted once cleaned (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Deepest entry path accepted, in components.
pub const MAX_PATH_DEPTH: usize = 1024;
/// Most bytes of metadata held for one tar entry: each GNU long name or link name,
/// each PAX extended header, its GNU sparse extension headers (Go's `archive/tar`
/// allows 1 MiB too).
pub const MAX_TAR_METADATA: u64 = 1 << 20;
/// Longest extended attribute name (Linux XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value (Linux XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 64 << 10;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The type flag of a GNU dump directory.
const GNU_DUMP_DIR: u8 = b'D';
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Whether a layer starting with `head` is gzip or zstd.
pub fn is_compressed(head: &[u8]) -> bool {
    head.starts_with(&GZIP_MAGIC) || head.starts_with(&ZSTD_MAGIC)
}

/// Wraps a layer stream in the decompressor its first bytes call for: gzip, zstd or none.
pub fn decompressed<'a>(reader: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::with_capacity(1 << 20, reader);
    let head = buffered.fill_buf()?;
    Ok(if head.starts_with(&GZIP_MAGIC) {
        Box::new(flate2::read::MultiGzDecoder::new(buffered))
    } else if head.starts_with(&ZSTD_MAGIC) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

/// Longest archive error message kept (a corrupt header's message quotes its bytes).
const MAX_ARCHIVE_MESSAGE: usize = 200;

/// `error` with a message fit for a terminal: the tar reader quotes a corrupt
/// header's name field, which may hold any bytes; control characters are escaped
/// and the message is cut short.
fn printable(error: std::io::Error) -> std::io::Error {
    let message = error.to_string();
    if message.len() <= MAX_ARCHIVE_MESSAGE && !message.chars().any(char::is_control) {
        return error;
    }
    let mut shown = String::new();
    for c in message.chars() {
        if shown.len() >= MAX_ARCHIVE_MESSAGE {
            shown.push('…');
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    std::io::Error::new(error.kind(), shown)
}

/// Applies the entries of one uncompressed tar stream as layer `layer`.
pub fn apply_tar_layer(
    tree: &mut Tree,
    sink: &mut ChunkSink,
    reader: &mut dyn Read,
    layer: usize,
    warnings: &mut Vec<String>,
    mut record: Option<&mut Vec<Recorded>>,
) -> Result<u64> {
    let archive_error = |source: std::io::Error| BuildError::Archive {
        layer,
        source: printable(source),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_max_metadata_size(MAX_TAR_METADATA);
    let mut count = 0u64;
    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let bad = |problem| BuildError::BadEntry {
            layer,
            path: shown.clone(),
            problem,
        };
        match apply_entry(
            tree,
            sink,
            &mut entry,
            &raw_path,
            layer,
            warnings,
            record.as_deref_mut(),
        ) {
            Ok(()) => count += 1,
            Err(EntryError::Problem(problem)) => return Err(bad(problem)),
            Err(EntryError::Build(e)) => return Err(e),
        }
    }
    Ok(count)
}

fn apply_entry(
    tree: &mut Tree,
    sink: &mut ChunkSink,
    entry: &mut tar::Entry<'_, &mut dyn Read>,
    raw_path: &[u8],
    layer: usize,
    warnings: &mut Vec<String>,
    record: Option<&mut Vec<Recorded>>,
) -> Result<(), EntryError> {
    // A GNU dump directory ('D', from `tar --listed-incremental`) is a directory whose
    // data lists its contents for incremental restores: the directory is what counts.
    let kind = match entry.header().entry_type() {
        kind if kind.as_byte() == GNU_DUMP_DIR => EntryType::Directory,
        kind => kind,
    };
    if matches!(
        kind,
        EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
    ) {
        return Ok(());
    }
    // A PAX sparse file (GNU 0.0, 0.1, 1.0; bsdtar) names its real path and size in
    // its records.
    let sparse = match kind {
        EntryType::Regular | EntryType::Continuous => pax_sparse::detect(&pax_records(entry)?)?,
        _ => None,
    };
    let raw_path = sparse.as_ref().and_then(|s| s.name.as_deref()).unwrap_or(raw_path);
    let shown = String::from_utf8_lossy(raw_path).into_owned();
    if raw_path.split(|&b| b == b'/').any(|c| c == b"..") {
        warnings.push(format!(
            "layer {}: entry {shown:?} has '..' components; placed inside the root as containerd does",
            layer + 1
        ));
    }
    let components = clean_path(raw_path);
    check_path(&components)?;
    let meta = entry_meta(entry)?;
    let Some(name) = components.last() else {
        if kind == EntryType::Directory {
            return apply_op(tree, &components, &shown, Op::Root(meta), layer, warnings, record);
        }
        warnings.push(format!(
            "layer {}: entry {shown:?} names the root but is not a directory; skipped",
            layer + 1
        ));
        return Ok(());
    };
    if name.len() > petrel_format::reader::NAME_MAX {
        return Err(EntryProblem::NameTooLong.into());
    }
    if name.starts_with(WHITEOUT_PREFIX) {
        return apply_op(tree, &components, &shown, Op::Whiteout, layer, warnings, record);
    }
    sink.set_path(&components);
    sink.set_data_position(entry.raw_file_position());
    let op = match kind {
        EntryType::Directory => Op::Directory(meta),
        EntryType::Regular | EntryType::Continuous => match sparse {
            None => {
                let size = entry.size();
                let pieces = sink.add_file(entry, size)?;
                Op::Node(meta, NodeKind::Regular { size, pieces })
            }
            Some(mut sparse) => {
                if sparse.map_in_data {
                    pax_sparse::read_map(&mut sparse, entry)?;
                }
                let size = sparse.size;
                let pieces = sink.add_sparse_file(&mut MappedSparse::new(sparse, entry), size)?;
                Op::Node(meta, NodeKind::Regular { size, pieces })
            }
        },
        EntryType::GNUSparse => {
            let size = entry.size();
            let pieces = sink.add_sparse_file(&mut SparseEntry(entry), size)?;
            Op::Node(meta, NodeKind::Regular { size, pieces })
        }
        EntryType::Symlink => {
            let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
            if target.is_empty() || target.len() > MAX_SYMLINK_TARGET || target.contains(&0) {
                return Err(EntryProblem::BadSymlinkTarget.into());
            }
            Op::Node(meta, NodeKind::Symlink(target))
        }
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or(EntryProblem::HardlinkWithoutTarget)?
                .into_owned();
            let target_components = clean_path(&target);
            check_path(&target_components)?;
            if target_components.is_empty() {
                return Err(EntryProblem::HardlinkToDirectory {
                    target: String::from_utf8_lossy(&target).into_owned(),
                }
                .into());
            }
            Op::Hardlink(target_components)
        }
        EntryType::Char | EntryType::Block => {
            let header = entry.header();
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            let kind = if kind == EntryType::Char {
                NodeKind::CharDevice { major, minor }
            } else {
                NodeKind::BlockDevice { major, minor }
            };
            Op::Node(meta, kind)
        }
        EntryType::Fifo => Op::Node(meta, NodeKind::Fifo),
        other => {
            warnings.push(format!(
                "layer {}: entry {shown:?} has unsupported type {other:?}; skipped",
                layer + 1
            ));
            return Ok(());
        }
    };
    apply_op(tree, &components, &shown, op, layer, warnings, record)
}

/// A GNU sparse tar entry, walked by its sparse map.
struct SparseEntry<'e, 'a, 'r>(&'e mut tar::Entry<'a, &'r mut dyn Read>);

impl SparseFile for SparseEntry<'_, '_, '_> {
    fn skip_hole(&mut self) -> u64 {
        self.0.skip_sparse_hole()
    }
    fn data_len(&self) -> u64 {
        self.0.sparse_data_len()
    }
    fn data(&mut self) -> &mut dyn Read {
        self.0
    }
}

/// An entry's PAX records (key, value), in order.
fn pax_records(entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<pax_sparse::PaxRecords, EntryProblem> {
    let mut records = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(EntryProblem::Io)? {
        for extension in extensions {
            let extension = extension.map_err(EntryProblem::Io)?;
            records.push((extension.key_bytes().to_vec(), extension.value_bytes().to_vec()));
        }
    }
    Ok(records)
}

/// Refuses a path the image's reader would refuse, or that no kernel could open:
/// NUL in a component, too long, too deep. (Component length is checked with the
/// whiteout handling, which names other entries.)
pub(crate) fn check_path(components: &[Vec<u8>]) -> Result<(), EntryProblem> {
    if components.iter().any(|c| c.contains(&0)) {
        return Err(EntryProblem::NulInName);
    }
    if components.len() > MAX_PATH_DEPTH {
        return Err(EntryProblem::PathTooDeep {
            depth: components.len(),
            max: MAX_PATH_DEPTH,
        });
    }
    let bytes = components.iter().map(|c| c.len() + 1).sum::<usize>();
    if bytes > MAX_PATH_BYTES {
        return Err(EntryProblem::PathTooLong {
            bytes,
            max: MAX_PATH_BYTES,
        });
    }
    Ok(())
}

/// Refuses an extended attribute the image's reader or the kernel would refuse.
fn check_xattr(name: &[u8], value: &[u8]) -> Result<(), EntryProblem> {
    let bad = |reason: String| EntryProblem::BadXattr {
        name: String::from_utf8_lossy(name).into_owned(),
        reason,
    };
    if name.is_empty() || name.contains(&0) {
        return Err(bad("empty name or NUL in the name".into()));
    }
    if name.len() > MAX_XATTR_NAME {
        return Err(bad(format!("name longer than {MAX_XATTR_NAME} bytes")));
    }
    if value.len() > MAX_XATTR_VALUE {
        return Err(bad(format!(
            "value of {} bytes is larger than {MAX_XATTR_VALUE}",
            value.len()
        )));
    }
    Ok(())
}

/// Metadata of a tar entry, with PAX records (mtime with fraction, uid, gid, xattrs)
/// taking precedence over the header fields.
fn entry_meta(entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<Meta, EntryError> {
    let header = entry.header();
    let io = |e| EntryError::Problem(EntryProblem::Io(e));
    // Blank numeric fields (all NUL or spaces) are read as 0, as GNU tar does.
    let old = header.as_old();
    let mut uid = blank_or(&old.uid, header.uid()).map_err(io)?;
    let mut gid = blank_or(&old.gid, header.gid()).map_err(io)?;
    let mut mtime = (blank_or(&old.mtime, header.mtime()).map_err(io)? as i64, 0u32);
    let permissions = header.mode().map_err(io)? & 0o7777;
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(io)? {
        for extension in extensions {
            let extension = extension.map_err(io)?;
            let (key, value) = (extension.key_bytes(), extension.value_bytes());
            if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
                check_xattr(xattr, value)?;
                xattrs.push((xattr.to_vec(), value.to_vec()));
                continue;
            }
            let text = std::str::from_utf8(value).unwrap_or("");
            match key {
                b"uid" => uid = text.parse().unwrap_or(uid),
                b"gid" => gid = text.parse().unwrap_or(gid),
                b"mtime" => mtime = parse_pax_time(text).unwrap_or(mtime),
                _ => {}
            }
        }
    }
    xattrs.sort();
    xattrs.dedup_by(|a, b| a.0 == b.0);
    let id = |v: u64| {
        u32::try_from(v).map_err(|_| {
            EntryError::Problem(EntryProblem::Io(std::io::Error::other(format!(
                "uid/gid {v} above 2^32"
            ))))
        })
    };
    Ok(Meta {
        permissions,
        uid: id(uid)?,
        gid: id(gid)?,
        mtime_sec: mtime.0,
        mtime_nsec: mtime.1,
        xattrs,
    })
}

fn blank_or(field: &[u8], parsed: std::io::Result<u64>) -> std::io::Result<u64> {
    if field.iter().all(|&b| b == 0 || b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

/// Parses a PAX time `[-]SECONDS[.FRACTION]` into seconds and nanoseconds (the
/// nanoseconds always count forward, so -1.5 is (-2, 500000000)).
pub fn parse_pax_time(text: &str) -> Option<(i64, u32)> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let seconds: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u32 = 0;
    for (i, b) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(match (negative, nanos) {
        (false, n) => (seconds, n),
        (true, 0) => (-seconds, 0),
        (true, n) => (-seconds - 1, 1_000_000_000 - n),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_pax_time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time("-86400"), Some((-86400, 0)));
        assert_eq!(
            parse_pax_time("4102444800.123456789123"),
            Some((4_102_444_800, 123_456_789))
        );
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.2e3"), None);
    }
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn an_archive_error_quoting_a_corrupt_header_is_escaped_and_cut_short() {
        let quoted = format!(
            "numeric field was not a number: \u{1b}[31m\u{7} when getting cksum for {}",
            "\u{fffd}x".repeat(300)
        );
        let shown = super::printable(std::io::Error::other(quoted)).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.contains("\\u{1b}[31m\\u{7}"), "{shown}");
        assert!(shown.chars().count() <= 210 && shown.ends_with('…'), "{shown}");
        let plain = super::printable(std::io::Error::other("unexpected end of file")).to_string();
        assert_eq!(plain, "unexpected end of file");
    }
}
