//! A layer's chunks written into blobs while they come (what `petrel convert`
//! uploads while it grows): the bytes read while a blob grows are the blob, the
//! blobs are the same on every build, and the image reads back like its layer.

mod common;

use petrel_builder::growing_blob::BlobEnd;
use petrel_builder::pipeline::{SealedBlob, StreamPlan};
use petrel_builder::{BuildOptions, ImageBuilder};
use petrel_fixtures::layer_spec::{reference_merge, write_layer, Op};
use petrel_fixtures::layer_writer::EntryMeta;
use petrel_fixtures::rng::Rng;
use petrel_format::layer_tar;
use sha2::Digest;
use std::io::Read;
use std::path::Path;

/// About 80 MiB in 48 directories: big files of mixed data and small text files.
fn layer_ops() -> Vec<Op> {
    let mut rng = Rng::new(7);
    let mut ops = Vec::new();
    for d in 0..48 {
        let dir = format!("pkg{d:02}");
        ops.push(Op::Dir {
            path: dir.clone(),
            meta: EntryMeta::mode(0o755),
        });
        for f in 0..12 {
            let len = if f % 3 == 0 {
                300_000 + rng.below(900_000) as usize
            } else {
                2_000 + rng.below(20_000) as usize
            };
            let data = if f % 2 == 0 { rng.mixed(len) } else { rng.text(len) };
            ops.push(Op::File {
                path: format!("{dir}/file{f:02}"),
                meta: EntryMeta::mode(0o644),
                data,
            });
        }
    }
    ops
}

/// A streamed blob as its reader saw it while it grew, and how it ended.
struct Seen {
    bytes: Vec<u8>,
    end: BlobEnd,
}

struct Built {
    seen: Vec<Seen>,
    sealed: Vec<SealedBlob>,
}

fn build_streaming(dir: &Path, layer: &[u8], options: BuildOptions) -> Built {
    build_streaming_as(dir, layer, options, false)
}

/// `build_streaming`, the layer going into one blob or into blobs that halve.
fn build_streaming_as(dir: &Path, layer: &[u8], options: BuildOptions, one_blob: bool) -> Built {
    let mut builder = ImageBuilder::new(options, &dir.join("image")).unwrap();
    let (sealed_tx, sealed_rx) = std::sync::mpsc::channel();
    let (opened_tx, opened_rx) =
        std::sync::mpsc::channel::<std::sync::Arc<petrel_builder::growing_blob::GrowingBlob>>();
    let reading = std::thread::spawn(move || {
        opened_rx
            .into_iter()
            .map(|blob| {
                let mut bytes = Vec::new();
                blob.reader().read_to_end(&mut bytes).unwrap();
                Seen {
                    bytes,
                    end: blob.wait_end(),
                }
            })
            .collect::<Vec<_>>()
    });
    builder
        .stream_blobs(StreamPlan {
            layer_plain: layer.len() as u64,
            layer_size: layer.len() as u64,
            sealed: sealed_tx,
            opened: Some(opened_tx),
            one_blob,
        })
        .unwrap();
    builder.add_layer(layer).unwrap();
    let rest = builder.seal().unwrap();
    builder.finish().unwrap();
    let seen = reading.join().unwrap();
    let mut sealed: Vec<SealedBlob> = sealed_rx.into_iter().map(Result::unwrap).collect();
    sealed.extend(rest);
    Built { seen, sealed }
}

#[test]
fn blobs_written_while_a_layer_streams_in_are_read_whole_while_they_grow_and_the_same_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let ops = layer_ops();
    let layer = write_layer(&ops, "");
    let first = build_streaming(&dir.path().join("a"), &layer, BuildOptions::default());

    // The layer went into several blobs, each read while it grew.
    assert!(first.seen.len() >= 3, "{} streamed blobs", first.seen.len());
    let streamed: Vec<&SealedBlob> = first.sealed.iter().filter(|s| s.streamed).collect();
    assert_eq!(streamed.len(), first.seen.len());
    for (seen, sealed) in first.seen.iter().zip(&streamed) {
        let BlobEnd::Done { digest, path } = &seen.end else {
            panic!("a streamed blob was abandoned")
        };
        assert_eq!(*digest, sealed.blob.digest);
        assert_eq!(
            seen.bytes,
            std::fs::read(path).unwrap(),
            "the bytes read while it grew are the blob"
        );
        assert_eq!(<[u8; 32]>::from(sha2::Sha256::digest(&seen.bytes)), *digest);
        assert_eq!(seen.bytes.len() as u64, sealed.blob.compressed_size);
        // A one-entry tar that states its length up front.
        let data = layer_tar::data_size(layer_tar::BLOB_ENTRY, &seen.bytes[..512]).unwrap();
        assert_eq!(layer_tar::layer_len(data), seen.bytes.len() as u64);
    }
    // Blob lengths shrink toward the layer's end, so that little is left then.
    let sizes: Vec<u64> = streamed.iter().map(|s| s.blob.compressed_size).collect();
    assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "{sizes:?}");

    // The image reads back as its layer.
    let expected = reference_merge(&[ops]);
    let actual = common::unpack_and_scan(&dir.path().join("a/image"), dir.path(), "unpacked");
    common::assert_same_tree(&expected, &actual);

    // Where blobs end depends on the layer only.
    let second = build_streaming(&dir.path().join("b"), &layer, BuildOptions::default());
    let digests = |built: &Built| -> Vec<[u8; 32]> { built.sealed.iter().map(|s| s.blob.digest).collect() };
    assert_eq!(digests(&first), digests(&second));
}

#[test]
fn a_one_blob_layer_goes_into_a_blob_for_nearly_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let ops = layer_ops();
    let layer = write_layer(&ops, "");
    let built = build_streaming_as(&dir.path().join("one"), &layer, BuildOptions::default(), true);
    let halving = build_streaming(&dir.path().join("halving"), &layer, BuildOptions::default());

    let streamed: Vec<u64> = built
        .sealed
        .iter()
        .filter(|s| s.streamed)
        .map(|s| s.blob.uncompressed_size)
        .collect();
    let stored = stored_bytes(&dir.path().join("one/image"));
    // The estimate, made from the layer's first megabyte, may fall short: then a
    // second blob takes most of what is left.
    assert!(
        !streamed.is_empty() && streamed.len() <= 2,
        "one or two streamed blobs: {streamed:?}"
    );
    assert!(
        streamed[0] >= stored * 3 / 4,
        "the first holds most of the layer: {streamed:?} of {stored}"
    );
    assert!(halving.seen.len() >= 3, "otherwise, blobs halve");
    assert_eq!(
        stored,
        stored_bytes(&dir.path().join("halving/image")),
        "chunks stored once either way"
    );
    let expected = reference_merge(&[ops]);
    let actual = common::unpack_and_scan(&dir.path().join("one/image"), dir.path(), "unpacked");
    common::assert_same_tree(&expected, &actual);
}

/// Every blob's chunk bytes (uncompressed), as the image's bootstrap lists them.
fn stored_bytes(image: &Path) -> u64 {
    let bytes = std::fs::read(image.join("bootstrap")).unwrap();
    let bootstrap = petrel_format::Bootstrap::open(&bytes).unwrap();
    bootstrap.blobs().map(|b| b.unwrap().uncompressed_size).sum()
}

#[test]
fn with_a_prefetch_profile_a_layer_still_streams_and_the_profiled_files_are_stored_once_in_prefetch_regions() {
    use petrel_format::profile::ProfileEntry;
    use petrel_format::reader::SegmentSource;
    let dir = tempfile::tempdir().unwrap();
    let mut ops = layer_ops();
    // A profiled file whose data came first under another, unprofiled name: its
    // chunks went into a streamed blob before the profile named them.
    let Op::File { data: first_file, .. } = &ops[1] else {
        panic!("pkg00/file00 is a file")
    };
    ops.push(Op::File {
        path: "zz/copy".into(),
        meta: EntryMeta::mode(0o644),
        data: first_file.clone(),
    });
    let layer = write_layer(&ops, "");
    let profiled = ["pkg05/file03", "pkg20", "zz/copy"];
    let options = BuildOptions {
        prefetch: vec![
            ProfileEntry::new(b"/pkg05/file03", None),
            ProfileEntry::new(b"pkg20", None),
            ProfileEntry::new(b"pkg30/file00", Some(vec![[0, 4096]])),
            ProfileEntry::new(b"zz/copy", None),
        ],
        ..BuildOptions::default()
    };
    let plain = build_streaming(&dir.path().join("plain"), &layer, BuildOptions::default());
    let built = build_streaming(&dir.path().join("profiled"), &layer, options);
    let image = dir.path().join("profiled/image");

    // The layer still went up while it streamed in.
    assert!(built.seen.len() >= 3, "{} streamed blobs", built.seen.len());

    // It reads back as its layer.
    let expected = reference_merge(&[ops.clone()]);
    let actual = common::unpack_and_scan(&image, dir.path(), "unpacked");
    common::assert_same_tree(&expected, &actual);

    // Every wanted byte of the profiled files lies in a prefetch region: of a
    // piece sealed while the layer was read (held chunks, so that they go up
    // before the build ends), or of the blob the build finishes with (copies of
    // chunks a streamed blob took first).
    let bytes = std::fs::read(image.join("bootstrap")).unwrap();
    let bootstrap = petrel_format::Bootstrap::open(&bytes).unwrap();
    let blobs: Vec<_> = bootstrap.blobs().map(Result::unwrap).collect();
    let new_blob = &blobs[0];
    assert!(new_blob.prefetch_end > 0);
    assert!(
        !built.sealed.iter().any(|s| s.blob.digest == new_blob.digest),
        "the blob the build finishes with is not sealed before"
    );
    let pieces: Vec<&SealedBlob> = built.sealed.iter().filter(|s| s.blob.prefetch_end > 0).collect();
    assert!(!pieces.is_empty(), "a piece of the region was sealed mid-build");
    for piece in &pieces {
        assert!(!piece.streamed);
        // From the first chunk after the tar header to the end of the last.
        assert!(piece.blob.prefetch_end > 512 && piece.blob.prefetch_end + 1024 <= piece.blob.compressed_size);
        let listed = blobs
            .iter()
            .find(|b| b.digest == piece.blob.digest)
            .expect("the piece is used");
        assert_eq!(listed.prefetch_end, piece.blob.prefetch_end, "all of it prefetched");
    }
    let mut in_pieces = 0;
    let mut copied = 0u64;
    let mut checked = 0;
    for entry in bootstrap.walk().map(Result::unwrap) {
        let path = String::from_utf8_lossy(&entry.path).to_string();
        if entry.inode.kind().unwrap() != petrel_format::FileKind::Regular {
            continue;
        }
        let wanted = if path == "pkg30/file00" {
            4096
        } else if profiled
            .iter()
            .any(|p| path == *p || path.starts_with(&format!("{p}/")))
        {
            entry.inode.size()
        } else {
            continue;
        };
        let mut seen = std::collections::HashSet::new();
        for segment in bootstrap.segments(&entry.inode, 0, wanted).unwrap() {
            if let SegmentSource::Chunk { index, .. } = segment.source {
                let chunk = bootstrap.chunk(index).unwrap();
                let blob = &blobs[chunk.blob_index as usize];
                assert!(
                    chunk.compressed_offset < blob.prefetch_end,
                    "{path}: chunk {index} is in a prefetch region"
                );
                if path == "zz/copy" {
                    assert_eq!(chunk.blob_index, 0, "{path}: its copy is in the new blob");
                }
                if chunk.blob_index != 0 {
                    in_pieces += 1;
                }
                if path == "zz/copy" && seen.insert(index) {
                    copied += u64::from(chunk.uncompressed_size);
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "{checked} chunks checked");
    assert!(in_pieces > 0, "pieces hold profiled chunks");
    assert!(copied > 0);

    // Stored once: the chunks held back are not in the streamed blobs too, so the
    // image stores what the plain build stores, plus the one file whose chunks a
    // streamed blob took before the profile named them.
    let plain_stored = stored_bytes(&dir.path().join("plain/image"));
    assert!(plain.seen.len() >= 3);
    assert_eq!(stored_bytes(&image), plain_stored + copied);
}
