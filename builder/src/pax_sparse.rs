//! Sparse files in PAX format, as GNU tar (`--sparse-version` 0.0, 0.1, 1.0) and
//! bsdtar (1.0) write them. The entry is an ordinary regular file whose data holds
//! only the data regions; PAX records (and for 1.0, a map at the start of the data)
//! say where those regions lie in a file of `GNU.sparse.size` / `GNU.sparse.realsize`
//! bytes, and `GNU.sparse.name` (0.1, 1.0) is the file's real name (the header's is
//! `…/GNUSparseFile.<pid>/<name>`).
//!
//! - 0.0: repeated `GNU.sparse.offset` / `GNU.sparse.numbytes` records, in order;
//! - 0.1: `GNU.sparse.map` = `offset,size,offset,size,…`;
//! - 1.0: `GNU.sparse.major=1`, `GNU.sparse.minor=0`; the data starts with decimal
//!   lines (the number of regions, then each offset and size), padded to 512 bytes.

use crate::error::EntryProblem;
use crate::sink::SparseFile;
use std::io::Read;

/// Most regions a sparse map may list (each region costs a piece or more).
pub const MAX_SPARSE_REGIONS: usize = 1 << 20;
/// Longest map at the start of a 1.0 entry's data.
const MAX_DATA_MAP_BYTES: u64 = crate::layer::MAX_TAR_METADATA;

/// PAX records of an entry: (key, value), in order.
pub type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// A PAX sparse file's description, from its entry's PAX records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaxSparse {
    /// The file's real name (`GNU.sparse.name`), when given.
    pub name: Option<Vec<u8>>,
    /// The file's real size.
    pub size: u64,
    /// The data regions (offset, length); for 1.0, read from the data by `read_map`.
    pub regions: Vec<(u64, u64)>,
    /// Whether the map is at the start of the data (format 1.0).
    pub map_in_data: bool,
}

fn problem(reason: impl Into<String>) -> EntryProblem {
    EntryProblem::Io(std::io::Error::other(format!("PAX sparse file: {}", reason.into())))
}

fn number(value: &[u8], what: &str) -> Result<u64, EntryProblem> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| problem(format!("{what} {:?} is not a number", String::from_utf8_lossy(value))))
}

/// The sparse description in `records` (key, value, in order), if they describe one.
pub fn detect(records: &PaxRecords) -> Result<Option<PaxSparse>, EntryProblem> {
    if !records.iter().any(|(k, _)| k.starts_with(b"GNU.sparse.")) {
        return Ok(None);
    }
    let mut sparse = PaxSparse {
        name: None,
        size: 0,
        regions: Vec::new(),
        map_in_data: false,
    };
    let (mut major, mut size, mut pending_offset) = (None, None, None);
    for (key, value) in records {
        match key.as_slice() {
            b"GNU.sparse.name" => sparse.name = Some(value.clone()),
            b"GNU.sparse.size" | b"GNU.sparse.realsize" => size = Some(number(value, "size")?),
            b"GNU.sparse.major" => major = Some(number(value, "major version")?),
            b"GNU.sparse.offset" => pending_offset = Some(number(value, "offset")?),
            b"GNU.sparse.numbytes" => {
                let offset = pending_offset
                    .take()
                    .ok_or_else(|| problem("numbytes without an offset"))?;
                push_region(&mut sparse.regions, offset, number(value, "numbytes")?)?;
            }
            b"GNU.sparse.map" => {
                let numbers = value
                    .split(|b| *b == b',')
                    .map(|n| number(n, "map entry"))
                    .collect::<Result<Vec<u64>, _>>()?;
                if numbers.len() % 2 != 0 {
                    return Err(problem("GNU.sparse.map has an odd number of entries"));
                }
                for pair in numbers.chunks(2) {
                    push_region(&mut sparse.regions, pair[0], pair[1])?;
                }
            }
            _ => {}
        }
    }
    sparse.size = size.ok_or_else(|| problem("no GNU.sparse.size or GNU.sparse.realsize"))?;
    match major {
        Some(1) => sparse.map_in_data = true,
        Some(other) => return Err(problem(format!("unknown format major version {other}"))),
        None => {}
    }
    check_regions(&sparse.regions, sparse.size)?;
    Ok(Some(sparse))
}

fn push_region(regions: &mut Vec<(u64, u64)>, offset: u64, length: u64) -> Result<(), EntryProblem> {
    if regions.len() >= MAX_SPARSE_REGIONS {
        return Err(problem(format!("more than {MAX_SPARSE_REGIONS} regions")));
    }
    regions.push((offset, length));
    Ok(())
}

/// Regions must be in order, not overlap, and lie inside the file.
fn check_regions(regions: &[(u64, u64)], size: u64) -> Result<(), EntryProblem> {
    let mut end = 0u64;
    for &(offset, length) in regions {
        let region_end = offset.checked_add(length).ok_or_else(|| problem("region overflows"))?;
        if offset < end || region_end > size {
            return Err(problem(format!(
                "region {offset}+{length} is out of order or outside the {size}-byte file"
            )));
        }
        end = region_end;
    }
    Ok(())
}

/// Reads a 1.0 map from the start of the entry's `data` (and its padding to 512
/// bytes); returns how many bytes of the data it took.
pub fn read_map(sparse: &mut PaxSparse, data: &mut dyn Read) -> Result<u64, EntryProblem> {
    let mut consumed = 0u64;
    let mut next_number = || -> Result<u64, EntryProblem> {
        let mut digits = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            data.read_exact(&mut byte).map_err(EntryProblem::Io)?;
            consumed += 1;
            if consumed > MAX_DATA_MAP_BYTES {
                return Err(problem("the map in the data is larger than 1 MiB"));
            }
            match byte[0] {
                b'\n' => return number(&digits, "map entry"),
                b if b.is_ascii_digit() && digits.len() < 20 => digits.push(b),
                _ => return Err(problem("the map in the data is not decimal lines")),
            }
        }
    };
    let count = next_number()?;
    if count > MAX_SPARSE_REGIONS as u64 {
        return Err(problem(format!("{count} regions is more than {MAX_SPARSE_REGIONS}")));
    }
    let mut regions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let offset = next_number()?;
        let length = next_number()?;
        regions.push((offset, length));
    }
    let padding = (512 - consumed % 512) % 512;
    std::io::copy(&mut data.take(padding), &mut std::io::sink()).map_err(EntryProblem::Io)?;
    check_regions(&regions, sparse.size)?;
    sparse.regions = regions;
    Ok(consumed + padding)
}

/// A PAX sparse file's data walked by its regions: the gaps are holes.
pub(crate) struct MappedSparse<'r> {
    regions: std::vec::IntoIter<(u64, u64)>,
    next: Option<(u64, u64)>,
    position: u64,
    size: u64,
    data: &'r mut dyn Read,
}

impl<'r> MappedSparse<'r> {
    pub(crate) fn new(sparse: PaxSparse, data: &'r mut dyn Read) -> Self {
        let mut regions = sparse.regions.into_iter();
        let next = regions.next();
        MappedSparse {
            regions,
            next,
            position: 0,
            size: sparse.size,
            data,
        }
    }
}

impl SparseFile for MappedSparse<'_> {
    fn skip_hole(&mut self) -> u64 {
        let until = self.next.map_or(self.size, |(offset, _)| offset);
        let hole = until.saturating_sub(self.position);
        self.position += hole;
        hole
    }

    fn data_len(&self) -> u64 {
        match self.next {
            Some((offset, length)) if offset == self.position => length,
            _ => 0,
        }
    }

    /// The reader of the current region's bytes (the caller reads exactly
    /// `data_len` of them); the walk moves past the region.
    fn data(&mut self) -> &mut dyn Read {
        if let Some((offset, length)) = self.next.filter(|(offset, _)| *offset == self.position) {
            self.position = offset + length;
            self.next = self.regions.next();
        }
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(pairs: &[(&str, &str)]) -> PaxRecords {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn each_format_is_described() {
        let v00 = records(&[
            ("GNU.sparse.size", "100"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "10"),
            ("GNU.sparse.offset", "50"),
            ("GNU.sparse.numbytes", "5"),
        ]);
        let sparse = detect(&v00).unwrap().unwrap();
        assert_eq!((sparse.size, sparse.regions.clone()), (100, vec![(0, 10), (50, 5)]));
        let v01 = records(&[
            ("GNU.sparse.size", "100"),
            ("GNU.sparse.map", "0,10,50,5"),
            ("GNU.sparse.name", "f"),
        ]);
        let sparse01 = detect(&v01).unwrap().unwrap();
        assert_eq!(sparse01.regions, sparse.regions);
        assert_eq!(sparse01.name.as_deref(), Some(&b"f"[..]));
        let v10 = records(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.realsize", "100"),
        ]);
        let mut sparse10 = detect(&v10).unwrap().unwrap();
        assert!(sparse10.map_in_data);
        let mut data: Vec<u8> = b"2\n0\n10\n50\n5\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"0123456789abcde");
        let mut reader = &data[..];
        assert_eq!(read_map(&mut sparse10, &mut reader).unwrap(), 512);
        assert_eq!(sparse10.regions, vec![(0, 10), (50, 5)]);
        assert!(detect(&records(&[("path", "x")])).unwrap().is_none());
    }

    #[test]
    fn bad_maps_are_errors() {
        for bad in [
            records(&[("GNU.sparse.map", "0,10")]),
            records(&[("GNU.sparse.size", "100"), ("GNU.sparse.map", "0,10,5,5")]),
            records(&[("GNU.sparse.size", "100"), ("GNU.sparse.map", "0,200")]),
            records(&[("GNU.sparse.size", "100"), ("GNU.sparse.map", "0,10,20")]),
            records(&[("GNU.sparse.size", "100"), ("GNU.sparse.numbytes", "5")]),
            records(&[("GNU.sparse.size", "x")]),
            records(&[("GNU.sparse.major", "2"), ("GNU.sparse.realsize", "1")]),
        ] {
            assert!(detect(&bad).is_err(), "{bad:?}");
        }
        let mut sparse = PaxSparse {
            name: None,
            size: 100,
            regions: vec![],
            map_in_data: true,
        };
        for data in [&b"99999999999\n"[..], b"1\n0\n", b"1\nx\n5\n", b"1\n0\n500\n"] {
            assert!(read_map(&mut sparse, &mut &data[..]).is_err(), "{data:?}");
        }
    }

    #[test]
    fn the_walk_alternates_holes_and_data() {
        let sparse = PaxSparse {
            name: None,
            size: 100,
            regions: vec![(0, 10), (50, 5)],
            map_in_data: false,
        };
        let data = b"0123456789abcde".to_vec();
        let mut reader = &data[..];
        let mut walk = MappedSparse::new(sparse, &mut reader);
        assert_eq!(walk.skip_hole(), 0);
        assert_eq!(walk.data_len(), 10);
        let mut got = vec![0u8; 10];
        walk.data().read_exact(&mut got).unwrap();
        assert_eq!(walk.skip_hole(), 40);
        assert_eq!(walk.data_len(), 5);
        walk.data().read_exact(&mut got[..5]).unwrap();
        assert_eq!(walk.skip_hole(), 45);
        assert_eq!((walk.data_len(), walk.skip_hole()), (0, 0));
    }
}
