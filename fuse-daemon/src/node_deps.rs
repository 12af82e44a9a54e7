//! The packages a Node package depends on (the `dependencies` of its
//! `package.json`), found in the image where `require` would find them. Loading a
//! package loads its dependencies one after another, each a round trip for its
//! `package.json` and another for its first script; read ahead, they come together
//! in the background.
//!
//! A `package.json` comes from a stranger's image: it is read up to
//! `MAX_MANIFEST_BYTES`, at most `MAX_DEPENDENCIES` names are taken, and names that
//! would leave the package directories (absolute, `..`) are ignored.

use crate::elf_needs::resolve;
use petrel_format::layout::ROOT_INO;
use petrel_format::{Bootstrap, FileKind};

/// Largest `package.json` read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Most dependencies taken from one package.
const MAX_DEPENDENCIES: usize = 256;
/// Ancestors looked at for `node_modules` directories.
const MAX_DEPTH: usize = 32;
/// Where Node looks last: Debian's packaged modules and npm's global ones.
const GLOBAL_DIRS: [&[u8]; 3] = [b"usr/share/nodejs", b"usr/lib/nodejs", b"usr/local/lib/node_modules"];

/// The names in the `dependencies` of a `package.json`; none when it does not parse.
pub fn dependency_names(manifest: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        dependencies: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let Ok(manifest) = serde_json::from_slice::<Manifest>(manifest) else {
        return Vec::new();
    };
    manifest
        .dependencies
        .unwrap_or_default()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| is_package_name(name))
        .take(MAX_DEPENDENCIES)
        .collect()
}

/// A package name (`name` or `@scope/name`) that stays where packages are.
fn is_package_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    let scoped = parts.len() == 2 && parts[0].starts_with('@');
    (parts.len() == 1 || scoped) && parts.iter().all(|p| !p.is_empty() && *p != "." && *p != "..")
}

/// The directory of package `name` as `require` would find it from package
/// directory `package`: in `node_modules` of it and of each ancestor, beside it
/// (a flat `node_modules` or Debian's `/usr/share/nodejs`), then in the global
/// directories. A directory holding `package.json`, or None.
pub fn resolve_dependency(bootstrap: &Bootstrap<'_>, package: u32, name: &str) -> Option<u32> {
    let name = name.as_bytes();
    let is_package = |dir: u32| {
        bootstrap.inode(dir).ok().is_some_and(|d| {
            d.kind().ok() == Some(FileKind::Directory) && bootstrap.lookup(&d, b"package.json").ok().flatten().is_some()
        })
    };
    let mut candidates = Vec::new();
    let mut at = package;
    for _ in 0..MAX_DEPTH {
        candidates.push(resolve(bootstrap, at, b"node_modules").and_then(|m| resolve(bootstrap, m, name)));
        let Some(parent) = bootstrap.inode(at).ok().map(|d| d.parent()).filter(|p| *p != at) else {
            break;
        };
        if at == package {
            candidates.push(resolve(bootstrap, parent, name));
        }
        at = parent;
    }
    candidates.extend(
        GLOBAL_DIRS
            .iter()
            .map(|dir| resolve(bootstrap, ROOT_INO, dir).and_then(|d| resolve(bootstrap, d, name))),
    );
    candidates
        .into_iter()
        .flatten()
        .find(|dir| *dir != package && is_package(*dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_are_the_names_of_the_dependencies_object() {
        let manifest = br#"{"name": "express", "dependencies": {"accepts": "~1.3.8", "@types/node": "*"},
            "devDependencies": {"mocha": "10"}}"#;
        let mut names = dependency_names(manifest);
        names.sort();
        assert_eq!(names, ["@types/node", "accepts"]);
    }

    #[test]
    fn names_leaving_the_package_directories_and_broken_manifests_give_nothing() {
        let manifest =
            br#"{"dependencies": {"../../etc": "1", "/abs": "1", "a/b/c": "1", "@s/..": "1", "": "1", "ok": "1"}}"#;
        assert_eq!(dependency_names(manifest), ["ok"]);
        assert!(dependency_names(b"{\"dependencies\": [1, 2]}").is_empty());
        assert!(dependency_names(b"not json").is_empty());
        assert!(dependency_names(b"{}").is_empty());
    }
}
