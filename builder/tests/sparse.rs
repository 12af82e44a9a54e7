//! Sparse files in layers are read by their sparse map: a few kilobytes of archive
//! that declare a 60 GiB file build at once, holes stay holes, and the data regions
//! read back byte for byte (GNU tar writes the archives).

mod common;

use common::*;
use petrel_builder::{BuildOptions, LocalImage};
use petrel_format::layout::ROOT_INO;
use petrel_format::reader::SegmentSource;
use std::os::unix::fs::FileExt;
use std::process::Command;

const SIZE: u64 = 60 << 30;
const DATA: [(u64, &[u8]); 3] = [
    (0, b"HEAD of the sparse file"),
    (30 << 30, b"MIDDLE, thirty gibibytes in"),
    (SIZE - 4, b"TAIL"),
];

fn gnu_tar_available() -> bool {
    let ok = Command::new("tar")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: needs GNU tar");
    }
    ok
}

#[test]
fn a_gnu_sparse_file_of_60_gib_builds_by_its_map() {
    if !gnu_tar_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let file = std::fs::File::create(src.join("disk.img")).unwrap();
    file.set_len(SIZE).unwrap();
    for (offset, bytes) in DATA {
        file.write_all_at(bytes, offset).unwrap();
    }
    drop(file);
    let layer = dir.path().join("layer.tar");
    let out = Command::new("tar")
        .args(["--format=gnu", "--sparse", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&layer)
        .arg("disk.img")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let archive = std::fs::read(&layer).unwrap();
    assert!(archive.len() < 64 << 10, "GNU tar stored {} bytes", archive.len());

    let (image, report) = build_layers(dir.path(), &[archive], BuildOptions::default()).unwrap();
    // Every hole came from the map; not one of its bytes was read or scanned.
    let data_bytes: u64 = DATA.iter().map(|(_, b)| b.len() as u64).sum();
    assert!(
        report.data.unread_hole_bytes >= SIZE - 16 * 4096 - data_bytes,
        "{:?}",
        report.data
    );
    assert_eq!(report.data.bytes, SIZE);

    let image = LocalImage::open(&image).unwrap();
    let bootstrap = image.bootstrap();
    let root = bootstrap.inode(ROOT_INO).unwrap();
    let ino = bootstrap.lookup(&root, b"disk.img").unwrap().expect("disk.img");
    let inode = bootstrap.inode(ino).unwrap();
    assert_eq!(inode.size(), SIZE);
    for (offset, bytes) in DATA {
        let mut got = Vec::new();
        for segment in bootstrap.segments(&inode, offset, bytes.len() as u64).unwrap() {
            match segment.source {
                SegmentSource::Hole => got.extend(std::iter::repeat_n(0u8, segment.length as usize)),
                SegmentSource::Chunk { index, chunk_offset } => {
                    let chunk = image.read_chunk(index).unwrap();
                    let start = chunk_offset as usize;
                    got.extend_from_slice(&chunk[start..start + segment.length as usize]);
                }
            }
        }
        assert_eq!(got, bytes, "at {offset}");
    }
    // Between the data: a hole.
    let middle = bootstrap.segments(&inode, 10 << 30, 4096).unwrap();
    assert!(middle.iter().all(|s| s.source == SegmentSource::Hole), "{middle:?}");
}
