//! The tags of a repository (`GET /v2/<name>/tags/list`), used to find the newest
//! petrel image a conversion can deduplicate against.

use super::RegistryClient;
use crate::error::{RegistryError, Result};

/// Most tags asked for in one listing (the distribution spec's `n`): registries
/// answer in lexical order, and a conversion looks at the last few only.
pub const MAX_LISTED_TAGS: usize = 1000;

/// The listing's body. Not `oci_spec::distribution::TagList`: that requires `tags`
/// to be a list, and registries answer `"tags": null` for a repository without tags.
#[derive(serde::Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl RegistryClient {
    /// Up to [`MAX_LISTED_TAGS`] tags of `repository`, as the registry lists them
    /// (lexical order); a repository that does not exist has none.
    pub fn list_tags(&self, repository: &str) -> Result<Vec<String>> {
        let path = format!("/v2/{repository}/tags/list?n={MAX_LISTED_TAGS}");
        let bytes = match self.get_small_json(&path, "application/json") {
            Ok(bytes) => bytes,
            Err(RegistryError::Status { status: 404, .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let list: TagList = serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadContent {
            what: format!("tag list of {repository}"),
            reason: e.to_string(),
        })?;
        let mut tags = list.tags.unwrap_or_default();
        tags.truncate(MAX_LISTED_TAGS);
        Ok(tags)
    }
}
