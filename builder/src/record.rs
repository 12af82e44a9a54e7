//! Layer records (`format-spec.md` §16): one place where an entry, read from a
//! tar or from a record, is applied to the tree, and where it is recorded; and
//! the replay of a record as a layer.

use crate::dict::ChunkDict;
use crate::error::{BuildError, EntryProblem, Result};
use crate::layer::{check_path, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::sink::{ChunkSink, FileDataError, SinkOutput};
use crate::tree::{clean_path, Meta, Node, NodeKind, Piece, PieceSource, Tree, ROOT};
use petrel_format::layer_record::{
    LayerRecord, RecordBody, RecordChunk, RecordEncoding, RecordEntry, RecordPiece, RECORD_HOLE,
};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What one entry of a layer does to the tree.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// A directory entry naming the root: its metadata.
    Root(Meta),
    /// A whiteout or opaque marker (the path's last component is the `.wh.` name).
    Whiteout,
    Directory(Meta),
    /// A regular file, symlink, device or fifo.
    Node(Meta, NodeKind),
    /// Another name for the entry at these (cleaned) components.
    Hardlink(Vec<Vec<u8>>),
}

/// An applied entry, kept for the layer's record; file pieces still name
/// builder slots, resolved to chunks when the build finishes.
#[derive(Debug, Clone)]
pub struct Recorded {
    path: Vec<u8>,
    op: Op,
}

/// Why an entry could not be applied.
pub(crate) enum EntryError {
    Problem(EntryProblem),
    Build(BuildError),
}

impl From<EntryProblem> for EntryError {
    fn from(p: EntryProblem) -> Self {
        EntryError::Problem(p)
    }
}

impl From<FileDataError> for EntryError {
    fn from(e: FileDataError) -> Self {
        match e {
            FileDataError::Input(p) => EntryError::Problem(p),
            FileDataError::Build(b) => EntryError::Build(b),
        }
    }
}

/// Applies `op` at `components` (cleaned and checked; empty only for
/// [`Op::Root`]) as layer `layer`, and records it when `record` is given.
pub(crate) fn apply_op(
    tree: &mut Tree,
    components: &[Vec<u8>],
    shown: &str,
    op: Op,
    layer: usize,
    warnings: &mut Vec<String>,
    record: Option<&mut Vec<Recorded>>,
) -> Result<(), EntryError> {
    let kept = record.is_some().then(|| op.clone());
    match op {
        Op::Root(meta) => tree.node_mut(ROOT).meta = meta,
        Op::Whiteout => {
            let (name, parents) = components.split_last().expect("a whiteout has a name");
            let hidden = name
                .strip_prefix(WHITEOUT_PREFIX)
                .expect("a whiteout's name starts with .wh.");
            apply_whiteout(tree, parents, name, hidden, layer, warnings, shown)?;
        }
        Op::Directory(meta) => {
            let (name, parents) = components.split_last().expect("only the root has no name");
            let parent = tree.resolve_dir(parents, layer, true)?.expect("created when missing");
            match tree.entry(parent, name) {
                Some(existing) if matches!(tree.node(existing.node).kind, NodeKind::Directory(_)) => {
                    tree.node_mut(existing.node).meta = meta;
                    tree.insert(parent, name.clone(), existing.node, layer);
                }
                _ => {
                    let id = tree.add_node(Node {
                        meta,
                        kind: NodeKind::Directory(BTreeMap::new()),
                    });
                    tree.insert(parent, name.clone(), id, layer);
                }
            }
        }
        Op::Node(meta, kind) => {
            let (name, parents) = components.split_last().expect("only the root has no name");
            let parent = tree.resolve_dir(parents, layer, true)?.expect("created when missing");
            let id = tree.add_node(Node { meta, kind });
            tree.insert(parent, name.clone(), id, layer);
        }
        Op::Hardlink(target) => {
            let (name, parents) = components.split_last().expect("only the root has no name");
            let parent = tree.resolve_dir(parents, layer, true)?.expect("created when missing");
            let shown_target = String::from_utf8_lossy(&target.join(&b'/')).into_owned();
            let node = tree.lookup(&target)?.ok_or(EntryProblem::HardlinkTargetMissing {
                target: shown_target.clone(),
            })?;
            if matches!(tree.node(node).kind, NodeKind::Directory(_)) {
                return Err(EntryProblem::HardlinkToDirectory { target: shown_target }.into());
            }
            tree.insert(parent, name.clone(), node, layer);
        }
    }
    if let (Some(record), Some(op)) = (record, kept) {
        record.push(Recorded {
            path: components.join(&b'/'),
            op,
        });
    }
    Ok(())
}

fn apply_whiteout(
    tree: &mut Tree,
    parents: &[Vec<u8>],
    name: &[u8],
    hidden: &[u8],
    layer: usize,
    warnings: &mut Vec<String>,
    shown: &str,
) -> Result<(), EntryError> {
    if name == OPAQUE_MARKER {
        let dir = tree.resolve_dir(parents, layer, true)?.expect("created when missing");
        tree.make_opaque(dir, layer);
        return Ok(());
    }
    if hidden.starts_with(WHITEOUT_PREFIX) {
        warnings.push(format!(
            "layer {}: entry {shown:?} is aufs metadata; skipped",
            layer + 1
        ));
        return Ok(());
    }
    if !petrel_format::reader::is_valid_name(hidden) {
        warnings.push(format!(
            "layer {}: whiteout {shown:?} names no valid entry; skipped",
            layer + 1
        ));
        return Ok(());
    }
    if let Some(dir) = tree.resolve_dir(parents, layer, false)? {
        tree.whiteout(dir, hidden, layer);
    }
    Ok(())
}

/// Whether a build with `encoding`, dictionary `dict` and prefetch profile
/// `prefetch` can apply `record`: the same chunker, small-file limit and zstd
/// level, every chunk the record names in the dictionary, as large as the
/// record says, and every chunk of what the profile wants of its files in its
/// blob's prefetch region (a release before laid it out there; anywhere else, the
/// region of the new image would need the chunk's bytes, which a record lacks).
pub fn replayable(
    record: &LayerRecord,
    encoding: &RecordEncoding,
    dict: &ChunkDict,
    prefetch: &crate::prefetch_set::PrefetchSet,
) -> Result<(), String> {
    if record.encoding != *encoding {
        return Err(format!(
            "it was made with {:?}, this conversion uses {encoding:?}",
            record.encoding
        ));
    }
    for chunk in &record.chunks {
        match dict.chunks.get(&chunk.digest) {
            Some(known) if known.uncompressed_size == chunk.uncompressed_size => {}
            Some(_) => return Err(format!("chunk {} has another size", hex::encode(chunk.digest))),
            None => {
                return Err(format!(
                    "chunk {} is in none of the chunk dictionaries",
                    hex::encode(chunk.digest)
                ))
            }
        }
    }
    // What `LayerRecord::decode` checks of pieces, again for a record built in
    // memory: each names a chunk of the record, inside it, and they tile the file.
    for entry in &record.entries {
        let RecordBody::Regular { pieces, size, .. } = &entry.body else {
            continue;
        };
        let mut next = 0u64;
        for piece in pieces {
            let inside = piece.chunk == RECORD_HOLE
                || record.chunks.get(piece.chunk as usize).is_some_and(|chunk| {
                    u64::from(piece.chunk_offset) + u64::from(piece.length) <= u64::from(chunk.uncompressed_size)
                });
            if !inside || piece.file_offset != next || piece.length == 0 {
                return Err(format!(
                    "the pieces of {} do not tile it inside their chunks",
                    String::from_utf8_lossy(&entry.path)
                ));
            }
            next += u64::from(piece.length);
        }
        if next != *size {
            return Err(format!(
                "the pieces of {} cover {next} of its {size} bytes",
                String::from_utf8_lossy(&entry.path)
            ));
        }
    }
    if prefetch.is_empty() {
        return Ok(());
    }
    for entry in &record.entries {
        let RecordBody::Regular { pieces, .. } = &entry.body else {
            continue;
        };
        let wanted = prefetch.wanted(&clean_path(&entry.path));
        let outside = pieces.iter().any(|piece| {
            piece.chunk != RECORD_HOLE
                && wanted.covers(piece.file_offset, u64::from(piece.length))
                && dict
                    .chunks
                    .get(&record.chunks[piece.chunk as usize].digest)
                    .is_none_or(|known| known.compressed_offset >= dict.blobs[known.blob as usize].prefetch_end)
        });
        if outside {
            return Err(format!(
                "the prefetch profile wants {}, whose chunks lie outside a prefetch region",
                String::from_utf8_lossy(&entry.path)
            ));
        }
    }
    Ok(())
}

/// Applies a layer's record as layer `layer`: the entries it lists, in order,
/// each file's data as the dictionary chunks it names. Returns the entries applied.
pub(crate) fn apply_record(
    tree: &mut Tree,
    sink: &mut ChunkSink,
    record: &LayerRecord,
    layer: usize,
    warnings: &mut Vec<String>,
    mut recorded: Option<&mut Vec<Recorded>>,
) -> Result<u64> {
    let mut slots: Vec<Option<u32>> = vec![None; record.chunks.len()];
    for entry in &record.entries {
        let shown = String::from_utf8_lossy(&entry.path).into_owned();
        let bad = |problem| BuildError::BadEntry {
            layer,
            path: shown.clone(),
            problem,
        };
        let applied = replay_entry(sink, record, entry, &mut slots).and_then(|(components, op)| {
            apply_op(tree, &components, &shown, op, layer, warnings, recorded.as_deref_mut())
        });
        match applied {
            Ok(()) => {}
            Err(EntryError::Problem(problem)) => return Err(bad(problem)),
            Err(EntryError::Build(e)) => return Err(e),
        }
    }
    Ok(record.entries.len() as u64)
}

fn replay_entry(
    sink: &mut ChunkSink,
    record: &LayerRecord,
    entry: &RecordEntry,
    slots: &mut [Option<u32>],
) -> Result<(Vec<Vec<u8>>, Op), EntryError> {
    let components = clean_path(&entry.path);
    check_path(&components)?;
    // What `LayerRecord::decode` checks, again for a record built in memory:
    // only a directory names the root, and a whiteout's name starts with `.wh.`.
    let malformed = |what: &str| EntryError::Problem(EntryProblem::Io(std::io::Error::other(what.to_string())));
    let is_directory = matches!(entry.body, RecordBody::Directory(_));
    match components.last() {
        None if !is_directory => return Err(malformed("only a directory may name the root")),
        Some(name) if matches!(entry.body, RecordBody::Whiteout) && !name.starts_with(WHITEOUT_PREFIX) => {
            return Err(malformed("a whiteout whose name does not start with .wh."))
        }
        _ => {}
    }
    let op = match &entry.body {
        RecordBody::Directory(meta) if components.is_empty() => Op::Root(meta.clone()),
        RecordBody::Directory(meta) => Op::Directory(meta.clone()),
        RecordBody::Regular { meta, size, pieces } => {
            let pieces = sink
                .add_recorded_file(pieces, &record.chunks, slots, *size)
                .map_err(FileDataError::Build)?;
            Op::Node(meta.clone(), NodeKind::Regular { size: *size, pieces })
        }
        RecordBody::Symlink { meta, target } => {
            if target.is_empty() || target.len() > crate::layer::MAX_SYMLINK_TARGET || target.contains(&0) {
                return Err(EntryProblem::BadSymlinkTarget.into());
            }
            Op::Node(meta.clone(), NodeKind::Symlink(target.clone()))
        }
        RecordBody::Hardlink { target } => Op::Hardlink(clean_path(target)),
        RecordBody::CharDevice { meta, major, minor } => Op::Node(
            meta.clone(),
            NodeKind::CharDevice {
                major: *major,
                minor: *minor,
            },
        ),
        RecordBody::BlockDevice { meta, major, minor } => Op::Node(
            meta.clone(),
            NodeKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
        ),
        RecordBody::Fifo(meta) => Op::Node(meta.clone(), NodeKind::Fifo),
        RecordBody::Whiteout => Op::Whiteout,
    };
    Ok((components, op))
}

/// The chunks the finished image holds: those a reachable file names.
fn live_chunks(tree: &Tree, chunk_of_slot: &[u32]) -> HashSet<u32> {
    let mut live = HashSet::new();
    let mut seen = HashSet::from([ROOT]);
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        for entry in tree.children(dir).into_iter().flat_map(|c| c.values()) {
            if !seen.insert(entry.node) {
                continue;
            }
            match &tree.node(entry.node).kind {
                NodeKind::Directory(_) => stack.push(entry.node),
                NodeKind::Regular { pieces, .. } => live.extend(pieces.iter().filter_map(|p| match p.source {
                    PieceSource::Chunk { slot, .. } => Some(chunk_of_slot[slot as usize]),
                    PieceSource::Hole => None,
                })),
                _ => {}
            }
        }
    }
    live
}

/// Each layer's record, or None where the image does not hold every
/// chunk the layer's files name (a later layer replaced or deleted some): a
/// record is only ever applied with the image it came with as the dictionary.
pub(crate) fn finish_records(
    layers: &[Option<Vec<Recorded>>],
    tree: &Tree,
    data: &SinkOutput,
    encoding: RecordEncoding,
) -> Vec<Option<LayerRecord>> {
    let live = live_chunks(tree, &data.chunk_of_slot);
    layers
        .iter()
        .map(|entries| {
            let entries = entries.as_ref()?;
            let mut chunks: Vec<RecordChunk> = Vec::new();
            let mut index_of: HashMap<u32, u32> = HashMap::new();
            let mut out = Vec::with_capacity(entries.len());
            for entry in entries {
                let body = match &entry.op {
                    Op::Root(meta) | Op::Directory(meta) => RecordBody::Directory(meta.clone()),
                    Op::Whiteout => RecordBody::Whiteout,
                    Op::Hardlink(target) => RecordBody::Hardlink {
                        target: target.join(&b'/'),
                    },
                    Op::Node(meta, kind) => {
                        let meta = meta.clone();
                        match kind {
                            NodeKind::Regular { size, pieces } => {
                                let mut recorded = Vec::with_capacity(pieces.len());
                                for piece in pieces {
                                    recorded.push(record_piece(piece, data, &live, &mut chunks, &mut index_of)?);
                                }
                                RecordBody::Regular {
                                    meta,
                                    size: *size,
                                    pieces: recorded,
                                }
                            }
                            NodeKind::Symlink(target) => RecordBody::Symlink {
                                meta,
                                target: target.clone(),
                            },
                            NodeKind::CharDevice { major, minor } => RecordBody::CharDevice {
                                meta,
                                major: *major,
                                minor: *minor,
                            },
                            NodeKind::BlockDevice { major, minor } => RecordBody::BlockDevice {
                                meta,
                                major: *major,
                                minor: *minor,
                            },
                            NodeKind::Fifo => RecordBody::Fifo(meta),
                            NodeKind::Directory(_) => unreachable!("directories are Op::Directory"),
                        }
                    }
                };
                out.push(RecordEntry {
                    path: entry.path.clone(),
                    body,
                });
            }
            Some(LayerRecord {
                encoding,
                chunks,
                entries: out,
            })
        })
        .collect()
}

/// A piece as the record names it; None when its chunk is not in the image.
fn record_piece(
    piece: &Piece,
    data: &SinkOutput,
    live: &HashSet<u32>,
    chunks: &mut Vec<RecordChunk>,
    index_of: &mut HashMap<u32, u32>,
) -> Option<RecordPiece> {
    let (chunk, chunk_offset) = match piece.source {
        PieceSource::Hole => (RECORD_HOLE, 0),
        PieceSource::Chunk { slot, offset } => {
            let unique = data.chunk_of_slot[slot as usize];
            if !live.contains(&unique) {
                return None;
            }
            let index = *index_of.entry(unique).or_insert_with(|| {
                let spooled = &data.collected.chunks[unique as usize];
                chunks.push(RecordChunk {
                    digest: spooled.digest,
                    uncompressed_size: spooled.uncompressed_size,
                });
                (chunks.len() - 1) as u32
            });
            (index, offset)
        }
    };
    Some(RecordPiece {
        file_offset: piece.file_offset,
        chunk,
        chunk_offset,
        length: piece.length,
    })
}
