//! On-demand readahead by directory. Without a profile nothing says what a
//! container will read, but programs read files of one directory together: an
//! interpreter importing a package reads its modules, a loader maps a program's
//! libraries. So the first read of a directory's file that needs a fetch makes the
//! directory's other small files (up to `SMALL_FILE_BYTES` each, `budget` bytes in
//! all) fetched in the background, several requests at once, while the reader is
//! served by its own fetch. The builder writes a directory's files next to each
//! other in the blob, so this is a few large requests instead of one round trip
//! per file. Big files are left to the reads themselves (random reads of a large
//! file never fetch much more than they touch).
//!
//! An import walks a package one directory after another (numpy, then numpy/core,
//! numpy/lib, …: on the Python service 56 of 84 misses on compiled modules were in a
//! package already missed in). So a miss inside a package (the topmost directory of
//! nested ones holding `__init__.py`, or the nearest holding `package.json`) also
//! reads ahead the package's small files with the missed file's extension, in every
//! directory of it, within `PACKAGE_BUDGET_DIRS` directory budgets, once per package,
//! its test directories left out. Loading a Node package loads the packages it
//! depends on, one after another: a miss in one reads ahead the packages of its
//! `package.json`'s `dependencies`, and theirs (`node_deps`), within
//! `DEPENDENCY_BUDGET_DIRS` directory budgets. Measured on the Node service
//! (`scripts/bench.sh apps --app node`, on demand, 1 round): 4.78 s, 55 requests
//! by readers, then 4.32 s, 46.
//!
//! Executables and shared libraries (ELF files up to `MAX_ELF_BYTES`) are read
//! ahead whole as soon as their first miss shows the ELF magic: a loader reads the
//! header, then the section table at the end, then maps the file and faults pages
//! all over, one round trip each otherwise (measured on the Python service: three to
//! four misses per library, 40 libraries). Their loadable segments without code
//! larger than 1 MiB are not (a library of data, as ICU's 31 MB `libicudata`, of
//! which Node's start reads 0.6 MB). Other big files are left to their reads. An
//! executable's first miss (of any size) also reads ahead the libraries it needs,
//! and theirs, and its loader (`elf_needs`), where the loader would read them one
//! after another (Node's start: 4.32 s, then 3.65 s): those that fit in
//! `Miss::ALONG_BYTES` together come whole in one request, the others' heads with
//! them, then each is probed as above. So does a library loaded on its own (a
//! Python extension) that comes whole with its first miss: its dynamic section is
//! on its way. Measured on-demand starts (`scripts/bench.sh apps`, medians of 3):
//! with heads first, then each body in turn, and libraries loaded on their own not
//! looked into, Python 75 requests, 5.99 s; Node 76–81, 3.80 s; Java 91, 5.11 s;
//! as now, Python 63, 6.13 s; Node 54, 3.87 s; Java 80, 4.89 s. Importing a
//! Python package loads its compiled extension modules one after another (all 41
//! of pandas', 17 MB), most beyond the small files: the first miss on one reads
//! the package's others ahead, whole, within `PACKAGE_LIBRARY_BUDGET_DIRS`
//! directory budgets (Python: 64 requests, 6.05 s, then 56, 5.71 s).
//!
//! Files are tied to their directory by the lookups the kernel makes (a file's
//! inode does not record its parent), once per directory per mount. An image with
//! a recorded profile (a prefetch region the mount streams) gets no readahead: the
//! profile knows better than a guess (measured: guessing on top of a profile made
//! the Python service start 1.3x slower).

use crate::fetch::Fetcher;
use crate::image::MappedImage;
use crate::job_queue::{JobQueue, Take};
use petrel_format::layout::ROOT_INO;
use petrel_format::reader::SegmentSource;
use petrel_format::FileKind;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

/// Files up to this size are read ahead whole with their directory.
pub const SMALL_FILE_BYTES: u64 = 1 << 20;
/// ELF files up to this size are read ahead whole once their first miss shows the ELF magic.
pub const MAX_ELF_BYTES: u64 = 32 << 20;
/// Loadable segments without code larger than this are left out of an ELF file's
/// readahead (see `large_data_segments`). Measured on the Node service
/// (`scripts/bench.sh apps --app node`, 20 Mbit/s + 50 ms, on demand): reading
/// `libicudata` whole made the start fetch 47.7 MB (the profile reads 21.6 MB).
const ELF_DATA_SEGMENT_BYTES: u64 = 1 << 20;
/// Stored bytes per readahead request (ranges apart in one multi-range request).
/// Measured on the Python service (`scripts/bench.sh apps`, on demand, medians of 3
/// rounds): 1 MiB 180 requests, 6.56 s; 2 MiB 144 requests, 6.59 s.
const REQUEST_BYTES: u64 = 2 << 20;
/// Most stored bytes of unwanted chunks a readahead request fetches along to join
/// two ranges of wanted ones (see `bridged`).
const GAP_BYTES: u64 = 128 << 10;
/// A Node package's dependencies (and theirs) are read ahead up to this many
/// directory budgets in all.
const DEPENDENCY_BUDGET_DIRS: u64 = 16;
/// Most packages one package's dependencies are followed to.
const MAX_DEPENDENCY_PACKAGES: usize = 512;
/// The files of a Node package `require` reads: its manifest, scripts and data.
const NODE_EXTENSIONS: [&[u8]; 3] = [b".js", b".cjs", b".json"];
/// A directory is read ahead at most this many times (each from a missed file
/// the earlier ones did not reach, one directory budget each). Measured on the
/// Python service (`scripts/bench.sh apps`, on demand): the standard library's
/// `__pycache__` holds 6 MB in 171 modules, of which the start imports 74 from
/// all over the alphabet; one budget from its first file left most of them to a
/// miss each.
const MAX_DIR_ROUNDS: u8 = 4;
/// A package is read ahead up to this many directory budgets.
const PACKAGE_BUDGET_DIRS: u64 = 4;
/// A package's shared objects (each whole up to `Miss::ALONG_BYTES`) are read
/// ahead up to this many directory budgets, at the first miss of one of them.
const PACKAGE_LIBRARY_BUDGET_DIRS: u64 = 8;
/// Directories of a package its readahead leaves out: its test suites, which a
/// start does not import (on the Python service they hold 20 of pandas' 28 MB of
/// compiled modules and 7.8 of numpy's 13 MB, and took the package budget from the
/// modules the start reads: it reads 7.8 MB of pandas' other 8.3 MB), and the
/// packages installed inside it (`node_modules`), reached by its dependencies.
const LEFT_OUT_DIRS: [&[u8]; 4] = [b"tests", b"test", b"__tests__", b"node_modules"];
/// Ancestors looked at for a package root.
const MAX_PACKAGE_DEPTH: usize = 16;
/// Entries of a package looked at.
const MAX_PACKAGE_ENTRIES: usize = 50_000;
/// Ranges waiting at most (the newest directories are served first; beyond this
/// the oldest waiting ones are dropped).
const MAX_QUEUED: usize = 1024;

/// Readahead requests in flight at once.
pub const PARALLEL: usize = 4;
/// The default budget per directory, in stored bytes: on the Python service of
/// `scripts/bench.sh apps` 2 MiB started as fast as 8 or 32 MiB (0.80x of no
/// readahead) and fetched least (1.07x the bytes of no readahead; 8 MiB: 1.32x).
pub const DEFAULT_DIR_BYTES: u64 = 2 << 20;

#[derive(Debug)]
struct Shared {
    image: Arc<MappedImage>,
    fetcher: Arc<Fetcher>,
    budget: u64,
    /// Per inode: the directory it was last looked up in (0: none yet).
    parent_of: Vec<AtomicU32>,
    /// Per inode: how many times the directory was read ahead.
    dir_rounds: Vec<AtomicU8>,
    /// One bit per inode: the package rooted there was read ahead.
    package_done: Vec<AtomicU64>,
    /// One bit per inode: the shared objects of the package rooted there were read ahead.
    package_libraries_done: Vec<AtomicU64>,
    /// One bit per inode: the file was probed for being an ELF file.
    elf_probed: Vec<AtomicU64>,
    /// One bit per inode: the libraries the ELF file needs were looked for.
    needs_read: Vec<AtomicU64>,
    queue: JobQueue<Job>,
    /// Set once a profile is found for the mount: it knows better than a guess.
    off: Arc<std::sync::atomic::AtomicBool>,
}

/// Work for the readahead threads.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Chunks `[start, end)`.
    Chunks(u32, u32),
    /// File `ino` missed for the first time, or needed by one that did: once its
    /// first chunk is in, an ELF file is fetched whole, and with `needs` the
    /// libraries it needs are read ahead.
    ElfProbe { ino: u32, body: bool, needs: bool },
    /// Node package `root` was missed in: the packages it depends on are read ahead.
    Dependencies(u32),
}

/// Directory readahead of one mount; stops its threads when dropped.
#[derive(Debug)]
pub struct DirReadahead {
    shared: Arc<Shared>,
}

impl DirReadahead {
    /// Readahead of up to `budget` stored bytes per directory, `parallel` requests
    /// at once.
    pub fn start(image: Arc<MappedImage>, fetcher: Arc<Fetcher>, budget: u64, parallel: usize) -> Self {
        let inodes = image.bootstrap().inode_count() as usize + 1;
        let shared = Arc::new(Shared {
            image,
            fetcher,
            budget,
            parent_of: (0..inodes).map(|_| AtomicU32::new(0)).collect(),
            dir_rounds: (0..inodes).map(|_| AtomicU8::new(0)).collect(),
            package_done: (0..inodes.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            package_libraries_done: (0..inodes.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            elf_probed: (0..inodes.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            needs_read: (0..inodes.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            queue: JobQueue::new(MAX_QUEUED, Take::Newest),
            off: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        });
        for _ in 0..parallel.max(1) {
            let shared = Arc::clone(&shared);
            let _ = std::thread::Builder::new()
                .name("petrel-readahead".into())
                .spawn(move || shared.work());
        }
        DirReadahead { shared }
    }

    /// A switch that turns this readahead off for good (a profile arrived).
    pub fn off_switch(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.shared.off)
    }

    /// The kernel looked `child` up in directory `parent`.
    pub fn learned(&self, child: u32, parent: u32) {
        if let Some(slot) = self.shared.parent_of.get(child as usize) {
            slot.store(parent, Relaxed);
        }
    }

    /// A read of `ino` needed a fetch: read its directory ahead (once), and an
    /// executable or library whole once its first chunk shows the ELF magic. The
    /// directory's and package's files (and a library that fits whole) are returned
    /// as `along`, for the reader's own request to take what it can (see
    /// `Fetcher::take_along`), and pushed as readahead with the rest by
    /// [`Miss::push`], which the reader calls once its request is planned.
    pub fn missed(&self, ino: u32, first_chunk: Option<u32>) -> Miss {
        let shared = &self.shared;
        let mut miss = Miss {
            along: Vec::new(),
            jobs: Vec::new(),
            shared: Arc::clone(shared),
        };
        if shared.off.load(Relaxed) {
            return miss;
        }
        let parent = shared.parent_of.get(ino as usize).map_or(0, |p| p.load(Relaxed));
        // One push for all this miss makes fetched: a worker woken by it takes the
        // directory's and the package's files in one request, not one each.
        // What looks like a program or a library, of any size: asked only where the
        // answer is still needed (it looks the file's name up in its directory).
        let loadable_once = std::cell::OnceCell::new();
        let loadable = || {
            *loadable_once.get_or_init(|| {
                shared.executable(ino) || shared.name_in(parent, ino).is_some_and(|n| is_shared_object(&n))
            })
        };
        if !is_set(&shared.elf_probed, ino)
            && (shared.elf_candidate(ino) || loadable())
            && first_time(&shared.elf_probed, ino)
        {
            // A file that fits in the reader's request comes whole with it: the
            // probe then finds its body on the way, and the loader's faults wait
            // for it instead of asking for their pages one round trip each.
            // Only what looks like a program or a library: a big file of data read
            // here and there is left to its reads.
            let mut whole_along = false;
            if loadable() {
                let whole = shared.whole_file(ino);
                if shared.stored_bytes(&whole) <= Miss::ALONG_BYTES {
                    miss.along.extend(whole);
                    whole_along = true;
                }
            }
            // An executable's libraries are read ahead with it, and theirs. So are
            // those of a library missed on its own (loaded by `dlopen`, as a Python
            // extension) that comes whole: its dynamic section is on its way, so
            // finding them costs no request. A bigger one is not looked into: its
            // libraries are mostly loaded already, and finding out would cost a
            // request for its dynamic section.
            miss.jobs.push(Job::ElfProbe {
                ino,
                body: true,
                needs: (shared.executable(ino) || whole_along) && first_time(&shared.needs_read, ino),
            });
        }
        // A directory is read ahead from its first file at its first miss; a miss
        // of a file that readahead did not reach (not fetched, not on its way) reads
        // it ahead again from that file on, a few times at most.
        let fresh = first_chunk.is_some_and(|chunk| !shared.fetcher.is_in_flight(chunk));
        let rounds = (parent != 0).then(|| shared.dir_rounds.get(parent as usize)).flatten();
        if let Some(round) = rounds.and_then(|r| next_round(r, fresh)) {
            miss.along.extend(shared.small_file_ranges(parent, ino, round > 0));
        }
        let package = (parent != 0).then(|| shared.package_root(parent)).flatten();
        if let Some(root) = package.filter(|root| !is_set(&shared.package_libraries_done, *root)) {
            // A package's compiled modules load together: importing it loads them
            // all, one after another (pandas' 41, 17 MB, on the Python service).
            if loadable() && first_time(&shared.package_libraries_done, root) {
                miss.along.extend(shared.package_files(
                    root,
                    ino,
                    Miss::ALONG_BYTES,
                    shared.budget.saturating_mul(PACKAGE_LIBRARY_BUDGET_DIRS),
                    is_shared_object,
                ));
            }
        }
        if let Some(root) = package {
            if first_time(&shared.package_done, root) {
                miss.along.extend(shared.package_ranges(root, parent, ino));
                if shared.holds(root, b"package.json") {
                    miss.jobs.push(Job::Dependencies(root));
                }
            }
        }
        // Taken newest first: the chunks before the probes.
        miss.jobs
            .extend(miss.along.iter().map(|&(start, end)| Job::Chunks(start, end)));
        miss
    }
}

/// What a miss reads ahead: chunk ranges its own request may take along, and the
/// readahead jobs (those ranges too: what the request took is skipped then).
#[derive(Debug)]
pub struct Miss {
    pub along: Vec<(u32, u32)>,
    jobs: Vec<Job>,
    shared: Arc<Shared>,
}

impl Miss {
    /// Most stored bytes of `along` a reader's request takes, and the largest
    /// library or executable that comes whole with its first miss. Measured on the
    /// Python service (`scripts/bench.sh apps`, on demand, medians of 3 rounds): with
    /// 2 MiB and no whole files 101 requests, 6.38 s; 8 MiB 96, 6.22 s; 8 MiB and
    /// whole files 75, 6.08 s (the loader's page faults in `python3.11`, `libcrypto`,
    /// LAPACK and numpy's and pandas' extensions had a request each).
    pub const ALONG_BYTES: u64 = 4 * REQUEST_BYTES;

    /// Queues the readahead jobs.
    pub fn push(self) {
        if !self.jobs.is_empty() {
            self.shared.queue.push(self.jobs);
        }
    }
}

/// File ranges (offset, size) of an ELF file's loadable segments that hold no code
/// and more than `ELF_DATA_SEGMENT_BYTES`, from its head (the ELF and program
/// headers): a library of data (ICU's 31 MB `libicudata`, of which Node's start
/// reads 0.6 MB) or big read-only tables, which a program reads here and there. None
/// when the head is not a 64-bit ELF file or does not hold its program headers.
fn large_data_segments(head: &[u8]) -> Vec<(u64, u64)> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(head) else {
        return Vec::new();
    };
    let Ok(endian) = header.endian() else {
        return Vec::new();
    };
    let Ok(program_headers) = header.program_headers(endian, head) else {
        return Vec::new();
    };
    program_headers
        .iter()
        .filter(|p| {
            p.p_type(endian) == object::elf::PT_LOAD
                && !p.p_flags(endian).contains(object::elf::PF_X)
                && p.p_filesz(endian) > ELF_DATA_SEGMENT_BYTES
        })
        .map(|p| (p.p_offset(endian), p.p_filesz(endian)))
        .collect()
}

/// The round of directory readahead a miss starts (None: none): the first, or
/// when the missed file was `fresh` (readahead did not reach it) another, up to
/// `MAX_DIR_ROUNDS`.
fn next_round(rounds: &AtomicU8, fresh: bool) -> Option<u8> {
    rounds
        .fetch_update(Relaxed, Relaxed, |r| {
            (r == 0 || (fresh && r < MAX_DIR_ROUNDS)).then_some(r + 1)
        })
        .ok()
}

/// Whether `name` is a shared object's: `*.so` or `*.so.*` (`libc.so.6`,
/// `_json.cpython-311-x86_64-linux-gnu.so`).
fn is_shared_object(name: &[u8]) -> bool {
    name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.")
}

/// Sets bit `index`; true if it was not set before.
/// Whether bit `index` is set.
fn is_set(bits: &[AtomicU64], index: u32) -> bool {
    bits.get(index as usize / 64)
        .is_some_and(|word| word.load(Relaxed) & (1u64 << (index % 64)) != 0)
}

fn first_time(bits: &[AtomicU64], index: u32) -> bool {
    let Some(word) = bits.get(index as usize / 64) else {
        return false;
    };
    let bit = 1u64 << (index % 64);
    word.fetch_or(bit, Relaxed) & bit == 0
}

impl Drop for DirReadahead {
    fn drop(&mut self) {
        self.shared.queue.close();
    }
}

impl Shared {
    fn enqueue(&self, ranges: Vec<(u32, u32)>) {
        self.queue.push(ranges.into_iter().map(|(a, b)| Job::Chunks(a, b)));
    }

    /// Whether file `ino` is worth a look for being an ELF file: a regular file
    /// beyond the small ones (those come with their directory) or an executable.
    fn elf_candidate(&self, ino: u32) -> bool {
        let bootstrap = self.image.bootstrap();
        bootstrap.inode(ino).is_ok_and(|inode| {
            inode.kind().ok() == Some(FileKind::Regular)
                && inode.size() > 0
                && (inode.size() >= SMALL_FILE_BYTES || inode.permissions() & 0o111 != 0)
        })
    }

    /// Whether file `ino` may be executed by someone.
    fn executable(&self, ino: u32) -> bool {
        let bootstrap = self.image.bootstrap();
        bootstrap.inode(ino).is_ok_and(|inode| inode.permissions() & 0o111 != 0)
    }

    /// Waits for the first chunk of file `ino` (the reader's own fetch of it is
    /// joined, not repeated); if it starts with the ELF magic, reads the libraries it
    /// needs ahead (`read_needed_ahead`, with `needs`) and, with `body` and up to
    /// `MAX_ELF_BYTES`, fetches the rest of the file: a loader maps it and faults
    /// pages all over, one round trip each otherwise. Big segments without code
    /// (`large_data_segments`) are left to the reads.
    fn probe_elf(&self, ino: u32, body: bool, needs: bool) {
        let bootstrap = self.image.bootstrap();
        let Ok(inode) = bootstrap.inode(ino) else { return };
        let Ok(head_segments) = bootstrap.segments(&inode, 0, inode.size().min(SMALL_FILE_BYTES)) else {
            return;
        };
        let Some((first, offset, length)) = head_segments.iter().find_map(|s| match s.source {
            SegmentSource::Chunk { index, chunk_offset } if s.file_offset == 0 => {
                Some((index, chunk_offset as usize, s.length as usize))
            }
            _ => None,
        }) else {
            return;
        };
        let head = match self.fetcher.ensure(first, first) {
            Ok(crate::fetch::ChunkBytes::Fetched(bytes)) => bytes.get(offset..offset + length).map(<[u8]>::to_vec),
            Ok(crate::fetch::ChunkBytes::Cached) => {
                let mut head = vec![0u8; length];
                self.fetcher
                    .cache()
                    .read(first, offset as u32, &mut head)
                    .is_ok()
                    .then_some(head)
            }
            Err(_) => None,
        };
        let Some(head) = head.filter(|h| h.starts_with(b"\x7fELF")) else {
            return;
        };
        if needs {
            self.read_needed_ahead(ino, &head);
        }
        if !body || inode.size() > MAX_ELF_BYTES {
            return;
        }
        let Ok(segments) = bootstrap.segments(&inode, 0, inode.size()) else {
            return;
        };
        let left_to_reads = large_data_segments(&head);
        let inside = |at: u64, len: u64| {
            left_to_reads
                .iter()
                .any(|(start, size)| at >= *start && at + len <= start + size)
        };
        let cache = self.fetcher.cache();
        let chunks = segments
            .iter()
            .filter_map(|s| match s.source {
                SegmentSource::Chunk { index, .. }
                    if !cache.is_ready(index) && !inside(s.file_offset, u64::from(s.length)) =>
                {
                    Some(index)
                }
                _ => None,
            })
            .collect();
        // In requests as large as a miss's own: the loader's faults meanwhile find
        // more of the file on its way (Java's 20 MB libjvm).
        for (start, end) in crate::chunk_ranges::ranges(chunks, |_, _| false) {
            self.fetcher.read_ahead(start, end, Miss::ALONG_BYTES);
        }
    }

    /// The libraries ELF file `ino` needs (`elf_needs`), not probed yet: their heads
    /// fetched together (one request where they share a blob), then each probed in
    /// turn (read ahead whole, and their own libraries), as the loader will want
    /// them one after another.
    fn read_needed_ahead(&self, ino: u32, head: &[u8]) {
        let Some(elf) = crate::elf_needs::ElfHead::parse(head) else {
            return;
        };
        let (offset, size) = elf.dynamic();
        let Some(refs) = self.read_file(ino, offset, size).and_then(|d| elf.string_refs(&d)) else {
            return;
        };
        let Some(strings) = self.read_file(ino, refs.strings.0, refs.strings.1) else {
            return;
        };
        let bootstrap = self.image.bootstrap();
        let origin = self
            .parent_of
            .get(ino as usize)
            .map(|p| p.load(Relaxed))
            .filter(|p| *p != 0);
        let interpreter = elf
            .interpreter(head)
            .and_then(|path| crate::elf_needs::resolve(&bootstrap, ROOT_INO, path));
        // A library already probed on its own miss (without looking into its
        // libraries) is looked into now, not fetched again.
        let libraries: Vec<Job> = interpreter
            .into_iter()
            .chain(crate::elf_needs::resolve_needed(
                &bootstrap, &elf, &refs, &strings, origin,
            ))
            .filter_map(|lib| {
                let body = first_time(&self.elf_probed, lib);
                let needs = first_time(&self.needs_read, lib);
                (body || needs).then_some(Job::ElfProbe { ino: lib, body, needs })
            })
            .collect();
        // The loader maps every library before the program runs: those that fit
        // come whole in one request, the others' heads with them (their probes
        // then fetch what the first request did not hold).
        let mut wanted: Vec<(u32, u32)> = Vec::new();
        let mut whole_bytes = 0u64;
        for lib in libraries.iter().filter_map(|job| match *job {
            Job::ElfProbe { ino, body: true, .. } => Some(ino),
            _ => None,
        }) {
            let whole = self.whole_file(lib);
            let bytes = self.stored_bytes(&whole);
            if whole_bytes + bytes <= Miss::ALONG_BYTES {
                whole_bytes += bytes;
                wanted.extend(whole);
            } else {
                wanted.extend(self.file_chunks(lib, 1).first().map(|index| (*index, index + 1)));
            }
        }
        tracing::debug!(
            ino,
            libraries = libraries.len(),
            whole_bytes,
            "reading needed libraries ahead"
        );
        self.fetcher
            .fetch_ranges(&wanted, Miss::ALONG_BYTES, crate::backend::ReadPurpose::Reader);
        self.queue.push(libraries);
    }

    /// The packages Node package `root` depends on (`node_deps`), and theirs, level
    /// by level: each level's `package.json` files fetched together, then each
    /// package's scripts read ahead as a miss in it would (`NODE_EXTENSIONS`), each
    /// package once, within `DEPENDENCY_BUDGET_DIRS` directory budgets in all.
    fn read_dependencies_ahead(&self, root: u32) {
        let bootstrap = self.image.bootstrap();
        let mut budget = self.budget.saturating_mul(DEPENDENCY_BUDGET_DIRS);
        let mut level = vec![root];
        let mut packages = 0usize;
        while !level.is_empty() && budget > 0 {
            let manifests: Vec<(u32, u32)> = level
                .iter()
                .filter_map(|package| {
                    let dir = bootstrap.inode(*package).ok()?;
                    Some((*package, bootstrap.lookup(&dir, b"package.json").ok()??))
                })
                .collect();
            let chunks: Vec<(u32, u32)> = manifests
                .iter()
                .flat_map(|(_, manifest)| self.file_chunks(*manifest, crate::node_deps::MAX_MANIFEST_BYTES))
                .map(|index| (index, index + 1))
                .collect();
            self.fetcher
                .fetch_ranges(&chunks, REQUEST_BYTES, crate::backend::ReadPurpose::Reader);
            let mut next = Vec::new();
            for (package, manifest) in manifests {
                let Some(bytes) = self.read_file(manifest, 0, crate::node_deps::MAX_MANIFEST_BYTES) else {
                    continue;
                };
                for name in crate::node_deps::dependency_names(&bytes) {
                    let Some(dir) = crate::node_deps::resolve_dependency(&bootstrap, package, &name) else {
                        continue;
                    };
                    if packages < MAX_DEPENDENCY_PACKAGES && first_time(&self.package_done, dir) {
                        packages += 1;
                        next.push(dir);
                    }
                }
            }
            let mut ranges = Vec::new();
            for package in &next {
                if budget == 0 {
                    break;
                }
                let of_package = self.package_ranges_with(*package, &NODE_EXTENSIONS, 0);
                budget = budget.saturating_sub(self.stored_bytes(&of_package));
                ranges.extend(of_package);
            }
            self.enqueue(ranges);
            tracing::debug!(root, packages = next.len(), "reading dependencies ahead");
            level = next;
        }
    }

    /// The chunks of the first `len` bytes of file `ino` (a stranger's file may be
    /// huge: only what is read of it), in file order, each once.
    fn file_chunks(&self, ino: u32, len: u64) -> Vec<u32> {
        let bootstrap = self.image.bootstrap();
        let Ok(inode) = bootstrap.inode(ino) else {
            return Vec::new();
        };
        let mut chunks: Vec<u32> = bootstrap
            .segments(&inode, 0, inode.size().min(len))
            .map(|segments| {
                segments
                    .iter()
                    .filter_map(|s| match s.source {
                        SegmentSource::Chunk { index, .. } => Some(index),
                        SegmentSource::Hole => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        chunks.dedup();
        chunks
    }

    /// The name of `ino` in directory `dir`, if it is there.
    fn name_in(&self, dir: u32, ino: u32) -> Option<Vec<u8>> {
        let bootstrap = self.image.bootstrap();
        let dir = bootstrap.inode(dir).ok()?;
        let entries = bootstrap.dir_entries(&dir).ok()?;
        entries.flatten().find(|e| e.ino == ino).map(|e| e.name.to_vec())
    }

    /// The chunk ranges of file `ino`, whole.
    fn whole_file(&self, ino: u32) -> Vec<(u32, u32)> {
        crate::chunk_ranges::ranges(self.file_chunks(ino, u64::MAX), |_, _| false)
    }

    /// Stored bytes of the chunks of `ranges`.
    fn stored_bytes(&self, ranges: &[(u32, u32)]) -> u64 {
        let bootstrap = self.image.bootstrap();
        ranges
            .iter()
            .flat_map(|(start, end)| *start..*end)
            .map(|index| bootstrap.chunk(index).map_or(0, |c| u64::from(c.compressed_size)))
            .sum()
    }

    /// Whether directory `dir` holds an entry `name`.
    fn holds(&self, dir: u32, name: &[u8]) -> bool {
        let bootstrap = self.image.bootstrap();
        bootstrap
            .inode(dir)
            .ok()
            .and_then(|d| bootstrap.lookup(&d, name).ok().flatten())
            .is_some()
    }

    /// Bytes `[offset, offset + len)` of file `ino` (clamped to its size), fetched
    /// if they are not cached; None when there are none or the read fails.
    fn read_file(&self, ino: u32, offset: u64, len: u64) -> Option<Vec<u8>> {
        let bootstrap = self.image.bootstrap();
        let inode = bootstrap.inode(ino).ok()?;
        let len = len.min(inode.size().saturating_sub(offset));
        if len == 0 {
            return None;
        }
        let segments = bootstrap.segments(&inode, offset, len).ok()?;
        self.fetcher.read(&segments).ok()
    }

    /// Chunk ranges of the small regular files of directory `dir` but `reading`
    /// (whose reader fetches its own chunks at once), within the budget, merged where
    /// contiguous, in blob order.
    fn small_file_ranges(&self, dir: u32, reading: u32, from_reading: bool) -> Vec<(u32, u32)> {
        let bootstrap = self.image.bootstrap();
        let Ok(dir) = bootstrap.inode(dir) else {
            return Vec::new();
        };
        let Ok(entries) = bootstrap.dir_entries(&dir) else {
            return Vec::new();
        };
        let mut chunks = Vec::new();
        let mut bytes = 0u64;
        let mut reached = !from_reading;
        for entry in entries.flatten() {
            reached |= entry.ino == reading;
            if !reached {
                continue;
            }
            let Ok(inode) = bootstrap.inode(entry.ino) else {
                continue;
            };
            if entry.ino == reading || inode.kind().ok() != Some(FileKind::Regular) || inode.size() > SMALL_FILE_BYTES {
                continue;
            }
            let Ok(segments) = bootstrap.segments(&inode, 0, inode.size()) else {
                continue;
            };
            for segment in segments {
                if let SegmentSource::Chunk { index, .. } = segment.source {
                    if chunks.last() == Some(&index) || self.fetcher.cache().is_ready(index) {
                        continue;
                    }
                    let Ok(chunk) = bootstrap.chunk(index) else { continue };
                    bytes += u64::from(chunk.compressed_size);
                    if bytes > self.budget {
                        return bridged(&self.image, chunks);
                    }
                    chunks.push(index);
                }
            }
        }
        bridged(&self.image, chunks)
    }

    /// The root of the package directory `dir` belongs to: the topmost of its
    /// ancestors that are Python packages (hold `__init__.py`; a `__pycache__`
    /// directory counts as its package), or the nearest that holds `package.json`
    /// (below `node_modules`). None outside a package.
    fn package_root(&self, dir: u32) -> Option<u32> {
        let bootstrap = self.image.bootstrap();
        let holds = |ino: u32, name: &[u8]| self.holds(ino, name);
        let parent = |ino: u32| bootstrap.inode(ino).ok().map(|d| d.parent()).filter(|p| *p != ino);
        let mut at = dir;
        // A `__pycache__` directory stands for its package.
        if let Some(up) = parent(at) {
            let named = bootstrap
                .inode(up)
                .ok()
                .and_then(|d| bootstrap.lookup(&d, b"__pycache__").ok().flatten());
            if named == Some(at) {
                at = up;
            }
        }
        if holds(at, b"__init__.py") {
            for _ in 0..MAX_PACKAGE_DEPTH {
                match parent(at) {
                    Some(up) if holds(up, b"__init__.py") => at = up,
                    _ => break,
                }
            }
            return Some(at);
        }
        for _ in 0..MAX_PACKAGE_DEPTH {
            if holds(at, b"package.json") {
                return Some(at);
            }
            at = parent(at)?;
        }
        None
    }

    /// Chunk ranges of the small files under package `root` (all its directories)
    /// with the extension of `reading` (in directory `dir`): the compiled modules of a
    /// Python package (`.pyc`) or the scripts of a Node package (`.js`), which an
    /// import of the package goes on to read, one directory after another. Test
    /// directories are left out (`LEFT_OUT_DIRS`). Within the package budget, merged
    /// where contiguous.
    fn package_ranges(&self, root: u32, dir: u32, reading: u32) -> Vec<(u32, u32)> {
        let bootstrap = self.image.bootstrap();
        let Some(name) = bootstrap
            .inode(dir)
            .ok()
            .and_then(|d| bootstrap.dir_entries(&d).ok())
            .and_then(|entries| entries.flatten().find(|e| e.ino == reading).map(|e| e.name.to_vec()))
        else {
            return Vec::new();
        };
        let Some(dot) = name.iter().rposition(|b| *b == b'.') else {
            return Vec::new();
        };
        self.package_ranges_with(root, &[&name[dot..]], reading)
    }

    /// Chunk ranges of the small files under package `root` whose names end with
    /// one of `extensions`, but file `skip`: breadth first, test directories left
    /// out, within the package budget, merged where contiguous.
    fn package_ranges_with(&self, root: u32, extensions: &[&[u8]], skip: u32) -> Vec<(u32, u32)> {
        self.package_files(
            root,
            skip,
            SMALL_FILE_BYTES,
            self.budget.saturating_mul(PACKAGE_BUDGET_DIRS),
            |name| extensions.iter().any(|e| name.ends_with(e)),
        )
    }

    /// Chunk ranges of the files under package `root` of up to `max_file_bytes`
    /// whose names are `wanted`, but file `skip`: breadth first, test directories
    /// left out, within `budget` stored bytes, merged where contiguous.
    fn package_files(
        &self,
        root: u32,
        skip: u32,
        max_file_bytes: u64,
        budget: u64,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Vec<(u32, u32)> {
        let bootstrap = self.image.bootstrap();
        let mut chunks = Vec::new();
        let mut bytes = 0u64;
        // Breadth first: an import goes down from the package's top, so within the
        // budget the shallow modules come first.
        let mut waiting = std::collections::VecDeque::from([root]);
        let mut visited = 0usize;
        while let Some(at) = waiting.pop_front() {
            let Ok(entries) = bootstrap.inode(at).and_then(|d| bootstrap.dir_entries(&d)) else {
                continue;
            };
            for entry in entries.flatten() {
                visited += 1;
                if visited > MAX_PACKAGE_ENTRIES {
                    return bridged(&self.image, chunks);
                }
                let Ok(inode) = bootstrap.inode(entry.ino) else {
                    continue;
                };
                match inode.kind() {
                    Ok(FileKind::Directory)
                        if entry.name != b"." && entry.name != b".." && !LEFT_OUT_DIRS.contains(&entry.name) =>
                    {
                        waiting.push_back(entry.ino)
                    }
                    Ok(FileKind::Regular)
                        if entry.ino != skip && inode.size() <= max_file_bytes && wanted(entry.name) =>
                    {
                        let Ok(segments) = bootstrap.segments(&inode, 0, inode.size()) else {
                            continue;
                        };
                        for segment in segments {
                            let SegmentSource::Chunk { index, .. } = segment.source else {
                                continue;
                            };
                            if chunks.last() == Some(&index) || self.fetcher.cache().is_ready(index) {
                                continue;
                            }
                            bytes += bootstrap.chunk(index).map_or(0, |c| u64::from(c.compressed_size));
                            if bytes > budget {
                                return bridged(&self.image, chunks);
                            }
                            chunks.push(index);
                        }
                    }
                    _ => {}
                }
            }
        }
        bridged(&self.image, chunks)
    }

    /// Takes jobs: an ELF probe alone; chunk ranges together, as many as one
    /// request carries (`REQUEST_BYTES` stored bytes, `MAX_RANGES` ranges), fetched
    /// with one multi-range request each where the backend serves them.
    fn work(&self) {
        while let Some(batch) = self.queue.next_batch(self.batch_budget()) {
            let mut ranges = Vec::with_capacity(batch.len());
            for job in batch {
                match job {
                    Job::Chunks(start, end) => ranges.push((start, end)),
                    Job::ElfProbe { ino, body, needs } => self.probe_elf(ino, body, needs),
                    Job::Dependencies(root) => self.read_dependencies_ahead(root),
                }
            }
            if !ranges.is_empty() {
                self.fetcher
                    .fetch_ranges(&ranges, REQUEST_BYTES, crate::backend::ReadPurpose::Reader);
            }
        }
    }

    /// Whether a waiting job joins the batch taken: chunk ranges while their stored
    /// bytes fit one request.
    fn batch_budget(&self) -> impl FnMut(&Job) -> bool + '_ {
        let mut bytes = 0u64;
        let mut ranges = 1usize;
        move |job| {
            let Job::Chunks(start, end) = *job else {
                return false;
            };
            let bootstrap = self.image.bootstrap();
            let span = match (bootstrap.chunk(start), bootstrap.chunk(end.saturating_sub(1))) {
                (Ok(first), Ok(last)) => {
                    (last.compressed_offset + u64::from(last.compressed_size)).saturating_sub(first.compressed_offset)
                }
                _ => return false,
            };
            bytes += span;
            ranges += 1;
            bytes <= REQUEST_BYTES && ranges <= crate::fetch::MAX_RANGES
        }
    }
}

/// Chunk indices as ranges for `read_ahead`: consecutive chunks, bridged across up
/// to `GAP_BYTES` of stored bytes of other missing chunks (a file of another kind,
/// a big file, between the small ones wanted). Measured on the Python service
/// (`scripts/bench.sh apps`, on demand, one round each): no bridging 316 requests,
/// 52.9 MB, 6.69 s; 128 KiB 214 requests, 56.0 MB, 6.57 s; 512 KiB 199, 58.8 MB,
/// 6.58 s; 2 MiB 193, 63.6 MB, 6.70 s. These requests run four at once in the
/// background, so fewer of them did not start the service sooner, but a third fewer
/// round trips for 6% more bytes is what a registry with per-request costs (or
/// limits) wants; beyond 128 KiB the bytes grow faster than the requests fall. With
/// ranges apart fetched in one multi-range request, bridging still takes fewer
/// requests (181, 6.59 s, 55.5 MB; without bridging 192, 6.80 s, 53.0 MB).
fn bridged(image: &MappedImage, chunks: Vec<u32>) -> Vec<(u32, u32)> {
    crate::chunk_ranges::ranges(chunks, |end, next| {
        crate::chunk_ranges::bridgeable_within(image, end, next, GAP_BYTES)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_objects_are_known_by_their_names() {
        for name in [
            "libc.so.6",
            "libssl.so.3",
            "_json.cpython-311-x86_64-linux-gnu.so",
            "ld-linux-x86-64.so.2",
        ] {
            assert!(is_shared_object(name.as_bytes()), "{name}");
        }
        for name in ["model.bin", "data.sqlite", "sofa.txt", "x.sox", "so"] {
            assert!(!is_shared_object(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn a_directory_is_read_ahead_again_only_for_a_fresh_miss_and_a_few_times() {
        let rounds = AtomicU8::new(0);
        assert_eq!(next_round(&rounds, false), Some(0), "the first miss reads it ahead");
        assert_eq!(
            next_round(&rounds, false),
            None,
            "a read waiting for readahead does not"
        );
        for round in 1..MAX_DIR_ROUNDS {
            assert_eq!(next_round(&rounds, true), Some(round));
        }
        assert_eq!(next_round(&rounds, true), None, "at most MAX_DIR_ROUNDS times");
    }
}
