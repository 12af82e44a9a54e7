//! Decompression on its own thread: a gzip or zstd layer is decoded (and, when it
//! comes from a registry, downloaded) while the tar parser and chunker work on what
//! was decoded before, so the two use two cores instead of taking turns on one.

use std::io::Read;
use std::sync::mpsc::{sync_channel, Receiver};

/// Decoded bytes handed over at a time.
const BLOCK: usize = 1 << 20;
/// Blocks decoded ahead of the parser at most.
const BLOCKS_AHEAD: usize = 4;

/// Runs `consume` on the decompressed stream of `reader`, decoded on another thread.
/// When `consume` returns early (an error, or the tar's end marker before the end of
/// the stream), the decoder stops at its next block.
pub fn with_decoded<R: Read + Send, T>(reader: R, consume: impl FnOnce(&mut dyn Read) -> T) -> T {
    std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel::<std::io::Result<Vec<u8>>>(BLOCKS_AHEAD);
        scope.spawn(move || {
            let mut stream = match crate::layer::decompressed(reader) {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = sender.send(Err(e));
                    return;
                }
            };
            loop {
                let mut block = vec![0u8; BLOCK];
                let mut filled = 0;
                let result = loop {
                    match stream.read(&mut block[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == BLOCK {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                block.truncate(filled);
                let done = filled < BLOCK || result.is_err();
                if filled > 0 && sender.send(Ok(block)).is_err() {
                    return;
                }
                if let Err(e) = result {
                    let _ = sender.send(Err(e));
                    return;
                }
                if done {
                    return;
                }
            }
        });
        let mut decoded = Decoded {
            receiver,
            block: Vec::new(),
            at: 0,
        };
        consume(&mut decoded)
        // `decoded` (the receiver) is dropped here, before the scope joins the
        // decoder, so a decoder blocked on a full channel stops.
    })
}

/// The parser's side: reads the blocks the decoder sends, in order.
struct Decoded {
    receiver: Receiver<std::io::Result<Vec<u8>>>,
    block: Vec<u8>,
    at: usize,
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.block.len() {
            match self.receiver.recv() {
                Ok(Ok(block)) => {
                    self.block = block;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_arrives_in_order() {
        for size in [0usize, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 77] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let read = with_decoded(&data[..], |r| {
                let mut out = Vec::new();
                r.read_to_end(&mut out).unwrap();
                out
            });
            assert_eq!(read, data, "size {size}");
        }
    }

    #[test]
    fn gzip_is_decoded_and_an_early_stop_does_not_hang() {
        let data: Vec<u8> = (0..20 * BLOCK).map(|i| (i % 7) as u8).collect();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &data).unwrap();
        let gz = encoder.finish().unwrap();
        let first = with_decoded(&gz[..], |r| {
            let mut head = [0u8; 10];
            r.read_exact(&mut head).unwrap();
            head
        });
        assert_eq!(&first[..], &data[..10]);
        let all = with_decoded(&gz[..], |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            out
        });
        assert_eq!(all, data);
    }

    #[test]
    fn a_read_error_reaches_the_parser() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("the registry went away"))
            }
        }
        let error = with_decoded(Failing, |r| r.read(&mut [0u8; 4]).unwrap_err());
        assert!(error.to_string().contains("went away"), "{error}");
    }
}
