//! The shared libraries an executable or library needs (its `DT_NEEDED` entries),
//! found in the image where the dynamic loader would look: the file's `RUNPATH` (or
//! `RPATH`), then the usual library directories. The loader reads them one after
//! another, each a round trip for its header and another for its dynamic section;
//! read ahead, they come together in the background.
//!
//! Everything here reads bytes from a stranger's image: every offset and size is
//! bounded, and anything that does not parse is no libraries rather than an error.

use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use petrel_format::layout::ROOT_INO;
use petrel_format::{Bootstrap, FileKind};

/// Largest dynamic section read (entries of 16 bytes: 4096 entries).
const MAX_DYNAMIC_BYTES: u64 = 64 << 10;
/// Most of the string table read to find the names in it.
const MAX_STRINGS_BYTES: u64 = 256 << 10;
/// Most libraries taken from one file.
const MAX_NEEDED: usize = 64;
/// Most symlinks followed resolving one path (the kernel's limit is 40).
const MAX_SYMLINKS: usize = 16;

/// An ELF file's head, read for where its dynamic section and string table lie.
#[derive(Debug, Clone)]
pub struct ElfHead {
    endian: object::Endianness,
    machine: object::elf::Machine,
    /// (file offset, size) of the dynamic section.
    dynamic: (u64, u64),
    /// (file offset, size) of the program interpreter's path (`PT_INTERP`).
    interpreter: Option<(u64, u64)>,
    /// Loadable segments: (virtual address, file offset, size in the file).
    loads: Vec<(u64, u64, u64)>,
}

/// Where the names of the needed libraries lie: read by `library_names`.
#[derive(Debug, Clone)]
pub struct StringRefs {
    /// File offset and size of the part of the string table that holds them.
    pub strings: (u64, u64),
    /// Where that part starts in the string table.
    first: u64,
    needed: Vec<u64>,
    runpath: Option<u64>,
}

impl ElfHead {
    /// The head of a 64-bit ELF file with a dynamic section (its program headers
    /// within `head`); None otherwise.
    pub fn parse(head: &[u8]) -> Option<ElfHead> {
        let header = object::elf::FileHeader64::<object::Endianness>::parse(head).ok()?;
        let endian = header.endian().ok()?;
        let program_headers = header.program_headers(endian, head).ok()?;
        let dynamic = program_headers
            .iter()
            .find(|p| p.p_type(endian) == object::elf::PT_DYNAMIC)
            .map(|p| (p.p_offset(endian), p.p_filesz(endian).min(MAX_DYNAMIC_BYTES)))?;
        let interpreter = program_headers
            .iter()
            .find(|p| p.p_type(endian) == object::elf::PT_INTERP)
            .map(|p| (p.p_offset(endian), p.p_filesz(endian)));
        let loads = program_headers
            .iter()
            .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
            .map(|p| (p.p_vaddr(endian), p.p_offset(endian), p.p_filesz(endian)))
            .collect();
        Some(ElfHead {
            endian,
            machine: header.e_machine(endian),
            dynamic,
            interpreter,
            loads,
        })
    }

    /// The program interpreter's path (the dynamic loader an executable names, as
    /// `/lib64/ld-linux-x86-64.so.2`) when it lies within `head`.
    pub fn interpreter<'h>(&self, head: &'h [u8]) -> Option<&'h [u8]> {
        let (offset, size) = self.interpreter?;
        let start = usize::try_from(offset).ok()?;
        let path = head.get(start..start.checked_add(usize::try_from(size).ok()?)?)?;
        let path = path.split(|b| *b == 0).next()?;
        (!path.is_empty()).then_some(path)
    }

    /// (file offset, size) of the dynamic section, at most `MAX_DYNAMIC_BYTES`.
    pub fn dynamic(&self) -> (u64, u64) {
        self.dynamic
    }

    /// From the dynamic section's bytes: where the needed libraries' names lie.
    pub fn string_refs(&self, dynamic: &[u8]) -> Option<StringRefs> {
        let count = dynamic.len() / std::mem::size_of::<object::elf::Dyn64<object::Endianness>>();
        let (entries, _) =
            object::pod::slice_from_bytes::<object::elf::Dyn64<object::Endianness>>(dynamic, count).ok()?;
        let (mut strtab, mut strsz, mut needed, mut runpath, mut rpath) = (None, None, Vec::new(), None, None);
        for entry in entries {
            let value = entry.d_val(self.endian);
            match entry.d_tag(self.endian) {
                object::elf::DT_NULL => break,
                object::elf::DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(value),
                object::elf::DT_STRTAB => strtab = Some(value),
                object::elf::DT_STRSZ => strsz = Some(value),
                object::elf::DT_RUNPATH => runpath = Some(value),
                object::elf::DT_RPATH => rpath = Some(value),
                _ => {}
            }
        }
        if needed.is_empty() {
            return None;
        }
        let strtab = self.file_offset(strtab?)?;
        // Only the part of the table holding the names: a big library's table holds
        // its symbols' names too (`libnode.so.108`: several MB, the libraries' names
        // after them).
        let runpath = runpath.or(rpath);
        let names = || needed.iter().chain(runpath.as_ref());
        let first = names().min().copied()?;
        let last = names().max().copied()?;
        let size = strsz?
            .saturating_sub(first)
            .min(last.saturating_sub(first).saturating_add(4096))
            .min(MAX_STRINGS_BYTES);
        Some(StringRefs {
            strings: (strtab.checked_add(first)?, size),
            first,
            needed,
            // RUNPATH wins over RPATH, as for the loader.
            runpath,
        })
    }

    /// The file offset of virtual address `vaddr`, from the loadable segments.
    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads.iter().find_map(|&(start, offset, size)| {
            (vaddr >= start && vaddr - start < size).then(|| offset + (vaddr - start))
        })
    }

    /// The directories searched after the `RUNPATH`, relative to the image's root:
    /// Debian's multiarch directories for the file's machine, then the others.
    fn default_dirs(&self) -> Vec<&'static [u8]> {
        let multiarch: &[&'static [u8]] = match self.machine {
            object::elf::EM_X86_64 => &[b"lib/x86_64-linux-gnu", b"usr/lib/x86_64-linux-gnu"],
            object::elf::EM_AARCH64 => &[b"lib/aarch64-linux-gnu", b"usr/lib/aarch64-linux-gnu"],
            _ => &[],
        };
        multiarch
            .iter()
            .copied()
            .chain([b"lib64" as &[u8], b"usr/lib64", b"lib", b"usr/lib", b"usr/local/lib"])
            .collect()
    }
}

/// The libraries named in `strings` (the string table's bytes from `refs.strings`),
/// resolved in `bootstrap` as the loader would: `RUNPATH` entries (`$ORIGIN` is
/// directory `origin`), then the usual directories. Regular files only, each once.
pub fn resolve_needed(
    bootstrap: &Bootstrap<'_>,
    head: &ElfHead,
    refs: &StringRefs,
    strings: &[u8],
    origin: Option<u32>,
) -> Vec<u32> {
    let name_at = |offset: u64| -> Option<&[u8]> {
        let rest = strings.get(usize::try_from(offset.checked_sub(refs.first)?).ok()?..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        Some(&rest[..end])
    };
    let mut dirs: Vec<u32> = Vec::new();
    if let Some(runpath) = refs.runpath.and_then(name_at) {
        for entry in runpath.split(|b| *b == b':').filter(|e| !e.is_empty()) {
            let resolved = match entry
                .strip_prefix(b"$ORIGIN")
                .or_else(|| entry.strip_prefix(b"${ORIGIN}"))
            {
                Some(rest) => origin.and_then(|o| resolve(bootstrap, o, rest)),
                None => resolve(bootstrap, ROOT_INO, entry),
            };
            dirs.extend(resolved);
        }
    }
    dirs.extend(
        head.default_dirs()
            .into_iter()
            .filter_map(|d| resolve(bootstrap, ROOT_INO, d)),
    );
    let mut found = Vec::new();
    for name in refs.needed.iter().filter_map(|o| name_at(*o)) {
        if name.is_empty() || name.contains(&b'/') {
            continue;
        }
        let library = dirs.iter().find_map(|dir| {
            resolve(bootstrap, *dir, name).filter(|ino| {
                bootstrap
                    .inode(*ino)
                    .is_ok_and(|i| i.kind().ok() == Some(FileKind::Regular))
            })
        });
        if let Some(ino) = library.filter(|ino| !found.contains(ino)) {
            found.push(ino);
        }
    }
    found
}

/// The inode at `path` from directory `from` (from the root when `path` is
/// absolute), following symlinks (at most `MAX_SYMLINKS`); None when it is not there.
pub fn resolve(bootstrap: &Bootstrap<'_>, from: u32, path: &[u8]) -> Option<u32> {
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut symlinks = 0usize;
    push_components(&mut pending, path);
    let mut at = if path.starts_with(b"/") { ROOT_INO } else { from };
    while let Some(component) = pending.pop() {
        let dir = bootstrap.inode(at).ok()?;
        match component.as_slice() {
            b"." => continue,
            b".." => {
                at = dir.parent();
                continue;
            }
            name => {
                let child = bootstrap.lookup(&dir, name).ok()??;
                let inode = bootstrap.inode(child).ok()?;
                if inode.kind().ok()? == FileKind::Symlink {
                    symlinks += 1;
                    if symlinks > MAX_SYMLINKS {
                        return None;
                    }
                    let target = bootstrap.symlink_target(&inode).ok()?;
                    if target.starts_with(b"/") {
                        at = ROOT_INO;
                    }
                    push_components(&mut pending, target);
                } else {
                    at = child;
                }
            }
        }
    }
    Some(at)
}

/// Pushes `path`'s components so that the first is popped first.
fn push_components(pending: &mut Vec<Vec<u8>>, path: &[u8]) {
    pending.extend(
        path.split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(<[u8]>::to_vec),
    );
}
