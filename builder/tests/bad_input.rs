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
        err.contains("layer 1, entry \"bin/sh\"") && err.contains("hardlink target \"bin/bash\" does not exist"),
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
        assert!(err.contains("layer 1"), "cut at {cut}: {err}");
    }
}

#[test]
fn size_field_larger_than_the_data_is_an_error() {
    let mut w = LayerWriter::new();
    w.file("f", &EntryMeta::default(), &[7u8; 100_000]);
    let mut tar = w.finish();
    tar.truncate(512 + 4096);
    let err = build_error(&[tar]);
    assert!(err.contains("layer 1"), "{err}");
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

/// The whole error chain, as the CLI prints it.
fn build_error_chain(layers: &[Vec<u8>]) -> String {
    let dir = tempfile::tempdir().unwrap();
    match build_layers(dir.path(), layers, BuildOptions::default()) {
        Ok(_) => panic!("build should fail"),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// A metadata entry (`L`, `K`, `x`, `g`) that declares `declared` bytes, followed by
/// `present` zero bytes of it: tar refuses it before reading it into memory.
fn metadata_bomb(kind: u8, declared: u64, present: usize) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    header.set_entry_type(tar::EntryType::new(kind));
    header.set_mode(0o644);
    header.set_size(declared);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.resize(512 + present, 0);
    out
}

#[test]
fn gnu_long_names_and_pax_headers_are_bounded() {
    for (kind, what) in [
        (b'L', "GNU long name"),
        (b'K', "GNU long link name"),
        (b'x', "PAX extended header"),
    ] {
        // 8 GiB declared; the archive ends long before, but nothing may be buffered.
        let err = build_error_chain(&[metadata_bomb(kind, 8 << 30, 4096)]);
        assert!(
            err.contains(what) && err.contains("larger than the limit of 1048576"),
            "{err}"
        );
        // Just over the limit, and all present (a gzip of it would be tiny).
        let err = build_error_chain(&[metadata_bomb(kind, (1 << 20) + 1, (1 << 20) + 512)]);
        assert!(err.contains("larger than the limit"), "{err}");
    }
    // A long name within the limit still works.
    let mut w = LayerWriter::new();
    let long = format!("{}/file", "d".repeat(200));
    w.file(&long, &EntryMeta::default(), b"x");
    let dir = tempfile::tempdir().unwrap();
    build_layers(dir.path(), &[w.finish()], BuildOptions::default()).unwrap();
}

#[test]
fn gnu_sparse_extension_headers_are_bounded() {
    // A sparse entry whose extension headers never end (each says "more follow").
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..6].copy_from_slice(b"sparse");
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_mode(0o644);
    header.set_size(0);
    header.as_gnu_mut().unwrap().isextended[0] = 1;
    header.set_cksum();
    let mut layer = header.as_bytes().to_vec();
    let mut extension = [0u8; 512];
    extension[504] = 1;
    for _ in 0..4096 {
        layer.extend_from_slice(&extension);
    }
    let err = build_error_chain(&[layer]);
    assert!(err.contains("sparse extension headers larger than the limit"), "{err}");
}

#[test]
fn names_and_xattrs_the_reader_would_refuse_fail_the_build() {
    let entry = |path: &[u8], meta: &EntryMeta| {
        let mut w = LayerWriter::new();
        w.pax_long_names = true;
        w.entry(path, tar::EntryType::Regular, meta, None, b"x");
        w.finish()
    };
    let with_xattr = |name: &str, value: Vec<u8>| EntryMeta {
        xattrs: vec![(name.to_string(), value)],
        ..EntryMeta::default()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            entry(b"a/b", &with_xattr("user.big", vec![7; 65 << 10])),
            "larger than 65536",
        ),
        (entry(b"a/b", &with_xattr("", b"v".to_vec())), "empty name"),
        (
            entry(b"a/b", &with_xattr(&"u".repeat(256), b"v".to_vec())),
            "name longer than 255",
        ),
        (
            entry(&[b"x".repeat(150), b"\0evil".to_vec()].concat(), &EntryMeta::default()),
            "NUL",
        ),
        (
            entry("d/".repeat(1100).as_bytes(), &EntryMeta::default()),
            "deeper than 1024",
        ),
        (
            entry(
                format!("{}/f", vec!["n".repeat(200); 30].join("/")).as_bytes(),
                &EntryMeta::default(),
            ),
            "longer than 4096",
        ),
    ];
    for (layer, expected) in cases {
        let err = build_error_chain(&[layer]);
        assert!(err.contains(expected), "expected {expected:?}: {err}");
    }
}

/// PAX records whose values hold newlines (binary xattrs such as
/// `security.capability` as Go and buildkit write them) keep every record.
#[test]
fn pax_values_with_newlines_keep_their_metadata() {
    let capability = b"\x01\x00\x00\x02\x0a\x20\x00\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00".to_vec();
    let mut w = LayerWriter::new();
    let meta = EntryMeta {
        xattrs: vec![
            ("security.capability".into(), capability.clone()),
            ("user.note".into(), b"line one\nline two\n".to_vec()),
        ],
        mtime: 1_700_000_000,
        mtime_nsec: 5,
        ..EntryMeta::mode(0o755)
    };
    w.file("usr/bin/ping", &meta, b"binary");
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = build_layers(dir.path(), &[w.finish()], BuildOptions::default()).unwrap();
    let tree = unpack_and_scan(&image, dir.path(), "out");
    let ping = &tree[&b"usr/bin/ping".to_vec()];
    assert_eq!(
        ping.xattrs,
        [
            (b"security.capability".to_vec(), capability),
            (b"user.note".to_vec(), b"line one\nline two\n".to_vec()),
        ]
    );
    assert_eq!(ping.mtime, (1_700_000_000, 5));
}

#[test]
fn a_strangers_prefetch_profile_costs_a_bounded_number_of_searches() {
    use petrel_format::profile::ProfileEntry;
    // A profile kept in an image that `--prefetch-from` names is a stranger's: a
    // pattern of many `**` (a search over every path per wildcard, nested) and the
    // root named again and again (each a walk of the whole tree).
    let mut w = LayerWriter::new();
    let deep = "aaaaaaaaaa/".repeat(6);
    for i in 0..200 {
        w.file(&format!("{deep}file{i:03}.bin"), &EntryMeta::default(), &[i as u8; 100]);
    }
    w.file("app/main.py", &EntryMeta::default(), b"print('hi')\n");
    let mut prefetch = vec![ProfileEntry::new(format!("**a{}b", "**a".repeat(12)).as_bytes(), None)];
    prefetch.extend((0..100_000).map(|_| ProfileEntry::new(b"/", None)));
    prefetch.push(ProfileEntry::new(b"app/main.py", None));
    let dir = tempfile::tempdir().unwrap();
    let options = BuildOptions {
        prefetch,
        ..BuildOptions::default()
    };
    let (_, report) = build_layers(dir.path(), &[w.finish()], options).unwrap();
    let said = |needle: &str| report.warnings.iter().filter(|w| w.contains(needle)).count();
    assert_eq!(said("wildcards; ignored"), 1, "{:?}", &report.warnings[..3]);
    let ignored = format!(
        "{} prefetch entries naming directories or patterns past the first 64 ignored",
        100_000 - 64
    );
    assert_eq!(said(&ignored), 1, "{:?}", report.warnings);
    assert!(report.warnings.len() <= 3, "{:?}", report.warnings);
    // A file named after them all is still laid out first.
    assert_eq!(report.output.prefetch_files, 201, "{:?}", report.output);
}
