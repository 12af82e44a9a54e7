//! The petrel bootstrap format, version 1: on-disk records, a validated reader
//! over `&[u8]`, a writer, chunker parameters and the chunk codec.
//!
//! `format-spec.md` at the repository root is the byte-level source of truth; this
//! crate implements it and a test checks that the two agree on every record size.

pub mod chunker;
pub mod codec;
pub mod error;
pub mod features;
pub mod image_dir;
pub mod layer_record;
pub mod layer_tar;
pub mod layout;
pub mod profile;
pub mod reader;
pub mod writer;

pub use chunker::ChunkerParams;
pub use error::{FormatError, Result};
pub use reader::{Bootstrap, ChunkInfo, FileKind, Inode, OpenOptions};
pub use writer::{BootstrapWriter, StringHeap, SuperblockParams};
