//! Whatever is done to a valid bootstrap's bytes, the reader returns errors, never
//! panics, loops or reads out of bounds.

use petrel_format::layout::{DIGEST_OFFSET, SUPERBLOCK_SIZE};
use petrel_format::reader::{compute_digest, read_everything};
use proptest::prelude::*;

fn golden() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/golden/v1/edge-cases-fixed-1m.bootstrap"
    ))
    .unwrap()
}

/// Re-seals the digest so a mutation reaches the tables instead of stopping at the digest.
fn reseal(bytes: &mut [u8]) {
    if let Some(digest) = compute_digest(bytes) {
        bytes[DIGEST_OFFSET..SUPERBLOCK_SIZE].copy_from_slice(&digest);
    }
}

#[test]
fn the_golden_bootstrap_reads_cleanly() {
    let visited = read_everything(&golden(), true).unwrap();
    assert!(visited.entries > 100 && visited.segments > 50 && visited.xattrs >= 2);
}

#[test]
fn every_truncation_is_an_error() {
    let good = golden();
    for len in (0..good.len()).step_by(7) {
        let mut cut = good[..len].to_vec();
        reseal(&mut cut);
        assert!(
            read_everything(&cut, false).is_err(),
            "truncated to {len} bytes but accepted"
        );
    }
}

#[test]
fn garbage_is_an_error() {
    let mut state = 1u64;
    for len in [0, 1, 8, 255, 256, 257, 1000, 100_000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        assert!(read_everything(&bytes, false).is_err());
    }
}

#[test]
fn a_flipped_bit_fails_the_digest() {
    let good = golden();
    for position in (0..good.len()).step_by(97) {
        if (DIGEST_OFFSET..SUPERBLOCK_SIZE).contains(&position) {
            continue;
        }
        let mut bad = good.clone();
        bad[position] ^= 0x10;
        assert!(
            read_everything(&bad, true).is_err(),
            "flip at {position} went unnoticed"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_bootstraps_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        word_edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec![0u32, 1, 2, 0xFFFF_FFFF, 0x7FFF_FFFF, 255, 256, 4096])), 0..4),
    ) {
        let mut bytes = golden();
        for (index, value) in edits {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        for (index, value) in word_edits {
            let i = index.index(bytes.len() - 4);
            bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
        }
        reseal(&mut bytes);
        let _ = read_everything(&bytes, true);
    }
}
