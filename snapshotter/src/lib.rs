//! petrel's containerd snapshotter. This crate holds the part every snapshots call
//! rests on: metadata in an embedded transactional database and containerd's
//! overlayfs semantics (Prepare, View, Mounts, Commit, Remove, Stat, Update, Usage,
//! Walk with containerd's filter syntax, Cleanup) behind a plain API. The gRPC
//! adapter (containerd-snapshots + tonic) and remote petrel layers build on it.

pub mod config;
pub mod error;
pub mod filter;
pub mod hosts_toml;
pub mod labels;
pub mod metrics;
pub mod provenance;
pub mod remote;
pub mod service;
pub mod store;
pub mod unpacked;

pub use error::{Result, SnapshotError};
pub use store::{Info, Kind, Mount, SnapshotStore, Usage};
