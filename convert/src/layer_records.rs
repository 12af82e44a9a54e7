//! Layer records in the target repository (`format-spec.md` §16): a converted
//! image's referrer artifact holds a record per source layer, so that the next
//! conversion into the repository applies the records of the layers it shares
//! with that image (a new release's unchanged base and dependency layers)
//! instead of fetching and reading them again.
//!
//! Only records with a chunk dictionary of the target repository are used: a
//! record stands in for a layer's content, so it is trusted only as far as the
//! target itself, whose writers could tag any image anyway. A record that cannot
//! be read or applied only costs the layer's fetch: it is read from its source.

use crate::target::Target;
use petrel_format::layer_record::LayerRecord;
use petrel_registry::oci::{annotation, descriptor, is_media_type, Descriptor, OCI_MANIFEST};
use std::collections::{BTreeMap, HashMap};

/// The artifact type of a converted image's layer records.
pub const LAYER_RECORDS_ARTIFACT_TYPE: &str = "application/vnd.dev.petrel.layer-records.v1";
/// The media type of one layer's record (a blob of the artifact).
pub const LAYER_RECORD_MEDIA_TYPE: &str = "application/vnd.dev.petrel.layer-record.v1+zstd";
/// The annotation of a record blob naming the source layer (its digest).
pub const ANNOTATION_SOURCE_LAYER: &str = "dev.petrel.source.layer";
/// The largest record blob fetched.
const MAX_RECORD_BLOB: u64 = 64 << 20;
/// The most a record may inflate to.
const MAX_RECORD_BYTES: usize = 512 << 20;

/// The records a petrel image of the target repository carries, by source layer.
#[derive(Debug, Default, Clone)]
pub struct KnownRecords {
    /// Source layer digest → the record blob, and the image it came with.
    by_layer: HashMap<String, (Descriptor, String)>,
}

impl KnownRecords {
    pub fn is_empty(&self) -> bool {
        self.by_layer.is_empty()
    }

    /// Adds the records `other` knows of layers this does not.
    pub fn merge(&mut self, other: KnownRecords) {
        for (layer, blob) in other.by_layer {
            self.by_layer.entry(layer).or_insert(blob);
        }
    }

    /// Adds the records carried by manifest `manifest_digest` of the target
    /// repository (none is not an error).
    pub fn add_image(&mut self, target: &Target, image: &str, manifest_digest: &str) -> crate::Result<usize> {
        let Target::Registry {
            client,
            image: target_image,
        } = target
        else {
            return Ok(0);
        };
        let repository = &target_image.repository;
        let Some(artifact) = client.newest_referrer(repository, manifest_digest, LAYER_RECORDS_ARTIFACT_TYPE)? else {
            return Ok(0);
        };
        let manifest = client.artifact_manifest(repository, artifact.digest().as_ref())?;
        let mut added = 0;
        for layer in manifest.layers() {
            let Some(source_layer) = annotation(layer, ANNOTATION_SOURCE_LAYER) else {
                continue;
            };
            if is_media_type(&Some(layer.media_type().clone()), LAYER_RECORD_MEDIA_TYPE)
                && layer.size() <= MAX_RECORD_BLOB
                && self
                    .by_layer
                    .insert(source_layer.to_string(), (layer.clone(), image.to_string()))
                    .is_none()
            {
                added += 1;
            }
        }
        Ok(added)
    }

    /// For each of `layers` (source layer digests), its record if the target
    /// holds one this build can apply; fetched side by side. A record that cannot
    /// be fetched, read or applied is logged and left out.
    pub fn fetch(
        &self,
        target: &Target,
        layers: &[String],
        build: &petrel_builder::BuildOptions,
    ) -> Vec<Option<LayerRecord>> {
        let (encoding, dict) = (&build.record_encoding(), &*build.chunk_dict);
        let prefetch = &petrel_builder::prefetch_set::PrefetchSet::new(&build.prefetch);
        let Target::Registry { client, image } = target else {
            return vec![None; layers.len()];
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = layers
                .iter()
                .map(|layer| {
                    let blob = self.by_layer.get(layer);
                    scope.spawn(move || -> Option<LayerRecord> {
                        let (blob, from) = blob?;
                        let fetched = client
                            .get_blob_verified(&image.repository, blob.digest().as_ref(), blob.size())
                            .map_err(|e| e.to_string())
                            .and_then(|bytes| LayerRecord::decode(&bytes, MAX_RECORD_BYTES).map_err(|e| e.to_string()))
                            .and_then(|record| {
                                petrel_builder::record::replayable(&record, encoding, dict, prefetch).map(|()| record)
                            });
                        match fetched {
                            Ok(record) => Some(record),
                            Err(why) => {
                                tracing::warn!(
                                    "reading layer {layer} from its source: its record {} in {} is not usable: {why}",
                                    blob.digest(),
                                    from
                                );
                                None
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().ok().flatten()).collect()
        })
    }
}

/// Encodes and pushes the records of a finished build (`records[i]` is source
/// layer `layers[i]`'s, if it has one): their descriptors, for [`push_artifact`].
fn push_records(target: &Target, layers: &[String], records: &[Option<LayerRecord>]) -> crate::Result<Vec<Descriptor>> {
    let pushed: Vec<crate::Result<Option<Descriptor>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = layers
            .iter()
            .zip(records)
            .map(|(layer, record)| {
                scope.spawn(move || -> crate::Result<Option<Descriptor>> {
                    let Some(record) = record else { return Ok(None) };
                    let record = record.encode();
                    let digest = target.put_bytes(&record)?;
                    let mut blob = descriptor(LAYER_RECORD_MEDIA_TYPE, &digest, record.len() as u64)?;
                    blob.set_annotations(Some(
                        [(ANNOTATION_SOURCE_LAYER.to_string(), layer.clone())]
                            .into_iter()
                            .collect(),
                    ));
                    Ok(Some(blob))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(crate::ConvertError::Invalid("a record pushing thread panicked".into())))
            })
            .collect()
    });
    let mut blobs = Vec::new();
    for blob in pushed {
        blobs.extend(blob?);
    }
    Ok(blobs)
}

/// Pushes the records of a finished build (`records[i]` is source layer
/// `layers[i]`'s, if it has one) as the artifact of the image manifest `subject`
/// (digest and size); `created` names the newest of several. Returns how many.
pub fn push(
    target: &Target,
    subject: (&str, u64),
    layers: &[String],
    records: &[Option<LayerRecord>],
    created: Option<&str>,
) -> crate::Result<usize> {
    let Target::Registry { client, image } = target else {
        return Ok(0);
    };
    if records.iter().all(Option::is_none) {
        return Ok(0);
    }
    let subject = descriptor(OCI_MANIFEST, subject.0, subject.1)?;
    let annotations: BTreeMap<String, String> = created
        .map(|c| {
            (
                petrel_registry::client::referrers::ANNOTATION_CREATED.to_string(),
                c.to_string(),
            )
        })
        .into_iter()
        .collect();
    let mut pushed = 0;
    let blobs = || {
        let blobs = push_records(target, layers, records).map_err(|e| petrel_registry::RegistryError::BadContent {
            what: "layer records".into(),
            reason: e.to_string(),
        })?;
        pushed = blobs.len();
        Ok(blobs)
    };
    client.push_artifact(
        &image.repository,
        &subject,
        LAYER_RECORDS_ARTIFACT_TYPE,
        blobs,
        annotations,
    )?;
    Ok(pushed)
}
