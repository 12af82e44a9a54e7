//! Reads a directory on local disk into the tree, as one layer. Names are taken as
//! they are: a directory is not an OCI layer, so `.wh.` files are ordinary files.

use crate::error::{BuildError, EntryProblem, Result};
use crate::sink::{ChunkSink, FileDataError};
use crate::tree::{Meta, Node, NodeId, NodeKind, Tree, ROOT};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Adds everything under `root` to the tree as layer `layer`.
pub fn apply_directory(
    tree: &mut Tree,
    sink: &mut ChunkSink,
    root: &Path,
    layer: usize,
    warnings: &mut Vec<String>,
) -> Result<u64> {
    let root_meta = fs::symlink_metadata(root).map_err(BuildError::io("stat", root))?;
    if !root_meta.is_dir() {
        return Err(BuildError::Invalid(format!("{} is not a directory", root.display())));
    }
    tree.node_mut(ROOT).meta = meta_of(root, &root_meta)?;
    let mut hardlinks: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(root.to_path_buf(), ROOT)];
    let mut count = 0u64;
    while let Some((dir_path, dir_node)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir_path)
            .map_err(BuildError::io("read directory", &dir_path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(BuildError::io("read directory", &dir_path))?;
        names.sort();
        for name in names {
            let path = dir_path.join(&name);
            let name = name.as_bytes().to_vec();
            let metadata = fs::symlink_metadata(&path).map_err(BuildError::io("stat", &path))?;
            let file_type = metadata.file_type();
            count += 1;
            if !file_type.is_dir() && metadata.nlink() > 1 {
                if let Some(&node) = hardlinks.get(&(metadata.dev(), metadata.ino())) {
                    tree.insert(dir_node, name, node, layer);
                    continue;
                }
            }
            let meta = meta_of(&path, &metadata)?;
            let kind = if file_type.is_dir() {
                NodeKind::Directory(BTreeMap::new())
            } else if file_type.is_file() {
                let mut file = fs::File::open(&path).map_err(BuildError::io("open", &path))?;
                let pieces = sink.add_file(&mut file, metadata.len()).map_err(|e| match e {
                    FileDataError::Input(problem) => bad_path(&path, layer, problem),
                    FileDataError::Build(b) => b,
                })?;
                NodeKind::Regular {
                    size: metadata.len(),
                    pieces,
                }
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(BuildError::io("read link", &path))?;
                NodeKind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if file_type.is_char_device() || file_type.is_block_device() {
                let rdev = metadata.rdev();
                let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
                if file_type.is_char_device() {
                    NodeKind::CharDevice { major, minor }
                } else {
                    NodeKind::BlockDevice { major, minor }
                }
            } else if file_type.is_fifo() {
                NodeKind::Fifo
            } else {
                warnings.push(format!(
                    "{}: sockets cannot be stored in an image; skipped",
                    path.display()
                ));
                continue;
            };
            let is_dir = matches!(kind, NodeKind::Directory(_));
            let id = tree.add_node(Node { meta, kind });
            tree.insert(dir_node, name, id, layer);
            if is_dir {
                stack.push((path, id));
            } else if metadata.nlink() > 1 {
                hardlinks.insert((metadata.dev(), metadata.ino()), id);
            }
        }
    }
    Ok(count)
}

fn bad_path(path: &Path, layer: usize, problem: EntryProblem) -> BuildError {
    BuildError::BadEntry {
        layer,
        path: path.display().to_string(),
        problem,
    }
}

fn meta_of(path: &Path, metadata: &Metadata) -> Result<Meta> {
    Ok(Meta {
        permissions: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        mtime_sec: metadata.mtime(),
        mtime_nsec: metadata.mtime_nsec() as u32,
        xattrs: read_xattrs(path).map_err(BuildError::io("read xattrs of", path))?,
    })
}

/// All extended attributes of `path` (not following a final symlink), sorted by name.
pub fn read_xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match read_growing(|buf| rustix::fs::llistxattr(path, buf)) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut xattrs = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c_name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        let value = read_growing(|buf| rustix::fs::lgetxattr(path, c_name.as_c_str(), buf))?;
        xattrs.push((name.to_vec(), value));
    }
    xattrs.sort();
    Ok(xattrs)
}

/// Calls `read` with ever larger buffers until the result fits (xattr lists and
/// values report ERANGE when the buffer is too small).
fn read_growing(mut read: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> std::io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; 4096];
    loop {
        match read(&mut buffer[..]) {
            Ok(len) if len < buffer.len() => {
                buffer.truncate(len);
                return Ok(buffer);
            }
            Ok(_) | Err(rustix::io::Errno::RANGE) if buffer.len() < (1 << 24) => {
                let larger = buffer.len() * 4;
                buffer.resize(larger, 0);
            }
            Ok(len) => {
                buffer.truncate(len);
                return Ok(buffer);
            }
            Err(e) => return Err(e.into()),
        }
    }
}
