//! Every edge case of the fixture layers survives build → unpack exactly, with both
//! chunkers, and the image verifies.

mod common;

use common::*;
use petrel_builder::{BuildOptions, LocalImage};
use petrel_fixtures::edge_cases::{edge_case_expected, edge_case_layers};
use petrel_format::ChunkerParams;

fn round_trip(chunker: ChunkerParams) {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let options = BuildOptions {
        chunker,
        ..BuildOptions::default()
    };
    let (image, report) = build_layers(dir.path(), &layers, options).unwrap();
    let warnings = report.warnings.join("\n");
    assert!(warnings.contains("'..' components"), "{warnings}");
    assert!(warnings.contains("aufs metadata"), "{warnings}");
    assert!(warnings.contains("names no valid entry"), "{warnings}");

    let actual = unpack_and_scan(&image, dir.path(), "unpacked");
    assert_same_tree(&edge_case_expected(), &actual);

    let opened = LocalImage::open(&image).unwrap();
    let checked = petrel_builder::check::check(&opened).unwrap();
    assert_eq!(checked.entries, actual.len() as u64);
    let summary =
        petrel_builder::inspect::summarize(&opened.bootstrap(), opened.bootstrap_bytes().len() as u64).unwrap();
    // Fixed 1 MiB chunks line up with the zero MiB; CDC cuts it into max-size zero chunks.
    assert!(
        summary.hole_bytes >= 512 << 10,
        "the zero MiB of sparse.img is stored as holes: {summary:?}"
    );
}

#[test]
fn edge_cases_round_trip_with_fixed_chunks() {
    round_trip(ChunkerParams::default_fixed());
}

#[test]
fn edge_cases_round_trip_with_cdc_chunks() {
    round_trip("cdc:16K:64K:256K".parse().unwrap());
}

#[test]
fn tar_unpack_rebuilds_to_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let (image, _) = build_layers(dir.path(), &layers, BuildOptions::default()).unwrap();
    let mut tar = Vec::new();
    petrel_builder::unpack::unpack_to_tar(&LocalImage::open(&image).unwrap(), &mut tar).unwrap();
    let again = dir.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let (image2, report) = build_layers(&again, &[tar], BuildOptions::default()).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let actual = unpack_and_scan(&image2, dir.path(), "from-tar");
    assert_same_tree(&edge_case_expected(), &actual);
}

#[test]
fn builds_are_deterministic() {
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (ia, ra) = build_layers(
        a.path(),
        &layers,
        BuildOptions {
            threads: 1,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    let (ib, rb) = build_layers(
        b.path(),
        &layers,
        BuildOptions {
            threads: 4,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ra.output.bootstrap_sha256, rb.output.bootstrap_sha256);
    assert_eq!(ra.output.blob.unwrap().digest, rb.output.blob.unwrap().digest);
    assert_eq!(
        std::fs::read(ia.join("bootstrap")).unwrap(),
        std::fs::read(ib.join("bootstrap")).unwrap()
    );
}

#[test]
fn gzip_and_zstd_layers_build_the_same_image() {
    use std::io::Write;
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let gzip: Vec<Vec<u8>> = layers
        .iter()
        .map(|tar| {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        })
        .collect();
    let zstd: Vec<Vec<u8>> = layers
        .iter()
        .map(|tar| zstd::encode_all(tar.as_slice(), 3).unwrap())
        .collect();
    let mut digests = Vec::new();
    for set in [&layers, &gzip, &zstd] {
        let dir = tempfile::tempdir().unwrap();
        let (_, report) = build_layers(dir.path(), set, BuildOptions::default()).unwrap();
        digests.push(report.output.bootstrap_sha256);
    }
    assert_eq!(digests[0], digests[1], "gzip layers");
    assert_eq!(digests[0], digests[2], "zstd layers");
}
