//! A petrel image on local disk, read with every chunk verified.

use crate::error::{BuildError, Result};
use petrel_format::codec::decode_chunk;
use petrel_format::image_dir::ImageDir;
use petrel_format::reader::{FileSegment, SegmentSource};
use petrel_format::{Bootstrap, Inode, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// An image directory with its bootstrap loaded and validated.
#[derive(Debug)]
pub struct LocalImage {
    dir: ImageDir,
    bootstrap: Vec<u8>,
    blobs: Vec<Option<File>>,
}

impl LocalImage {
    /// Reads and validates `<dir>/bootstrap` (digest included) and opens its blobs.
    pub fn open(dir: &Path) -> Result<Self> {
        let dir = ImageDir::new(dir);
        let path = dir.bootstrap_path();
        let bytes = std::fs::read(&path).map_err(BuildError::io("read", &path))?;
        let bootstrap = Bootstrap::open(&bytes)?;
        let blobs = bootstrap
            .blobs()
            .map(|blob| Ok(File::open(dir.blob_path(&blob?.digest)).ok()))
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalImage {
            dir,
            bootstrap: bytes,
            blobs,
        })
    }

    /// The bootstrap (already validated by `open`).
    pub fn bootstrap(&self) -> Bootstrap<'_> {
        Bootstrap::open_with(&self.bootstrap, OpenOptions { verify_digest: false }).expect("validated at open")
    }

    /// The raw bootstrap bytes.
    pub fn bootstrap_bytes(&self) -> &[u8] {
        &self.bootstrap
    }

    pub fn dir(&self) -> &ImageDir {
        &self.dir
    }

    /// The stored bytes of chunk `index`, unverified.
    pub fn read_stored_chunk(&self, index: u32) -> Result<Vec<u8>> {
        let bootstrap = self.bootstrap();
        let chunk = bootstrap.chunk(index)?;
        let blob = bootstrap.blob(chunk.blob_index)?;
        let file = self.blobs[chunk.blob_index as usize]
            .as_ref()
            .ok_or_else(|| BuildError::MissingBlob {
                digest: blob.oci_digest(),
                path: self.dir.blob_path(&blob.digest),
            })?;
        let mut stored = vec![0u8; chunk.compressed_size as usize];
        file.read_exact_at(&mut stored, chunk.compressed_offset)
            .map_err(BuildError::io("read", self.dir.blob_path(&blob.digest)))?;
        Ok(stored)
    }

    /// The plain bytes of chunk `index`, verified against its digest.
    pub fn read_chunk(&self, index: u32) -> Result<Vec<u8>> {
        let bootstrap = self.bootstrap();
        let chunk = bootstrap.chunk(index)?;
        let stored = self.read_stored_chunk(index)?;
        decode_chunk(&chunk, &stored).map_err(|source| BuildError::Chunk {
            index,
            blob: bootstrap
                .blob(chunk.blob_index)
                .map(|b| b.oci_digest())
                .unwrap_or_default(),
            offset: chunk.compressed_offset,
            source,
        })
    }

    /// Calls `sink` with consecutive verified pieces of a regular file's content.
    pub fn for_each_piece(
        &self,
        file: &Inode<'_>,
        mut sink: impl FnMut(&FileSegment, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let bootstrap = self.bootstrap();
        let segments = bootstrap.segments(file, 0, file.size())?;
        let mut cached: Option<(u32, Vec<u8>)> = None;
        let zeros = vec![0u8; 1 << 16];
        for segment in &segments {
            match segment.source {
                SegmentSource::Hole => {
                    let mut left = segment.length as usize;
                    while left > 0 {
                        let n = left.min(zeros.len());
                        sink(segment, &zeros[..n])?;
                        left -= n;
                    }
                }
                SegmentSource::Chunk { index, chunk_offset } => {
                    if cached.as_ref().is_none_or(|(i, _)| *i != index) {
                        cached = Some((index, self.read_chunk(index)?));
                    }
                    let data = &cached.as_ref().expect("just filled").1;
                    let start = chunk_offset as usize;
                    sink(segment, &data[start..start + segment.length as usize])?;
                }
            }
        }
        Ok(())
    }

    /// A regular file's content as a stream: one verified chunk is held at a time,
    /// holes are produced as zeros, whatever size the bootstrap declares.
    pub fn file_reader(&self, file: &Inode<'_>) -> Result<FileReader<'_>> {
        Ok(FileReader {
            image: self,
            segments: self.bootstrap().segments(file, 0, file.size())?.into_iter(),
            current: None,
            chunk: None,
        })
    }
}

/// A regular file of a `LocalImage`, read in order (`LocalImage::file_reader`).
#[derive(Debug)]
pub struct FileReader<'i> {
    image: &'i LocalImage,
    segments: std::vec::IntoIter<FileSegment>,
    /// The segment being read and how much of it was.
    current: Option<(FileSegment, usize)>,
    /// The last chunk read (index, plain bytes).
    chunk: Option<(u32, Vec<u8>)>,
}

impl std::io::Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some((segment, done)) = self.current.take().or_else(|| self.segments.next().map(|s| (s, 0))) else {
                return Ok(0);
            };
            let left = segment.length as usize - done;
            if left == 0 {
                continue;
            }
            let n = left.min(out.len());
            match segment.source {
                SegmentSource::Hole => out[..n].fill(0),
                SegmentSource::Chunk { index, chunk_offset } => {
                    if self.chunk.as_ref().is_none_or(|(i, _)| *i != index) {
                        let bytes = self.image.read_chunk(index).map_err(std::io::Error::other)?;
                        self.chunk = Some((index, bytes));
                    }
                    let data = &self.chunk.as_ref().expect("just filled").1;
                    let start = chunk_offset as usize + done;
                    let bytes = data
                        .get(start..start + n)
                        .ok_or_else(|| std::io::Error::other("a chunk is shorter than its reference"))?;
                    out[..n].copy_from_slice(bytes);
                }
            }
            self.current = Some((segment, done + n));
            return Ok(n);
        }
    }
}
