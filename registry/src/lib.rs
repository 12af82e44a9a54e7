//! The registry side of petrel: image references and transports, OCI types, a
//! blocking distribution client (auth, retries, range reads, pushes, mirrors) and
//! OCI image layouts. Shared by the converter, the daemon and the snapshotter.

pub mod auth;
pub mod client;
pub mod cred_helper;
pub mod error;
pub mod health;
pub mod layout;
pub mod oci;
pub mod reference;
pub mod retry;
pub mod warmth;

pub use auth::Credentials;
pub use client::{ClientOptions, RegistryClient};
pub use error::{RegistryError, Result};
pub use reference::{ImageRef, Location};
pub use retry::RetryPolicy;
