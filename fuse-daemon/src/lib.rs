//! petrel's FUSE daemon: maps a bootstrap and serves it through FUSE at once;
//! reads fetch missing chunks on demand (merged range requests, one fetch per
//! chunk), verify them, and keep them in a crash-safe local cache.

pub mod backend;
pub mod bootstrap_fetch;
pub mod byte_size;
pub mod cache;
pub mod chunk_ranges;
pub mod control;
pub mod elf_needs;
pub mod endpoint;
pub mod error;
pub mod exposition;
pub mod fetch;
pub mod file_opens;
pub mod fs;
pub mod image;
pub mod job_queue;
pub mod kernel_readahead;
pub mod mount;
pub mod node_deps;
pub mod pack;
pub mod passthrough;
pub mod prefetch;
pub mod profile_prefetch;
pub mod readahead;
pub mod record;
pub mod remote;
pub mod resolved;
pub mod sequential;
pub mod spec;
pub mod stats;
pub mod store;
pub mod verify;
mod workers;

pub use backend::{Backend, LocalBackend, ReadPurpose};
pub use error::{DaemonError, Result};
pub use mount::{mount, MountConfig, Mounted};
pub use spec::DaemonSpec;
