//! Several ranges of a blob in one request (`Range: bytes=a-b,c-d`, RFC 9110 §14):
//! the answer is `multipart/byteranges`, one part per range (a server may also
//! join neighbouring ranges into one part, or answer one part without the
//! multipart wrapping). The registry's own `docker-registry` answers so; servers
//! that do not (a `200` with the whole blob) make the client go back to one range a
//! request.
//!
//! The answer comes from the registry or a mirror, so it is read with bounds: header
//! lines, parts and bytes outside the ranges asked for are limited, and a part must
//! cover only bytes between the first and last byte asked for.

use std::io::{BufRead, Read};

/// Most ranges asked for in one request (a `Range` header stays a few KiB; servers
/// such as nginx refuse more than a few dozen by default).
pub const MAX_RANGES: usize = 64;
/// Longest header line of a part.
const MAX_LINE: usize = 1024;
/// Most header lines of one part.
const MAX_PART_HEADERS: usize = 16;
/// Most bytes read of a blob that fall between the ranges asked for (a server that
/// joins ranges sends the gaps too).
const MAX_GAP_BYTES: u64 = 4 << 20;

/// The `Range` header value asking for `ranges` (offset, length), in order.
pub fn range_header(ranges: &[(u64, u64)]) -> String {
    let list: Vec<String> = ranges
        .iter()
        .map(|(offset, len)| format!("{offset}-{}", offset + len.max(&1) - 1))
        .collect();
    format!("bytes={}", list.join(","))
}

/// The boundary of a `multipart/byteranges` content type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    parts.find_map(|p| {
        let (key, value) = p.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 200)
    })
}

/// `first-last` of a `Content-Range: bytes first-last/size` value.
pub fn content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, _) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last).then_some((first, last))
}

/// Where the bytes of the ranges asked for are delivered: `sink(range, piece)` gets
/// each range's bytes in order, every byte once, ranges in order. `delivered[i]`
/// counts what range `i` got (so a broken answer can be resumed range by range).
pub struct Delivery<'a> {
    ranges: &'a [(u64, u64)],
    pub delivered: Vec<u64>,
    gap_bytes: u64,
    sink: &'a mut dyn FnMut(usize, &[u8]),
}

impl std::fmt::Debug for Delivery<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("ranges", &self.ranges)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl<'a> Delivery<'a> {
    pub fn new(ranges: &'a [(u64, u64)], sink: &'a mut dyn FnMut(usize, &[u8])) -> Self {
        Delivery {
            ranges,
            delivered: vec![0; ranges.len()],
            gap_bytes: 0,
            sink,
        }
    }

    /// Whether every range got all its bytes.
    pub fn complete(&self) -> bool {
        self.ranges
            .iter()
            .zip(&self.delivered)
            .all(|((_, len), got)| got == len)
    }

    /// The first range not complete yet.
    fn pending(&self) -> Option<usize> {
        (0..self.ranges.len()).find(|i| self.delivered[*i] < self.ranges[*i].1)
    }

    /// Hands over blob bytes `[at, at + bytes.len())` read from the answer: the parts
    /// within ranges asked for go to the sink, in order; bytes before the next byte
    /// wanted count as gap bytes (bounded). Bytes going backwards are an error.
    fn offer(&mut self, mut at: u64, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let Some(i) = self.pending() else {
                return Err(bad("bytes after every range asked for"));
            };
            let (offset, len) = self.ranges[i];
            let wanted = offset + self.delivered[i];
            if at < wanted {
                return Err(bad("a part repeats or precedes bytes already delivered"));
            }
            if at > wanted {
                return Err(bad("a part skips bytes of a range asked for"));
            }
            let take = ((offset + len - at) as usize).min(bytes.len());
            (self.sink)(i, &bytes[..take]);
            self.delivered[i] += take as u64;
            at += take as u64;
            bytes = &bytes[take..];
            if !bytes.is_empty() {
                // Bytes between this range and the next one asked for.
                let next = self
                    .pending()
                    .map_or(u64::MAX, |j| self.ranges[j].0 + self.delivered[j]);
                let gap = ((next.saturating_sub(at)) as usize).min(bytes.len());
                self.gap_bytes += gap as u64;
                if self.gap_bytes > MAX_GAP_BYTES {
                    return Err(bad("too many bytes between the ranges asked for"));
                }
                at += gap as u64;
                bytes = &bytes[gap..];
            }
        }
        Ok(())
    }

    /// Reads one part of `len` bytes starting at blob offset `first` from `body`.
    pub fn read_part(&mut self, body: &mut dyn Read, first: u64, len: u64) -> std::io::Result<()> {
        let Some(i) = self.pending() else {
            return Err(bad("a part after every range asked for"));
        };
        let wanted = self.ranges[i].0 + self.delivered[i];
        let last_wanted = self.ranges.last().map_or(0, |(o, l)| o + l);
        if first > wanted {
            return Err(bad("a part skips bytes of a range asked for"));
        }
        if first + len > last_wanted + MAX_GAP_BYTES {
            return Err(bad("a part reaching far beyond the ranges asked for"));
        }
        // Bytes of the part before the next byte wanted (a range already had them).
        let mut skip = wanted - first;
        let mut at = first;
        let mut left = len;
        let mut buffer = vec![0u8; (len as usize).clamp(1, 256 << 10)];
        while left > 0 {
            let want = buffer.len().min(left as usize);
            let n = body.read(&mut buffer[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let mut piece = &buffer[..n];
            let skipped = (skip as usize).min(piece.len());
            if skipped > 0 {
                self.gap_bytes += skipped as u64;
                if self.gap_bytes > MAX_GAP_BYTES {
                    return Err(bad("too many bytes between the ranges asked for"));
                }
                skip -= skipped as u64;
                at += skipped as u64;
                piece = &piece[skipped..];
            }
            if !piece.is_empty() {
                self.offer(at, piece)?;
                at += piece.len() as u64;
            }
            left -= n as u64;
        }
        Ok(())
    }
}

/// Reads a `multipart/byteranges` body with `boundary` into `delivery`, part by part,
/// until every range is complete (the rest of the body is not read). An answer that
/// closes before is an error.
pub fn read_multipart(body: &mut dyn BufRead, boundary: &str, delivery: &mut Delivery<'_>) -> std::io::Result<()> {
    let open = format!("--{boundary}");
    let close = format!("--{boundary}--");
    let mut parts = 0usize;
    loop {
        // Skip the preamble or the CRLF after the previous part, to the boundary.
        let mut seen = 0;
        let line = loop {
            let line = read_line(body)?;
            if line == open || line == close {
                break line;
            }
            seen += 1;
            if seen > 2 {
                return Err(bad("no boundary where a part should start"));
            }
        };
        if line == close {
            return Err(bad("the answer ended before every range asked for"));
        }
        parts += 1;
        if parts > MAX_RANGES * 2 {
            return Err(bad("too many parts"));
        }
        let mut span = None;
        for headers in 0.. {
            let line = read_line(body)?;
            if line.is_empty() {
                break;
            }
            if headers >= MAX_PART_HEADERS {
                return Err(bad("too many header lines in a part"));
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-range") {
                    span = content_range(value);
                }
            }
        }
        let (first, last) = span.ok_or_else(|| bad("a part without a Content-Range"))?;
        delivery.read_part(body, first, last - first + 1)?;
        if delivery.complete() {
            return Ok(());
        }
    }
}

/// One CRLF- (or LF-) terminated line, without its terminator, bounded.
fn read_line(body: &mut dyn BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    body.take(MAX_LINE as u64 + 2).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > MAX_LINE {
            bad("a header line that is too long")
        } else {
            std::io::ErrorKind::UnexpectedEof.into()
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("a header line that is not text"))
}

fn bad(reason: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("multipart range answer: {reason}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> Vec<u8> {
        (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn part(boundary: &str, blob: &[u8], first: usize, last: usize) -> Vec<u8> {
        let mut out = format!(
            "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}-{last}/{}\r\n\r\n",
            blob.len()
        )
        .into_bytes();
        out.extend_from_slice(&blob[first..=last]);
        out.extend_from_slice(b"\r\n");
        out
    }

    fn read(body: &[u8], ranges: &[(u64, u64)]) -> std::io::Result<Vec<Vec<u8>>> {
        let mut got = vec![Vec::new(); ranges.len()];
        let mut sink = |i: usize, piece: &[u8]| got[i].extend_from_slice(piece);
        let mut delivery = Delivery::new(ranges, &mut sink);
        let mut reader = std::io::BufReader::with_capacity(7, body);
        read_multipart(&mut reader, "B0UND", &mut delivery)?;
        assert!(delivery.complete());
        Ok(got)
    }

    fn wanted(blob: &[u8], ranges: &[(u64, u64)]) -> Vec<Vec<u8>> {
        ranges
            .iter()
            .map(|(o, l)| blob[*o as usize..(*o + *l) as usize].to_vec())
            .collect()
    }

    #[test]
    fn headers_are_written_and_read() {
        assert_eq!(range_header(&[(0, 10), (100, 1)]), "bytes=0-9,100-100");
        assert_eq!(
            boundary("multipart/byteranges; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        assert_eq!(boundary("application/octet-stream"), None);
        assert_eq!(content_range(" bytes 5-9/100"), Some((5, 9)));
        assert_eq!(content_range("bytes 9-5/100"), None);
    }

    #[test]
    fn parts_one_per_range_or_joined_give_every_range() {
        let blob = blob();
        let ranges = [(10, 100), (5_000, 20), (5_020, 30), (90_000, 10_000)];
        let mut body = b"preamble\r\n".to_vec();
        for (o, l) in ranges {
            body.extend(part("B0UND", &blob, o as usize, (o + l - 1) as usize));
        }
        body.extend_from_slice(b"--B0UND--\r\n");
        assert_eq!(read(&body, &ranges).unwrap(), wanted(&blob, &ranges));
        // A server may join ranges (and the gap between them) into one part.
        let mut joined = part("B0UND", &blob, 10, 109);
        joined.extend(part("B0UND", &blob, 4_000, 5_049));
        joined.extend(part("B0UND", &blob, 90_000, 99_999));
        joined.extend_from_slice(b"--B0UND--\r\n");
        assert_eq!(read(&joined, &ranges).unwrap(), wanted(&blob, &ranges));
    }

    #[test]
    fn hostile_answers_are_errors() {
        let blob = blob();
        let ranges = [(10, 100), (5_000, 20)];
        let case = |body: Vec<u8>| read(&body, &ranges).unwrap_err().to_string();
        // A part that skips bytes of a range.
        let mut body = part("B0UND", &blob, 20, 109);
        body.extend(part("B0UND", &blob, 5_000, 5_019));
        assert!(case(body).contains("skips bytes"));
        // The same range twice (its bytes count as bytes between ranges), then the
        // answer ends without the second range.
        let mut body = part("B0UND", &blob, 10, 109);
        body.extend(part("B0UND", &blob, 10, 109));
        body.extend_from_slice(b"--B0UND--\r\n");
        assert!(read(&body, &ranges).is_err());
        // No Content-Range.
        let body = b"--B0UND\r\nContent-Type: x\r\n\r\nabc\r\n".to_vec();
        assert!(case(body).contains("without a Content-Range"));
        // Endless header line.
        let mut body = b"--B0UND\r\nX: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', 5000));
        assert!(case(body).contains("too long"));
        // A body cut short.
        let mut body = part("B0UND", &blob, 10, 109);
        body.truncate(body.len() - 30);
        assert_eq!(
            read(&body, &ranges).unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        // A part far beyond what was asked for.
        let big: Vec<u8> = vec![0; 10_000_000];
        let body = part("B0UND", &big, 10, 9_999_999);
        assert!(case(body).contains("far beyond"));
    }
}
