//! Chunk indices into the ranges one request fetches: consecutive chunks, and chunks
//! of the same blob separated by at most `GAP_BYTES` of stored bytes nobody asked
//! for (fetching those costs less than another round trip: 64 KiB is 5 ms at
//! 100 Mbit/s, a round trip 20 ms or more on the links petrel is built for).

use crate::image::MappedImage;

/// Most stored bytes between two wanted chunks that one request fetches along.
pub const GAP_BYTES: u64 = 64 << 10;

/// `chunks` (any order, repeats allowed) as sorted half-open ranges, bridged where
/// `image` says the gap is small.
pub fn bridged(image: &MappedImage, chunks: Vec<u32>) -> Vec<(u32, u32)> {
    ranges(chunks, |end, next| bridgeable(image, end, next))
}

/// `chunks` as sorted half-open ranges; a range ending at `end` goes on to chunk
/// `next` when `bridge(end, next)` (consecutive chunks always join).
pub fn ranges(mut chunks: Vec<u32>, bridge: impl Fn(u32, u32) -> bool) -> Vec<(u32, u32)> {
    chunks.sort_unstable();
    chunks.dedup();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for index in chunks {
        match out.last_mut() {
            Some((_, end)) if *end == index || bridge(*end, index) => *end = index + 1,
            _ => out.push((index, index + 1)),
        }
    }
    out
}

/// Whether chunks `end..next` (between a range ending at `end` and chunk `next`) are
/// few enough stored bytes, contiguous in one blob, to fetch in the same request.
pub fn bridgeable(image: &MappedImage, end: u32, next: u32) -> bool {
    bridgeable_within(image, end, next, GAP_BYTES)
}

/// `bridgeable`, with at most `gap` stored bytes between.
pub fn bridgeable_within(image: &MappedImage, end: u32, next: u32, gap: u64) -> bool {
    if next < end || end == 0 {
        return false;
    }
    let bootstrap = image.bootstrap();
    let (Ok(last), Ok(following)) = (bootstrap.chunk(end - 1), bootstrap.chunk(next)) else {
        return false;
    };
    let gap_start = last.compressed_offset + u64::from(last.compressed_size);
    following.blob_index == last.blob_index
        && following.compressed_offset >= gap_start
        && following.compressed_offset - gap_start <= gap
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_indices_join_when_consecutive_or_bridged() {
        assert_eq!(
            super::ranges(vec![7, 3, 4, 5, 9, 4], |_, _| false),
            [(3, 6), (7, 8), (9, 10)]
        );
        assert_eq!(
            super::ranges(vec![7, 3, 4, 5, 9, 4], |end, next| next - end <= 1),
            [(3, 10)]
        );
        assert!(super::ranges(Vec::new(), |_, _| true).is_empty());
    }
}
