//! Conversion embedded in-process: an OCI layout converted to an OCI layout by the
//! library (no registry, no `petrel` binary), its summary checked against the
//! layers, and bad input answered with a typed error that names it.

use petrel_builder::BuildOptions;
use petrel_convert::{convert, ConvertError, ConvertOptions};
use petrel_registry::{ClientOptions, Location};

fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in files {
        w.file(path, &Default::default(), data);
    }
    w.finish()
}

/// An error and its causes, as one line.
fn error_chain(error: &ConvertError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

fn options() -> ConvertOptions {
    ConvertOptions {
        build: BuildOptions::default(),
        all_platforms: false,
        platform: petrel_registry::oci::host_platform(),
        progress: false,
        work_dir: None,
        profile: None,
        chunk_dict: petrel_convert::ChunkDictChoice::Disabled,
        layer_records: true,
    }
}

#[test]
fn an_oci_layout_converts_in_process_and_bad_input_is_a_typed_error() {
    let work = tempfile::tempdir().unwrap();
    let big = petrel_fixtures::rng::Rng::new(3).mixed(3 << 20);
    let layers = [
        layer(&[("etc/motd", b"hello\n"), ("data/big.bin", &big)]),
        layer(&[("etc/motd", b"replaced\n")]),
    ];
    let input = work.path().join("in");
    petrel_fixtures::oci_layout::write_oci_layout(&input, "v1", &layers).unwrap();
    let output = work.path().join("out");
    let location = |text: String| Location::parse(&text).unwrap();
    let client = ClientOptions::default();
    let summary = convert(
        &location(format!("oci:{}:v1", input.display())),
        &location(format!("oci:{}:v1", output.display())),
        &client,
        &client,
        &options(),
    )
    .unwrap();
    let manifest = &summary.manifests[0];
    assert_eq!(manifest.source_layers, 2);
    assert_eq!(
        manifest.files, 3,
        "regular files through the data path: one per layer entry"
    );
    assert!(manifest.unique_chunks > 1, "{manifest:?}");
    assert!(output.join("index.json").exists());

    let nowhere = work.path().join("nowhere");
    let error = convert(
        &location(format!("oci:{}:v1", nowhere.display())),
        &location(format!("oci:{}:v2", output.display())),
        &client,
        &client,
        &options(),
    )
    .unwrap_err();
    assert!(!matches!(error, ConvertError::Build(_)), "{error:?}");
    let chain = error_chain(&error);
    assert!(chain.contains("nowhere"), "the error names the missing layout: {chain}");
}

/// Rewrites the layout's manifest so that its first layer's size reads `size`.
fn set_first_layer_size(layout: &std::path::Path, size: u64) {
    use sha2::Digest;
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let blobs = layout.join("blobs/sha256");
    let old = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blobs.join(&old)).unwrap()).unwrap();
    manifest["layers"][0]["size"] = size.into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    std::fs::write(blobs.join(&digest), &bytes).unwrap();
    index["manifests"][0]["digest"] = format!("sha256:{digest}").into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// A manifest that overstates a big layer's size (what sizes the blobs that
/// stream while the layer is read) fails the conversion once the layer ends
/// short, naming both sizes; one that understates it stops the read at the
/// stated size (plus one byte), and the layer fails.
#[test]
fn a_layer_whose_size_the_manifest_misstates_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let big = petrel_fixtures::rng::Rng::new(5).bytes(40 << 20);
    let layers = [layer(&[("data/big.bin", &big)])];
    let client = ClientOptions::default();
    let location = |text: String| Location::parse(&text).unwrap();
    for (name, change, expected) in [
        ("over", 1i64 << 30, "the manifest says"),
        // Cut short, the layer fails to decode (or to match its digest).
        ("under", -(1i64 << 20), "converting layer 1"),
    ] {
        let input = work.path().join(name);
        petrel_fixtures::oci_layout::write_oci_layout(&input, "v1", &layers).unwrap();
        let blobs = input.join("blobs/sha256");
        let real = std::fs::read_dir(&blobs)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .max()
            .unwrap();
        set_first_layer_size(&input, real.checked_add_signed(change).unwrap());
        let error = convert(
            &location(format!("oci:{}:v1", input.display())),
            &location(format!("oci:{}:v1", work.path().join(format!("{name}-out")).display())),
            &client,
            &client,
            &options(),
        )
        .unwrap_err();
        let chain = error_chain(&error);
        assert!(chain.contains(expected), "{name}: {chain}");
    }
}
