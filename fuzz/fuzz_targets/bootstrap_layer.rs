//! Any bytes served as a bootstrap layer: unwrapped from petrel's one-entry tar,
//! then read. Errors are fine, panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_format::layer_tar;

fuzz_target!(|data: &[u8]| {
    if let Ok(bootstrap) = layer_tar::bootstrap_of_layer(data) {
        let _ = petrel_format::reader::read_everything(bootstrap, false);
    }
    let _ = layer_tar::data_size(layer_tar::BLOB_ENTRY, data.get(..512).unwrap_or(data));
});
