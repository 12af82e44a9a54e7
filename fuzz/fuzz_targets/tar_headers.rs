//! Any bytes as a tar stream, read the way the builder reads layers (the patched
//! `tar` crate with petrel's metadata limit): every entry's path, link name, PAX
//! records and data. Errors are fine; panics, and metadata held beyond the limit,
//! are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Read;

const LIMIT: u64 = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let mut archive = tar::Archive::new(data);
    archive.set_max_metadata_size(LIMIT);
    let Ok(entries) = archive.entries() else { return };
    for entry in entries {
        let Ok(mut entry) = entry else { return };
        assert!(entry.path_bytes().len() as u64 <= LIMIT.max(512));
        let _ = entry.link_name_bytes();
        if let Ok(Some(records)) = entry.pax_extensions() {
            for record in records {
                let Ok(record) = record else { break };
                let _ = (record.key(), record.value_bytes());
            }
        }
        let mut sink = Vec::new();
        if (&mut entry).take(1 << 20).read_to_end(&mut sink).is_err() {
            return;
        }
    }
});
