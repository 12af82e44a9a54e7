//! OCI documents read and written through `oci-spec`'s types lose no field the image
//! and distribution specs define (OCI 1.1 included), are written the same way every
//! time, and bad digests are refused by name.

use petrel_registry::oci::{self, Index, Manifest};

const A: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
const B: &str = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

fn index_json() -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "artifactType": "application/vnd.example.sbom",
        "manifests": [
            {
                "mediaType": oci::OCI_MANIFEST,
                "digest": A,
                "size": 7143,
                "platform": {
                    "architecture": "amd64",
                    "os": "windows",
                    "os.version": "10.0.17763.1040",
                    "os.features": ["win32k"]
                }
            },
            {
                "mediaType": oci::OCI_MANIFEST,
                "digest": B,
                "size": 7682,
                "platform": {"architecture": "arm64", "os": "linux", "variant": "v8", "features": ["sse4"]},
                "annotations": {"org.opencontainers.image.ref.name": "v1"}
            }
        ],
        "subject": {"mediaType": oci::OCI_MANIFEST, "digest": A, "size": 7143},
        "annotations": {"com.example.key": "value"}
    })
}

fn manifest_json() -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "artifactType": "application/vnd.dev.petrel.profile.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": A, "size": 2, "data": "e30="},
        "layers": [
            {
                "mediaType": oci::OCI_LAYER_GZIP,
                "digest": B,
                "size": 32654,
                "urls": ["https://mirror.example/blob"],
                "annotations": {"b": "2", "a": "1", "c": "3"}
            }
        ],
        "subject": {"mediaType": oci::OCI_MANIFEST, "digest": A, "size": 7143, "artifactType": "x/y"},
        "annotations": {"z": "26", "y": "25", "x": "24", "w": "23", "v": "22"}
    })
}

#[test]
fn an_index_keeps_every_field_through_a_round_trip() {
    let original = index_json();
    let index: Index = serde_json::from_value(original.clone()).unwrap();
    let written: serde_json::Value = serde_json::from_slice(&oci::canonical_json(&index)).unwrap();
    assert_eq!(written, original);
    let windows = index.manifests()[0].platform().clone().unwrap();
    assert_eq!(windows.os_version().as_deref(), Some("10.0.17763.1040"));
    assert_eq!(
        oci::platform_text(index.manifests()[1].platform().as_ref().unwrap()),
        "linux/arm64/v8"
    );
}

#[test]
fn a_manifest_keeps_every_field_through_a_round_trip() {
    let original = manifest_json();
    let manifest: Manifest = serde_json::from_value(original.clone()).unwrap();
    let written: serde_json::Value = serde_json::from_slice(&oci::canonical_json(&manifest)).unwrap();
    assert_eq!(written, original);
    assert_eq!(oci::annotation(&manifest.layers()[0], "c"), Some("3"));
    assert_eq!(oci::manifest_annotation(&manifest, "z"), Some("26"));
}

#[test]
fn a_document_is_written_the_same_bytes_every_time() {
    // Annotations are hash maps in the OCI types: their order differs between maps.
    let first = oci::canonical_json(&serde_json::from_value::<Manifest>(manifest_json()).unwrap());
    for _ in 0..20 {
        let again = oci::canonical_json(&serde_json::from_value::<Manifest>(manifest_json()).unwrap());
        assert_eq!(again, first);
    }
    let text = String::from_utf8(first).unwrap();
    let keys: Vec<usize> = ["\"v\"", "\"w\"", "\"x\"", "\"y\"", "\"z\""]
        .iter()
        .map(|k| text.find(k).unwrap())
        .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "annotations in key order: {text}");
}

#[test]
fn a_digest_that_is_not_one_is_refused_by_name() {
    let mut bad = manifest_json();
    bad["layers"][0]["digest"] = "sha256:../../etc/passwd".into();
    let err = serde_json::from_value::<Manifest>(bad).unwrap_err().to_string();
    assert!(err.contains("../../etc/passwd"), "{err}");
    let err = oci::descriptor(oci::OCI_LAYER_TAR, "sha256:short", 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("digest \"sha256:short\""), "{err}");
}
