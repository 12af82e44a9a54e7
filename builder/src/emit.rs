//! Writes the finished tree: numbers inodes breadth-first, orders chunks (prefetch
//! files first, then depth first through the tree), assembles the blob from the spool, and writes the
//! bootstrap. Chunks no surviving file references are left out.

use crate::dict::DictBlob;
use crate::error::{BuildError, Result};
use crate::pipeline::ChunkPlace;
use crate::sink::SinkOutput;
use crate::tree::{clean_path, NodeId, NodeKind, PieceSource, Tree, ROOT};
use petrel_format::features::{BLOB_COMPRESSOR_ZSTD_CHUNKS, CHUNK_FLAG_ZSTD};
use petrel_format::image_dir::ImageDir;
use petrel_format::layer_tar;
use petrel_format::layout::*;
use petrel_format::profile::ProfileEntry;
use petrel_format::reader::mode_bits::*;
use petrel_format::{BootstrapWriter, SuperblockParams};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmitSummary {
    pub inodes: u32,
    pub chunks: u32,
    pub blob: Option<BlobSummary>,
    /// Blobs of the chunk dictionary that the image references (not written here).
    pub dict_blobs: Vec<BlobSummary>,
    pub bootstrap_size: u64,
    /// sha256 of the bootstrap file (its digest as an OCI layer).
    pub bootstrap_sha256: String,
    pub prefetch_files: u32,
    pub prefetch_bytes: u64,
}

/// The blob that was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobSummary {
    pub digest: String,
    pub size: u64,
    pub uncompressed_size: u64,
}

/// Inode numbering of the reachable tree.
struct Numbering {
    /// Node of each inode, in inode order (inode N is `nodes[N - 1]`).
    nodes: Vec<NodeId>,
    ino_of: HashMap<NodeId, u32>,
    /// Directory node → parent inode.
    parent_of: HashMap<NodeId, u32>,
    links: HashMap<NodeId, u32>,
}

fn number_tree(tree: &Tree) -> Result<Numbering> {
    let mut n = Numbering {
        nodes: vec![ROOT],
        ino_of: HashMap::from([(ROOT, 1)]),
        parent_of: HashMap::from([(ROOT, 1)]),
        links: HashMap::new(),
    };
    let mut queue = VecDeque::from([ROOT]);
    while let Some(dir) = queue.pop_front() {
        let dir_ino = n.ino_of[&dir];
        for entry in tree.children(dir).into_iter().flat_map(|c| c.values()) {
            *n.links.entry(entry.node).or_default() += 1;
            if n.ino_of.contains_key(&entry.node) {
                continue;
            }
            let ino = u32::try_from(n.nodes.len() + 1).map_err(|_| BuildError::TooLarge {
                what: "more than 2^32 inodes",
            })?;
            n.nodes.push(entry.node);
            n.ino_of.insert(entry.node, ino);
            if matches!(tree.node(entry.node).kind, NodeKind::Directory(_)) {
                n.parent_of.insert(entry.node, dir_ino);
                queue.push_back(entry.node);
            }
        }
    }
    Ok(n)
}

pub use petrel_format::profile::glob_match;

/// The chunks of the prefetch files' wanted ranges, in prefetch order (repeats
/// included).
fn prefetch_chunks_in_order(
    tree: &Tree,
    prefetch: &[(NodeId, Option<Vec<[u64; 2]>>)],
    chunk_of_slot: &[u32],
) -> Vec<u32> {
    let mut out = Vec::new();
    for (node, ranges) in prefetch {
        if let NodeKind::Regular { pieces, .. } = &tree.node(*node).kind {
            let wanted = |p: &&crate::tree::Piece| {
                let (start, end) = (p.file_offset, p.file_offset + u64::from(p.length));
                ranges
                    .as_ref()
                    .is_none_or(|r| r.iter().any(|[a, b]| *a < end && start < *b))
            };
            out.extend(pieces.iter().filter(wanted).filter_map(|p| match p.source {
                PieceSource::Hole => None,
                PieceSource::Chunk { slot, .. } => Some(chunk_of_slot[slot as usize]),
            }));
        }
    }
    out
}

/// Every regular file once, depth first: a directory's files (in name order),
/// then each subdirectory's subtree (in name order).
fn files_depth_first(tree: &Tree) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        let mut subdirectories = Vec::new();
        for entry in tree.children(dir).into_iter().flat_map(|c| c.values()) {
            match tree.node(entry.node).kind {
                NodeKind::Regular { .. } if seen.insert(entry.node) => out.push(entry.node),
                NodeKind::Directory(_) if seen.insert(entry.node) => subdirectories.push(entry.node),
                _ => {}
            }
        }
        stack.extend(subdirectories.into_iter().rev());
    }
    out
}

/// Every regular file with its path, breadth-first.
fn all_files(tree: &Tree) -> Vec<(Vec<u8>, NodeId)> {
    let mut out = Vec::new();
    let mut queue = VecDeque::from([(Vec::new(), ROOT)]);
    while let Some((path, id)) = queue.pop_front() {
        for (name, entry) in tree.children(id).into_iter().flatten() {
            let child = if path.is_empty() {
                name.clone()
            } else {
                [&path[..], b"/", name].concat()
            };
            match tree.node(entry.node).kind {
                NodeKind::Directory(_) => queue.push_back((child, entry.node)),
                NodeKind::Regular { .. } => out.push((child, entry.node)),
                _ => {}
            }
        }
    }
    out
}

/// Files the prefetch entries name, in entry order, each with the byte ranges to
/// put first (None: the whole file). A directory stands for every file below it;
/// `*`, `?` and `**` patterns match file paths.
fn prefetch_nodes(
    tree: &mut Tree,
    entries: &[ProfileEntry],
    warnings: &mut Vec<String>,
) -> Vec<(NodeId, Option<Vec<[u64; 2]>>)> {
    use petrel_format::profile::{wildcards, MAX_EXPANSIONS, MAX_WILDCARDS};
    let mut out: Vec<(NodeId, Option<Vec<[u64; 2]>>)> = Vec::new();
    let mut files: Option<Vec<(Vec<u8>, NodeId)>> = None;
    // Patterns and directories searched so far: a stranger's profile (one kept in
    // the image `--prefetch-from` names) costs a bounded number of passes.
    let mut expansions = 0;
    // Entries passed over, beyond the few named in warnings: one line says how many.
    let (mut unsearched, mut missing) = (0usize, 0usize);
    for entry in entries {
        let Some(raw) = entry.path_bytes() else { continue };
        let path = raw.strip_prefix(b"/").unwrap_or(&raw).to_vec();
        let shown = String::from_utf8_lossy(&path).to_string();
        let wildcards = wildcards(&path);
        if wildcards > MAX_WILDCARDS {
            warnings.push(format!(
                "prefetch pattern {shown:?} has more than {MAX_WILDCARDS} wildcards; ignored"
            ));
            continue;
        }
        let node = (wildcards == 0)
            .then(|| tree.lookup(&clean_path(&path)).ok().flatten())
            .flatten();
        let expands = wildcards > 0 || node.is_some_and(|n| matches!(tree.node(n).kind, NodeKind::Directory(_)));
        if expands {
            expansions += 1;
            if expansions > MAX_EXPANSIONS {
                unsearched += 1;
                continue;
            }
        }
        if wildcards > 0 {
            let files = files.get_or_insert_with(|| all_files(tree));
            let before = out.len();
            out.extend(
                files
                    .iter()
                    .filter(|(p, _)| glob_match(&path, p))
                    .map(|(_, id)| (*id, None)),
            );
            if out.len() == before {
                warnings.push(format!("prefetch pattern {shown:?} matches no file"));
            }
            continue;
        }
        let Some(node) = node else {
            missing += 1;
            if missing <= NAMED_MISSES {
                warnings.push(format!("prefetch path {shown:?} is not in the image; ignored"));
            }
            continue;
        };
        let mut queue = VecDeque::from([node]);
        while let Some(id) = queue.pop_front() {
            match &tree.node(id).kind {
                NodeKind::Regular { .. } => out.push((id, entry.ranges.clone())),
                NodeKind::Directory(children) => queue.extend(children.values().map(|e| e.node)),
                _ => {}
            }
        }
    }
    if unsearched > 0 {
        warnings.push(format!(
            "{unsearched} prefetch entries naming directories or patterns past the first {MAX_EXPANSIONS} ignored"
        ));
    }
    if missing > NAMED_MISSES {
        warnings.push(format!(
            "{} more prefetch paths not in the image ignored",
            missing - NAMED_MISSES
        ));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|(id, _)| seen.insert(*id));
    out
}

/// Prefetch paths missing from the image that are named in warnings one by one.
const NAMED_MISSES: usize = 20;

/// Writes `<out>/blobs/sha256/<digest>` and `<out>/bootstrap`.
pub fn emit(
    tree: &mut Tree,
    data: SinkOutput,
    dict_blobs_known: &[DictBlob],
    prefetch_entries: &[ProfileEntry],
    params: SuperblockParams,
    out: &ImageDir,
    warnings: &mut Vec<String>,
) -> Result<EmitSummary> {
    let numbering = number_tree(tree)?;
    let prefetch = prefetch_nodes(tree, prefetch_entries, warnings);
    let mut data = data;
    let prefetch_order = prefetch_chunks_in_order(tree, &prefetch, &data.chunk_of_slot);
    // The prefetch set is read first and at once, so it must lie together: a
    // prefetch chunk a dictionary holds outside that blob's own prefetch region
    // (an image converted without this profile) is stored again in the new blob,
    // from this build's own copy. One inside it (the previous release, optimized
    // with the same profile) stays where it is.
    // Dictionary blobs whose prefetch region keeps some of this image's
    // prefetch chunks: the region stays one (and is prefetched) in this image.
    let mut regions_kept = std::collections::HashSet::new();
    for &chunk in &prefetch_order {
        let spooled = &mut data.collected.chunks[chunk as usize];
        if let ChunkPlace::Dict { blob, offset, own_copy } = spooled.place {
            if offset < dict_blobs_known[blob as usize].prefetch_end {
                regions_kept.insert(blob);
                continue;
            }
            let Some(copy) = own_copy else { continue };
            spooled.place = ChunkPlace::Spool {
                offset: copy.spool_offset,
            };
            spooled.flags = copy.flags;
            spooled.stored_size = copy.stored_size;
        }
    }
    let data = data;
    let chunk_of_piece = |source: &PieceSource| match source {
        PieceSource::Hole => None,
        PieceSource::Chunk { slot, .. } => Some(data.chunk_of_slot[*slot as usize]),
    };

    // Blob order: prefetch files' chunks first, then every file depth first, so
    // that a directory's files, and a package's whole subtree, lie together: a
    // program reads a package's files together, and its reads then merge into few
    // requests (inode order is breadth first, which puts each package's files of
    // one depth next to every other package's).
    let unique = &data.collected.chunks;
    let mut final_index = vec![u32::MAX; unique.len()];
    let mut blob_order: Vec<u32> = Vec::new();
    let mut placed = vec![false; unique.len()];
    let mut place = |chunk: u32, order: &mut Vec<u32>| {
        if !std::mem::replace(&mut placed[chunk as usize], true) {
            order.push(chunk);
        }
    };
    for chunk in prefetch_order {
        place(chunk, &mut blob_order);
    }
    let prefetch_chunks = blob_order.len();
    for node in files_depth_first(tree) {
        if let NodeKind::Regular { pieces, .. } = &tree.node(node).kind {
            pieces
                .iter()
                .filter_map(|p| chunk_of_piece(&p.source))
                .for_each(|c| place(c, &mut blob_order));
        }
    }

    // The chunk table: chunks of the new blob in blob order, then chunks that stay
    // in dictionary blobs, grouped by blob in offset order (so neighbours merge).
    let is_new = |c: &u32| matches!(unique[*c as usize].place, ChunkPlace::Spool { .. });
    let prefetch_new = blob_order[..prefetch_chunks].iter().filter(|c| is_new(c)).count();
    let (new_chunks, mut dict_chunks): (Vec<u32>, Vec<u32>) = blob_order.iter().partition(|c| is_new(c));
    let mut dict_rank: HashMap<u32, u32> = HashMap::new();
    for c in &dict_chunks {
        if let ChunkPlace::Dict { blob, .. } = unique[*c as usize].place {
            let next = dict_rank.len() as u32;
            dict_rank.entry(blob).or_insert(next);
        }
    }
    let dict_key = |c: &u32| match unique[*c as usize].place {
        ChunkPlace::Dict { blob, offset, .. } => (dict_rank[&blob], offset),
        ChunkPlace::Spool { .. } | ChunkPlace::Window => (u32::MAX, 0),
    };
    dict_chunks.sort_by_key(dict_key);
    for (position, chunk) in new_chunks.iter().chain(&dict_chunks).enumerate() {
        final_index[*chunk as usize] = position as u32;
    }

    let mut writer = BootstrapWriter::default();
    let blob = if new_chunks.is_empty() {
        None
    } else {
        Some(write_blob(&data, &new_chunks, prefetch_new, out, &mut writer)?)
    };
    let first_dict_blob = u32::from(blob.is_some());
    let mut dict_blobs = vec![None; dict_rank.len()];
    let mut blob_of_rank = vec![0u32; dict_rank.len()];
    for (&blob_id, &rank) in &dict_rank {
        dict_blobs[rank as usize] = Some(&dict_blobs_known[blob_id as usize]);
        blob_of_rank[rank as usize] = blob_id;
    }
    for chunk in &dict_chunks {
        let spooled = &unique[*chunk as usize];
        let (rank, offset) = dict_key(chunk);
        writer.chunks.push(ChunkRecord {
            digest: spooled.digest,
            blob_index: (first_dict_blob + rank).into(),
            flags: (spooled.flags & CHUNK_FLAG_ZSTD).into(),
            compressed_offset: offset.into(),
            compressed_size: spooled.stored_size.into(),
            uncompressed_size: spooled.uncompressed_size.into(),
        });
    }
    let mut referenced = Vec::new();
    for (rank, dict_blob) in dict_blobs.iter().enumerate() {
        let dict_blob = dict_blob.expect("every rank filled");
        let count = dict_chunks.iter().filter(|c| dict_key(c).0 == rank as u32).count();
        writer.blobs.push(BlobRecord {
            digest: dict_blob.digest,
            compressed_size: dict_blob.compressed_size.into(),
            uncompressed_size: dict_blob.uncompressed_size.into(),
            chunk_count: (count as u32).into(),
            compressor: BLOB_COMPRESSOR_ZSTD_CHUNKS.into(),
            // The blob's own region where it keeps prefetch chunks of this image
            // (above): a release before laid them out there, and they are
            // prefetched from there.
            prefetch_end: if regions_kept.contains(&blob_of_rank[rank]) {
                dict_blob.prefetch_end
            } else {
                0
            }
            .into(),
        });
        referenced.push(BlobSummary {
            digest: format!("sha256:{}", hex::encode(dict_blob.digest)),
            size: dict_blob.compressed_size,
            uncompressed_size: dict_blob.uncompressed_size,
        });
    }

    for node_id in &numbering.nodes {
        let node = tree.node(*node_id);
        let mut record = InodeRecord::default();
        let (type_bits, size) = match &node.kind {
            NodeKind::Directory(entries) => {
                record.data_index.set(writer.dirents.len() as u64);
                record.data_count.set(entries.len() as u32);
                record.parent_ino.set(numbering.parent_of[node_id]);
                let subdirs = entries
                    .values()
                    .filter(|e| matches!(tree.node(e.node).kind, NodeKind::Directory(_)))
                    .count();
                record.nlink.set(2 + subdirs as u32);
                for (name, entry) in entries {
                    writer.dirents.push(DirentRecord {
                        ino: numbering.ino_of[&entry.node].into(),
                        name_offset: writer.strings.intern(name)?.into(),
                        name_len: (name.len() as u16).into(),
                        reserved: 0.into(),
                    });
                }
                (S_IFDIR, 0)
            }
            NodeKind::Regular { size, pieces } => {
                record.data_index.set(writer.chunk_refs.len() as u64);
                record.data_count.set(pieces.len() as u32);
                for piece in pieces {
                    let (chunk_index, chunk_offset) = match piece.source {
                        PieceSource::Hole => (HOLE_CHUNK, 0),
                        PieceSource::Chunk { slot, offset } => {
                            (final_index[data.chunk_of_slot[slot as usize] as usize], offset)
                        }
                    };
                    writer.chunk_refs.push(ChunkRefRecord {
                        file_offset: piece.file_offset.into(),
                        chunk_index: chunk_index.into(),
                        chunk_offset: chunk_offset.into(),
                        length: piece.length.into(),
                    });
                }
                (S_IFREG, *size)
            }
            NodeKind::Symlink(target) => {
                record.data_index.set(u64::from(writer.strings.intern(target)?));
                record.data_count.set(target.len() as u32);
                (S_IFLNK, target.len() as u64)
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                record.rdev_major.set(*major);
                record.rdev_minor.set(*minor);
                let bits = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    S_IFCHR
                } else {
                    S_IFBLK
                };
                (bits, 0)
            }
            NodeKind::Fifo => (S_IFIFO, 0),
        };
        if !matches!(node.kind, NodeKind::Directory(_)) {
            record.nlink.set(numbering.links[node_id]);
        }
        record.mode.set(type_bits | (node.meta.permissions & PERMISSIONS));
        record.uid.set(node.meta.uid);
        record.gid.set(node.meta.gid);
        record.size.set(size);
        record.mtime_sec.set(node.meta.mtime_sec);
        record.mtime_nsec.set(node.meta.mtime_nsec);
        record.xattr_index.set(writer.xattrs.len() as u32);
        record.xattr_count.set(node.meta.xattrs.len() as u32);
        for (name, value) in &node.meta.xattrs {
            writer.xattrs.push(XattrRecord {
                name_offset: writer.strings.intern(name)?.into(),
                value_offset: writer.strings.intern(value)?.into(),
                value_len: (value.len() as u32).into(),
                name_len: (name.len() as u16).into(),
                reserved: 0.into(),
            });
        }
        writer.inodes.push(record);
    }
    for (node, _) in &prefetch {
        writer.prefetch.push(PrefetchRecord {
            ino: numbering.ino_of[node].into(),
        });
    }

    let summary_base = (
        writer.inodes.len() as u32,
        writer.chunks.len() as u32,
        writer.prefetch.len() as u32,
    );
    let bootstrap = writer.finish(params)?;
    let bootstrap_path = out.bootstrap_path();
    write_atomically(&bootstrap_path, &bootstrap)?;
    Ok(EmitSummary {
        inodes: summary_base.0,
        chunks: summary_base.1,
        prefetch_files: summary_base.2,
        prefetch_bytes: blob.as_ref().map_or(0, |(_, p)| *p),
        blob: blob.map(|(b, _)| b),
        dict_blobs: referenced,
        bootstrap_size: bootstrap.len() as u64,
        bootstrap_sha256: format!("sha256:{}", hex::encode(Sha256::digest(&bootstrap))),
    })
}

/// Copies the chunks from the spool into the blob in `order`, filling the chunk and
/// blob tables. Returns the blob and its prefetch region size.
fn write_blob(
    data: &SinkOutput,
    order: &[u32],
    prefetch_chunks: usize,
    out: &ImageDir,
    writer: &mut BootstrapWriter,
) -> Result<(BlobSummary, u64)> {
    let dir = out.blobs_dir();
    std::fs::create_dir_all(&dir).map_err(BuildError::io("create", &dir))?;
    let temp = tempfile::NamedTempFile::new_in(&dir).map_err(BuildError::io("create temporary blob in", &dir))?;
    let mut file = BufWriter::with_capacity(1 << 20, temp);
    let mut hasher = Sha256::new();
    // The blob is a one-entry tar layer (spec §14): its header needs the data size.
    let data_size: u64 = order
        .iter()
        .map(|&c| u64::from(data.collected.chunks[c as usize].stored_size))
        .sum();
    let header = layer_tar::header(layer_tar::BLOB_ENTRY, data_size);
    hasher.update(header);
    file.write_all(&header).map_err(BuildError::io("write", &dir))?;
    let mut offset = layer_tar::DATA_OFFSET;
    let mut uncompressed = 0u64;
    let mut prefetch_end = 0u64;
    let mut buffer = Vec::new();
    for (position, &chunk) in order.iter().enumerate() {
        let spooled = &data.collected.chunks[chunk as usize];
        let ChunkPlace::Spool { offset: spool_offset } = spooled.place else {
            unreachable!("only new chunks are written to the new blob")
        };
        buffer.resize(spooled.stored_size as usize, 0);
        data.collected
            .spool
            .read_exact_at(&mut buffer, spool_offset)
            .map_err(BuildError::io("read", "chunk spool"))?;
        hasher.update(&buffer);
        file.write_all(&buffer).map_err(BuildError::io("write", &dir))?;
        writer.chunks.push(ChunkRecord {
            digest: spooled.digest,
            blob_index: 0.into(),
            flags: (spooled.flags & CHUNK_FLAG_ZSTD).into(),
            compressed_offset: offset.into(),
            compressed_size: spooled.stored_size.into(),
            uncompressed_size: spooled.uncompressed_size.into(),
        });
        offset += u64::from(spooled.stored_size);
        uncompressed += u64::from(spooled.uncompressed_size);
        if position + 1 == prefetch_chunks {
            prefetch_end = offset;
        }
    }
    let trailer = vec![0u8; layer_tar::trailer_len(data_size) as usize];
    hasher.update(&trailer);
    file.write_all(&trailer).map_err(BuildError::io("write", &dir))?;
    let layer_size = layer_tar::layer_len(data_size);
    let digest: [u8; 32] = hasher.finalize().into();
    let temp = file
        .into_inner()
        .map_err(|e| BuildError::io("write", &dir)(e.into_error()))?;
    publish_mode(temp.as_file(), &dir)?;
    let path = out.blob_path(&digest);
    temp.persist(&path)
        .map_err(|e| BuildError::io("rename blob to", &path)(e.error))?;
    writer.blobs.push(BlobRecord {
        digest,
        compressed_size: layer_size.into(),
        uncompressed_size: uncompressed.into(),
        chunk_count: (order.len() as u32).into(),
        compressor: BLOB_COMPRESSOR_ZSTD_CHUNKS.into(),
        prefetch_end: prefetch_end.into(),
    });
    Ok((
        BlobSummary {
            digest: format!("sha256:{}", hex::encode(digest)),
            size: layer_size,
            uncompressed_size: uncompressed,
        },
        prefetch_end.saturating_sub(layer_tar::DATA_OFFSET),
    ))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(BuildError::io("create temporary file in", dir))?;
    temp.write_all(bytes).map_err(BuildError::io("write", path))?;
    publish_mode(temp.as_file(), path)?;
    temp.persist(path)
        .map_err(|e| BuildError::io("rename to", path)(e.error))?;
    Ok(())
}

/// Makes a finished file world-readable (temporary files start 0600) and durable.
fn publish_mode(file: &File, path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(BuildError::io("chmod", path))?;
    file.sync_all().map_err(BuildError::io("sync", path))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match(b"usr/lib/*.so", b"usr/lib/libc.so"));
        assert!(!glob_match(b"usr/lib/*.so", b"usr/lib/x/libc.so"));
        assert!(glob_match(b"usr/**/*.so", b"usr/lib/x/libc.so"));
        assert!(glob_match(b"**/app.py", b"app.py") && glob_match(b"**/app.py", b"srv/app/app.py"));
        assert!(glob_match(b"etc/?.conf", b"etc/a.conf") && !glob_match(b"etc/?.conf", b"etc/ab.conf"));
    }
}
