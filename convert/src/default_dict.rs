//! The chunk dictionary a conversion uses when `--chunk-dict` names none.
//!
//! petrel merges all layers of an image into one blob, so a new release converted
//! without a dictionary uploads every chunk again, even those its previous release
//! already stored in the same repository. By default a conversion therefore
//! deduplicates against the petrel image it most likely follows:
//! 1. the image under the target tag, when it is a petrel image (the tag being
//!    replaced: `app:latest`, `app:stable`);
//! 2. otherwise the newest petrel image among [`CANDIDATE_TAGS`] tags of the target
//!    repository, those named most like the target tag first (the longest common
//!    suffix: `1.4-petrel` for `1.5-petrel`), then the lexically last; newest by the
//!    `org.opencontainers.image.created` annotation petrel writes (the source
//!    image's build time); images without it count as oldest, then the lexically
//!    last tag wins.
//!
//! The dictionary lives in the target repository, so it is as trusted as the target
//! itself; every chunk it lends is still checked against its blake3 digest on read.

use crate::source::Source;
use crate::target::Target;
use petrel_registry::oci::{bootstrap_layer, manifest_annotation, Platform, ANNOTATION_FORMAT};
use petrel_registry::{ImageRef, Location};

/// How many tags of the target repository are looked at.
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
    // The tag being replaced and the repository's tags are asked for at once.
    let (replaced, candidates) = std::thread::scope(|scope| {
        let candidates = scope.spawn(|| candidate_tags(target, location));
        let replaced = tag_of(location).is_some() && created_if_petrel(location, platform, open).is_some();
        (replaced, candidates.join().unwrap_or_default())
    });
    if replaced {
        return Some(DefaultDictionary {
            location: location.clone(),
            why: "the tag being replaced",
        });
    }
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

/// [`CANDIDATE_TAGS`] tags of the target repository other than the target tag and
/// referrers fallback tags (`sha256-…`), as locations: those sharing the longest
/// suffix with the target tag, then the lexically last.
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
    ranked_tags(&tags, tag_of(location).unwrap_or(""))
        .into_iter()
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

/// At most [`CANDIDATE_TAGS`] of `tags`, without `own` and referrers fallback tags
/// (`sha256-…`): tags named like `own` first (`1.4-petrel` for `1.5-petrel`, in a
/// repository that also holds `1.4` and `1.5`), then the lexically last.
fn ranked_tags<'t>(tags: &'t [String], own: &str) -> Vec<&'t String> {
    let mut ranked: Vec<&String> = tags
        .iter()
        .filter(|t| t.as_str() != own && !t.starts_with("sha256-"))
        .collect();
    ranked.sort_by(|a, b| {
        (common_suffix(a, own), a.as_str())
            .cmp(&(common_suffix(b, own), b.as_str()))
            .reverse()
    });
    ranked.dedup();
    ranked.truncate(CANDIDATE_TAGS);
    ranked
}

/// How many trailing bytes `a` and `b` share.
fn common_suffix(a: &str, b: &str) -> usize {
    a.bytes().rev().zip(b.bytes().rev()).take_while(|(x, y)| x == y).count()
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
    if bootstrap_layer(manifest).is_none() || manifest_annotation(manifest, ANNOTATION_FORMAT).is_none() {
        return None;
    }
    Some(
        manifest_annotation(manifest, petrel_registry::client::referrers::ANNOTATION_CREATED)
            .unwrap_or_default()
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_named_like_the_target_come_first_then_the_lexically_last() {
        let mut tags: Vec<String> = ["1.3-petrel", "1.4", "1.4-petrel", "1.5", "1.5-petrel", "sha256-ab"]
            .map(String::from)
            .to_vec();
        tags.extend((0..40).map(|i| format!("sha-{i:02}")));
        let ranked = ranked_tags(&tags, "1.5-petrel");
        assert_eq!(ranked.len(), CANDIDATE_TAGS);
        assert_eq!(ranked[..2], [&tags[2], &tags[0]], "{ranked:?}");
        assert_eq!(ranked[2], "sha-39");
        assert!(!ranked.iter().any(|t| *t == "1.5-petrel" || t.starts_with("sha256-")));
        // Plain version tags: the lexically last first.
        let tags: Vec<String> = ["1.0", "1.1", "0.9"].map(String::from).to_vec();
        assert_eq!(ranked_tags(&tags, "latest"), [&tags[1], &tags[0], &tags[2]]);
    }
}
