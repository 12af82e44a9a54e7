//! Petrel's OCI layers are tar archives of exactly one regular file (spec §14): a
//! blob layer holds `petrel/blob`, the bootstrap layer `petrel/bootstrap`. Any tar
//! reader can unpack them, so a runtime that pulls a petrel image without petrel's
//! snapshotter labels still gets the files on disk.
//!
//! The wrapping is fixed to the byte: a 512-byte ustar header (mode 0444, uid and gid
//! 0, mtime 0, no user or group names), the file's bytes, zero padding to a multiple
//! of 512, then the two zero blocks that end an archive. A blob's data therefore
//! starts at [`DATA_OFFSET`] of its layer, and chunk offsets count from the layer's
//! first byte.

/// Where the wrapped file's bytes start in a layer.
pub const DATA_OFFSET: u64 = 512;
/// The entry of a blob layer.
pub const BLOB_ENTRY: &str = "petrel/blob";
/// The entry of a bootstrap layer.
pub const BOOTSTRAP_ENTRY: &str = "petrel/bootstrap";

const BLOCK: u64 = 512;
const END_OF_ARCHIVE: u64 = 2 * BLOCK;

/// A layer that is not petrel's one-entry tar.
#[derive(Debug, thiserror::Error)]
#[error("{entry} layer is not petrel's one-entry tar: {reason}")]
pub struct LayerTarError {
    pub entry: &'static str,
    pub reason: String,
}

/// The ustar header that opens a layer wrapping `size` bytes as `entry`.
pub fn header(entry: &str, size: u64) -> [u8; 512] {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(entry)
        .expect("petrel's entry names are short relative paths");
    header.set_size(size);
    header.set_mode(0o444);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    *header.as_bytes()
}

/// The zero bytes that follow `size` bytes of data: padding to a block, then the
/// end-of-archive marker.
pub fn trailer_len(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK + END_OF_ARCHIVE
}

/// Length of a layer wrapping `size` bytes.
pub fn layer_len(size: u64) -> u64 {
    DATA_OFFSET + size + trailer_len(size)
}

/// `bytes` wrapped as the layer of `entry`.
pub fn wrap(entry: &str, bytes: &[u8]) -> Vec<u8> {
    let size = bytes.len() as u64;
    let mut layer = Vec::with_capacity(layer_len(size) as usize);
    layer.extend_from_slice(&header(entry, size));
    layer.extend_from_slice(bytes);
    layer.resize(layer_len(size) as usize, 0);
    layer
}

/// The file a layer of `entry` wraps; anything but the exact wrapping is refused.
pub fn unwrap<'a>(entry: &'static str, layer: &'a [u8]) -> Result<&'a [u8], LayerTarError> {
    let fail = |reason: String| LayerTarError { entry, reason };
    if (layer.len() as u64) < DATA_OFFSET + END_OF_ARCHIVE {
        return Err(fail(format!(
            "{} bytes is shorter than an empty tar entry",
            layer.len()
        )));
    }
    let size = data_size(entry, &layer[..DATA_OFFSET as usize])?;
    if layer.len() as u64 != layer_len(size) {
        return Err(fail(format!(
            "the header announces {size} bytes, so the layer must be {} bytes, not {}",
            layer_len(size),
            layer.len()
        )));
    }
    let end = (DATA_OFFSET + size) as usize;
    if layer[end..].iter().any(|b| *b != 0) {
        return Err(fail("bytes after the entry are not zero".into()));
    }
    Ok(&layer[DATA_OFFSET as usize..end])
}

/// The bootstrap a bootstrap layer carries: petrel's exact tar wrapping, or (images
/// converted before bootstrap layers were tars) the bare bootstrap, recognised by its
/// magic.
pub fn bootstrap_of_layer(layer: &[u8]) -> Result<&[u8], LayerTarError> {
    if layer.starts_with(&crate::layout::MAGIC) {
        return Ok(layer);
    }
    unwrap(BOOTSTRAP_ENTRY, layer)
}

/// The data size a layer header announces, if it is exactly petrel's header for `entry`.
pub fn data_size(entry: &'static str, header_bytes: &[u8]) -> Result<u64, LayerTarError> {
    let fail = |reason: String| LayerTarError { entry, reason };
    let bytes: &[u8; 512] = header_bytes
        .try_into()
        .map_err(|_| fail(format!("a header is 512 bytes, not {}", header_bytes.len())))?;
    let parsed = tar::Header::from_byte_slice(bytes);
    let size = parsed
        .size()
        .map_err(|e| fail(format!("unreadable size in the tar header: {e}")))?;
    if &header(entry, size) != bytes {
        let name = String::from_utf8_lossy(&parsed.path_bytes()).into_owned();
        return Err(fail(format!(
            "its tar header (entry {name:?}) is not petrel's header for {entry}"
        )));
    }
    Ok(size)
}

/// The bootstrap layer as `petrel convert` pushes it: petrel's wrapping of the
/// bootstrap, gzip-compressed (`application/vnd.oci.image.layer.v1.tar+gzip`; a
/// bootstrap compresses about 4x). Returns (layer, sha256 of the uncompressed tar:
/// the layer's diff_id).
pub fn gzipped_bootstrap_layer(bootstrap: &[u8]) -> (Vec<u8>, [u8; 32]) {
    use sha2::Digest;
    use std::io::Write;
    let tar = wrap(BOOTSTRAP_ENTRY, bootstrap);
    let diff_id = sha2::Sha256::digest(&tar).into();
    // Level 5: on a Python service's 2.2 MB bootstrap, 0.1 % more bytes than 6
    // for 30 % less time (zlib-rs; 9 saves 0.4 % for 4.5 times the time).
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(tar.len() / 3), flate2::Compression::new(5));
    encoder.write_all(&tar).expect("writing to memory");
    (encoder.finish().expect("writing to memory"), diff_id)
}

/// Decompresses a gzip layer from `compressed` into `out`, refusing more than
/// `limit` bytes of output (a small layer can expand without bound); returns the
/// number of bytes written and their sha256 (the layer's diff_id).
pub fn gunzip_layer(
    entry: &'static str,
    compressed: impl std::io::Read,
    out: &mut dyn std::io::Write,
    limit: u64,
) -> Result<(u64, [u8; 32]), LayerTarError> {
    use sha2::Digest;
    use std::io::Read;
    let fail = |reason: String| LayerTarError { entry, reason };
    let mut decoder = flate2::read::GzDecoder::new(compressed).take(limit + 1);
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut written = 0u64;
    loop {
        let n = match decoder.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(format!("its gzip stream does not decompress: {e}"))),
        };
        written += n as u64;
        if written > limit {
            return Err(fail(format!("it decompresses to more than {limit} bytes")));
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n])
            .map_err(|e| fail(format!("writing it out: {e}")))?;
    }
    Ok((written, hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gzipped_bootstrap_layer_decompresses_to_the_exact_wrapping_within_its_limit() {
        let bootstrap: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (layer, diff_id) = gzipped_bootstrap_layer(&bootstrap);
        assert!(layer.len() < bootstrap.len() / 4, "{} bytes", layer.len());
        let mut out = Vec::new();
        let (n, hashed) = gunzip_layer(BOOTSTRAP_ENTRY, &layer[..], &mut out, 1 << 20).unwrap();
        assert_eq!((n, hashed), (out.len() as u64, diff_id));
        assert_eq!(unwrap(BOOTSTRAP_ENTRY, &out).unwrap(), &bootstrap[..]);
        let err = gunzip_layer(BOOTSTRAP_ENTRY, &layer[..], &mut Vec::new(), 50_000).unwrap_err();
        assert!(err.to_string().contains("more than 50000 bytes"), "{err}");
        let err = gunzip_layer(BOOTSTRAP_ENTRY, &layer[..layer.len() / 2], &mut Vec::new(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("does not decompress"), "{err}");
    }

    #[test]
    fn a_wrapped_file_unwraps_and_reads_as_a_tar() {
        for size in [0usize, 1, 511, 512, 513, 4096, 100_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            let layer = wrap(BLOB_ENTRY, &data);
            assert_eq!(layer.len() as u64, layer_len(size as u64));
            assert_eq!(layer.len() % 512, 0);
            assert_eq!(unwrap(BLOB_ENTRY, &layer).unwrap(), &data[..]);
            let mut archive = tar::Archive::new(&layer[..]);
            let mut entries = archive.entries().unwrap();
            let mut entry = entries.next().unwrap().unwrap();
            assert_eq!(entry.path().unwrap().to_str(), Some(BLOB_ENTRY));
            assert_eq!(entry.header().mode().unwrap(), 0o444);
            let mut read = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut read).unwrap();
            assert_eq!(read, data);
            drop(entry);
            assert!(entries.next().is_none());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn wrapping_round_trips_and_damage_outside_the_data_is_refused(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let layer = wrap(BLOB_ENTRY, &data);
            proptest::prop_assert_eq!(unwrap(BLOB_ENTRY, &layer).unwrap(), &data[..]);
            let mut damaged = layer.clone();
            let i = at.index(damaged.len());
            damaged[i] ^= flip;
            let inside_data = (DATA_OFFSET as usize..DATA_OFFSET as usize + data.len()).contains(&i);
            proptest::prop_assert_eq!(unwrap(BLOB_ENTRY, &damaged).is_ok(), inside_data);
        }
    }

    #[test]
    fn a_bare_bootstrap_layer_of_older_images_still_reads() {
        let mut bare = crate::layout::MAGIC.to_vec();
        bare.extend_from_slice(b" and the rest of an old bootstrap layer");
        assert_eq!(bootstrap_of_layer(&bare).unwrap(), &bare[..]);
        let wrapped = wrap(BOOTSTRAP_ENTRY, &bare);
        assert_eq!(bootstrap_of_layer(&wrapped).unwrap(), &bare[..]);
        assert!(bootstrap_of_layer(b"neither").is_err());
    }

    #[test]
    fn anything_but_the_exact_wrapping_is_refused() {
        let layer = wrap(BOOTSTRAP_ENTRY, b"bootstrap bytes");
        let error = unwrap(BLOB_ENTRY, &layer).unwrap_err().to_string();
        assert!(
            error.contains("petrel/bootstrap") && error.contains("not petrel's header for petrel/blob"),
            "{error}"
        );
        assert!(unwrap(BOOTSTRAP_ENTRY, &layer[..layer.len() - 1]).is_err());
        let mut longer = layer.clone();
        longer.extend_from_slice(&[0; 512]);
        assert!(unwrap(BOOTSTRAP_ENTRY, &longer)
            .unwrap_err()
            .to_string()
            .contains("must be"));
        let mut dirty = layer.clone();
        *dirty.last_mut().unwrap() = 1;
        assert!(unwrap(BOOTSTRAP_ENTRY, &dirty)
            .unwrap_err()
            .to_string()
            .contains("not zero"));
        let mut renamed = layer.clone();
        renamed[0] = b'x';
        assert!(unwrap(BOOTSTRAP_ENTRY, &renamed).is_err());
        assert!(unwrap(BOOTSTRAP_ENTRY, b"short").is_err());
        assert!(unwrap(BOOTSTRAP_ENTRY, &[0xff; 2048]).is_err());
    }
}
