//! Which blobs a pull-through mirror holds yet. A mirror that answers a Range
//! request with the whole blob (200) is still fetching it from the origin (a
//! docker-registry in proxy mode streams a cold blob whole, once per request, while
//! it stores a copy): asking it again before it has the blob makes it fetch the
//! whole blob from the origin once more, for every request. So one request at a time
//! probes a mirror for a blob; while that probe is out, or after the mirror answered
//! it with a whole blob, reads of that blob go to the origin (exactly their ranges)
//! for a backoff that doubles while the mirror stays cold; the first ranged answer
//! (206) makes the blob warm at that mirror for good.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long reads avoid a mirror after it answered a blob whole, at first.
pub const MIN_COLD_BACKOFF: Duration = Duration::from_secs(2);
/// The longest such wait.
pub const MAX_COLD_BACKOFF: Duration = Duration::from_secs(60);
/// Entries kept; beyond that the table starts again (every blob unknown).
const MAX_ENTRIES: usize = 16_384;

#[derive(Debug, Clone, Copy)]
enum State {
    /// One request is finding out.
    Probing { backoff: Duration },
    /// The mirror answered the blob whole: it is filling its cache.
    Cold { until: Instant, backoff: Duration },
    /// The mirror answers ranges of the blob.
    Warm,
}

/// Warmth of (mirror base URL, blob digest) pairs, for one client.
#[derive(Debug, Default)]
pub struct MirrorWarmth {
    states: Mutex<HashMap<(String, String), State>>,
}

impl MirrorWarmth {
    /// Whether a ranged read of `digest` may go to `mirror` now: yes when the blob is
    /// warm there; yes for one caller (the probe) when it is unknown or its cold
    /// backoff has passed; no while a probe is out or the mirror is cold.
    pub fn try_use(&self, mirror: &str, digest: &str) -> bool {
        let Ok(mut states) = self.states.lock() else {
            return true;
        };
        if states.len() >= MAX_ENTRIES {
            states.clear();
        }
        let state = states
            .entry((mirror.to_string(), digest.to_string()))
            .or_insert(State::Cold {
                until: Instant::now(),
                backoff: MIN_COLD_BACKOFF / 2,
            });
        match *state {
            State::Warm => true,
            State::Probing { .. } => false,
            State::Cold { until, backoff } if Instant::now() >= until => {
                *state = State::Probing { backoff };
                true
            }
            State::Cold { .. } => false,
        }
    }

    /// When `try_use` may next say yes for `digest` at `mirror`.
    pub fn next_try(&self, mirror: &str, digest: &str) -> Instant {
        let now = Instant::now();
        let Ok(states) = self.states.lock() else { return now };
        match states.get(&(mirror.to_string(), digest.to_string())) {
            Some(State::Cold { until, .. }) => (*until).max(now),
            Some(State::Probing { .. }) => now + Duration::from_millis(100),
            _ => now,
        }
    }

    /// `mirror` answered a range of `digest` (206).
    pub fn warm(&self, mirror: &str, digest: &str) {
        if let Ok(mut states) = self.states.lock() {
            states.insert((mirror.to_string(), digest.to_string()), State::Warm);
        }
    }

    /// `mirror` answered a range of `digest` with the whole blob (200).
    pub fn cold(&self, mirror: &str, digest: &str) {
        let Ok(mut states) = self.states.lock() else { return };
        let key = (mirror.to_string(), digest.to_string());
        let previous = match states.get(&key) {
            Some(State::Probing { backoff }) | Some(State::Cold { backoff, .. }) => *backoff,
            _ => MIN_COLD_BACKOFF / 2,
        };
        let backoff = (previous * 2).clamp(MIN_COLD_BACKOFF, MAX_COLD_BACKOFF);
        tracing::debug!(
            mirror,
            digest,
            seconds = backoff.as_secs(),
            "the mirror does not hold the blob yet; reading it from the origin meanwhile"
        );
        states.insert(
            key,
            State::Cold {
                until: Instant::now() + backoff,
                backoff,
            },
        );
    }

    /// A probe that got no answer about the blob (an error, a 404): the next read
    /// may probe again.
    pub fn abandon(&self, mirror: &str, digest: &str) {
        if let Ok(mut states) = self.states.lock() {
            let key = (mirror.to_string(), digest.to_string());
            if let Some(State::Probing { backoff }) = states.get(&key).copied() {
                states.insert(
                    key,
                    State::Cold {
                        until: Instant::now(),
                        backoff,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_at_a_time_then_cold_with_a_growing_backoff_then_warm() {
        let warmth = MirrorWarmth::default();
        assert!(warmth.try_use("m", "d"), "the first read probes");
        assert!(!warmth.try_use("m", "d"), "others go to the origin meanwhile");
        assert!(warmth.try_use("m", "other"), "blobs are independent");
        assert!(warmth.try_use("n", "d"), "and so are mirrors");
        warmth.cold("m", "d");
        assert!(!warmth.try_use("m", "d"), "cold: skipped for its backoff");
        // Past the backoff one read probes again.
        if let Some(State::Cold { until, .. }) = warmth.states.lock().unwrap().get_mut(&("m".into(), "d".into())) {
            *until = Instant::now();
        }
        assert!(warmth.try_use("m", "d"));
        assert!(!warmth.try_use("m", "d"));
        warmth.cold("m", "d");
        match warmth.states.lock().unwrap().get(&("m".into(), "d".into())) {
            Some(State::Cold { backoff, .. }) => assert_eq!(*backoff, MIN_COLD_BACKOFF * 2),
            other => panic!("{other:?}"),
        }
        warmth.warm("m", "d");
        assert!(warmth.try_use("m", "d") && warmth.try_use("m", "d"), "warm: every read");
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_read_probe() {
        let warmth = MirrorWarmth::default();
        assert!(warmth.try_use("m", "d"));
        warmth.abandon("m", "d");
        assert!(warmth.try_use("m", "d"));
    }
}
