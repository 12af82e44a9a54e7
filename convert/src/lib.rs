//! `petrel convert SOURCE TARGET`: pull an image, stream every layer through the
//! builder, and push the petrel image (blob layers, bootstrap layer, config and
//! an OCI manifest; an index with --all-platforms).

pub mod default_dict;
mod error;
mod layer_reading;
pub mod layer_records;
mod next_layer;
mod progress;
mod source;
mod streamed;
mod target;

pub use error::{ConvertError, Result};

pub use source::Source;
pub use streamed::{STREAM_FROM, STREAM_ONE_BLOB_FROM};
pub use target::Target;

use crate::error::{bail, Context};
use petrel_builder::{BuildOptions, ImageBuilder};
use petrel_format::layer_tar;
use petrel_registry::client::referrers::ANNOTATION_CREATED;
use petrel_registry::oci::*;
use petrel_registry::{ClientOptions, ImageRef, Location, RegistryClient};
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Instant;
use streamed::PushedBlob;

/// What one converted manifest produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertedManifest {
    pub source_digest: String,
    pub manifest_digest: String,
    pub platform: Option<String>,
    pub bootstrap_digest: String,
    pub bootstrap_size: u64,
    pub blobs: Vec<(String, u64)>,
    pub source_layers: usize,
    pub source_bytes: u64,
    pub files: u64,
    pub unique_chunks: u32,
    pub deduplicated_small_files: u64,
    pub uploaded_bytes: u64,
    pub skipped_blobs: usize,
    pub reused: bool,
    /// Source layers applied from their records in the target repository
    /// instead of fetched and read ([`layer_records`]).
    pub replayed_layers: usize,
    /// Layer records pushed with the image for later conversions.
    pub recorded_layers: usize,
}

/// The whole conversion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertSummary {
    pub source: String,
    pub target: String,
    /// The digest the target tag now points at (manifest or index).
    pub digest: String,
    pub manifests: Vec<ConvertedManifest>,
    /// The petrel images whose chunks were referenced instead of uploaded.
    pub chunk_dicts: Vec<UsedDictionary>,
    pub seconds: f64,
}

/// Counts and hashes the bytes of a layer stream as it is read.
pub(crate) struct Hashing<R> {
    pub(crate) inner: R,
    pub(crate) hasher: sha2::Sha256,
    pub(crate) bytes: u64,
    pub(crate) progress: Option<progress::LayerBar>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        if let Some(p) = &mut self.progress {
            p.read(n as u64);
        }
        Ok(n)
    }
}

/// Options of `petrel convert`.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub build: BuildOptions,
    pub all_platforms: bool,
    pub platform: Platform,
    pub progress: bool,
    pub work_dir: Option<std::path::PathBuf>,
    /// The profile behind `build.prefetch`, kept in the manifest for later conversions.
    pub profile: Option<petrel_format::profile::Profile>,
    /// Petrel images whose chunks the new image references instead of storing.
    pub chunk_dict: ChunkDictChoice,
    /// Apply the layer records that the chunk dictionaries of the target
    /// repository carry instead of reading those layers, and push the new image's
    /// ([`layer_records`]).
    pub layer_records: bool,
}

/// Which petrel images a conversion deduplicates against.
#[derive(Debug, Clone)]
pub enum ChunkDictChoice {
    /// These images (`--chunk-dict`).
    Named(Vec<Location>),
    /// `prefetch_from` when given (the release the profile came from), else the
    /// petrel image the target repository holds that this one most likely follows
    /// ([`default_dict`]).
    Default { prefetch_from: Option<Location> },
    /// None (`--no-chunk-dict`): every chunk is stored in the new image's blob.
    Disabled,
}

/// A chunk dictionary a conversion used, and why it was chosen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsedDictionary {
    pub image: String,
    pub why: String,
    pub chunks: usize,
}

pub fn client_for(image: &ImageRef, options: &ClientOptions) -> Result<RegistryClient> {
    Ok(RegistryClient::new(&image.registry, options)?)
}

/// Converts `source` (read with `source_options`) into `target` (written with
/// `target_options`, which also read the chunk dictionaries: they live with the target).
pub fn convert(
    source: &Location,
    target: &Location,
    source_options: &ClientOptions,
    target_options: &ClientOptions,
    options: &ConvertOptions,
) -> Result<ConvertSummary> {
    let started = Instant::now();
    // The target repository's manifests are asked for from several places (the
    // default dictionary's lookup, the dictionary, the reuse check): once each.
    let with_cache = |options: &ClientOptions| ClientOptions {
        manifest_cache: Some(Default::default()),
        ..options.clone()
    };
    let (source_options, target_options) = (&with_cache(source_options), &with_cache(target_options));
    if let Some(dir) = &options.work_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the work directory {}", dir.display()))?;
    }
    let source = Source::open(source, |image| client_for(image, source_options))?;
    let target_location = target;
    let target = match target {
        Location::Registry(image) => Target::Registry {
            client: Box::new(client_for(image, target_options)?),
            image: image.clone(),
        },
        Location::OciLayout { dir, tag } => Target::Layout {
            layout: petrel_registry::layout::OciLayout::create(dir)?,
            tag: tag.clone(),
        },
        other => bail!("cannot write to {other:?}: use docker:// or oci:"),
    };
    let open_with_target_options =
        |location: &Location| Source::open(location, |image| client_for(image, target_options));
    // The source's manifests and the default dictionary are looked up side by
    // side: each is a few round trips to its own registry.
    let (source_manifests, dictionaries) = std::thread::scope(|scope| {
        let manifests = scope.spawn(|| source.manifests(options.all_platforms, &options.platform));
        let dictionaries = dictionaries_to_load(options, &target, target_location, &open_with_target_options);
        let manifests = manifests
            .join()
            .unwrap_or_else(|_| Err(ConvertError::Invalid("reading the source's manifests panicked".into())));
        (manifests, dictionaries)
    });
    let (manifests, from_index) = source_manifests?;
    let mut dict = petrel_builder::dict::ChunkDict::default();
    let mut dict_sources = Vec::new();
    let mut used_dicts = Vec::new();
    let named = matches!(options.chunk_dict, ChunkDictChoice::Named(_));
    // Records stand in for layers (`layer_records`), kept with registry images.
    let recording = options.layer_records && matches!(target, Target::Registry { .. });
    let mut known_records = layer_records::KnownRecords::default();
    for (location, why) in dictionaries {
        // A dictionary picked by default that cannot be read only costs dedup.
        let records_of = recording.then_some(&target);
        match load_dictionary(
            &location,
            &options.platform,
            &dict,
            &open_with_target_options,
            records_of,
        ) {
            Ok((dict_source, extended, added, records)) => {
                tracing::info!("chunk dictionary {} ({why}): {added} chunks", dict_source.describe());
                dict = extended;
                known_records.merge(records);
                used_dicts.push(UsedDictionary {
                    image: dict_source.describe(),
                    why,
                    chunks: added,
                });
                dict_sources.push(dict_source);
            }
            Err(e) if !named => tracing::warn!("converting without the chunk dictionary {why}: {e}"),
            Err(e) => return Err(e),
        }
    }
    let mut options = options.clone();
    options.build.chunk_dict = std::sync::Arc::new(dict);
    options.build.record_layers = recording;
    let options = &options;
    let dictionaries = &Dictionaries {
        sources: &dict_sources,
        records: &known_records,
    };
    let write_index = options.all_platforms && from_index;
    let mut converted = Vec::new();
    let mut index_entries = Vec::new();
    // Platforms convert side by side where cores allow (each also builds on
    // several threads): one's network waits overlap another's chunking.
    let parallel = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_PARALLEL_PLATFORMS);
    let bars = options.progress.then(indicatif::MultiProgress::new);
    let results: Vec<Result<(ConvertedManifest, usize)>> = std::thread::scope(|scope| {
        manifests
            .chunks(parallel)
            .flat_map(|batch| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|source_manifest| {
                        let (source, target, bars) = (&source, &target, bars.as_ref());
                        scope.spawn(move || {
                            convert_one(
                                source,
                                target,
                                source_manifest,
                                options,
                                !write_index,
                                dictionaries,
                                bars,
                            )
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(ConvertError::Invalid("a platform's conversion panicked".into())))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    for (source_manifest, result) in manifests.iter().zip(results) {
        let (result, manifest_bytes) = result?;
        let mut entry = descriptor(OCI_MANIFEST, &result.manifest_digest, manifest_bytes as u64)?;
        entry.set_platform(source_manifest.platform.clone());
        index_entries.push(entry);
        converted.push(result);
    }
    let digest = if write_index {
        let mut index = empty_index();
        index.set_manifests(index_entries);
        index.set_annotations(annotations(BTreeMap::from([(
            ANNOTATION_FORMAT.to_string(),
            "1".to_string(),
        )])));
        let bytes = canonical_json(&index);
        target.put_manifest(&bytes, OCI_INDEX, true)?
    } else {
        converted[0].manifest_digest.clone()
    };
    Ok(ConvertSummary {
        source: source.describe(),
        target: target.describe(),
        digest,
        manifests: converted,
        chunk_dicts: used_dicts,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The chunk dictionaries to load and why: those `--chunk-dict` names, or the
/// default one (`--prefetch-from`, else one found in the target repository).
fn dictionaries_to_load(
    options: &ConvertOptions,
    target: &Target,
    target_location: &Location,
    open: &(dyn Fn(&Location) -> Result<Source> + Sync),
) -> Vec<(Location, String)> {
    match &options.chunk_dict {
        ChunkDictChoice::Named(locations) => locations
            .iter()
            .map(|l| (l.clone(), "named by --chunk-dict".into()))
            .collect(),
        ChunkDictChoice::Disabled => Vec::new(),
        ChunkDictChoice::Default {
            prefetch_from: Some(image),
        } => vec![(image.clone(), "the image --prefetch-from names".into())],
        ChunkDictChoice::Default { prefetch_from: None } => {
            default_dict::find(target, target_location, &options.platform, open)
                .map(|found| (found.location, found.why.to_string()))
                .into_iter()
                .collect()
        }
    }
}

/// The result of converting `source_manifest` if `existing` (a manifest's bytes)
/// already is its conversion (the same annotations, a bootstrap layer).
fn reuse(
    existing_bytes: &[u8],
    wanted: &BTreeMap<String, String>,
    source_manifest: &source::SourceManifest,
) -> Option<(ConvertedManifest, usize)> {
    let existing = serde_json::from_slice::<Manifest>(existing_bytes).ok()?;
    let mut annotations: BTreeMap<String, String> =
        existing.annotations().clone().unwrap_or_default().into_iter().collect();
    annotations.remove(ANNOTATION_CREATED);
    let bootstrap = bootstrap_layer(&existing).filter(|_| annotations == *wanted)?;
    Some((
        ConvertedManifest {
            source_digest: source_manifest.digest.clone(),
            manifest_digest: sha256_digest(existing_bytes),
            platform: source_manifest.platform.as_ref().map(platform_text),
            bootstrap_digest: bootstrap.digest().to_string(),
            bootstrap_size: bootstrap.size(),
            blobs: existing
                .layers()
                .iter()
                .filter(|l| petrel_role(l) == Some(ROLE_BLOB))
                .map(|l| (l.digest().to_string(), l.size()))
                .collect(),
            source_layers: source_manifest.manifest.layers().len(),
            source_bytes: 0,
            files: 0,
            unique_chunks: 0,
            deduplicated_small_files: 0,
            uploaded_bytes: 0,
            skipped_blobs: existing.layers().len(),
            reused: true,
            replayed_layers: 0,
            recorded_layers: 0,
        },
        existing_bytes.len(),
    ))
}

/// Whether `source` reads the repository `target` writes.
fn same_repository(source: &Source, target: &Target) -> bool {
    match (source, target) {
        (Source::Layout { layout: from, .. }, Target::Layout { layout: to, .. }) => from.dir() == to.dir(),
        _ => match (source.registry_repository(), target) {
            (Some((registry, repository)), Target::Registry { client, image }) => {
                client.registry() == registry && image.repository == repository
            }
            _ => false,
        },
    }
}

/// Platforms of an index converted at once, at most.
const MAX_PARALLEL_PLATFORMS: usize = 4;

/// The largest bootstrap of a chunk dictionary read into memory.
const MAX_DICT_BOOTSTRAP: u64 = 1 << 30;

/// `dict` extended with the chunks of the petrel image at `location`: the
/// image's source, the extended dictionary, how many chunks it added, and the
/// layer records it carries when `records_of` is the target and the image is in
/// its repository (looked up while the bootstrap downloads).
fn load_dictionary(
    location: &Location,
    platform: &Platform,
    dict: &petrel_builder::dict::ChunkDict,
    open: &dyn Fn(&Location) -> Result<Source>,
    records_of: Option<&Target>,
) -> Result<(
    Source,
    petrel_builder::dict::ChunkDict,
    usize,
    layer_records::KnownRecords,
)> {
    let dict_source = open(location)?;
    let (dict_manifests, _) = dict_source.manifests(false, platform)?;
    let chosen = dict_manifests.first().context("chunk dictionary without a manifest")?;
    let manifest = &chosen.manifest;
    let bootstrap = bootstrap_layer(manifest)
        .with_context(|| format!("chunk dictionary {} is not a petrel image", dict_source.describe()))?;
    let (layer, records) = std::thread::scope(|scope| {
        let records = records_of
            .filter(|target| same_repository(&dict_source, target))
            .map(|target| {
                let (source, digest) = (&dict_source, &chosen.digest);
                scope.spawn(move || {
                    let mut known = layer_records::KnownRecords::default();
                    match known.add_image(target, &source.describe(), digest) {
                        Ok(added) => tracing::info!("{added} layer records with {}", source.describe()),
                        Err(e) => tracing::warn!("no layer records from {}: {e}", source.describe()),
                    }
                    known
                })
            });
        let layer = dict_source.blob(bootstrap.digest().as_ref(), bootstrap.size().min(MAX_DICT_BOOTSTRAP));
        let records = records.and_then(|r| r.join().ok()).unwrap_or_default();
        (layer, records)
    });
    let layer = layer?;
    let layer = if bootstrap.media_type().as_ref() == OCI_LAYER_GZIP {
        let mut tar = Vec::new();
        layer_tar::gunzip_layer(layer_tar::BOOTSTRAP_ENTRY, &layer[..], &mut tar, MAX_DICT_BOOTSTRAP).with_context(
            || {
                format!(
                    "chunk dictionary {} layer {}",
                    dict_source.describe(),
                    bootstrap.digest()
                )
            },
        )?;
        tar
    } else {
        layer
    };
    let bytes = layer_tar::bootstrap_of_layer(&layer).with_context(|| {
        format!(
            "chunk dictionary {} layer {}",
            dict_source.describe(),
            bootstrap.digest()
        )
    })?;
    let mut extended = dict.clone();
    let added = extended
        .add_bootstrap(bytes)
        .with_context(|| format!("chunk dictionary {}", dict_source.describe()))?;
    Ok((dict_source, extended, added, records))
}

/// Converts one image manifest; returns the result and the manifest's size.
/// Makes sure the target has blob `digest` (a dictionary blob the new image
/// references): already there, mounted from the same registry, or copied.
fn ensure_blob(target: &Target, digest: &str, size: u64, sources: &[Source]) -> Result<u64> {
    if target.has_blob(digest)? {
        return Ok(0);
    }
    for source in sources {
        let mount_from = source.registry_repository().and_then(|(registry, repo)| match target {
            Target::Registry { client, .. } if client.registry() == registry => Some(repo.to_string()),
            _ => None,
        });
        let Ok(mut reader) = source.layer(digest) else { continue };
        let mut temp = tempfile::NamedTempFile::new()?;
        let mut hashing = Hashing {
            inner: &mut reader,
            hasher: sha2::Sha256::new(),
            bytes: 0,
            progress: None,
        };
        std::io::copy(&mut hashing, &mut temp)?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != digest || hashing.bytes != size {
            bail!(
                "dictionary blob {digest} from {} does not match its digest",
                source.describe()
            );
        }
        return Ok(if target.put_blob_file(digest, temp.path(), mount_from.as_deref())? {
            size
        } else {
            0
        });
    }
    bail!("no chunk dictionary source holds blob {digest}")
}

/// The chunk dictionaries a conversion loaded, and the layer records they carry.
struct Dictionaries<'a> {
    sources: &'a [Source],
    records: &'a layer_records::KnownRecords,
}

fn convert_one(
    source: &Source,
    target: &Target,
    source_manifest: &source::SourceManifest,
    options: &ConvertOptions,
    tag_it: bool,
    dictionaries: &Dictionaries<'_>,
    bars: Option<&indicatif::MultiProgress>,
) -> Result<(ConvertedManifest, usize)> {
    let (dict_sources, known_records) = (dictionaries.sources, dictionaries.records);
    let manifest = &source_manifest.manifest;
    if bootstrap_layer(manifest).is_some() {
        bail!("{} is already a petrel image", source.describe());
    }
    // Re-running the same conversion: the target already holds it, under its tag
    // or (the default dictionary, in the same repository) under another one, which
    // the target tag then names too: the same source converts to the same image.
    let wanted = manifest_annotations(&source_manifest.digest, options.profile.as_ref(), &options.build);
    let count = manifest.layers().len();
    let layer_digests: Vec<String> = manifest.layers().iter().map(|l| l.digest().to_string()).collect();
    // The config is fetched while the target is asked for its current manifest
    // and for the records of the layers it holds them of.
    let (current, config_bytes, replay) = std::thread::scope(|scope| {
        let config = scope.spawn(|| {
            source
                .small_blob(manifest.config().digest().as_ref())
                .context("fetching the image config")
        });
        let replay = scope.spawn(|| {
            if known_records.is_empty() {
                return vec![None; count];
            }
            known_records.fetch(target, &layer_digests, &options.build)
        });
        let current = if tag_it { target.current_manifest() } else { None };
        let config = config
            .join()
            .unwrap_or_else(|_| Err(ConvertError::Invalid("fetching the image config panicked".into())));
        let replay = replay.join().unwrap_or_else(|_| vec![None; count]);
        (current, config, replay)
    });
    if let Some(current) = current {
        if let Some(reused) = reuse(&current, &wanted, source_manifest) {
            tracing::info!(
                "{} already holds the conversion of {}",
                target.describe(),
                source_manifest.digest
            );
            return Ok(reused);
        }
    }
    for dict in dict_sources.iter().filter(|d| same_repository(d, target)) {
        let Ok((candidates, _)) = dict.manifests(false, &options.platform) else {
            continue;
        };
        let Some(candidate) = candidates.first() else { continue };
        let Ok((bytes, media_type, _)) = dict.fetch_manifest(Some(&candidate.digest)) else {
            continue;
        };
        if let Some(reused) = reuse(&bytes, &wanted, source_manifest) {
            tracing::info!(
                "{} is already the conversion of {}",
                dict.describe(),
                source_manifest.digest
            );
            target.put_manifest(&bytes, &media_type, tag_it)?;
            return Ok(reused);
        }
    }
    let config_bytes = config_bytes?;
    let work = match &options.work_dir {
        Some(dir) => {
            tempfile::tempdir_in(dir).with_context(|| format!("a temporary directory in {}", dir.display()))?
        }
        None => tempfile::tempdir()?,
    };
    let out = work.path().join("image");
    let mut builder = ImageBuilder::new(options.build.clone(), &out)?;
    let replayed_layers = replay.iter().flatten().count();
    let mount_from = source.registry_repository().and_then(|(registry, repo)| match target {
        Target::Registry { client, .. } if client.registry() == registry => Some(repo.to_string()),
        _ => None,
    });
    // Each layer's new chunks are sealed into blobs of their own and pushed on
    // other threads while the layer and the next ones stream in: pulling,
    // building and pushing overlap.
    type Sealed = petrel_builder::Result<petrel_builder::pipeline::SealedBlob>;
    let (sealed_tx, sealed_rx) = std::sync::mpsc::channel::<Sealed>();
    let sealed_rx = std::sync::Mutex::new(sealed_rx);
    // Blobs written while a layer streams in go up while they grow, one after
    // the other, as they are written (a registry only: a layout takes files).
    let (opened_tx, opened_rx) =
        std::sync::mpsc::channel::<std::sync::Arc<petrel_builder::growing_blob::GrowingBlob>>();
    let opened_tx = matches!(target, Target::Registry { .. }).then_some(opened_tx);
    let (
        report,
        source_bytes,
        pushed_early,
        ((uploaded, skipped), rest, manifest_digest, manifest_len, recorded_layers),
    ) = std::thread::scope(|scope| -> Result<_> {
        let mount_from = mount_from.as_deref();
        let pushers: Vec<_> = (0..layer_reading::PUSHERS)
            .map(|_| {
                let sealed_rx = &sealed_rx;
                scope.spawn(move || -> Result<Vec<PushedBlob>> {
                    let mut pushed = Vec::new();
                    while let Some(sealed) = layer_reading::next_sealed(sealed_rx) {
                        let sealed = sealed?;
                        // The streamer below has it.
                        if !sealed.streamed {
                            pushed.push(layer_reading::push_sealed(target, &sealed, mount_from, bars)?);
                        }
                    }
                    Ok(pushed)
                })
            })
            .chain(std::iter::once(scope.spawn(move || -> Result<Vec<PushedBlob>> {
                // Each blob's upload starts when it opens, while the one before
                // may still be sending its last bytes: no round trip between
                // them leaves the link idle.
                let uploads: Vec<_> = opened_rx
                    .into_iter()
                    .map(|blob| scope.spawn(move || streamed::upload_growing(target, &blob, mount_from, bars)))
                    .collect();
                let mut pushed = Vec::new();
                for upload in uploads {
                    let blob = upload
                        .join()
                        .map_err(|_| ConvertError::Invalid("a blob uploading thread panicked".into()))??;
                    pushed.push(blob);
                }
                Ok(pushed)
            })))
            .collect();
        let read = layer_reading::read_layers(
            &mut builder,
            source,
            manifest,
            &replay,
            options,
            bars,
            &sealed_tx,
            opened_tx.as_ref(),
        );
        drop(sealed_tx);
        drop(opened_tx);
        // The pusher stops once every sender is gone: the build's own (auto-seal)
        // goes with its pipeline, at `finish` or when the build is dropped.
        let finished = match read {
            Ok(source_bytes) => builder
                .finish()
                .map(|report| (report, source_bytes))
                .map_err(Into::into),
            Err(e) => {
                drop(builder);
                Err(e)
            }
        };
        // The rest goes up while the pushers finish the last sealed blobs, and
        // the layer records beside it: the manifest they refer to is known
        // before anything of the rest is sent (and need not be there first).
        let finished = finished.and_then(|(mut report, source_bytes)| {
            let (to_record, layer_digests) = (std::mem::take(&mut report.layer_records), &layer_digests);
            let rest = prepare_rest(&report, &out, &config_bytes)?;
            let manifest_bytes = petrel_manifest(&rest, source_manifest, options, &config_bytes)?;
            let subject = (sha256_digest(&manifest_bytes), manifest_bytes.len() as u64);
            let created = image_created(&config_bytes);
            let records = scope.spawn(move || {
                layer_records::push(
                    target,
                    (&subject.0, subject.1),
                    layer_digests,
                    &to_record,
                    created.as_deref(),
                )
            });
            let uploads = upload_rest(
                target,
                &report,
                &rest,
                &out,
                &options.build.chunk_dict,
                mount_from,
                dict_sources,
                bars,
            );
            Ok((report, source_bytes, (uploads?, rest, manifest_bytes, records)))
        });
        let mut pushed = Vec::new();
        let mut push_failure = None;
        for pusher in pushers {
            match pusher.join() {
                Ok(Ok(blobs)) => pushed.extend(blobs),
                Ok(Err(e)) => push_failure = push_failure.or(Some(e)),
                Err(_) => {
                    push_failure = push_failure.or(Some(ConvertError::Invalid("a blob pushing thread panicked".into())))
                }
            }
        }
        let (report, source_bytes, (uploads, rest, manifest_bytes, records)) = finished?;
        if let Some(e) = push_failure {
            return Err(e);
        }
        // The manifest goes up while the layer records may still be going:
        // they name it as their subject, and need not be there first.
        let manifest_digest = target.put_manifest(&manifest_bytes, OCI_MANIFEST, tag_it);
        let recorded = match records.join() {
            Ok(Ok(recorded)) => recorded,
            Ok(Err(e)) => {
                tracing::warn!("the layer records were not pushed (the next release reads every layer): {e}");
                0
            }
            Err(_) => 0,
        };
        Ok((
            report,
            source_bytes,
            pushed,
            (uploads, rest, manifest_digest?, manifest_bytes.len(), recorded),
        ))
    })?;
    let (mut uploaded, mut skipped) = (uploaded, skipped);
    for early in &pushed_early {
        if early.uploaded {
            uploaded += early.size;
        } else {
            skipped += 1;
        }
    }
    let Rest {
        bootstrap_digest,
        bootstrap_size,
        ..
    } = rest;
    Ok((
        ConvertedManifest {
            source_digest: source_manifest.digest.clone(),
            manifest_digest,
            platform: source_manifest.platform.as_ref().map(platform_text),
            bootstrap_digest,
            bootstrap_size,
            blobs: report
                .output
                .blob
                .iter()
                .map(|b| (b.digest.clone(), b.size))
                .chain(pushed_early.iter().map(|p| (p.digest.clone(), p.size)))
                .collect(),
            source_layers: count,
            source_bytes,
            files: report.data.files,
            unique_chunks: report.output.chunks,
            deduplicated_small_files: report.data.deduplicated_small_files,
            uploaded_bytes: uploaded,
            skipped_blobs: skipped,
            reused: false,
            replayed_layers,
            recorded_layers,
        },
        manifest_len,
    ))
}

/// The petrel image's manifest: `rest`'s layers and config, the source as its
/// subject, and the annotations a later conversion finds it by.
fn petrel_manifest(
    rest: &Rest,
    source_manifest: &source::SourceManifest,
    options: &ConvertOptions,
    config_bytes: &[u8],
) -> Result<Vec<u8>> {
    let config = descriptor(OCI_CONFIG, &rest.config_digest, rest.config.len() as u64)?;
    let mut new_manifest = image_manifest(config, rest.layers.clone());
    // The source image, so signature and SBOM tooling finds one from the other
    // (the referrers API lists the petrel image under the original).
    new_manifest.set_subject(Some(descriptor(
        &source_manifest.media_type,
        &source_manifest.digest,
        source_manifest.size,
    )?));
    // When the source image was built: the default chunk dictionary of the next
    // conversion into this repository is the newest petrel image. Taken from the
    // image (not the clock), so conversions stay reproducible.
    let mut manifest_annotations =
        manifest_annotations(&source_manifest.digest, options.profile.as_ref(), &options.build);
    if let Some(created) = image_created(config_bytes) {
        manifest_annotations.insert(ANNOTATION_CREATED.to_string(), created);
    }
    new_manifest.set_annotations(annotations(manifest_annotations));
    Ok(canonical_json(&new_manifest))
}

/// What a finished build leaves to push besides its sealed blobs
/// ([`prepare_rest`]): the image's layers (the bootstrap last) and its config.
struct Rest {
    layers: Vec<Descriptor>,
    bootstrap_digest: String,
    bootstrap_size: u64,
    /// The bootstrap layer, gzipped, for the upload.
    bootstrap_file: tempfile::NamedTempFile,
    config: Vec<u8>,
    config_digest: String,
}

/// Lays out what a finished build leaves to push besides its sealed blobs: the
/// bootstrap layer (gzipped into a file) and the config, and the layer list the
/// manifest names.
fn prepare_rest(report: &petrel_builder::BuildReport, out: &std::path::Path, source_config: &[u8]) -> Result<Rest> {
    let image_dir = petrel_format::image_dir::ImageDir::new(out);
    let bootstrap_bytes = std::fs::read(image_dir.bootstrap_path())?;
    let superblock = petrel_format::Bootstrap::open(&bootstrap_bytes)?.superblock().digest;
    // The bootstrap travels as a one-entry tar layer, like the blobs, gzipped: it
    // is fetched whole before a mount, and compresses about 4x (spec §14).
    let (bootstrap_layer, bootstrap_diff_id) = layer_tar::gzipped_bootstrap_layer(&bootstrap_bytes);
    let bootstrap_digest = sha256_digest(&bootstrap_layer);
    let mut bootstrap_file = tempfile::NamedTempFile::new_in(image_dir.root())?;
    bootstrap_file.write_all(&bootstrap_layer)?;
    let mut layers = Vec::new();
    for blob in report.output.blob.iter().chain(&report.output.dict_blobs) {
        layers.push(blob_layer(&blob.digest, blob.size)?);
    }
    // Blob layers are uncompressed: their digests are their diff_ids.
    let mut diff_ids: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
    diff_ids.push(format!("sha256:{}", hex::encode(bootstrap_diff_id)));
    let mut bootstrap_descriptor = descriptor(OCI_LAYER_GZIP, &bootstrap_digest, bootstrap_layer.len() as u64)?;
    let mut bootstrap_annotations = petrel_layer_annotations(ROLE_BOOTSTRAP);
    bootstrap_annotations.insert(ANNOTATION_BOOTSTRAP_BLAKE3.to_string(), hex::encode(superblock));
    bootstrap_descriptor.set_annotations(annotations(bootstrap_annotations));
    layers.push(bootstrap_descriptor);
    let config = converted_config(source_config, &diff_ids)?;
    let config_digest = sha256_digest(&config);
    Ok(Rest {
        layers,
        bootstrap_size: bootstrap_layer.len() as u64,
        bootstrap_digest,
        bootstrap_file,
        config,
        config_digest,
    })
}

/// Sends what [`prepare_rest`] laid out, all at once (each upload's round trips
/// overlap the others'): the blob `finish` wrote, the chunk dictionaries' blobs
/// the target lacks, the bootstrap layer and the config. Returns the bytes
/// uploaded and the blobs the target had already.
#[allow(clippy::too_many_arguments)]
fn upload_rest(
    target: &Target,
    report: &petrel_builder::BuildReport,
    rest: &Rest,
    out: &std::path::Path,
    dict: &petrel_builder::dict::ChunkDict,
    mount_from: Option<&str>,
    dict_sources: &[Source],
    bars: Option<&indicatif::MultiProgress>,
) -> Result<(u64, usize)> {
    let image_dir = petrel_format::image_dir::ImageDir::new(out);
    let (bootstrap_digest, config) = (&rest.bootstrap_digest, &rest.config);
    // Each upload answers the bytes it sent, or None when the target had them.
    let uploads: Vec<Result<Option<u64>>> = std::thread::scope(|scope| {
        let mut tasks: Vec<std::thread::ScopedJoinHandle<'_, Result<Option<u64>>>> = Vec::new();
        for blob in report.output.blob.iter() {
            let path = image_dir.blobs_dir().join(blob.digest.trim_start_matches("sha256:"));
            tasks.push(scope.spawn(move || {
                let bar = bars.map(|bars| progress::PushBar::new("blob", blob.size, bars));
                let reporting = bar.as_ref().map(progress::PushBar::on_bytes);
                let pushed = target.put_blob_file_reporting(&blob.digest, &path, mount_from, reporting)?;
                if let Some(bar) = bar {
                    bar.finish();
                }
                Ok(pushed.then_some(blob.size))
            }));
        }
        // Chunk dictionaries' blobs; the others `dict_blobs` names are the sealed
        // ones, which the pushers send.
        for blob in &report.output.dict_blobs {
            if dict
                .blobs
                .iter()
                .any(|known| format!("sha256:{}", hex::encode(known.digest)) == blob.digest)
            {
                tasks.push(scope.spawn(move || ensure_blob(target, &blob.digest, blob.size, dict_sources).map(Some)));
            }
        }
        let bootstrap_path = rest.bootstrap_file.path();
        let bootstrap = (bootstrap_digest, rest.bootstrap_size);
        tasks.push(scope.spawn(move || {
            Ok(target
                .put_blob_file(bootstrap.0, bootstrap_path, None)?
                .then_some(bootstrap.1))
        }));
        // Not counted among the uploads, as the manifest is not.
        tasks.push(scope.spawn(move || target.put_bytes(config).map(|_| Some(0))));
        tasks
            .into_iter()
            .map(|task| {
                task.join()
                    .unwrap_or_else(|_| Err(ConvertError::Invalid("a pushing thread panicked".into())))
            })
            .collect()
    });
    let mut uploaded = 0u64;
    let mut skipped = 0usize;
    for upload in uploads {
        match upload? {
            Some(bytes) => uploaded += bytes,
            None => skipped += 1,
        }
    }
    Ok((uploaded, skipped))
}

/// The source config with `rootfs.diff_ids` naming the new layers and without the
/// per-layer history that no longer matches.
fn converted_config(source: &[u8], diff_ids: &[String]) -> Result<Vec<u8>> {
    let mut config: serde_json::Value = serde_json::from_slice(source).context("the image config is not JSON")?;
    let object = config
        .as_object_mut()
        .context("the image config is not a JSON object")?;
    object.insert(
        "rootfs".into(),
        serde_json::json!({ "type": "layers", "diff_ids": diff_ids }),
    );
    object.remove("history");
    Ok(serde_json::to_vec(&config)?)
}

/// When the image was built: `SOURCE_DATE_EPOCH` when set (reproducible builds),
/// else the `created` of its config.
fn image_created(config: &[u8]) -> Option<String> {
    if let Some(secs) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(petrel_registry::oci::rfc3339(secs));
    }
    let config: serde_json::Value = serde_json::from_slice(config).ok()?;
    config.get("created")?.as_str().map(str::to_string)
}

/// The annotation naming a conversion's chunker and zstd level where either is not
/// the default: a conversion asked for with other ones is not the one the target
/// holds. (Absent for the defaults, so conversions made before it are still found.)
const ANNOTATION_ENCODING: &str = "dev.petrel.encoding";

fn manifest_annotations(
    source: &str,
    profile: Option<&petrel_format::profile::Profile>,
    build: &BuildOptions,
) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (ANNOTATION_FORMAT.to_string(), "1".to_string()),
        (ANNOTATION_SOURCE.to_string(), source.to_string()),
    ]);
    let defaults = BuildOptions::default();
    if build.chunker != defaults.chunker || build.compression_level != defaults.compression_level {
        annotations.insert(
            ANNOTATION_ENCODING.to_string(),
            format!("chunker={}; zstd={}", build.chunker, build.compression_level),
        );
    }
    if let Some(text) = profile.and_then(|p| serde_json::to_string(p).ok()) {
        if text.len() <= MAX_ANNOTATED_PROFILE {
            annotations.insert(ANNOTATION_PROFILE.to_string(), text);
        } else {
            tracing::warn!(
                "the prefetch profile ({} bytes) is too large to keep in the manifest",
                text.len()
            );
        }
    }
    annotations
}

/// The prefetch profile kept in a converted image's manifest.
pub fn profile_of(image: &Location, client_options: &ClientOptions) -> Result<petrel_format::profile::Profile> {
    let source = Source::open(image, |image| client_for(image, client_options))?;
    let (manifests, _) = source.manifests(false, &host_platform())?;
    let manifest = &manifests.first().context("no manifest")?.manifest;
    let text = manifest_annotation(manifest, ANNOTATION_PROFILE)
        .with_context(|| format!("{} carries no prefetch profile", source.describe()))?;
    petrel_format::profile::Profile::parse(text.as_bytes())
        .map_err(|e| ConvertError::Invalid(format!("{}: {e}", source.describe())))
}

/// The manifest's descriptor of a petrel blob layer.
fn blob_layer(digest: &str, size: u64) -> Result<Descriptor> {
    let mut layer = descriptor(PETREL_LAYER, digest, size)?;
    layer.set_annotations(annotations(petrel_layer_annotations(ROLE_BLOB)));
    Ok(layer)
}
