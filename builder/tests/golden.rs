//! Golden bootstraps of format v1: today's reader opens them and reads the same
//! tree, and today's builder still writes them byte for byte from the fixtures (so
//! the writer, the chunkers' cut points and the codec cannot drift unnoticed).
//! `PETREL_BLESS=1 cargo test -p petrel-builder --test golden` rewrites them.

mod common;

use common::build_layers;
use petrel_builder::BuildOptions;
use petrel_fixtures::edge_cases::edge_case_layers;
use petrel_format::reader::{read_everything, SegmentSource};
use petrel_format::{Bootstrap, FileKind};
use std::fmt::Write;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden/v1")
}

/// The tree listing plus every file's chunk refs (which pin the cut points).
fn dump(bytes: &[u8]) -> String {
    let bootstrap = Bootstrap::open(bytes).unwrap();
    let mut out = petrel_builder::inspect::listing(&bootstrap).unwrap();
    for entry in bootstrap.walk() {
        let entry = entry.unwrap();
        if entry.inode.kind().unwrap() != FileKind::Regular {
            continue;
        }
        let _ = write!(out, "refs /{}:", String::from_utf8_lossy(&entry.path));
        for s in bootstrap.segments(&entry.inode, 0, entry.inode.size()).unwrap() {
            match s.source {
                SegmentSource::Hole => write!(out, " {}+{}=hole", s.file_offset, s.length),
                SegmentSource::Chunk { index, chunk_offset } => {
                    let digest = hex::encode(&bootstrap.chunk(index).unwrap().digest[..6]);
                    write!(out, " {}+{}=c{index}@{chunk_offset}:{digest}", s.file_offset, s.length)
                }
            }
            .unwrap();
        }
        out.push('\n');
    }
    out
}

fn golden(name: &str, chunker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let options = BuildOptions {
        chunker: chunker.parse().unwrap(),
        prefetch: vec![
            petrel_format::profile::ProfileEntry::new(b"usr/bin/python3", None),
            petrel_format::profile::ProfileEntry::new(b"etc", None),
        ],
        ..BuildOptions::default()
    };
    let (image, _) = build_layers(dir.path(), &layers, options).unwrap();
    let built = std::fs::read(image.join("bootstrap")).unwrap();
    let bootstrap_path = golden_dir().join(format!("{name}.bootstrap"));
    let dump_path = golden_dir().join(format!("{name}.dump.txt"));
    if std::env::var_os("PETREL_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&bootstrap_path, &built).unwrap();
        std::fs::write(&dump_path, dump(&built)).unwrap();
    }
    let stored = std::fs::read(&bootstrap_path).expect("golden bootstrap (bless with PETREL_BLESS=1)");
    let stored_dump = std::fs::read_to_string(&dump_path).unwrap();
    // Today's reader reads the stored v1 bootstrap and sees the stored tree.
    let visited = read_everything(&stored, true).unwrap();
    assert!(visited.entries > 100);
    assert_eq!(dump(&stored), stored_dump);
    // Today's builder writes the same bytes.
    if built != stored {
        let diff: Vec<String> = dump(&built)
            .lines()
            .zip(stored_dump.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .map(|(a, b)| format!("built:  {a}\ngolden: {b}"))
            .collect();
        panic!("builder output drifted from golden {name}:\n{}", diff.join("\n"));
    }
}

#[test]
fn golden_fixed_chunks() {
    golden("edge-cases-fixed-1m", "fixed:1M");
}

#[test]
fn golden_cdc_chunks() {
    golden("edge-cases-cdc-16k-64k-256k", "cdc:16K:64K:256K");
}

/// Images built before blobs became one-entry tar layers (chunk offsets from 0 of a
/// raw blob) still read: offsets are absolute in the blob either way, and their
/// trees are the same as today's.
#[test]
fn bootstraps_of_raw_blobs_still_read() {
    let legacy = golden_dir().join("../v1-raw-blobs");
    for name in ["edge-cases-fixed-1m", "edge-cases-cdc-16k-64k-256k"] {
        let stored = std::fs::read(legacy.join(format!("{name}.bootstrap"))).unwrap();
        let stored_dump = std::fs::read_to_string(golden_dir().join(format!("{name}.dump.txt"))).unwrap();
        assert!(read_everything(&stored, true).unwrap().entries > 100);
        assert_eq!(dump(&stored), stored_dump, "{name}");
        let bootstrap = Bootstrap::open(&stored).unwrap();
        assert_eq!(
            bootstrap.chunk(0).unwrap().compressed_offset,
            0,
            "{name} starts its blob at 0"
        );
    }
}
