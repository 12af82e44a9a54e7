//! Records what a workload reads through a mount: files in first-access order and
//! the byte ranges read from each, saved as a prefetch profile.

use crate::image::MappedImage;
use petrel_format::profile::{merge_ranges, Profile, ProfileEntry, PROFILE_VERSION};
use petrel_format::FileKind;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Recorded {
    order: Vec<u32>,
    ranges: HashMap<u32, Vec<[u64; 2]>>,
}

/// Collects reads; cheap enough for the read path (one lock, amortised pushes).
/// A recorder of a first start (`for_first_start`) stops by itself a while after the
/// first read.
#[derive(Debug, Default)]
pub struct Recorder {
    recorded: Mutex<Recorded>,
    /// Set when recording has stopped.
    stopped: AtomicBool,
    /// How long after the first read a first-start recorder records.
    window: Option<Duration>,
    first_read: OnceLock<Instant>,
}

impl Recorder {
    /// Records the first `window` after the first read, then stops.
    pub fn for_first_start(window: Duration) -> Self {
        Recorder {
            window: Some(window),
            ..Recorder::default()
        }
    }

    /// Stops recording (a profile turned up, or the window is over).
    pub fn stop(&self) {
        self.stopped.store(true, Relaxed);
    }

    /// Whether a first-start window has passed since the first read.
    pub fn window_is_over(&self) -> bool {
        match (self.window, self.first_read.get()) {
            (Some(window), Some(first)) => first.elapsed() >= window,
            _ => false,
        }
    }

    /// Whether anything was recorded.
    pub fn is_empty(&self) -> bool {
        self.recorded.lock().expect("recorder lock").order.is_empty()
    }

    pub fn record(&self, ino: u32, offset: u64, len: u64) {
        if self.stopped.load(Relaxed) {
            return;
        }
        if self.window.is_some() {
            self.first_read.get_or_init(Instant::now);
            if self.window_is_over() {
                self.stop();
                return;
            }
        }
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
