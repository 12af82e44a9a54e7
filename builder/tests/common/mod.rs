//! Helpers shared by the builder's integration tests.
#![allow(dead_code)]

use petrel_builder::{build_paths, BuildOptions, BuildReport, LocalImage};
use petrel_fixtures::snapshot::{differences, scan, Snapshot};
use std::path::{Path, PathBuf};

/// Builds `layers` (tar bytes) into `<dir>/image`.
pub fn build_layers(
    dir: &Path,
    layers: &[Vec<u8>],
    options: BuildOptions,
) -> petrel_builder::Result<(PathBuf, BuildReport)> {
    let paths = petrel_fixtures::write_layer_files(&dir.join("layers"), layers).unwrap();
    let image = dir.join("image");
    let report = build_paths(&paths, &image, options)?;
    Ok((image, report))
}

/// Unpacks an image into `<dir>/<name>` and scans it.
pub fn unpack_and_scan(image: &Path, dir: &Path, name: &str) -> Snapshot {
    let image = LocalImage::open(image).unwrap();
    let target = dir.join(name);
    let report = petrel_builder::unpack::unpack_to_dir(&image, &target).unwrap();
    assert!(report.warnings.is_empty(), "unpack warnings: {:?}", report.warnings);
    scan(&target).unwrap()
}

/// Panics with a readable list of differences.
pub fn assert_same_tree(expected: &Snapshot, actual: &Snapshot) {
    let diffs = differences(expected, actual);
    assert!(diffs.is_empty(), "{} differences:\n{}", diffs.len(), diffs.join("\n"));
}
