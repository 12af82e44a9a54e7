//! Bootstrap bytes validated once and owned together with what the validation
//! found: [`ValidatedBootstrap::get`] hands out a reader without checking the
//! header and tables again (a daemon asks for one on every request).

use super::{Bootstrap, OpenOptions};
use crate::error::Result;
use crate::layout::{Section, SuperblockRecord, SECTION_COUNT};
use std::ops::Range;
use zerocopy::FromBytes;

/// Where each table lies in the bytes, as `Bootstrap::open_with` found it.
#[derive(Debug, Clone)]
struct Layout {
    chunker: crate::chunker::ChunkerParams,
    sections: [Range<usize>; SECTION_COUNT],
}

/// Bootstrap bytes (`B`: a `Vec<u8>`, a read-only map; anything that derefs to the
/// same bytes every time) with their validated layout.
#[derive(Debug)]
pub struct ValidatedBootstrap<B> {
    bytes: B,
    layout: Layout,
}

/// The byte range of `table` within `bytes` (a sub-slice of it).
fn range_of<T>(bytes: &[u8], table: &[T]) -> Range<usize> {
    let start = (table.as_ptr() as usize).saturating_sub(bytes.as_ptr() as usize);
    start..start + std::mem::size_of_val(table)
}

impl<B: std::ops::Deref<Target = [u8]>> ValidatedBootstrap<B> {
    /// Validates `bytes` (as `Bootstrap::open_with`) and keeps them.
    pub fn new(bytes: B, options: OpenOptions) -> Result<Self> {
        let layout = {
            let reader = Bootstrap::open_with(&bytes, options)?;
            let mut sections: [Range<usize>; SECTION_COUNT] = Default::default();
            sections[Section::Inodes as usize] = range_of(&bytes, reader.inodes);
            sections[Section::Dirents as usize] = range_of(&bytes, reader.dirents);
            sections[Section::ChunkRefs as usize] = range_of(&bytes, reader.chunk_refs);
            sections[Section::Chunks as usize] = range_of(&bytes, reader.chunks);
            sections[Section::Blobs as usize] = range_of(&bytes, reader.blobs);
            sections[Section::Xattrs as usize] = range_of(&bytes, reader.xattrs);
            sections[Section::Prefetch as usize] = range_of(&bytes, reader.prefetch);
            sections[Section::Strings as usize] = range_of(&bytes, reader.strings);
            Layout {
                chunker: reader.chunker,
                sections,
            }
        };
        Ok(ValidatedBootstrap { bytes, layout })
    }

    /// A reader over the bytes (no checks repeated).
    pub fn get(&self) -> Bootstrap<'_> {
        let bytes: &[u8] = &self.bytes;
        let section = |s: Section| bytes.get(self.layout.sections[s as usize].clone()).unwrap_or_default();
        // The records are unaligned and the ranges whole records of these same bytes,
        // as validation found them: these casts cannot fail.
        const CHECKED: &str = "validated when the bootstrap was opened";
        Bootstrap {
            superblock: SuperblockRecord::ref_from_prefix(bytes).expect(CHECKED).0,
            chunker: self.layout.chunker,
            inodes: FromBytes::ref_from_bytes(section(Section::Inodes)).expect(CHECKED),
            dirents: FromBytes::ref_from_bytes(section(Section::Dirents)).expect(CHECKED),
            chunk_refs: FromBytes::ref_from_bytes(section(Section::ChunkRefs)).expect(CHECKED),
            chunks: FromBytes::ref_from_bytes(section(Section::Chunks)).expect(CHECKED),
            blobs: FromBytes::ref_from_bytes(section(Section::Blobs)).expect(CHECKED),
            xattrs: FromBytes::ref_from_bytes(section(Section::Xattrs)).expect(CHECKED),
            prefetch: FromBytes::ref_from_bytes(section(Section::Prefetch)).expect(CHECKED),
            strings: section(Section::Strings),
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_validated_bootstrap_reads_as_the_opened_one() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/golden/v1/edge-cases-fixed-1m.bootstrap"
        ))
        .unwrap();
        let opened = super::Bootstrap::open(&bytes).unwrap();
        let expected = crate::reader::read_everything(&bytes, true).unwrap();
        let validated = super::ValidatedBootstrap::new(bytes.clone(), super::OpenOptions::default()).unwrap();
        let reader = validated.get();
        assert_eq!(reader.inode_count(), opened.inode_count());
        assert_eq!(reader.chunk_count(), opened.chunk_count());
        assert_eq!(reader.superblock().digest, opened.superblock().digest);
        let walked = reader.walk().count();
        assert_eq!(walked, opened.walk().count());
        assert!(expected.entries > 100);
        let mut bad = bytes;
        bad[300] ^= 1;
        assert!(super::ValidatedBootstrap::new(bad, super::OpenOptions::default()).is_err());
    }
}
