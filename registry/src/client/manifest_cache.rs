//! Manifests a run has already fetched, shared by the clients made from one
//! [`super::ClientOptions`]: a conversion asks the target repository for the
//! same few manifests from several places (the default dictionary's lookup, the
//! dictionary itself, the reuse check), each a round trip on a thin link.
//!
//! A manifest fetched by digest never changes. One fetched by tag, or a tag
//! found missing, is kept for the run: a conversion works from one view of the
//! repository, and a manifest it pushes under a tag replaces what it knew.

use std::collections::HashMap;
use std::sync::Mutex;

/// What a `GET` of a manifest answered: its bytes, media type and digest, or
/// that it does not exist.
pub type CachedManifest = Option<(Vec<u8>, String, String)>;

/// The manifests of one run, by registry, repository and reference.
#[derive(Debug, Default)]
pub struct ManifestCache {
    entries: Mutex<HashMap<(String, String, String), CachedManifest>>,
}

/// Manifests larger than this are not kept (a registry bounds them at 4 MiB;
/// we read up to 8).
const MAX_CACHED: usize = 8 << 20;
/// Entries kept at most: a run asks for a few dozen.
const MAX_ENTRIES: usize = 1024;

impl ManifestCache {
    pub(crate) fn get(&self, registry: &str, repository: &str, reference: &str) -> Option<CachedManifest> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(&(registry.to_string(), repository.to_string(), reference.to_string()))
            .cloned()
    }

    pub(crate) fn put(&self, registry: &str, repository: &str, reference: &str, answer: CachedManifest) {
        if answer.as_ref().is_some_and(|(bytes, ..)| bytes.len() > MAX_CACHED) {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            (registry.to_string(), repository.to_string(), reference.to_string()),
            answer,
        );
    }
}
