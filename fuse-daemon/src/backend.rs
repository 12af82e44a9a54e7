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

impl Backend for LocalBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, _: ReadPurpose) -> std::io::Result<Vec<u8>> {
        let path = self.dir.blob_path(digest);
        let at = offset.checked_sub(self.header_bytes).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("offset {offset} of {} lies in the layer's tar header", path.display()),
            )
        })?;
        let file = File::open(&path)?;
        let mut buffer = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut buffer, at)?;
        Ok(buffer)
    }

    fn describe(&self) -> String {
        let form = if self.header_bytes == 0 { "" } else { " (unpacked)" };
        format!("local:{}{form}", self.dir.root().display())
    }
}
