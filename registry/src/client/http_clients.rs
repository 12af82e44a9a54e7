//! One HTTP client per configuration in a process. Building a client loads and
//! parses the system's root certificates and starts the thread that drives its
//! connections; a conversion makes a [`super::RegistryClient`] for its source,
//! its target and each chunk dictionary, and a snapshotter one per image it
//! resolves, all with the same few configurations. Shared, they also share
//! their connection pools: a dictionary's blobs come over the connection the
//! target's pushes opened.

use reqwest::blocking::Client;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// What an HTTP client is built from: two clients built from equal settings
/// behave alike, so one serves both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HttpSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// The extra CA certificates' PEM bytes (their content, not their path: a
    /// rotated file gives a new client).
    pub extra_ca_pem: Option<Vec<u8>>,
    /// The proxy variables as the environment set them, by name.
    pub proxy_env: Vec<(&'static str, String)>,
}

/// Configurations kept at most; a process uses a handful (one per timeout or CA
/// file), so more means something varies per call, and such clients are built
/// each time instead of piling up.
const MAX_KEPT: usize = 16;

fn kept() -> &'static Mutex<HashMap<HttpSettings, Client>> {
    static KEPT: OnceLock<Mutex<HashMap<HttpSettings, Client>>> = OnceLock::new();
    KEPT.get_or_init(Default::default)
}

/// The client for `settings`: the one built before from equal settings, else a
/// new one from `build`, kept for the next caller. A failed build is not kept.
pub(crate) fn shared<E>(
    settings: HttpSettings,
    build: impl FnOnce(&HttpSettings) -> Result<Client, E>,
) -> Result<Client, E> {
    if let Some(client) = kept().lock().ok().and_then(|kept| kept.get(&settings).cloned()) {
        return Ok(client);
    }
    // Built outside the lock: loading certificates takes a while, and two
    // threads racing for one configuration only build it twice.
    let client = build(&settings)?;
    if let Ok(mut kept) = kept().lock() {
        if kept.len() < MAX_KEPT {
            kept.entry(settings).or_insert_with(|| client.clone());
        }
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(seconds: u64) -> HttpSettings {
        HttpSettings {
            connect_timeout: Duration::from_secs(seconds),
            request_timeout: Duration::from_secs(seconds),
            extra_ca_pem: None,
            proxy_env: Vec::new(),
        }
    }

    #[test]
    fn equal_settings_build_once_and_a_failed_build_is_not_kept() {
        let mut builds = 0;
        for _ in 0..3 {
            shared::<reqwest::Error>(settings(7001), |_| {
                builds += 1;
                Client::builder().build()
            })
            .unwrap();
        }
        assert_eq!(builds, 1, "equal settings share one client");
        shared::<reqwest::Error>(settings(7002), |_| {
            builds += 1;
            Client::builder().build()
        })
        .unwrap();
        assert_eq!(builds, 2, "other settings get their own");
        assert!(shared(settings(7003), |_| Err("no")).is_err());
        shared::<reqwest::Error>(settings(7003), |_| {
            builds += 1;
            Client::builder().build()
        })
        .unwrap();
        assert_eq!(builds, 3, "a failed build leaves nothing behind");
    }
}
