//! Which mirrors are down. A mirror that fails (no connection, a timeout, a 5xx) is
//! skipped for a backoff period that doubles while it stays down, and probed in the
//! background (`GET /v2/`, as Nydus probes its Dragonfly proxy's ping URL); the
//! first answer puts it back. So a dead mirror costs one failed request, not one per
//! read, and reads come back to it by themselves once it heals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The first backoff after a failure.
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a probe waits for an answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Down {
    until: Instant,
    backoff: Duration,
    probing: bool,
}

/// Health of the read sources (mirror base URLs) of one client.
#[derive(Debug, Default)]
pub struct SourceHealth {
    down: Mutex<HashMap<String, Down>>,
}

impl SourceHealth {
    /// Whether `base` may be asked now.
    pub fn is_up(&self, base: &str) -> bool {
        self.down
            .lock()
            .map(|down| down.get(base).is_none_or(|d| Instant::now() >= d.until))
            .unwrap_or(true)
    }

    /// `base` answered.
    pub fn succeeded(&self, base: &str) {
        if let Ok(mut down) = self.down.lock() {
            if down.remove(base).is_some() {
                tracing::info!(mirror = base, "mirror is back");
            }
        }
    }

    /// `base` failed: skip it for a backoff (doubling while it stays down). Returns
    /// whether a prober should be started for it (none runs yet).
    pub fn failed(&self, base: &str) -> bool {
        let Ok(mut down) = self.down.lock() else { return false };
        let entry = down.entry(base.to_string()).or_insert(Down {
            until: Instant::now(),
            backoff: MIN_BACKOFF / 2,
            probing: false,
        });
        entry.backoff = (entry.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        entry.until = Instant::now() + entry.backoff;
        tracing::warn!(
            mirror = base,
            seconds = entry.backoff.as_secs(),
            "mirror failed; skipping it and probing it in the background"
        );
        !std::mem::replace(&mut entry.probing, true)
    }

    /// When `base` may be asked again, if it is down.
    fn down_until(&self, base: &str) -> Option<Instant> {
        self.down.lock().ok()?.get(base).map(|d| d.until)
    }
}

/// Probes `base` in the background until it answers (or `health` is dropped by its
/// client, which ends the prober).
pub fn start_prober(health: &Arc<SourceHealth>, http: reqwest::blocking::Client, base: String) {
    let health = Arc::downgrade(health);
    let spawned = std::thread::Builder::new()
        .name("petrel-mirror-probe".into())
        .spawn(move || loop {
            let Some(until) = health.upgrade().and_then(|h| h.down_until(&base)) else {
                return;
            };
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            let answered = http
                .get(format!("{base}/v2/"))
                .timeout(PROBE_TIMEOUT)
                .send()
                .is_ok_and(|r| !r.status().is_server_error());
            let Some(health) = health.upgrade() else { return };
            if answered {
                health.succeeded(&base);
                return;
            }
            health.failed(&base);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a mirror prober: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_source_is_skipped_with_a_growing_backoff() {
        let health = SourceHealth::default();
        assert!(health.is_up("http://m"));
        assert!(health.failed("http://m"), "the first failure starts a prober");
        assert!(!health.is_up("http://m"));
        let first = health.down_until("http://m").unwrap();
        assert!(!health.failed("http://m"), "one prober per source");
        let second = health.down_until("http://m").unwrap();
        assert!(second - Instant::now() > first.saturating_duration_since(Instant::now()));
        assert!(health.is_up("http://other"));
        health.succeeded("http://m");
        assert!(health.is_up("http://m"));
    }
}
