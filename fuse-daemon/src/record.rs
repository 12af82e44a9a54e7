//! Records what a workload reads through a mount: files in first-access order and
//! the byte ranges read from each, saved as a prefetch profile.

use crate::image::MappedImage;
use petrel_format::profile::{merge_ranges, Profile, ProfileEntry, PROFILE_VERSION};
use petrel_format::FileKind;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Recorded {
    order: Vec<u32>,
    ranges: HashMap<u32, Vec<[u64; 2]>>,
}

/// Collects reads; cheap enough for the read path (one lock, amortised pushes).
#[derive(Debug, Default)]
pub struct Recorder {
    recorded: Mutex<Recorded>,
}

impl Recorder {
    pub fn record(&self, ino: u32, offset: u64, len: u64) {
        let mut recorded = self.recorded.lock().expect("recorder lock");
        let ranges = recorded.ranges.entry(ino).or_default();
        let first = ranges.is_empty();
        ranges.push([offset, offset.saturating_add(len)]);
        if ranges.len() > 4096 {
            *ranges = merge_ranges(std::mem::take(ranges));
        }
        if first {
            recorded.order.push(ino);
        }
    }

    /// The profile so far, with paths looked up in the image.
    pub fn profile(&self, image: &MappedImage) -> Profile {
        let recorded = self.recorded.lock().expect("recorder lock");
        let bootstrap = image.bootstrap();
        let mut path_of: HashMap<u32, Vec<u8>> = HashMap::new();
        for entry in bootstrap.walk().flatten() {
            if recorded.ranges.contains_key(&entry.inode.ino()) && entry.inode.kind().ok() == Some(FileKind::Regular) {
                path_of.entry(entry.inode.ino()).or_insert(entry.path);
            }
        }
        let entries = recorded
            .order
            .iter()
            .filter_map(|ino| {
                let path = path_of.get(ino)?;
                Some(ProfileEntry::new(
                    path,
                    Some(merge_ranges(recorded.ranges[ino].clone())),
                ))
            })
            .collect();
        Profile {
            petrel_profile: PROFILE_VERSION,
            image: Some(hex::encode(image.digest())),
            entries,
        }
    }
}
