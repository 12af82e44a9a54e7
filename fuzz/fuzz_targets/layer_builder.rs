//! Any bytes as one or two OCI layers (the first byte picks the split): the builder
//! may refuse them, but must not panic, and whatever it builds must be a valid
//! bootstrap whose every file reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_builder::{BuildOptions, ImageBuilder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (rest.len() * usize::from(split)) / 255;
    let layers: Vec<&[u8]> = if split == 0 { vec![rest] } else { vec![&rest[..at], &rest[at..]] };
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = BuildOptions {
        chunker: "fixed:4K".parse().expect("valid chunker"),
        threads: 1,
        ..BuildOptions::default()
    };
    let Ok(mut builder) = ImageBuilder::new(options, dir.path()) else { return };
    for layer in layers {
        if builder.add_layer(layer).is_err() {
            return;
        }
    }
    if builder.finish().is_err() {
        return;
    }
    let bytes = std::fs::read(dir.path().join("bootstrap")).expect("a finished build has a bootstrap");
    petrel_format::reader::read_everything(&bytes, true).expect("the builder wrote a valid bootstrap");
    let image = petrel_builder::LocalImage::open(dir.path()).expect("the built image opens");
    let target = dir.path().join("unpacked");
    petrel_builder::unpack::unpack_to_dir(&image, &target).expect("the built image unpacks");
});
