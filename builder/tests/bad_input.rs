//! Malicious or broken input gives a clear error, never a panic, never a write
//! outside the target; corrupted images are caught by check and unpack.

mod common;

use common::*;
use petrel_builder::{BuildOptions, LocalImage};
use petrel_fixtures::layer_writer::{EntryMeta, LayerWriter};
use petrel_fixtures::rng::Rng;

fn build_error(layers: &[Vec<u8>]) -> String {
    let dir = tempfile::tempdir().unwrap();
    match build_layers(dir.path(), layers, BuildOptions::default()) {
        Ok(_) => panic!("build should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hardlink_to_a_missing_target_is_an_error() {
    let mut w = LayerWriter::new();
    w.hardlink("bin/sh", "bin/bash");
    let err = build_error(&[w.finish()]);
    assert!(
        err.contains("layer 0, entry \"bin/sh\"") && err.contains("hardlink target \"bin/bash\" does not exist"),
        "{err}"
    );
}

#[test]
fn hardlink_escaping_the_tree_resolves_inside_it() {
    let mut w = LayerWriter::new();
    w.hardlink("stolen", "../../../../etc/passwd");
    let err = build_error(&[w.finish()]);
    assert!(err.contains("does not exist"), "{err}");

    let mut w = LayerWriter::new();
    w.file("etc/passwd", &EntryMeta::default(), b"inside");
    w.hardlink("link", "../../../../etc/passwd");
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = build_layers(dir.path(), &[w.finish()], BuildOptions::default()).unwrap();
    let tree = unpack_and_scan(&image, dir.path(), "out");
    assert_eq!(tree[&b"link".to_vec()].hardlink_group, Some(b"etc/passwd".to_vec()));
}

#[test]
fn hardlink_to_a_directory_is_an_error() {
    let mut w = LayerWriter::new();
    w.dir("d/", &EntryMeta::mode(0o755));
    w.hardlink("l", "d");
    assert!(build_error(&[w.finish()]).contains("is a directory"));
}

#[test]
fn file_used_as_a_directory_is_an_error() {
    let mut w = LayerWriter::new();
    w.file("a", &EntryMeta::default(), b"x");
    w.file("a/b", &EntryMeta::default(), b"y");
    let err = build_error(&[w.finish()]);
    assert!(
        err.contains("entry \"a/b\"") && err.contains("not a directory"),
        "{err}"
    );
}

#[test]
fn truncated_archives_are_errors() {
    let mut w = LayerWriter::new();
    w.file("big", &EntryMeta::default(), &Rng::new(1).bytes(200_000));
    w.file("small", &EntryMeta::default(), b"tail");
    let tar = w.finish();
    for cut in [100, 512, 700, 50_000, 199_000, tar.len() - 1536] {
        let err = build_error(&[tar[..cut].to_vec()]);
        assert!(err.contains("layer 0"), "cut at {cut}: {err}");
    }
}

#[test]
fn size_field_larger_than_the_data_is_an_error() {
    let mut w = LayerWriter::new();
    w.file("f", &EntryMeta::default(), &[7u8; 100_000]);
    let mut tar = w.finish();
    tar.truncate(512 + 4096);
    let err = build_error(&[tar]);
    assert!(err.contains("layer 0"), "{err}");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut rng = Rng::new(99);
    for len in [1, 100, 511, 512, 1024, 10_000] {
        let _ = build_error(&[rng.bytes(len)]);
    }
    // A gzip header followed by garbage.
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    gz.extend(rng.bytes(1000));
    let _ = build_error(&[gz]);
}

#[test]
fn duplicate_entries_keep_the_last() {
    let mut w = LayerWriter::new();
    w.file("f", &EntryMeta::default(), b"one");
    w.file("f", &EntryMeta::mode(0o600), b"two");
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = build_layers(dir.path(), &[w.finish()], BuildOptions::default()).unwrap();
    let tree = unpack_and_scan(&image, dir.path(), "out");
    assert_eq!(tree[&b"f".to_vec()].kind, petrel_fixtures::snapshot::file_kind(b"two"));
    assert_eq!(tree[&b"f".to_vec()].permissions, 0o600);
}

fn built_sample(dir: &std::path::Path) -> std::path::PathBuf {
    let mut w = LayerWriter::new();
    w.file("a/one.bin", &EntryMeta::default(), &Rng::new(5).mixed(3 << 20));
    w.file("a/two.txt", &EntryMeta::default(), b"two");
    build_layers(dir, &[w.finish()], BuildOptions::default()).unwrap().0
}

#[test]
fn corrupted_blob_is_named_by_check_and_refused_by_unpack() {
    let dir = tempfile::tempdir().unwrap();
    let image_dir = built_sample(dir.path());
    let image = LocalImage::open(&image_dir).unwrap();
    let chunk = image.bootstrap().chunk(1).unwrap();
    let blob_path = image.dir().blob_path(&image.bootstrap().blob(0).unwrap().digest);
    let mut blob = std::fs::read(&blob_path).unwrap();
    blob[(chunk.compressed_offset + u64::from(chunk.compressed_size) / 2) as usize] ^= 0x55;
    std::fs::write(&blob_path, &blob).unwrap();

    let failure = petrel_builder::check::check(&image).unwrap_err();
    assert!(
        failure.object.contains("a/one.bin") && failure.object.contains("chunk 1 at blob offset"),
        "{}",
        failure.object
    );

    let err = petrel_builder::unpack::unpack_to_dir(&image, &dir.path().join("out"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("chunk 1"), "{err}");
    let partial = std::fs::metadata(dir.path().join("out/a/one.bin"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(partial <= 1 << 20, "no byte of the bad chunk was written");
}

#[test]
fn corrupted_bootstrap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image_dir = built_sample(dir.path());
    let path = image_dir.join("bootstrap");
    let good = std::fs::read(&path).unwrap();
    for position in [0, 9, 40, 300, good.len() - 1] {
        let mut bad = good.clone();
        bad[position] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let err = LocalImage::open(&image_dir).unwrap_err().to_string();
        assert!(
            err.contains("magic") || err.contains("version") || err.contains("digest") || err.contains("chunker"),
            "byte {position}: {err}"
        );
    }
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert!(LocalImage::open(&image_dir).is_err());
}

#[test]
fn unpack_refuses_a_non_empty_target() {
    let dir = tempfile::tempdir().unwrap();
    let image = LocalImage::open(&built_sample(dir.path())).unwrap();
    let target = dir.path().join("busy");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"mine").unwrap();
    assert!(petrel_builder::unpack::unpack_to_dir(&image, &target).is_err());
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"mine");
}
