//! How long the peer client waits before retrying a send: exponential in
//! the attempt, the upper half of each step random, so that members that
//! failed together do not retry together.

use std::time::Duration;

/// Exponential backoff for try `attempt` (1-based): `base · 2^(attempt-1)`,
/// the upper half of it random.
pub(super) fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    full / 2 + jitter(full / 2)
}

/// A random duration in `[0, max]`. Std's per-instance random hash keys are
/// plenty for spreading retries, and need no extra dependency.
fn jitter(max: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(0u8);
    max.mul_f64(r as f64 / u64::MAX as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let base = Duration::from_millis(20);
        for attempt in 1..=4 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let b = backoff(base, attempt);
                assert!(b >= full / 2 && b <= full, "{attempt}: {b:?}");
            }
        }
    }
}
