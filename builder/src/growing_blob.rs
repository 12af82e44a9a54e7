//! A blob file that another thread reads while the build still writes it, so that
//! it can be uploaded as it grows (`petrel convert`).
//!
//! Its length is fixed when it is opened (the one-entry tar header states it), so
//! a reader knows from the start how many bytes will come; the digest is known
//! only once the last byte is written.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

/// How a growing blob ended.
#[derive(Debug, Clone)]
pub enum BlobEnd {
    /// Complete: its sha256 and where the file now lies.
    Done { digest: [u8; 32], path: PathBuf },
    /// The build stopped before the blob was complete.
    Abandoned(String),
}

#[derive(Debug, Default)]
struct Growth {
    /// Bytes written and flushed, from the start of the file.
    written: u64,
    end: Option<BlobEnd>,
}

/// A blob being written: its final length, and how far it is.
#[derive(Debug)]
pub struct GrowingBlob {
    file: File,
    len: u64,
    growth: Mutex<Growth>,
    grew: Condvar,
}

impl GrowingBlob {
    /// A blob of exactly `len` bytes that will be written to `file` from its start.
    pub(crate) fn new(file: File, len: u64) -> Arc<Self> {
        Arc::new(GrowingBlob {
            file,
            len,
            growth: Mutex::new(Growth::default()),
            grew: Condvar::new(),
        })
    }

    /// Its length once complete.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `written` bytes are on file (flushed).
    pub(crate) fn grew_to(&self, written: u64) {
        if let Ok(mut growth) = self.growth.lock() {
            growth.written = written.min(self.len);
        }
        self.grew.notify_all();
    }

    pub(crate) fn end(&self, end: BlobEnd) {
        if let Ok(mut growth) = self.growth.lock() {
            if growth.end.is_none() {
                growth.end = Some(end);
            }
        }
        self.grew.notify_all();
    }

    /// Waits until the blob is complete or abandoned.
    pub fn wait_end(&self) -> BlobEnd {
        let Ok(mut growth) = self.growth.lock() else {
            return BlobEnd::Abandoned("blob state poisoned".into());
        };
        loop {
            if let Some(end) = &growth.end {
                return end.clone();
            }
            growth = match self.grew.wait(growth) {
                Ok(g) => g,
                Err(_) => return BlobEnd::Abandoned("blob state poisoned".into()),
            };
        }
    }

    /// Reads the blob from its start, waiting for bytes not yet written; fails if
    /// the blob is abandoned before its end.
    pub fn reader(self: &Arc<Self>) -> GrowingBlobReader {
        GrowingBlobReader {
            blob: Arc::clone(self),
            position: 0,
        }
    }
}

/// Reads a [`GrowingBlob`] as it grows.
#[derive(Debug)]
pub struct GrowingBlobReader {
    blob: Arc<GrowingBlob>,
    position: u64,
}

impl Read for GrowingBlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() || self.position >= self.blob.len {
            return Ok(0);
        }
        let available = {
            let mut growth = self
                .blob
                .growth
                .lock()
                .map_err(|_| std::io::Error::other("blob state poisoned"))?;
            loop {
                if growth.written > self.position {
                    break growth.written - self.position;
                }
                if let Some(BlobEnd::Abandoned(why)) = &growth.end {
                    return Err(std::io::Error::other(format!("blob abandoned: {why}")));
                }
                if growth.end.is_some() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob ended before its stated length",
                    ));
                }
                growth = self
                    .blob
                    .grew
                    .wait(growth)
                    .map_err(|_| std::io::Error::other("blob state poisoned"))?;
            }
        };
        let n = (buf.len() as u64).min(available) as usize;
        let read = self.blob.file.read_at(&mut buf[..n], self.position)?;
        self.position += read as u64;
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_reader_gets_every_byte_as_it_is_written_and_an_abandoned_blob_is_an_error() {
        let mut file = tempfile::tempfile().unwrap();
        let blob = GrowingBlob::new(file.try_clone().unwrap(), 10_000);
        let mut reader = blob.reader();
        let reading = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).map(|_| got)
        });
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(3_000) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            file.write_all(piece).unwrap();
            blob.grew_to(file.metadata().unwrap().len());
        }
        assert_eq!(reading.join().unwrap().unwrap(), data);

        let file = tempfile::tempfile().unwrap();
        let blob = GrowingBlob::new(file, 100);
        let mut reader = blob.reader();
        let reading = std::thread::spawn(move || reader.read_to_end(&mut Vec::new()));
        blob.end(BlobEnd::Abandoned("the layer was corrupt".into()));
        let error = reading.join().unwrap().unwrap_err();
        assert!(error.to_string().contains("the layer was corrupt"), "{error}");
    }
}
