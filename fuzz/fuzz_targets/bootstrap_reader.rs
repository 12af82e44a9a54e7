//! Any bytes given to the bootstrap reader: errors are fine, panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Skip the digest check so mutations reach the tables; also try with it on.
    let _ = petrel_format::reader::read_everything(data, false);
    let _ = petrel_format::reader::read_everything(data, true);
});
