//! Generated benchmark inputs, deterministic, written at run time (never committed).

use petrel_fixtures::rng::Rng;
use std::path::Path;

/// ~`total` bytes of mixed files (1 KiB … 64 MiB, text/binary/zero runs), with
/// duplicate files and shared libraries as a real image has.
pub fn mixed_tree(root: &Path, total: u64) -> std::io::Result<u64> {
    let mut rng = Rng::new(11);
    let mut written = 0u64;
    let mut index = 0;
    let mut previous: Vec<Vec<u8>> = Vec::new();
    while written < total {
        let dir = root.join(format!("dir{:02}", index % 23));
        std::fs::create_dir_all(&dir)?;
        let size = match rng.below(10) {
            0..=4 => 1024 + rng.below(60 << 10),
            5..=7 => (256 << 10) + rng.below(4 << 20),
            _ => (8 << 20) + rng.below(56 << 20),
        } as usize;
        let data = if rng.below(12) == 0 && !previous.is_empty() {
            previous[rng.below(previous.len() as u64) as usize].clone()
        } else {
            rng.mixed(size)
        };
        if data.len() < (1 << 20) && previous.len() < 64 {
            previous.push(data.clone());
        }
        written += data.len() as u64;
        std::fs::write(dir.join(format!("file{index:05}.bin")), &data)?;
        index += 1;
    }
    Ok(written)
}

/// `count` small text files (100 B … 8 KiB) in 500 directories.
pub fn small_files_tree(root: &Path, count: usize) -> std::io::Result<u64> {
    let mut rng = Rng::new(12);
    let mut written = 0u64;
    for i in 0..count {
        let dir = root.join(format!("pkg{:03}", i % 500));
        if i < 500 {
            std::fs::create_dir_all(&dir)?;
        }
        let len = 100 + rng.below(8000) as usize;
        let data = rng.text(len);
        written += data.len() as u64;
        std::fs::write(dir.join(format!("mod{i:05}.py")), &data)?;
    }
    Ok(written)
}
