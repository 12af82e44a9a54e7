//! A layer applied from its record (`format-spec.md` §16) gives the tree its tar
//! gives: every edge case, against the lower layers as they are, with no chunk
//! read, compressed or stored again.

mod common;

use common::*;
use petrel_builder::dict::ChunkDict;
use petrel_builder::{BuildOptions, ImageBuilder};
use petrel_fixtures::edge_cases::{edge_case_expected, edge_case_layers};
use petrel_format::layer_record::LayerRecord;
use std::path::Path;
use std::sync::Arc;

fn recording() -> BuildOptions {
    BuildOptions {
        record_layers: true,
        ..BuildOptions::default()
    }
}

fn copy_blobs(from: &Path, to: &Path) {
    let (from, to) = (from.join("blobs/sha256"), to.join("blobs/sha256"));
    std::fs::create_dir_all(&to).unwrap();
    for blob in std::fs::read_dir(from).unwrap() {
        let blob = blob.unwrap();
        std::fs::copy(blob.path(), to.join(blob.file_name())).unwrap();
    }
}

/// Each edge-case layer's record, from an image whose top layer it is (nothing
/// above it replaces its files there), and a dictionary of all those images.
fn records_and_dictionary(dir: &Path) -> (Vec<Vec<u8>>, ChunkDict, Vec<std::path::PathBuf>) {
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let mut dict = ChunkDict::default();
    let mut records = Vec::new();
    let mut images = Vec::new();
    for top in 1..=layers.len() {
        let (image, report) = build_layers(&dir.join(format!("upto{top}")), &layers[..top], recording()).unwrap();
        assert_eq!(report.layer_records.len(), top);
        records.push(
            report.layer_records[top - 1]
                .as_ref()
                .expect("the top layer's files are all in the image")
                .encode(),
        );
        dict.add_bootstrap(&std::fs::read(image.join("bootstrap")).unwrap())
            .unwrap();
        images.push(image);
    }
    (records, dict, images)
}

#[test]
fn every_edge_case_layer_applied_from_its_record_gives_the_tree_its_tar_gives() {
    let dir = tempfile::tempdir().unwrap();
    let (records, dict, images) = records_and_dictionary(dir.path());
    let out = dir.path().join("replayed");
    let mut builder = ImageBuilder::new(
        BuildOptions {
            chunk_dict: Arc::new(dict),
            ..recording()
        },
        &out,
    )
    .unwrap();
    for record in &records {
        builder
            .add_recorded_layer(&LayerRecord::decode(record, 64 << 20).unwrap())
            .unwrap();
    }
    let report = builder.finish().unwrap();
    assert!(report.output.blob.is_none(), "nothing new is stored: {report:?}");
    let warnings = report.warnings.join("\n");
    assert!(warnings.contains("aufs metadata"), "{warnings}");
    assert!(warnings.contains("names no valid entry"), "{warnings}");
    for image in &images {
        copy_blobs(image, &out);
    }
    let actual = unpack_and_scan(&out, dir.path(), "unpacked");
    assert_same_tree(&edge_case_expected(), &actual);
    // Recorded again, the top layer's record is the same bytes: a registry
    // already holds it.
    let again = report.layer_records.last().unwrap().as_ref().unwrap().encode();
    assert_eq!(Some(&again), records.last());
}

#[test]
fn a_record_is_applied_only_with_its_encoding_and_with_every_chunk_in_a_dictionary() {
    let dir = tempfile::tempdir().unwrap();
    let (records, dict, _) = records_and_dictionary(dir.path());
    let record = LayerRecord::decode(&records[0], 64 << 20).unwrap();
    let other_chunker = BuildOptions {
        chunker: petrel_format::ChunkerParams::default_fixed(),
        chunk_dict: Arc::new(dict),
        ..recording()
    };
    let mut builder = ImageBuilder::new(other_chunker, &dir.path().join("fixed")).unwrap();
    let error = builder.add_recorded_layer(&record).unwrap_err().to_string();
    assert!(error.contains("layer 1: its record cannot be applied"), "{error}");
    let mut builder = ImageBuilder::new(recording(), &dir.path().join("no-dict")).unwrap();
    let error = builder.add_recorded_layer(&record).unwrap_err().to_string();
    assert!(error.contains("is in none of the chunk dictionaries"), "{error}");
}

#[test]
fn a_layer_whose_files_a_later_layer_replaces_gets_no_record() {
    use petrel_fixtures::layer_spec::{write_layer, Op};
    let file = |data: &[u8]| Op::File {
        path: "etc/app.conf".into(),
        meta: petrel_fixtures::layer_writer::EntryMeta::mode(0o644),
        data: data.to_vec(),
    };
    let dir = tempfile::tempdir().unwrap();
    // Larger than the small-file limit: a chunk of its own (small files of both
    // layers would share one, which the image then holds).
    let big = |seed: u8| {
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect::<Vec<u8>>()
    };
    let lower = write_layer(&[file(&big(1))], "");
    let upper = write_layer(&[file(&big(2))], "");
    let (_, report) = build_layers(dir.path(), &[lower, upper], recording()).unwrap();
    assert!(report.layer_records[0].is_none(), "its chunk is not in the image");
    assert!(report.layer_records[1].is_some());
}

#[test]
fn a_record_built_in_memory_is_checked_as_a_decoded_one_is() {
    use petrel_format::layer_record::{RecordBody, RecordEntry, RecordMeta};
    let dir = tempfile::tempdir().unwrap();
    let (records, dict, _) = records_and_dictionary(dir.path());
    let record = LayerRecord::decode(&records[0], 64 << 20).unwrap();
    let builder = |name: &str| {
        let options = BuildOptions {
            chunk_dict: Arc::new(dict.clone()),
            ..recording()
        };
        ImageBuilder::new(options, &dir.path().join(name)).unwrap()
    };
    let mut past_its_chunk = record.clone();
    for entry in &mut past_its_chunk.entries {
        if let RecordBody::Regular { pieces, .. } = &mut entry.body {
            if let Some(piece) = pieces.iter_mut().find(|p| p.chunk != u32::MAX) {
                piece.chunk = past_its_chunk.chunks.len() as u32;
                break;
            }
        }
    }
    let error = builder("a")
        .add_recorded_layer(&past_its_chunk)
        .unwrap_err()
        .to_string();
    assert!(error.contains("do not tile it inside their chunks"), "{error}");
    for (path, body) in [
        (b"etc/not-a-whiteout".to_vec(), RecordBody::Whiteout),
        (Vec::new(), RecordBody::Fifo(RecordMeta::default())),
    ] {
        let mut bad = record.clone();
        bad.entries.push(RecordEntry { path, body });
        let error = builder("b").add_recorded_layer(&bad).unwrap_err().to_string();
        assert!(
            error.contains("whiteout whose name") || error.contains("only a directory"),
            "{error}"
        );
    }
}
