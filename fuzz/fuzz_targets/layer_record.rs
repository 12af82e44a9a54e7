//! Any bytes served as a layer record (`format-spec.md` §16): decoded (inflated
//! or as is), and what decodes is applied as two layers of a build whose
//! dictionary holds its chunks. Errors are fine, panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_builder::dict::{ChunkDict, DictBlob, DictChunk};
use petrel_builder::{BuildOptions, ImageBuilder};
use petrel_format::layer_record::LayerRecord;

fuzz_target!(|data: &[u8]| {
    let _ = LayerRecord::decode(data, 1 << 20);
    let Ok(record) = LayerRecord::from_bytes(data) else { return };
    let mut dict = ChunkDict::default();
    dict.blobs.push(DictBlob {
        digest: [1; 32],
        compressed_size: 1 << 40,
        uncompressed_size: 1 << 40,
        prefetch_end: 0,
    });
    let mut offset = 512;
    for chunk in &record.chunks {
        dict.chunks.insert(
            chunk.digest,
            DictChunk {
                blob: 0,
                flags: 0,
                compressed_offset: offset,
                compressed_size: chunk.uncompressed_size,
                uncompressed_size: chunk.uncompressed_size,
            },
        );
        offset += u64::from(chunk.uncompressed_size);
    }
    let out = tempfile::tempdir().expect("a temporary directory");
    let options = BuildOptions {
        chunker: record.encoding.chunker,
        small_file_limit: record.encoding.small_file_limit,
        compression_level: record.encoding.compression_level.min(19) as i32,
        chunk_dict: std::sync::Arc::new(dict),
        record_layers: true,
        threads: 1,
        ..BuildOptions::default()
    };
    let Ok(mut builder) = ImageBuilder::new(options, out.path()) else { return };
    if builder.add_recorded_layer(&record).is_ok() && builder.add_recorded_layer(&record).is_ok() {
        let _ = builder.finish();
    }
});
