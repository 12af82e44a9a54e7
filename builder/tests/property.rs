//! Random layer stacks (files, dirs, symlinks, hardlinks, whiteouts, opaque dirs)
//! → build → unpack is identical to the reference merge of the same layers.

mod common;

use common::*;
use petrel_builder::BuildOptions;
use petrel_fixtures::layer_spec::{reference_merge, write_layer, Op};
use petrel_fixtures::layer_writer::EntryMeta;
use petrel_fixtures::rng::Rng;
use petrel_fixtures::snapshot::Kind;
use proptest::prelude::*;

/// An operation with its choices still as numbers; `materialize` makes it valid.
#[derive(Debug, Clone)]
enum RawOp {
    File {
        dir: u8,
        leaf: u8,
        size: u8,
        mode: u8,
        seed: u64,
    },
    Dir {
        dir: u8,
        mode: u8,
    },
    Symlink {
        dir: u8,
        leaf: u8,
        target: u8,
    },
    Hardlink {
        dir: u8,
        leaf: u8,
        target: u8,
    },
    Whiteout {
        dir: u8,
        name: u8,
    },
    Opaque {
        dir: u8,
    },
    Root {
        mode: u8,
    },
}

const DIRS: [&str; 5] = ["", "d0", "d1", "d0/d0", "d0/d1"];
const LEAVES: [&str; 3] = ["f0", "f1", "f2"];
const MODES: [u32; 4] = [0o644, 0o755, 0o600, 0o4755];

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    prop_oneof![
        4 => (0..5u8, 0..3u8, 0..6u8, 0..4u8, any::<u64>()).prop_map(|(dir, leaf, size, mode, seed)| RawOp::File { dir, leaf, size, mode, seed }),
        2 => (1..5u8, 0..4u8).prop_map(|(dir, mode)| RawOp::Dir { dir, mode }),
        1 => (0..5u8, 0..3u8, 0..4u8).prop_map(|(dir, leaf, target)| RawOp::Symlink { dir, leaf, target }),
        2 => (0..5u8, 0..3u8, 0..15u8).prop_map(|(dir, leaf, target)| RawOp::Hardlink { dir, leaf, target }),
        2 => (0..5u8, 0..5u8).prop_map(|(dir, name)| RawOp::Whiteout { dir, name }),
        1 => (1..5u8).prop_map(|dir| RawOp::Opaque { dir }),
        1 => (0..4u8).prop_map(|mode| RawOp::Root { mode }),
    ]
}

fn file_size(code: u8) -> usize {
    [0, 17, 3000, 70_000, 150_000, 300_000][code as usize]
}

/// Turns raw choices into valid operations: hardlinks only to existing files.
fn materialize(raw_layers: &[Vec<RawOp>]) -> Vec<Vec<Op>> {
    let mut layers: Vec<Vec<Op>> = Vec::new();
    for raw in raw_layers {
        layers.push(Vec::new());
        for op in raw {
            let op = match *op {
                RawOp::File {
                    dir,
                    leaf,
                    size,
                    mode,
                    seed,
                } => Op::File {
                    path: join(DIRS[dir as usize], LEAVES[leaf as usize]),
                    meta: EntryMeta {
                        mode: MODES[mode as usize],
                        mtime: 1_700_000_000 + seed as i64 % 1000,
                        ..EntryMeta::default()
                    },
                    data: Rng::new(seed).mixed(file_size(size)),
                },
                RawOp::Dir { dir, mode } => Op::Dir {
                    path: DIRS[dir as usize].into(),
                    meta: EntryMeta::mode(MODES[mode as usize] & 0o777 | 0o700),
                },
                RawOp::Symlink { dir, leaf, target } => Op::Symlink {
                    path: join(DIRS[dir as usize], LEAVES[leaf as usize]),
                    target: ["f0", "../d1/f1", "/etc/passwd", "missing"][target as usize].into(),
                },
                RawOp::Hardlink { dir, leaf, target } => {
                    let path = join(DIRS[dir as usize], LEAVES[leaf as usize]);
                    let target = join(DIRS[target as usize % 5], LEAVES[target as usize % 3]);
                    let now = reference_merge(&layers);
                    match now.get(target.as_bytes()) {
                        Some(e) if e.kind != Kind::Dir && target != path => Op::Hardlink { path, target },
                        _ => continue,
                    }
                }
                RawOp::Whiteout { dir, name } => {
                    let names = ["f0", "f1", "f2", "d0", "d1"];
                    Op::Whiteout {
                        dir: DIRS[dir as usize].into(),
                        name: names[name as usize].into(),
                    }
                }
                RawOp::Opaque { dir } => Op::Opaque {
                    dir: DIRS[dir as usize].into(),
                },
                RawOp::Root { mode } => Op::Dir {
                    path: String::new(),
                    meta: EntryMeta::mode(MODES[mode as usize] | 0o700),
                },
            };
            layers.last_mut().expect("pushed").push(op);
        }
    }
    layers
}

/// Directories named by files' paths must not be files at the same time: drop
/// layers' ops that would put a directory below a non-directory (the builder
/// rejects that; the oracle does not model it).
fn parents_are_dirs(layers: &[Vec<Op>]) -> bool {
    let merged_paths = |layers: &[Vec<Op>]| reference_merge(layers);
    for i in 0..layers.len() {
        for j in 0..layers[i].len() {
            let mut prefix: Vec<Vec<Op>> = layers[..i].to_vec();
            prefix.push(layers[i][..j].to_vec());
            let tree = merged_paths(&prefix);
            let path = match &layers[i][j] {
                Op::File { path, .. } | Op::Symlink { path, .. } | Op::Hardlink { path, .. } | Op::Dir { path, .. } => {
                    path
                }
                Op::Whiteout { dir, .. } | Op::Opaque { dir } => dir,
                _ => continue,
            };
            let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            for k in 1..=parts.len() {
                let parent = parts[..k].join("/");
                let is_last = k == parts.len();
                let needs_dir = !is_last || matches!(layers[i][j], Op::Whiteout { .. } | Op::Opaque { .. });
                if needs_dir && tree.get(parent.as_bytes()).is_some_and(|e| e.kind != Kind::Dir) {
                    return false;
                }
            }
        }
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn build_then_unpack_matches_the_reference_merge(
        raw in prop::collection::vec(prop::collection::vec(raw_op(), 1..14), 1..5),
        cdc in any::<bool>(),
    ) {
        let layers = materialize(&raw);
        prop_assume!(parents_are_dirs(&layers));
        let tars: Vec<Vec<u8>> = layers.iter().enumerate().map(|(i, ops)| write_layer(ops, if i % 2 == 1 { "./" } else { "" })).collect();
        let dir = tempfile::tempdir().unwrap();
        let options = BuildOptions {
            chunker: if cdc { "cdc:4K:16K:64K".parse().unwrap() } else { "fixed:64K".parse().unwrap() },
            ..BuildOptions::default()
        };
        let (image, _) = build_layers(dir.path(), &tars, options).unwrap();
        let actual = unpack_and_scan(&image, dir.path(), "out");
        assert_same_tree(&reference_merge(&layers), &actual);
    }
}

/// Builds `tars` as `petrel convert` does, sealing a blob at each layer's end and
/// every `seal_every` bytes within one, with `prefetch`.
fn build_sealed(
    dir: &std::path::Path,
    tars: &[Vec<u8>],
    prefetch: Vec<petrel_format::profile::ProfileEntry>,
    seal_every: u64,
) -> std::path::PathBuf {
    let image = dir.join("image");
    let options = BuildOptions {
        chunker: "cdc:4K:16K:64K".parse().unwrap(),
        prefetch,
        ..BuildOptions::default()
    };
    let mut builder = petrel_builder::ImageBuilder::new(options, &image).unwrap();
    let (sealed, _blobs) = std::sync::mpsc::channel();
    for (i, tar) in tars.iter().enumerate() {
        builder.auto_seal(seal_every, sealed.clone()).unwrap();
        builder.add_layer(&tar[..]).unwrap();
        if i + 1 < tars.len() {
            builder.seal().unwrap();
        }
    }
    builder.finish().unwrap();
    image
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// With a profile naming some paths (files, hardlinks, symlinks, directories,
    /// a pattern, whatever the layers made of them), layers sealed into blobs as
    /// they come still read back as the reference merge, and every chunk of a
    /// profiled regular file lies in the prefetch region of the blob the build
    /// ended with, whether it was held back or copied there.
    #[test]
    fn sealed_builds_with_a_profile_read_back_and_keep_the_profiled_files_in_the_region(
        raw in prop::collection::vec(prop::collection::vec(raw_op(), 1..14), 1..5),
        profiled in prop::collection::vec((0..5u8, 0..4u8), 1..5),
        seal_every in prop_oneof![Just(1u64), Just(100_000u64), Just(1u64 << 40)],
    ) {
        use petrel_format::profile::ProfileEntry;
        use petrel_format::reader::SegmentSource;
        let layers = materialize(&raw);
        prop_assume!(parents_are_dirs(&layers));
        let tars: Vec<Vec<u8>> = layers.iter().map(|ops| write_layer(ops, "")).collect();
        let paths: Vec<String> = profiled
            .iter()
            .map(|&(dir, leaf)| match leaf {
                3 => DIRS[dir as usize].to_string(),
                _ => join(DIRS[dir as usize], LEAVES[leaf as usize]),
            })
            .collect();
        let mut prefetch: Vec<ProfileEntry> = paths.iter().map(|p| ProfileEntry::new(p.as_bytes(), None)).collect();
        prefetch.push(ProfileEntry::new(b"d1/*", None));
        let dir = tempfile::tempdir().unwrap();
        let image = build_sealed(dir.path(), &tars, prefetch, seal_every);
        let actual = unpack_and_scan(&image, dir.path(), "out");
        assert_same_tree(&reference_merge(&layers), &actual);

        let bytes = std::fs::read(image.join("bootstrap")).unwrap();
        let bootstrap = petrel_format::Bootstrap::open(&bytes).unwrap();
        let region_end = bootstrap.blobs().next().map(|b| b.unwrap().prefetch_end);
        for entry in bootstrap.walk().map(Result::unwrap) {
            let path = String::from_utf8_lossy(&entry.path).to_string();
            let named = paths.iter().any(|p| p.is_empty() || path == *p || path.starts_with(&format!("{p}/")))
                || (path.starts_with("d1/") && !path[3..].contains('/'));
            if !named || entry.inode.kind().unwrap() != petrel_format::FileKind::Regular {
                continue;
            }
            for segment in bootstrap.segments(&entry.inode, 0, entry.inode.size()).unwrap() {
                if let SegmentSource::Chunk { index, .. } = segment.source {
                    let chunk = bootstrap.chunk(index).unwrap();
                    prop_assert_eq!(chunk.blob_index, 0, "{}", path);
                    prop_assert!(chunk.compressed_offset < region_end.unwrap(), "{}", path);
                }
            }
        }
    }
}
