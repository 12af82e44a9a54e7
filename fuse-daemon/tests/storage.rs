//! The read path without FUSE: one fetch for many concurrent readers of a chunk
//! (the single-flight group), and cached bytes that are checked before they are
//! trusted (a flipped byte on disk is dropped and fetched again, never served).

use petrel_builder::{build_paths, BuildOptions};
use petrel_fuse_daemon::backend::{Backend, LocalBackend, ReadPurpose};
use petrel_fuse_daemon::fetch::ChunkBytes;
use petrel_fuse_daemon::mount::open_storage;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// A local backend that counts its reads and takes its time (a slow link).
#[derive(Debug)]
struct SlowCountingBackend {
    inner: LocalBackend,
    reads: AtomicU64,
}

impl Backend for SlowCountingBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, purpose: ReadPurpose) -> std::io::Result<Vec<u8>> {
        self.reads.fetch_add(1, SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        self.inner.read_range(digest, offset, len, purpose)
    }

    fn describe(&self) -> String {
        "slow".into()
    }
}

fn image(dir: &Path) -> PathBuf {
    let mut layer = petrel_fixtures::layer_writer::LayerWriter::new();
    layer.file(
        "data.bin",
        &Default::default(),
        &petrel_fixtures::rng::Rng::new(5).mixed(2 << 20),
    );
    let paths = petrel_fixtures::write_layer_files(&dir.join("layers"), &[layer.finish()]).unwrap();
    let image = dir.join("image");
    build_paths(&paths, &image, BuildOptions::default()).unwrap();
    image
}

fn backend(image: &Path) -> Arc<SlowCountingBackend> {
    Arc::new(SlowCountingBackend {
        inner: LocalBackend::new(image.to_path_buf()),
        reads: AtomicU64::new(0),
    })
}

fn bootstrap(image: &Path) -> PathBuf {
    petrel_format::image_dir::ImageDir::new(image).bootstrap_path()
}

#[test]
fn concurrent_readers_of_one_chunk_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let (image, cache_dir) = (image(dir.path()), dir.path().join("cache"));
    let backend = backend(&image);
    let storage = open_storage(&cache_dir, backend.clone(), &bootstrap(&image), "t", 0, None).unwrap();
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let fetcher = Arc::clone(&storage.fetcher);
            std::thread::spawn(move || {
                fetcher
                    .ensure(3, 3)
                    .map(|bytes| matches!(bytes, ChunkBytes::Fetched(_)))
            })
        })
        .collect();
    let fetched: Vec<bool> = readers.into_iter().map(|r| r.join().unwrap().unwrap()).collect();
    assert_eq!(backend.reads.load(SeqCst), 1, "sixteen readers, one fetch");
    let stats = storage.stats.snapshot();
    assert_eq!(stats.cache_misses, 1, "{stats:?}");
    assert_eq!(
        stats.waited_on_inflight + stats.cache_hits,
        15,
        "the others waited for it or found it cached: {stats:?} {fetched:?}"
    );
}

#[test]
fn a_corrupted_cached_chunk_is_dropped_and_fetched_again_by_the_next_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let cache = dir.path().join("cache");
    let first = open_storage(&cache, backend(&image), &bootstrap(&image), "t", 0, None).unwrap();
    first.fetcher.ensure(0, 0).unwrap();
    // (A reader is answered before its fetch is cached.)
    assert!(first.fetcher.wait_idle(Duration::from_secs(10)));
    let digest = first.image.bootstrap().chunk(0).unwrap().digest;
    let (pack, offset, _) = first.fetcher.cache().store().chunk_location(&digest).unwrap();
    drop(first);
    // One byte of the chunk flips on disk, in its pack.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset + 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x01], offset + 100).unwrap();

    let backend = backend(&image);
    let second = open_storage(&cache, backend.clone(), &bootstrap(&image), "t", 0, None).unwrap();
    assert!(!second.fetcher.cache().is_ready(0), "the bad chunk is not trusted");
    assert!(matches!(second.fetcher.ensure(0, 0).unwrap(), ChunkBytes::Fetched(_)));
    assert!(second.fetcher.wait_idle(Duration::from_secs(10)));
    assert_eq!(backend.reads.load(SeqCst), 1, "fetched again");
    assert_eq!(second.stats.snapshot().cache_corrupt_dropped, 1);
    let mut served = vec![0u8; 4096];
    second.fetcher.cache().read(0, 0, &mut served).unwrap();
    assert_ne!(served[100], byte[0] ^ 0x01, "the good byte is cached again");

    // `petrel cache verify` sees a clean cache now; with a chunk flipped again it
    // reports it, and --repair removes it.
    assert!(petrel_fuse_daemon::verify::verify_cache(&cache, false)
        .unwrap()
        .is_clean());
    let (pack, offset, _) = second.fetcher.cache().store().chunk_location(&digest).unwrap();
    drop(second);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset + 7).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x80], offset + 7).unwrap();
    let place = std::path::PathBuf::from(format!("{}@{offset}", pack.display()));
    let report = petrel_fuse_daemon::verify::verify_cache(&cache, false).unwrap();
    assert_eq!((report.chunks_bad, report.bad.clone()), (1, vec![place]), "{report:?}");
    let store = petrel_fuse_daemon::store::ChunkStore::open(&cache, None).unwrap();
    assert!(store.contains(&digest), "reporting removes nothing");
    let report = petrel_fuse_daemon::verify::verify_cache(&cache, true).unwrap();
    assert_eq!(report.removed, 1, "{report:?}");
    let store = petrel_fuse_daemon::store::ChunkStore::open(&cache, None).unwrap();
    assert!(!store.contains(&digest), "--repair removed it");
    assert!(petrel_fuse_daemon::verify::verify_cache(&cache, false)
        .unwrap()
        .is_clean());
}

/// A local backend that records the length of every range it is asked for.
#[derive(Debug)]
struct RecordingBackend {
    inner: LocalBackend,
    lengths: std::sync::Mutex<Vec<u64>>,
}

impl Backend for RecordingBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, purpose: ReadPurpose) -> std::io::Result<Vec<u8>> {
        self.lengths.lock().unwrap().push(len);
        self.inner.read_range(digest, offset, len, purpose)
    }

    fn describe(&self) -> String {
        "recording".into()
    }
}

/// Misses that walk a blob in its order get growing windows (a few large requests
/// instead of one per amplification window); misses scattered over it each get the
/// amplification window only.
#[test]
fn misses_in_blob_order_grow_the_window_and_scattered_ones_do_not() {
    const AMPLIFY: u64 = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let mut layer = petrel_fixtures::layer_writer::LayerWriter::new();
    layer.file(
        "data.bin",
        &Default::default(),
        &petrel_fixtures::rng::Rng::new(9).bytes(24 << 20),
    );
    let paths = petrel_fixtures::write_layer_files(&dir.path().join("layers"), &[layer.finish()]).unwrap();
    let image = dir.path().join("image");
    build_paths(&paths, &image, BuildOptions::default()).unwrap();
    let open = |cache: &str| {
        let backend = Arc::new(RecordingBackend {
            inner: LocalBackend::new(image.clone()),
            lengths: Default::default(),
        });
        let storage = open_storage(
            &dir.path().join(cache),
            backend.clone(),
            &bootstrap(&image),
            "t",
            AMPLIFY,
            None,
        )
        .unwrap();
        (storage, backend)
    };

    // Front to back, one miss at a time: each next miss starts where the last fetch
    // ended, so the windows double up to the largest (4 MiB).
    let (storage, backend) = open("in-order");
    let count = storage.image.bootstrap().chunk_count();
    for index in 0..count {
        storage.fetcher.ensure(index, index).unwrap();
    }
    let lengths = backend.lengths.lock().unwrap().clone();
    let total: u64 = lengths.iter().sum();
    assert!(total >= 24 << 20, "every byte fetched once: {lengths:?}");
    assert!(lengths.len() <= 12, "{} requests: {lengths:?}", lengths.len());
    assert!(lengths.iter().any(|&l| l > 2 << 20), "{lengths:?}");
    assert!(lengths.iter().all(|&l| l <= (4 << 20) + (256 << 10)), "{lengths:?}");

    // Every 16th chunk (1 MiB apart): nothing before a miss is fetched, so every
    // request is one amplification window at most.
    let (storage, backend) = open("scattered");
    for index in (0..count).step_by(16) {
        storage.fetcher.ensure(index, index).unwrap();
    }
    let lengths = backend.lengths.lock().unwrap().clone();
    assert_eq!(lengths.len(), count.div_ceil(16) as usize, "{lengths:?}");
    assert!(lengths.iter().all(|&l| l <= AMPLIFY + (256 << 10)), "{lengths:?}");
}

#[test]
fn waiting_for_idle_lasts_until_a_fetch_under_way_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (image, cache_dir) = (image(dir.path()), dir.path().join("cache"));
    let backend = backend(&image);
    let storage = open_storage(&cache_dir, backend.clone(), &bootstrap(&image), "t", 0, None).unwrap();
    let fetcher = Arc::clone(&storage.fetcher);
    let reader = std::thread::spawn(move || fetcher.ensure(2, 2).is_ok());
    // The backend takes 200 ms a read: the fetch is under way.
    while backend.reads.load(SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !storage.fetcher.wait_idle(Duration::from_millis(20)),
        "a fetch is under way"
    );
    assert!(storage.fetcher.wait_idle(Duration::from_secs(10)));
    assert!(
        storage.fetcher.cache().is_ready(2),
        "once idle, what was fetched is cached (a daemon unmounting waits for this)"
    );
    assert!(reader.join().unwrap());
}

/// A backend that hands over the first `first` bytes of a range at once and the
/// rest only once the test opens its gate (a request whose tail is still coming).
#[derive(Debug)]
struct GatedBackend {
    inner: LocalBackend,
    first: AtomicU64,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Backend for GatedBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, purpose: ReadPurpose) -> std::io::Result<Vec<u8>> {
        self.inner.read_range(digest, offset, len, purpose)
    }

    fn stream_range(
        &self,
        digest: &[u8; 32],
        offset: u64,
        len: u64,
        purpose: ReadPurpose,
        sink: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<()> {
        let bytes = self.inner.read_range(digest, offset, len, purpose)?;
        let split = (self.first.load(SeqCst) as usize).min(bytes.len());
        sink(&bytes[..split]);
        let _ = self.gate.lock().unwrap().recv();
        sink(&bytes[split..]);
        Ok(())
    }

    fn describe(&self) -> String {
        "gated".into()
    }
}

/// A reader that misses is answered once its own chunks are in and verified: not
/// once the rest of its request (the amplification window) is in, nor once it is
/// cached. The rest still arrives and is cached.
#[test]
fn a_reader_is_answered_once_its_chunks_are_in_not_once_its_request_is() {
    let dir = tempfile::tempdir().unwrap();
    let (image, cache_dir) = (image(dir.path()), dir.path().join("cache"));
    let (open_gate, gate) = std::sync::mpsc::channel();
    let backend = Arc::new(GatedBackend {
        inner: LocalBackend::new(image.clone()),
        first: AtomicU64::new(0),
        gate: std::sync::Mutex::new(gate),
    });
    let storage = open_storage(&cache_dir, backend.clone(), &bootstrap(&image), "t", 1 << 20, None).unwrap();
    // The first chunk's bytes come at once (a range starts at the chunk).
    backend.first.store(
        u64::from(storage.image.bootstrap().chunk(0).unwrap().compressed_size),
        SeqCst,
    );
    let (answered, answer) = std::sync::mpsc::channel();
    let fetcher = Arc::clone(&storage.fetcher);
    std::thread::spawn(move || answered.send(fetcher.ensure(0, 0).is_ok()));
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the reader is answered while its request's tail is held back"
    );
    assert!(!storage.fetcher.cache().is_ready(1), "the tail is not in yet");
    open_gate.send(()).unwrap();
    assert!(storage.fetcher.wait_idle(Duration::from_secs(10)));
    assert!(storage.fetcher.cache().is_ready(0) && storage.fetcher.cache().is_ready(1));
}

/// A local backend that hands a range over in pieces of `piece` bytes (a network
/// read returns what has arrived), with the blob byte at `flip`, if any, flipped.
#[derive(Debug)]
struct PiecewiseBackend {
    inner: LocalBackend,
    piece: usize,
    flip: Option<u64>,
}

impl Backend for PiecewiseBackend {
    fn read_range(&self, digest: &[u8; 32], offset: u64, len: u64, purpose: ReadPurpose) -> std::io::Result<Vec<u8>> {
        let mut bytes = self.inner.read_range(digest, offset, len, purpose)?;
        if let Some(at) = self.flip.filter(|at| (offset..offset + len).contains(at)) {
            bytes[(at - offset) as usize] ^= 0x20;
        }
        Ok(bytes)
    }

    fn stream_range(
        &self,
        digest: &[u8; 32],
        offset: u64,
        len: u64,
        purpose: ReadPurpose,
        sink: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<()> {
        let bytes = self.read_range(digest, offset, len, purpose)?;
        bytes.chunks(self.piece).for_each(sink);
        Ok(())
    }

    fn describe(&self) -> String {
        "piecewise".into()
    }
}

/// However the bytes of a request are cut into pieces (a chunk split over many,
/// or whole in one with others), every chunk decodes to its file's bytes, and a
/// damaged one is refused, never served.
#[test]
fn chunks_decode_the_same_whatever_pieces_their_bytes_arrive_in() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let bootstrap_path = bootstrap(&image);
    let expected = petrel_fixtures::rng::Rng::new(5).mixed(2 << 20);
    for piece in [1, 4096, 100_000, usize::MAX] {
        let cache = dir.path().join(format!("cache-{piece}"));
        let backend = Arc::new(PiecewiseBackend {
            inner: LocalBackend::new(image.clone()),
            piece,
            flip: None,
        });
        // A window of the whole blob: one request, every chunk in it.
        let storage = open_storage(&cache, backend, &bootstrap_path, "t", 8 << 20, None).unwrap();
        let bootstrap = storage.image.bootstrap();
        let root = bootstrap.inode(petrel_format::layout::ROOT_INO).unwrap();
        let ino = bootstrap.lookup(&root, b"data.bin").unwrap().unwrap();
        let inode = bootstrap.inode(ino).unwrap();
        let segments = bootstrap.segments(&inode, 0, expected.len() as u64).unwrap();
        let read = storage.fetcher.read(&segments).unwrap();
        assert!(read == expected, "pieces of {piece} bytes: the file's bytes");
        assert!(storage.fetcher.wait_idle(Duration::from_secs(10)));
        assert!(storage.stats.snapshot().chunks_fetched > 1);
    }
    // One stored byte of a compressed chunk flipped: whole in its piece, or split.
    let storage = open_storage(
        &dir.path().join("cache-probe"),
        backend(&image),
        &bootstrap_path,
        "t",
        0,
        None,
    )
    .unwrap();
    let bootstrap = storage.image.bootstrap();
    let compressed = (0..bootstrap.chunk_count())
        .map(|i| bootstrap.chunk(i).unwrap())
        .find(|c| c.compressed)
        .expect("a compressed chunk");
    let flip = compressed.compressed_offset + u64::from(compressed.compressed_size) / 2;
    for piece in [1, usize::MAX] {
        let backend = Arc::new(PiecewiseBackend {
            inner: LocalBackend::new(image.clone()),
            piece,
            flip: Some(flip),
        });
        let cache = dir.path().join(format!("cache-flip-{piece}"));
        let storage = open_storage(&cache, backend, &bootstrap_path, "t", 0, None).unwrap();
        let error = storage
            .fetcher
            .ensure(compressed.index, compressed.index)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&format!("chunk {}", compressed.index)), "{error}");
        assert!(storage.fetcher.wait_idle(Duration::from_secs(10)));
        assert!(!storage.fetcher.cache().is_ready(compressed.index), "never cached");
    }
}
