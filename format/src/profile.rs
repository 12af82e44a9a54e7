//! Prefetch profiles: which files a workload read first, and which byte ranges,
//! in first-access order. The JSON form is stable (`"petrel_profile": 1`):
//!
//! ```json
//! {"petrel_profile": 1, "image": "<bootstrap blake3 hex, optional>",
//!  "entries": [{"path": "usr/bin/python3", "ranges": [[0, 2097152]]},
//!              {"path": "etc/app.toml"}]}
//! ```
//!
//! `path` is relative to the image root (a path that is not UTF-8 is given as
//! `path_hex` instead). `ranges` are `[start, end)` byte ranges of the file; an entry
//! without ranges means the whole file (or, for a directory, every file below it).

use serde::{Deserialize, Serialize};

/// The profile format version this code reads and writes.
pub const PROFILE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Profile {
    pub petrel_profile: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub entries: Vec<ProfileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProfileEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<[u64; 2]>>,
}

impl ProfileEntry {
    pub fn new(path: &[u8], ranges: Option<Vec<[u64; 2]>>) -> Self {
        match std::str::from_utf8(path) {
            Ok(text) => ProfileEntry {
                path: Some(text.to_string()),
                path_hex: None,
                ranges,
            },
            Err(_) => ProfileEntry {
                path: None,
                path_hex: Some(hex::encode(path)),
                ranges,
            },
        }
    }

    /// The path as bytes.
    pub fn path_bytes(&self) -> Option<Vec<u8>> {
        match (&self.path, &self.path_hex) {
            (Some(p), _) => Some(p.as_bytes().to_vec()),
            (None, Some(h)) => hex::decode(h).ok(),
            (None, None) => None,
        }
    }
}

impl Profile {
    /// Parses a profile, or a plain list of paths / globs (one per line, `#` comments).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let trimmed = bytes
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map_or(&bytes[..0], |i| &bytes[i..]);
        if trimmed.first() == Some(&b'{') {
            let profile: Profile = serde_json::from_slice(trimmed).map_err(|e| format!("not a valid profile: {e}"))?;
            if profile.petrel_profile != PROFILE_VERSION {
                return Err(format!(
                    "profile version {} is not supported (this reads {PROFILE_VERSION})",
                    profile.petrel_profile
                ));
            }
            return Ok(profile);
        }
        let entries = bytes
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
            .map(|l| ProfileEntry::new(l, None))
            .collect();
        Ok(Profile {
            petrel_profile: PROFILE_VERSION,
            image: None,
            entries,
        })
    }
}

/// Merges `[start, end)` ranges into sorted, disjoint ones.
pub fn merge_ranges(mut ranges: Vec<[u64; 2]>) -> Vec<[u64; 2]> {
    ranges.sort_unstable();
    let mut out: Vec<[u64; 2]> = Vec::new();
    for [start, end] in ranges.into_iter().filter(|[s, e]| s < e) {
        match out.last_mut() {
            Some(last) if start <= last[1] => last[1] = last[1].max(end),
            _ => out.push([start, end]),
        }
    }
    out
}

/// Wildcards one pattern may hold (each `**` is a search over the path): a
/// pattern with more is refused rather than searched, wherever a profile is read.
pub const MAX_WILDCARDS: usize = 4;
/// Entries naming a directory or a pattern that are expanded (each one a pass over
/// every file of the image); the rest are skipped.
pub const MAX_EXPANSIONS: usize = 64;

/// Wildcards (`*`, `?`) in a profile path; a path with none names one file or
/// directory.
pub fn wildcards(path: &[u8]) -> usize {
    path.iter().filter(|b| b"*?".contains(b)).count()
}

/// Whether `path` matches a glob: `*` and `?` stay within one component, `**`
/// crosses components (`**/` also matches no component at all).
///
/// The pattern runs as a set of positions over the path, one byte at a time: the
/// work is at most the two lengths multiplied, whatever the pattern (a stranger's
/// profile), never a search that backtracks.
pub fn glob_match(pattern: &[u8], path: &[u8]) -> bool {
    let tokens = glob_tokens(pattern);
    // `active[i]`: the path read so far can be followed by `tokens[i..]`.
    let mut active = vec![false; tokens.len() + 1];
    let mut next = vec![false; tokens.len() + 1];
    active[0] = true;
    close_over_empty_matches(&tokens, &mut active);
    for &byte in path {
        next.iter_mut().for_each(|n| *n = false);
        for (i, token) in tokens.iter().enumerate() {
            if !active[i] {
                continue;
            }
            match *token {
                GlobToken::Byte(want) if want == byte => next[i + 1] = true,
                GlobToken::OneInComponent if byte != b'/' => next[i + 1] = true,
                GlobToken::AnyInComponent if byte != b'/' => next[i] = true,
                GlobToken::AnyAcrossComponents => next[i] = true,
                _ => {}
            }
        }
        close_over_empty_matches(&tokens, &mut next);
        std::mem::swap(&mut active, &mut next);
        if !active.contains(&true) {
            return false;
        }
    }
    active[tokens.len()]
}

/// One step of a glob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GlobToken {
    Byte(u8),
    /// `?`
    OneInComponent,
    /// `*`
    AnyInComponent,
    /// `**`, and `**/`
    AnyAcrossComponents,
}

fn glob_tokens(pattern: &[u8]) -> Vec<GlobToken> {
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut i = 0;
    while i < pattern.len() {
        let token = match pattern[i] {
            b'*' if pattern.get(i + 1) == Some(&b'*') => {
                i += 1;
                if pattern.get(i + 1) == Some(&b'/') {
                    i += 1;
                }
                GlobToken::AnyAcrossComponents
            }
            b'*' => GlobToken::AnyInComponent,
            b'?' => GlobToken::OneInComponent,
            byte => GlobToken::Byte(byte),
        };
        tokens.push(token);
        i += 1;
    }
    tokens
}

/// Adds to `states` what the stars in it reach by matching nothing.
fn close_over_empty_matches(tokens: &[GlobToken], states: &mut [bool]) {
    for (i, token) in tokens.iter().enumerate() {
        if states[i] && matches!(token, GlobToken::AnyInComponent | GlobToken::AnyAcrossComponents) {
            states[i + 1] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matcher as first written: a backtracking search, exponential in the
    /// stars; the oracle the linear one must agree with.
    fn searching_glob_match(pattern: &[u8], path: &[u8]) -> bool {
        match (pattern.first(), path.first()) {
            (None, None) => true,
            (Some(b'*'), _) if pattern.get(1) == Some(&b'*') => {
                let rest = pattern[2..].strip_prefix(b"/").unwrap_or(&pattern[2..]);
                (0..=path.len()).any(|i| searching_glob_match(rest, &path[i..]))
            }
            (Some(b'*'), _) => {
                let mut i = 0;
                loop {
                    if searching_glob_match(&pattern[1..], &path[i..]) {
                        return true;
                    }
                    if i == path.len() || path[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            (Some(b'?'), Some(&c)) if c != b'/' => searching_glob_match(&pattern[1..], &path[1..]),
            (Some(p), Some(c)) if p == c => searching_glob_match(&pattern[1..], &path[1..]),
            _ => false,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 4000, failure_persistence: None, ..Default::default() })]
        #[test]
        fn the_linear_matcher_agrees_with_the_search(
            pattern in proptest::collection::vec(proptest::sample::select(b"ab/*?".to_vec()), 0..10),
            path in proptest::collection::vec(proptest::sample::select(b"ab/".to_vec()), 0..12),
        ) {
            proptest::prop_assert_eq!(glob_match(&pattern, &path), searching_glob_match(&pattern, &path));
        }
    }

    #[test]
    fn globs_match_as_documented() {
        assert!(glob_match(b"usr/lib/*.so", b"usr/lib/libc.so"));
        assert!(!glob_match(b"usr/lib/*.so", b"usr/lib/x/libc.so"));
        assert!(glob_match(b"usr/**/*.so", b"usr/lib/x/libc.so"));
        assert!(
            glob_match(b"usr/**/*.so", b"usr/libc.so"),
            "`**/` matches no component too"
        );
        assert!(glob_match(b"**", b"any/thing"));
        assert!(glob_match(b"a?c", b"abc") && !glob_match(b"a?c", b"a/c"));
        assert!(glob_match(b"", b"") && !glob_match(b"", b"a"));
    }

    #[test]
    fn a_strangers_pattern_costs_the_lengths_multiplied_not_a_search() {
        // Four wildcards, a 4 KiB path that almost matches everywhere: the search
        // tried every split of the path between the stars.
        let path = vec![b'a'; 4096];
        assert!(!glob_match(b"**a**a*b", &path));
        let pattern = [&b"**"[..], &vec![b'a'; 2000], b"**", &vec![b'a'; 2000], b"b"].concat();
        assert!(!glob_match(&pattern, &path));
    }

    #[test]
    fn round_trips_and_parses_lists() {
        let profile = Profile {
            petrel_profile: 1,
            image: Some("ab".into()),
            entries: vec![
                ProfileEntry::new(b"usr/bin/x", Some(vec![[0, 10]])),
                ProfileEntry::new(b"caf\xe9", None),
            ],
        };
        let text = serde_json::to_vec(&profile).unwrap();
        assert_eq!(Profile::parse(&text).unwrap(), profile);
        assert_eq!(profile.entries[1].path_bytes().unwrap(), b"caf\xe9");
        let list = Profile::parse(b"# startup\n/app/app.py\r\nusr/lib/*.so\n\n").unwrap();
        assert_eq!(list.entries.len(), 2);
        assert!(Profile::parse(br#"{"petrel_profile": 9, "entries": []}"#).is_err());
        assert_eq!(
            merge_ranges(vec![[5, 9], [0, 3], [2, 4], [9, 9], [8, 12]]),
            vec![[0, 4], [5, 12]]
        );
    }
}
