//! Real FUSE mounts of built images: the tree through the mount equals the source,
//! concurrent random reads return the right bytes, a corrupted chunk gives EIO on
//! exactly its ranges, and a warm cache serves a remount with no backend reads.

use petrel_builder::{build_paths, BuildOptions};
use petrel_fixtures::edge_cases::{edge_case_expected, edge_case_layers};
use petrel_fixtures::rng::Rng;
use petrel_fixtures::snapshot::{differences, scan};
use petrel_fuse_daemon::mount::{mount, MountConfig};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// None (with a message) where this machine cannot mount FUSE.
fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && rustix::process::geteuid().is_root();
    if !ok {
        petrel_fixtures::report_skip("needs /dev/fuse and root");
    }
    ok
}

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
}

impl Fixture {
    fn new(layers: &[Vec<u8>], options: BuildOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = petrel_fixtures::write_layer_files(&dir.path().join("layers"), layers).unwrap();
        let image = dir.path().join("image");
        build_paths(&paths, &image, options).unwrap();
        Fixture { dir, image }
    }

    /// A mount whose only fetches ahead are the on-demand readahead's: a miss
    /// fetches its own chunks only (no amplification), and nothing is prefetched.
    fn mount_for_readahead(&self) -> petrel_fuse_daemon::mount::Mounted {
        let mut config = self.config("mnt");
        config.amplify_bytes = 0;
        config.prefetch.mode = petrel_fuse_daemon::prefetch::PrefetchMode::Off;
        mount(&config).unwrap()
    }

    fn config(&self, name: &str) -> MountConfig {
        let mountpoint = self.dir.path().join(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        MountConfig::new(&self.image, mountpoint, self.dir.path().join("cache"))
    }
}

/// Waits until the mount's fetches are quiet (none under way, nothing fetched in 50 ms).
fn wait_until_quiet(mounted: &petrel_fuse_daemon::mount::Mounted) {
    let mut last = u64::MAX;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        // (A reader is answered before the rest of its request is in.)
        let idle = mounted.wait_idle(std::time::Duration::ZERO);
        let fetched = mounted.stats().chunks_fetched;
        if fetched == last && idle {
            return;
        }
        last = fetched;
    }
}

/// Reads `path` whole, checks it holds `expected`, and says whether the read
/// missed the cache (it was not read ahead).
fn read_missed(mounted: &petrel_fuse_daemon::mount::Mounted, path: &Path, expected: &[u8]) -> bool {
    let before = mounted.stats().cache_misses;
    assert!(
        std::fs::read(path).unwrap() == expected,
        "{} reads back",
        path.display()
    );
    mounted.stats().cache_misses > before
}

fn big_files() -> Vec<(String, Vec<u8>)> {
    (0..6)
        .map(|i| {
            (
                format!("data/file{i}.bin"),
                Rng::new(100 + i).mixed(((i as usize % 3) + 1) * 1_500_000 + 12_345),
            )
        })
        .chain((0..40).map(|i| (format!("small/s{i}.txt"), Rng::new(200 + i).text(100 + 97 * i as usize))))
        .collect()
}

fn big_layer() -> Vec<u8> {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for (path, data) in big_files() {
        w.file(&path, &Default::default(), &data);
    }
    w.finish()
}

#[test]
fn edge_case_tree_through_the_mount_equals_the_source() {
    if !fuse_available() {
        return;
    }
    let layers: Vec<Vec<u8>> = edge_case_layers().into_iter().map(|l| l.tar).collect();
    let fixture = Fixture::new(&layers, BuildOptions::default());
    let mounted = mount(&fixture.config("mnt")).unwrap();
    let actual = scan(mounted.mountpoint()).unwrap();
    let expected = edge_case_expected();
    // The mountpoint's own mtime and mode are those of the image root.
    let diffs = differences(&expected, &actual);
    assert!(diffs.is_empty(), "{} differences:\n{}", diffs.len(), diffs.join("\n"));
    // Writes are refused: read-only filesystem.
    let err = std::fs::write(mounted.mountpoint().join("etc/passwd"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()));
    let err = std::fs::create_dir(mounted.mountpoint().join("newdir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()));
    mounted.unmount().unwrap();
}

#[test]
fn concurrent_random_reads_return_the_right_bytes() {
    if !fuse_available() {
        return;
    }
    let fixture = Fixture::new(
        &[big_layer()],
        BuildOptions {
            chunker: "fixed:256K".parse().unwrap(),
            ..BuildOptions::default()
        },
    );
    let mounted = mount(&fixture.config("mnt")).unwrap();
    let files = std::sync::Arc::new(big_files());
    let root = mounted.mountpoint().to_path_buf();
    std::thread::scope(|scope| {
        for t in 0..32u64 {
            let files = std::sync::Arc::clone(&files);
            let root = root.clone();
            scope.spawn(move || {
                let mut rng = Rng::new(t);
                for _ in 0..40 {
                    let (path, data) = &files[rng.below(files.len() as u64) as usize];
                    let file = std::fs::File::open(root.join(path)).unwrap();
                    let offset = rng.below(data.len() as u64);
                    let len = (1 + rng.below(300_000)) as usize;
                    let mut buf = vec![0u8; len];
                    let got = file.read_at(&mut buf, offset).unwrap();
                    let end = (offset as usize + got).min(data.len());
                    assert_eq!(&buf[..got], &data[offset as usize..end], "{path} at {offset}");
                }
            });
        }
    });
    let stats = mounted.stats();
    assert_eq!(stats.read_errors, 0);
    assert!(stats.chunks_fetched > 0 && stats.backend_requests < stats.chunks_fetched + stats.cache_misses);
}

#[test]
fn corrupted_chunk_gives_eio_on_exactly_its_ranges() {
    if !fuse_available() {
        return;
    }
    let fixture = Fixture::new(
        &[big_layer()],
        BuildOptions {
            chunker: "fixed:256K".parse().unwrap(),
            ..BuildOptions::default()
        },
    );
    let image = petrel_builder::LocalImage::open(&fixture.image).unwrap();
    let bootstrap = image.bootstrap();
    // Corrupt the second chunk of data/file0.bin.
    let root = bootstrap.inode(1).unwrap();
    let data = bootstrap
        .inode(bootstrap.lookup(&root, b"data").unwrap().unwrap())
        .unwrap();
    let file0 = bootstrap
        .inode(bootstrap.lookup(&data, b"file0.bin").unwrap().unwrap())
        .unwrap();
    let refs = bootstrap.chunk_refs(&file0).unwrap();
    let bad = bootstrap.chunk(refs[1].chunk_index.get()).unwrap();
    let blob_path = image.dir().blob_path(&bootstrap.blob(0).unwrap().digest);
    let mut blob = std::fs::read(&blob_path).unwrap();
    blob[(bad.compressed_offset + 10) as usize] ^= 0x40;
    std::fs::write(&blob_path, &blob).unwrap();

    let mut config = fixture.config("mnt");
    config.amplify_bytes = 0;
    let mounted = mount(&config).unwrap();
    let expected = &big_files()[0].1;
    let file = std::fs::File::open(mounted.mountpoint().join("data/file0.bin")).unwrap();
    let chunk = 256 << 10;
    let mut buf = vec![0u8; 4096];
    // Before and after the bad chunk: fine. Inside it: EIO.
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &expected[..4096]);
    let err = file.read_exact_at(&mut buf, chunk + 100).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()));
    file.read_exact_at(&mut buf, 2 * chunk + 5).unwrap();
    assert_eq!(
        &buf[..],
        &expected[2 * chunk as usize + 5..2 * chunk as usize + 5 + 4096]
    );
    // Other files are served.
    let other = std::fs::read(mounted.mountpoint().join("data/file1.bin")).unwrap();
    assert_eq!(&other, &big_files()[1].1);
    let stats = mounted.stats();
    assert!(stats.chunks_failed_verification >= 1 && stats.read_errors >= 1);
    // A later read of the bad range still fails: nothing wrong was cached.
    assert!(file.read_exact_at(&mut buf, chunk + 200).is_err());
}

#[test]
fn remount_with_a_warm_cache_reads_nothing_from_the_backend() {
    if !fuse_available() {
        return;
    }
    let fixture = Fixture::new(&[big_layer()], BuildOptions::default());
    let config = fixture.config("mnt");
    let mounted = mount(&config).unwrap();
    for (path, data) in big_files() {
        assert_eq!(std::fs::read(mounted.mountpoint().join(&path)).unwrap(), data, "{path}");
    }
    let first = mounted.stats();
    assert!(first.backend_bytes > 0);
    mounted.unmount().unwrap();

    let mounted = mount(&config).unwrap();
    for (path, data) in big_files() {
        assert_eq!(std::fs::read(mounted.mountpoint().join(&path)).unwrap(), data, "{path}");
    }
    let second = mounted.stats();
    assert_eq!(second.backend_requests, 0, "{second:?}");
    assert_eq!(second.backend_bytes, 0);
    assert!(second.cache_hits > 0);
}

#[test]
fn only_the_chunks_a_read_touches_are_fetched() {
    if !fuse_available() {
        return;
    }
    let fixture = Fixture::new(
        &[big_layer()],
        BuildOptions {
            chunker: "fixed:64K".parse().unwrap(),
            ..BuildOptions::default()
        },
    );
    let mut config = fixture.config("mnt");
    config.amplify_bytes = 0;
    let mounted = mount(&config).unwrap();
    let file = std::fs::File::open(mounted.mountpoint().join("data/file2.bin")).unwrap();
    let mut buf = vec![0u8; 100];
    file.read_exact_at(&mut buf, 1_000_000).unwrap();
    assert_eq!(&buf[..], &big_files()[2].1[1_000_000..1_000_100]);
    let stats = mounted.stats();
    // Kernel readahead may pull a few neighbours; far below the file's 4.5 MB.
    let blob_size: u64 = std::fs::read_dir(fixture.image.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(stats.backend_bytes < blob_size / 4, "{stats:?} of {blob_size}");
}

/// A file read front to back is fetched ahead of its reader in growing windows,
/// several large requests at once: a few dozen requests for 48 MiB instead of one
/// per kernel read, and the reader rarely waits on a miss of its own. Scattered
/// reads of the same file start no readahead: they fetch what they touch.
#[test]
fn a_file_read_front_to_back_is_fetched_ahead_and_scattered_reads_are_not() {
    if !fuse_available() {
        return;
    }
    let model = Rng::new(4242).mixed(48 << 20);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("models/model.bin", &Default::default(), &model);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let run = |max_window: u64, name: &str, scattered: bool| {
        let mut config = fixture.config(name);
        config.prefetch.mode = petrel_fuse_daemon::prefetch::PrefetchMode::Off;
        config.readahead_file_max_bytes = max_window;
        // A miss fetches its own chunks only (no amplification, which also grows
        // while misses walk the blob): what is fetched ahead is the readahead's.
        config.amplify_bytes = 0;
        config.cache_dir = fixture.dir.path().join(format!("cache-{name}"));
        let mounted = mount(&config).unwrap();
        let path = mounted.mountpoint().join("models/model.bin");
        if scattered {
            let file = std::fs::File::open(&path).unwrap();
            let mut rng = Rng::new(7);
            let mut buf = vec![0u8; 4096];
            for _ in 0..40 {
                let at = rng.below(model.len() as u64 - 4096) as usize;
                file.read_exact_at(&mut buf, at as u64).unwrap();
                assert!(buf == model[at..at + 4096], "bytes at {at}");
            }
        } else {
            let read = std::fs::read(&path).unwrap();
            assert!(read == model, "the model reads back byte for byte");
        }
        let stats = mounted.stats();
        mounted.unmount().unwrap();
        stats
    };
    let ahead = run(petrel_fuse_daemon::sequential::DEFAULT_MAX_WINDOW, "ahead", false);
    let one_by_one = run(0, "off", false);
    assert!(
        ahead.backend_requests * 4 < one_by_one.backend_requests,
        "with readahead {ahead:?}; without {one_by_one:?}"
    );
    assert!(
        ahead.cache_misses * 4 < one_by_one.cache_misses,
        "the reader mostly finds its chunks fetched or in flight: {ahead:?}"
    );
    let scattered_ahead = run(petrel_fuse_daemon::sequential::DEFAULT_MAX_WINDOW, "s-ahead", true);
    let scattered_off = run(0, "s-off", true);
    assert!(
        scattered_ahead.backend_bytes <= scattered_off.backend_bytes + (1 << 20),
        "scattered reads read nothing ahead: {scattered_ahead:?} vs {scattered_off:?}"
    );
}

/// In an image of big files, the kernel reads a file read front to back ahead in
/// requests of 1 MiB (the mount's `read_ahead_kb` raised from the kernel's 128 KiB),
/// not 256 KiB at a time; an image of small files keeps the kernel's default.
#[test]
fn a_big_file_image_is_read_ahead_by_the_kernel_a_mebibyte_at_a_time() {
    if !fuse_available() {
        return;
    }
    let data = Rng::new(5151).mixed(16 << 20);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("big.bin", &Default::default(), &data);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let kb = petrel_fuse_daemon::kernel_readahead::get(mounted.mountpoint()).unwrap();
    assert_eq!(kb, petrel_fuse_daemon::kernel_readahead::READ_AHEAD_KB);
    let before = mounted.stats().reads;
    let read = std::fs::read(mounted.mountpoint().join("big.bin")).unwrap();
    assert!(read == data, "the file reads back byte for byte");
    let reads = mounted.stats().reads - before;
    // 16 reads of 1 MiB, and a few smaller ones while the window opens; at the
    // kernel's default it took 64.
    assert!((16..=24).contains(&reads), "{reads} FUSE reads for 16 MiB");
    mounted.unmount().unwrap();

    // An image of small files keeps the kernel's default: its start from a profile
    // would fetch what the kernel reads past the profile's ranges.
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for i in 0..40 {
        w.file(&format!("lib/m{i}.py"), &Default::default(), &Rng::new(i).text(3000));
    }
    w.file("lib/one.so", &Default::default(), &Rng::new(77).mixed(1 << 20));
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let kb = petrel_fuse_daemon::kernel_readahead::get(mounted.mountpoint()).unwrap();
    assert!(kb < petrel_fuse_daemon::kernel_readahead::READ_AHEAD_KB, "{kb} KiB");
    mounted.unmount().unwrap();
}

/// A chunk's stored size says little about what it decodes to (16 MiB of one repeated
/// byte is ~1.5 KiB of zstd): a fetch is bounded by the decoded bytes it would hold,
/// not only by the stored bytes it asks for (docs/security.md, bounded resources).
#[test]
fn a_fetch_holds_a_bounded_number_of_decoded_bytes() {
    if !fuse_available() {
        return;
    }
    let chunk = 16usize << 20;
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    // Eight different chunks (identical ones would be stored once), each one byte repeated.
    let bomb: Vec<u8> = (0..8 * chunk).map(|i| (i / chunk) as u8 + 1).collect();
    w.file("bomb.bin", &Default::default(), &bomb);
    let fixture = Fixture::new(
        &[w.finish()],
        BuildOptions {
            chunker: "fixed:16M".parse().unwrap(),
            ..BuildOptions::default()
        },
    );
    let blob_size: u64 = std::fs::read_dir(fixture.image.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        blob_size < 64 << 10,
        "the whole 128 MiB file stores as {blob_size} bytes"
    );
    let mounted = mount(&fixture.config("mnt")).unwrap();
    let file = std::fs::File::open(mounted.mountpoint().join("bomb.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 1));
    // A fetch wakes its readers before it counts its chunks (and the fetch may be
    // the readahead's look at the file's head, which the read joined): wait for it.
    wait_until_quiet(&mounted);
    let stats = mounted.stats();
    // The amplification window (256 KiB of stored bytes) covers all 8 chunks, but one
    // request may decode at most MAX_REQUEST_DECODED_BYTES.
    let bound = petrel_fuse_daemon::fetch::MAX_REQUEST_DECODED_BYTES / chunk as u64;
    assert_eq!(stats.backend_requests, 1, "{stats:?}");
    assert_eq!(stats.chunks_fetched, bound, "{stats:?}");
    // Every byte still reads back right, in bounded requests.
    let mut all = Vec::new();
    std::io::Read::read_to_end(
        &mut std::fs::File::open(mounted.mountpoint().join("bomb.bin")).unwrap(),
        &mut all,
    )
    .unwrap();
    assert!(all == bomb, "the file reads back byte for byte");
}

/// Without a profile, the first read of a file that misses the cache makes its
/// directory's other small files fetched in the background, so reading them later
/// needs no fetch; a big file of that directory and other directories are left alone.
/// With the readahead off, every one of those reads is a miss of its own.
#[test]
fn a_miss_reads_its_directory_small_files_ahead() {
    if !fuse_available() {
        return;
    }
    let module = |i: u64| Rng::new(700 + i).bytes(20_000);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for i in 0..50 {
        w.file(&format!("app/mod{i:02}.py"), &Default::default(), &module(i));
    }
    w.file("app/big.bin", &Default::default(), &Rng::new(9).bytes(3 << 20));
    for i in 0..10 {
        w.file(&format!("other/x{i}.py"), &Default::default(), &module(100 + i));
    }
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let run = |readahead_dir_bytes: u64, name: &str| {
        let mut config = fixture.config(name);
        config.amplify_bytes = 0;
        config.prefetch.mode = petrel_fuse_daemon::prefetch::PrefetchMode::Off;
        config.readahead_dir_bytes = readahead_dir_bytes;
        config.cache_dir = fixture.dir.path().join(format!("cache-{name}"));
        let mounted = mount(&config).unwrap();
        let root = mounted.mountpoint().to_path_buf();
        assert_eq!(std::fs::read(root.join("app/mod00.py")).unwrap(), module(0));
        // The readahead runs in the background: wait until it is quiet.
        wait_until_quiet(&mounted);
        let before = mounted.stats();
        for i in 1..50 {
            assert_eq!(
                std::fs::read(root.join(format!("app/mod{i:02}.py"))).unwrap(),
                module(i)
            );
        }
        let after = mounted.stats();
        // (x0 may share a chunk with the last files of app/; x9 does not.)
        assert_eq!(std::fs::read(root.join("other/x9.py")).unwrap(), module(109));
        // A fetch wakes its readers before it counts its bytes: wait for the count.
        wait_until_quiet(&mounted);
        let other = mounted.stats();
        mounted.unmount().unwrap();
        (before, after, other)
    };
    let (before, after, other) = run(petrel_fuse_daemon::readahead::DEFAULT_DIR_BYTES, "ahead");
    assert_eq!(
        after.cache_misses, before.cache_misses,
        "the directory was read ahead: {after:?}"
    );
    assert!(
        before.backend_requests <= 10,
        "a few large requests, not one per file: {before:?}"
    );
    assert!(
        after.backend_bytes < (2 << 20),
        "the 3 MiB file was left to its own reads: {after:?}"
    );
    assert!(
        other.backend_bytes > after.backend_bytes,
        "another directory is its own: {after:?} then {other:?}"
    );

    let (before, after, _) = run(0, "off");
    // Small files share chunks (three of these to a chunk): a miss per chunk.
    assert!(after.cache_misses >= before.cache_misses + 10, "{after:?}");
}

/// The first miss of a shared library (by its name) or an executable takes the
/// whole file along in its own request, so the loader's faults all over it wait
/// for bytes on their way instead of asking for them one round trip each. A data
/// file as big is left to its reads.
#[test]
fn a_librarys_first_miss_takes_the_whole_library_along() {
    if !fuse_available() {
        return;
    }
    let library = Rng::new(1400).bytes(3 << 20);
    let data = Rng::new(1401).bytes(3 << 20);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("lib/libfoo.so.1", &Default::default(), &library);
    w.file("var/data.bin", &Default::default(), &data);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().to_path_buf();
    let read_at = |path: &str, offset: usize| {
        let mut buf = vec![0u8; 4096];
        std::fs::File::open(root.join(path))
            .unwrap()
            .read_exact_at(&mut buf, offset as u64)
            .unwrap();
        buf
    };
    assert_eq!(read_at("lib/libfoo.so.1", 0), library[..4096]);
    wait_until_quiet(&mounted);
    let first = mounted.stats();
    assert_eq!(first.backend_requests, 1, "{first:?}");
    assert!(first.backend_bytes >= 3 << 20, "the library came whole: {first:?}");
    let end = library.len() - 4096;
    assert_eq!(read_at("lib/libfoo.so.1", end), library[end..]);
    assert_eq!(mounted.stats().cache_misses, first.cache_misses, "no miss at its end");

    assert_eq!(read_at("var/data.bin", 0), data[..4096]);
    wait_until_quiet(&mounted);
    let second = mounted.stats();
    assert!(
        second.backend_bytes - first.backend_bytes < 1 << 20,
        "the data file was not read whole: {second:?}"
    );
}

/// A miss takes the files of its directory that lie after it in the blob along in
/// its own request: one round trip for the read and its readahead. A later miss of
/// a file the readahead did not reach (past the directory's budget) reads the
/// directory ahead again from that file on.
#[test]
fn a_miss_takes_its_directory_along_and_a_miss_beyond_reads_ahead_again() {
    if !fuse_available() {
        return;
    }
    let file = |i: u64| Rng::new(1300 + i).bytes(60_000);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for i in 0..60 {
        w.file(&format!("lib/f{i:02}"), &Default::default(), &file(i));
    }
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mut config = fixture.config("mnt");
    config.amplify_bytes = 0;
    config.prefetch.mode = petrel_fuse_daemon::prefetch::PrefetchMode::Off;
    config.readahead_dir_bytes = 1 << 20;
    let mounted = mount(&config).unwrap();
    let lib = mounted.mountpoint().join("lib");
    assert!(read_missed(&mounted, &lib.join("f00"), &file(0)));
    wait_until_quiet(&mounted);
    let first = mounted.stats();
    assert_eq!(
        first.backend_requests, 1,
        "the read and its directory's readahead go in one request: {first:?}"
    );
    assert!(first.readahead_bytes >= 900 << 10, "{first:?}");
    for i in 1..10 {
        assert!(
            !read_missed(&mounted, &lib.join(format!("f{i:02}")), &file(i)),
            "f{i:02} came with f00"
        );
    }
    // f40 lies past the first budget (1 MiB of the directory's 3.6 MB).
    assert!(read_missed(&mounted, &lib.join("f40"), &file(40)));
    wait_until_quiet(&mounted);
    for i in 41..50 {
        assert!(
            !read_missed(&mounted, &lib.join(format!("f{i:02}")), &file(i)),
            "f{i:02} came with f40"
        );
    }
    assert_eq!(mounted.stats().backend_requests, 2, "{:?}", mounted.stats());
}

/// A miss on a Python package's compiled module reads ahead the compiled modules of
/// the whole package, subpackages included (an import goes on to them one directory
/// after another); another package is its own.
#[test]
fn a_miss_in_a_package_reads_its_compiled_modules_ahead() {
    if !fuse_available() {
        return;
    }
    let body = |i: u64| Rng::new(900 + i).bytes(30_000);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    let subs = ["core", "lib", "io", "io/formats"];
    w.file("site/pkg/__init__.py", &Default::default(), b"from . import core\n");
    w.file(
        "site/pkg/__pycache__/__init__.cpython-311.pyc",
        &Default::default(),
        &body(0),
    );
    for (n, sub) in subs.iter().enumerate() {
        w.file(&format!("site/pkg/{sub}/__init__.py"), &Default::default(), b"\n");
        for m in 0..5u64 {
            let i = 10 * (n as u64 + 1) + m;
            w.file(&format!("site/pkg/{sub}/m{m}.py"), &Default::default(), &body(1000 + i));
            w.file(
                &format!("site/pkg/{sub}/__pycache__/m{m}.cpython-311.pyc"),
                &Default::default(),
                &body(i),
            );
        }
    }
    // The package's test suite, which a start does not import.
    w.file("site/pkg/tests/__init__.py", &Default::default(), b"\n");
    for t in 0..10u64 {
        w.file(
            &format!("site/pkg/tests/__pycache__/test_{t}.cpython-311.pyc"),
            &Default::default(),
            &body(3000 + t),
        );
    }
    w.file("site/other/__init__.py", &Default::default(), b"\n");
    for i in 0..30 {
        w.file(
            &format!("site/other/__pycache__/x{i}.cpython-311.pyc"),
            &Default::default(),
            &body(5000 + i),
        );
    }
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().to_path_buf();
    // The kernel learns where the package is as an import would: by looking it up.
    for sub in subs.iter().chain(&["tests"]) {
        std::fs::metadata(root.join("site/pkg").join(sub).join("__pycache__")).unwrap();
    }
    assert_eq!(
        std::fs::read(root.join("site/pkg/__pycache__/__init__.cpython-311.pyc")).unwrap(),
        body(0)
    );
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    for (n, sub) in subs.iter().enumerate() {
        for m in 0..5u64 {
            let i = 10 * (n as u64 + 1) + m;
            let path = root.join(format!("site/pkg/{sub}/__pycache__/m{m}.cpython-311.pyc"));
            assert_eq!(std::fs::read(path).unwrap(), body(i));
        }
    }
    let after = mounted.stats();
    assert_eq!(
        after.backend_requests, before.backend_requests,
        "every compiled module of the package was read ahead: {after:?}"
    );
    // The other package's 900 kB (its first chunk may share a chunk with pkg) stayed.
    assert!(
        after.backend_bytes < 41 * 30_000 + 300_000,
        "another package is its own: {after:?}"
    );
    // The test suite was left out: its modules are read when they are imported.
    let path = root.join("site/pkg/tests/__pycache__/test_9.cpython-311.pyc");
    assert!(
        read_missed(&mounted, &path, &body(3009)),
        "the package's tests were not read ahead"
    );
    mounted.unmount().unwrap();
}

/// The first miss on one of a Python package's compiled extension modules (shared
/// objects, big ones too) reads ahead the package's others, whole: importing a
/// package loads them all, one after another. Its compiled bytecode, its tests'
/// extension modules and another package's stay where they are.
#[test]
fn a_miss_on_a_packages_extension_module_reads_its_others_ahead() {
    if !fuse_available() {
        return;
    }
    let module = |i: u64| {
        let mut m = b"\x7fELF".to_vec();
        m.extend(Rng::new(1500 + i).bytes(1_200_000 + 10_000 * i as usize));
        m
    };
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    let meta = Default::default();
    w.file("site/pkg/__init__.py", &meta, b"from . import _libs\n");
    w.file("site/pkg/_libs/__init__.py", &meta, b"\n");
    let names: Vec<String> = (0..4)
        .map(|i| format!("site/pkg/_libs/m{i}.cpython-311-x86_64-linux-gnu.so"))
        .chain(["site/pkg/_libs/tslibs/t0.cpython-311-x86_64-linux-gnu.so".to_string()])
        .collect();
    w.file("site/pkg/_libs/tslibs/__init__.py", &meta, b"\n");
    for (i, name) in names.iter().enumerate() {
        w.file(name, &meta, &module(i as u64));
    }
    let bytecode = Rng::new(1590).bytes(300_000);
    w.file("site/pkg/__pycache__/big.cpython-311.pyc", &meta, &bytecode);
    w.file("site/pkg/tests/__init__.py", &meta, b"\n");
    w.file("site/pkg/tests/t.cpython-311-x86_64-linux-gnu.so", &meta, &module(7));
    w.file("site/other/__init__.py", &meta, b"\n");
    w.file("site/other/o.cpython-311-x86_64-linux-gnu.so", &meta, &module(8));
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().to_path_buf();
    // The kernel learns where the modules are as an import would: by looking them up.
    for path in names
        .iter()
        .chain(&["site/pkg/tests/t.cpython-311-x86_64-linux-gnu.so".to_string()])
    {
        std::fs::metadata(root.join(path)).unwrap();
    }
    let mut head = vec![0u8; 4096];
    std::fs::File::open(root.join(&names[0]))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(head, module(0)[..4096]);
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    for (i, name) in names.iter().enumerate() {
        assert!(
            !read_missed(&mounted, &root.join(name), &module(i as u64)),
            "{name} was read ahead"
        );
    }
    assert!(
        read_missed(
            &mounted,
            &root.join("site/pkg/tests/t.cpython-311-x86_64-linux-gnu.so"),
            &module(7)
        ),
        "the tests' module was not"
    );
    assert!(
        read_missed(
            &mounted,
            &root.join("site/other/o.cpython-311-x86_64-linux-gnu.so"),
            &module(8)
        ),
        "another package's module was not"
    );
    assert!(
        read_missed(
            &mounted,
            &root.join("site/pkg/__pycache__/big.cpython-311.pyc"),
            &bytecode
        ),
        "the package's bytecode was not: {before:?}"
    );
    mounted.unmount().unwrap();
}

/// An executable or library (an ELF file) is read ahead whole at its first miss,
/// as a loader faults its pages all over; a big data file is not.
#[test]
fn an_elf_file_is_read_ahead_whole_at_its_first_miss() {
    if !fuse_available() {
        return;
    }
    let mut elf = b"\x7fELF".to_vec();
    elf.extend(Rng::new(31).bytes(3 << 20));
    let data = Rng::new(32).bytes(3 << 20);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("lib/libfoo.so", &Default::default(), &elf);
    w.file("var/data.bin", &Default::default(), &data);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().to_path_buf();
    // One read of each file's header: its first miss.
    let mut buf = vec![0u8; 4096];
    for (path, content) in [("lib/libfoo.so", &elf), ("var/data.bin", &data)] {
        let file = std::fs::File::open(root.join(path)).unwrap();
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &content[..4096]);
    }
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    assert_eq!(std::fs::read(root.join("lib/libfoo.so")).unwrap(), elf);
    let after_elf = mounted.stats();
    assert_eq!(
        after_elf.cache_misses, before.cache_misses,
        "the library was read ahead: {after_elf:?}"
    );
    assert_eq!(std::fs::read(root.join("var/data.bin")).unwrap(), data);
    let after_data = mounted.stats();
    assert!(
        after_data.cache_misses > after_elf.cache_misses,
        "the data file was not: {after_data:?}"
    );
}

/// A library's big segment without code (a library of data, as ICU's) is left to
/// the reads: its code and headers are read ahead at the first miss, the data
/// segment is not. (A library of at most 8 MiB comes whole with its first miss:
/// this one is bigger.)
#[test]
fn a_librarys_big_data_segment_is_not_read_ahead() {
    if !fuse_available() {
        return;
    }
    use petrel_fixtures::elf::{elf_file, Load};
    let code = Load {
        flags: 5,
        offset: 0,
        size: 512 << 10,
    };
    let tables = Load {
        flags: 4,
        offset: 512 << 10,
        size: 12 << 20,
    };
    let filler = Rng::new(33).bytes(13 << 20);
    let library = elf_file(&[code, tables], (512 << 10) + (12 << 20), &filler);
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("lib/libdata.so", &Default::default(), &library);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let file = std::fs::File::open(mounted.mountpoint().join("lib/libdata.so")).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &library[..4096]);
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    file.read_exact_at(&mut buf, 300 << 10).unwrap();
    assert_eq!(&buf[..], &library[300 << 10..(300 << 10) + 4096]);
    let after_code = mounted.stats();
    assert_eq!(
        after_code.cache_misses, before.cache_misses,
        "the code was read ahead: {after_code:?}"
    );
    assert!(
        after_code.backend_bytes < (2 << 20),
        "the data segment was not: {after_code:?}"
    );
    file.read_exact_at(&mut buf, 4 << 20).unwrap();
    assert_eq!(&buf[..], &library[4 << 20..(4 << 20) + 4096]);
    assert!(mounted.stats().cache_misses > after_code.cache_misses);
}

/// An executable's first miss reads ahead the libraries it needs (`DT_NEEDED`,
/// found where the loader looks) and its program interpreter, so the loader finds
/// them cached; a library nothing needs is left alone. Real files of this machine:
/// `/usr/bin/true`, its C library and its loader.
#[test]
fn an_executables_first_miss_reads_its_libraries_ahead() {
    if !fuse_available() {
        return;
    }
    let program = std::fs::read("/usr/bin/true").unwrap();
    let head = petrel_fuse_daemon::elf_needs::ElfHead::parse(&program).expect("a dynamic ELF executable");
    let interpreter = String::from_utf8(head.interpreter(&program).expect("an interpreter").to_vec()).unwrap();
    let libc = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6")
        .or_else(|_| std::fs::read("/lib/aarch64-linux-gnu/libc.so.6"))
        .unwrap();
    let loader = std::fs::read(&interpreter).unwrap();
    let unrelated = std::fs::read(std::fs::canonicalize("/usr/bin/ls").unwrap()).unwrap();
    // Laid out as a merged-/usr Debian is: `/lib64` (or `/lib`) and a library's
    // name are symlinks.
    let (top, rest) = interpreter.trim_start_matches('/').split_once('/').unwrap();
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    let executable = petrel_fixtures::layer_writer::EntryMeta::mode(0o755);
    w.file("usr/bin/prog", &executable, &program);
    w.file("usr/lib/libc.so.6.real", &Default::default(), &libc);
    w.symlink("usr/lib/libc.so.6", "libc.so.6.real");
    w.file("usr/lib/libunneeded.so.1", &Default::default(), &unrelated);
    w.file(&format!("usr/{top}/{rest}"), &Default::default(), &loader);
    w.symlink(top, &format!("usr/{top}"));
    if top != "lib" {
        w.symlink("lib", "usr/lib");
    }
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().to_path_buf();
    // The loader's first read: the executable's header.
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(root.join("usr/bin/prog"))
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf[..], &program[..4096]);
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    assert_eq!(std::fs::read(root.join("usr/lib/libc.so.6")).unwrap(), libc);
    assert_eq!(
        std::fs::read(root.join(interpreter.trim_start_matches('/'))).unwrap(),
        loader
    );
    // One request for the executable, one for both libraries whole (the loader
    // maps them all before the program runs).
    assert_eq!(before.backend_requests, 2, "{before:?}");
    let after = mounted.stats();
    assert_eq!(
        after.cache_misses, before.cache_misses,
        "the C library and the loader were read ahead: {before:?} then {after:?}"
    );
    assert!(
        read_missed(&mounted, &root.join("usr/lib/libunneeded.so.1"), &unrelated),
        "a library nothing needs was not"
    );
    mounted.unmount().unwrap();
}

/// A library loaded on its own (`dlopen`, as a Python extension module), not by
/// an executable, that comes whole with its first miss is looked into for the
/// libraries it needs: they are read ahead, in one request, before the loader asks
/// for them. A library it does not need is left alone. Real files of this
/// machine: `libselinux`, which needs `libpcre2-8`.
#[test]
fn a_library_loaded_on_its_own_reads_the_libraries_it_needs_ahead() {
    if !fuse_available() {
        return;
    }
    let host = |name: &str| {
        ["/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu"]
            .iter()
            .find_map(|dir| std::fs::read(format!("{dir}/{name}")).ok())
            .unwrap_or_else(|| panic!("{name} on this machine"))
    };
    let (module, needed, unneeded) = (host("libselinux.so.1"), host("libpcre2-8.so.0"), host("libz.so.1"));
    let multiarch = if std::path::Path::new("/lib/x86_64-linux-gnu").exists() {
        "x86_64-linux-gnu"
    } else {
        "aarch64-linux-gnu"
    };
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    // Not executable, in a directory of its own: loaded by path, as an extension.
    w.file("srv/app/ext/selinux.so", &Default::default(), &module);
    w.file(
        &format!("usr/lib/{multiarch}/libpcre2-8.so.0"),
        &Default::default(),
        &needed,
    );
    w.file("usr/lib/other/libz.so.1", &Default::default(), &unneeded);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().to_path_buf();
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(root.join("srv/app/ext/selinux.so"))
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf[..], &module[..4096]);
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    assert_eq!(before.backend_requests, 2, "the module, then what it needs: {before:?}");
    assert!(
        !read_missed(
            &mounted,
            &root.join(format!("usr/lib/{multiarch}/libpcre2-8.so.0")),
            &needed
        ),
        "the library it needs was read ahead"
    );
    assert!(
        read_missed(&mounted, &root.join("usr/lib/other/libz.so.1"), &unneeded),
        "a library it does not need was not"
    );
    mounted.unmount().unwrap();
}

/// The first miss in a Node package reads ahead the packages it depends on (the
/// `dependencies` of its `package.json`, found where `require` looks), and theirs:
/// their manifests and scripts, not their tests; a package nothing depends on is
/// left alone.
#[test]
fn a_miss_in_a_node_package_reads_its_dependencies_ahead() {
    if !fuse_available() {
        return;
    }
    // Big enough to have chunks of their own (small files share chunks).
    let body = |i: u64| Rng::new(1100 + i).bytes(80_000);
    let manifest = |deps: &[&str]| {
        let deps: Vec<String> = deps.iter().map(|d| format!("\"{d}\": \"^1.0.0\"")).collect();
        format!("{{\"name\": \"x\", \"dependencies\": {{{}}}}}", deps.join(", ")).into_bytes()
    };
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    let meta = Default::default();
    w.file("srv/app/package.json", &meta, &manifest(&["express"]));
    w.file("srv/app/index.js", &meta, &body(0));
    // Installed by npm: a flat node_modules, one dependency scoped.
    let modules = "srv/app/node_modules";
    w.file(
        &format!("{modules}/express/package.json"),
        &meta,
        &manifest(&["@scope/router", "send"]),
    );
    w.file(&format!("{modules}/express/index.js"), &meta, &body(1));
    w.file(&format!("{modules}/express/lib/app.js"), &meta, &body(2));
    w.file(&format!("{modules}/@scope/router/package.json"), &meta, &manifest(&[]));
    w.file(&format!("{modules}/@scope/router/index.js"), &meta, &body(3));
    w.file(
        &format!("{modules}/send/package.json"),
        &meta,
        &manifest(&["../../../../etc"]),
    );
    w.file(&format!("{modules}/send/index.js"), &meta, &body(4));
    w.file(&format!("{modules}/send/test/send.test.js"), &meta, &body(5));
    w.file(&format!("{modules}/unused/package.json"), &meta, &manifest(&[]));
    w.file(&format!("{modules}/unused/index.js"), &meta, &body(6));
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mounted = fixture.mount_for_readahead();
    let root = mounted.mountpoint().join("srv/app");
    assert_eq!(std::fs::read(root.join("index.js")).unwrap(), body(0));
    wait_until_quiet(&mounted);
    let before = mounted.stats();
    for (path, i) in [
        ("express/index.js", 1),
        ("express/lib/app.js", 2),
        ("@scope/router/index.js", 3),
        ("send/index.js", 4),
    ] {
        assert_eq!(
            std::fs::read(root.join("node_modules").join(path)).unwrap(),
            body(i),
            "{path}"
        );
    }
    assert!(std::fs::read(root.join("node_modules/send/package.json")).is_ok());
    let after = mounted.stats();
    assert_eq!(
        after.cache_misses, before.cache_misses,
        "the dependencies and theirs were read ahead: {before:?} then {after:?}"
    );
    for (path, i, what) in [
        ("send/test/send.test.js", 5, "a dependency's tests"),
        ("unused/index.js", 6, "a package nothing depends on"),
    ] {
        let path = root.join("node_modules").join(path);
        assert!(read_missed(&mounted, &path, &body(i)), "{what} was not read ahead");
    }
    mounted.unmount().unwrap();
}

/// A FUSE thread reuses its last read's buffer: a read of a hole (zeros the image
/// does not store) right after a read of data on the same thread gets zeros, never
/// the data before it.
#[test]
fn a_hole_read_after_data_on_the_same_thread_reads_zeros() {
    if !fuse_available() {
        return;
    }
    const MIB: usize = 1 << 20;
    let mut content = Rng::new(31).bytes(MIB);
    content.extend(std::iter::repeat_n(0u8, 2 * MIB));
    content.extend(Rng::new(32).bytes(MIB));
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("holey.bin", &Default::default(), &content);
    let fixture = Fixture::new(&[w.finish()], BuildOptions::default());
    let mut config = fixture.config("mnt");
    // One FUSE thread: cached reads are answered on it, one after another.
    config.fuse_threads = 1;
    let mounted = mount(&config).unwrap();
    let path = mounted.mountpoint().join("holey.bin");
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let file = std::fs::File::open(&path).unwrap();
    for round in 0..4 {
        // Out of the page cache, so that every read below asks the daemon again.
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let (first, then) = if round % 2 == 0 { (0, MIB) } else { (3 * MIB, 2 * MIB) };
        let mut data = vec![0u8; 128 << 10];
        file.read_exact_at(&mut data, first as u64).unwrap();
        assert_eq!(data, content[first..first + data.len()]);
        let mut zeros = vec![7u8; 128 << 10];
        file.read_exact_at(&mut zeros, then as u64).unwrap();
        assert!(
            zeros.iter().all(|&b| b == 0),
            "round {round}: the hole read back other bytes"
        );
    }
    assert!(mounted.stats().reads > 8, "{:?}", mounted.stats());
}
