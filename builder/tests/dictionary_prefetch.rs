//! A profile-optimized image keeps its prefetch set together even when a chunk
//! dictionary already holds those chunks elsewhere.

mod common;

use common::build_layers;
use petrel_builder::dict::ChunkDict;
use petrel_builder::BuildOptions;
use petrel_fixtures::layer_spec::write_layer;
use petrel_fixtures::sample::sample_layers;
use petrel_format::profile::ProfileEntry;
use petrel_format::Bootstrap;
use std::sync::Arc;

fn dictionary_of(image: &std::path::Path) -> ChunkDict {
    let mut dict = ChunkDict::default();
    dict.add_bootstrap(&std::fs::read(image.join("bootstrap")).unwrap())
        .unwrap();
    dict
}

#[test]
fn an_image_optimized_against_its_unoptimized_release_lays_its_prefetch_set_out_first() {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<Vec<u8>> = sample_layers().iter().map(|ops| write_layer(ops, "")).collect();
    let profile = vec![ProfileEntry::new(b"app/models/weights.bin", None)];
    // Release N converted without a profile: the weights lie outside any prefetch region.
    let (plain, _) = build_layers(&dir.path().join("plain"), &layers, BuildOptions::default()).unwrap();
    let optimized_options = |dict: ChunkDict| BuildOptions {
        prefetch: profile.clone(),
        chunk_dict: Arc::new(dict),
        ..BuildOptions::default()
    };
    // The same image optimized with a profile, the plain one as dictionary: the
    // prefetch set is stored again, first in the new blob; the rest is referenced.
    let (optimized, report) = build_layers(
        &dir.path().join("optimized"),
        &layers,
        optimized_options(dictionary_of(&plain)),
    )
    .unwrap();
    let blob = report
        .output
        .blob
        .as_ref()
        .expect("a new blob holding the prefetch set");
    assert!(report.output.prefetch_bytes > 0, "{report:?}");
    assert!(
        report.output.prefetch_bytes + 1024 + 512 >= blob.size - 512,
        "the new blob is the prefetch set and little else: {report:?}"
    );
    let bytes = std::fs::read(optimized.join("bootstrap")).unwrap();
    let bootstrap = Bootstrap::open(&bytes).unwrap();
    let new_blob = bootstrap.blobs().next().unwrap().unwrap();
    let weights = bootstrap
        .walk()
        .map(Result::unwrap)
        .find(|entry| entry.path == b"app/models/weights.bin")
        .expect("the weights are in the image")
        .inode;
    for segment in bootstrap.segments(&weights, 0, weights.size()).unwrap() {
        if let petrel_format::reader::SegmentSource::Chunk { index, .. } = segment.source {
            let chunk = bootstrap.chunk(index).unwrap();
            assert_eq!(
                chunk.blob_index, 0,
                "every chunk of the prefetch set is in the new blob"
            );
            assert!(chunk.compressed_offset < new_blob.prefetch_end);
        }
    }
    // Optimized again with the same profile against that image (the next release
    // unchanged): its prefetch region already holds the set, so nothing is stored.
    let (again_image, again) = build_layers(
        &dir.path().join("again"),
        &layers,
        optimized_options(dictionary_of(&optimized)),
    )
    .unwrap();
    assert!(again.output.blob.is_none(), "{again:?}");
    // ... and the region stays one where it is, so a mount prefetches it there;
    // the plain release's blob keeps no region in it.
    let bytes = std::fs::read(again_image.join("bootstrap")).unwrap();
    let again = Bootstrap::open(&bytes).unwrap();
    let regions: Vec<(_, u64)> = again
        .blobs()
        .map(|b| b.unwrap())
        .map(|b| (b.digest, b.prefetch_end))
        .collect();
    assert!(
        regions.contains(&(new_blob.digest, new_blob.prefetch_end)),
        "{regions:?}"
    );
    assert!(
        regions
            .iter()
            .all(|&(digest, end)| digest == new_blob.digest || end == 0),
        "{regions:?}"
    );
}
