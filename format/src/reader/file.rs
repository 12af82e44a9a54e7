//! Regular-file data: which chunk bytes make up which file range.

use super::{Bootstrap, FileKind, Inode};
use crate::error::{FormatError, Result};
use crate::layout::{ChunkRefRecord, HOLE_CHUNK};

/// Where the bytes of a segment come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSource {
    /// The range reads as zeros.
    Hole,
    /// Bytes `[chunk_offset, chunk_offset + length)` of the chunk.
    Chunk { index: u32, chunk_offset: u32 },
}

/// A piece of a file read: `length` bytes at `file_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSegment {
    pub file_offset: u64,
    pub length: u32,
    pub source: SegmentSource,
}

impl<'a> Bootstrap<'a> {
    /// The raw chunk refs of a regular file.
    pub fn chunk_refs(&self, file: &Inode<'a>) -> Result<&'a [ChunkRefRecord]> {
        file.require(FileKind::Regular, "not a regular file")?;
        let start = file.record.data_index.get();
        let count = file.record.data_count.get() as usize;
        usize::try_from(start)
            .ok()
            .and_then(|s| s.checked_add(count).map(|e| (s, e)))
            .and_then(|(s, e)| self.chunk_refs.get(s..e))
            .ok_or_else(|| FormatError::corrupt("inode", file.ino, "chunk ref range outside the chunk ref table"))
    }

    /// The segments that make up bytes `[offset, offset + len)` of a regular file,
    /// clipped to the file size, each checked against the chunk table.
    pub fn segments(&self, file: &Inode<'a>, offset: u64, len: u64) -> Result<Vec<FileSegment>> {
        let refs = self.chunk_refs(file)?;
        let size = file.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let corrupt = |reason| FormatError::corrupt("inode", file.ino, reason);
        let first = refs.partition_point(|r| r.file_offset.get().saturating_add(u64::from(r.length.get())) <= offset);
        let mut segments = Vec::new();
        let mut cursor = offset;
        for record in refs.get(first..).unwrap_or_default() {
            if cursor >= end {
                break;
            }
            let (ref_start, ref_len) = (record.file_offset.get(), u64::from(record.length.get()));
            let ref_end = ref_start
                .checked_add(ref_len)
                .ok_or_else(|| corrupt("chunk ref range overflows"))?;
            if ref_len == 0 || ref_start > cursor || ref_end <= cursor || ref_end > size {
                return Err(corrupt("chunk refs do not tile the file"));
            }
            let skip = cursor - ref_start;
            let take = (ref_end.min(end) - cursor) as u32;
            let source = match record.chunk_index.get() {
                HOLE_CHUNK => SegmentSource::Hole,
                index => {
                    let chunk = self.chunk(index)?;
                    let chunk_offset = record.chunk_offset.get();
                    let ref_chunk_end = u64::from(chunk_offset) + ref_len;
                    if ref_chunk_end > u64::from(chunk.uncompressed_size) {
                        return Err(corrupt("chunk ref extends past the end of its chunk"));
                    }
                    SegmentSource::Chunk {
                        index,
                        chunk_offset: chunk_offset + skip as u32,
                    }
                }
            };
            segments.push(FileSegment {
                file_offset: cursor,
                length: take,
                source,
            });
            cursor += u64::from(take);
        }
        if cursor < end {
            return Err(corrupt("chunk refs end before the file size"));
        }
        Ok(segments)
    }
}
