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

fn build_streaming(dir: &Path, layer: &[u8]) -> Built {
    let mut builder = ImageBuilder::new(BuildOptions::default(), &dir.join("image")).unwrap();
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
    let streams = builder
        .stream_blobs(StreamPlan {
            layer_plain: layer.len() as u64,
            layer_size: layer.len() as u64,
            sealed: sealed_tx,
            opened: Some(opened_tx),
        })
        .unwrap();
    assert!(streams);
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
    let first = build_streaming(&dir.path().join("a"), &layer);

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
    let second = build_streaming(&dir.path().join("b"), &layer);
    let digests = |built: &Built| -> Vec<[u8; 32]> { built.sealed.iter().map(|s| s.blob.digest).collect() };
    assert_eq!(digests(&first), digests(&second));
}
