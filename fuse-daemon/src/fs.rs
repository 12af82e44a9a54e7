//! The FUSE filesystem: every request is answered from the mapped bootstrap;
//! reads of cached chunks are served inline on the FUSE threads, reads that need a
//! fetch are handed with their reply to the fetch workers, so a slow fetch never
//! holds up reads of cached data.

use crate::fetch::Fetcher;
use crate::image::MappedImage;
use crate::stats::Stats;
use crate::workers::Workers;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use petrel_format::reader::SegmentSource;
use petrel_format::{Bootstrap, FileKind, FormatError, Inode};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The tree never changes, so the kernel may cache entries and attributes long.
pub const CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Readahead asked of the kernel (it caps this at its own maximum).
pub const MAX_READAHEAD: u32 = 1 << 20;

/// A mounted petrel image.
#[derive(Debug)]
pub struct PetrelFs {
    image: Arc<MappedImage>,
    fetcher: Arc<Fetcher>,
    stats: Arc<Stats>,
    workers: Workers,
    recorder: Option<Arc<crate::record::Recorder>>,
    passthrough: Option<crate::passthrough::Passthrough>,
    readahead: Option<crate::readahead::DirReadahead>,
    sequential: Option<crate::sequential::SequentialReadahead>,
    /// Who opens files, as asked (`crate::file_opens`).
    file_opens: crate::file_opens::FileOpens,
    /// Whether the kernel opens files alone: every OPEN is answered ENOSYS, after
    /// which the kernel sends none (nor RELEASE).
    kernel_opens: std::sync::atomic::AtomicBool,
}

fn format_errno(e: &FormatError) -> Errno {
    tracing::error!("corrupt bootstrap: {e}");
    Errno::EIO
}

/// `SystemTime` of a stored (seconds, nanoseconds) time, also before 1970.
pub fn system_time(sec: i64, nsec: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nsec));
    if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec as u64) + nanos)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(sec.unsigned_abs()))
            .and_then(|t| t.checked_add(nanos))
    }
    .unwrap_or(UNIX_EPOCH)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
    }
}

/// Linux `new_encode_dev`: the `rdev` the kernel decodes from a FUSE attr.
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Attributes of an inode as the kernel sees them.
pub fn attributes(inode: &Inode<'_>) -> Result<FileAttr, FormatError> {
    let kind = inode.kind()?;
    let (sec, nsec) = inode.mtime();
    let time = system_time(sec, nsec);
    let size = if kind == FileKind::Directory {
        4096
    } else {
        inode.size()
    };
    let (major, minor) = inode.rdev();
    Ok(FileAttr {
        ino: INodeNo(u64::from(inode.ino())),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: file_type(kind),
        perm: inode.permissions() as u16,
        nlink: inode.nlink(),
        uid: inode.uid(),
        gid: inode.gid(),
        rdev: encode_rdev(major, minor),
        blksize: 4096,
        flags: 0,
    })
}

impl PetrelFs {
    pub fn new(image: Arc<MappedImage>, fetcher: Arc<Fetcher>, stats: Arc<Stats>, fetch_threads: usize) -> Self {
        PetrelFs {
            image,
            fetcher,
            stats,
            workers: Workers::start("petrel-fetch", fetch_threads),
            recorder: None,
            passthrough: None,
            readahead: None,
            sequential: None,
            file_opens: crate::file_opens::FileOpens::Auto,
            kernel_opens: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Who opens files: `asked`, resolved for this image and whether this mount has
    /// passthrough (`FileOpens::by_kernel`; call after `with_passthrough`). With
    /// `Auto`, a kernel without passthrough makes the kernel open files alone too.
    pub fn with_file_opens(mut self, asked: crate::file_opens::FileOpens) -> Self {
        let by_kernel = asked.by_kernel(&self.image.bootstrap(), self.passthrough.is_some());
        self.file_opens = asked;
        self.kernel_opens = std::sync::atomic::AtomicBool::new(by_kernel);
        self
    }

    /// Fetches ahead of files read front to back.
    pub fn with_sequential_readahead(mut self, sequential: crate::sequential::SequentialReadahead) -> Self {
        self.sequential = Some(sequential);
        self
    }

    /// Reads a directory's small files ahead when one of them misses the cache.
    pub fn with_readahead(mut self, readahead: crate::readahead::DirReadahead) -> Self {
        self.readahead = Some(readahead);
        self
    }

    /// Opens files whose chunks are all cached with a backing file (FUSE passthrough),
    /// when the kernel offers it.
    pub fn with_passthrough(mut self, passthrough: crate::passthrough::Passthrough) -> Self {
        self.passthrough = Some(passthrough);
        self
    }

    /// Records every read into `recorder`.
    pub fn with_recorder(mut self, recorder: Arc<crate::record::Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    fn bootstrap(&self) -> Bootstrap<'_> {
        self.image.bootstrap()
    }

    fn inode(&self, ino: INodeNo) -> Result<Inode<'_>, Errno> {
        let ino = u32::try_from(ino.0).map_err(|_| Errno::ENOENT)?;
        self.bootstrap().inode(ino).map_err(|_| Errno::ENOENT)
    }
}

/// One listed entry: the offset of the entry after it, its inode, its name.
type Listed<'a> = Result<(u64, u32, &'a [u8]), FormatError>;

/// A directory's entries after readdir offset `offset`: 1 is ".", 2 is "..", and
/// 3 + i is stored entry i.
fn listing<'a>(
    bootstrap: &Bootstrap<'a>,
    dir: Inode<'a>,
    offset: u64,
) -> Result<impl Iterator<Item = Listed<'a>>, Errno> {
    let entries = bootstrap.dir_entries(&dir).map_err(|e| format_errno(&e))?;
    let dots = [(1u64, dir.ino(), &b"."[..]), (2, dir.parent(), &b".."[..])];
    let dots = dots.into_iter().filter(move |(next, ..)| *next > offset).map(Ok);
    let skip = offset.saturating_sub(2) as usize;
    let stored = entries
        .skip_to(skip)
        .enumerate()
        .map(move |(i, entry)| entry.map(|e| (3 + (skip + i) as u64, e.ino, e.name)));
    Ok(dots.chain(stored))
}

impl Filesystem for PetrelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_READ;
        if let Err(unsupported) = config.add_capabilities(wanted) {
            let _ = config.add_capabilities(wanted - unsupported);
        }
        if let Some(passthrough) = &self.passthrough {
            // Depth 1: backing files on a plain filesystem, and this mount usable as an
            // overlayfs lower layer (as containerd mounts it).
            let offered =
                config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
            if !offered {
                passthrough.disable("the kernel does not offer it (Linux 6.9 or later does)");
                if self.file_opens == crate::file_opens::FileOpens::Auto {
                    self.kernel_opens.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let by_kernel = self.kernel_opens.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "files are opened by {}",
            if by_kernel { "the kernel alone" } else { "the daemon" }
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let bootstrap = self.bootstrap();
        let result = self.inode(parent).and_then(|dir| {
            if dir.kind().map_err(|e| format_errno(&e))? != FileKind::Directory {
                return Err(Errno::ENOTDIR);
            }
            let ino = bootstrap
                .lookup(&dir, name.as_bytes())
                .map_err(|e| format_errno(&e))?
                .ok_or(Errno::ENOENT)?;
            let inode = bootstrap.inode(ino).map_err(|e| format_errno(&e))?;
            if let (Some(readahead), Ok(parent)) = (&self.readahead, u32::try_from(parent.0)) {
                readahead.learned(ino, parent);
            }
            attributes(&inode).map_err(|e| format_errno(&e))
        });
        match result {
            Ok(attr) => reply.entry(&CACHE_TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .inode(ino)
            .and_then(|i| attributes(&i).map_err(|e| format_errno(&e)))
        {
            Ok(attr) => reply.attr(&CACHE_TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self
            .inode(ino)
            .and_then(|i| self.bootstrap().symlink_target(&i).map_err(|_| Errno::EINVAL));
        match result {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(e),
        }
    }

    /// With the kernel opening files alone, ENOSYS: from then on the kernel sends no
    /// OPEN nor RELEASE, keeps page caches across opens, and the read-only mount
    /// refuses writes itself.
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.stats
            .daemon_opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.kernel_opens.load(std::sync::atomic::Ordering::Relaxed) {
            return reply.error(Errno::ENOSYS);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.inode(ino).map(|i| i.kind()) {
            Ok(Ok(FileKind::Regular)) => match (&self.passthrough, self.inode(ino)) {
                (Some(passthrough), Ok(inode)) => {
                    if passthrough.open(&self.image, &inode, reply) {
                        self.stats
                            .passthrough_opens
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                _ => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            },
            Ok(Ok(FileKind::Directory)) => reply.error(Errno::EISDIR),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let (Some(passthrough), true) = (&self.passthrough, fh.0 != 0) {
            passthrough.release(fh.0);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        let Ok(ino) = u32::try_from(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(recorder) = &self.recorder {
            recorder.record(ino, offset, u64::from(size));
        }
        let bootstrap = self.bootstrap();
        let segments = match bootstrap
            .inode(ino)
            .and_then(|inode| bootstrap.segments(&inode, offset, u64::from(size)))
        {
            Ok(segments) => segments,
            Err(e) => {
                self.stats.record_read(started.elapsed(), 0, false);
                return reply.error(format_errno(&e));
            }
        };
        let cached = self.fetcher.is_cached(&segments);
        if let Some(sequential) = &self.sequential {
            sequential.observed(ino, offset, u64::from(size));
        }
        // Which chunk a miss waits for first (the log, the readahead).
        let first_chunk = (!cached).then(|| {
            segments.iter().find_map(|s| match s.source {
                SegmentSource::Chunk { index, .. } => Some(index),
                SegmentSource::Hole => None,
            })
        });
        // A miss takes its directory's and package's files along in its request;
        // the readahead is pushed once that request is planned.
        let along = match (&self.readahead, first_chunk) {
            (Some(readahead), Some(first_chunk)) => {
                let mut miss = readahead.missed(ino, first_chunk);
                // (The jobs already hold these ranges too.)
                let ranges = std::mem::take(&mut miss.along);
                crate::fetch::Along::new(
                    ino,
                    ranges,
                    crate::readahead::Miss::ALONG_BYTES,
                    Box::new(move || miss.push()),
                )
            }
            _ => crate::fetch::Along::default(),
        };
        let serve = {
            let fetcher = Arc::clone(&self.fetcher);
            let stats = Arc::clone(&self.stats);
            move || match fetcher.read_along(&segments, along) {
                Ok(bytes) => {
                    stats.record_read(started.elapsed(), bytes.len(), true);
                    reply.data(&bytes);
                    crate::fetch::recycle(bytes);
                }
                Err(e) => {
                    stats.record_read(started.elapsed(), 0, false);
                    tracing::warn!(ino, offset, size, "read failed: {e}");
                    reply.error(e.errno());
                }
            }
        };
        if cached {
            serve();
        } else {
            self.workers.run(Box::new(serve));
            tracing::debug!(ino, offset, size, first_chunk = ?first_chunk.flatten(), "read misses the cache");
        }
    }

    /// Nothing is ever written, so there is nothing to flush: ENOSYS tells the kernel
    /// to stop sending FLUSH, a synchronous round trip on every `close` of a file.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inode(ino).map(|i| i.kind()) {
            Ok(Ok(FileKind::Directory)) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let bootstrap = self.bootstrap();
        let entries = match self.inode(ino).and_then(|dir| listing(&bootstrap, dir, offset)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for entry in entries {
            let listed = entry.and_then(|(next, ino, name)| Ok((next, ino, name, bootstrap.inode(ino)?.kind()?)));
            match listed {
                Ok((next, ino, name, kind)) => {
                    if reply.add(INodeNo(u64::from(ino)), next, file_type(kind), OsStr::from_bytes(name)) {
                        break;
                    }
                }
                Err(e) => return reply.error(format_errno(&e)),
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let bootstrap = self.bootstrap();
        let dir_ino = u32::try_from(ino.0).unwrap_or(0);
        let entries = match self.inode(ino).and_then(|dir| listing(&bootstrap, dir, offset)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for entry in entries {
            let listed = entry.and_then(|(next, ino, name)| Ok((next, ino, name, attributes(&bootstrap.inode(ino)?)?)));
            match listed {
                Ok((next, ino, name, attr)) => {
                    if let Some(readahead) = &self.readahead {
                        readahead.learned(ino, dir_ino);
                    }
                    let name = OsStr::from_bytes(name);
                    if reply.add(INodeNo(u64::from(ino)), next, name, &CACHE_TTL, &attr, Generation(0)) {
                        break;
                    }
                }
                Err(e) => return reply.error(format_errno(&e)),
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = self.inode(ino).and_then(|i| {
            self.bootstrap()
                .xattr(&i, name.as_bytes())
                .map_err(|e| format_errno(&e))
        });
        match result {
            Ok(Some(value)) if size == 0 => reply.size(value.len() as u32),
            Ok(Some(value)) if value.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(Some(value)) => reply.data(value),
            Ok(None) => reply.error(Errno::ENODATA),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = self
            .inode(ino)
            .and_then(|i| self.bootstrap().xattrs(&i).map_err(|e| format_errno(&e)));
        let names = match result {
            Ok(xattrs) => xattrs
                .iter()
                .flat_map(|(n, _)| n.iter().copied().chain([0u8]))
                .collect::<Vec<u8>>(),
            Err(e) => return reply.error(e),
        };
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bootstrap = self.bootstrap();
        let bytes: u64 = bootstrap
            .blobs()
            .filter_map(Result::ok)
            .map(|b| b.uncompressed_size)
            .sum();
        let files = u64::from(bootstrap.inode_count());
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.inode(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
