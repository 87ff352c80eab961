//! Capped exponential backoff with jitter for re-establishing the watch.
//!
//! Every gated pod of a cluster retries against the same API server, so
//! after an API server restart hundreds of gates would otherwise reconnect
//! in lockstep. Each delay is therefore drawn from `[d/2, d]` ("equal
//! jitter"), where `d` doubles from `initial` up to `max`. The random
//! source is a seeded xorshift so that tests are deterministic; the binary
//! seeds it from the standard library's per-process random hash keys, which
//! needs no extra dependency.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Capped exponential backoff with equal jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max`, with a jitter seed.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial: initial.min(max),
            max,
            attempt: 0,
            // xorshift must not start at zero, or it stays there.
            rng: seed | 1,
        }
    }

    /// A backoff seeded from per-process randomness.
    pub fn with_random_seed(initial: Duration, max: Duration) -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self::new(initial, max, seed)
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        // 2^20 × any sane initial delay exceeds any sane cap; stop doubling there
        // so the multiplication can never overflow.
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay to wait before retrying; each call counts one failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let span = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 {
            0
        } else {
            self.next_random() % (span + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// The delays as kube's watcher wants them: an endless sequence that a
/// successful event resets (`StreamBackoff` calls `reset` on every `Ok`).
impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 42);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling());
            b.next_delay();
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1000, 1000, 1000, 1000].map(|n| n * MS)
        );
    }

    #[test]
    fn delays_stay_within_half_and_full_ceiling() {
        for seed in 0..200 {
            let mut b = Backoff::new(100 * MS, 10_000 * MS, seed);
            for _ in 0..40 {
                let ceiling = b.ceiling();
                let d = b.next_delay();
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_delays_across_seeds() {
        let firsts: std::collections::BTreeSet<Duration> = (0..50)
            .map(|seed| Backoff::new(1000 * MS, 1000 * MS, seed * 7919).next_delay())
            .collect();
        assert!(firsts.len() > 10, "jitter must vary: {firsts:?}");
    }

    #[test]
    fn reset_starts_over_and_many_failures_do_not_overflow() {
        let mut b = Backoff::new(MS, Duration::from_secs(30), 1);
        for _ in 0..10_000 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.ceiling(), MS);
    }

    #[test]
    fn as_a_watcher_backoff_it_never_ends_and_resets() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 9);
        let delays: Vec<Duration> = b.by_ref().take(50).collect();
        assert_eq!(delays.len(), 50);
        assert!(delays.iter().all(|d| *d <= 1000 * MS));
        kube::runtime::utils::Backoff::reset(&mut b);
        assert_eq!(b.ceiling(), 100 * MS);
    }

    #[test]
    fn initial_above_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(5), 3);
        assert!(b.next_delay() <= Duration::from_secs(5));
    }
}
