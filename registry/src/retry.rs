//! Bounded retries with exponential backoff and jitter.

use std::time::{Duration, Instant};

/// How hard to retry a request before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No new attempt starts after this much time since the first.
    pub max_elapsed: Duration,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            max_elapsed: Duration::from_secs(60),
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// The state of one retried operation.
#[derive(Debug)]
pub struct Attempts {
    policy: RetryPolicy,
    started: Instant,
    /// No attempt runs past this instant.
    deadline: Instant,
    pub made: u32,
}

impl Attempts {
    pub fn new(policy: RetryPolicy) -> Self {
        let started = Instant::now();
        Attempts {
            policy,
            started,
            deadline: started + policy.max_elapsed,
            made: 0,
        }
    }

    /// Attempts that also end at `deadline` (an operation's, shared by its requests).
    pub fn until(policy: RetryPolicy, deadline: Instant) -> Self {
        let mut attempts = Self::new(policy);
        attempts.deadline = attempts.deadline.min(deadline);
        attempts
    }

    /// When the last attempt must have ended.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sleeps before the next attempt (`hint`: the server's Retry-After) and returns
    /// true, or returns false when the budget is spent.
    pub fn wait_before_retry(&mut self, hint: Option<Duration>) -> bool {
        if self.made >= self.policy.max_attempts {
            return false;
        }
        let exponential = self
            .policy
            .base_delay
            .saturating_mul(1 << self.made.min(16).saturating_sub(1));
        let delay = hint.unwrap_or(exponential).min(self.policy.max_delay);
        // Up to +50% jitter so many clients do not retry in lockstep.
        let jitter = delay.mul_f64(f64::from(jitter_fraction()) * 0.5);
        let delay = delay + jitter;
        if Instant::now() + delay >= self.deadline {
            return false;
        }
        std::thread::sleep(delay);
        true
    }
}

/// A number in [0, 1) that differs between calls and processes.
fn jitter_fraction() -> f32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() % 10_000) as f32 / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_attempt_budget() {
        let policy = RetryPolicy {
            max_attempts: 3,
            max_elapsed: Duration::from_secs(5),
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let mut attempts = Attempts::new(policy);
        let mut retries = 0;
        loop {
            attempts.made += 1;
            if !attempts.wait_before_retry(None) {
                break;
            }
            retries += 1;
        }
        assert_eq!(retries, 2);
    }

    #[test]
    fn stops_at_the_time_budget() {
        let policy = RetryPolicy {
            max_attempts: 100,
            max_elapsed: Duration::from_millis(50),
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
        };
        let mut attempts = Attempts::new(policy);
        attempts.made = 1;
        while attempts.wait_before_retry(None) {
            attempts.made += 1;
        }
        assert!(attempts.elapsed() < Duration::from_millis(200));
    }
}
