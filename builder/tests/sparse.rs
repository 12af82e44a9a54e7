//! Sparse files in layers are read by their sparse map: a few kilobytes of archive
//! that declare a 60 GiB file build at once, holes stay holes, and the data regions
//! read back byte for byte: GNU sparse, PAX sparse 0.0, 0.1 and 1.0 (GNU tar writes
//! the archives), and bsdtar's.

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
        petrel_fixtures::report_skip("needs GNU tar");
    }
    ok
}

/// A 60 GiB sparse file in `dir/src`, archived by `tar_args` (run in `src`).
fn sparse_archive(dir: &std::path::Path, program: &str, tar_args: &[&str]) -> Vec<u8> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let file = std::fs::File::create(src.join("disk.img")).unwrap();
    file.set_len(SIZE).unwrap();
    for (offset, bytes) in DATA {
        file.write_all_at(bytes, offset).unwrap();
    }
    drop(file);
    let layer = dir.join("layer.tar");
    let out = Command::new(program)
        .current_dir(&src)
        .args(tar_args)
        .arg("-cf")
        .arg(&layer)
        .arg("disk.img")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let archive = std::fs::read(&layer).unwrap();
    assert!(archive.len() < 64 << 10, "{program} stored {} bytes", archive.len());
    archive
}

/// Builds `archive` and checks the 60 GiB file: no hole byte read, the data where it was.
fn assert_builds_by_its_map(dir: &std::path::Path, archive: Vec<u8>, writer: &str) {
    let (image, report) =
        build_layers(dir, &[archive], BuildOptions::default()).unwrap_or_else(|e| panic!("{writer}: {e}"));
    let data_bytes: u64 = DATA.iter().map(|(_, b)| b.len() as u64).sum();
    assert!(
        report.data.unread_hole_bytes >= SIZE - 16 * 4096 - data_bytes,
        "{writer}: {:?}",
        report.data
    );
    assert_eq!(report.data.bytes, SIZE, "{writer}");
    let image = LocalImage::open(&image).unwrap();
    let bootstrap = image.bootstrap();
    let root = bootstrap.inode(ROOT_INO).unwrap();
    let ino = bootstrap
        .lookup(&root, b"disk.img")
        .unwrap()
        .unwrap_or_else(|| panic!("{writer}: disk.img under its real name"));
    assert_eq!(
        bootstrap.dir_entries(&root).unwrap().len(),
        1,
        "{writer}: nothing else at the root"
    );
    let inode = bootstrap.inode(ino).unwrap();
    assert_eq!(inode.size(), SIZE, "{writer}");
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
        assert_eq!(got, bytes, "{writer}: at {offset}");
    }
    let middle = bootstrap.segments(&inode, 10 << 30, 4096).unwrap();
    assert!(
        middle.iter().all(|s| s.source == SegmentSource::Hole),
        "{writer}: {middle:?}"
    );
}

#[test]
fn pax_sparse_files_of_every_version_build_by_their_map() {
    if !gnu_tar_available() {
        return;
    }
    for version in ["0.0", "0.1", "1.0"] {
        let dir = tempfile::tempdir().unwrap();
        let archive = sparse_archive(
            dir.path(),
            "tar",
            &["--format=posix", "--sparse", &format!("--sparse-version={version}")],
        );
        assert_builds_by_its_map(dir.path(), archive, &format!("GNU tar, PAX sparse {version}"));
    }
}

#[test]
fn bsdtar_sparse_files_build_by_their_map() {
    let available = Command::new("bsdtar")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        petrel_fixtures::report_skip("needs bsdtar (libarchive-tools, scripts/install-deps.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = sparse_archive(dir.path(), "bsdtar", &["--format", "pax", "--read-sparse"]);
    assert_builds_by_its_map(dir.path(), archive, "bsdtar");
}

#[test]
fn a_gnu_sparse_file_of_60_gib_builds_by_its_map() {
    if !gnu_tar_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = sparse_archive(dir.path(), "tar", &["--format=gnu", "--sparse"]);
    assert_builds_by_its_map(dir.path(), archive, "GNU tar, GNU sparse");
}

/// `unpack` to a tar streams each file: a 1 GiB (mostly hole) file goes out whole
/// while the process never holds more than a few chunks of it.
#[test]
fn unpacking_a_huge_file_to_a_tar_streams_it() {
    if !gnu_tar_available() {
        return;
    }
    let size: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let file = std::fs::File::create(src.join("big")).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(b"END", size - 3).unwrap();
    drop(file);
    let out = Command::new("tar")
        .current_dir(&src)
        .args(["--format=gnu", "--sparse", "-cf", "../layer.tar", "big"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let layer = std::fs::read(dir.path().join("layer.tar")).unwrap();
    let (image, _) = build_layers(dir.path(), &[layer], BuildOptions::default()).unwrap();
    let image = LocalImage::open(&image).unwrap();
    struct Tail {
        bytes: u64,
        last: Vec<u8>,
    }
    impl std::io::Write for Tail {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes += buf.len() as u64;
            if let Some(at) = buf.iter().rposition(|b| *b != 0) {
                self.last = buf[..=at].to_vec();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut tail = Tail {
        bytes: 0,
        last: Vec::new(),
    };
    let report = petrel_builder::unpack::unpack_to_tar(&image, &mut tail).unwrap();
    assert_eq!(report.bytes, size);
    assert!(tail.bytes > size, "{}", tail.bytes);
    assert!(tail.last.ends_with(b"END"), "the file's last bytes went out");
    let peak_kib: u64 = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib < 256 << 10,
        "peak RSS {peak_kib} KiB while writing a 1 GiB file"
    );
}
