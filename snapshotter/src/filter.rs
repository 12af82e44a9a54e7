//! containerd's filter syntax for Walk: a filter is selectors joined by `,` (all
//! must hold); several filters are alternatives (any may hold). A selector is
//! `fieldpath`, `fieldpath==value`, `fieldpath!=value` or `fieldpath~=regex`;
//! field paths are `name`, `parent`, `kind` and `labels.<key>`, where a key with
//! dots or slashes is quoted: `labels."containerd.io/snapshot.ref"`. Values may be
//! quoted with `"…"` (backslash escapes) or `/…/`.

use crate::error::{Result, SnapshotError};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(String),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
    regex: Option<regex::Regex>,
}

/// A parsed set of alternatives.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    alternatives: Vec<Vec<Selector>>,
}

/// Lets a filter read the fields of an object.
pub trait Fields {
    /// The value at a field path, if the object has that field.
    fn field(&self, path: &[String]) -> Option<String>;
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
    source: &'a str,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> SnapshotError {
        SnapshotError::InvalidArgument(format!("filter {:?}: {what} at position {}", self.source, self.at))
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(|b| b == b' ') {
            self.at += 1;
        }
    }

    fn quoted(&mut self, close: u8) -> Result<String> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated quote")),
                Some(b) if b == close => {
                    self.at += 1;
                    return String::from_utf8(out).map_err(|_| self.error("value is not UTF-8"));
                }
                Some(b'\\') if close == b'"' => {
                    self.at += 1;
                    let escaped = self.peek().ok_or_else(|| self.error("dangling escape"))?;
                    out.push(escaped);
                    self.at += 1;
                }
                Some(b) => {
                    out.push(b);
                    self.at += 1;
                }
            }
        }
    }

    fn field_component(&mut self) -> Result<String> {
        if self.peek() == Some(b'"') {
            return self.quoted(b'"');
        }
        let start = self.at;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            self.at += 1;
        }
        if start == self.at {
            return Err(self.error("expected a field name"));
        }
        Ok(String::from_utf8_lossy(&self.text[start..self.at]).into_owned())
    }

    fn value(&mut self) -> Result<String> {
        match self.peek() {
            Some(b'"') => self.quoted(b'"'),
            Some(b'/') => self.quoted(b'/'),
            _ => {
                let start = self.at;
                while self.peek().is_some_and(|b| b != b',') {
                    self.at += 1;
                }
                Ok(String::from_utf8_lossy(&self.text[start..self.at]).trim().to_string())
            }
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        self.skip_spaces();
        let mut path = vec![self.field_component()?];
        while self.peek() == Some(b'.') {
            self.at += 1;
            path.push(self.field_component()?);
        }
        self.skip_spaces();
        let rest = &self.text[self.at..];
        let op = if rest.starts_with(b"==") {
            self.at += 2;
            self.skip_spaces();
            Op::Equal(self.value()?)
        } else if rest.starts_with(b"!=") {
            self.at += 2;
            self.skip_spaces();
            Op::NotEqual(self.value()?)
        } else if rest.starts_with(b"~=") {
            self.at += 2;
            self.skip_spaces();
            Op::Matches(self.value()?)
        } else {
            Op::Present
        };
        let regex = match &op {
            Op::Matches(pattern) => {
                Some(regex::Regex::new(pattern).map_err(|e| self.error(&format!("bad regex: {e}")))?)
            }
            _ => None,
        };
        self.skip_spaces();
        Ok(Selector { path, op, regex })
    }
}

impl Filter {
    /// Parses filter strings; an empty list (or only empty strings) matches everything.
    pub fn parse(filters: &[String]) -> Result<Self> {
        let mut alternatives = Vec::new();
        for source in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut parser = Parser {
                text: source.as_bytes(),
                at: 0,
                source,
            };
            let mut selectors = vec![parser.selector()?];
            while parser.peek() == Some(b',') {
                parser.at += 1;
                selectors.push(parser.selector()?);
            }
            if parser.peek().is_some() {
                return Err(parser.error("unexpected text"));
            }
            alternatives.push(selectors);
        }
        Ok(Filter { alternatives })
    }

    pub fn matches(&self, object: &impl Fields) -> bool {
        self.alternatives.is_empty()
            || self.alternatives.iter().any(|selectors| {
                selectors.iter().all(|s| {
                    let value = object.field(&s.path);
                    match &s.op {
                        Op::Present => value.is_some(),
                        Op::Equal(v) => value.as_deref() == Some(v.as_str()),
                        Op::NotEqual(v) => value.as_deref() != Some(v.as_str()),
                        Op::Matches(_) => value.is_some_and(|v| s.regex.as_ref().is_some_and(|r| r.is_match(&v))),
                    }
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Obj(BTreeMap<String, String>, String, Option<String>);

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [name] if name == "name" => Some(self.1.clone()),
                [parent] if parent == "parent" => Some(self.2.clone().unwrap_or_default()),
                [labels, key] if labels == "labels" => self.0.get(key).cloned(),
                _ => None,
            }
        }
    }

    fn obj(labels: &[(&str, &str)], name: &str, parent: Option<&str>) -> Obj {
        Obj(
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            name.into(),
            parent.map(Into::into),
        )
    }

    #[test]
    fn containerd_filters() {
        let layer = obj(&[("containerd.io/snapshot.ref", "sha256:abc")], "k1", Some("p1"));
        let f = |s: &[&str]| Filter::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap();
        assert!(f(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==p1"#]).matches(&layer));
        assert!(!f(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==p2"#]).matches(&layer));
        assert!(f(&[r#"parent!="""#]).matches(&layer));
        assert!(!f(&[r#"parent!="""#]).matches(&obj(&[], "k2", None)));
        assert!(f(&["name==nope", "name==k1"]).matches(&layer), "alternatives are ORed");
        assert!(f(&[r#"labels."containerd.io/snapshot.ref""#]).matches(&layer));
        assert!(f(&["name~=/^k[0-9]$/"]).matches(&layer));
        assert!(f(&[]).matches(&layer));
        for bad in [r#"labels."unterminated"#, "name~=/(/", "==x", "name==a,"] {
            assert!(Filter::parse(&[bad.to_string()]).is_err(), "{bad} should be rejected");
        }
    }
}
