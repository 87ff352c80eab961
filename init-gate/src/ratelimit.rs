//! "Log each distinct reason at most once per period."
//!
//! The gate may retry every few hundred milliseconds while the API server is
//! down, and thousands of gated pods share one log pipeline, so a reason that
//! persists is repeated only once per period (a minute in the binary) while a
//! new reason is logged at once. Time is passed in, which keeps the limiter
//! pure and testable without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How many distinct reasons are remembered; older ones are forgotten first.
/// Reasons are few in practice (standby, missing, forbidden, unreachable, a
/// malformed record); the bound only guards against unbounded variety.
const MAX_KEYS: usize = 64;

/// Admits a log line for a reason key at most once per period.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    period: Duration,
    last: HashMap<String, Instant>,
}

impl LogLimiter {
    /// A limiter admitting each key once per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: HashMap::new(),
        }
    }

    /// Whether a line for `key` may be logged at `now`; if so, records it.
    pub fn admit(&mut self, key: &str, now: Instant) -> bool {
        if let Some(at) = self.last.get(key)
            && now.saturating_duration_since(*at) < self.period
        {
            return false;
        }
        if !self.last.contains_key(key) && self.last.len() >= MAX_KEYS {
            self.forget_oldest();
        }
        self.last.insert(key.to_owned(), now);
        true
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self
            .last
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(k, _)| k.clone())
        {
            self.last.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_persisting_reason_is_logged_once_per_period() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(MINUTE);
        let admitted: Vec<u64> = (0..=150)
            .filter(|s| l.admit("unreachable", t0 + Duration::from_secs(*s)))
            .collect();
        assert_eq!(admitted, [0, 60, 120]);
    }

    #[test]
    fn distinct_reasons_are_limited_independently() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(MINUTE);
        assert!(l.admit("missing", t0));
        assert!(l.admit("forbidden/403", t0 + Duration::from_secs(1)));
        assert!(!l.admit("missing", t0 + Duration::from_secs(2)));
        assert!(!l.admit("forbidden/403", t0 + Duration::from_secs(3)));
        assert!(l.admit("standby/4", t0 + Duration::from_secs(4)));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_key_goes_first() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(MINUTE);
        for i in 0..(MAX_KEYS as u64 * 3) {
            assert!(l.admit(&format!("k{i}"), t0 + Duration::from_millis(i)));
        }
        assert!(l.last.len() <= MAX_KEYS);
        // The newest key is still remembered, so it is still limited.
        let newest = format!("k{}", MAX_KEYS as u64 * 3 - 1);
        assert!(!l.admit(&newest, t0 + Duration::from_secs(1)));
        // The first key was forgotten, so it is admitted again.
        assert!(l.admit("k0", t0 + Duration::from_secs(1)));
    }
}
