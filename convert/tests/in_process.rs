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

fn options() -> ConvertOptions {
    ConvertOptions {
        build: BuildOptions::default(),
        all_platforms: false,
        platform: petrel_registry::oci::host_platform(),
        progress: false,
        work_dir: None,
        profile: None,
        chunk_dict: petrel_convert::ChunkDictChoice::Disabled,
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
    let chain = {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text += &format!(": {cause}");
            source = cause.source();
        }
        text
    };
    assert!(chain.contains("nowhere"), "the error names the missing layout: {chain}");
}
