//! Where blobs come from. The storage layer asks a backend for byte ranges of a
//! blob; the local backend reads image or OCI-layout directories, and the registry
//! backend (later) is one more implementation of the same trait.

use petrel_format::image_dir::ImageDir;
use petrel_format::layer_tar;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// A source of blob bytes.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Reads `len` bytes at `offset` of the blob with sha256 `digest`. Must return
    /// exactly `len` bytes or an error.
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, purpose: ReadPurpose) -> std::io::Result<Vec<u8>>;

    /// `read_range`, handing the bytes to `sink` in order as they arrive (every byte
    /// once), so the first chunks of a large request can be served before the rest
    /// is in. By default the whole range at once.
    fn stream_range(
        &self,
        digest: &[u8; 32],
        offset: u64,
        len: u64,
        purpose: ReadPurpose,
        sink: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<()> {
        let bytes = self.read_range(digest, offset, len, purpose)?;
        if bytes.len() as u64 != len {
            return Err(std::io::Error::other(format!("got {} of {len} bytes", bytes.len())));
        }
        sink(&bytes);
        Ok(())
    }

    /// Several ranges (offset, length; ascending, apart) of one blob, each range's
    /// bytes handed to `sink(range, piece)` in order, ranges in order (the fetcher
    /// reads the pieces as one stream of chunks), every byte once: in one request
    /// where the backend can (a registry answering multi-range requests), else one
    /// range after another.
    fn stream_ranges(
        &self,
        digest: &[u8; 32],
        ranges: &[(u64, u64)],
        purpose: ReadPurpose,
        sink: &mut dyn FnMut(usize, &[u8]),
    ) -> std::io::Result<()> {
        for (i, (offset, len)) in ranges.iter().enumerate() {
            self.stream_range(digest, *offset, *len, purpose, &mut |piece| sink(i, piece))?;
        }
        Ok(())
    }

    /// A short description for logs (`local:/path`, `registry:host/repo`).
    fn describe(&self) -> String;

    /// Whether the blobs are on this node (no link between them and the mount).
    fn is_on_this_node(&self) -> bool {
        false
    }
}

/// Who waits for a read: a reader (fastest source now), or the prefetcher (may wait
/// for a mirror to hold the blob rather than spend the origin's uplink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPurpose {
    Reader,
    Background,
}

/// Blobs in a local directory laid out as `blobs/sha256/<hex>` (a petrel image
/// directory or an OCI image layout).
#[derive(Debug, Clone)]
pub struct LocalBackend {
    dir: ImageDir,
    /// Where a blob's first stored byte is in its file, less than in its layer: 0 for
    /// whole layers, [`layer_tar::DATA_OFFSET`] for unpacked `petrel/blob` entries.
    header_bytes: u64,
}

impl LocalBackend {
    /// Blob files that are whole blob layers.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalBackend {
            dir: ImageDir::new(dir.into()),
            header_bytes: 0,
        }
    }

    /// Blob files that are the `petrel/blob` entries of unpacked blob layers (as a
    /// tar unpacker such as containerd's leaves them): their tar header is gone.
    pub fn unpacked(dir: impl Into<PathBuf>) -> Self {
        LocalBackend {
            dir: ImageDir::new(dir.into()),
            header_bytes: layer_tar::DATA_OFFSET,
        }
    }
}

impl LocalBackend {
    /// The blob file of `digest`, open, and where in it the blob's `offset` is.
    fn open_at(&self, digest: &[u8; 32], offset: u64) -> std::io::Result<(File, u64)> {
        let path = self.dir.blob_path(digest);
        let at = offset.checked_sub(self.header_bytes).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("offset {offset} of {} lies in the layer's tar header", path.display()),
            )
        })?;
        Ok((File::open(&path)?, at))
    }
}

/// Bytes a local read hands on at a time (`LocalBackend::stream_range`).
const LOCAL_PIECE_BYTES: usize = 1 << 20;

thread_local! {
    /// Each fetching thread's buffer for local reads, reused from read to read.
    static LOCAL_PIECE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Backend for LocalBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, _: ReadPurpose) -> std::io::Result<Vec<u8>> {
        let (file, at) = self.open_at(digest, offset)?;
        let mut buffer = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut buffer, at)?;
        Ok(buffer)
    }

    /// Read a piece at a time into this thread's buffer and handed on from there:
    /// no buffer of the whole request is allocated and cleared (up to 16 MiB per
    /// request), the pieces are still in the CPU's cache when the fetcher decodes
    /// them, and a reader's first chunks are in before the rest is read.
    fn stream_range(
        &self,
        digest: &[u8; 32],
        offset: u64,
        len: u64,
        _: ReadPurpose,
        sink: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<()> {
        let (file, at) = self.open_at(digest, offset)?;
        LOCAL_PIECE.with(|cell| {
            let mut piece = cell.borrow_mut();
            if piece.len() < LOCAL_PIECE_BYTES {
                piece.resize(LOCAL_PIECE_BYTES, 0);
            }
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(LOCAL_PIECE_BYTES as u64) as usize;
                file.read_exact_at(&mut piece[..n], at + done)?;
                sink(&piece[..n]);
                done += n as u64;
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        let form = if self.header_bytes == 0 { "" } else { " (unpacked)" };
        format!("local:{}{form}", self.dir.root().display())
    }

    fn is_on_this_node(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_range_streams_in_pieces_of_the_right_bytes_and_a_short_blob_fails() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path());
        let digest = [7u8; 32];
        let path = backend.dir.blob_path(&digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let blob: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &blob).unwrap();

        let (offset, len) = (100u64, (5u64 << 20) / 2);
        let mut got = Vec::new();
        let mut pieces = 0;
        backend
            .stream_range(&digest, offset, len, ReadPurpose::Reader, &mut |piece| {
                assert!(piece.len() <= LOCAL_PIECE_BYTES);
                pieces += 1;
                got.extend_from_slice(piece);
            })
            .unwrap();
        assert_eq!(got, blob[offset as usize..(offset + len) as usize]);
        assert_eq!(pieces, 3);

        // Past the blob's end: an error, never zeros.
        let e = backend
            .stream_range(&digest, 2 << 20, 2 << 20, ReadPurpose::Reader, &mut |_| {})
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
