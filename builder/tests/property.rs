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
