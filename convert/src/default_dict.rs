//! The chunk dictionary a conversion uses when `--chunk-dict` names none.
//!
//! petrel merges all layers of an image into one blob, so a new release converted
//! without a dictionary uploads every chunk again, even those its previous release
//! already stored in the same repository. By default a conversion therefore
//! deduplicates against the petrel image it most likely follows:
//! 1. the image under the target tag, when it is a petrel image (the tag being
//!    replaced: `app:latest`, `app:stable`);
//! 2. otherwise the newest petrel image among the last [`CANDIDATE_TAGS`] tags of the
//!    target repository (by the `org.opencontainers.image.created` annotation petrel
//!    writes; images without it count as oldest, then the lexically last tag wins).
//!
//! The dictionary lives in the target repository, so it is as trusted as the target
//! itself; every chunk it lends is still checked against its blake3 digest on read.

use crate::source::Source;
use crate::target::Target;
use petrel_registry::oci::{bootstrap_layer, Platform, ANNOTATION_FORMAT};
use petrel_registry::{ImageRef, Location};

/// How many tags of the target repository are looked at (the last ones listed).
pub const CANDIDATE_TAGS: usize = 16;
/// How many candidate manifests are fetched at once.
const PARALLEL_LOOKUPS: usize = 8;

/// The dictionary picked for a conversion, and why.
#[derive(Debug, Clone)]
pub struct DefaultDictionary {
    pub location: Location,
    pub why: &'static str,
}

/// The petrel image a conversion into `target` deduplicates against by default, if
/// the target repository (`target`, at `location`) holds one. `open` opens a location of the target's
/// registry with the target's credentials. Lookup failures only log: a conversion
/// never fails for want of a dictionary.
pub fn find(
    target: &Target,
    location: &Location,
    platform: &Platform,
    open: &(dyn Fn(&Location) -> crate::Result<Source> + Sync),
) -> Option<DefaultDictionary> {
    if tag_of(location).is_some() && created_if_petrel(location, platform, open).is_some() {
        return Some(DefaultDictionary {
            location: location.clone(),
            why: "the tag being replaced",
        });
    }
    let candidates = candidate_tags(target, location);
    let found: Vec<(String, Location)> = std::thread::scope(|scope| {
        candidates
            .chunks(PARALLEL_LOOKUPS)
            .flat_map(|batch| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|location| {
                        scope.spawn(move || {
                            created_if_petrel(location, platform, open).map(|created| (created, location.clone()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().ok().flatten())
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    found
        .into_iter()
        .max_by(|(a_created, a), (b_created, b)| (a_created, tag_of(a)).cmp(&(b_created, tag_of(b))))
        .map(|(_, location)| DefaultDictionary {
            location,
            why: "the newest petrel image in the target repository",
        })
}

/// The last [`CANDIDATE_TAGS`] tags of the target repository other than the target
/// tag and referrers fallback tags (`sha256-…`), as locations.
fn candidate_tags(target: &Target, location: &Location) -> Vec<Location> {
    let tags = match target.tags() {
        Ok(tags) => tags,
        Err(e) => {
            tracing::info!(
                "no default chunk dictionary: cannot list the tags of {}: {e}",
                target.describe()
            );
            return Vec::new();
        }
    };
    let own = tag_of(location);
    let mut chosen: Vec<&String> = tags
        .iter()
        .filter(|t| Some(t.as_str()) != own && !t.starts_with("sha256-"))
        .collect();
    chosen.sort();
    chosen.dedup();
    chosen
        .into_iter()
        .rev()
        .take(CANDIDATE_TAGS)
        .map(|tag| match location {
            Location::Registry(image) => Location::Registry(ImageRef {
                tag: Some(tag.clone()),
                digest: None,
                ..image.clone()
            }),
            Location::OciLayout { dir, .. } => Location::OciLayout {
                dir: dir.clone(),
                tag: Some(tag.clone()),
            },
            other => other.clone(),
        })
        .collect()
}

fn tag_of(location: &Location) -> Option<&str> {
    match location {
        Location::Registry(image) => image.tag.as_deref(),
        Location::OciLayout { tag, .. } => tag.as_deref(),
        _ => None,
    }
}

/// The `created` annotation (empty without one) of the image at `location` for
/// `platform`, if it is a petrel image.
fn created_if_petrel(
    location: &Location,
    platform: &Platform,
    open: &(dyn Fn(&Location) -> crate::Result<Source> + Sync),
) -> Option<String> {
    let source = open(location).ok()?;
    let (manifests, _) = source.manifests(false, platform).ok()?;
    let manifest = &manifests.first()?.manifest;
    if bootstrap_layer(manifest).is_none() || !manifest.annotations.contains_key(ANNOTATION_FORMAT) {
        return None;
    }
    Some(
        manifest
            .annotations
            .get(petrel_registry::client::referrers::ANNOTATION_CREATED)
            .cloned()
            .unwrap_or_default(),
    )
}
