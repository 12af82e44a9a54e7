//! The merged filesystem tree the builder assembles from layers, with OCI layer
//! semantics: whiteouts and opaque directories hide only what lower layers added,
//! a file replaces a directory and back, hardlinks share one node.

use crate::error::EntryProblem;
use std::collections::{BTreeMap, VecDeque};

/// Index of a node in the tree's arena.
pub type NodeId = usize;
/// The root directory's node.
pub const ROOT: NodeId = 0;
/// Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
const MAX_SYMLINK_HOPS: usize = 40;

/// Metadata every node has: permission bits (setuid, setgid and sticky
/// included), owner, mtime and xattrs sorted by name, as a layer record keeps it.
pub type Meta = petrel_format::layer_record::RecordMeta;

/// Where the bytes of one piece of a file come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceSource {
    Hole,
    /// Bytes at `offset` in the chunk that fills builder slot `slot`.
    Chunk {
        slot: u32,
        offset: u32,
    },
}

/// A contiguous piece of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub file_offset: u64,
    pub length: u32,
    pub source: PieceSource,
}

/// The kinds of node.
#[derive(Debug, Clone)]
pub enum NodeKind {
    Directory(BTreeMap<Vec<u8>, Entry>),
    Regular { size: u64, pieces: Vec<Piece> },
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
}

/// A name in a directory: which node, and which layer put it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub node: NodeId,
    pub layer: usize,
}

/// One file, directory, link or device.
#[derive(Debug, Clone)]
pub struct Node {
    pub meta: Meta,
    pub kind: NodeKind,
}

/// The merged tree: an arena of nodes; the root is node 0.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            nodes: vec![Node {
                meta: Meta::implicit_dir(),
                kind: NodeKind::Directory(BTreeMap::new()),
            }],
        }
    }
}

/// Splits a path into components, cleaned lexically as containerd does: leading `/`
/// and `./`, empty and `.` components dropped, `..` pops but never above the root.
pub fn clean_path(path: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            name => out.push(name.to_vec()),
        }
    }
    out
}

impl Tree {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    pub fn add_node(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Entries of a directory node (empty for anything else).
    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Entry>> {
        match &self.nodes[dir].kind {
            NodeKind::Directory(entries) => Some(entries),
            _ => None,
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, Entry> {
        match &mut self.nodes[dir].kind {
            NodeKind::Directory(entries) => entries,
            _ => unreachable!("callers resolve directories first"),
        }
    }

    /// Resolves `components` to a directory, following symlinks inside the tree (an
    /// absolute target restarts at the root, `..` stops at the root). Missing
    /// directories are created as implicit directories of `layer` when `create`.
    pub fn resolve_dir(
        &mut self,
        components: &[Vec<u8>],
        layer: usize,
        create: bool,
    ) -> Result<Option<NodeId>, EntryProblem> {
        let mut stack = vec![ROOT];
        let mut work: VecDeque<Vec<u8>> = components.iter().cloned().collect();
        let mut hops = 0;
        while let Some(component) = work.pop_front() {
            match component.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let current = *stack.last().expect("stack holds the root");
            let existing = self.children(current).and_then(|c| c.get(&component)).copied();
            let Some(entry) = existing else {
                if !create {
                    return Ok(None);
                }
                let id = self.add_node(Node {
                    meta: Meta::implicit_dir(),
                    kind: NodeKind::Directory(BTreeMap::new()),
                });
                self.children_mut(current).insert(component, Entry { node: id, layer });
                stack.push(id);
                continue;
            };
            match &self.nodes[entry.node].kind {
                NodeKind::Directory(_) => {
                    if create {
                        // A layer that adds below a directory holds that directory too.
                        let held = self.children_mut(current).get_mut(&component).expect("just found");
                        held.layer = held.layer.max(layer);
                    }
                    stack.push(entry.node)
                }
                NodeKind::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(EntryProblem::TooManySymlinks);
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        work.push_front(part.to_vec());
                    }
                }
                _ => {
                    return Err(EntryProblem::NotADirectory {
                        component: String::from_utf8_lossy(&component).into_owned(),
                    })
                }
            }
        }
        Ok(Some(*stack.last().expect("stack holds the root")))
    }

    /// Finds the node at `components` without following a final symlink.
    pub fn lookup(&mut self, components: &[Vec<u8>]) -> Result<Option<NodeId>, EntryProblem> {
        let Some((name, parents)) = components.split_last() else {
            return Ok(Some(ROOT));
        };
        let Some(dir) = self.resolve_dir(parents, 0, false)? else {
            return Ok(None);
        };
        Ok(self.children(dir).and_then(|c| c.get(name)).map(|e| e.node))
    }

    /// Puts `node` at `name` in `dir`, replacing whatever was there.
    pub fn insert(&mut self, dir: NodeId, name: Vec<u8>, node: NodeId, layer: usize) {
        self.children_mut(dir).insert(name, Entry { node, layer });
    }

    /// Existing entry `name` of `dir`.
    pub fn entry(&self, dir: NodeId, name: &[u8]) -> Option<Entry> {
        self.children(dir).and_then(|c| c.get(name)).copied()
    }

    /// Applies a whiteout of `name` in `dir` by `layer`: hides what lower layers put
    /// there. A directory this layer declared too keeps its own entries (it becomes
    /// opaque); a non-directory this layer added stays.
    pub fn whiteout(&mut self, dir: NodeId, name: &[u8], layer: usize) {
        let Some(entry) = self.entry(dir, name) else {
            return;
        };
        if entry.layer < layer {
            self.children_mut(dir).remove(name);
        } else if matches!(self.nodes[entry.node].kind, NodeKind::Directory(_)) {
            self.make_opaque(entry.node, layer);
        }
    }

    /// Applies an opaque marker: hides everything lower layers put below `dir`, at
    /// any depth. Directories this layer holds stay, with only this layer's content.
    pub fn make_opaque(&mut self, dir: NodeId, layer: usize) {
        let mut pending = vec![dir];
        while let Some(current) = pending.pop() {
            let entries = self.children_mut(current);
            entries.retain(|_, e| e.layer >= layer);
            let kept: Vec<NodeId> = entries.values().map(|e| e.node).collect();
            pending.extend(
                kept.into_iter()
                    .filter(|&n| matches!(self.nodes[n].kind, NodeKind::Directory(_))),
            );
        }
    }

    /// Number of nodes ever created (reachable or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(p: &str) -> Vec<Vec<u8>> {
        clean_path(p.as_bytes())
    }

    #[test]
    fn clean_path_clamps_at_root() {
        assert_eq!(comps("./a//b/./c"), comps("a/b/c"));
        assert_eq!(comps("/etc/passwd"), comps("etc/passwd"));
        assert_eq!(comps("../../etc/passwd"), comps("etc/passwd"));
        assert_eq!(comps("a/../../b"), comps("b"));
        assert!(comps("./").is_empty());
    }

    #[test]
    fn parent_symlinks_resolve_inside_the_tree() {
        let mut tree = Tree::default();
        let usr_lib = tree.resolve_dir(&comps("usr/lib"), 0, true).unwrap().unwrap();
        let link = tree.add_node(Node {
            meta: Meta::default(),
            kind: NodeKind::Symlink(b"usr/lib".to_vec()),
        });
        tree.insert(ROOT, b"lib".to_vec(), link, 0);
        assert_eq!(tree.resolve_dir(&comps("lib"), 1, true).unwrap(), Some(usr_lib));
        // An escaping absolute or relative target stays inside the tree.
        let escape = tree.add_node(Node {
            meta: Meta::default(),
            kind: NodeKind::Symlink(b"../../../../usr/lib".to_vec()),
        });
        tree.insert(ROOT, b"up".to_vec(), escape, 0);
        assert_eq!(tree.resolve_dir(&comps("up"), 1, true).unwrap(), Some(usr_lib));
        let looping = tree.add_node(Node {
            meta: Meta::default(),
            kind: NodeKind::Symlink(b"loop".to_vec()),
        });
        tree.insert(ROOT, b"loop".to_vec(), looping, 0);
        assert!(matches!(
            tree.resolve_dir(&comps("loop/x"), 1, true),
            Err(EntryProblem::TooManySymlinks)
        ));
    }

    #[test]
    fn whiteouts_hide_only_lower_layers() {
        let mut tree = Tree::default();
        let file = |tree: &mut Tree| {
            tree.add_node(Node {
                meta: Meta::default(),
                kind: NodeKind::Fifo,
            })
        };
        let lower = file(&mut tree);
        tree.insert(ROOT, b"lower".to_vec(), lower, 0);
        let same = file(&mut tree);
        tree.insert(ROOT, b"same".to_vec(), same, 1);
        tree.whiteout(ROOT, b"lower", 1);
        tree.whiteout(ROOT, b"same", 1);
        assert!(tree.entry(ROOT, b"lower").is_none());
        assert!(tree.entry(ROOT, b"same").is_some());
    }
}
